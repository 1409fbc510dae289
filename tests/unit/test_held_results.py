"""The node's store of held results, and folding a reply in chunks: exact, and safe when it breaks off."""

from __future__ import annotations

import numpy as np
import pytest

from fedlab.errors import FedlabProtocolError, FedlabTrainingError
from fedlab.node.held_results import HeldResults
from fedlab.protocol import make_envelope
from fedlab.researcher.aggregators import FedAvg, FedProx, Scaffold
from fedlab.researcher.held_fetch import HeldResult, PulledRound, ResultLost, ResultPuller
from fedlab.researcher.robust_aggregation import Median
from fedlab.researcher.server_optimizers import FedAdam
from fedlab.researcher.training_jobs import TrainResult
from fedlab.training.held_messages import ResultFetchRequest, ResultReleaseRequest
from fedlab.training.messages import TrainReply
from fedlab.training.tensors import pack_named


def fetch(store: HeldResults, sender: str, request_id: str, buffer: int, offset: int, length: int):
    envelope = make_envelope(ResultFetchRequest(request_id=request_id, buffer=buffer, offset=offset, length=length),
                             sender)
    return store.fetch(envelope)


def test_a_held_result_goes_to_its_asker_only_within_bounds_until_released():
    store = HeldResults(node_name="n1")
    data = np.arange(10, dtype=np.float32)
    store.hold("req-1", "researcher-a", "exp", [memoryview(data)])
    chunk, frames = fetch(store, "researcher-a", "req-1", 0, 8, 12)
    assert chunk.offset == 8 and bytes(frames[0]) == data.tobytes()[8:20]
    with pytest.raises(FedlabProtocolError) as other:  # another researcher's result is not there for it
        fetch(store, "researcher-b", "req-1", 0, 0, 4)
    assert other.value.code == "unknown_result"
    for buffer, offset, length in [(0, 36, 8), (1, 0, 4)]:
        with pytest.raises(FedlabProtocolError) as outside:
            fetch(store, "researcher-a", "req-1", buffer, offset, length)
        assert outside.value.code == "invalid_request"
    by_b = store.release(make_envelope(ResultReleaseRequest(request_ids=["req-1"]), "researcher-b"))
    assert by_b.released == 0 and len(store) == 1  # only its asker releases it
    assert store.release(make_envelope(ResultReleaseRequest(request_ids=["req-1"]), "researcher-a")).released == 1
    with pytest.raises(FedlabProtocolError, match="released"):
        fetch(store, "researcher-a", "req-1", 0, 0, 4)


def test_the_next_round_expiry_and_the_cap_forget_held_results():
    store = HeldResults(node_name="n1", hold_seconds=0.0)
    store.hold("old", "r", "exp", [b"abcd"])
    assert len(store) == 0  # expired at once
    store = HeldResults(node_name="n1", max_held=2)
    for i in range(3):
        store.hold(f"req-{i}", "r", "exp", [b"abcd"])
    assert len(store) == 2
    with pytest.raises(FedlabProtocolError):
        fetch(store, "r", "req-0", 0, 0, 4)  # the oldest went first
    store.hold("other", "r", "exp-2", [b"abcd"])
    store.new_round("r", "exp")  # the experiment's next round: its results are not needed any more
    assert len(store) == 1
    fetch(store, "r", "other", 0, 0, 4)


def test_a_oversized_fetch_is_refused_when_it_is_decoded():
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"request_id": "r", "buffer": 0, "offset": 0, "length": 1 << 30}, ResultFetchRequest)


def chunked(params: dict[str, np.ndarray], size: int):
    for name, value in params.items():
        flat = value.reshape(-1)
        for start in range(0, flat.size, size):
            yield name, start, flat[start:start + size]


def layout(params: dict[str, np.ndarray]):
    return {name: (value.shape, value.dtype) for name, value in params.items()}


def replies(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [({"w": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32),
              "n": np.array(rng.integers(0, 9), dtype=np.int64)}, int(rng.integers(1, 50))) for _ in range(4)]


def test_folding_in_chunks_equals_folding_whole_replies_bit_for_bit():
    start = {k: np.zeros_like(v) for k, v in replies()[0][0].items()}
    whole, streamed = FedAvg(), FedAvg()
    whole.begin_round(start)
    streamed.begin_round(start)
    for i, (params, n) in enumerate(replies()):
        whole.add(f"n{i}", params, n)
        streamed.add_streamed(f"n{i}", layout(params), n, chunked(params, 3))
    expected, got = whole.end_round(4), streamed.end_round(4)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype


def test_which_aggregators_fold_in_chunks():
    assert FedAvg().streams and FedProx().streams and FedAdam().streams
    assert not Scaffold().streams and not Median().streams
    with pytest.raises(FedlabTrainingError, match="whole replies"):
        median = Median()
        median.begin_round({"w": np.zeros(3, np.float32)})
        median.add_streamed("n", {"w": ((3,), np.dtype(np.float32))}, 1, iter(()))


def test_a_reply_that_does_not_cover_its_layout_or_lies_about_a_name_is_refused():
    aggregator = FedAvg()
    aggregator.begin_round({"w": np.zeros(6, np.float32)})
    with pytest.raises(FedlabTrainingError, match="did not cover"):
        aggregator.add_streamed("n", {"w": ((6,), np.dtype(np.float32))}, 1, iter([("w", 0, np.ones(3, np.float32))]))
    with pytest.raises(FedlabTrainingError, match="did not announce"):
        aggregator.add_streamed("n", {"w": ((6,), np.dtype(np.float32))}, 1, iter([("x", 0, np.ones(3, np.float32))]))
    with pytest.raises(FedlabTrainingError, match="outside"):
        aggregator.add_streamed("n", {"w": ((6,), np.dtype(np.float32))}, 1, iter([("w", 5, np.ones(3, np.float32))]))
    with pytest.raises(FedlabTrainingError, match="shape"):
        aggregator.add_streamed("n", {"w": ((7,), np.dtype(np.float32))}, 1, iter(()))


class FakePuller(ResultPuller):
    """Chunks from in-memory replies; ``broken`` nodes break off after their first chunk."""

    def __init__(self, data: dict[str, dict[str, np.ndarray]], broken: set[str]) -> None:
        self.data, self.broken, self.pulls, self.released = data, broken, [], []

    def chunks(self, held):
        self.pulls.append(held.node_id)
        for n, chunk in enumerate(chunked(self.data[held.node_id], 4)):
            if n == 1 and held.node_id in self.broken:
                raise ResultLost(held.node_id, "disconnected", "the node went offline")
            yield chunk

    def release(self, helds):
        self.released += [h.node_id for h in helds]


def held_reply(node_id: str, params: dict[str, np.ndarray], n: int) -> TrainResult:
    specs, _ = pack_named(params)
    reply = TrainReply(experiment_id="e", round=1, dataset_id="d", params=specs, n_samples=n, held=True)
    return TrainResult(node_id, {}, {}, reply, 0.0, held=HeldResult(node_id, f"req-{node_id}", reply))


def fedavg_of(data, nodes, start):
    expected = FedAvg()
    expected.begin_round(start)
    for i in nodes:
        expected.add(f"n{i}", *data[i])
    return expected.end_round(len(nodes))


def pulled_round(data, broken, pulls=2):
    start = {k: np.zeros_like(v) for k, v in data[0][0].items()}
    puller = FakePuller({f"n{i}": p for i, (p, _) in enumerate(data)}, broken=broken)
    aggregator = FedAvg()
    aggregator.begin_round(start)
    return start, puller, aggregator, PulledRound(aggregator, None, start, puller=puller, pulls=pulls)


@pytest.mark.parametrize("pulls", [1, 2])
def test_pulled_nodes_sum_to_fedavg_of_whole_replies(pulls):
    data = replies(3)
    start, puller, aggregator, round_ = pulled_round(data, set(), pulls)
    for i, (params, n) in enumerate(data):
        round_.fold(held_reply(f"n{i}", params, n))
    results: dict = {}
    round_.finish(results)
    assert not results and sorted(puller.released) == ["n0", "n1", "n2", "n3"]
    want, got = fedavg_of(data, range(4), start), aggregator.end_round(4)
    for name, value in want.items():  # the same float64 additions, maybe in another order
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


def test_a_node_lost_mid_pull_is_left_out_and_the_others_are_folded_again():
    data = replies(1)
    start, puller, aggregator, round_ = pulled_round(data, {"n2"}, pulls=1)
    for i, (params, n) in enumerate(data):
        round_.fold(held_reply(f"n{i}", params, n))
    results: dict = {}
    round_.finish(results)
    assert set(results) == {"n2"} and results["n2"].status == "missing" and "disconnected" in results["n2"].reason
    assert sorted(aggregator.added) == ["n0", "n1", "n3"]
    assert puller.pulls[:4] == ["n0", "n1", "n2", "n3"] and sorted(puller.pulls[4:]) == ["n0", "n1", "n3"]
    want, got = fedavg_of(data, (0, 1, 3), start), aggregator.end_round(3)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


def test_a_node_lost_while_the_others_are_folded_again_is_reported_and_a_whole_reply_named():
    data = replies(2)
    start, puller, aggregator, round_ = pulled_round(data, {"n2"}, pulls=1)
    round_.fold(held_reply("n0", *data[0]))
    round_.fold(held_reply("n1", *data[1]))
    whole = TrainResult("n3", data[3][0], {}, TrainReply(experiment_id="e", round=1, dataset_id="d", params=[],
                                                         n_samples=data[3][1]), 0.0)
    round_.fold(whole)  # an older node's whole reply: it cannot be pulled again
    round_._wait()
    puller.broken = {"n1", "n2"}  # n2 breaks off; when the sums start again, n1 has gone too
    round_.fold(held_reply("n2", *data[2]))
    results: dict = {}
    round_.finish(results)
    assert sorted(results) == ["n1", "n2", "n3"] and "refolded" in results["n3"].reason
    assert aggregator.added == ["n0"]
    want, got = fedavg_of(data, (0,), start), aggregator.end_round(1)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)
