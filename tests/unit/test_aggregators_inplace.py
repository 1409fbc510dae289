"""The aggregators' in-place arithmetic against plain float64 references.

The sums live in buffers kept from round to round, replies are added through a small scratch
block, and the mean is divided and cast in one pass: none of that may change a result beyond
float64 rounding, leak one round into the next, or touch an array already handed out.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedlab.errors import FedlabTrainingError
from fedlab.researcher import aggregators
from fedlab.researcher.aggregators import FedAvg, Scaffold


def reference(updates, weights, like):
    """The old arithmetic: float64 copies, a weighted sum, a division, the cast (integers rounded)."""
    out = {}
    for name, dtype_of in like.items():
        total = None
        for u, w in zip(updates, weights, strict=True):
            term = np.array(u[name], dtype=np.float64) * float(w)
            total = term if total is None else total + term
        mean = total / float(sum(weights))
        dtype = np.asarray(dtype_of).dtype
        out[name] = (np.rint(mean) if np.issubdtype(dtype, np.integer) or dtype == np.bool_ else mean).astype(dtype)
    return out


def mixed(rng, big=aggregators._BLOCK * 2 + 123):
    """Every kind of parameter: several blocks of float32, float16, int64, bool, a 0-d entry."""
    return {
        "w32": rng.normal(size=(big // 7, 7)).astype(np.float32),
        "w16": rng.normal(size=(5, 3)).astype(np.float16),
        "w64": rng.normal(size=4),
        "steps": np.array(rng.integers(0, 1000), dtype=np.int64),
        "counts": rng.integers(-50, 50, size=(3, 2)).astype(np.int64),
        "mask": rng.random(6) > 0.5,
        "scalar": np.array(rng.normal(), dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
        # several blocks in every width the mean is written over its float64 sum in: 8, 2 and 1 bytes
        "big64": rng.normal(size=big),
        "big_int": rng.integers(-10**6, 10**6, size=big),
        "big16": rng.normal(size=big).astype(np.float16),
        "big_mask": rng.random(big) > 0.3,
    }


def assert_same(out, ref):
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].dtype == ref[name].dtype, name
        assert out[name].shape == ref[name].shape, name
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)


@pytest.mark.parametrize("weights", [[1], [1, 1, 1], [3, 1, 250, 7], [1, 9, 1]])
def test_in_place_sums_equal_the_plain_float64_reference(weights):
    rng = np.random.default_rng(len(weights) + sum(weights))
    global_params = mixed(rng)
    updates = [mixed(rng) for _ in weights]
    agg = FedAvg()
    agg.begin_round(global_params)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        agg.add(f"n{i}", u, w)
    assert_same(agg.end_round(len(weights)), reference(updates, weights, global_params))


def test_weighted_adds_are_computed_in_float64_not_in_the_reply_dtype():
    """numpy 2 keeps a Python float's product with float32 in float32 unless told otherwise."""
    a, b = np.array([1.1, 2.2, 3.3], np.float32), np.array([0.7, 0.1, 9.9], np.float32)
    agg = FedAvg()
    agg.begin_round({"x": np.zeros(3, np.float64)})
    agg.add("a", {"x": a}, 3)
    agg.add("b", {"x": b}, 7)
    expected = (a.astype(np.float64) * 3.0 + b.astype(np.float64) * 7.0) / 10.0
    np.testing.assert_array_equal(agg.end_round(2)["x"], expected)


def slots(agg):
    return {name: [id(slot) for slot in kept] for name, kept in agg._sums._slots.items()}


def test_memory_is_reused_over_rounds_and_each_round_starts_from_nothing():
    rng = np.random.default_rng(7)
    agg = FedAvg()
    global_params = mixed(rng)
    seen = []
    for round_ in range(6):
        weights = [int(w) for w in rng.integers(1, 100, size=round_ % 3 + 1)]
        updates = [mixed(rng) for _ in weights]
        agg.begin_round(global_params)
        for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
            agg.add(f"n{i}", u, w)
        out = agg.end_round(len(weights))
        assert_same(out, reference(updates, weights, global_params))
        global_params = out  # only the latest global model is kept, as the experiment does
        seen.append(slots(agg))
    assert all(len(kept) == 2 for kept in seen[-1].values())
    assert seen[1] == seen[2] == seen[3] == seen[4] == seen[5]  # two slots per parameter, alternating


def test_memory_still_in_use_is_never_written_and_is_reused_once_free():
    rng = np.random.default_rng(14)
    agg = FedAvg()
    global_params = mixed(rng)
    results, copies = [], []
    for _ in range(4):
        agg.begin_round(global_params)
        agg.add("a", mixed(rng), 3)
        agg.add("b", mixed(rng), 4)
        global_params = agg.end_round(2)
        results.append(global_params)  # the caller keeps every round's model: none may change
        copies.append({k: v.copy() for k, v in global_params.items()})
        for earlier, copy in zip(results, copies, strict=True):
            assert_same(earlier, copy)
    for name in global_params:  # no two rounds share memory while both are alive
        for i in range(len(results)):
            for j in range(i):
                assert not np.shares_memory(results[i][name], results[j][name]), name
    results.clear()  # now the old ones are free: the next rounds go back to two slots
    for _ in range(3):
        agg.begin_round(global_params)
        agg.add("a", mixed(rng), 1)
        global_params = agg.end_round(1)
    before = slots(agg)
    agg.begin_round(global_params)
    agg.add("a", mixed(rng), 1)
    global_params = agg.end_round(1)
    assert slots(agg) == before and all(len(kept) == 2 for kept in before.values())


def test_a_frame_still_queued_keeps_its_memory_from_being_written():
    """A memoryview of the global model (what zmq holds while a send is queued) counts as a use."""
    rng = np.random.default_rng(15)
    agg = FedAvg()
    agg.begin_round(mixed(rng))
    agg.add("a", mixed(rng), 1)
    first = agg.end_round(1)
    frame = np.ascontiguousarray(first["w32"]).reshape(-1).view(np.uint8).data  # as pack_array makes it
    sent = bytes(frame)
    global_params = first
    del first
    for _ in range(3):
        agg.begin_round(global_params)
        agg.add("a", mixed(rng), 2)
        global_params = agg.end_round(1)
    assert bytes(frame) == sent


def test_a_round_that_fails_leaves_nothing_for_the_next():
    rng = np.random.default_rng(8)
    agg = FedAvg()
    agg.begin_round(mixed(rng))
    agg.add("a", mixed(rng), 40)  # a round that is abandoned (every other node failed, run() raised)
    agg.begin_round(global_params := mixed(rng))
    update = mixed(rng)
    agg.add("b", update, 3)
    assert_same(agg.end_round(2), reference([update], [3], global_params))


def test_the_previous_rounds_result_is_not_touched_by_the_next_round():
    rng = np.random.default_rng(9)
    agg = FedAvg()
    agg.begin_round(mixed(rng))
    agg.add("a", mixed(rng), 2)
    agg.add("b", mixed(rng), 5)
    first = agg.end_round(2)
    kept = {name: value.copy() for name, value in first.items()}
    for name, value in first.items():
        assert not value.flags.writeable and aggregators.handed_out(value), name
        with pytest.raises(ValueError):
            value.flags.writeable = True
    for _ in range(2):
        agg.begin_round(first)
        agg.add("a", mixed(rng), 3)
        agg.add("b", mixed(rng), 1)
        second = agg.end_round(2)
        for name in first:
            assert not np.shares_memory(second[name], first[name])
    assert_same(first, kept)


def test_adding_a_reply_allocates_nothing_the_size_of_the_model():
    rng = np.random.default_rng(10)
    n = 1_000_000  # 4 MB of float32; its float64 sum is 8 MB
    global_params = {"w": np.zeros(n, np.float32)}
    updates = [{"w": rng.normal(size=n).astype(np.float32)} for _ in range(3)]
    agg = FedAvg()
    for _ in range(2):  # the two rounds that make the memory the next ones reuse
        agg.begin_round(global_params)
        agg.add("n", updates[0], 1)
        global_params = agg.end_round(1)
    kept = slots(agg)
    agg.begin_round(global_params)
    tracemalloc.start()
    try:
        for i, u in enumerate(updates):
            tracemalloc.reset_peak()
            agg.add(f"n{i}", u, 10 + i)
            assert tracemalloc.get_traced_memory()[1] < 1_000_000, "a model-sized temporary in add()"
        tracemalloc.reset_peak()
        out = agg.end_round(3)
        assert tracemalloc.get_traced_memory()[1] < 1_000_000, "a model-sized temporary in end_round()"
    finally:
        tracemalloc.stop()
    assert slots(agg) == kept  # and no new memory either: the mean was written over the sum
    np.testing.assert_array_equal(out["w"], reference(updates, [10, 11, 12], global_params)["w"])


def test_release_gives_the_memory_back_and_what_was_handed_out_stays_valid():
    rng = np.random.default_rng(11)
    agg = FedAvg()
    agg.begin_round(global_params := mixed(rng))
    agg.add("a", u := mixed(rng), 4)
    out = agg.end_round(1)
    agg.release()
    assert agg._sums.buffers == {} and agg._sums._slots == {}
    assert_same(out, reference([u], [4], global_params))
    agg.begin_round(out)
    agg.add("a", u, 4)
    assert_same(agg.end_round(1), reference([u], [4], out))


def test_outside_a_round_nothing_is_written():
    rng = np.random.default_rng(16)
    agg = FedAvg()
    agg.begin_round(mixed(rng))
    agg.add("a", mixed(rng), 4)
    out = agg.end_round(1)
    kept = {k: v.copy() for k, v in out.items()}
    with pytest.raises(FedlabTrainingError, match="outside a round"):
        agg.add("late", mixed(rng), 3)
    with pytest.raises(FedlabTrainingError, match="outside a round"):
        agg.end_round(1)
    assert_same(out, kept)


def test_replies_in_another_dtype_or_layout_are_summed_as_before():
    rng = np.random.default_rng(12)
    global_params = {"w": np.zeros((40, 30), np.float32), "n": np.array(0, np.int64)}
    updates = [{"w": rng.normal(size=(30, 40)).T, "n": np.array(3, np.int32)},  # float64, not contiguous
               {"w": rng.normal(size=(40, 30)).astype(np.float16), "n": np.array(8, np.int64)}]
    agg = FedAvg()
    agg.begin_round(global_params)
    agg.add("a", updates[0], 5)
    agg.add("b", updates[1], 2)
    assert_same(agg.end_round(2), reference(updates, [5, 2], global_params))


def test_a_complex_reply_for_a_real_parameter_is_refused_before_anything_is_added():
    agg = FedAvg()
    agg.begin_round({"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})
    with pytest.raises(FedlabTrainingError, match="wrong type"):
        agg.add("bad", {"w": np.ones(3, np.float32), "b": np.ones(2, np.complex64)}, 5)
    agg.add("good", {"w": np.full(3, 2, np.float32), "b": np.full(2, 4, np.float32)}, 1)
    out = agg.end_round(2)
    np.testing.assert_array_equal(out["w"], np.full(3, 2, np.float32))
    assert agg.added == ["good"]


def test_complex_parameters_keep_their_imaginary_part():
    agg = FedAvg()
    agg.begin_round({"z": np.zeros(2, np.complex64)})
    agg.add("a", {"z": np.array([1 + 2j, 3 - 1j], np.complex64)}, 1)
    agg.add("b", {"z": np.array([3 + 4j, 1 + 1j], np.complex64)}, 3)
    np.testing.assert_array_equal(agg.end_round(2)["z"], np.array([2.5 + 3.5j, 1.5 + 0.5j], np.complex64))


def scaffold_reference(x, ys, weights, lr):
    mean = {k: sum(np.array(y[k], np.float64) * float(w) for y, w in zip(ys, weights, strict=True)) / sum(weights)
            for k in x}
    out = {}
    for k, v in x.items():
        updated = v.astype(np.float64) + lr * (mean[k] - v.astype(np.float64))
        out[k] = (np.rint(updated) if np.issubdtype(v.dtype, np.integer) else updated).astype(v.dtype)
    return out


def test_scaffold_over_several_rounds_matches_the_float64_reference():
    rng = np.random.default_rng(13)
    big = aggregators._BLOCK + 17
    x = {"w": rng.normal(size=big).astype(np.float32), "b": rng.normal(size=(2, 3)).astype(np.float32),
         "steps": np.array(4, dtype=np.int64)}
    agg, lr, n_nodes = Scaffold(server_lr=0.7), 0.7, 3
    c = {"w": np.zeros(big), "b": np.zeros((2, 3))}
    for round_ in range(3):
        agg.begin_round(x)
        sent = agg.node_args("a")[1]["scaffold"]
        for name in c:
            np.testing.assert_array_equal(sent[name], c[name].astype(np.float32))
            assert sent[name].dtype == np.float32 and not sent[name].flags.writeable
        ys = [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) if k != "steps" else v + 2 * i
               for k, v in x.items()} for i in range(2)]
        deltas = [{"w": rng.normal(size=big), "b": rng.normal(size=(2, 3)).astype(np.float32)} for _ in range(2)]
        weights = [30 + round_, 10]
        for i in range(2):
            agg.add(f"n{i}", ys[i], weights[i], {"scaffold": deltas[i]})
        previous_sent = {k: v.copy() for k, v in sent.items()}
        out = agg.end_round(n_nodes)
        ref = scaffold_reference(x, ys, weights, lr)
        assert_same(out, ref)
        for name in c:
            c[name] = c[name] + (deltas[0][name].astype(np.float64) + deltas[1][name]) / n_nodes
            np.testing.assert_array_equal(agg.c[name], c[name])
            np.testing.assert_array_equal(sent[name], previous_sent[name])  # what went out stays as sent
        x = out


def test_scaffold_round_without_control_variates_for_some_parameters_leaves_their_c():
    agg = Scaffold()
    x = {"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    agg.begin_round(x)
    agg.add("a", x, 1, {"scaffold": {"w": np.arange(3.0)}})
    agg.end_round(1)
    np.testing.assert_array_equal(agg.c["w"], np.arange(3.0))
    np.testing.assert_array_equal(agg.c["b"], np.zeros(2))


def test_the_experiment_keeps_the_aggregators_arrays_without_a_copy_and_copies_anything_else():
    from fedlab.researcher.experiment import Experiment

    agg = FedAvg()
    agg.begin_round({"w": np.zeros(5, np.float32)})
    agg.add("a", {"w": np.ones(5, np.float32)}, 2)
    out = agg.end_round(1)
    assert Experiment._frozen(out)["w"] is out["w"]  # new, read-only, its own memory: taken as is
    writeable = np.ones(3)
    view = np.frombuffer(np.ones(3).tobytes())
    frozen = Experiment._frozen({"a": writeable, "b": view})
    for name, original in (("a", writeable), ("b", view)):
        assert not np.shares_memory(frozen[name], original) and not frozen[name].flags.writeable
