"""Server optimizers against plain-numpy references written from the papers' equations.

The references below do not call fedlab: each keeps its own ``x``, ``m``, ``v`` and applies
Reddi et al.'s Algorithm 2 (FedAdagrad, FedAdam, FedYogi) or Hsu et al.'s server momentum
(FedAvgM) to the sample-weighted mean of the nodes' parameters, round after round, with a
node missing from one round. Integer entries must take FedAvg's rounded mean.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedlab.errors import FedlabSecaggError, FedlabTrainingError
from fedlab.researcher.aggregators import AGGREGATORS, FedAvg, aggregator_name, make_aggregator
from fedlab.researcher.breakpoint import Breakpoint, read_breakpoint, write_breakpoint
from fedlab.researcher.secure_round import check_secagg_aggregator
from fedlab.researcher.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedlab.secagg import train_vector

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,), "bn.num_batches_tracked": ()}


def model(rng, dtype=np.float64, scale=1.0):
    return {"fc.weight": rng.normal(scale=scale, size=SHAPES["fc.weight"]).astype(dtype),
            "fc.bias": rng.normal(scale=scale, size=SHAPES["fc.bias"]).astype(dtype),
            "bn.num_batches_tracked": np.asarray(rng.integers(0, 1000), dtype=np.int64)}


def rounds_of_replies(seed, n_rounds=5, dtype=np.float64):
    """Per round, ``[(node_id, params, n_samples)]``: nodes near the global model, node n2 missing in round 3."""
    rng = np.random.default_rng(seed)
    x0 = model(rng, dtype)
    out = []
    for r in range(n_rounds):
        replies = []
        for i, n in enumerate((30, 200, 75)):
            if r == 2 and i == 2:
                continue
            replies.append((f"n{i}", model(rng, dtype, scale=0.3 + 0.2 * i), n))
        out.append(replies)
    return x0, out


def weighted_mean(replies, name):
    total = sum(n for _, _, n in replies)
    return sum(float(n) * p[name].astype(np.float64) for _, p, n in replies) / total


def reference(kind, x0, rounds, *, lr, beta1=0.9, beta2=0.99, tau=1e-3, momentum=0.9):
    """The paper's loop, in float64, for the float entries; FedAvg's rounded mean for the integer one."""
    x = {k: v.copy() for k, v in x0.items()}
    m = {k: np.zeros(SHAPES[k]) for k in ("fc.weight", "fc.bias")}
    v = {k: np.full(SHAPES[k], tau ** 2) for k in ("fc.weight", "fc.bias")}
    u = {k: np.zeros(SHAPES[k]) for k in ("fc.weight", "fc.bias")}
    history = []
    for replies in rounds:
        new = {}
        for k in ("fc.weight", "fc.bias"):
            delta = weighted_mean(replies, k) - x[k].astype(np.float64)
            if kind == "fedavgm":
                u[k] = momentum * u[k] + delta
                step = lr * u[k]
            else:
                m[k] = beta1 * m[k] + (1 - beta1) * delta
                if kind == "fedadagrad":
                    v[k] = v[k] + delta ** 2
                elif kind == "fedadam":
                    v[k] = beta2 * v[k] + (1 - beta2) * delta ** 2
                else:  # fedyogi
                    v[k] = v[k] - (1 - beta2) * delta ** 2 * np.sign(v[k] - delta ** 2)
                step = lr * m[k] / (np.sqrt(v[k]) + tau)
            new[k] = (x[k].astype(np.float64) + step).astype(x[k].dtype)
        new["bn.num_batches_tracked"] = np.asarray(np.rint(weighted_mean(replies, "bn.num_batches_tracked")),
                                                   np.int64)
        x = new
        history.append(x)
    return history


def run(agg, x0, rounds):
    x, history = x0, []
    for replies in rounds:
        agg.begin_round(x)
        for node_id, params, n in replies:
            agg.add(node_id, params, n)
        x = agg.end_round(3)
        history.append(x)
    return history


CASES = [
    ("fedadam", {"server_lr": 0.05}, {"lr": 0.05}),
    ("fedadam", {}, {"lr": 0.01}),
    ("fedyogi", {"server_lr": 0.05, "beta1": 0.5, "tau": 1e-2}, {"lr": 0.05, "beta1": 0.5, "tau": 1e-2}),
    ("fedadagrad", {}, {"lr": 0.1, "beta1": 0.0}),
    ("fedadagrad", {"beta1": 0.9, "server_lr": 0.3}, {"lr": 0.3, "beta1": 0.9}),
    ("fedavgm", {}, {"lr": 1.0, "momentum": 0.9}),
    ("fedavgm", {"server_lr": 0.5, "momentum": 0.7}, {"lr": 0.5, "momentum": 0.7}),
]


@pytest.mark.parametrize("name, args, ref_args", CASES)
def test_matches_the_papers_equations_round_after_round(name, args, ref_args):
    x0, rounds = rounds_of_replies(1)
    ours = run(make_aggregator(name, args), x0, rounds)
    ref = reference(name, x0, rounds, **ref_args)
    for r, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for k in b:
            assert a[k].dtype == b[k].dtype, (r, k)
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14, err_msg=f"round {r + 1}, {k}")
        assert a["bn.num_batches_tracked"] == b["bn.num_batches_tracked"]
    assert not np.allclose(ours[-1]["fc.weight"], run(FedAvg(), x0, rounds)[-1]["fc.weight"])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_float32_models_are_stepped_in_float64_and_sent_back_in_float32(name):
    x0, rounds = rounds_of_replies(2, dtype=np.float32)
    ours = run(make_aggregator(name, {}), x0, rounds)
    lr = {"fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.1, "fedavgm": 1.0}[name]
    ref = reference(name, x0, rounds, lr=lr, beta1=0.0 if name == "fedadagrad" else 0.9)
    for a, b in zip(ours, ref, strict=True):
        assert a["fc.weight"].dtype == np.float32 and not a["fc.weight"].flags.writeable
        np.testing.assert_allclose(a["fc.weight"], b["fc.weight"], rtol=2e-6, atol=1e-7)


def test_fedavgm_without_momentum_at_rate_one_is_fedavg():
    x0, rounds = rounds_of_replies(3)
    plain, momentum_free = run(FedAvg(), x0, rounds), run(FedAvgM(server_lr=1.0, momentum=0.0), x0, rounds)
    for a, b in zip(plain, momentum_free, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-13, atol=1e-13)


def test_integer_and_averaged_entries_take_fedavgs_mean_and_keep_no_state():
    rng = np.random.default_rng(4)
    x0 = model(rng)
    replies = [("a", model(rng), 10), ("b", model(rng), 30)]
    agg = FedAdam(server_lr=0.1, averaged=["fc.bias"])
    agg.begin_round(x0)
    for node_id, params, n in replies:
        agg.add(node_id, params, n)
    out = agg.end_round(2)
    np.testing.assert_allclose(out["fc.bias"], weighted_mean(replies, "fc.bias"), rtol=1e-15)
    assert out["bn.num_batches_tracked"] == np.rint(weighted_mean(replies, "bn.num_batches_tracked"))
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert set(agg.state_arrays["m"]) == set(agg.state_arrays["v"]) == {"fc.weight"}
    assert not np.allclose(out["fc.weight"], weighted_mean(replies, "fc.weight"))


def test_complex_entries_use_the_squared_modulus():
    x0 = {"z": np.array([1 + 1j, -2 + 0.5j], np.complex128)}
    replies = [("a", {"z": np.array([1.5 + 0.5j, -1 + 0.5j])}, 1), ("b", {"z": np.array([0.5 + 2j, -2 - 1j])}, 3)]
    agg = FedAdam(server_lr=0.1)
    agg.begin_round(x0)
    for node_id, params, n in replies:
        agg.add(node_id, params, n)
    out = agg.end_round(2)
    delta = (1 * replies[0][1]["z"] + 3 * replies[1][1]["z"]) / 4 - x0["z"]
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * np.abs(delta) ** 2
    np.testing.assert_allclose(out["z"], x0["z"] + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-13)


@pytest.mark.parametrize("name, args", [("fedadam", {"server_lr": 0.05}), ("fedyogi", {}), ("fedadagrad", {}),
                                        ("fedavgm", {"momentum": 0.8})])
def test_state_survives_a_breakpoint_file_and_resumes_exactly(tmp_path, name, args):
    x0, rounds = rounds_of_replies(5)
    full = run(make_aggregator(name, args), x0, rounds)
    first = make_aggregator(name, args)
    half = run(first, x0, rounds[:2])
    meta, arrays = first.state()
    assert meta == {"step": 2} and arrays
    bp = Breakpoint(experiment_id="e", tags=["t"], nodes=None, node_ids=["n0"], plan_source="", plan_class="P",
                    model_args={}, training_args={}, aggregator=aggregator_name(first), aggregator_args=first.args(),
                    aggregator_meta=meta, rounds=5, round_current=2, state_ids={}, history=[], round_timeout=1.0,
                    share_persistent_buffers=True)
    write_breakpoint(bp, half[-1], arrays, tmp_path / "bp")
    loaded, params, saved = read_breakpoint(tmp_path / "bp")
    again = make_aggregator(loaded.aggregator, loaded.aggregator_args)
    assert type(again) is type(first) and again.args() == first.args()
    again.load_state(loaded.aggregator_meta, saved)
    assert again.step == 2
    rest = run(again, params, rounds[2:])
    for k in full[-1]:
        np.testing.assert_array_equal(rest[-1][k], full[-1][k])
    fresh = run(make_aggregator(name, args), params, rounds[2:])  # without the state it would not be the same
    assert not np.array_equal(fresh[-1]["fc.weight"], full[-1]["fc.weight"])


def test_the_secure_sum_steps_like_the_plain_replies():
    x0, rounds = rounds_of_replies(6, dtype=np.float32)
    replies = rounds[0]
    plain, secure = FedAdam(server_lr=0.05), FedAdam(server_lr=0.05)
    for agg in (plain, secure):
        agg.begin_round(x0)
    fields = train_vector.layout(x0, {}, len(replies))
    total = np.zeros(train_vector.vector_length(fields), np.uint64)
    for node_id, params, n in replies:
        plain.add(node_id, params, n)
        total += train_vector.encode(fields, params, {}, n, 200)
    secure.add_secure(train_vector.decode(fields, total, 200), [r[0] for r in replies])
    a, b = plain.end_round(3), secure.end_round(3)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    check_secagg_aggregator(secure)  # needs only the sum: allowed under secure aggregation


@pytest.mark.parametrize("name, args, message", [
    ("fedadam", {"server_lr": 0}, "server_lr in (0, inf)"),
    ("fedadam", {"beta1": 1.0}, "beta1 and beta2 in [0, 1)"),
    ("fedyogi", {"tau": -1}, "tau in (0, inf)"),
    ("fedavgm", {"momentum": 1.0}, "momentum in [0, 1)"),
    ("fedavgm", {"momentum": True}, "momentum"),
    ("fedadagrad", {"beta2": 0.9}, "wrong aggregator_args for fedadagrad"),
    ("fedadam", {"averaged": "fc.bias"}, "list of parameter names"),
])
def test_bad_arguments_are_refused_with_what_was_wrong(name, args, message):
    with pytest.raises(FedlabTrainingError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        make_aggregator(name, args)


def test_unknown_averaged_names_are_refused_at_the_first_round():
    agg = FedAdam(averaged=["bn.running_var"])
    with pytest.raises(FedlabTrainingError, match=r"averaged names \['bn.running_var'\] are not in the model"):
        agg.begin_round(model(np.random.default_rng(0)))


def test_a_state_from_another_aggregator_is_refused():
    agg = FedAdam()
    with pytest.raises(FedlabTrainingError, match="does not keep"):
        agg.load_state({"step": 1}, {"c.fc.weight": np.zeros(3)})
    with pytest.raises(FedlabTrainingError, match="not a count"):
        agg.load_state({"step": -1}, {})


def test_registered_by_name():
    for name, cls in [("fedavgm", FedAvgM), ("fedadagrad", FedAdagrad), ("fedadam", FedAdam), ("fedyogi", FedYogi)]:
        assert AGGREGATORS[name] is cls and aggregator_name(make_aggregator(name)) == name
    with pytest.raises(FedlabSecaggError):
        check_secagg_aggregator(make_aggregator("median"))
