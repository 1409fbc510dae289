"""The researcher service's route table: a node's message goes to the kernel whose request it answers."""

from __future__ import annotations

from fedlab.transport.service_routes import RouteTable


def test_a_reply_goes_to_the_kernel_that_asked_and_ends_the_route():
    routes = RouteTable()
    routes.add("m1", "kernel-a", "node-1", "fa_request")
    routes.add("m2", "kernel-b", "node-1", "fa_request")
    assert routes.route("m2", "node-1", final=True) == ("kernel-b", "")
    assert routes.route("m1", "node-1", final=True) == ("kernel-a", "")
    kernel, why = routes.route("m1", "node-1", final=True)  # a second reply to the same request
    assert kernel is None and "no request in flight" in why
    assert len(routes) == 0


def test_events_leave_the_route_open_until_the_reply():
    routes = RouteTable()
    routes.add("m1", "kernel-a", "node-1", "train_request")
    for _ in range(3):
        assert routes.route("m1", "node-1", final=False) == ("kernel-a", "")
    assert [r.msg_id for r in routes.in_flight("kernel-a")] == ["m1"]
    assert routes.route("m1", "node-1", final=True) == ("kernel-a", "")
    assert routes.in_flight("kernel-a") == []


def test_only_the_node_asked_may_answer_and_a_message_without_parent_goes_nowhere():
    routes = RouteTable()
    routes.add("m1", "kernel-a", "node-1", "ping_request")
    kernel, why = routes.route("m1", "node-2", final=True)
    assert kernel is None and "sent to node-1, not to node-2" in why
    assert routes.route(None, "node-1", final=True)[0] is None
    assert routes.route("m1", "node-1", final=True) == ("kernel-a", "")  # the real answer still arrives


def test_a_gone_kernels_requests_are_dropped_and_late_replies_name_it():
    routes = RouteTable()
    routes.add("m1", "kernel-a", "node-1", "train_request")
    routes.add("m2", "kernel-a", "node-2", "train_request")
    routes.add("m3", "kernel-b", "node-1", "fa_request")
    dropped = routes.drop_kernel("kernel-a")
    assert sorted(r.node_id for r in dropped) == ["node-1", "node-2"]
    kernel, why = routes.route("m1", "node-1", final=True)
    assert kernel is None and "of kernel kernel-a, which has gone" in why
    assert routes.route("m3", "node-1", final=True) == ("kernel-b", "")


def test_a_restarted_node_and_old_routes_end():
    routes = RouteTable(ttl=10)
    routes.add("m1", "kernel-a", "node-1", "fa_request", now=100.0)
    routes.add("m2", "kernel-a", "node-2", "fa_request", now=100.0)
    routes.add("m3", "kernel-a", "node-2", "fa_request", now=105.0)
    assert [r.node_id for r in routes.drop_node("node-1")] == ["node-1"]
    assert [r.sent_at for r in routes.sweep(now=112.0)] == [100.0]
    assert [r.msg_id for r in routes.in_flight("kernel-a")] == ["m3"]
    assert routes.pop("m3") is not None and len(routes) == 0
