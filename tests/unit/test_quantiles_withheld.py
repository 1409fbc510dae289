"""The quantile search against nodes that round thresholds to a grid and withhold counts.

A simulated federation in pure Python: each node counts its values ``<=`` a threshold after
rounding it to its power-of-ten grid, answers 0 / n outside its (outward) range, and withholds
(None) a count with fewer than ``m`` values on a side, or (optionally) a new cut fewer than
``spacing`` ranks from one it answered before, as the real nodes do (fedlab.privacy.cuts). The
search must stop within its round limit, be exact (within half a grid step) where nothing is
withheld, approximate within the bound it reports otherwise, and NaN where a quantile cannot be
bracketed on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.analytics.messages import FAReply, NumericPartial
from fedlab.analytics.quantiles import NodeAnswer, QuantileSearch, pool_counts, snap
from fedlab.errors import FedlabConfigError, FedlabError, FedlabProtocolError
from fedlab.preprocessing.messages import PreprocReply
from fedlab.protocol import DatasetInfo
from fedlab.researcher import fa_stats
from fedlab.researcher.fa_stats import federated_stats, nice_edges
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.preprocess import Pipeline

NAMES = {"a": "A", "b": "B", "small": "SMALL"}
LEVELS = [0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1]
SLACK = 1e-9  # float rounding of a bound vs numpy's interpolation


@dataclass
class Node:
    values: Any
    step: float | None = None
    m: int = 0  # fewer values than this on a side: withheld
    fence: bool = False  # answer 0 / n outside an outward range (those are no cuts)
    spacing: int = 0  # a new cut closer than this many ranks to an answered one: withheld
    allowance: int = 10**9
    stored: set[int] = field(default_factory=set)
    asked: set[float] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.values = np.sort(np.asarray(self.values, dtype=float))
        lo, hi = float(self.values[0]), float(self.values[-1])
        self.box = (lo - 0.05 * (hi - lo) - 1e-9, hi + 0.05 * (hi - lo) + 1e-9)

    def below(self, thresholds: Sequence[float]) -> tuple[list[int | None], float | None]:
        out: list[int | None] = []
        n = len(self.values)
        for t in thresholds:
            p = snap(float(t), self.step)
            if p not in self.asked:
                if len(self.asked) >= self.allowance:
                    out.append(None)
                    continue
                self.asked.add(p)
            if self.fence and p < self.box[0]:
                out.append(0)
                continue
            if self.fence and p > self.box[1]:
                out.append(n)
                continue
            r = int(np.searchsorted(self.values, p, side="right"))
            if r < self.m or n - r < self.m:
                out.append(None)
            elif self.spacing and r not in self.stored and any(abs(r - s) < self.spacing for s in self.stored):
                out.append(None)
            else:
                self.stored.add(r)
                out.append(r)
        return out, self.step


def pooled(nodes: Sequence[Node]) -> np.ndarray:
    return np.concatenate([n.values for n in nodes])


def drive(nodes: Sequence[Node], levels: Sequence[float] = LEVELS, *, tell_grid: bool = True, per_node: bool = True,
          **kwargs: Any) -> tuple[QuantileSearch, dict[float, tuple[float, float]], list[float]]:
    """Run the search like the researcher does (each node's answers to the search, or with
    ``per_node=False`` the pooled counts, None where any node withheld); returns it, its bounded
    result and every threshold asked."""
    values = pooled(nodes)
    grid = max((n.step or 0.0) for n in nodes) or None
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    search = QuantileSearch.from_moments(levels, values.size, float(values.mean()), std,
                                         resolution=grid if tell_grid else None, **kwargs)
    asked: list[float] = []
    while (ts := search.next_thresholds()) is not None:
        assert search.rounds < search.max_rounds
        asked += ts
        answers = [n.below(ts) for n in nodes]
        if per_node:
            search.update_nodes({f"node{i}": NodeAnswer(below, step, len(node.values))
                                 for i, (node, (below, step)) in enumerate(zip(nodes, answers, strict=True))})
        else:
            counts, at = pool_counts(ts, answers)
            search.update(counts, at=at)
        search.set_resolution(max((r or 0.0) for _, r in answers))
    assert search.finished and search.rounds <= search.max_rounds
    return search, search.result_with_bounds(), asked


def check_bounds(result: Mapping[float, tuple[float, float]], values: np.ndarray) -> None:
    scale = float(np.max(np.abs(values)))
    for q, (value, half) in result.items():
        if math.isnan(value):
            assert half == math.inf, q
            continue
        expected = float(np.quantile(values, q))
        assert abs(value - expected) <= half + SLACK * scale, (q, value, half, expected)


def normal_nodes(seed: int, **rules: Any) -> list[Node]:
    rng = np.random.default_rng(seed)
    return [Node(rng.normal(50, 10, 300), 0.1, **rules), Node(rng.normal(52, 12, 200), 0.01, **rules),
            Node(rng.normal(49, 9, 150), 0.1, **rules)]


# -- nothing withheld --------------------------------------------------------------------------------


def test_nothing_withheld_and_no_grid_is_as_exact_as_before():
    rng = np.random.default_rng(0)
    nodes = [Node(rng.lognormal(0, 1, 120)), Node(rng.normal(3, 1, 80)), Node(rng.integers(0, 5, 40))]
    search, result, _ = drive(nodes)
    values = pooled(nodes)
    span = float(values.max() - values.min())
    assert search.approximate == [] and search.rounds <= 14
    for q, (value, half) in result.items():
        assert abs(value - np.quantile(values, q)) <= 1e-6 * span, q
        assert half <= 1e-6 * span
    check_bounds(result, values)


@pytest.mark.parametrize("tell_grid", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_a_grid_alone_leaves_every_quantile_exact_to_one_step(seed, tell_grid):
    nodes = normal_nodes(seed)
    search, result, asked = drive(nodes, tell_grid=tell_grid)
    assert search.approximate == [] and search.resolution == 0.1
    for q, (_, half) in result.items():  # half a step per order statistic, one for an interpolated quantile
        assert half <= 0.1 * (1 + 1e-9), q
    check_bounds(result, pooled(nodes))
    assert len(asked) == len(set(asked))  # never the same threshold twice
    if tell_grid:  # snapped from the start: every threshold on the coarsest grid
        assert all(snap(t, 0.1) == t for t in asked)


# -- withheld counts --------------------------------------------------------------------------------


def test_tails_without_a_bracket_are_nan_and_the_middle_stays_exact():
    nodes = normal_nodes(1, m=10)  # no fence: nothing is ever answered with fewer than 10 values on a side
    search, result, _ = drive(nodes)
    for q in (0, 1):
        assert math.isnan(result[q][0]) and result[q][1] == math.inf
    assert {0, 1} <= set(search.approximate)
    assert 0.5 not in search.approximate and result[0.5][1] <= 0.05 * (1 + 1e-9)
    assert search.result()[0.5] == result[0.5][0]
    check_bounds(result, pooled(nodes))


@pytest.mark.parametrize("seed", range(6))
def test_spaced_cuts_give_approximations_within_their_bounds(seed):
    nodes = normal_nodes(seed, m=10, fence=True, spacing=3)
    search, result, asked = drive(nodes)
    check_bounds(result, pooled(nodes))
    assert search.approximate  # the spacing rule stops refinement short of the grid somewhere
    for q in search.approximate:
        value, half = result[q]
        assert half > 0.05 or math.isnan(value)
    # min and max: bracketed only by thresholds outside every value (answered 0 / n): unknown
    assert math.isnan(result[0][0]) and math.isnan(result[1][0]) and {0, 1} <= set(search.approximate)
    for q in (0.25, 0.5, 0.75):
        assert not math.isnan(result[q][0]), q
    assert len(asked) == len(set(asked))


def test_a_small_node_leaves_the_quantiles_it_withholds_approximate():
    rng = np.random.default_rng(3)
    nodes = [Node(rng.normal(50, 10, 400), 0.1, m=10, fence=True), Node(rng.normal(50, 10, 40), 0.1, m=10,
                                                                          fence=True)]
    search, result, _ = drive(nodes, [0.1, 0.5, 0.9])
    check_bounds(result, pooled(nodes))
    # the small node answers only between its 10th value from either end (and outside its range):
    # the 10% and 90% quantiles lie where it withholds
    assert set(search.approximate) == {0.1, 0.9} and result[0.5][1] <= 0.05 * (1 + 1e-9)


def test_everything_withheld_stops_after_one_round_with_nan():
    nodes = normal_nodes(2, m=10**6)
    search, result, _ = drive(nodes, [0.25, 0.5])
    assert search.rounds == 1 and set(search.approximate) == {0.25, 0.5}
    assert all(math.isnan(v) and h == math.inf for v, h in result.values())


def test_a_spent_allowance_ends_the_search():
    nodes = normal_nodes(4, m=10, fence=True, allowance=40)
    search, result, _ = drive(nodes, [0.25, 0.5, 0.75])
    check_bounds(result, pooled(nodes))
    assert search.rounds <= 4 and search.approximate


def test_the_search_stops_at_its_round_limit_and_says_what_is_left_approximate():
    rng = np.random.default_rng(5)
    nodes = [Node(rng.normal(0, 1, 500)), Node(rng.normal(0, 1, 500))]
    search, result, _ = drive(nodes, [0.1, 0.5, 0.9], max_rounds=1)
    assert search.rounds == 1 and set(search.approximate) == {0.1, 0.5, 0.9}
    check_bounds(result, pooled(nodes))
    assert all(0 < h < math.inf for _, h in result.values())


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bounds_hold_whatever_the_rules(data):
    k = data.draw(st.integers(1, 3))
    nodes = []
    for _ in range(k):
        n = data.draw(st.integers(1, 120))
        kind = data.draw(st.sampled_from(["normal", "integers", "ties", "wide"]))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        if kind == "normal":
            values = rng.normal(10, 3, n)
        elif kind == "integers":
            values = rng.integers(0, 20, n)
        elif kind == "ties":
            values = rng.choice([1.0, 2.5, 7.0], n)
        else:
            values = rng.lognormal(0, 3, n)
        nodes.append(Node(values, data.draw(st.sampled_from([None, 0.001, 0.1, 1.0])),
                          m=data.draw(st.integers(0, 12)), fence=data.draw(st.booleans()),
                          spacing=data.draw(st.integers(0, 4)), allowance=data.draw(st.sampled_from([10**9, 50]))))
    search, result, asked = drive(nodes, [0, 0.1, 0.5, 0.9, 1], tell_grid=data.draw(st.booleans()))
    check_bounds(result, pooled(nodes))
    assert len(asked) == len(set(asked))


# -- monotone bounds: a node's withheld count lies between its own answers around it ------------------


def counts_le(values: Any, thresholds: Sequence[float]) -> list[int]:
    return np.searchsorted(np.sort(np.asarray(values, dtype=float)), thresholds, side="right").tolist()


def test_a_withheld_count_lies_between_the_node_s_own_answers():
    """A node that withholds every count inside its range still bounds them: 0 below, its n above.
    The other node's counts then bracket the pooled median wherever the withheld values lie."""
    big = np.arange(100) + 0.5
    ts = QuantileSearch([0.5], 120, (0.0, 100.0)).next_thresholds() or []
    fence = [0 if t < -1 else 20 if t > 101 else None for t in ts]  # the small node: nothing inside
    assert None in fence
    results = {}
    for per_node in (True, False):
        search = QuantileSearch([0.5], 120, (0.0, 100.0), max_rounds=1)
        assert search.next_thresholds() == ts
        if per_node:
            search.update_nodes({"big": NodeAnswer(counts_le(big, ts), None, 100),
                                 "small": NodeAnswer(fence, None, 20)})
        else:
            search.update([None if f is None else b + f for b, f in zip(counts_le(big, ts), fence, strict=True)])
        results[per_node] = search.result_with_bounds()[0.5]
    value, half = results[True]
    assert math.isfinite(value) and half < 25
    for small in (np.full(20, 0.1), np.full(20, 99.9), np.linspace(0.1, 99.9, 20), np.full(20, 50.0)):
        median = float(np.median(np.r_[big, small]))  # wherever the small node's values are
        assert abs(value - median) <= half + 1e-9, (value, half, median)
    assert math.isnan(results[False][0])  # pooled, every threshold inside the small node's range is lost


def skewed_nodes(seed: int) -> list[Node]:
    """Like the demo's "mean area": two larger nodes and a small one with lower values and a long tail,
    fewer than 10 of them above the pooled 75% quantile, so it withholds every count up there."""
    rng = np.random.default_rng(seed)
    rules = {"m": 10, "fence": True, "spacing": 3}
    return [Node(rng.lognormal(6.6, 0.45, 280), 10.0, **rules), Node(rng.lognormal(6.5, 0.4, 180), 10.0, **rules),
            Node(rng.lognormal(6.0, 0.5, 100), 10.0, **rules)]


@pytest.mark.parametrize("seed", range(6))
def test_a_skewed_small_node_withholding_the_upper_tail_leaves_q75_bounded(seed):
    values = pooled(skewed_nodes(seed))
    small = skewed_nodes(seed)[2].values
    assert 0 < (small > np.quantile(values, 0.75)).sum() < 10  # the small node withholds there
    search, result, asked = drive(skewed_nodes(seed), [0.25, 0.5, 0.75])
    check_bounds(result, values)
    value, half = result[0.75]
    assert math.isfinite(value) and half <= 50, result  # five grid steps
    assert len(asked) == len(set(asked))
    _, pooled_result, _ = drive(skewed_nodes(seed), [0.25, 0.5, 0.75], per_node=False)
    check_bounds(pooled_result, values)
    assert math.isnan(pooled_result[0.75][0]) or pooled_result[0.75][1] >= 4 * half  # pooled counts lose it


def binary_nodes(seed: int, **rules: Any) -> list[Node]:
    rng = np.random.default_rng(seed)
    return [Node((rng.random(n) < p).astype(float), 0.01, **rules) for n, p in ((300, 0.6), (200, 0.55), (90, 0.7))]


@pytest.mark.parametrize("rules", [{}, {"spacing": 3}, {"m": 10, "fence": True, "spacing": 3}])
@pytest.mark.parametrize("seed", range(3))
def test_a_binary_column_comes_out_as_zero_one_or_between(seed, rules):
    values = pooled(binary_nodes(seed))
    zeros = int((values == 0).sum())
    between = (zeros - 0.5) / (values.size - 1)  # halfway from the last 0 to the first 1: 0.5
    levels = [0, 0.1, 0.25, 0.4, 0.5, between, 0.75, 0.9, 1]
    search, result, asked = drive(binary_nodes(seed, **rules), levels)
    check_bounds(result, values)
    extremes = [0, 1] if rules.get("m") else []  # min and max: withheld (fewer than 10 values beyond)
    for q in levels:
        value, half = result[q]
        if q in extremes:
            assert math.isnan(value), q
            continue
        assert value == float(np.quantile(values, q)), (q, value)  # exactly 0, 1 or 0.5
        assert half <= (0.07 if rules.get("m") else 0.01 * (1 + 1e-9)), (q, half)  # a step, or to the fence
    assert result[between][0] == 0.5 and result[0.5][0] == 1.0
    assert len(asked) == len(set(asked))


def test_the_demo_s_binary_column():
    """The demo's "target": 144/139, 60/120 and 8/98 zeros/ones. Each node withholds its count at 1
    (no value above) and below 0, the small one every count inside its fence (8 zeros): the 25%
    quantile is 0 and the 75% is 1, within the fence; the median is unknown, for all the counts say
    the small node's 106 values could all be 0, and then it is."""
    rules = {"m": 10, "fence": True, "spacing": 3}
    split = [(144, 139), (60, 120), (8, 98)]
    nodes = [Node(np.r_[np.zeros(z), np.ones(o)], 0.01, **rules) for z, o in split]
    search, result, _ = drive(nodes, [0.25, 0.5, 0.75])
    check_bounds(result, pooled(nodes))
    assert result[0.25][0] == 0.0 and result[0.75][0] == 1.0 and max(result[0.25][1], result[0.75][1]) <= 0.1
    assert math.isnan(result[0.5][0]) and result[0.5][1] == math.inf


@pytest.mark.parametrize("steps", [(0.01, 0.01, 0.01), (0.1, 0.1, 0.1), (0.1, 0.01, 0.001)])
@pytest.mark.parametrize("seed", range(3))
def test_small_integer_codes_come_out_on_their_values(seed, steps):
    rng = np.random.default_rng(seed)
    codes = [rng.choice(5, n, p=[0.1, 0.3, 0.3, 0.2, 0.1]).astype(float) for n in (200, 150, 60)]

    def nodes() -> list[Node]:
        return [Node(c, step, m=10, fence=True, spacing=3) for c, step in zip(codes, steps, strict=True)]

    values = pooled(nodes())
    search, result, asked = drive(nodes(), LEVELS)
    check_bounds(result, values)
    for q in (0.25, 0.5, 0.75):  # inside the codes: on the code itself, within a step
        value, half = result[q]
        assert value == float(np.quantile(values, q)) and half <= 0.1 * (1 + 1e-9), (q, result[q])
    assert math.isnan(result[0][0]) and math.isnan(result[1][0])
    assert len(asked) == len(set(asked))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_bounds_hold_with_ties_and_skewed_small_nodes(data):
    """Whatever the nodes hold and withhold, the stated bound contains numpy's pooled quantile, on
    either path (per node, or pooled counts), and no threshold is asked twice."""
    nodes = []
    for _ in range(data.draw(st.integers(1, 4))):
        n = data.draw(st.integers(1, 300))
        kind = data.draw(st.sampled_from(["binary", "codes", "skewed", "normal", "constant"]))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        if kind == "binary":
            values = (rng.random(n) < data.draw(st.floats(0, 1))).astype(float)
        elif kind == "codes":
            values = rng.integers(0, data.draw(st.integers(1, 8)), n).astype(float)
        elif kind == "skewed":
            values = rng.lognormal(data.draw(st.floats(0, 3)), data.draw(st.floats(0.1, 2)), n)
        elif kind == "normal":
            values = rng.normal(10, 3, n)
        else:
            values = np.full(n, data.draw(st.sampled_from([0.0, 1.0, 2.5])))
        nodes.append(Node(values, data.draw(st.sampled_from([None, 0.001, 0.01, 0.1, 1.0])),
                          m=data.draw(st.sampled_from([0, 3, 10])), fence=data.draw(st.booleans()),
                          spacing=data.draw(st.sampled_from([0, 3])),
                          allowance=data.draw(st.sampled_from([10**9, 60]))))
    levels = [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]
    search, result, asked = drive(nodes, levels, tell_grid=data.draw(st.booleans()), per_node=data.draw(st.booleans()))
    check_bounds(result, pooled(nodes))
    assert len(asked) == len(set(asked)) and search.rounds <= search.max_rounds


def test_update_nodes_checks_its_answers():
    s = QuantileSearch([0.5], 10, (0.0, 10.0))
    ts = s.next_thresholds() or []
    ok = NodeAnswer([0] * len(ts), None, 4)
    with pytest.raises(FedlabProtocolError, match="hold 9 values"):
        s.update_nodes({"a": ok, "b": NodeAnswer([0] * len(ts), None, 5)})
    with pytest.raises(FedlabProtocolError, match="counts for"):
        s.update_nodes({"a": ok, "b": NodeAnswer([0], None, 6)})
    with pytest.raises(FedlabProtocolError, match="within"):
        s.update_nodes({"a": ok, "b": NodeAnswer([7] * len(ts), None, 6)})
    with pytest.raises(FedlabProtocolError, match="decrease"):
        s.update_nodes({"a": ok, "b": NodeAnswer([6] + [0] * (len(ts) - 1), None, 6)})
    with pytest.raises(FedlabProtocolError, match="resolution"):
        s.update_nodes({"a": ok, "b": NodeAnswer([0] * len(ts), -1.0, 6)})
    assert s.rounds == 0  # refused answers leave no trace
    a, b = [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0, 9.5]
    fenced = [0 if t < 4.5 else 6 if t > 9.7 else None for t in ts]  # b answers outside its range only
    s.update_nodes({"a": NodeAnswer(counts_le(a, ts), None, 4), "b": NodeAnswer(fenced, 0.1, 6)})
    assert s.rounds == 1
    ts = s.next_thresholds() or []
    assert ts
    with pytest.raises(FedlabProtocolError, match="start a new search"):
        s.update_nodes({"a": NodeAnswer([None] * len(ts), None, 4)})
    with pytest.raises(FedlabProtocolError, match="holds 5 values"):
        s.update_nodes({"a": NodeAnswer([None] * len(ts), None, 5), "b": NodeAnswer([None] * len(ts), None, 5)})
    with pytest.raises(FedlabProtocolError, match="keep to update_nodes"):
        s.update([None] * len(ts))
    pooled_search = QuantileSearch([0.5], 10, (0.0, 10.0))
    pooled_search.update(counts_le(a + b, pooled_search.next_thresholds() or []))
    assert pooled_search.next_thresholds()
    with pytest.raises(FedlabProtocolError, match="keep to update\\(\\)"):
        pooled_search.update_nodes({"a": NodeAnswer([], None, 10)})


# -- the search's new arguments and pooling ---------------------------------------------------------


def test_update_takes_none_and_the_points_counted_at():
    s = QuantileSearch([0.5], 4, (0.0, 10.0))
    ts = s.next_thresholds()
    assert ts is not None
    with pytest.raises(FedlabProtocolError, match="counted points"):
        s.update([None] * len(ts), at=[1.0])
    with pytest.raises(FedlabProtocolError, match="NaN"):
        s.update([0] * len(ts), at=[math.nan] * len(ts))
    assert s.rounds == 0  # refused updates leave no trace
    s.update([None] * len(ts))
    assert s.rounds == 1 and s.finished and math.isnan(s.result()[0.5])


def test_resolution_and_min_tol_are_checked_and_only_grow():
    with pytest.raises(FedlabConfigError):
        QuantileSearch([0.5], 3, (0.0, 1.0), min_tol=-1.0)
    with pytest.raises(FedlabConfigError):
        QuantileSearch([0.5], 3, (0.0, 1.0), max_rounds=0)
    s = QuantileSearch([0.5], 3, (0.0, 1.0), resolution=0.01)
    with pytest.raises(FedlabConfigError):
        s.set_resolution(-0.1)
    s.set_resolution(0.001)
    s.set_resolution(None)
    s.set_resolution(0)
    assert (s.resolution, s.min_tol) == (0.01, 0.005)
    s.set_resolution(0.1)
    assert (s.resolution, s.min_tol) == (0.1, 0.05)
    assert all(snap(t, 0.1) == t for t in s.next_thresholds() or [])


def test_snap_keeps_round_numbers_and_nests_grids():
    assert snap(0.30000000000000004, 0.1) == 0.3 and snap(40.0, 1.0) == 40.0 and snap(44.0, 10.0) == 40.0
    assert snap(1.25, None) == 1.25 and snap(math.inf, 0.1) == math.inf and snap(-1.7e308, 0.01) == -1.7e308
    for m in range(-500, 500):  # a point on a coarse power-of-ten grid is on every finer one
        x = snap(m * 0.1, 0.1)
        assert snap(x, 0.01) == x and snap(x, 0.001) == x


def test_pool_counts_sums_and_withholds():
    counts, at = pool_counts([1.0, 2.04, 3.0], [([1, None, 3], 0.1), ([2, 2, 2], 0.01)])
    assert counts == [3, None, 5]
    assert at[0] == 1.0 and at[1] is None and at[2] == 3.0  # 2.04: one node counted at 2.0, the other at 2.04
    assert pool_counts([0.5], []) == ([0], [0.5])
    with pytest.raises(FedlabProtocolError):
        pool_counts([1.0], [([1, 2], None)])


@pytest.mark.parametrize(("lo", "hi", "bins"), [(17.3, 81.9, 10), (-0.0123, 0.0456, 7), (0.0, 1.0, 4),
                                                (123456.7, 123999.1, 25), (5.0, 5.0, 3), (-3.3, 2.2, 1)])
def test_nice_edges_lie_on_a_power_of_ten_grid(lo, hi, bins):
    edges = nice_edges(lo, hi, bins)
    assert len(edges) == bins + 1 and all(b > a for a, b in zip(edges, edges[1:], strict=False))
    assert edges[0] <= lo and edges[-1] >= hi
    width = (edges[-1] - edges[0]) / bins
    step = 10.0 ** math.floor(math.log10(max(hi - lo, 1.0 if hi == lo else 0.0) / bins / 10))
    for e in edges:
        assert snap(e, step) == e and snap(e, step / 10) == e  # finer node grids leave them be
    assert edges[0] > lo - 2 * width and edges[-1] < hi + 2 * width


def test_nice_edges_refuse_an_infinite_range():
    with pytest.raises(Exception, match="not finite"):
        nice_edges(-math.inf, 1.0, 3)


# -- the researcher's rounds against simulated nodes --------------------------------------------------


class SimulatedNode:
    """What fedlab's node sends back for numeric partials, with the rules above and the quantile levels
    rule: a node refuses a column's quantile thresholds when asked more levels than count // min_count."""

    def __init__(self, values: Any, *, step: float, m: int, allowance: int = 500, fence: bool = True) -> None:
        self.node = Node(values, step, m=m, fence=fence, spacing=3, allowance=allowance)
        self.m = m
        self.requests: list[dict[str, Any]] = []

    def reply(self, stats_args: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, Sequence[float]]) -> FAReply:
        self.requests.append({"stats_args": stats_args, "thresholds": thresholds})
        values = self.node.values
        n = int(values.size)
        mean = float(values.mean())
        refused: dict[str, str] = {}
        below = resolution = None
        args = stats_args.get("x", {})
        levels = args.get("quantiles", {}).get("levels") if "quantiles" in args else None
        if "x" in thresholds:
            if levels is not None and len(levels) > n // self.m:
                refused["x.quantiles"] = f"min_count: {len(levels)} quantile levels over {n} values"
            else:
                below, resolution = self.node.below(thresholds["x"])
                if None in below:
                    refused["x.thresholds"] = "min_count: fewer than 10 values would lie on one side"
        partial = NumericPartial(count=n, missing=0, sum=float(values.sum()), mean=mean,
                                 m2=float(((values - mean) ** 2).sum()), below=below, resolution=resolution)
        left = self.node.allowance - len(self.node.asked)
        return FAReply(dataset_id="d", n_rows=n, numeric={"x": partial}, refused=refused,
                       allowance={"x": left} if "x" in thresholds else {})


def fake_federation(monkeypatch: pytest.MonkeyPatch, nodes: Mapping[str, SimulatedNode]) -> FederatedDataset:
    class Job:
        def __init__(self, experiment_id, fa_id, fds, stats_args, stats, *, nodes: Sequence[str],
                     thresholds=None, **_: Any) -> None:
            self.nodes, self.stats_args, self.thresholds = list(nodes), stats_args, dict(thresholds or {})
            self.errors: dict[str, Any] = {}
            self.missing: dict[str, Any] = {}

        def execute(self) -> dict[str, FAReply]:
            return {n: sims[n].reply(self.stats_args, self.thresholds) for n in self.nodes}

    sims = dict(nodes)
    monkeypatch.setattr(fa_stats, "FARequestJob", Job)
    info = DatasetInfo(dataset_id="d", name="d", tags=["t"], data_type="csv", shape=[1, 1], columns=["x"],
                       dtypes={"x": "float64"})
    return FederatedDataset(dict.fromkeys(nodes, info))


def test_stats_sends_the_levels_learns_the_grid_in_round_one_and_reports_bounds(monkeypatch):
    rng = np.random.default_rng(11)
    nodes = {"a": SimulatedNode(rng.normal(50, 10, 300), step=0.1, m=10),
             "b": SimulatedNode(rng.normal(52, 12, 200), step=0.01, m=10)}
    fds = fake_federation(monkeypatch, nodes)
    result = federated_stats(fds, researcher_id="r", requests=None, node_names=NAMES,
                             stats=["count", "median", "quantiles"], quantiles=[0.1, 0.9])
    first = nodes["a"].requests[0]
    assert first["stats_args"]["x"]["quantiles"] == {"levels": [0.1, 0.5, 0.9]}
    assert first["thresholds"]["x"] == [fa_stats._PROBE]  # below every value: answered 0, no cut
    rounds = nodes["a"].requests[1:]
    assert rounds and all(r["stats_args"]["x"] == {"quantiles": {"levels": [0.1, 0.5, 0.9]}} for r in rounds)
    assert all(snap(t, 0.1) == t for r in rounds for t in r["thresholds"]["x"])  # on the coarsest grid
    values = np.concatenate([nodes["a"].node.values, nodes["b"].node.values])
    bounds = result.quantile_bounds()
    for q in (0.1, 0.5, 0.9):
        row = bounds.loc[("x", q)]
        assert abs(row["value"] - np.quantile(values, q)) <= row["half_width"] + 1e-9
        assert row["low"] <= np.quantile(values, q) <= row["high"] and row["nodes"] == 2
        assert row["resolution"] == 0.1
    frame = result.global_stats()
    assert frame.loc["x", "median"] == result.quantiles["x"][0.5]
    assert frame.attrs["approximate_quantiles"] == {c: qs for c, qs in result.quantile_approximate.items() if qs}
    allowance = result.allowance()
    assert list(allowance.index) == ["A", "B"] and list(allowance.columns) == ["x"]
    assert int(allowance.loc["A", "x"]) == 500 - len(nodes["a"].node.asked)
    if result.quantile_approximate["x"]:
        assert any("approximate" in line for line in result.notes())


def test_stats_bound_a_node_s_withheld_counts_by_its_own_answers(monkeypatch):
    """The researcher's rounds hand the search each node's answers with its count of values: a small
    skewed node withholding the upper tail leaves the 75% quantile bounded (with pooled counts it
    was NaN: every threshold up there had one node's count missing)."""
    rng = np.random.default_rng(14)
    nodes = {"a": SimulatedNode(rng.lognormal(6.6, 0.45, 280), step=10.0, m=10),
             "b": SimulatedNode(rng.lognormal(6.5, 0.4, 180), step=10.0, m=10),
             "small": SimulatedNode(rng.lognormal(6.0, 0.5, 100), step=10.0, m=10)}
    fds = fake_federation(monkeypatch, nodes)
    result = federated_stats(fds, researcher_id="r", requests=None, node_names=NAMES, stats=["count", "quantiles"])
    values = np.concatenate([s.node.values for s in nodes.values()])
    assert 0 < (nodes["small"].node.values > np.quantile(values, 0.75)).sum() < 10
    for q in (0.25, 0.5, 0.75):
        value, half = result.quantiles["x"][q], result.quantile_errors["x"][q]
        assert math.isfinite(value) and abs(value - np.quantile(values, q)) <= half + 1e-9, (q, value, half)
    assert result.quantile_errors["x"][0.75] <= 50


def test_a_node_refusing_the_quantile_levels_is_left_out_and_said_so(monkeypatch):
    rng = np.random.default_rng(12)
    nodes = {"a": SimulatedNode(rng.normal(0, 1, 400), step=0.01, m=10),
             "small": SimulatedNode(rng.normal(0, 1, 25), step=0.01, m=10)}  # 25 // 10 = 2 < 3 levels
    fds = fake_federation(monkeypatch, nodes)
    result = federated_stats(fds, researcher_id="r", requests=None, node_names=NAMES, stats=["count", "quantiles"],
                             quantiles=[0.25, 0.5, 0.75])
    assert result.quantile_nodes["x"] == ["a"] and set(result.quantile_refused["x"]) == {"small"}
    assert len(nodes["small"].requests) == 1  # asked in round 1 only
    assert result.numeric["x"].count == 425  # the moments are still over both
    values = nodes["a"].node.values
    for q, (value, half) in {q: (result.quantiles["x"][q], result.quantile_errors["x"][q])
                             for q in (0.25, 0.5, 0.75)}.items():
        assert abs(value - np.quantile(values, q)) <= half + 1e-9
    assert any("over 1 node only: SMALL refused them" in line for line in result.notes())


def test_every_node_refusing_gives_nan_quantiles_with_the_refusal_shown(monkeypatch):
    rng = np.random.default_rng(13)
    nodes = {"a": SimulatedNode(rng.normal(0, 1, 25), step=0.01, m=10),
             "b": SimulatedNode(rng.normal(0, 1, 15), step=0.01, m=10)}
    fds = fake_federation(monkeypatch, nodes)
    result = federated_stats(fds, researcher_id="r", requests=None, node_names=NAMES, stats=["count", "quantiles"],
                             quantiles=[0.25, 0.5, 0.75])
    assert all(math.isnan(v) for v in result.quantiles["x"].values())
    assert result.quantile_nodes["x"] == [] and set(result.quantile_refused["x"]) == {"a", "b"}
    assert any("quantiles of 'x' are NaN: every node holding values refused them" in line
               for line in result.notes())
    assert any("withheld x.quantiles" in line for line in result.notes())
    bounds = result.quantile_bounds()
    assert bounds["approximate"].all() and (bounds["half_width"] == math.inf).all()


# -- median imputation's own search -----------------------------------------------------------------


def fake_pipeline(monkeypatch: pytest.MonkeyPatch, nodes: Mapping[str, SimulatedNode]) -> Pipeline:
    def run(self: Pipeline, preproc_type: str, step: str, args: Mapping[str, Any]) -> dict[str, PreprocReply]:
        if step == "set":
            return {n: PreprocReply(state_id="state-1") for n in nodes}
        return {n: PreprocReply(state_id="state-1", partials=sim.reply(args.get("stats_args", {}),
                                                                       args.get("thresholds", {})))
                for n, sim in nodes.items()}

    monkeypatch.setattr(Pipeline, "_run", run)
    info = DatasetInfo(dataset_id="d", name="d", tags=["t"], data_type="csv", shape=[1, 1], columns=["x"],
                       dtypes={"x": "float64"})
    return Pipeline(FederatedDataset(dict.fromkeys(nodes, info)), researcher_id="r", requests=None,
                    node_names=NAMES)


def test_median_imputation_sends_the_level_and_stays_within_its_bound(monkeypatch):
    rng = np.random.default_rng(21)
    nodes = {"a": SimulatedNode(rng.normal(25, 4, 300), step=0.01, m=10),
             "b": SimulatedNode(rng.normal(26, 5, 200), step=0.01, m=10)}
    pipe = fake_pipeline(monkeypatch, nodes).impute(["x"], strategy="median")
    first = nodes["a"].requests[0]
    assert first["stats_args"]["x"]["quantiles"] == {"levels": [0.5]}
    assert first["thresholds"] == {"x": [fa_stats._PROBE]}
    rounds = nodes["a"].requests[1:]
    assert rounds and all(r["stats_args"] == {"x": {"quantiles": {"levels": [0.5]}}} for r in rounds)
    value = pipe.steps[-1]["values"]["x"]
    median = float(np.median(np.concatenate([s.node.values for s in nodes.values()])))
    (note,) = [n for n in pipe.notes if n.startswith("median of 'x'")]
    half = float(note.split("± ")[1].split(" ")[0])
    assert abs(value - median) <= half + 1e-9
    assert half <= 0.01 * (1 + 1e-9) or "withheld some counts" in note  # the grid, or the spacing of cuts


def test_median_imputation_bounds_what_a_node_withholds_by_its_own_answers(monkeypatch):
    rng = np.random.default_rng(22)
    nodes = {"a": SimulatedNode(rng.normal(0, 1, 300), step=0.01, m=10),
             "b": SimulatedNode(rng.normal(0, 1, 40), step=0.01, m=25)}  # withholds every count inside its range
    pipe = fake_pipeline(monkeypatch, nodes).impute(["x"], strategy="median")
    value = pipe.steps[-1]["values"]["x"]
    median = float(np.median(np.concatenate([s.node.values for s in nodes.values()])))
    (note,) = [n for n in pipe.notes if n.startswith("median of 'x'")]
    half = float(note.split("± ")[1].split(" ")[0])
    # b's 40 values lie anywhere in its range: a's counts alone bracket the median, within ~40 ranks
    assert abs(value - median) <= half + 1e-9 and half < 0.5 and "withheld some counts" in note


def test_median_imputation_refuses_when_the_median_cannot_be_located(monkeypatch):
    rng = np.random.default_rng(22)
    nodes = {"a": SimulatedNode(rng.normal(0, 1, 45), step=0.01, m=25),  # both withhold every count
             "b": SimulatedNode(rng.normal(0, 1, 40), step=0.01, m=25)}  # inside their ranges
    with pytest.raises(FedlabError, match="impute with the mean instead"):
        fake_pipeline(monkeypatch, nodes).impute(["x"], strategy="median")


def test_a_node_withholding_the_probe_is_no_refusal(monkeypatch):
    """A node that answers no threshold outside its values withholds round 1's probe too: that says
    nothing about what the researcher asked, and median imputation goes on."""
    rng = np.random.default_rng(23)
    nodes = {"a": SimulatedNode(rng.normal(10, 2, 300), step=0.01, m=10, fence=False),
             "b": SimulatedNode(rng.normal(11, 2, 200), step=0.01, m=10, fence=False)}
    probed = nodes["a"].reply({"x": {"quantiles": {"levels": [0.5]}}}, {"x": [fa_stats._PROBE]})
    assert probed.numeric["x"].below == [None] and "x.thresholds" in probed.refused
    fds = fake_federation(monkeypatch, nodes)
    result = federated_stats(fds, researcher_id="r", requests=None, node_names=NAMES, stats=["count", "median"])
    assert not math.isnan(result.quantiles["x"][0.5]) and result.quantile_nodes["x"] == ["a", "b"]
    reply = FAReply(dataset_id="d", n_rows=3, numeric={"x": NumericPartial(3, 0, 3.0, 1.0, 0.0, below=[None]),
                                                       "y": NumericPartial(3, 0, 3.0, 1.0, 0.0, below=[None])},
                    refused={"x.thresholds": "min_count", "y.thresholds": "min_count", "z": "excluded"})
    kept = fa_stats._without_probe({"a": reply}, {"x": [fa_stats._PROBE], "y": [fa_stats._PROBE]},
                                   {"x": {"count": {}}, "y": {"histogram": {"edges": [0, 1]}}})["a"]
    assert kept.refused == {"y.thresholds": "min_count", "z": "excluded"}  # y's may be about its edges
    assert kept.numeric["x"].below is None and kept.numeric["y"].below is None
    pipe = fake_pipeline(monkeypatch, {n: SimulatedNode(s.node.values, step=0.01, m=10, fence=False)
                                       for n, s in nodes.items()}).impute(["x"], strategy="median")
    assert not math.isnan(pipe.steps[-1]["values"]["x"])
