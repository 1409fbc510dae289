"""Federated analytics: exact partial statistics on nodes, merged on the researcher's side.

``messages`` holds the wire structs, ``partials`` computes them from a node's pandas data,
``merge`` pools them over nodes, ``quantiles`` finds pooled quantiles from counts alone, and
``disclosure`` holds the node operator's rules applied to partials before they leave a node.
"""

from __future__ import annotations

from fedlab.analytics.merge import (
    MergedCategorical,
    MergedCrosstab,
    MergedNumeric,
    merge_categorical,
    merge_covariance,
    merge_crosstab,
    merge_moments,
    merge_numeric,
)
from fedlab.analytics.messages import *  # noqa: F403
from fedlab.analytics.messages import __all__ as _messages_all
from fedlab.analytics.partials import (
    MISSING_KEY,
    categorical_partial,
    covariance_partial,
    crosstab_partial,
    is_numeric,
    numeric_partial,
)
from fedlab.analytics.quantiles import QuantileSearch

__all__ = [
    *_messages_all,
    "MISSING_KEY",
    "MergedCategorical",
    "MergedCrosstab",
    "MergedNumeric",
    "QuantileSearch",
    "categorical_partial",
    "covariance_partial",
    "crosstab_partial",
    "is_numeric",
    "merge_categorical",
    "merge_covariance",
    "merge_crosstab",
    "merge_moments",
    "merge_numeric",
    "numeric_partial",
]
