"""Wire types of federated analytics: the request, the per-column partials, the reply.

A node never sends rows, only *partials*: small mergeable summaries from which the
researcher computes the statistic over all nodes exactly (moments as (n, mean, M2), counts
for histograms, value counts and crosstabs, pairwise co-moments for covariance). Merging
partials in any order gives the same result as computing on the pooled rows.

Disclosure control happens on the node before a partial leaves it: a suppressed cell is
``None`` on the wire (never 0, never dropped), and a column the node refuses is listed in
``FAReply.refused`` with the rule and threshold that refused it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from fedlab.protocol.dp_messages import DPQuery, DPSpent
from fedlab.protocol.messages import Message, register
from fedlab.protocol.secagg_messages import SecaggInput

__all__ = [
    "CATEGORICAL_STATS",
    "NUMERIC_STATS",
    "STATISTICS",
    "CategoricalPartial",
    "CovariancePartial",
    "CrosstabPartial",
    "FAReply",
    "FASecure",
    "FARequest",
    "NumericPartial",
]

# Statistics a researcher may ask for, by their canonical names.
NUMERIC_STATS = ("count", "missing", "sum", "mean", "var", "std", "min", "max", "median", "quantiles",
                 "histogram")
CATEGORICAL_STATS = ("value_counts",)
TABLE_STATS = ("crosstab", "cov", "corr")
STATISTICS = NUMERIC_STATS + CATEGORICAL_STATS + TABLE_STATS

ColumnName = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class FASecure(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A securely aggregated analytics request (``researcher.stats(..., secagg=True)``).

    ``phase`` "layout": answer the reply's skeleton (names and suppression marks, every figure 0;
    see :mod:`fedlab.secagg.fa_layout`). ``phase`` "masked": answer the figures in the order of
    ``layout`` (an msgpack-encoded ``FALayout``), masked for session ``input``.
    """

    phase: Annotated[str, msgspec.Meta(pattern="^(layout|masked)$")]
    input: SecaggInput | None = None
    layout: Annotated[bytes, msgspec.Meta(max_length=16 << 20)] = b""


class FARequest(Message, frozen=True):
    """Ask a node for partial statistics over one of its datasets.

    ``stats``: names from STATISTICS. ``columns``: the columns to summarise ([] = every column
    the node allows). ``stats_args``: per-column arguments, e.g.
    ``{"age": {"histogram": {"edges": [0, 40, 60, 100]}, "value_counts": {"dropna": False}}}``.
    ``crosstab``: the two columns of a two-way table. ``thresholds``: for a quantile round,
    per column the values t for which the node returns how many values are <= t. ``dp``: answer
    with differential privacy, spending ``dp.epsilon`` of this researcher's budget on the node
    (see :mod:`fedlab.node.dp_analytics`).
    """

    dataset_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    stats: Annotated[list[str], msgspec.Meta(max_length=64)]
    columns: list[ColumnName] = []
    stats_args: dict[str, dict[str, dict[str, Any]]] = {}
    crosstab: Annotated[list[ColumnName], msgspec.Meta(max_length=2)] = []
    thresholds: dict[str, list[float]] = {}
    secagg: FASecure | None = None
    dp: DPQuery | None = None


class NumericPartial(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One numeric column on one node. Missing values are skipped by every numeric statistic.

    ``mean``/``m2`` are the mean and the sum of squared deviations of the ``count`` values;
    ``min``/``max`` are only present when asked for and allowed (possibly with noise);
    ``histogram`` counts per bin of ``histogram_edges`` (None = suppressed bin);
    ``below`` is, for a quantile round, the count of values <= each requested threshold, or None
    where the node withheld that count (see :mod:`fedlab.privacy.cuts`); ``resolution`` is the
    grid step to which the node rounded those thresholds and the histogram's edges, and
    ``below_at`` the points it counted at (each threshold rounded: on a derived dataset the grid is
    its source's, so it need not be made of multiples of ``resolution``).
    """

    count: int
    missing: int
    sum: float
    mean: float
    m2: float
    min: float | None = None
    max: float | None = None
    histogram_edges: list[float] | None = None
    histogram: list[int | None] | None = None
    below: list[int | None] | None = None
    resolution: float | None = None
    below_at: list[float] | None = None


class CategoricalPartial(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Value counts of one column on one node (keys are str(value); None = suppressed count).

    Missing values appear under the key ``"<missing>"`` when the request asked for
    ``{"value_counts": {"dropna": False}}``, else they are only counted in ``missing``.
    ``suppressed_levels`` is how many levels the node withheld: their names are never sent.
    """

    count: int
    missing: int
    value_counts: dict[str, int | None]
    suppressed_levels: int = 0


class CrosstabPartial(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A two-way table on one node: ``cells[row_value][col_value]`` (None = suppressed)."""

    rows: str
    cols: str
    cells: dict[str, dict[str, int | None]]


class CovariancePartial(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Pairwise-complete co-moments: for every pair (i, j) of ``columns``, over the rows where both
    are present, the count ``n``, the means of i and of j, their M2s and the co-moment ``c``
    (sum of (x_i - mean_i)(x_j - mean_j)). Square matrices indexed like ``columns``.
    """

    columns: list[str]
    n: list[list[int]]
    mean_x: list[list[float]]
    mean_y: list[list[float]]
    m2_x: list[list[float]]
    m2_y: list[list[float]]
    c: list[list[float]]


class FAReply(Message, frozen=True):
    """A node's partials for one FARequest. ``refused``: column -> why the node would not answer.
    ``allowance``: column -> how many more distinct thresholds / histogram edges this researcher may
    have answered on it (the node's ``disclosure.threshold_allowance``), for the columns asked.
    ``dp``: for a DP answer, what it cost and the noise it carries; ``n_rows`` is then noisy too."""

    dataset_id: str
    n_rows: int
    numeric: dict[str, NumericPartial] = {}
    categorical: dict[str, CategoricalPartial] = {}
    crosstab: CrosstabPartial | None = None
    covariance: CovariancePartial | None = None
    refused: dict[str, str] = {}
    allowance: dict[str, int] = {}
    masked: Annotated[bytes, msgspec.Meta(max_length=256 << 20)] | None = None
    secagg_session: Annotated[str, msgspec.Meta(max_length=256)] = ""
    dp: DPSpent | None = None


register("fa_request", FARequest)
register("fa_reply", FAReply)
