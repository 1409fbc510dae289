"""Red team, rules 2, 4 and 5: levels, groups and tables.

Value counts never name a suppressed level (on the source, on derived datasets, on derived
datasets of derived datasets); id-like and many-level columns are refused for value counts,
crosstabs and one-hot encoding; the moments of a binary column with two ones, and covariances
with it or with small one-hot groups, are refused; a level suppressed in value counts has its
whole crosstab row suppressed in every table. The positive controls at the end show the
harness sees real answers where the rules allow them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from redteam_harness import CELL_THRESHOLD, MID_CODE, MIN_COUNT, RARE_CODE, public

from fedlab import FedlabError

pytestmark = pytest.mark.integration


def refusals_for(reply, prefix: str) -> dict[str, str]:
    return {k: v for k, v in reply.refused.items() if k == prefix or k.startswith(prefix + ".")}


def names_rule(text: str, *rules: str) -> bool:
    return any(rule in text for rule in rules)


def check_value_counts(result, frames: dict[str, object], where: str) -> None:
    """No node's raw reply names a suppressed level; suppressed_levels says how many it hid."""
    assert result.replies, f"harness: no node answered the value counts on {where}"
    for node_id, reply in result.replies.items():
        part = reply.categorical.get("dx")
        assert part is not None, f"harness: {node_id} sent no value counts of dx on {where}: {reply.refused}"
        counts = part.value_counts
        assert RARE_CODE not in counts, f"{where}: {node_id} named the rare code: {counts}"
        named_none = [k for k, v in counts.items() if v is None and k != "<missing>"]
        assert not named_none, f"{where}: {node_id} named suppressed levels {named_none}: {counts}"
        levels = set(frames[node_id]["dx"].astype(str))
        hidden = levels - set(counts)
        assert part.suppressed_levels == len(hidden), (
            f"{where}: suppressed_levels = {part.suppressed_levels}, but {len(hidden)} levels were left out")
    merged = result.value_counts("dx")
    assert RARE_CODE not in set(merged["value"]), f"{where}: the merged value counts name the rare code"


@pytest.mark.timeout(600)
def test_value_counts_never_name_a_suppressed_level(nodes, api):
    """Attack: value counts of dx, on the source, with dropna=False, on a derived dataset and on a
    derived dataset of that. Rule: 'RARE' (one patient) is never a key of any node's reply."""
    made = nodes(2)
    frames = {n.node_id: n.frame for n in made}
    r = api(2)
    fds = r.search(["cohort"])
    check_value_counts(public(r.stats, fds, ["value_counts"], columns=["dx"]), frames, "the source")
    check_value_counts(public(r.stats, fds, [], stats_args={"dx": {"value_counts": {"dropna": False}}}),
                       frames, "the source, dropna=False")
    d1 = public(r.preprocess(fds).standardize(["age"]).apply, name="rt-d1", tags=["rt-d1"])
    check_value_counts(public(r.stats, d1, ["value_counts"], columns=["dx"]), frames, "a derived dataset")
    d2 = public(r.preprocess(d1).standardize(["income"]).apply, name="rt-d2", tags=["rt-d2"])
    check_value_counts(public(r.stats, d2, ["value_counts"], columns=["dx"]), frames, "a derived-of-derived dataset")


def test_id_like_and_many_level_columns_are_refused_for_levels(nodes, api):
    """Attack: value counts and a crosstab of hosp_code (40 levels in 40 rows: an identifier) and
    income (40 distinct floats), and one-hot encoding hosp_code. Rule: refused, naming
    disclosure.levels_max or disclosure.levels_density; no level is listed."""
    nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    result = public(r.stats, fds, ["value_counts"], columns=["hosp_code", "income"])
    for _node_id, reply in result.replies.items():
        for column in ("hosp_code", "income"):
            part = reply.categorical.get(column)
            assert part is None or not part.value_counts, f"{column}: {len(part.value_counts)} levels listed"
            why = "; ".join(refusals_for(reply, column).values())
            assert names_rule(why, "levels_max", "levels_density"), f"{column} not refused by a levels rule: {why!r}"
    for pair in (["hosp_code", "smoker"], ["smoker", "income"]):
        table = public(r.stats, fds, ["crosstab"], crosstab=pair)
        for _node_id, reply in table.replies.items():
            assert reply.crosstab is None, f"crosstab {pair} was sent: {len(reply.crosstab.cells)} rows"
            why = reply.refused.get("crosstab", "")
            assert names_rule(why, "levels_max", "levels_density"), f"crosstab {pair} refusal: {why!r}"
    try:
        pipe = public(r.preprocess(fds).onehot, ["hosp_code"])
        why = "; ".join(pipe.dropped.values())
        assert pipe.dropped, f"one-hot encoding hosp_code went through: {pipe.steps}"
    except FedlabError as exc:
        why = str(exc)
    assert names_rule(why, "levels_max", "levels_density"), f"one-hot of hosp_code: {why!r}"


def _rows_by(table, column: str) -> dict[str, dict[str, int | None]]:
    """The crosstab's cells as {value of ``column``: {other value: count}}, whichever side it is."""
    if table.rows == column:
        return {k: dict(v) for k, v in table.cells.items()}
    out: dict[str, dict[str, int | None]] = {}
    for other, line in table.cells.items():
        for value, n in line.items():
            out.setdefault(value, {})[other] = n
    return out


def test_crosstab_rows_of_suppressed_levels_are_wholly_suppressed(nodes, api):
    """Attack: value counts of dx, sex and smoker, then crosstabs dx x sex, dx x smoker and their
    transposes: a suppressed level's row total, or a single suppressed cell next to a disclosed
    total, gives the small count away. Rule: a level suppressed in dx's value counts has its whole
    row suppressed (and unnamed) in every table, and no row or column with a disclosed total holds
    exactly one suppressed cell."""
    (node,) = nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    vc = public(r.stats, fds, ["value_counts"], columns=["dx", "sex", "smoker"]).replies[node.node_id]
    totals = {c: {k: v for k, v in vc.categorical[c].value_counts.items() if v is not None} for c in vc.categorical}
    assert "dx" in totals and totals["dx"], f"harness: no value counts of dx: {vc.refused}"
    hidden = set(node.frame["dx"]) - set(totals["dx"])
    assert RARE_CODE in hidden, f"the rare code's count was disclosed: {totals['dx']}"
    answered = 0
    for pair in (["dx", "sex"], ["dx", "smoker"], ["sex", "dx"], ["smoker", "dx"]):
        reply = public(r.stats, fds, ["crosstab"], crosstab=pair).replies[node.node_id]
        if reply.crosstab is None:
            continue  # refused whole: nothing to learn
        answered += 1
        other = pair[1] if pair[0] == "dx" else pair[0]
        by_dx = _rows_by(reply.crosstab, "dx")
        for level in hidden:
            assert level not in by_dx or all(v is None for v in by_dx[level].values()), (
                f"crosstab {pair}: the row of suppressed level {level} is {by_dx[level]}")
            assert level not in by_dx, f"crosstab {pair} names the suppressed level {level}"
        by_other = _rows_by(reply.crosstab, other)
        for lines, known in ((by_dx, totals["dx"]), (by_other, totals.get(other, {}))):
            for value, line in lines.items():
                if value in known and sum(1 for v in line.values() if v is None) == 1:
                    rest = sum(v for v in line.values() if v is not None)
                    assert not 0 < known[value] - rest < CELL_THRESHOLD, (
                        f"crosstab {pair}: {value} has one suppressed cell = {known[value]} - {rest}")
    assert answered, "harness: every crosstab was refused, the test saw no table"


def test_moments_of_a_binary_with_two_ones_are_refused(nodes, api):
    """Attack: count, sum, mean, var and std of sex (0/1 with two ones): the mean is the
    suppressed count / n. Rule: the moments are refused (group_levels / cell_threshold)."""
    nodes(1)
    r = api(1)
    result = public(r.stats, r.search(["cohort"]), ["count", "sum", "mean", "var", "std"], columns=["sex"])
    for _node_id, reply in result.replies.items():
        part = reply.numeric.get("sex")
        assert part is None, f"the moments of sex came back: sum {part.sum}, mean {part.mean}"
        why = "; ".join(refusals_for(reply, "sex").values())
        assert names_rule(why, "group_levels", "cell_threshold"), f"sex refused for another reason: {why!r}"
    mean = result.global_stats().get("mean")
    assert mean is None or "sex" not in mean.index or math.isnan(mean["sex"])


def test_covariance_with_a_small_group_binary_is_refused(nodes, api):
    """Attack (beyond the spec's list): a covariance partial carries each pair's means, so
    cov(sex, age) sends the mean of sex (the suppressed count) and the co-moment of the two
    patients' ages. Rule: no covariance involving sex is sent (refused, or sex left out), and the
    refusal names group_levels or min_count."""
    nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    for stat in ("cov", "corr"):
        result = public(r.stats, fds, [stat], columns=["sex", "age"])
        for _node_id, reply in result.replies.items():
            cov = reply.covariance
            assert cov is None or "sex" not in cov.columns, f"{stat} with sex was sent: {cov}"
            why = "; ".join([reply.refused.get("cov", ""), *refusals_for(reply, "sex").values()])
            assert names_rule(why, "group_levels", "min_count"), f"{stat} refusal: {why!r}"


@pytest.mark.timeout(300)
def test_public_onehot_then_covariance_of_small_groups_is_refused(nodes, api):
    """Attack: one-hot encode dx through the public pipeline, then a covariance of every indicator
    with age: the <other> group holds the 4 patients of MID and RARE, whose mean age it gives.
    Rule: a covariance with an indicator of a group smaller than min_count is refused."""
    (node,) = nodes(1)
    r = api(1)
    derived = public(r.preprocess(r.search(["cohort"])).onehot(["dx"]).apply, name="rt-oh", tags=["rt-oh"])
    columns = [c for c in derived.dataset(node.node_id).columns if c.startswith("dx=")]
    assert columns, "harness: the derived dataset has no indicator columns"
    oracle = node.derived_csv(derived.dataset(node.node_id).dataset_id)
    small = [c for c in columns if 0 < oracle[c].sum() < MIN_COUNT or 0 < len(oracle) - oracle[c].sum() < MIN_COUNT]
    assert small, f"harness: no indicator of a small group among {columns}"
    for stat in ("cov", "corr"):
        for cols in (columns + ["age"], [small[0], "age"]):
            result = public(r.stats, derived, [stat], columns=cols)
            for _node_id, reply in result.replies.items():
                cov = reply.covariance
                sent = set(small) & set(cov.columns) if cov is not None else set()
                assert not sent, f"{stat} over {cols} was sent with the small-group indicators {sorted(sent)}"
                why = "; ".join([reply.refused.get("cov", ""), reply.refused.get("corr", ""),
                                 *(v for k, v in reply.refused.items() if k.startswith("dx="))])
                assert names_rule(why, "group_levels", "min_count"), f"{stat} over {cols}: {why!r}"


@pytest.mark.timeout(300)
def test_positive_controls_the_harness_sees_real_answers(nodes, api):
    """Not an attack: what the rules allow must come back exactly, so that the refusals the other
    tests see are the rules at work, not a broken harness (or a node that refuses everything)."""
    (node,) = nodes(1)
    frame = node.frame
    r = api(1)
    fds = r.search(["cohort"])
    result = public(r.stats, fds, ["count", "mean", "std"], columns=["age", "income"])
    table = result.global_stats()
    assert table.loc["age", "count"] == 40 and math.isclose(table.loc["age", "mean"], frame["age"].mean())
    assert math.isclose(table.loc["income", "std"], frame["income"].std(), rel_tol=1e-9)
    vc = public(r.stats, fds, ["value_counts"], columns=["dx"]).replies[node.node_id].categorical["dx"].value_counts
    assert {k: v for k, v in vc.items() if k in ("A", "B", "C")} == {"A": 14, "B": 12, "C": 10}
    ct = public(r.stats, fds, ["crosstab"], crosstab=["dx", "smoker"]).replies[node.node_id]
    assert ct.crosstab is not None, f"crosstab dx x smoker refused: {ct.refused}"
    cov = public(r.stats, fds, ["cov"], columns=["age", "income"])
    np.testing.assert_allclose(cov.cov().to_numpy(), frame[["age", "income"]].cov().to_numpy(), rtol=1e-9)
    hist = public(r.stats, fds, ["count"], columns=["age"], stats_args={"age": {"histogram": {"edges": [0, 50, 100]}}})
    got = hist.replies[node.node_id].numeric["age"].histogram
    assert got == np.histogram(frame["age"], bins=[0, 50, 100])[0].tolist(), got
    derived = public(r.preprocess(fds).onehot(["dx"]).apply, name="rt-pc", tags=["rt-pc"])
    ok = public(r.stats, derived, ["cov"], columns=["dx=A", "age"])
    assert ok.covariance is not None, f"cov(dx=A, age), groups of 14 and 26, was refused: {ok.notes()}"
    assert MID_CODE  # (the codes the other tests use)
