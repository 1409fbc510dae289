"""Red team, rule 9: the Fed-BioMed-named job classes are held to the same rules.

``FARequestJob`` and ``PreprocRequestJob`` send one request per node with whatever arguments they
are given (thresholds, value counts, transform specs), with none of the researcher-side planning
of ``Researcher.stats`` or ``Pipeline``: the node alone decides what leaves it.
"""

from __future__ import annotations

import numpy as np
import pytest
from redteam_harness import (
    CELL_THRESHOLD,
    MIN_COUNT,
    N_ROWS,
    RARE_CODE,
    answered,
    grid_consistent,
    spacing_violations,
)

from fedlab.researcher.jobs import FARequestJob
from fedlab.researcher.preprocess import PreprocRequestJob

pytestmark = pytest.mark.integration


def jobs_kw(r):
    return {"researcher_id": r.id, "requests": r.requests}


def test_fa_request_job_thresholds_follow_the_cut_rules(nodes, api):
    """Attack: FARequestJob with 200 thresholds over the income range in one request, then 200
    more shifted by half a step. Rule: counts only at grid points, never with fewer than
    min_count values on one side (0 or n only far outside the data, beyond the node's noisy fence,
    which with min_max = "off" lies more than 5% of the range away), never two cuts fewer than
    cell_threshold ranks apart."""
    (node,) = nodes(1)
    incomes = list(node.frame["income"])
    span = max(incomes) - min(incomes)
    near = (min(incomes) - 0.05 * span, max(incomes) + 0.05 * span)
    r = api(1)
    fds = r.search(["cohort"])
    counts: list[int] = []
    one_sided: list[tuple[float, int]] = []
    for offset in (0.0, 150.0):
        ts = [float(t) for t in np.linspace(15_000 + offset, 95_000 + offset, 200)]
        job = FARequestJob("exp", "fa-q", fds, {"income": {"quantiles": {}}}, None, thresholds={"income": ts},
                           **jobs_kw(r))
        part = job.execute()[node.node_id].numeric["income"]
        got = answered(ts, part.below)
        assert part.resolution is not None or not got, "counts came back without their grid"
        for t, c in got:
            assert grid_consistent(incomes, t, c, part.resolution), f"count {c} at {t} is finer than the grid"
        counts += [c for _, c in got]
        one_sided += [(t, c) for t, c in got if not MIN_COUNT <= c <= N_ROWS - MIN_COUNT and near[0] < t < near[1]]
    assert not spacing_violations(counts), f"cuts fewer than {CELL_THRESHOLD} ranks apart: {sorted(set(counts))}"
    assert not one_sided, (f"thresholds with fewer than {MIN_COUNT} values on one side were answered: "
                           f"{one_sided[:3]} ... ({len(one_sided)} in all)")


def test_fa_request_job_value_counts_never_name_the_rare_code(nodes, api):
    """Attack: FARequestJob value counts of dx and of the id-like hosp_code. Rule: 'RARE' is never
    a key; hosp_code is refused by a levels rule."""
    (node,) = nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    job = FARequestJob("exp", "fa-vc", fds, {"dx": {"value_counts": {}}, "hosp_code": {"value_counts": {}}}, None,
                       **jobs_kw(r))
    reply = job.execute()[node.node_id]
    assert "dx" in reply.categorical, f"harness: no value counts of dx: {reply.refused}"
    assert RARE_CODE not in reply.categorical["dx"].value_counts, reply.categorical["dx"]
    ids = reply.categorical.get("hosp_code")
    assert ids is None or not ids.value_counts, f"hosp_code levels listed: {len(ids.value_counts)}"
    why = "; ".join(v for k, v in reply.refused.items() if k.startswith("hosp_code"))
    assert "levels_max" in why or "levels_density" in why, why


def test_preproc_request_job_cannot_touch_patient_id(nodes, api):
    """Attack: PreprocRequestJob 'set' with a one-hot spec of patient_id listing guessed ids, and a
    'fit' asking value counts and the mean of patient_id. Rule: the set is a disclosure_refused
    error naming excluded_columns (in job.errors); the fit withholds patient_id."""
    (node,) = nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    spec = {"type": "onehot", "columns": ["patient_id"], "categories": {"patient_id": ["P1000", "P1001"]},
            "other": {"patient_id": False}}
    job = PreprocRequestJob("exp", "onehot", "set", "pp-excluded", fds, {"transform": spec}, **jobs_kw(r))
    replies = job.execute()
    assert not replies, f"the one-hot step of patient_id was kept: {replies}"
    error = job.errors.get(node.node_id)
    assert error is not None and error.code == "disclosure_refused" and "excluded_columns" in error.message, error
    fit = PreprocRequestJob("exp", "standardize", "fit", "pp-fit", fds,
                            {"columns": ["patient_id"], "stats": ["count", "mean"],
                             "stats_args": {"patient_id": {"value_counts": {}}}}, **jobs_kw(r))
    got = fit.execute().get(node.node_id)
    part = got.partials if got is not None else None
    if part is not None:
        assert "patient_id" not in part.numeric and (
            "patient_id" not in part.categorical or not part.categorical["patient_id"].value_counts), part
        assert any(k.startswith("patient_id") for k in part.refused), part.refused


def test_preproc_request_job_onehot_listing_the_rare_code_is_folded(nodes, api):
    """Attack: PreprocRequestJob 'set' with a one-hot spec of dx listing 'RARE', then 'apply'.
    Rule: the derived 'dx=RARE' column sums to 0."""
    (node,) = nodes(1)
    r = api(1)
    fds = r.search(["cohort"])
    spec = {"type": "onehot", "columns": ["dx"], "categories": {"dx": ["A", "B", "C", "MID", RARE_CODE]},
            "other": {"dx": False}}
    job = PreprocRequestJob("exp", "onehot", "set", "pp-rare", fds, {"transform": spec}, **jobs_kw(r))
    replies = job.execute()
    assert node.node_id in replies, f"harness: a one-hot step of dx was refused: {job.errors}"
    state = {node.node_id: replies[node.node_id].state_id}
    apply = PreprocRequestJob("exp", "onehot", "apply", "pp-rare", fds, {"name": "rt-job", "tags": ["rt-job"]},
                              state, **jobs_kw(r))
    derived = apply.execute()[node.node_id].derived
    assert "dx=RARE" in derived.columns, derived.columns
    assert node.derived_csv(derived.dataset_id)["dx=RARE"].sum() == 0, "the derived file marks the rare patient"
