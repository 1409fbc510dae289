"""Aggregators against numpy references: FedAvg's weighted mean, FedProx's arguments, Scaffold's update.

Replies are folded in one at a time as they arrive, so the result must not depend on their
order (up to float64 rounding, far below the float32 the parameters come back in).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.errors import FedlabTrainingError
from fedlab.researcher.aggregators import FedAvg, FedProx, Scaffold, aggregator_name, make_aggregator


def model(rng, dtype=np.float32):
    return {"fc.weight": rng.normal(size=(3, 4)).astype(dtype), "fc.bias": rng.normal(size=3).astype(dtype),
            "bn.num_batches_tracked": np.array(rng.integers(0, 100), dtype=np.int64)}


def reference_mean(updates, weights):
    w = np.asarray(weights, dtype=np.float64)
    return {name: np.tensordot(w, np.stack([u[name].astype(np.float64) for u in updates]), axes=1) / w.sum()
            for name in updates[0]}


def test_fedavg_is_the_sample_weighted_mean_in_each_dtype():
    rng = np.random.default_rng(0)
    global_params = model(rng)
    updates = [model(rng) for _ in range(3)]
    weights = [10, 250, 37]
    agg = FedAvg()
    agg.begin_round(global_params)
    for i, (u, n) in enumerate(zip(updates, weights, strict=True)):
        agg.add(f"n{i}", u, n)
    out = agg.end_round(3)
    ref = reference_mean(updates, weights)
    for name in global_params:
        assert out[name].dtype == global_params[name].dtype
    np.testing.assert_array_equal(out["fc.weight"], ref["fc.weight"].astype(np.float32))
    np.testing.assert_array_equal(out["fc.bias"], ref["fc.bias"].astype(np.float32))
    assert out["bn.num_batches_tracked"] == np.rint(ref["bn.num_batches_tracked"])
    assert agg.added == ["n0", "n1", "n2"]


def test_one_node_gets_its_own_parameters_back_bit_for_bit():
    rng = np.random.default_rng(1)
    params = model(rng)
    agg = FedAvg()
    agg.begin_round(model(rng))
    agg.add("only", params, 123)
    out = agg.end_round(1)
    for name in params:
        np.testing.assert_array_equal(out[name], params[name])


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1),
       order_seed=st.integers(0, 2**32 - 1))
def test_streaming_order_does_not_matter(weights, seed, order_seed):
    rng = np.random.default_rng(seed)
    global_params = model(rng, np.float64)
    updates = [model(rng, np.float64) for _ in weights]
    order = np.random.default_rng(order_seed).permutation(len(weights))
    results = []
    for sequence in (range(len(weights)), order):
        agg = FedAvg()
        agg.begin_round(global_params)
        for i in sequence:
            agg.add(f"n{i}", updates[i], weights[i])
        results.append(agg.end_round(len(weights)))
    ref = reference_mean(updates, weights)
    for name in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(results[0][name], ref[name], rtol=1e-12, atol=1e-12)


def test_nothing_added_is_an_error_saying_why():
    agg = FedAvg()
    agg.begin_round(model(np.random.default_rng(2)))
    agg.add("empty", model(np.random.default_rng(3)), 0)  # trained on nothing: no weight
    with pytest.raises(FedlabTrainingError, match="no node contributed"):
        agg.end_round(1)


def test_a_reply_that_does_not_match_the_model_is_refused_and_leaves_the_sums_alone():
    rng = np.random.default_rng(4)
    global_params = model(rng)
    agg = FedAvg()
    agg.begin_round(global_params)
    with pytest.raises(FedlabTrainingError, match="missing"):
        agg.add("bad", {"fc.weight": global_params["fc.weight"]}, 5)
    with pytest.raises(FedlabTrainingError, match="shape"):
        agg.add("bad", {**global_params, "fc.bias": np.zeros(7, np.float32)}, 5)
    good = model(rng)
    agg.add("good", good, 5)
    np.testing.assert_array_equal(agg.end_round(2)["fc.weight"], good["fc.weight"])


def test_fedprox_aggregates_like_fedavg_and_sends_mu_in_the_training_args():
    rng = np.random.default_rng(5)
    global_params, updates = model(rng), [model(rng) for _ in range(2)]
    prox, avg = FedProx(mu=0.1), FedAvg()
    assert prox.training_args({"epochs": 2}) == {"epochs": 2, "fedprox_mu": 0.1}
    assert avg.training_args({"epochs": 2}) == {"epochs": 2}
    assert prox.node_args("a") == ({}, {})
    for agg in (prox, avg):
        agg.begin_round(global_params)
        agg.add("a", updates[0], 3)
        agg.add("b", updates[1], 5)
    a, b = prox.end_round(2), avg.end_round(2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(FedlabTrainingError, match="mu"):
        FedProx(mu=-1)


def test_scaffold_update_matches_the_paper():
    """x <- x + lr_g * weighted_mean(y_i - x); c <- c + sum(delta_c_i) / N, N = all nodes of the experiment."""
    rng = np.random.default_rng(6)
    x = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=2), "steps": np.array(4, dtype=np.int64)}
    agg = Scaffold(server_lr=0.5)
    agg.begin_round(x)
    args, aux = agg.node_args("a")
    assert args == {"name": "scaffold"}
    assert set(aux["scaffold"]) == {"w", "b"}  # integer buffers have no control variate
    assert all(not v.any() for v in aux["scaffold"].values())
    ys = [{k: v + rng.normal(size=np.shape(v)) if k != "steps" else v + 2 for k, v in x.items()} for _ in range(2)]
    deltas = [{"w": rng.normal(size=(2, 3)), "b": rng.normal(size=2)} for _ in range(2)]
    weights = [30, 10]
    for i in range(2):
        agg.add(f"n{i}", ys[i], weights[i], {"scaffold": deltas[i]})
    out = agg.end_round(n_nodes_total=3)  # a third node missed the round
    mean = reference_mean(ys, weights)
    for name in ("w", "b"):
        np.testing.assert_allclose(out[name], x[name] + 0.5 * (mean[name] - x[name]), rtol=1e-14)
        np.testing.assert_allclose(agg.c[name], (deltas[0][name] + deltas[1][name]) / 3, rtol=1e-14)
    assert out["steps"] == 5  # 4 + 0.5 * (6 - 4)
    agg.begin_round(out)  # the next round sends the new c
    np.testing.assert_allclose(agg.node_args("b")[1]["scaffold"]["w"], agg.c["w"])


def test_scaffold_needs_the_nodes_control_variates():
    agg = Scaffold()
    x = {"w": np.zeros(3, np.float32)}
    agg.begin_round(x)
    with pytest.raises(FedlabTrainingError, match="aux_vars"):
        agg.add("a", x, 1, {})
    with pytest.raises(FedlabTrainingError, match="unknown parameters"):
        agg.add("a", x, 1, {"scaffold": {"v": np.zeros(3)}})
    with pytest.raises(FedlabTrainingError, match="shape"):
        agg.add("a", x, 1, {"scaffold": {"w": np.zeros(4)}})
    assert agg.added == []


def test_scaffold_state_round_trips():
    agg = Scaffold(server_lr=2.0)
    x = {"w": np.ones(3, np.float32)}
    agg.begin_round(x)
    agg.add("a", {"w": np.full(3, 2, np.float32)}, 1, {"scaffold": {"w": np.arange(3.0)}})
    agg.end_round(2)
    meta, arrays = agg.state()
    again = make_aggregator("scaffold", agg.args())
    again.load_state(meta, arrays)
    assert isinstance(again, Scaffold) and again.server_lr == 2.0
    np.testing.assert_array_equal(again.c["w"], np.arange(3.0) / 2)


def test_make_aggregator_by_name_or_instance():
    assert isinstance(make_aggregator("FedAvg"), FedAvg)
    assert make_aggregator("fedprox", {"mu": 0.5}).args() == {"mu": 0.5}
    instance = Scaffold()
    assert make_aggregator(instance) is instance
    with pytest.raises(FedlabTrainingError, match="choose from"):
        make_aggregator("fedsgd")
    with pytest.raises(FedlabTrainingError, match="wrong aggregator_args"):
        make_aggregator("fedavg", {"mu": 1})
    with pytest.raises(FedlabTrainingError, match="by name"):
        make_aggregator(instance, {"server_lr": 1})


def test_breakpoints_name_builtin_aggregators_and_custom_classes_apart():
    class Median(FedAvg):
        pass

    assert [aggregator_name(a) for a in (FedAvg(), FedProx(), Scaffold())] == ["fedavg", "fedprox", "scaffold"]
    assert aggregator_name(Median()).endswith("Median")
