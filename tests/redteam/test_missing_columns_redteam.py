"""Red team: the "no values" answer of a preprocessing fit, to hand-written PreprocRequests over a
raw ROUTER. A column a site never measured is answered "no values" and nothing else; a column with
1..min_count-1 values is withheld as before; and a column the researcher's own steps make empty
(or fill) is judged on the root source's measured values, so the answer cannot be steered.
"""

from __future__ import annotations

import numpy as np
import pytest
from redteam_harness import MIN_COUNT, N_CHOL, N_ROWS, fa_part, is_error, one_raw_node, refusal_text

from fedlab.analytics.messages import FAReply

pytestmark = pytest.mark.integration


def fit(raw, node, ds, columns, stats, state=None, **extra):
    return raw.preproc(node.node_id, ds, "standardize", "fit", {"columns": columns, "stats": stats, **extra}, state)


def set_step(raw, node, ds, spec, state=None):
    return raw.preproc(node.node_id, ds, spec["type"], "set", {"transform": spec}, state)


def with_chol(node, n: int) -> None:
    """Register the node's cohort again as ``chol-N``, with ``n`` values of chol (0: never measured)."""
    frame = node.frame.copy()
    values = frame["chol"].dropna().to_numpy()
    chol = np.full(len(frame), np.nan)
    chol[:n] = np.resize(values, n)
    frame["chol"] = chol
    node.add_dataset(f"chol-{n}", frame, [f"chol-{n}"])


@pytest.mark.parametrize("n_chol", [1, 2, MIN_COUNT - 1])
def test_a_column_with_a_few_values_is_withheld_not_no_values(nodes, raw, n_chol):
    """Attack: hope that a column with very few values slips through as "no values" (or that the
    answer tells 1 from 9). Rule: withheld by min_count exactly as any statistic is, never "no values"."""
    node, _ = one_raw_node(nodes, raw)
    with_chol(node, n_chol)
    ds = raw.dataset_id(node.node_id, f"chol-{n_chol}")
    for stats, extra in ((["count", "mean", "var"], {}),
                         ([], {"stats_args": {"chol": {"count": {}, "quantiles": {"levels": [0.5]}}},
                               "thresholds": {"chol": [-1e308]}})):
        reply = fit(raw, node, ds, ["chol"], stats, **extra)
        assert not is_error(reply), reply
        assert reply.no_values is None, f"{n_chol} values of chol answered as no values: {reply}"
        part = fa_part(reply)
        assert part is not None and "chol" not in part.numeric and "chol" not in part.categorical, part
        assert "min_count" in refusal_text(reply), refusal_text(reply)
    assert N_CHOL == MIN_COUNT - 1  # the cohort's own chol (9 values) too:
    cohort = fit(raw, node, raw.dataset_id(node.node_id), ["chol"], ["count", "mean"])
    assert cohort.no_values is None and "min_count" in refusal_text(cohort)


def test_a_column_never_measured_says_no_values_and_nothing_more(nodes, raw):
    """Rule: a fit of a column the root source holds no value of is answered with its name in
    no_values, an FAReply with n_rows only (as every reply carries) and nothing else; asked alone,
    it does not turn into a fit of every column."""
    node, _ = one_raw_node(nodes, raw)
    with_chol(node, 0)
    ds = raw.dataset_id(node.node_id, "chol-0")
    reply = fit(raw, node, ds, ["chol"], ["count", "mean", "var", "min", "max"],
                thresholds={"chol": [150.0, 200.0]})
    assert not is_error(reply), reply
    assert reply.no_values == ["chol"] and reply.partials == FAReply(dataset_id=ds, n_rows=N_ROWS), reply
    both = fit(raw, node, ds, ["chol", "age"], ["count", "mean"])
    assert both.no_values == ["chol"] and set(both.partials.numeric) == {"age"} and not both.partials.refused
    excluded = fit(raw, node, ds, ["patient_id", "chol"], ["count"])
    assert excluded.no_values == ["chol"] and "excluded" in excluded.partials.refused["patient_id"]


def test_the_researchers_steps_cannot_make_a_measured_column_read_as_empty(nodes, raw):
    """Attack: make a measured column empty, or partly empty, by the researcher's own set specs:
    a standardize by 1e-307 overflows the ages far from 35 to infinity, a min-max over +-1e308 then
    makes them NaN, and the count of what is left (or a "no values" answer) says how many ages lie
    near 35, outside the cut rules. Rule: a value step that turns a finite value into inf or NaN is
    refused when it is set; a sentinel-imputed column without measured values stays "no values"
    (no statistic of the imputed values) on the pipeline, the derived dataset and a copy of it."""
    node, ds = one_raw_node(nodes, raw)
    near = {"type": "standardize", "columns": ["age"], "mean": {"age": 35.0}, "scale": {"age": 1e-307}}
    reply = set_step(raw, node, ds, near)
    assert is_error(reply, "disclosure_refused") and "overflow" in reply.message, reply
    big = set_step(raw, node, ds, {"type": "standardize", "columns": ["age"], "mean": {"age": 0.0},
                                   "scale": {"age": 1e-305}})
    assert not is_error(big), big  # huge but finite values (2e306..8e306): kept
    shift = {"type": "standardize", "columns": ["age"], "mean": {"age": -1.79e308}, "scale": {"age": 1.0}}
    reply = set_step(raw, node, ds, shift, big.state_id)  # 2e306..8e306 + 1.79e308 overflows
    assert is_error(reply, "disclosure_refused") and "overflow" in reply.message, reply
    squash = {"type": "minmax", "columns": ["age"], "min": {"age": -1e308}, "max": {"age": 1e308}}
    reply = set_step(raw, node, ds, squash, big.state_id)  # every value / inf = 0: finite, so kept
    assert not is_error(reply), reply
    got = fit(raw, node, ds, ["age"], ["count"], reply.state_id)
    assert got.no_values is None and got.partials.numeric["age"].count == N_ROWS, got
    # a column the site never measured, filled with a sentinel: still judged on its measured values
    with_chol(node, 0)
    empty = raw.dataset_id(node.node_id, "chol-0")
    filled = set_step(raw, node, empty, {"type": "impute", "columns": ["chol"], "values": {"chol": -999.0}})
    assert not is_error(filled), filled
    on_state = fit(raw, node, empty, ["chol"], ["count", "mean"], filled.state_id)
    assert on_state.no_values == ["chol"] and "chol" not in on_state.partials.numeric, on_state
    applied = raw.preproc(node.node_id, empty, "impute", "apply", {"name": "rt-filled", "tags": ["rt-filled"]},
                          filled.state_id)
    assert not is_error(applied), applied
    derived = applied.derived.dataset_id
    again = fit(raw, node, derived, ["chol"], ["count", "mean"])
    assert again.no_values == ["chol"] and "chol" not in again.partials.numeric, again
    copy = set_step(raw, node, derived, {"type": "standardize", "columns": ["chol"], "mean": {"chol": 0.0},
                                         "scale": {"chol": 1.0}})
    assert not is_error(copy), copy
    assert fit(raw, node, derived, ["chol"], ["count"], copy.state_id).no_values == ["chol"]
    plain = raw.fa(node.node_id, derived, stats=["count", "mean"], columns=["chol"])
    assert "chol" not in fa_part(plain).numeric and "min_count" in refusal_text(plain), plain
