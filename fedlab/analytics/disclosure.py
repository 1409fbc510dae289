"""The node operator's disclosure rules, applied on the node to partials before they leave it.

A node computes partials (see :mod:`fedlab.analytics.messages`) and then passes the reply
through :func:`apply_rules`, which removes, suppresses or perturbs whatever this node's
operator does not allow out. The rules come only from the node's ``config.toml``
(``[disclosure]`` table); a researcher can never change them. The defaults follow the
usual practice of federated analytics platforms (NVFlare's statistics privacy filters,
DataSHIELD's ``nfilter`` settings):

``enabled = true``
    ``false`` switches analytics off on this node: every request is refused
    (:func:`check_enabled`).
``min_count = 10``
    A statistic over fewer than this many values is refused: a numeric or categorical
    column whose non-missing ``count`` is smaller is removed from the reply; a crosstab
    whose total is smaller, or a covariance in which any pair of columns has fewer
    complete rows, is refused whole. (DataSHIELD's ``nfilter.subset`` / ``nfilter.glm``.)
``cell_threshold = 3``
    A histogram bin, a value count or a crosstab cell with ``0 < count < cell_threshold``
    is *suppressed*: sent as ``None`` (never as 0, never dropped, so the researcher sees
    that it was suppressed). A count of 0 is sent as 0. (DataSHIELD's ``nfilter.tab``.)
    So that a suppressed cell cannot be recovered by subtracting the others from a known
    total, a second cell is suppressed too (*secondary suppression*) wherever exactly one
    cell of a group is suppressed: the smallest positive cell of the group. The groups
    are a histogram's bins (their total is the column's ``count`` when every value lies
    within the edges), a column's value counts other than ``"<missing>"`` (their total
    is ``count``), and every row and every column of a crosstab (their totals are the
    value counts of its two columns).
``max_bins_fraction = 0.1``
    A histogram over ``count`` values may have at most
    ``max(1, floor(max_bins_fraction * count))`` bins; a finer one is refused. Only the
    histogram is dropped (refusal recorded under ``"COLUMN.histogram"``); the column's
    other statistics are still sent. (NVFlare's ``max_bins_percent``.)
``min_max = "off"``
    ``"off"``: the minimum and maximum, which are single individuals' values, are never
    sent (a refusal ``"COLUMN.min/max"`` is recorded for the columns they were asked for);
    ``"noisy"``: they are sent moved outward by random noise; ``"exact"``: sent as they are.
``min_max_noise = 0.05``
    With ``"noisy"``: the true min is lowered and the true max raised by an amount
    uniform in ``(0, min_max_noise * scale]`` where ``scale`` is the column's local range
    (``max - min``), or ``|value|`` (1.0 when the value is 0) when the range is 0. The
    noise is outward so that the federated range still covers all the data.
    (NVFlare's ``min_noise_level`` / ``max_noise_level``.)
``excluded_columns = []``
    Columns that are never summarised (identifiers, free text, ...): removed from the
    reply and listed in ``refused``; a crosstab or covariance that involves one is refused.

The rules above are applied to each reply; the rules that need the node's data and its memory
of earlier replies are applied before, on the node, by :mod:`fedlab.privacy` (provenance of
derived columns, validated transform specs, cuts, levels and groups) with the state in the
node's SQLite database (:mod:`fedlab.node.privacy_state`). Together, with the defaults:

**What an unlimited researcher can learn** of one node's source column (any number of requests,
any derived datasets, hand-written messages, one researcher key — or all researchers together on
an insecure node):

* exact ``count`` and ``missing`` of every non-excluded column, and exact ``sum``, ``mean`` and
  ``M2`` over at least ``min_count`` *real* values (imputed values never count);
* the count of values below at most ``threshold_allowance`` (500) distinct points, each rounded,
  in the source column's units whatever copy is asked, to a power-of-ten grid no finer than
  ``threshold_resolution`` (1%) of the source column's std, each at
  least ``min_count`` (10) ranks from either end and ``cell_threshold`` (3) ranks from every other
  cut it ever got: so the count in any interval it can form is 0 or >= 3, no tail of fewer than 10
  values is delimited, and no value is located more finely than the grid. Histogram edges are such
  points too. Refining at one stored cut can narrow the gap between two neighbouring order
  statistics to the grid step, one allowance unit per point;
* value counts of a column with at most ``levels_max`` (40) levels and at most ``levels_density``
  (33%) of its count, without the levels held fewer than 3 times and one more where only one is;
  those levels' names are never sent, in value counts, crosstabs or one-hot columns (folded into
  ``<other>``);
* covariances over columns whose groups (for a column of at most ``group_levels`` = 5 values) hold
  >= 10 rows, with >= 10 complete rows per pair and no subset of 1-9 rows singled out by
  missingness;
* min/max only as the operator allows; with ``"noisy"``, one fixed noisy value per source column.

**What it cannot learn**: any excluded column or anything derived from one; any value of a row;
the name of a suppressed level; the count of 1 or 2 values in any interval; the minimum or
maximum with ``min_max = "off"`` (it can locate a fixed outward fence 5-10% of the range beyond
the data, never the true extremes); a statistic over fewer than 10 real values; a path or data value in
an error message.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from fractions import Fraction
from typing import Any

import msgspec
import numpy as np

from fedlab.analytics.disclosure_rules import (
    MIN_MAX_MODES,
    RULE_HELP,
    DisclosureRules,
    check_enabled,
    describe,
)
from fedlab.analytics.messages import (
    CategoricalPartial,
    CovariancePartial,
    CrosstabPartial,
    FAReply,
    NumericPartial,
)

__all__ = [
    "COVARIANCE_KEY",
    "CROSSTAB_KEY",
    "MIN_MAX_MODES",
    "RULE_HELP",
    "DisclosureRules",
    "apply_rules",
    "check_enabled",
    "describe",
]

# Keys of FAReply.refused for the table statistics (columns use their own name).
CROSSTAB_KEY = "crosstab"
COVARIANCE_KEY = "cov"
MISSING_KEY = "<missing>"


# --- applying the rules -----------------------------------------------------------------------


def _too_few(what: str, rules: DisclosureRules) -> str:
    return f"min_count: {what}, fewer than this node's minimum of {rules.min_count} (disclosure.min_count)"


_EXCLUDED_COLUMN = "excluded by the node's operator (disclosure.excluded_columns)"


def _column_refusal(name: str, count: int, rules: DisclosureRules) -> str | None:
    """Why a whole column may not leave this node (excluded, or too few values), or None."""
    if name in rules.excluded_columns:
        return _EXCLUDED_COLUMN
    if count < rules.min_count:
        return _too_few(f"{count} non-missing values", rules)
    return None


def _excluded(columns: Iterable[str]) -> str:
    return f"{_EXCLUDED_COLUMN}: {', '.join(columns)}"


def _suppress_group(cells: MutableMapping[Any, int | None], group: Sequence[Any]) -> bool:
    """Secondary suppression in one group of cells whose total may be known: if exactly one is
    suppressed, also suppress the smallest positive one. Return whether a cell was changed."""
    if sum(1 for k in group if cells[k] is None) != 1:
        return False
    positive = [(v, i) for i, k in enumerate(group) if (v := cells[k]) is not None and v > 0]
    if not positive:
        return False  # nothing left to hide it among (the others are 0)
    cells[group[min(positive)[1]]] = None
    return True


def _primary(value: int | None, threshold: int) -> int | None:
    return None if value is None or 0 < value < threshold else value


def _suppress_list(counts: Sequence[int | None], threshold: int) -> list[int | None]:
    cells: dict[int, int | None] = {i: _primary(c, threshold) for i, c in enumerate(counts)}
    _suppress_group(cells, list(cells))
    return [cells[i] for i in range(len(counts))]


def suppressed_levels(counts: Mapping[str, int | None], threshold: int) -> set[str]:
    """The levels of a column that may not be named: primary (0 < n < threshold, or already None)
    and, when exactly one is, the smallest other positive level (secondary). Decided from the
    column's own counts, so every value count and crosstab over the column hides the same ones.
    ``"<missing>"`` is not a level (its count is released in ``missing`` anyway)."""
    cells = {k: _primary(v, threshold) for k, v in counts.items() if k != MISSING_KEY}
    _suppress_group(cells, list(cells))
    return {k for k, v in cells.items() if v is None}


def _suppress_value_counts(counts: Mapping[str, int | None], threshold: int) -> tuple[dict[str, int | None], int]:
    """The value counts without their suppressed levels (never named), and how many were left out."""
    hidden = suppressed_levels(counts, threshold)
    return {k: v for k, v in counts.items() if k not in hidden}, len(hidden)


def _suppress_table(table: Mapping[str, Mapping[str, int | None]], threshold: int) -> dict[str, dict[str, int | None]]:
    cells: dict[tuple[str, str], int | None] = {
        (r, c): _primary(v, threshold) for r, row in table.items() for c, v in row.items()
    }
    rows: dict[str, list[tuple[str, str]]] = {}
    cols: dict[str, list[tuple[str, str]]] = {}
    for key in cells:
        rows.setdefault(key[0], []).append(key)
        cols.setdefault(key[1], []).append(key)
    groups = [*rows.values(), *cols.values()]
    changed = True
    while changed:  # each pass only adds suppressions, so this ends
        changed = False
        for group in groups:
            changed |= _suppress_group(cells, group)
    return {r: {c: cells[(r, c)] for c in row} for r, row in table.items()}


def _max_bins(rules: DisclosureRules, count: int) -> int:
    # Fraction(repr(x)) is the decimal the operator wrote: floor(0.29 * 100) is 29, not 28.
    return max(1, math.floor(Fraction(repr(rules.max_bins_fraction)) * count))


def _column_rng(key: int, column: str) -> np.random.Generator:
    digest = hashlib.sha256(column.encode("utf-8", "surrogatepass")).digest()
    return np.random.default_rng([key, int.from_bytes(digest[:8], "big")])


def _outward(value: float, bound: float, direction: float, rng: np.random.Generator) -> float:
    """Move ``value`` by an amount uniform in (0, bound] in ``direction`` (-1 down, +1 up)."""
    if not math.isfinite(value) or not (bound > 0 and math.isfinite(bound)):
        return value  # +-inf is already as far out as it gets
    shift = bound - float(rng.uniform(0.0, bound))  # uniform in (0, bound]
    moved = value + direction * shift
    if (moved - value) * direction <= 0:  # the shift vanished in rounding: move by one ulp
        moved = math.nextafter(value, direction * math.inf)
    return moved


def _noisy_min_max(part: NumericPartial, noise: float, rng: np.random.Generator) -> NumericPartial:
    lo, hi = part.min, part.max
    if lo is not None and hi is not None and hi > lo and math.isfinite(hi - lo):
        scale = hi - lo
    else:
        present = [abs(v) for v in (lo, hi) if v is not None and math.isfinite(v)]
        scale = max(present, default=0.0) or 1.0
    return msgspec.structs.replace(
        part,
        min=None if lo is None else _outward(lo, noise * scale, -1.0, rng),
        max=None if hi is None else _outward(hi, noise * scale, +1.0, rng),
    )


def _numeric(
    name: str,
    part: NumericPartial,
    rules: DisclosureRules,
    refused: dict[str, str],
    asked_min_max: Collection[str],
    noise_key: int,
    fixed: tuple[float, float] | None = None,
) -> NumericPartial:
    histogram = part.histogram
    if histogram is not None:
        limit = _max_bins(rules, part.count)
        if len(histogram) > limit:
            refused[f"{name}.histogram"] = (
                f"max_bins_fraction: {len(histogram)} bins for {part.count} values exceeds this node's "
                f"maximum of {limit} bins (disclosure.max_bins_fraction = {rules.max_bins_fraction})"
            )
            part = msgspec.structs.replace(part, histogram=None, histogram_edges=None)
        else:
            part = msgspec.structs.replace(part, histogram=_suppress_list(histogram, rules.cell_threshold))
    if rules.min_max == "off":
        if name in asked_min_max:
            refused[f"{name}.min/max"] = (
                'min_max: this node does not release minimum and maximum values (disclosure.min_max = "off")'
            )
        if part.min is not None or part.max is not None:
            part = msgspec.structs.replace(part, min=None, max=None)
    elif rules.min_max == "noisy" and fixed is not None and (part.min is not None or part.max is not None):
        part = msgspec.structs.replace(part, min=None if part.min is None else fixed[0],
                                       max=None if part.max is None else fixed[1])
    elif rules.min_max == "noisy" and (part.min is not None or part.max is not None):
        part = _noisy_min_max(part, rules.min_max_noise, _column_rng(noise_key, name))
    return part


def _crosstab(table: CrosstabPartial, rules: DisclosureRules, refused: dict[str, str]) -> CrosstabPartial | None:
    excluded = [c for c in (table.rows, table.cols) if c in rules.excluded_columns]
    if excluded:
        refused[CROSSTAB_KEY] = _excluded(excluded)
        return None
    total = sum(v for row in table.cells.values() for v in row.values() if v is not None)
    if total < rules.min_count:
        refused[CROSSTAB_KEY] = _too_few(f"crosstab total of {total}", rules)
        return None
    return msgspec.structs.replace(table, cells=_suppress_table(table.cells, rules.cell_threshold))


def _covariance(cov: CovariancePartial, rules: DisclosureRules, refused: dict[str, str]) -> CovariancePartial | None:
    excluded = [c for c in cov.columns if c in rules.excluded_columns]
    if excluded:
        refused[COVARIANCE_KEY] = _excluded(excluded)
        return None
    for i, row in enumerate(cov.n):
        for j, n in enumerate(row):
            if n < rules.min_count:
                pair = f"the pair ({cov.columns[i]}, {cov.columns[j]})" if i != j else cov.columns[i]
                refused[COVARIANCE_KEY] = _too_few(f"{pair} has {n} complete rows", rules)
                return None
    return cov


def apply_rules(
    reply: FAReply,
    rules: DisclosureRules,
    *,
    rng: np.random.Generator,
    asked_min_max: Collection[str] = (),
    noisy: Mapping[str, tuple[float, float]] | None = None,
) -> FAReply:
    """Return ``reply`` as this node's rules let it leave: a new FAReply in which excluded
    columns and columns under ``min_count`` are removed, small cells suppressed (None),
    over-fine histograms, min/max (unless allowed), small crosstabs and covariances refused,
    each refusal recorded in ``refused`` with the rule and threshold that made it.

    ``asked_min_max``: the columns for which the request asked for min or max, so that a
    refusal is recorded for them when ``min_max = "off"``. With ``min_max = "noisy"``, ``noisy``
    gives each column's noisy range (the node fixes it per source column, see
    :mod:`fedlab.privacy.noise`); for columns without one, ``rng`` draws the noise. Raises
    FedlabDisclosureError if analytics are switched off (``enabled = false``).
    """
    check_enabled(rules)
    refused = dict(reply.refused)
    noise_key = int(rng.integers(0, 2**63)) if rules.min_max == "noisy" else 0

    numeric: dict[str, NumericPartial] = {}
    for name, part in reply.numeric.items():
        if (why := _column_refusal(name, part.count, rules)) is not None:
            refused[name] = why
        else:
            numeric[name] = _numeric(name, part, rules, refused, asked_min_max, noise_key, (noisy or {}).get(name))

    categorical: dict[str, CategoricalPartial] = {}
    for name, cpart in reply.categorical.items():
        if (why := _column_refusal(name, cpart.count, rules)) is not None:
            refused[name] = why
        else:
            kept, n_hidden = _suppress_value_counts(cpart.value_counts, rules.cell_threshold)
            categorical[name] = msgspec.structs.replace(
                cpart, value_counts=kept, suppressed_levels=cpart.suppressed_levels + n_hidden)

    crosstab = None if reply.crosstab is None else _crosstab(reply.crosstab, rules, refused)
    covariance = None if reply.covariance is None else _covariance(reply.covariance, rules, refused)
    return msgspec.structs.replace(
        reply, numeric=numeric, categorical=categorical, crosstab=crosstab, covariance=covariance, refused=refused
    )

