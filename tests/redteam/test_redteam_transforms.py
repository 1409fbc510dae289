"""Red team, rules 3 and 7: transform specs are the researcher's, so the node checks them.

Hand-made `set` steps (PreprocRequest over a raw ROUTER) one-hot encode the excluded patient_id
with guessed ids, standardize / impute / min-max / ComBat it, one-hot dx listing the rare code,
impute a sentinel into a column below min_count, scale by a negative number, list
200,000 categories, or blow up the derived frame.
"""

from __future__ import annotations

import pytest
from redteam_harness import (
    CELL_THRESHOLD,
    MIN_COUNT,
    N_ROWS,
    RARE_CODE,
    fa_part,
    is_error,
    one_raw_node,
    refusal_text,
)

pytestmark = pytest.mark.integration

CODES = ["A", "B", "C", "MID", RARE_CODE]


def set_step(raw, node, ds, spec, state=None):
    return raw.preproc(node.node_id, ds, spec["type"], "set", {"transform": spec}, state)


def fit(raw, node, ds, state, columns, stats, **extra):
    return raw.preproc(node.node_id, ds, "standardize", "fit", {"columns": columns, "stats": stats, **extra}, state)


def onehot(columns, categories, other=False):
    return {"type": "onehot", "columns": columns, "categories": categories,
            "other": {c: other for c in columns}}


def learnt_about(part, prefix: str) -> list[str]:
    """Keys of an FAReply that carry statistics of ``prefix`` or of a column made from it."""
    if part is None:
        return []
    keys = [*part.numeric, *part.categorical, *(part.covariance.columns if part.covariance else [])]
    return [k for k in keys if k == prefix or k.startswith(prefix + "=")]


def test_onehot_of_excluded_patient_id_with_guessed_ids_is_refused(nodes, raw):
    """Attack: one-hot encode patient_id with guessed ids: 'patient_id=P1000' is not literally an
    excluded column, and its mean says whether P1000 exists. Rule: refused (disclosure_refused,
    naming excluded_columns), and nothing about patient_id is learnable afterwards."""
    node, ds = one_raw_node(nodes, raw)
    guesses = ["P1000", "P1001", "P1017", "P9999"]
    reply = set_step(raw, node, ds, onehot(["patient_id"], {"patient_id": guesses}))
    state = None if is_error(reply) else reply.state_id
    assert is_error(reply, "disclosure_refused"), f"the one-hot step over patient_id was kept: {reply}"
    assert "excluded_columns" in reply.message, reply.message
    hidden = onehot(["dx", "patient_id"], {"dx": ["A", "B"], "patient_id": guesses})
    reply = set_step(raw, node, ds, hidden)
    assert is_error(reply, "disclosure_refused"), f"patient_id hidden second in a spec was kept: {reply}"
    # whatever the attacker tries next, no statistic of patient_id or of a column made from it
    for columns in (["patient_id=P1000"], ["patient_id"], []):
        for stats in (["count", "mean"], ["value_counts"]):
            got = raw.fa(node.node_id, ds, stats=stats, columns=columns)
            assert not learnt_about(fa_part(got), "patient_id"), f"{columns} {stats}: {got}"
            if state is not None:
                got = fit(raw, node, ds, state, columns, stats)
                assert not learnt_about(fa_part(got), "patient_id"), f"fit {columns} {stats}: {got}"


@pytest.mark.parametrize("spec", [
    {"type": "standardize", "columns": ["patient_id"], "mean": {"patient_id": 0.0}, "scale": {"patient_id": 1.0}},
    {"type": "standardize", "columns": ["age", "patient_id"], "mean": {"age": 0.0, "patient_id": 0.0},
     "scale": {"age": 1.0, "patient_id": 1.0}},
    {"type": "impute", "columns": ["patient_id"], "values": {"patient_id": "X"}},
    {"type": "minmax", "columns": ["patient_id"], "min": {"patient_id": 0.0}, "max": {"patient_id": 1.0}},
    {"type": "combat", "columns": ["patient_id"], "alpha": {"patient_id": 0.0}, "sigma": {"patient_id": 1.0}},
], ids=["standardize", "standardize-second", "impute", "minmax", "combat"])
def test_any_step_touching_patient_id_is_refused(nodes, raw, spec):
    """Attack: a standardize, impute, min-max or ComBat step over patient_id (alone or second in
    the list). Rule: disclosure_refused naming excluded_columns, with no patient id in the text."""
    node, ds = one_raw_node(nodes, raw)
    reply = set_step(raw, node, ds, spec)
    assert is_error(reply, "disclosure_refused"), f"{spec['type']} over patient_id: {reply}"
    assert "excluded_columns" in reply.message and "P10" not in reply.message, reply.message


def test_onehot_listing_the_rare_code_folds_it(nodes, raw):
    """Attack: a hand-made one-hot spec of dx that lists 'RARE' (which the node never named), so
    that the mean of 'dx=RARE' is the rare count and the derived file holds the patient's row.
    Rule: the node folds it: 'dx=RARE' exists but sums to 0, in fit answers, in the derived
    dataset's statistics and in its file."""
    node, ds = one_raw_node(nodes, raw)
    reply = set_step(raw, node, ds, onehot(["dx"], {"dx": CODES}))
    assert not is_error(reply), f"harness: a one-hot step of dx, a legitimate column, was refused: {reply}"
    state = reply.state_id
    got = fa_part(fit(raw, node, ds, state, ["dx=RARE"], ["count", "mean", "sum"]))
    if got is not None and "dx=RARE" in got.numeric:
        assert got.numeric["dx=RARE"].sum == 0 and got.numeric["dx=RARE"].mean == 0, got.numeric["dx=RARE"]
    applied = raw.preproc(node.node_id, ds, "onehot", "apply", {"name": "rt-rare", "tags": ["rt-rare"]}, state)
    assert not is_error(applied), applied
    info = applied.derived
    assert "dx=RARE" in info.columns, f"the derived dataset has no dx=RARE column: {info.columns}"
    stats = fa_part(raw.fa(node.node_id, info.dataset_id, stats=["count", "mean", "sum"], columns=["dx=RARE"]))
    if stats is not None and "dx=RARE" in stats.numeric:
        assert stats.numeric["dx=RARE"].sum == 0, f"dx=RARE sums to {stats.numeric['dx=RARE'].sum}"
    oracle = node.derived_csv(info.dataset_id)
    assert oracle["dx=RARE"].sum() == 0, "the derived file marks the rare patient in dx=RARE"


def ones_by_channel(raw, node, dataset_id: str, column: str, n: int = N_ROWS) -> dict[str, int]:
    """How many rows hold 1 in the 0/1 ``column``, by every channel that gives it away: moments,
    value counts, a two-bin histogram, a threshold at 0.5, a crosstab with smoker."""
    found: dict[str, int] = {}
    part = fa_part(raw.fa(node.node_id, dataset_id, stats=["count", "mean"], columns=[column]))
    if part is not None and column in part.numeric:
        found["mean"] = round(part.numeric[column].mean * part.numeric[column].count)
    part = fa_part(raw.fa(node.node_id, dataset_id, stats=["value_counts"], columns=[column],
                          stats_args={column: {"value_counts": {}}}))
    if part is not None and column in part.categorical:
        for key, v in part.categorical[column].value_counts.items():
            if v is not None and key in ("1", "1.0"):
                found["value_counts[1]"] = v
            if v is not None and key in ("0", "0.0"):
                found["n - value_counts[0]"] = n - v
    part = fa_part(raw.fa(node.node_id, dataset_id, stats=["count"], columns=[column],
                          stats_args={column: {"histogram": {"edges": [-0.5, 0.5, 1.5]}}}))
    hist = part.numeric[column].histogram if part is not None and column in part.numeric else None
    if hist:
        if hist[1] is not None:
            found["histogram[1]"] = hist[1]
        if hist[0] is not None:
            found["n - histogram[0]"] = n - hist[0]
    part = fa_part(raw.thresholds(node.node_id, dataset_id, column, [0.5]))
    below = part.numeric[column].below if part is not None and column in part.numeric else None
    if below and below[0] is not None:
        found["n - count(<= 0.5)"] = n - below[0]
    part = fa_part(raw.fa(node.node_id, dataset_id, stats=["crosstab"], crosstab=[column, "smoker"]))
    if part is not None and part.crosstab is not None:
        for key, line in part.crosstab.cells.items():
            if line and all(v is not None for v in line.values()):
                total = sum(line.values())
                if key in ("1", "1.0"):
                    found["crosstab row 1"] = total
                if key in ("0", "0.0"):
                    found["n - crosstab row 0"] = n - total
    return found


def test_a_rare_binary_level_count_leaks_through_no_channel(nodes, raw):
    """Attack (beyond the spec's list): sex has two ones; its moments are refused, so ask for its
    value counts, a histogram with a bin per level, a threshold at 0.5 and a crosstab with smoker,
    and take n minus the zeros wherever the ones are hidden. Rule: no channel gives the count."""
    node, ds = one_raw_node(nodes, raw)
    found = ones_by_channel(raw, node, ds, "sex")
    assert not found, f"the count of sex = 1 (2 patients) came out through {found}"


@pytest.mark.parametrize("other", [False, True])
def test_onehot_indicator_counts_do_not_give_the_rare_count_by_complement(nodes, raw, other):
    """Attack (beyond the spec's list): one-hot dx listing every code, apply, then the count of
    every indicator through every channel (moments, value counts, histogram, threshold, crosstab):
    if all but one indicator count come out, n minus their sum is the last one; with 'RARE' folded
    to zeros, n minus the sum of all is the count of the folded rows. Rule: no indicator count,
    and no complement, is a small cell (1..cell_threshold-1)."""
    node, ds = one_raw_node(nodes, raw)
    reply = set_step(raw, node, ds, onehot(["dx"], {"dx": CODES}, other=other))
    assert not is_error(reply), f"harness: a one-hot step of dx was refused: {reply}"
    applied = raw.preproc(node.node_id, ds, "onehot", "apply", {"name": "rt-c", "tags": ["rt-c"]}, reply.state_id)
    assert not is_error(applied), applied
    derived = applied.derived
    present = [c for c in derived.columns if c.startswith("dx=")]
    assert present, f"harness: no indicator columns in {derived.columns}"
    known: dict[str, int] = {}
    for column in present:
        found = ones_by_channel(raw, node, derived.dataset_id, column)
        assert len(set(found.values())) <= 1, f"{column}: channels disagree: {found}"
        if found:
            known[column] = next(iter(found.values()))
    small = {c: n for c, n in known.items() if 0 < n < CELL_THRESHOLD}
    assert not small, f"indicator counts that are small cells: {small}"
    unknown = [c for c in present if c not in known]
    rest = N_ROWS - sum(known.values())
    if len(unknown) <= 1:
        assert not 0 < rest < CELL_THRESHOLD, (
            f"n - sum of the disclosed indicators = {rest}, the count of {unknown or 'the folded rows'}: {known}")


def test_covariance_with_the_small_code_indicator_learns_nothing(nodes, raw):
    """Attack: one-hot dx listing 'MID' (3 patients), then cov and corr of 'dx=MID' with age,
    which give the three patients' mean age. Rule: refused, naming group_levels / min_count,
    unless the node folded 'MID' (the indicator is all zeros, so the co-moment says nothing)."""
    node, ds = one_raw_node(nodes, raw)
    reply = set_step(raw, node, ds, onehot(["dx"], {"dx": CODES}))
    assert not is_error(reply), reply
    applied = raw.preproc(node.node_id, ds, "onehot", "apply", {"name": "rt-mid", "tags": ["rt-mid"]},
                          reply.state_id)
    folded = node.derived_csv(applied.derived.dataset_id)["dx=MID"].sum() == 0
    for stat in ("cov", "corr"):
        got = fa_part(raw.fa(node.node_id, applied.derived.dataset_id, stats=[stat], columns=["dx=MID", "age"]))
        assert got is not None, "harness: the covariance request failed"
        cov = got.covariance
        if cov is not None and "dx=MID" in cov.columns:
            assert folded, f"{stat} with dx=MID (3 patients) was sent: {cov}"
            i = cov.columns.index("dx=MID")
            assert cov.m2_x[i][i] == 0 and all(m == 0 for m in cov.mean_x[i]), cov
        else:
            why = "; ".join(got.refused.values())
            assert "group_levels" in why or "min_count" in why, f"{stat}: {why!r}"


def test_imputing_a_sentinel_does_not_lift_min_count(nodes, raw):
    """Attack: chol holds 9 values (below min_count 10); impute -999 into its 31 missing rows so
    that the column has 40, then ask count, mean and thresholds (the mean gives the 9 values'
    mean back), on the pipeline state, on the derived dataset and on a copy of that. Rule: the
    imputed chol is still refused: min_count counts only real values."""
    node, ds = one_raw_node(nodes, raw)
    spec = {"type": "impute", "columns": ["chol"], "values": {"chol": -999.0}}
    reply = set_step(raw, node, ds, spec)
    if is_error(reply, "disclosure_refused"):
        return  # refused at once: nothing to learn
    assert not is_error(reply), reply
    thresholds = {"chol": [-998.0, 0.0, 230.0, 260.0]}

    def check(got, where):
        part = fa_part(got)
        if part is None:
            assert is_error(got, "disclosure_refused"), f"{where}: {got}"
            return
        p = part.numeric.get("chol")
        assert p is None or (p.below is not None and all(c is None for c in p.below) and p.count == 0), (
            f"{where}: statistics of the imputed chol came back: {p}")
        assert "min_count" in refusal_text(got), f"{where}: not refused by min_count: {refusal_text(got)}"

    check(fit(raw, node, ds, reply.state_id, ["chol"], ["count", "mean", "var"]), "fit moments")
    check(fit(raw, node, ds, reply.state_id, ["chol"], ["quantiles"], thresholds=thresholds), "fit thresholds")
    applied = raw.preproc(node.node_id, ds, "impute", "apply", {"name": "rt-chol", "tags": ["rt-chol"]},
                          reply.state_id)
    assert not is_error(applied), applied
    derived = applied.derived.dataset_id
    check(raw.fa(node.node_id, derived, stats=["count", "mean", "std"], columns=["chol"]), "derived moments")
    check(raw.fa(node.node_id, derived, stats=["quantiles"], columns=["chol"],
                 stats_args={"chol": {"quantiles": {}}}, thresholds=thresholds), "derived thresholds")
    again = set_step(raw, node, derived, {"type": "standardize", "columns": ["chol"], "mean": {"chol": 0.0},
                                          "scale": {"chol": 1.0}})
    if not is_error(again):
        check(fit(raw, node, derived, again.state_id, ["chol"], ["count", "mean"]), "copy of the derived")
    assert MIN_COUNT > 9


@pytest.mark.parametrize("scale", [-1.0, -1e-9])
def test_standardize_with_a_negative_scale_is_refused(nodes, raw, scale):
    """Attack: a negative scale reverses the order, so min becomes max and cut ranks flip. Rule:
    refused, naming the scale. (A scale of 0 divides by 1, as scikit-learn does for a constant
    column: a relabelled copy, which shares its source's cuts like every copy.)"""
    node, ds = one_raw_node(nodes, raw)
    spec = {"type": "standardize", "columns": ["age"], "mean": {"age": 0.0}, "scale": {"age": scale}}
    reply = set_step(raw, node, ds, spec)
    assert is_error(reply), f"standardize with scale {scale} was kept: {reply}"
    assert "scale" in reply.message, reply.message


def test_onehot_with_200000_categories_is_refused(nodes, raw):
    """Attack: a one-hot spec listing 200,000 guessed categories (a dictionary attack on a code
    column, and 200,000 columns of work). Rule: refused naming max_onehot_categories; the node
    keeps serving."""
    node, ds = one_raw_node(nodes, raw)
    spec = onehot(["dx"], {"dx": [f"code-{i}" for i in range(200_000)]})
    reply = set_step(raw, node, ds, spec)
    assert is_error(reply), f"a one-hot step of 200,000 categories was kept: {reply!r:.200}"
    assert "max_onehot_categories" in reply.message, reply.message
    raw.ping(node.node_id)


def test_derived_frame_is_capped_by_max_derived_cells(nodes, raw):
    """Attack (beyond the spec's list): a one-hot step that multiplies the frame's columns.
    Rule: a step making more than max_derived_cells cells (here set to 500) is refused naming it."""
    node, ds = one_raw_node(nodes, raw, rules={"max_derived_cells": 500})
    small = set_step(raw, node, ds, onehot(["dx"], {"dx": ["A", "B", "C"]}))
    assert not is_error(small), f"harness: a one-hot step within the cap was refused: {small}"
    big = set_step(raw, node, ds, onehot(["dx"], {"dx": ["A", "B", "C"] + [f"Z{i}" for i in range(12)]}))
    assert is_error(big) and "max_derived_cells" in big.message, f"a frame over the cap was kept: {big}"
