"""Red team, rule 1: quantiles and thresholds (cuts) never give away single values.

The attacker asks many quantile levels, single thresholds round after round (bisection), many
thresholds at once, the same column through derived copies, the preprocessing fit step and other
sender ids, and restarts the node hoping its memory is gone. What it may learn, per the node's
rules: counts at thresholds rounded to a power-of-ten grid, never with fewer than min_count values
on one side, never two cuts fewer than cell_threshold ranks apart, and at most
threshold_allowance distinct thresholds per source column, ever.
"""

from __future__ import annotations

import math
import struct

import msgspec
import numpy as np
import pytest
from redteam_harness import (
    CELL_THRESHOLD,
    MIN_COUNT,
    N_ROWS,
    answered,
    count_le,
    fa_part,
    grid_consistent,
    is_error,
    is_power_of_ten,
    one_raw_node,
    public,
    refusal_text,
    spacing_violations,
)

from fedlab import FedlabError
from fedlab.protocol import ErrorReply

pytestmark = pytest.mark.integration

ALLOWANCE = 500  # the default disclosure.threshold_allowance


def income_reply(raw, node, ds, ts, **kw):
    reply = raw.thresholds(node.node_id, ds, "income", ts, **kw)
    assert not isinstance(reply, ErrorReply) or reply.code == "disclosure_refused", (
        f"a threshold request got an unexpected error: {reply}")
    return reply


def below_of(reply, column="income"):
    part = fa_part(reply)
    if part is None or column not in part.numeric:
        return None, None
    p = part.numeric[column]
    return p.below, p.resolution


# --- quantile levels through the public API ---------------------------------------------------


def test_forty_quantile_levels_do_not_return_the_ages(nodes, api):
    """Attack: 40 quantile levels k/39 over 40 rows are the 40 sorted ages. Rule: more than
    count // min_count levels are refused (refused key "age.quantiles"), the result is NaN."""
    made = nodes(2)
    r = api(2)
    fds = r.search(["cohort"])
    levels = [k / 39 for k in range(40)]
    try:
        result = public(r.stats, fds, ["quantiles"], columns=["age"], quantiles=levels)
    except FedlabError as exc:
        assert "age.quantiles" in str(exc), f"refused, but not naming age.quantiles: {exc}"
        return
    pooled = sorted(int(a) for n in made for a in n.frame["age"])
    got = result.quantiles.get("age", {})
    revealed = {q: v for q, v in got.items() if not math.isnan(v)}
    assert not revealed, f"{len(revealed)} of 40 quantile levels came back, e.g. {list(revealed.items())[:5]}"
    keys = {k for per in result.column_refusals().values() for k in per}
    assert "age.quantiles" in keys or any("age.quantiles" in line for line in result.notes()), (
        f"no node refused age.quantiles; refusals {keys}, notes {result.notes()}")
    assert pooled  # the oracle's sorted ages, for the message above if it ever matches


def test_quantiles_0_and_1_do_not_bypass_min_max_off(nodes, api):
    """Attack: min_max = "off" withholds min and max, so ask for quantiles 0 and 1 instead (the
    exact min and max by bisection). Rule: a cut with fewer than min_count values on one side is
    withheld, so neither can be located: both come back NaN."""
    (node,) = nodes(1)
    r = api(1)
    try:
        result = public(r.stats, r.search(["cohort"]), ["quantiles"], columns=["income"], quantiles=[0.0, 1.0])
    except FedlabError:
        return  # refused outright
    got = result.quantiles.get("income", {})
    incomes = node.frame["income"]
    assert math.isnan(got.get(0.0, math.nan)), f"q0 = {got.get(0.0)} (true min {incomes.min()})"
    assert math.isnan(got.get(1.0, math.nan)), f"q1 = {got.get(1.0)} (true max {incomes.max()})"


def test_public_median_does_not_pin_two_incomes(nodes, api):
    """Attack: the public median of 40 incomes is (x20 + x21) / 2, found by bisection to 1e-6 of
    the range. Rule: cuts at ranks 19, 20, 21 are fewer than cell_threshold apart, so the two
    middle values cannot both be pinned: the median is NaN or not the exact one."""
    (node,) = nodes(1)
    r = api(1)
    try:
        result = public(r.stats, r.search(["cohort"]), ["median"], columns=["income"])
        value = result.quantiles.get("income", {}).get(0.5, math.nan)
    except FedlabError:
        return  # refused outright: nothing pinned
    true = float(np.median(node.frame["income"]))
    span = float(np.ptp(node.frame["income"]))
    assert math.isnan(value) or abs(value - true) > 1e-6 * span, (
        f"the median came back as {value}, the true median is {true}")


def test_median_impute_through_fit_does_not_pin_the_median(nodes, api):
    """Attack: impute(strategy="median") runs its own quantile search through preprocessing fit
    steps, to 1e-13 relative, and puts the result in the spec it sends back. Rule: the fit step is
    held to the same cut rules, so the imputed value is not the exact median."""
    (node,) = nodes(1)
    r = api(1)
    try:
        pipe = public(r.preprocess(r.search(["cohort"])).impute, ["income"], strategy="median")
    except FedlabError:
        return
    value = float(pipe.steps[-1]["values"]["income"])
    true = float(np.median(node.frame["income"]))
    span = float(np.ptp(node.frame["income"]))
    assert abs(value - true) > 1e-6 * span, f"impute learnt the median {value} (true {true})"


# --- single thresholds, by hand ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside-range", "just-outside-range"])
def test_threshold_with_few_values_on_one_side_is_withheld(nodes, raw, where):
    """Attack: thresholds that leave fewer than min_count values on one side delimit a tail of a
    few patients; thresholds just below the minimum or above the maximum bracket it even when
    min_max = "off". Rule: every such threshold gets below None. (Far outside the data, beyond
    the node's fixed noisy fence, which with min_max = "off" lies more than min_max_noise = 5% of
    the range away, 0 or n is answered: it says nothing about any row.)"""
    node, ds = one_raw_node(nodes, raw)
    incomes = sorted(node.frame["income"])
    span = incomes[-1] - incomes[0]
    if where == "inside-range":
        ts = [(incomes[k] + incomes[k + 1]) / 2 for k in (1, 3, 6, 33, 36, 38)]
    else:
        ts = [incomes[0] - d * span for d in (0.0001, 0.01, 0.049)] + [incomes[-1] + d * span
                                                                      for d in (0.0001, 0.01, 0.049)]
    reply = income_reply(raw, node, ds, ts + [float(np.median(incomes))])
    below, _ = below_of(reply)
    assert below is not None, f"no counts at all came back: {refusal_text(reply)}"
    leaked = [(t, c) for t, c in answered(ts, below[:-1]) if c < MIN_COUNT or N_ROWS - c < MIN_COUNT]
    assert not leaked, f"thresholds with fewer than {MIN_COUNT} values on one side were answered: {leaked}"


def test_thresholds_are_rounded_to_a_grid_no_finer_than_the_rule(nodes, raw):
    """Attack: thresholds a cent apart. Rule: every threshold is rounded to a power-of-ten grid
    (NumericPartial.resolution) no finer than threshold_resolution (0.01) x the column's std, and
    every count is the count at a point of that grid."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    median = float(np.median(incomes))
    ts = [median + d for d in (-0.01, 0.0, 0.01, 0.37, 12.5)]
    reply = income_reply(raw, node, ds, ts)
    below, resolution = below_of(reply)
    assert resolution is not None, "the reply does not say to which grid the thresholds were rounded"
    assert is_power_of_ten(resolution), f"resolution {resolution} is not a power of ten"
    std = float(np.std(incomes))
    assert resolution >= 0.01 * std * (1 - 1e-9), (
        f"grid step {resolution} is finer than threshold_resolution x std = {0.01 * std:.1f}")
    for t, c in answered(ts, below):
        assert grid_consistent(incomes, t, c, resolution), f"count {c} at {t} is not a count at a grid point"


@pytest.mark.timeout(600)
def test_bisection_of_one_income_never_pins_it(nodes, raw):
    """Attack: 120 rounds of single-threshold requests bisecting towards single order statistics
    (the 20th, then others), moving a withheld threshold at random. Rule: no answered pair of
    thresholds has count(t2) - count(t1) in 1..cell_threshold-1, every count is a count at a point
    of the reported grid (so no value is located finer than the resolution), and the allowance
    only goes down."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    mean, std = float(np.mean(incomes)), float(np.std(incomes))
    rng = np.random.default_rng(0)
    log: list[tuple[float, int, float]] = []
    allowances: list[int] = []
    targets = iter([20, 20, 15, 25, 12, 28, 19, 21] * 4)
    k = next(targets)
    lo, hi = mean - 4 * std, mean + 4 * std
    t = (lo + hi) / 2
    for _ in range(120):
        reply = income_reply(raw, node, ds, [t])
        below, resolution = below_of(reply)
        part = fa_part(reply)
        if part is not None and "income" in part.allowance:
            allowances.append(part.allowance["income"])
        c = below[0] if below else None
        if c is None:
            t = lo + (hi - lo) * float(rng.random())
            continue
        assert resolution is not None, "an answered threshold without the grid it was rounded to"
        log.append((t, c, resolution))
        if c >= k:
            hi = t
        else:
            lo = t
        if hi - lo < 1e-6:
            k = next(targets)
            lo, hi = mean - 4 * std, mean + 4 * std
        t = (lo + hi) / 2
    assert log, "harness: not one of 120 thresholds was answered, not even the first (the mean)"
    violations = spacing_violations([c for _, c, _ in log])
    assert not violations, f"answered cuts fewer than {CELL_THRESHOLD} ranks apart: {violations}"
    off_grid = [(t, c, r) for t, c, r in log if not grid_consistent(incomes, t, c, r)]
    assert not off_grid, f"counts finer than the grid: {off_grid[:5]}"
    assert all(a >= b for a, b in zip(allowances, allowances[1:], strict=False)), allowances


# --- the allowance ----------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_allowance_is_spent_runs_out_and_survives_a_restart(nodes, raw):
    """Attack: ask threshold after threshold, then restart the node and go on. Rule: every distinct
    threshold costs 1 (reported in FAReply.allowance), asking again costs nothing, at 0 every new
    threshold (and histogram edge) gets None, and the count lives in node.db across restarts."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    median = float(np.median(incomes))
    first = income_reply(raw, node, ds, [median])
    below, step = below_of(first)
    step = step or 1000.0
    part = fa_part(first)
    assert part is not None and "income" in part.allowance, f"no allowance reported: {first}"
    assert part.allowance["income"] == ALLOWANCE - 1
    point = math.floor(median / step) * step  # on the grid: asking it again is the same point
    again = fa_part(income_reply(raw, node, ds, [point, point]))
    spent = ALLOWANCE - again.allowance["income"]
    assert spent in (1, 2), f"after two distinct points {spent} were spent"
    same = fa_part(income_reply(raw, node, ds, [point]))
    assert same.allowance["income"] == again.allowance["income"], "asking the same threshold again cost more"
    far = [-1e6 - m * step for m in range(1, 600)]  # distinct grid points, far from every value
    left = same.allowance["income"]
    used = 0
    while left > 0:
        batch = far[used:used + min(250, left)]
        used += len(batch)
        reply = fa_part(income_reply(raw, node, ds, batch))
        assert reply.allowance["income"] == left - len(batch), (
            f"{len(batch)} new thresholds took the allowance from {left} to {reply.allowance['income']}")
        left = reply.allowance["income"]
    assert left == 0
    # a fresh point that a fresh researcher would get answered: rank ~13, far from the median's cut
    fresh = float(math.ceil(sorted(incomes)[12] / step) * step)
    assert MIN_COUNT <= count_le(incomes, fresh) <= N_ROWS - MIN_COUNT
    spent_out = income_reply(raw, node, ds, [fresh])
    assert below_of(spent_out)[0] in (None, [None]), f"a new threshold was answered at 0 allowance: {spent_out}"
    edges = [fresh - 3 * step, fresh + 7 * step]
    hist = fa_part(raw.fa(node.node_id, ds, stats=["count"], columns=["income"],
                          stats_args={"income": {"histogram": {"edges": edges}}}))
    h = hist.numeric["income"].histogram if hist is not None and "income" in hist.numeric else None
    assert h is None or all(v is None for v in h), f"new histogram edges were answered at 0 allowance: {h}"

    session = raw.sessions[node.node_id]
    node.stop()
    node.start()
    raw.wait_for_restart(node.node_id, session)
    after = income_reply(raw, node, ds, [fresh + step, point])
    part = fa_part(after)
    assert part is not None and part.allowance.get("income") == 0, f"the restart reset the allowance: {after}"
    below, _ = below_of(after)
    assert below is not None and below[0] is None, f"after a restart a new threshold was answered: {below}"


def test_another_sender_id_gets_no_fresh_allowance_or_cuts(nodes, raw):
    """Attack (beyond the spec's list): the envelope's sender is whatever the peer writes, and an
    insecure node cannot tell two researcher ids apart; so switch ids to get a fresh allowance and
    a clean cut registry. Rule: a new id means neither."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    ordered = sorted(incomes)
    median = float(np.median(incomes))
    one = fa_part(income_reply(raw, node, ds, [median], sender="researcher-alice"))
    assert one is not None and "income" in one.allowance, f"no allowance reported: {one}"
    step = one.numeric["income"].resolution or 1000.0
    far = [-1e6 - m * step for m in range(1, 21)]
    one = fa_part(income_reply(raw, node, ds, far, sender="researcher-alice"))
    two = fa_part(income_reply(raw, node, ds, [-2e6], sender="researcher-mallory"))
    assert two is not None and two.allowance.get("income") == one.allowance["income"] - 1, (
        f"a new sender id got its own allowance: {one.allowance} then {two.allowance}")
    first = fa_part(income_reply(raw, node, ds, [median], sender="researcher-alice"))
    near = sorted({float(math.ceil(ordered[k] / step) * step) for k in range(15, 26)})
    three = fa_part(income_reply(raw, node, ds, near, sender="researcher-mallory"))
    counts = [c for _, c in answered([median], first.numeric["income"].below)]
    counts += [c for _, c in answered(near, three.numeric["income"].below)]
    assert counts, "harness: nothing was answered at all"
    assert not spacing_violations(counts), f"cuts combine across sender ids: {sorted(counts)}"


# --- many thresholds at once ------------------------------------------------------------------


def _raw_floats(values: np.ndarray) -> msgspec.Raw:
    """A msgpack array of float64, built without a Python float per value."""
    packed = np.empty(values.size, dtype=[("tag", "u1"), ("v", ">f8")])
    packed["tag"] = 0xCB
    packed["v"] = values
    return msgspec.Raw(b"\xdd" + struct.pack(">I", values.size) + packed.tobytes())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [2049, 5_000_000])
def test_too_many_thresholds_in_one_request_are_refused(nodes, raw, n):
    """Attack: every cent of the income range in one request (5,000,000 thresholds, 45 MB: under
    the node's 256 MB message limit), or just one more than allowed. Rule: refused, naming
    disclosure.max_thresholds; no count comes back; the node keeps serving."""
    node, ds = one_raw_node(nodes, raw)
    ts = np.linspace(15_000, 95_000, n)
    content = {"dataset_id": ds, "stats": ["quantiles"], "columns": ["income"],
               "stats_args": {"income": {"quantiles": {}}}, "thresholds": {"income": _raw_floats(ts)}}
    reply = raw.request(node.node_id, "fa_request", content, timeout=300)
    below, _ = below_of(reply)
    assert not below or all(c is None for c in below), f"{sum(c is not None for c in below)} counts came back"
    assert "disclosure.max_thresholds" in refusal_text(reply), f"refusal does not name the rule: {reply!r:.300}"
    raw.ping(node.node_id)


# --- the same column through other doors ------------------------------------------------------


@pytest.mark.timeout(600)
def test_derived_copies_share_the_cuts_and_the_allowance(nodes, raw):
    """Attack: answer a cut on income, then ask cuts one or two ranks away on copies: an identity
    standardize applied as a new dataset, a x3 rescaling kept as a pipeline state (fit), and a
    copy of the copy. Rule: the cuts and the allowance belong to the source column, so no pair of
    answered cuts across all of them is fewer than cell_threshold ranks apart, and no copy starts
    with a fresh allowance."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    ordered = sorted(incomes)
    median = float(np.median(incomes))
    counts: list[int] = []
    allowances: list[int] = []

    def record(reply, ts):
        part = fa_part(reply)
        assert part is not None, f"the request failed: {reply}"
        if "income" in part.allowance:
            allowances.append(part.allowance["income"])
        counts.extend(c for _, c in answered(ts, part.numeric["income"].below if "income" in part.numeric else None))

    record(income_reply(raw, node, ds, [median]), [median])
    assert counts, "harness: the first threshold at the median, a fresh point, was not answered"

    def standardize(mean, scale, state=None, source=ds):
        spec = {"type": "standardize", "columns": ["income"], "mean": {"income": mean}, "scale": {"income": scale}}
        reply = raw.preproc(node.node_id, source, "standardize", "set", {"transform": spec}, state)
        assert not is_error(reply), f"a plain standardize was refused: {reply}"
        return reply.state_id

    identity = standardize(0.0, 1.0)
    applied = raw.preproc(node.node_id, ds, "standardize", "apply", {"name": "copy", "tags": ["copy"]}, identity)
    assert not is_error(applied), applied
    copy_id = applied.derived.dataset_id
    copy2_state = raw.preproc(node.node_id, copy_id, "standardize", "set", {"transform": {
        "type": "standardize", "columns": ["income"], "mean": {"income": 0.0}, "scale": {"income": 1.0}}})
    assert not is_error(copy2_state), copy2_state
    applied2 = raw.preproc(node.node_id, copy_id, "standardize", "apply", {"name": "copy2", "tags": ["copy2"]},
                           copy2_state.state_id)
    copy2_id = applied2.derived.dataset_id
    scaled = standardize(0.0, 1 / 3)

    # cuts one and two ranks from the median's on every copy: grid points between x_15 and x_26
    near = sorted({float(v) for v in np.linspace(ordered[14], ordered[25], 40)})
    for target in (copy_id, copy2_id):
        record(income_reply(raw, node, target, near), near)
    tripled = [3 * t for t in near]
    fit = raw.preproc(node.node_id, ds, "standardize", "fit",
                      {"columns": ["income"], "stats": ["quantiles"], "thresholds": {"income": tripled}}, scaled)
    record(fit, tripled)
    violations = spacing_violations(counts)
    assert not violations, f"cuts fewer than {CELL_THRESHOLD} ranks apart across copies: {violations}"
    assert allowances and all(a >= b for a, b in zip(allowances, allowances[1:], strict=False)), (
        f"a copy started with a fresh allowance: {allowances}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("via", ["source", "shifted-copies"])
def test_withheld_answers_next_to_a_stored_cut_do_not_pin_a_value(nodes, raw, via):
    """Attack (beyond the spec's list): a stored cut at rank r may be asked again and again, and
    the ranks just below it are withheld (None): that None is itself an answer, so bisecting on
    "r or not" locates x_r. On the source the grid stops this at the grid step. Through copies, a
    standardize with mean m puts the derived grid point 0 exactly at source value m, so 50 copies
    with chosen means would bisect x_r to any precision, one allowance unit each. Rule: no value is
    pinned finer than the source's resolution, by either route."""
    node, ds = one_raw_node(nodes, raw)
    incomes = sorted(node.frame["income"])
    median = float(np.median(incomes))
    first = income_reply(raw, node, ds, [median])
    below, step = below_of(first)
    assert below and below[0] is not None and step, (
        f"the first threshold (the median) came back without a count and a grid step: {first}")
    r = below[0]
    hi = median  # count(<= hi) == r, so x_r <= hi
    lo = median - 4 * float(np.std(incomes))  # count(<= lo) < r

    def probe(t: float) -> int | None:
        if via == "source":
            got = fa_part(income_reply(raw, node, ds, [t]))
        else:
            spec = {"type": "standardize", "columns": ["income"], "mean": {"income": t}, "scale": {"income": 1.0}}
            state = raw.preproc(node.node_id, ds, "standardize", "set", {"transform": spec})
            assert not is_error(state), state
            got = fa_part(raw.preproc(node.node_id, ds, "standardize", "fit", {
                "columns": ["income"], "stats": ["quantiles"], "thresholds": {"income": [0.0]}}, state.state_id))
        part = got.numeric.get("income") if got is not None else None
        return part.below[0] if part is not None and part.below else None

    for _ in range(50):
        mid = (lo + hi) / 2
        if probe(mid) == r:
            hi = mid
        else:
            lo = mid
    x = incomes[r - 1]
    pinned = lo < x <= hi
    assert not (pinned and hi - lo < step * (1 - 1e-9)), (
        f"via {via}: the {r}th income is pinned to ({lo}, {hi}], {hi - lo:.3g} wide, finer than the grid "
        f"step {step}; it is {x}")


def test_fit_steps_answer_under_the_same_rules(nodes, raw):
    """Attack: the preprocessing fit step answers statistics too; ask it what the analytics
    request would refuse. Rule: value counts without the rare code, no moments of the binary with
    two ones, no levels of the id-like column, and cuts and allowance shared with analytics."""
    node, ds = one_raw_node(nodes, raw)
    incomes = list(node.frame["income"])
    ordered = sorted(incomes)
    median = float(np.median(incomes))

    def fit(args):
        reply = raw.preproc(node.node_id, ds, "standardize", "fit", args)
        assert not is_error(reply) or reply.code == "disclosure_refused", reply
        return reply

    vc = fa_part(fit({"columns": ["dx"], "stats": [], "stats_args": {"dx": {"value_counts": {}}}}))
    assert vc is not None and "dx" in vc.categorical, f"harness: the fit gave no value counts of dx: {vc}"
    assert "RARE" not in vc.categorical["dx"].value_counts, f"fit named the rare code: {vc.categorical['dx']}"
    sex = fa_part(fit({"columns": ["sex"], "stats": ["count", "mean", "var"]}))
    assert sex is None or "sex" not in sex.numeric, f"fit sent the moments of sex: {sex.numeric.get('sex')}"
    ids = fa_part(fit({"columns": ["hosp_code"], "stats": [], "stats_args": {"hosp_code": {"value_counts": {}}}}))
    assert ids is None or not ids.categorical.get("hosp_code") or not ids.categorical["hosp_code"].value_counts

    counts: list[int] = []
    allowances: list[int] = []
    first = fa_part(income_reply(raw, node, ds, [median]))
    counts += [c for _, c in answered([median], first.numeric["income"].below)]
    allowances.append(first.allowance.get("income", ALLOWANCE))
    near = sorted({float(v) for v in np.linspace(ordered[15], ordered[24], 30)})
    second = fa_part(fit({"columns": ["income"], "stats": ["quantiles"], "thresholds": {"income": near}}))
    counts += [c for _, c in answered(near, second.numeric["income"].below)]
    allowances.append(second.allowance.get("income", ALLOWANCE))
    assert not spacing_violations(counts), f"fit and analytics cuts combine: {sorted(counts)}"
    assert allowances[1] < allowances[0], f"the fit step does not spend the same allowance: {allowances}"
