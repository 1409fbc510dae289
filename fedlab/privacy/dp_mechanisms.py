"""Differentially private releases of one node's data, built from OpenDP's vetted parts.

We use OpenDP (the ``opendp`` package) for everything that decides the guarantee: the stability of
each query (a clamped float sum's sensitivity, which OpenDP computes with the slack that float
rounding needs; the L1 or L2 sensitivity of a vector of counts), the samplers (discrete Laplace or
discrete Gaussian noise for counts, their float counterparts for sums, drawn without the
floating-point attacks a ``numpy.random`` sampler is open to) and the accounting (the composed
measurement's privacy map gives the ε, or ρ then (ε, δ), that a whole request costs). What is ours
is the choice of queries and the post-processing, which cannot weaken the guarantee.

The unit of privacy is one row: two datasets are neighbours when one has a row the other has not
(OpenDP's ``symmetric_distance`` of 1). Every query reads the column as a vector of rows, after a
row-wise map fixed before the data is seen (clamping to public bounds, centring on their midpoint,
squaring, binning on public edges, mapping to public categories), so that a row added or removed
changes at most one entry of the mapped vector.

A request's ``epsilon`` is split equally over its queries (basic composition). With the Gaussian
mechanism the split is of ρ (zero-concentrated DP, which composes additively); the ρ is the largest
whose conversion at the request's δ stays within its ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlab.errors import FedlabConfigError, FedlabDisclosureError

__all__ = ["LAPLACE", "GAUSSIAN", "Query", "Released", "count_query", "histogram_query", "categories_query",
           "release", "rho_for", "sum_query"]

LAPLACE = "laplace"
GAUSSIAN = "gaussian"
OTHER = "<other>"
MISSING = "<missing>"
# The accounting of the composed measurement may exceed the equal split by float slack only.
_SLACK = 1e-9


def _dp() -> Any:
    """OpenDP's prelude with its ``contrib`` features on (its mechanisms are contributed, proven code)."""
    try:
        import opendp.prelude as dp
    except ImportError as exc:  # pragma: no cover - the dp extra is part of every install we test
        raise FedlabConfigError(
            "this node cannot answer differentially private requests: the opendp package is not installed "
            "(install fedlab with its dp extra: pip install 'fedlab[dp]')") from exc
    dp.enable_features("contrib")
    return dp


@dataclass(frozen=True)
class Query:
    """One released figure (or vector of figures) before its noise.

    ``transformation(mechanism)`` is the OpenDP transformation from a vector of rows (``data``) to
    the figure, whose output metric suits the mechanism (L1 for Laplace, L2 for Gaussian).
    """

    name: str
    data: list[Any]
    transformation: Callable[[str], Any]
    integer: bool


@dataclass(frozen=True)
class Released:
    """What :func:`release` gives back: the noisy figures, the noise scale of each, what it all cost."""

    values: dict[str, list[float]]
    scales: dict[str, float]
    epsilon: float
    delta: float


def _metric(dp: Any, mechanism: str) -> Any:
    return dp.L2Distance[int] if mechanism == GAUSSIAN else dp.L1Distance[int]


def count_query(name: str, present: np.ndarray) -> Query:
    """``[rows with a value, rows without]``: a row is one or the other, so the pair moves by 1."""
    data = [bool(v) for v in present]

    def make(mechanism: str) -> Any:
        dp = _dp()
        return dp.t.make_count_by_categories(dp.vector_domain(dp.atom_domain(T=bool)), dp.symmetric_distance(),
                                             categories=[True], null_category=True, MO=_metric(dp, mechanism))
    return Query(name, data, make, integer=True)


def sum_query(name: str, values: np.ndarray, lo: float, hi: float) -> Query:
    """The sum of ``values`` (already mapped row-wise into ``[lo, hi]``), clamped by OpenDP."""
    data = [float(v) for v in np.clip(values, lo, hi)]

    def make(mechanism: str) -> Any:
        dp = _dp()
        return dp.t.make_clamp(dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance(),
                               bounds=(float(lo), float(hi))) >> dp.t.then_sum()
    return Query(name, data, make, integer=False)


def histogram_query(name: str, bins: np.ndarray, n_bins: int) -> Query:
    """Counts of rows per bin ``0 .. n_bins - 1`` (any other index: outside every bin, not released)."""
    data = [int(b) for b in bins]

    def make(mechanism: str) -> Any:
        dp = _dp()
        return dp.t.make_count_by_categories(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance(),
                                             categories=list(range(n_bins)), null_category=True,
                                             MO=_metric(dp, mechanism))
    return Query(name, data, make, integer=True)


def categories_query(name: str, labels: Sequence[str], categories: Sequence[str]) -> Query:
    """Counts of rows per public category, then one count for every other value (``<other>``)."""
    data = [str(v) for v in labels]

    def make(mechanism: str) -> Any:
        dp = _dp()
        return dp.t.make_count_by_categories(dp.vector_domain(dp.atom_domain(T=str)), dp.symmetric_distance(),
                                             categories=list(categories), null_category=True,
                                             MO=_metric(dp, mechanism))
    return Query(name, data, make, integer=True)


def _zcdp_epsilon(rho: float, delta: float) -> float:
    """OpenDP's (ε, δ) conversion of ρ-zCDP at ``delta``: that of a Gaussian costing exactly ρ."""
    dp = _dp()
    gauss = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float),
                               scale=1.0 / math.sqrt(2.0 * rho))
    return float(dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(gauss), delta).map(1.0)[0])


def rho_for(epsilon: float, delta: float) -> float:
    """The largest zCDP ρ whose (ε, δ) conversion (OpenDP's) is within ``epsilon`` at ``delta``."""
    if not 0 < delta < 1:
        raise FedlabDisclosureError(
            f"the Gaussian mechanism needs a delta in (0, 1), got {delta}; pass delta=1e-7 (say), or use the "
            "Laplace mechanism")
    lo, hi = 0.0, max(1.0, epsilon)
    while _zcdp_epsilon(hi, delta) < epsilon:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if _zcdp_epsilon(mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def release(queries: Sequence[Query], *, epsilon: float, delta: float = 0.0, mechanism: str = LAPLACE) -> Released:
    """Every query with noise, spending at most ``epsilon`` (and ``delta``) for all of them together.

    The noise of each query is the smallest of the equal split. The cost returned is the composition
    of what OpenDP's privacy map of each measurement says (the sum of the ε of pure DP, or of the ρ
    of zCDP converted by OpenDP at ``delta``), never our own formula for a mechanism.
    """
    if not queries:
        return Released({}, {}, 0.0, 0.0)
    if mechanism not in (LAPLACE, GAUSSIAN):
        raise FedlabDisclosureError(f"unknown DP mechanism {mechanism!r}; use 'laplace' or 'gaussian'")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise FedlabDisclosureError(f"epsilon must be a finite number > 0, got {epsilon}")
    dp = _dp()
    k = len(queries)
    share = epsilon / k if mechanism == LAPLACE else rho_for(epsilon, delta) / k
    for attempt in range(8):
        widen = 1.0 + 1e-6 * (10**attempt - 1)
        measurements, scales = [], {}
        for query in queries:
            transformation = query.transformation(mechanism)
            sensitivity = float(transformation.map(1))
            if mechanism == LAPLACE:
                scale = sensitivity / share * widen
                measurement = transformation >> dp.m.then_laplace(scale)
            else:
                scale = sensitivity / math.sqrt(2.0 * share) * widen
                measurement = transformation >> dp.m.then_gaussian(scale)
            measurements.append(measurement)
            scales[query.name] = scale
        total = math.fsum(float(m.map(1)) for m in measurements)  # ε (pure DP) or ρ (zCDP) add up
        if mechanism == LAPLACE:
            spent, spent_delta = total, 0.0
        else:
            spent, spent_delta = _zcdp_epsilon(total, delta), float(delta)
        if spent <= epsilon * (1 + _SLACK):
            break
    else:  # pragma: no cover - the widening converges within one or two attempts
        raise FedlabDisclosureError(f"could not fit the request's {k} queries within epsilon={epsilon}")
    values: dict[str, list[float]] = {}
    for query, measurement in zip(queries, measurements, strict=True):
        out = measurement(query.data)  # the noise is drawn here, by OpenDP
        values[query.name] = [float(v) for v in out] if isinstance(out, list) else [float(out)]
    return Released(values, scales, spent, spent_delta)
