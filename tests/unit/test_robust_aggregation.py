"""Robust aggregators against plain references: per-coordinate loops for the median and the trimmed
mean, pairwise distances by hand for Krum; outliers that move FedAvg do not move them; too few
replies and secure aggregation are refused with what to do."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlab.errors import FedlabSecaggError, FedlabTrainingError
from fedlab.researcher.aggregators import AGGREGATORS, FedAvg, aggregator_name, make_aggregator
from fedlab.researcher.robust_aggregation import Krum, Median, MultiKrum, TrimmedMean
from fedlab.researcher.secure_round import check_secagg_aggregator
from fedlab.secagg import train_vector


def model(rng, dtype=np.float32, scale=1.0, shift=0.0):
    return {"w": (shift + rng.normal(scale=scale, size=(3, 5))).astype(dtype),
            "b": (shift + rng.normal(scale=scale, size=4)).astype(dtype),
            "steps": np.asarray(rng.integers(0, 100), np.int64)}


def replies(seed, n, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return model(rng, dtype), [(f"node-{i}", model(rng, dtype), int(rng.integers(1, 500))) for i in range(n)]


def aggregate(agg, x, reps, order=None):
    agg.begin_round(x)
    for i in order if order is not None else range(len(reps)):
        agg.add(*reps[i])
    return agg.end_round(len(reps))


def per_coordinate(reps, name, rule):
    """``rule(list of floats)`` applied coordinate by coordinate, with Python loops."""
    arrays = [p[name].astype(np.float64).reshape(-1) for _, p, _ in reps]
    out = np.array([rule([a[j] for a in arrays]) for j in range(arrays[0].size)])
    return out.reshape(reps[0][1][name].shape)


def median_of(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_of(k):
    def rule(values):
        s = sorted(values)
        kept = s[k:len(s) - k]
        return sum(kept) / len(kept)
    return rule


def cast(value, like):
    return (np.rint(value) if np.issubdtype(like.dtype, np.integer) else value).astype(like.dtype)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_the_coordinate_wise_median_whatever_the_order(n):
    x, reps = replies(n, n)
    out = aggregate(Median(), x, reps)
    again = aggregate(Median(), x, reps, order=list(reversed(range(n))))
    for name in x:
        expected = cast(per_coordinate(reps, name, median_of), x[name])
        np.testing.assert_array_equal(out[name], expected)
        np.testing.assert_array_equal(again[name], out[name])
        assert out[name].dtype == x[name].dtype and not out[name].flags.writeable


@pytest.mark.parametrize("n, beta, k", [(5, 0.1, 1), (10, 0.1, 1), (10, 0.2, 2), (11, 0.1, 2), (4, 0.0, 0),
                                        (7, 0.3, 3)])
def test_trimmed_mean_drops_ceil_beta_n_from_each_end(n, beta, k):
    x, reps = replies(10 + n, n)
    agg = TrimmedMean(beta)
    assert agg.trimmed(n) == k == math.ceil(beta * n - 1e-9)
    out = aggregate(agg, x, reps)
    for name in ("w", "b"):
        np.testing.assert_allclose(out[name], per_coordinate(reps, name, trimmed_of(k)).astype(np.float32),
                                   rtol=1e-6, atol=1e-7)
    assert out["steps"] == np.rint(per_coordinate(reps, "steps", trimmed_of(k)))


def reference_krum_scores(reps, f):
    flat = {nid: np.concatenate([p[k].astype(np.float64).reshape(-1) for k in sorted(p)]) for nid, p, _ in reps}
    scores = {}
    for i in flat:
        distances = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in flat if j != i)
        scores[i] = sum(distances[:len(flat) - f - 2])
    return scores


def byzantine(seed, n_honest, n_bad):
    """Honest nodes near one model; bad ones far away (scaled updates), which drag the mean."""
    rng = np.random.default_rng(seed)
    x = model(rng)
    reps = [(f"honest-{i}", {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(v.dtype) if k != "steps" else v
                             for k, v in x.items()}, 100) for i in range(n_honest)]
    reps += [(f"bad-{i}", {k: (v + 10.0 + rng.normal(size=v.shape)).astype(v.dtype) if k != "steps" else v
                           for k, v in x.items()}, 10_000) for i in range(n_bad)]
    return x, reps


@pytest.mark.parametrize("f, n_honest, n_bad", [(1, 4, 1), (2, 5, 2), (0, 3, 0)])
def test_krum_picks_the_lowest_score_computed_by_hand(f, n_honest, n_bad):
    x, reps = byzantine(f, n_honest, n_bad)
    agg = Krum(f=f)
    out = aggregate(agg, x, reps)
    ref = reference_krum_scores(reps, f)
    assert agg._replies == {}  # the round's N models are dropped once it ends
    best = min(ref, key=lambda node: (ref[node], node))
    assert agg.chosen == [best] and best.startswith("honest")
    chosen = dict((nid, p) for nid, p, _ in reps)[best]
    for name in x:
        np.testing.assert_array_equal(out[name], chosen[name])


def test_krum_scores_equal_the_hand_computed_ones():
    x, reps = byzantine(7, 5, 2)
    agg = Krum(f=2)
    agg.begin_round(x)
    for rep in reps:
        agg.add(*rep)
    ours, ref = agg.scores(), reference_krum_scores(reps, 2)
    assert set(ours) == set(ref)
    for node in ref:
        assert ours[node] == pytest.approx(ref[node], rel=1e-12)


@pytest.mark.parametrize("m", [None, 2, 4])
def test_multikrum_averages_the_m_best_unweighted(m):
    x, reps = byzantine(3, 5, 1)
    agg = MultiKrum(f=1, m=m)
    out = aggregate(agg, x, reps)
    ref = reference_krum_scores(reps, 1)
    best = sorted(ref, key=lambda node: (ref[node], node))[:m or len(reps) - 1]
    assert agg.chosen == best and all(node.startswith("honest") for node in best)
    by_id = {nid: p for nid, p, _ in reps}
    for name in ("w", "b"):
        expected = sum(by_id[node][name].astype(np.float64) for node in best) / len(best)
        np.testing.assert_allclose(out[name], expected.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, args", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}),
                                        ("multikrum", {"f": 1})])
def test_one_scaled_node_moves_fedavg_far_and_robust_rules_little(name, args):
    x, reps = byzantine(11, 4, 1)
    honest = {k: np.mean([p[k].astype(np.float64) for nid, p, _ in reps if nid.startswith("honest")], axis=0)
              for k in ("w", "b")}
    mean = aggregate(FedAvg(), x, reps)
    robust = aggregate(make_aggregator(name, args), x, reps)
    assert np.abs(mean["w"] - honest["w"]).max() > 5  # the bad node claimed 10 000 samples
    assert np.abs(robust["w"] - honest["w"]).max() < 0.2


def test_too_few_replies_are_refused_with_what_to_do():
    x, reps = replies(0, 4)
    with pytest.raises(FedlabTrainingError, match=r"krum with f=1 needs at least 2f \+ 3 = 5 replies.*has 4"):
        aggregate(Krum(f=1), x, reps)
    with pytest.raises(FedlabTrainingError, match="averages at most n - f = 4 of this round's 5 replies, not m=5"):
        aggregate(MultiKrum(f=1, m=5), *replies(0, 5))
    with pytest.raises(FedlabTrainingError, match=r"drops 1 value\(s\) from each end.*needs at least 3"):
        aggregate(TrimmedMean(0.1), x, reps[:2])
    agg = Median()
    agg.begin_round(x)
    with pytest.raises(FedlabTrainingError, match="no node contributed"):
        agg.end_round(4)


def test_replies_are_kept_as_copies_and_a_node_counts_once():
    x, reps = replies(2, 3)
    agg = Median()
    agg.begin_round(x)
    for nid, params, n in reps:
        writable = {k: v.copy() for k, v in params.items()}
        agg.add(nid, writable, n)
        for v in writable.values():
            v[...] = 1e9  # the caller reuses its buffer: the kept copy must not change
    with pytest.raises(FedlabTrainingError, match="answered twice"):
        agg.add(reps[0][0], reps[0][1], 1)
    out = agg.end_round(3)
    np.testing.assert_array_equal(out["w"], per_coordinate(reps, "w", median_of).astype(np.float32))
    agg.begin_round(x)
    agg.add("empty", reps[0][1], 0)  # trained on nothing: left out, as FedAvg leaves it out
    assert agg.added == []


def test_complex_entries_by_real_and_imaginary_parts():
    x = {"z": np.zeros(2, np.complex64)}
    values = [np.array([1 + 5j, 2 - 1j]), np.array([3 + 1j, -4 + 0j]), np.array([2 + 2j, 9 + 9j])]
    out = aggregate(Median(), x, [(f"n{i}", {"z": v.astype(np.complex64)}, 1) for i, v in enumerate(values)])
    np.testing.assert_array_equal(out["z"], np.array([2 + 2j, 2 + 0j], np.complex64))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum"])
def test_secure_aggregation_is_refused_saying_why(name):
    agg = make_aggregator(name)
    with pytest.raises(FedlabSecaggError, match=f"the {name} aggregator needs each node's own parameters.*only "
                                                "their sum.*without secagg.*fedadam"):
        check_secagg_aggregator(agg)
    x, reps = replies(0, 3)
    agg.begin_round(x)
    fields = train_vector.layout(x, {}, 3)
    total = sum(train_vector.encode(fields, p, {}, n, 500) for _, p, n in reps)
    with pytest.raises(FedlabSecaggError, match="only their sum"):
        agg.add_secure(train_vector.decode(fields, total, 500), [r[0] for r in reps])


@pytest.mark.parametrize("name, args, message", [
    ("trimmed_mean", {"beta": 0.5}, r"beta in \[0, 0.5\)"),
    ("trimmed_mean", {"beta": "a"}, "beta"),
    ("krum", {"f": -1}, "integer f"),
    ("krum", {"f": 1.5}, "integer f"),
    ("multikrum", {"m": 0}, "integer m"),
    ("median", {"beta": 0.1}, "wrong aggregator_args for median"),
])
def test_bad_arguments_are_refused(name, args, message):
    with pytest.raises(FedlabTrainingError, match=message):
        make_aggregator(name, args)


def test_registered_and_rebuilt_from_their_arguments():
    for name, cls, args in [("median", Median, {}), ("trimmed_mean", TrimmedMean, {"beta": 0.2}),
                            ("krum", Krum, {"f": 2}), ("multikrum", MultiKrum, {"f": 1, "m": 3})]:
        agg = make_aggregator(name, args)
        assert AGGREGATORS[name] is cls and aggregator_name(agg) == name
        assert make_aggregator(name, agg.args()).args() == agg.args()
        assert agg.state() == ({}, {})
