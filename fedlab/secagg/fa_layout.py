"""Federated analytics as one summable vector: what each node puts in it, and what the sum gives back.

Under ``researcher.stats(..., secagg=True)`` a node computes its :class:`~fedlab.analytics.messages.FAReply`
exactly as in the clear, its disclosure rules applied, but sends its figures only masked, so that the
researcher learns nothing but their element-wise sum over the nodes. This module is the pure part:

1. :func:`skeleton`: a node's first answer, its reply with every figure 0. It keeps what a plain reply
   shows besides figures (the names of columns, levels and crosstab cells, ``None`` where a cell was
   suppressed, how many levels were withheld unnamed, ``refused``, ``allowance``, the histogram edges
   as the node rounded them), so that the researcher can lay the vector out and knows which node is
   missing from which sum.
2. :func:`layout_of`: the union of the skeletons, :class:`FALayout`, sent back to every node.
3. :func:`vectorize`: a node's figures in the layout's order. Whatever it does not answer (a level it
   does not have, a suppressed cell, a refused column, a column it does not know) is 0 there.
4. :mod:`.fa_rebuild` (``rebuild``, ``rebuild_replies``): from the exact sums, replies that the plain
   merge (:mod:`fedlab.analytics.merge`) turns into the pooled statistics.
5. :func:`check_secure_request`: what is not a sum (min, max, quantiles, histograms without edges) is
   refused before anything is asked.

**The vector** (each slot is summed over the nodes exactly: counts are Python ints, float64 figures are
exact rationals, see :func:`fedlab.secagg.fixed_point.encode_exact`): ``n_rows``; how many of the layout's
cells the node answers (a check that its answer did not change since its skeleton); per numeric column
``count, missing, sum, m2, W = count * mean, T = count * mean**2``; the histogram bins; per categorical
column ``count, missing`` and its levels; the crosstab cells; per pair of covariance columns over the rows
holding both ``n, W_x, W_y, m2_x, m2_y, c, T_x, T_y, T_xy`` (``T_xy = n * mean_x * mean_y``; a column with
itself: ``n, W, m2, T``). ``W`` and ``T`` are the terms of Chan's merge that make M2 linear in the nodes:
pooled ``M2 = sum(m2_k) + sum(T_k) - W**2 / N`` with ``W = sum(W_k)`` and pooled ``C = sum(c_k) +
sum(T_xy_k) - W_x * W_y / N``. They are built from each node's float mean, not its float sum, as the plain
merge uses them (so a constant column, whose mean a node sends exactly, pools to an M2 of exactly 0), but
as exact rationals, pooled with exact arithmetic: the only rounding left is the encoding's (each slot to a
multiple of 2**-64; T, the largest, must stay below 2**152) and the final conversion to float64. So the
pooled figures are the plain merge's without its float64 rounding; what still separates them from pooled
pandas is what the nodes' partials carry: each node's mean as a float64, off by up to half an ulp (about
1e-12 relative on the variance of 1e6 + N(0, 1) noise over a few hundred rows per node, in the clear as
here). An M2 within the encoding's rounding of 0 (``nodes * 2**-64 * (1 + |mean|)``) reads as exactly 0,
and a co-moment with such a column as 0.

**What the researcher learns, per cell.** From the skeletons: what a plain reply shows besides its
figures (above). From the sum: ``n_rows`` summed; per numeric column, over the nodes that answer it, the
total count, missing count, sum, ``sum(m2_k)`` and ``sum(n_k * mean_k**2)``, hence the pooled mean and
variance and also how much of the variance lies between the nodes' means (one figure more than the
pooled variance); per histogram bin, value-count level or crosstab cell, the sum of the counts the nodes
disclosed (a node that suppressed the cell adds 0, and its skeleton says so); per categorical column the
total count and missing count; per covariance pair the pooled count, means, M2s and co-moment and, as for
a column, the between-node parts. No single node's figure, unless all others add 0 to that slot: a cell
that only one node discloses is that node's count, as it would be in the clear (each node's own rules,
applied before masking, decide what it may disclose; a rule on the global sum is the researcher's), and a
column only one node answers gives that node's moments. The second slot (cells answered, summed) is known
from the skeletons already.

**What the rebuilt replies say about a withheld cell.** The plain merge sums the disclosed counts and
names the nodes that withheld a cell (a lower bound); a value-count level that no node disclosed is shown
as unknown. :func:`rebuild_replies` reproduces exactly that: the sums of the disclosed counts under
``"<secure sum>"`` and, per node, a figure-free reply carrying its marks (``None`` cells, withheld level
counts; a node that withheld a whole histogram marks every bin), so the merge attributes each withheld
cell to its node. :func:`rebuild` alone gives one reply, which cannot say "lower bound, withheld by node
b": there every bin, level and crosstab cell that any node withheld is ``None`` (reported as withheld by
the nodes together), and so is every level that some node which withheld unnamed levels did not name (it
may hold it): nothing is shown as exact that the plain merge marks as a lower bound. (Neither marks the
crosstab rows and columns of levels that a node left out of its table unnamed: a node's rules drop them.)

Not summable (:func:`check_secure_request` refuses them): min, max, median and quantiles, which are no
sums, and histograms given as a number of bins, whose edges need the min and max first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import msgspec

from fedlab.analytics.messages import (
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    FAReply,
    FARequest,
    NumericPartial,
)
from fedlab.errors import FedlabSecaggError

__all__ = [
    "MAX_SLOTS",
    "SECURE_SUM",
    "FALayout",
    "Slot",
    "check_secure_request",
    "layout_of",
    "skeleton",
    "vectorize",
]

#: The key of the summed reply in :func:`rebuild_replies` (node ids are the other keys).
SECURE_SUM = "<secure sum>"
#: The most values a layout may have: what a masked reply holds (256 MiB) at 8 limbs of 8 bytes per value.
MAX_SLOTS = (256 << 20) // 64
#: One value of a node's vector: counts are ints, figures floats, the Chan terms exact rationals.
Slot = int | float | Fraction

_NOT_SUMMABLE = ("min", "max", "median", "quantiles")
_NUMERIC_SLOTS = 6  # count, missing, sum, m2, W, T
_DIAGONAL_SLOTS = 4  # n, W, m2, T
_PAIR_SLOTS = 9  # n, W_x, W_y, m2_x, m2_y, c, T_x, T_y, T_xy
_HEAD_SLOTS = 2  # n_rows, cells answered
_ULP = Fraction(1, 1 << 64)  # the encoding's resolution: each slot is rounded to a multiple of it


class FALayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The order of the values in every node's vector (see the module docstring for the slots).

    ``numeric``: numeric columns; ``histograms``: column -> edges (columns of ``numeric``);
    ``categorical``: column -> levels; ``crosstab``: [rows column, columns column] or []; ``cells``: row
    value -> column values of the crosstab; ``covariance``: its columns, every pair of them.
    """

    numeric: list[str] = []
    histograms: dict[str, list[float]] = {}
    categorical: dict[str, list[str]] = {}
    crosstab: list[str] = []
    cells: dict[str, list[str]] = {}
    covariance: list[str] = []

    def __post_init__(self) -> None:
        # also run when a node decodes a layout: msgspec turns the ValueError into a ValidationError
        problem = _problem(self)
        if problem is not None:
            raise ValueError(problem)

    @property
    def size(self) -> int:
        """How many values a vector in this layout holds."""
        p = len(self.covariance)
        return (_HEAD_SLOTS + _NUMERIC_SLOTS * len(self.numeric)
                + sum(max(len(e) - 1, 0) for e in self.histograms.values())
                + sum(2 + len(levels) for levels in self.categorical.values())
                + sum(len(cols) for cols in self.cells.values())
                + _DIAGONAL_SLOTS * p + _PAIR_SLOTS * (p * (p - 1) // 2))


def _problem(layout: FALayout) -> str | None:
    size = layout.size
    if size > MAX_SLOTS:
        return (f"the secure analytics layout has {size} values, more than the {MAX_SLOTS} a masked reply may "
                "hold; ask for fewer columns, levels or covariance columns at once")
    for name, items in (("numeric", layout.numeric), ("covariance", layout.covariance)):
        if len(set(items)) != len(items):
            return f"the layout's {name} columns are not distinct"
    for column, edges in layout.histograms.items():
        if column not in layout.numeric or len(edges) < 2:
            return f"the layout's histogram of {column!r} needs at least 2 edges and a numeric column"
    if len(layout.crosstab) not in (0, 2) or (layout.cells and not layout.crosstab):
        return "the layout's crosstab names two columns, or none and then has no cells"
    return None


# -- what can be summed -----------------------------------------------------------------------------


def check_secure_request(request: FARequest) -> None:
    """Raise FedlabSecaggError if ``request`` asks for something that is not a sum over the nodes."""
    asked = set(request.stats) | {s for per in request.stats_args.values() for s in per}
    cannot = [s for s in _NOT_SUMMABLE if s in asked]
    if cannot or request.thresholds:
        what = ", ".join(cannot + (["quantile thresholds"] if request.thresholds else []))
        raise FedlabSecaggError(
            f"{what}: not available with secure aggregation yet (they are not sums over the nodes); ask for "
            "them without secagg=True, or drop those statistics")
    no_edges = [c for c, per in request.stats_args.items() if "histogram" in per and not _edges_given(per)]
    if no_edges or ("histogram" in request.stats and not request.stats_args):
        which = f"of {no_edges} " if no_edges else ""
        raise FedlabSecaggError(
            f"histograms {which}were asked without edges: a number of bins needs every node's min and max first, "
            "which secure aggregation does not release; pass the edges, e.g. bins=[0, 20, 40, 60] or "
            "stats_args={column: {'histogram': {'edges': [0, 20, 40, 60]}}}")


def _edges_given(per: Mapping[str, Any]) -> bool:
    args = per.get("histogram")
    return isinstance(args, Mapping) and isinstance(args.get("edges"), list) and len(args["edges"]) >= 2


# -- the node: skeleton and vector ------------------------------------------------------------------


def skeleton(reply: FAReply) -> FAReply:
    """``reply`` with every figure 0 (``None`` kept where a cell was suppressed), for the layout phase."""
    numeric = {c: NumericPartial(count=0, missing=0, sum=0.0, mean=0.0, m2=0.0,
                                 histogram_edges=None if p.histogram_edges is None else list(p.histogram_edges),
                                 histogram=None if p.histogram is None else _zeros(p.histogram))
               for c, p in reply.numeric.items()}
    categorical = {c: CategoricalPartial(count=0, missing=0, suppressed_levels=int(p.suppressed_levels),
                                         value_counts={k: None if v is None else 0 for k, v in p.value_counts.items()})
                   for c, p in reply.categorical.items()}
    crosstab = None
    if reply.crosstab is not None:
        t = reply.crosstab
        crosstab = CrosstabPartial(rows=t.rows, cols=t.cols, cells={r: {c: None if v is None else 0 for c, v in
                                                                         line.items()} for r, line in t.cells.items()})
    covariance = None
    if reply.covariance is not None:
        p = len(reply.covariance.columns)

        def zeros() -> list[list[float]]:
            return [[0.0] * p for _ in range(p)]

        covariance = CovariancePartial(columns=list(reply.covariance.columns), n=[[0] * p for _ in range(p)],
                                       mean_x=zeros(), mean_y=zeros(), m2_x=zeros(), m2_y=zeros(), c=zeros())
    return FAReply(dataset_id=reply.dataset_id, n_rows=0, numeric=numeric, categorical=categorical,
                   crosstab=crosstab, covariance=covariance, refused=dict(reply.refused),
                   allowance=dict(reply.allowance))


def _zeros(counts: Sequence[int | None]) -> list[int | None]:
    return [None if v is None else 0 for v in counts]


def layout_of(skeletons: Mapping[str, FAReply]) -> FALayout:
    """The union of the nodes' skeletons, the same whatever their order (nodes are read sorted by id).

    Only names and marks are read, never a figure. Raises FedlabSecaggError if the nodes rounded a
    histogram's edges differently or answered crosstabs of different columns.
    """
    nodes = sorted(skeletons.items())
    edges: dict[str, dict[str, tuple[float, ...]]] = {}
    for node, reply in nodes:
        for column, p in reply.numeric.items():
            if p.histogram_edges is not None:
                edges.setdefault(column, {})[node] = tuple(p.histogram_edges)
    histograms = {}
    for column, seen in sorted(edges.items()):
        if len(set(seen.values())) > 1:
            raise FedlabSecaggError(
                f"the nodes answered the histogram of {column!r} with different edges ({seen}): each node rounds "
                "the edges to its own threshold grid; give rounder edges (multiples of a power of ten) that every "
                "node keeps as they are")
        histograms[column] = list(next(iter(seen.values())))
    levels: dict[str, set[str]] = {}
    for _, reply in nodes:
        for column, cp in reply.categorical.items():
            levels.setdefault(column, set()).update(cp.value_counts)
    tables = {node: (r.crosstab.rows, r.crosstab.cols) for node, r in nodes if r.crosstab is not None}
    if len(set(tables.values())) > 1:
        raise FedlabSecaggError(f"the nodes answered crosstabs of different columns ({tables}); ask again")
    cells: dict[str, set[str]] = {}
    for _, reply in nodes:
        if reply.crosstab is not None:
            for row, line in reply.crosstab.cells.items():
                cells.setdefault(row, set()).update(line)
    covariance: dict[str, None] = {}
    for _, reply in nodes:
        if reply.covariance is not None:
            covariance.update(dict.fromkeys(reply.covariance.columns))
    try:
        return FALayout(numeric=sorted({c for _, r in nodes for c in r.numeric}), histograms=histograms,
                        categorical={c: sorted(v) for c, v in sorted(levels.items())},
                        crosstab=list(next(iter(tables.values()), ())),
                        cells={r: sorted(v) for r, v in sorted(cells.items())}, covariance=list(covariance))
    except ValueError as exc:
        raise FedlabSecaggError(str(exc)) from None


def vectorize(reply: FAReply, layout: FALayout) -> list[Slot]:
    """The node's figures in ``layout``'s order; 0 wherever it does not answer (see the module docstring).

    Raises FedlabSecaggError for a figure that is not finite (a column holding infinite values).
    """
    out: list[Slot] = [int(reply.n_rows), _answered(reply, layout)]
    for column in layout.numeric:
        p = reply.numeric.get(column)
        if p is None:
            out += [0] * _NUMERIC_SLOTS
            continue
        what = f"column {column!r}"
        w, t = _chan(p.count, p.mean, p.mean, what)
        out += [int(p.count), int(p.missing), _finite(p.sum, what), _finite(p.m2, what), w, t]
    for column, edges in layout.histograms.items():
        bins = _histogram(reply, column, edges)
        out += [0] * (len(edges) - 1) if bins is None else [0 if v is None else int(v) for v in bins]
    for column, levels in layout.categorical.items():
        cp = reply.categorical.get(column)
        if cp is None:
            out += [0] * (2 + len(levels))
            continue
        out += [int(cp.count), int(cp.missing), *(int(cp.value_counts.get(v) or 0) for v in levels)]
    table = _crosstab(reply, layout)
    for row, cols in layout.cells.items():
        line = table.cells.get(row, {}) if table is not None else {}
        out += [int(line.get(c) or 0) for c in cols]
    out += _covariance_slots(reply.covariance, layout.covariance)
    return out


def _covariance_slots(cov: CovariancePartial | None, columns: Sequence[str]) -> list[Slot]:
    out: list[Slot] = []
    index = {name: i for i, name in enumerate(cov.columns)} if cov is not None else {}
    for i, ci in enumerate(columns):
        for cj in columns[i:]:
            a, b = index.get(ci), index.get(cj)
            if cov is None or a is None or b is None:
                out += [0] * (_DIAGONAL_SLOTS if ci == cj else _PAIR_SLOTS)
                continue
            n, mx, my = int(cov.n[a][b]), cov.mean_x[a][b], cov.mean_y[a][b]
            what = f"the covariance of {ci!r} and {cj!r}"
            wx, tx = _chan(n, mx, mx, what)
            if ci == cj:
                out += [n, wx, _finite(cov.m2_x[a][b], what), tx]
                continue
            wy, ty = _chan(n, my, my, what)
            _, txy = _chan(n, mx, my, what)
            out += [n, wx, wy, _finite(cov.m2_x[a][b], what), _finite(cov.m2_y[a][b], what),
                    _finite(cov.c[a][b], what), tx, ty, txy]
    return out


def _chan(n: int, mean_x: float, mean_y: float, what: str) -> tuple[Slot, Slot]:
    """``(n * mean_x, n * mean_x * mean_y)`` exactly (0 without values)."""
    if not n:
        return 0, 0
    x = Fraction(_finite(mean_x, what))
    return n * x, n * x * Fraction(_finite(mean_y, what))


def _finite(value: float, what: str) -> float:
    f = float(value)
    if not math.isfinite(f):
        raise FedlabSecaggError(f"{what} has an infinite or NaN figure (it holds infinite values): a secure sum "
                                "needs finite ones; leave it out, or ask without secagg=True")
    return f


def _histogram(reply: FAReply, column: str, edges: Sequence[float]) -> list[int | None] | None:
    """The node's bins of ``column`` if it answered them over exactly these edges, else None."""
    p = reply.numeric.get(column)
    if p is None or p.histogram is None or p.histogram_edges is None or list(p.histogram_edges) != list(edges):
        return None
    return list(p.histogram) if len(p.histogram) == len(edges) - 1 else None


def _crosstab(reply: FAReply, layout: FALayout) -> CrosstabPartial | None:
    t = reply.crosstab
    return t if t is not None and [t.rows, t.cols] == list(layout.crosstab) else None


def _answered(reply: FAReply, layout: FALayout) -> int:
    """How many of the layout's columns and cells ``reply`` gives a figure for (its skeleton gives the same)."""
    total = sum(1 for c in layout.numeric if c in reply.numeric)
    for column, edges in layout.histograms.items():
        total += sum(1 for v in _histogram(reply, column, edges) or [] if v is not None)
    for column, levels in layout.categorical.items():
        cp = reply.categorical.get(column)
        if cp is not None:
            total += 1 + sum(1 for v in levels if cp.value_counts.get(v, None) is not None)
    table = _crosstab(reply, layout)
    if table is not None:
        total += sum(1 for r, cols in layout.cells.items() for c in cols if table.cells.get(r, {}).get(c) is not None)
    if reply.covariance is not None:
        total += sum(1 for c in layout.covariance if c in reply.covariance.columns)
    return total
