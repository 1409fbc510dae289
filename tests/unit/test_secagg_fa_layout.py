"""Secure analytics layout: real node replies (the node's own handler and rules, no sockets) over three
nodes, their skeletons, the common layout, each node's vector, the exact element-wise sum (what the masks
leave), the rebuilt replies and the plain merge of them, against pooled pandas and the plain merge."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.analytics.merge import merge_categorical, merge_covariance, merge_crosstab, merge_numeric
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.analytics.partials import numeric_partial
from fedlab.errors import FedlabSecaggError
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.secagg.fa_layout import (
    MAX_SLOTS,
    SECURE_SUM,
    FALayout,
    check_secure_request,
    layout_of,
    skeleton,
    vectorize,
)
from fedlab.secagg.fa_rebuild import rebuild, rebuild_replies
from fedlab.secagg.fixed_point import decode_exact_sum, encode_exact

EDGES = [999990.0, 999998.0, 999999.0, 1000000.0, 1000001.0, 1000002.0, 1000010.0]
ARGS: dict[str, dict[str, dict[str, Any]]] = {
    "x": {"count": {}, "mean": {}, "var": {}, "histogram": {"edges": EDGES}},
    "y": {"mean": {}, "var": {}},
    "z": {"mean": {}},
    "k": {"mean": {}},
    "secret": {"mean": {}},
    "ward": {"value_counts": {}},
    "grp": {"value_counts": {}},
}
STATS = sorted({s for per in ARGS.values() for s in per} | {"cov", "corr", "crosstab"})
NUMERIC = ["x", "y", "z", "k"]  # "secret" is excluded on every node
REL = 1e-12


def _frame(n: int, wards: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = 1e6 + rng.normal(0, 1, n)
    return pd.DataFrame({
        "x": x,
        "y": 2 * (x - 1e6) + rng.normal(0, 0.5, n) + 50,
        "z": rng.uniform(0, 10, n),
        "k": 0.1,
        "secret": rng.normal(0, 1, n),
        "ward": rng.choice(wards, n),
        "grp": rng.choice(["f", "m", "u"], n),
    })


def _frames() -> dict[str, pd.DataFrame]:
    frames = {"node-a": _frame(400, ["a", "b", "c"], 1), "node-b": _frame(300, ["a", "b", "d"], 2),
              "node-c": _frame(350, ["a", "c", "e"], 3)}
    frames["node-a"].loc[:14, "x"] = np.nan  # missing values (15: no small subset for the covariance rules)
    frames["node-b"].loc[0, "ward"] = "r"  # a level too rare to name: b withholds it (and one more) unnamed
    c = frames["node-c"]
    small = c.index[(c.ward == "e") & (c.grp == "m")]
    c.loc[small[2:], "grp"] = "u"  # a crosstab cell of 2 on c: suppressed (None), with its secondaries
    return frames


class Nodes:
    """Three real nodes: each its own directory, registry, rules and handler."""

    def __init__(self, root: Any) -> None:
        self.frames = _frames()
        self.handlers: dict[str, AnalyticsHandler] = {}
        self.datasets: dict[str, str] = {}
        for name, frame in self.frames.items():
            config = init_node_dir(root / name, name)
            registry = DatasetRegistry(config.db_path)
            path = root / f"{name}.csv"
            frame.to_csv(path, index=False)
            self.datasets[name] = registry.add("d", ["t"], "csv", path).dataset_id
            excluded = ("secret", "z") if name == "node-b" else ("secret",)
            self.handlers[name] = AnalyticsHandler(registry, DisclosureRules(excluded_columns=excluded),
                                                   node_id=config.node_id)

    def ask(self) -> dict[str, FAReply]:
        return {n: h(FARequest(dataset_id=self.datasets[n], stats=STATS, stats_args=ARGS, crosstab=["ward", "grp"]))
                for n, h in self.handlers.items()}

    def pooled(self) -> pd.DataFrame:
        """The rows the figures are over: b's z is refused, so its rows hold no z."""
        parts = [f.assign(z=np.nan) if n == "node-b" else f for n, f in self.frames.items()]
        return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    return Nodes(tmp_path_factory.mktemp("secagg-fa"))


def _secure(nodes: Nodes) -> tuple[FALayout, list[Fraction], dict[str, FAReply], dict[str, FAReply]]:
    """Both phases as the nodes answer them: skeletons, the layout (over the wire), vectors, exact sums."""
    skeletons = {n: skeleton(r) for n, r in nodes.ask().items()}
    wire = msgspec.msgpack.encode(layout_of(skeletons))
    layout = msgspec.msgpack.decode(wire, type=FALayout)
    plain = nodes.ask()  # the masked phase asks again
    vectors = [vectorize(r, layout) for r in plain.values()]
    assert all(len(v) == layout.size for v in vectors)
    sums = [sum((Fraction(v) for v in column), Fraction(0)) for column in zip(*vectors, strict=True)]
    return layout, sums, skeletons, plain


def _merge(replies: Mapping[str, FAReply], *, covariance: bool = True) -> dict[str, Any]:
    """What fa_stats does with the replies of a round (the plain merge cannot pool covariances over
    different columns: b refused z)."""
    out: dict[str, Any] = {}
    for column in ARGS:
        numeric = {n: r.numeric[column] for n, r in replies.items() if column in r.numeric}
        if numeric:
            out[column] = merge_numeric(numeric)
        categorical = {n: r.categorical[column] for n, r in replies.items() if column in r.categorical}
        if categorical:
            out[f"{column}:cat"] = merge_categorical(categorical)
    out["crosstab"] = merge_crosstab({n: r.crosstab for n, r in replies.items() if r.crosstab is not None})
    if covariance:
        out["cov"], out["corr"] = merge_covariance(
            {n: r.covariance for n, r in replies.items() if r.covariance is not None})
    return out


def _close(ours: float, expected: float, rel: float = REL) -> bool:
    return math.isclose(ours, expected, rel_tol=rel, abs_tol=0.0)


def _rel(column: str) -> float:
    """x is 1e6 + N(0, 1): a node's partial carries its mean as a float64, off by up to half an ulp of 1e6
    (6e-11), which moves the pooled M2 by up to ~n_k * ulp * |mean_k - mean| (~3e-12 relative here) in the
    plain merge and here alike (the sum rebuilds exactly the plain merge's figure, see below); the other
    columns are held to 1e-12."""
    return 1e-11 if column == "x" else REL


def _check_moments(merged: Mapping[str, Any], pooled: pd.DataFrame) -> None:
    for column in NUMERIC:
        series, m = pooled[column].dropna(), merged[column]
        assert (m.count, m.missing) == (len(series), int(pooled[column].isna().sum()) if column != "z" else 0)
        assert _close(m.sum, math.fsum(series)) and _close(m.mean, math.fsum(series) / len(series))
        if column == "k":  # constant: exactly no spread (pandas leaves rounding noise here)
            assert m.var == 0.0 and m.std == 0.0
        else:
            assert _close(m.var, series.var(), _rel(column)) and _close(m.std, series.std(), _rel(column)), column
    assert merged["x"].missing == 15
    assert "secret" not in merged


def _check_covariance(cov: pd.DataFrame, corr: pd.DataFrame, pooled: pd.DataFrame) -> None:
    assert list(cov.index) == NUMERIC
    for a, b in itertools.product(NUMERIC, NUMERIC):
        both = pooled[list(dict.fromkeys([a, b]))].dropna()
        if "k" in (a, b):  # no spread: cov 0, corr NaN (but k with itself: var 0)
            assert cov.loc[a, b] == 0.0 and math.isnan(corr.loc[a, b])
            continue
        rel = max(_rel(a), _rel(b))
        if a == b:
            assert _close(cov.loc[a, a], pooled[a].dropna().var(), rel) and corr.loc[a, a] == 1.0
            continue
        # a co-moment near 0 (independent columns) has no relative precision of its own: its scale is
        # sqrt(var_a * var_b), as for the correlation
        expected = np.cov(both[a].to_numpy(), both[b].to_numpy())  # two-pass, no NaN
        scale = math.sqrt(expected[0, 0] * expected[1, 1])
        assert abs(cov.loc[a, b] - expected[0, 1]) <= rel * scale, (a, b, cov.loc[a, b], expected[0, 1])
        assert abs(corr.loc[a, b] - both[a].corr(both[b])) <= rel, (a, b)


def test_secure_sum_rebuilt_merges_to_the_pooled_statistics(nodes: Nodes) -> None:
    layout, sums, skeletons, _ = _secure(nodes)
    reply = rebuild(layout, sums, skeletons)
    merged = _merge({SECURE_SUM: reply})
    pooled = nodes.pooled()
    assert reply.n_rows == len(pooled)
    _check_moments(merged, pooled)
    _check_covariance(merged["cov"], merged["corr"], pooled)
    # refusals: the union, keyed as the nodes key them, each reason with its node
    assert set(reply.refused["secret"].split("; ")) == {
        f"node-{n}: excluded by the node's operator (disclosure.excluded_columns), or made from such a column"
        for n in "abc"}
    assert reply.refused["z"].startswith("node-b: excluded") and "secret" not in reply.numeric
    assert reply.allowance == {"x": min(s.allowance["x"] for s in skeletons.values())}


def test_rebuild_alone_shows_every_cell_any_node_withheld_as_withheld(nodes: Nodes) -> None:
    layout, sums, skeletons, plain = _secure(nodes)
    merged = _merge({SECURE_SUM: rebuild(layout, sums, skeletons)})
    pooled = nodes.pooled()
    # histogram: a bin is exact where every node gave it, else withheld by "the nodes together"
    hist, counts = merged["x"], np.histogram(pooled["x"].dropna(), bins=EDGES)[0].tolist()
    withheld = {b for r in plain.values() for b, v in enumerate(r.numeric["x"].histogram or []) if v is None}
    assert withheld and len(withheld) < len(EDGES) - 1
    assert hist.histogram_suppressed == {b: [SECURE_SUM] for b in sorted(withheld)}
    assert all(hist.histogram[b] == counts[b] for b in range(len(counts)) if b not in withheld)
    # value counts: b withheld two levels unnamed (r, too rare, and a, the next smallest), so every level
    # it did not name may be one of them: a, c and e are unknown; b and d, which it named, are exact
    ward = merged["ward:cat"]
    assert plain["node-b"].categorical["ward"].suppressed_levels == 2
    truth = pooled["ward"].value_counts().to_dict()
    assert ward.value_counts == {v: truth[v] for v in ("b", "d")}
    assert ward.suppressed == {v: [SECURE_SUM] for v in ("a", "c", "e")}
    assert ward.withheld_levels == {SECURE_SUM: 2} and (ward.count, ward.missing) == (len(pooled), 0)
    assert merged["grp:cat"].value_counts == pooled["grp"].value_counts().to_dict()
    # crosstab: the cells c suppressed are withheld; the others are what the plain merge shows (which, like
    # the node, leaves out the rows of levels a node withheld unnamed: b's a is in no table, so row a is
    # over a and c only, without a mark, in the clear as here)
    table, clear = merged["crosstab"], _merge(plain, covariance=False)["crosstab"]
    own = plain["node-c"].crosstab
    assert own is not None
    hidden = {(r, c) for r, line in own.cells.items() for c, n in line.items() if n is None}
    assert hidden and set(table.suppressed) == hidden and set(clear.suppressed) == hidden
    assert table.table.shape == clear.table.shape
    for r, c in itertools.product(table.table.index, table.table.columns):
        if (r, c) not in hidden:
            assert table.table.loc[r, c] == clear.table.loc[r, c], (r, c)
    full = pd.crosstab(pooled["ward"], pooled["grp"])
    assert (table.table.loc["d"] == full.loc["d"]).all()  # d is only on b, which names it


def test_rebuilt_replies_merge_exactly_like_the_plain_replies(nodes: Nodes) -> None:
    layout, sums, skeletons, plain = _secure(nodes)
    replies = rebuild_replies(layout, sums, skeletons)
    assert set(replies) == {SECURE_SUM, *plain}
    ours, theirs = _merge(replies), _merge(plain, covariance=False)
    for column in ("ward:cat", "grp:cat"):
        assert ours[column] == theirs[column]  # counts, who withheld what, withheld level counts
    for column in NUMERIC:
        a, b = ours[column], theirs[column]
        assert (a.count, a.missing, a.histogram, a.histogram_suppressed) == (
            b.count, b.missing, b.histogram, b.histogram_suppressed)
        # the same pooled figures as the plain merge (which uses fsum and float64 where we are exact)
        assert _close(a.sum, b.sum, 1e-15) and _close(a.mean, b.mean, 1e-15)
        assert a.var == b.var == 0.0 if column == "k" else _close(a.var, b.var, 1e-14), column
    pd.testing.assert_frame_equal(ours["crosstab"].table, theirs["crosstab"].table)
    assert ours["crosstab"].suppressed == theirs["crosstab"].suppressed
    pooled = nodes.pooled()
    _check_moments(ours, pooled)
    _check_covariance(ours["cov"], ours["corr"], pooled)


def test_the_real_fixed_point_encoding_gives_the_same_figures(nodes: Nodes) -> None:
    layout, exact, skeletons, plain = _secure(nodes)
    total = np.asarray(np.sum([encode_exact(vectorize(r, layout)) for r in plain.values()], axis=0, dtype=np.uint64))
    sums = decode_exact_sum(total, layout.size)
    merged = _merge({SECURE_SUM: rebuild(layout, sums, skeletons)})
    pooled = nodes.pooled()
    _check_moments(merged, pooled)  # the constant column's M2 is 0 after rounding to 2**-64, too
    _check_covariance(merged["cov"], merged["corr"], pooled)
    # every slot within the encoding's rounding (half of 2**-64 per node) of the exact sum, counts exact
    assert all(abs(s - e) <= Fraction(len(plain), 1 << 65) for s, e in zip(sums, exact, strict=True))
    assert sums[:2] == exact[:2] and any(s != e for s, e in zip(sums, exact, strict=True))


def test_layout_is_the_same_whatever_order_the_skeletons_come_in(nodes: Nodes) -> None:
    skeletons = {n: skeleton(r) for n, r in nodes.ask().items()}
    layouts = {msgspec.msgpack.encode(layout_of(dict(order))) for order in itertools.permutations(skeletons.items())}
    assert len(layouts) == 1
    layout = layout_of(skeletons)
    assert layout.numeric == ["k", "x", "y", "z"] and layout.covariance == ["x", "y", "z", "k"]
    assert layout.categorical["ward"] == ["a", "b", "c", "d", "e"] and layout.histograms == {"x": EDGES}
    assert layout.crosstab == ["ward", "grp"]


def _figures(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every non-zero number in ``value`` (to_builtins output), but the edges, allowances and the count
    of withheld levels, which are no figure of the data (a plain reply shows them the same)."""
    if isinstance(value, dict):
        return [f for k, v in value.items() if k not in ("histogram_edges", "allowance", "suppressed_levels")
                for f in _figures(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in _figures(v, f"{path}[{i}]")]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    return [] if value == 0 else [(path, value)]


def test_skeletons_hold_no_figure_but_keep_the_marks(nodes: Nodes) -> None:
    for name, reply in nodes.ask().items():
        bare = skeleton(reply)
        assert _figures(msgspec.to_builtins(reply))  # the plain reply has figures...
        assert _figures(msgspec.to_builtins(bare)) == [], name  # ...its skeleton none
        assert bare.refused == reply.refused and bare.allowance == reply.allowance
        for column, p in reply.numeric.items():
            q = bare.numeric[column]
            assert (q.min, q.max, q.below, q.below_at, q.resolution) == (None,) * 5
            assert q.histogram_edges == p.histogram_edges
            assert [v is None for v in q.histogram or []] == [v is None for v in p.histogram or []]
        assert {c: p.value_counts.keys() for c, p in bare.categorical.items()} == {
            c: p.value_counts.keys() for c, p in reply.categorical.items()}
        if reply.crosstab is not None:
            assert bare.crosstab is not None
            assert {r: {c: v is None for c, v in line.items()} for r, line in bare.crosstab.cells.items()} == {
                r: {c: v is None for c, v in line.items()} for r, line in reply.crosstab.cells.items()}


def test_a_layout_a_node_cannot_match_gives_zeros(nodes: Nodes) -> None:
    reply = nodes.ask()["node-b"]
    layout = FALayout(numeric=["z", "nope"], histograms={"z": [0.0, 5.0, 10.0]},
                      categorical={"nope": ["a"], "ward": ["zz"]}, crosstab=["grp", "ward"], cells={"f": ["a"]},
                      covariance=["nope", "z"])
    vector = vectorize(reply, layout)
    assert len(vector) == layout.size and vector[0] == reply.n_rows
    assert vector[1] == 1  # it answers one of those: ward's count and missing, not its level "zz"
    cat = 2 + 2 * 6 + 2 + 3  # head, numeric z and nope, z's 2 bins, nope's count, missing and "a"
    assert vector[cat:cat + 3] == [300, 0, 0]
    assert all(v == 0 for i, v in enumerate(vector[2:], 2) if i not in (cat, cat + 1))
    # and a histogram over other edges than the node's
    other = FALayout(numeric=["x"], histograms={"x": [0.0, 1.0]})
    assert vectorize(reply, other)[2 + 6:] == [0]


def test_what_cannot_be_summed_is_refused_before_anything_is_asked() -> None:
    ok = FARequest(dataset_id="d", stats=STATS, stats_args=ARGS, crosstab=["ward", "grp"])
    check_secure_request(ok)
    for stat in ("min", "max", "median", "quantiles"):
        with pytest.raises(FedlabSecaggError, match=f"{stat}: not available with secure aggregation yet.*"
                                                    "without secagg=True, or drop"):
            check_secure_request(FARequest(dataset_id="d", stats=["mean"], stats_args={"x": {stat: {}}}))
    with pytest.raises(FedlabSecaggError, match="^min: not available"):
        check_secure_request(FARequest(dataset_id="d", stats=["min", "mean"]))
    with pytest.raises(FedlabSecaggError, match="^quantile thresholds: not available"):
        check_secure_request(FARequest(dataset_id="d", stats=["count"], thresholds={"x": [1.0]}))
    for request in (FARequest(dataset_id="d", stats=["histogram"]),
                    FARequest(dataset_id="d", stats=["histogram"], stats_args={"x": {"histogram": {"bins": 10}}})):
        with pytest.raises(FedlabSecaggError, match="without edges.*pass the edges"):
            check_secure_request(request)


def test_nodes_that_disagree_on_edges_or_tables_are_named() -> None:
    a = FAReply(dataset_id="d", n_rows=20, numeric={"x": numeric_partial(pd.Series(np.arange(20.0)),
                                                                          histogram_edges=[0, 10, 20])})
    b = FAReply(dataset_id="d", n_rows=20, numeric={"x": numeric_partial(pd.Series(np.arange(20.0)),
                                                                          histogram_edges=[0, 10, 21])})
    with pytest.raises(FedlabSecaggError, match="histogram of 'x' with different edges.*'b'"):
        layout_of({"a": skeleton(a), "b": skeleton(b)})


def test_an_answer_that_changed_since_its_skeleton_is_caught(nodes: Nodes) -> None:
    layout, sums, skeletons, plain = _secure(nodes)
    changed = dict(skeletons)
    c = plain["node-c"].numeric["x"]
    assert c.histogram is not None and None not in c.histogram[2:4]
    edited = msgspec.structs.replace(c, histogram=[*c.histogram[:2], None, *c.histogram[3:]])
    changed["node-c"] = skeleton(msgspec.structs.replace(plain["node-c"], numeric={
        **plain["node-c"].numeric, "x": edited}))
    with pytest.raises(FedlabSecaggError, match="changed between the two requests"):
        rebuild(layout, sums, changed)
    with pytest.raises(FedlabSecaggError, match="holds 3 values"):
        rebuild(layout, sums[:3], skeletons)
    with pytest.raises(FedlabSecaggError, match="not a count"):
        rebuild(layout, [sums[0] + Fraction(1, 2), *sums[1:]], skeletons)


def test_layouts_from_the_wire_are_checked() -> None:
    bad = msgspec.msgpack.encode({"numeric": ["x"], "histograms": {"x": [1.0]}})
    with pytest.raises(msgspec.ValidationError, match="at least 2 edges"):
        msgspec.msgpack.decode(bad, type=FALayout)
    huge = msgspec.msgpack.encode({"covariance": [f"c{i}" for i in range(1000)]})
    with pytest.raises(msgspec.ValidationError, match=f"more than the {MAX_SLOTS}"):
        msgspec.msgpack.decode(huge, type=FALayout)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"extra": 1}), type=FALayout)


def test_an_infinite_figure_is_refused_naming_the_column() -> None:
    reply = FAReply(dataset_id="d", n_rows=3, numeric={"x": numeric_partial(pd.Series([1.0, math.inf, 2.0]))})
    with pytest.raises(FedlabSecaggError, match="column 'x' has an infinite or NaN figure"):
        vectorize(reply, FALayout(numeric=["x"]))
