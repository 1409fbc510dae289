"""A node operator's differential-privacy rules: the ``[privacy]`` table of ``config.toml``.

Differential privacy (DP) gives a guarantee that composes: every answer released with DP costs
some ε (and, for Gaussian noise or DP-SGD, some δ), and the total a researcher can learn about
any one row is bounded by the sum of what it spent. The operator sets that total once, here:
``epsilon_budget`` and ``delta`` are what each researcher (by its public key; on an insecure
node every researcher shares one identity) may spend on each *source* dataset, over analytics
and training together. A dataset derived on the node spends from its source's budget.

``bounds`` (column -> ``[lo, hi]``) are clamp bounds the operator declares for DP sums, means,
variances and quantiles; they take precedence over bounds a researcher sends. ``categories``
(column -> list of levels) are the public levels of a column for DP value counts and crosstabs.
Both must come from knowledge about the column (its units, its codebook), never from the data,
or the guarantee does not hold.

Only this file sets these rules; nothing a researcher sends can change them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlab.errors import FedlabConfigError

__all__ = ["DP_RULE_HELP", "DPRules"]

DP_RULE_HELP = {
    "require_dp": "true: this node answers analytics and trains ONLY with differential privacy (exact statistics "
                  "and non-DP training are refused); false: exact answers stay possible under [disclosure]",
    "epsilon_budget": "the total epsilon each researcher may spend on each source dataset (analytics and "
                      "training together; derived datasets spend from their source); the node refuses a request "
                      "that would go over it. Smaller is more private: 1 is strong, 10 is moderate",
    "delta": "the total delta each researcher may spend on each source dataset (Gaussian noise and DP training "
             "spend it; keep it well below 1 / rows)",
}


@dataclass(frozen=True)
class DPRules:
    """The ``[privacy]`` table. Defaults: DP optional, ε 10 and δ 1e-6 per researcher and dataset."""

    require_dp: bool = False
    epsilon_budget: float = 10.0
    delta: float = 1e-6
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DPRules:
        """Read and check a ``[privacy]`` table; raise FedlabConfigError saying what to fix."""
        known = {"require_dp", "epsilon_budget", "delta", "bounds", "categories"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedlabConfigError(f"[privacy] has unknown key(s) {', '.join(unknown)}; allowed keys are "
                                    f"{', '.join(sorted(known))}")
        require_dp = data.get("require_dp", False)
        if not isinstance(require_dp, bool):
            raise FedlabConfigError(f"[privacy] require_dp must be true or false, not {require_dp!r}")
        budget = _number(data, "epsilon_budget", 10.0)
        if not (budget >= 0 and math.isfinite(budget)):
            raise FedlabConfigError(f"[privacy] epsilon_budget must be a finite number >= 0, not {budget}")
        delta = _number(data, "delta", 1e-6)
        if not 0 <= delta < 1:
            raise FedlabConfigError(f"[privacy] delta must be >= 0 and < 1 (for example 1e-6), not {delta}")
        return cls(require_dp=require_dp, epsilon_budget=budget, delta=delta,
                   bounds=_bounds(data.get("bounds", {})), categories=_categories(data.get("categories", {})))


def _number(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FedlabConfigError(f"[privacy] {key} must be a number, not {value!r}")
    return float(value)


def _bounds(table: Any) -> dict[str, tuple[float, float]]:
    if not isinstance(table, Mapping):
        raise FedlabConfigError("[privacy.bounds] must be a table: column = [lo, hi]")
    out: dict[str, tuple[float, float]] = {}
    for column, pair in table.items():
        ok = (isinstance(pair, list) and len(pair) == 2
              and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair))
        if not ok or not (math.isfinite(pair[0]) and math.isfinite(pair[1]) and pair[0] < pair[1]):
            raise FedlabConfigError(
                f"[privacy.bounds] {column} must be [lo, hi] with finite numbers and lo < hi, not {pair!r}")
        out[str(column)] = (float(pair[0]), float(pair[1]))
    return out


def _categories(table: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, Mapping):
        raise FedlabConfigError('[privacy.categories] must be a table: column = ["level", ...]')
    out: dict[str, tuple[str, ...]] = {}
    for column, levels in table.items():
        if not isinstance(levels, list) or not levels or len(levels) > 10_000:
            raise FedlabConfigError(f"[privacy.categories] {column} must be a list of 1 to 10000 levels")
        out[str(column)] = tuple(dict.fromkeys(str(v) for v in levels))
    return out
