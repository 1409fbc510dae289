"""Large round results pulled from real `fedlab node start` processes in chunks (issue 14, item 7).

The hold threshold and chunk size are lowered so that a 31-parameter model is held by every node and
pulled in several chunks; the arithmetic is the one a 100 MB model takes (``benchmarks/rounds.py``
measures that). Pulled FedAvg equals FedAvg of whole replies; a node killed while it is being pulled
is named and left out, and the global model is that of the other nodes alone; the node refuses a
fetch of a result it does not hold, or outside its bounds (that another researcher finds nothing held
for it is checked on the node's store in tests/unit/test_held_results.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_training import (  # noqa: E402
    ARGS,
    CancerLogReg,
    cancer_data,
    cleanup,  # noqa: F401 - a fixture, used by name
    one_thread_per_node,  # noqa: F401 - an autouse fixture
    start,
)

from fedlab import DiscardOnTimeout, Experiment  # noqa: E402
from fedlab.protocol import ErrorReply  # noqa: E402
from fedlab.researcher import held_fetch  # noqa: E402
from fedlab.training.held_messages import ResultChunk, ResultFetchRequest, ResultReleaseRequest  # noqa: E402

pytestmark = pytest.mark.integration

OPTIONS = {"model_args": {"n_features": 30}, "training_args": ARGS, "round_timeout": 60, "disconnect_grace": 30}


@pytest.fixture
def pulled(monkeypatch):
    """Every training reply held and pulled, 48 bytes (12 float32) a chunk, two in flight; counts pulls."""
    monkeypatch.setattr(held_fetch, "HOLD_MIN_BYTES", 1)
    monkeypatch.setattr(held_fetch, "CHUNK_BYTES", 48)
    monkeypatch.setattr(held_fetch, "WINDOW", 2)
    pulls: list[tuple[str, int]] = []
    original = held_fetch.ResultPuller.chunks

    def counting(self, held):
        n = 0
        for chunk in original(self, held):
            n += 1
            yield chunk
        pulls.append((held.node_id, n))

    monkeypatch.setattr(held_fetch.ResultPuller, "chunks", counting)
    return pulls


def test_pulled_fedavg_equals_fedavg_of_whole_replies(tmp_path, address, cleanup, pulled, monkeypatch):  # noqa: F811
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites)
    cleanup += [researcher, *nodes]
    streamed = Experiment(researcher, ["cancer"], CancerLogReg, rounds=2, **OPTIONS)
    streamed.run()
    # weight: 120 bytes in 3 chunks, bias: 1; every node, every round, pulled whole
    assert sorted(pulled) == sorted([(n.node_id, 4) for n in nodes] * 2)
    monkeypatch.setattr(held_fetch, "HOLD_MIN_BYTES", 1 << 40)  # now every reply travels whole
    whole = Experiment(researcher, ["cancer"], CancerLogReg, rounds=2, **OPTIONS)
    whole.run()
    assert len(pulled) == 6, "whole replies were pulled"
    assert (streamed.history["status"] == "ok").all() and (whole.history["status"] == "ok").all()
    for name, value in whole.params.items():  # the same float64 sums, maybe added in another order
        np.testing.assert_allclose(streamed.params[name], value, rtol=1e-6, atol=1e-7)
    for node in nodes:  # released after each round: nothing stays held on the nodes
        assert "forgotten unfetched" not in node.log()


def test_a_node_killed_while_it_is_pulled_is_named_and_left_out(tmp_path, address, cleanup, pulled,  # noqa: F811
                                                               monkeypatch):
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites)
    cleanup += [researcher, *nodes]
    by_id = {n.node_id: n for n in nodes}
    original = held_fetch.ResultPuller.chunks  # the counting one
    killed: list[str] = []

    def killing(self, held):
        for n, chunk in enumerate(original(self, held)):
            yield chunk
            if n == 0 and pulled and not killed:  # the second node pulled, once one chunk of it is in the sums
                by_id[held.node_id].kill()  # SIGKILL
                killed.append(held.node_id)

    monkeypatch.setattr(held_fetch.ResultPuller, "chunks", killing)
    exp = Experiment(researcher, ["cancer"], CancerLogReg, rounds=1, **OPTIONS)
    first = exp.params
    exp.run()
    assert len(killed) == 1, "no node was killed while it was pulled"
    victim = killed[0]
    history = exp.history.set_index("node_id")
    assert history.loc[victim, "status"] == "missing", history
    assert "lost while it was being received" in str(history.loc[victim, "reason"]) or \
        "disconnected" in str(history.loc[victim, "reason"]), history.loc[victim, "reason"]
    assert (history.drop(index=victim)["status"] == "ok").all(), history
    # the others were pulled again into fresh sums: nothing of the victim is in the model
    assert [n for n, _ in pulled].count(victim) == 0
    survivors = [n.node_id for n in nodes if n.node_id != victim]
    monkeypatch.setattr(held_fetch, "HOLD_MIN_BYTES", 1 << 40)
    alone = Experiment(researcher, ["cancer"], CancerLogReg, rounds=1, nodes=survivors, **OPTIONS)
    for name, value in first.items():
        np.testing.assert_array_equal(alone.params[name], value)  # the same start
    alone.run()
    for name, value in alone.params.items():  # the survivors' FedAvg
        np.testing.assert_allclose(exp.params[name], value, rtol=1e-6, atol=1e-7)


def test_the_node_gives_a_held_result_only_to_its_asker_and_within_bounds(tmp_path, address, cleanup,  # noqa: F811
                                                                          pulled):
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites[:1])
    cleanup += [researcher, *nodes]
    node = nodes[0]
    kept: list = []
    exp = Experiment(researcher, ["cancer"], CancerLogReg, rounds=1, **OPTIONS)
    release = held_fetch.ResultPuller.release
    held_fetch.ResultPuller.release = lambda self, helds: kept.extend(helds)  # keep it held, to probe it
    try:
        exp.run()
    finally:
        held_fetch.ResultPuller.release = release
    (held,) = kept
    layout = {n.name: n.array for n in held.reply.params}

    def ask(message, sender=None):
        request = researcher.requests.send(message, [node.node_id], [DiscardOnTimeout(15)])
        request.wait()
        if node.node_id in request.errors():
            return request.errors()[node.node_id], None
        envelope = request.replies()[node.node_id]
        return envelope.content, envelope.buffers

    weight = layout["weight"]
    chunk, frames = ask(ResultFetchRequest(request_id=held.request_id, buffer=weight.buffer, offset=4, length=8))
    assert isinstance(chunk, ResultChunk) and chunk.offset == 4 and len(frames) == 1 and len(frames[0]) == 8
    # one node: the global model is its update, so elements 1 and 2 of its weight are what came
    np.testing.assert_array_equal(np.frombuffer(frames[0], "<f4"), exp.params["weight"].reshape(-1)[1:3])
    for bad, code in [
        (ResultFetchRequest(request_id=held.request_id, buffer=weight.buffer, offset=116, length=8), "invalid_request"),
        (ResultFetchRequest(request_id=held.request_id, buffer=99, offset=0, length=4), "invalid_request"),
        (ResultFetchRequest(request_id="not-a-request", buffer=0, offset=0, length=4), "unknown_result"),
    ]:
        error, _ = ask(bad)
        assert isinstance(error, ErrorReply) and error.code == code, error
    released, _ = ask(ResultReleaseRequest(request_ids=[held.request_id]))
    assert not isinstance(released, ErrorReply) and released.released == 1
    error, _ = ask(ResultFetchRequest(request_id=held.request_id, buffer=weight.buffer, offset=0, length=4))
    assert isinstance(error, ErrorReply) and error.code == "unknown_result" and "released" in error.message
