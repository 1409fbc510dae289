"""Red team, rule 5: noisy min/max that cannot be averaged away, and histogram edges that cannot
be moved by a hair to count one patient.

With min_max = "noisy" the attacker asks the same min again and again, and on 30 derived copies
(each standardized, so each is a "new" dataset with its own noise draw if the node keyed noise on
the dataset), maps every copy's noisy min back to the source's units and takes the largest: the
true min is approached unless the noise is the same everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from redteam_harness import CELL_THRESHOLD, fa_part, is_error, one_raw_node, public

pytestmark = pytest.mark.integration

NOISY = {"min_max": "noisy"}


def min_max(r, fds, column="age"):
    row = public(r.stats, fds, ["min", "max"], columns=[column]).global_stats().loc[column]
    return float(row["min"]), float(row["max"])


@pytest.mark.timeout(1200)
def test_noisy_min_is_the_same_on_every_request_and_every_derived_copy(nodes, api):
    """Attack: the noisy min of age 5 times, then on 30 standardized copies mapped back through
    each copy's mean and scale. Rule: always the same value (to ~1e-9), below the true min: the
    largest of them is no closer to the true min than the first."""
    (node,) = nodes(1, rules=NOISY)
    r = api(1)
    fds = r.search(["cohort"])
    true_lo, true_hi = float(node.frame["age"].min()), float(node.frame["age"].max())
    lo, hi = min_max(r, fds)
    assert lo < true_lo and hi > true_hi, f"noisy range ({lo}, {hi}) does not cover ({true_lo}, {true_hi})"
    repeats = [min_max(r, fds) for _ in range(4)]
    assert all(rep == (lo, hi) for rep in repeats), f"the noise changes between requests: {repeats}"
    span = true_hi - true_lo
    back: list[float] = []
    for k in range(30):
        pipe = public(r.preprocess(fds).standardize, ["age"])
        spec = pipe.steps[-1]
        copy = public(pipe.apply, name=f"rt-z{k}", tags=[f"rt-z{k}"])
        z_lo, z_hi = min_max(r, copy)
        back.append(z_lo * spec["scale"]["age"] + spec["mean"]["age"])
        hi_back = z_hi * spec["scale"]["age"] + spec["mean"]["age"]
        assert math.isclose(hi_back, hi, rel_tol=0, abs_tol=1e-9 * span), (
            f"copy {k}: the noisy max maps back to {hi_back}, the source's is {hi} (true {true_hi})")
    spread = max(back) - min(back)
    assert all(math.isclose(b, lo, rel_tol=0, abs_tol=1e-9 * span) for b in back), (
        f"copies' noisy mins map back to {min(back)}..{max(back)} (spread {spread}); source {lo}, true {true_lo}")


def test_noisy_min_of_rescaled_states_maps_back_to_the_same_value(nodes, raw):
    """Attack: ten pipeline states, each an increasing affine map of age with its own mean and
    scale (and a min-max map, and a map of a map), asked for min/max through the fit step. Rule:
    every noisy min maps back to the source's noisy min."""
    node, ds = one_raw_node(nodes, raw, rules=NOISY)
    first = fa_part(raw.fa(node.node_id, ds, stats=["min", "max"], columns=["age"]))
    assert first is not None and first.numeric["age"].min is not None, f"harness: no noisy min: {first}"
    lo = first.numeric["age"].min
    span = float(np.ptp(node.frame["age"]))
    maps = [(10.0 + k, 0.5 + 0.25 * k) for k in range(10)]
    for mean, scale in maps:
        spec = {"type": "standardize", "columns": ["age"], "mean": {"age": mean}, "scale": {"age": scale}}
        state = raw.preproc(node.node_id, ds, "standardize", "set", {"transform": spec})
        assert not is_error(state), state
        got = fa_part(raw.preproc(node.node_id, ds, "standardize", "fit", {"columns": ["age"], "stats": ["min", "max"]},
                                  state.state_id))
        z = got.numeric["age"].min
        assert z is not None and math.isclose(z * scale + mean, lo, rel_tol=0, abs_tol=1e-9 * span), (
            f"scale {scale}, mean {mean}: the copy's noisy min maps back to {z * scale + mean}, source {lo}")
    spec = {"type": "minmax", "columns": ["age"], "min": {"age": 0.0}, "max": {"age": 200.0}}
    state = raw.preproc(node.node_id, ds, "minmax", "set", {"transform": spec})
    assert not is_error(state), state
    spec2 = {"type": "standardize", "columns": ["age"], "mean": {"age": 0.1}, "scale": {"age": 0.01}}
    state2 = raw.preproc(node.node_id, ds, "standardize", "set", {"transform": spec2}, state.state_id)
    assert not is_error(state2), state2
    got = fa_part(raw.preproc(node.node_id, ds, "standardize", "fit", {"columns": ["age"], "stats": ["min"]},
                              state2.state_id))
    z = got.numeric["age"].min
    assert z is not None and math.isclose((z * 0.01 + 0.1) * 200.0, lo, rel_tol=0, abs_tol=1e-9 * span), (
        f"a map of a map: {(z * 0.01 + 0.1) * 200.0} vs {lo}")


EDGE_PAIRS = [
    ([0.0, 50.0], [0.0, 50.5]),
    ([0.0, 49.5], [0.0, 50.5]),
    ([0.0, 50.0, 100.0], [0.0, 50.5, 100.0]),
    ([0.0, 49.9, 100.0], [0.0, 50.1, 100.0]),
    ([0.0, 50.0, 100.0], [0.0, 51.0, 100.0]),
]


@pytest.mark.parametrize("rules", [{}, NOISY], ids=["min_max-off", "min_max-noisy"])
def test_moving_a_histogram_edge_does_not_count_a_few_patients(nodes, api, rules):
    """Attack: two histograms of age whose edges differ by half a year around 50 (exactly two
    patients are 50): the difference of the bins is the count between the edges. Rule: no bin
    (and no count outside the edges) differs between the two answers by 1..cell_threshold-1."""
    (node,) = nodes(1, rules=rules)
    ages = node.frame["age"]
    assert (ages == 50).sum() == 2
    r = api(1)
    fds = r.search(["cohort"])
    seen = 0
    for a, b in EDGE_PAIRS:
        answers = []
        for edges in (a, b):
            result = public(r.stats, fds, ["count"], columns=["age"],
                            stats_args={"age": {"histogram": {"edges": edges}}})
            part = result.replies[node.node_id].numeric.get("age")
            hist = part.histogram if part is not None else None
            answers.append(list(hist) if hist is not None else [None] * (len(edges) - 1))
        for i, (ha, hb) in enumerate(zip(*answers, strict=True)):
            if ha is not None and hb is not None:
                seen += 1
                assert not 0 < abs(hb - ha) < CELL_THRESHOLD, (
                    f"edges {a} vs {b}: bin {i} is {ha} vs {hb}, so {abs(hb - ha)} patients lie between the edges")
        if all(v is not None for v in answers[0] + answers[1]):
            outside = [len(ages) - sum(h) for h in answers]
            assert not 0 < abs(outside[0] - outside[1]) < CELL_THRESHOLD, (
                f"edges {a} vs {b}: the counts outside the edges are {outside}")
    assert seen, "harness: not one histogram bin was answered"
