"""Secure aggregation with real `fedlab node start` processes: equal results, hidden per-node figures.

Secure FedAvg and Scaffold end where plain ones do (same seeds) to within the fixed-point bound;
secure statistics equal pooled pandas, counts exactly; a node SIGKILLed after set-up, mid-round, is
named and the sum of the others is still right; a node with force_secure_aggregation refuses
plaintext; tampered, replayed and misaddressed node-to-node blobs, and a second masked input or
a second unmasking split, are refused (hand-written protocol messages); and what the researcher
receives from a node is never its vector in the clear.
"""

from __future__ import annotations

import signal
import threading

import msgspec
import numpy as np
import pandas as pd
import pytest
from federation import HEARTBEAT, NodeProcess

torch = pytest.importorskip("torch")

from slow_plan import TAGS, SlowLogReg, cancer_sites  # noqa: E402

from fedlab import Experiment, Researcher  # noqa: E402
from fedlab.analytics.messages import FAReply, FARequest, FASecure  # noqa: E402
from fedlab.errors import FedlabSecaggError  # noqa: E402
from fedlab.protocol import ErrorReply  # noqa: E402
from fedlab.protocol.secagg_messages import SecaggInput, SecaggUnmaskRequest  # noqa: E402
from fedlab.researcher.policies import DiscardOnTimeout  # noqa: E402
from fedlab.researcher.requests import MessagesByNode  # noqa: E402
from fedlab.researcher.secure_sum import SecureSum  # noqa: E402
from fedlab.secagg.fa_layout import layout_of, vectorize  # noqa: E402
from fedlab.secagg.fixed_point import encode_exact  # noqa: E402

pytestmark = pytest.mark.integration

NODE_HEARTBEAT = 0.5
MODEL_ARGS = {"n_features": 30, "step_seconds": 0.0}
ARGS = {"batch_size": 32, "num_updates": 6, "optimizer_args": {"lr": 0.05}, "seed": 5}


@pytest.fixture(autouse=True)
def one_thread_per_node(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def nodes(tmp_path, address):
    """Start ``n`` nodes (no plan approval) holding sites of the cancer data (with ``grade``, plus a
    categorical column); ``config[i]`` lines go into node i's config.toml before it starts."""
    started: list[NodeProcess] = []

    def make(n: int, config: dict[int, str] | None = None, grade: bool = False) -> list[NodeProcess]:
        for i, frame in enumerate(cancer_sites(n)):
            if grade:  # a categorical column, for value counts (the training plan takes numbers only)
                frame = frame.assign(grade=np.where(frame["target"] > 0, "benign", "malignant"))
            node = NodeProcess.create(tmp_path, f"site-{chr(97 + i)}", address, frame=frame, tags=TAGS,
                                      heartbeat=NODE_HEARTBEAT)
            path = node.directory / "config.toml"
            text = path.read_text().replace("require_approval = true", "require_approval = false")
            extra = (config or {}).get(i, "")
            for line in extra.splitlines():  # key = value: replaces the line init wrote
                key = line.split("=")[0].strip()
                text = "\n".join(line if t.startswith(key + " =") else t for t in text.splitlines()) + "\n"
            path.write_text(text)
            started.append(node.start())
        return started

    yield make
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.terminate()
    for node in started:
        node.stop()


def pooled(n: int) -> pd.DataFrame:
    frames = cancer_sites(n)
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(grade=np.where(frame["target"] > 0, "benign", "malignant"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("aggregator", "arguments"), [("fedavg", {}), ("scaffold", {}),
                                                       ("fedavg", {"ring_bits": 32, "clip": 4.0})])
def test_secure_training_ends_where_plain_training_does(address, nodes, aggregator, arguments):
    nodes(3)
    options = {"model_args": MODEL_ARGS, "training_args": ARGS, "rounds": 3, "round_timeout": 120,
               "aggregator": aggregator, "disconnect_grace": 10.0}
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        plain = Experiment(researcher, list(TAGS), SlowLogReg, **options)
        plain.run()
        secure = Experiment(researcher, list(TAGS), SlowLogReg, secagg=True, secagg_arguments=arguments, **options)
        history = secure.run()
    assert (history["status"] == "ok").all(), history
    assert history["n_samples"].isna().all()  # hidden: only their sum is known
    assert [sorted(r["survivors"]) for r in secure.secagg_rounds] == [sorted(secure.node_ids)] * 3
    sizes = [len(f) for f in cancer_sites(3)]
    assert secure.secagg_rounds[0]["n_samples"] == sum(sizes)
    for record in secure.secagg_rounds:
        assert record["clipped"] == 0 and record["ring_bits"] == arguments.get("ring_bits", 64)
        # the stated bound of a round's weighted mean (train_vector.bound * W / sum n): 64-bit words ~1e-14,
        # 32-bit lanes with clip 4 at 3 nodes 3 * 2**-27 * W / sum n ~ 1e-8; the tolerance below is far above both
        assert record["bound"] * max(sizes) / sum(sizes) < 1e-7
    for name, value in plain.params.items():
        # float32 rounding of the nodes' training dominates the 64-bit bound; 32-bit lanes add theirs
        np.testing.assert_allclose(secure.params[name], value, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(plain.history["train_loss"].to_numpy()[:3], np.zeros(3))


@pytest.mark.timeout(300)
def test_secure_stats_equal_pooled_pandas_and_hide_each_node(address, nodes):
    nodes(3, grade=True)
    pool = pooled(3)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        fds = researcher.search(list(TAGS))
        columns = ["mean radius", "mean texture", "grade"]
        edges = [-3.0, -1.0, 0.0, 1.0, 3.0]
        result = researcher.stats(fds, ["count", "sum", "mean", "var", "std", "value_counts"], columns=columns,
                                  stats_args={"mean radius": {"histogram": {"edges": edges}}}, secagg=True)
        plain = researcher.stats(fds, ["count", "sum", "mean", "var", "std", "value_counts"], columns=columns,
                                 stats_args={"mean radius": {"histogram": {"edges": edges}}})
        table = researcher.stats(fds, ["cov", "corr"], columns=["mean radius", "mean texture"], secagg=True)
        with pytest.raises(FedlabSecaggError, match="cannot be computed under secure aggregation"):
            researcher.stats(fds, ["median"], columns=["mean radius"], secagg=True)
    stats = result.global_stats()
    for column in ("mean radius", "mean texture"):
        values = pool[column]
        assert stats.loc[column, "count"] == values.count()  # exact
        for name in ("sum", "mean", "var", "std"):
            expected = getattr(values, name)()
            assert stats.loc[column, name] == pytest.approx(expected, rel=1e-9), (column, name)
    counts = result.value_counts("grade").set_index(result.value_counts("grade").columns[0])
    assert counts.iloc[:, 0].to_dict() == pool["grade"].value_counts().to_dict()
    # the end bins are withheld by two nodes' rules (min_count from a column's ends): a lower bound naming
    # them, as in the clear; the inner bins are the pooled counts
    hist, _ = np.histogram(pool["mean radius"], bins=edges)
    secure_hist, plain_hist = result.histogram("mean radius"), plain.histogram("mean radius")
    assert secure_hist["count"].tolist()[1:3] == hist.tolist()[1:3]
    pd.testing.assert_frame_equal(secure_hist, plain_hist)
    np.testing.assert_allclose(table.cov().to_numpy(), pool[["mean radius", "mean texture"]].cov().to_numpy(),
                               rtol=1e-9)
    hidden = result.node_stats()
    assert len(hidden) == 3 and hidden["figures"].str.startswith("hidden").all()
    assert result.secure["survivors"] and not result.secure["dropped"]
    assert any("securely aggregated over 3 nodes" in line for line in result.notes())


@pytest.mark.timeout(300)
def test_a_node_killed_after_set_up_is_named_and_the_others_sum_is_right(address, nodes):
    a, b, victim = nodes(3)
    killed = threading.Event()
    slow = {**MODEL_ARGS, "step_seconds": 0.3}

    def on_progress(node_id, event):
        if node_id == victim.node_id and event.phase == "training" and not killed.is_set():
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)  # after the share step: its masks are in the others' vectors
            killed.set()

    options = {"model_args": slow, "training_args": ARGS, "rounds": 1, "round_timeout": 120, "disconnect_grace": 2.0}
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        secure = Experiment(researcher, list(TAGS), SlowLogReg, secagg=True, on_progress=on_progress, **options)
        history = secure.run().set_index("node_id")
        assert killed.is_set()
        assert history.loc[victim.node_id, "status"] == "missing", history
        assert history.loc[[a.node_id, b.node_id], "status"].tolist() == ["ok", "ok"]
        assert secure.secagg_rounds[0]["dropped"] == [victim.node_id]
        plain = Experiment(researcher, list(TAGS), SlowLogReg, nodes=[a.node_id, b.node_id], **options)
        plain.run()
    for name, value in plain.params.items():
        np.testing.assert_allclose(secure.params[name], value, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(300)
def test_below_the_threshold_the_round_fails_saying_how_many_answered(address, nodes):
    a, b = nodes(2)
    killed = threading.Event()
    slow = {**MODEL_ARGS, "step_seconds": 0.3}

    def on_progress(node_id, event):
        if node_id == b.node_id and event.phase == "training" and not killed.is_set():
            b.proc.send_signal(signal.SIGKILL)
            killed.set()

    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(2, timeout=60)
        exp = Experiment(researcher, list(TAGS), SlowLogReg, model_args=slow, training_args=ARGS, rounds=1,
                         round_timeout=120, disconnect_grace=2.0, secagg=True, on_progress=on_progress)
        before = exp.params
        with pytest.raises(FedlabSecaggError, match=r"1 of 2 nodes answered, 2 are needed"):
            exp.run()
        assert exp.round_current == 0
        for name, value in before.items():
            np.testing.assert_array_equal(exp.params[name], value)  # the global model is unchanged


@pytest.mark.timeout(300)
def test_a_node_that_forces_secure_aggregation_refuses_plaintext(address, nodes):
    forced, other = nodes(2, config={0: "force_secure_aggregation = true"})
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(2, timeout=60)
        fds = researcher.search(list(TAGS))
        plain = researcher.stats(fds, ["mean"], columns=["mean radius"])
        assert forced.node_id in plain.refused and "force_secure_aggregation" in plain.refused[forced.node_id]
        assert plain.answered == [other.node_id]
        secure = researcher.stats(fds, ["mean"], columns=["mean radius"], secagg=True)
        assert sorted(secure.secure["survivors"]) == sorted([forced.node_id, other.node_id])
        exp = Experiment(researcher, list(TAGS), SlowLogReg, model_args=MODEL_ARGS, training_args=ARGS, rounds=1,
                         round_timeout=120)
        history = exp.run().set_index("node_id")
        assert history.loc[forced.node_id, "status"] == "error"
        assert "force_secure_aggregation = true" in history.loc[forced.node_id, "reason"]


def _ask(researcher, messages, what="the step"):
    nodes = list(messages)
    with researcher.requests.send(MessagesByNode(messages), nodes, [DiscardOnTimeout(30)]) as request:
        replies = {**{n: e.content for n, e in request.replies().items()}, **request.errors()}
        assert set(replies) == set(nodes), (what, request.missing())
        return replies


def _masked_request(fds, node_id, secure_input, layout) -> FARequest:
    return FARequest(dataset_id=fds.dataset(node_id).dataset_id, stats=["count", "mean"], columns=["mean radius"],
                     stats_args={"mean radius": {"count": {}, "mean": {}}},
                     secagg=FASecure(phase="masked", input=secure_input, layout=msgspec.msgpack.encode(layout)))


@pytest.mark.timeout(300)
def test_hand_written_protocol_messages_cannot_break_a_session(address, nodes):
    a, b, c = nodes(3)
    with Researcher(address, heartbeat_interval=HEARTBEAT) as researcher:
        researcher.wait_for_nodes(3, timeout=60)
        fds = researcher.search(list(TAGS))
        ids = [a.node_id, b.node_id, c.node_id]
        layout_request = {n: FARequest(dataset_id=fds.dataset(n).dataset_id, stats=["count", "mean"],
                                       columns=["mean radius"], stats_args={"mean radius": {"count": {}, "mean": {}}},
                                       secagg=FASecure(phase="layout")) for n in ids}
        skeletons = _ask(researcher, layout_request)
        assert all(isinstance(s, FAReply) for s in skeletons.values()), skeletons
        layout = layout_of(skeletons)
        first = SecureSum(researcher.requests, ids, purpose="analytics", threshold=2)
        assert first.setup() == ids
        second = SecureSum(researcher.requests, ids, purpose="analytics", threshold=2)
        second.setup()

        honest = first.input_for(a.node_id)
        sender = next(iter(honest.blobs))
        blob = bytearray(honest.blobs[sender])
        blob[-1] ^= 1
        tampered = SecaggInput(session_id=first.session_id, blobs={**honest.blobs, sender: bytes(blob)})
        replayed = SecaggInput(session_id=second.session_id, blobs=honest.blobs)  # session 1's blobs in session 2
        wrong_way = SecaggInput(session_id=first.session_id, blobs=first.input_for(b.node_id).blobs)  # b's, to c
        answers = _ask(researcher, {a.node_id: _masked_request(fds, a.node_id, tampered, layout),
                                    b.node_id: _masked_request(fds, b.node_id, replayed, layout),
                                    c.node_id: _masked_request(fds, c.node_id, wrong_way, layout)})
        for node_id, answer in answers.items():
            assert isinstance(answer, ErrorReply) and answer.code == "secagg_refused", (node_id, answer)

        # honest masked inputs: what the researcher receives is not the node's vector in the clear
        plain = _ask(researcher, {n: msgspec.structs.replace(layout_request[n], secagg=None) for n in ids})
        masked = _ask(researcher, {n: _masked_request(fds, n, first.input_for(n), layout) for n in ids})
        for node_id in ids:
            clear = encode_exact(vectorize(plain[node_id], layout))
            received = np.frombuffer(masked[node_id].masked, np.uint64)
            assert received.shape == clear.shape
            assert np.count_nonzero(received == clear) <= 1, node_id  # every value masked
        again = _ask(researcher, {a.node_id: _masked_request(fds, a.node_id, first.input_for(a.node_id), layout)})
        assert isinstance(again[a.node_id], ErrorReply) and "once" in again[a.node_id].message

        # the unmasking step for one split, then for another: the second is refused
        split = SecaggUnmaskRequest(session_id=first.session_id, survivors=ids)
        ok = _ask(researcher, {a.node_id: split})
        assert not isinstance(ok[a.node_id], ErrorReply), ok
        other = SecaggUnmaskRequest(session_id=first.session_id, survivors=ids[:2], dropped=ids[2:])
        refused = _ask(researcher, {a.node_id: other})
        assert isinstance(refused[a.node_id], ErrorReply) and refused[a.node_id].code == "secagg_refused"
        total = np.zeros_like(np.frombuffer(masked[a.node_id].masked, np.uint64))
        for node_id in ids:
            total += np.frombuffer(masked[node_id].masked, np.uint64)
        assert not np.array_equal(total, sum(encode_exact(vectorize(plain[n], layout)) for n in ids))
