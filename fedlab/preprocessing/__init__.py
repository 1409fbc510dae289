"""Federated preprocessing: transforms fitted from merged node statistics, applied on each node.

* :mod:`~fedlab.preprocessing.messages`: the PreprocRequest / PreprocReply protocol;
* :mod:`~fedlab.preprocessing.transforms`: transform specs (plain JSON-able dicts) and
  applying them to a DataFrame;
* :mod:`~fedlab.preprocessing.fit`: the researcher's side, global parameters from merged
  partial statistics;
* :mod:`~fedlab.preprocessing.combat`: ComBat's node-local empirical Bayes estimates, and a
  pooled reference implementation.

This package is pure (no I/O, no networking): the node and the researcher drive it.
"""

from fedlab.preprocessing.combat import combat_local_params, combat_pooled
from fedlab.preprocessing.fit import (
    IMPUTE_STRATEGIES,
    combat_global_params,
    impute_params,
    minmax_params,
    onehot_params,
    standardize_params,
)
from fedlab.preprocessing.messages import PREPROC_STEPS, PREPROC_TYPES, PreprocReply, PreprocRequest
from fedlab.preprocessing.transforms import OTHER_CATEGORY, apply_chain, apply_transform, describe_spec

__all__ = [
    "IMPUTE_STRATEGIES",
    "OTHER_CATEGORY",
    "PREPROC_STEPS",
    "PREPROC_TYPES",
    "PreprocReply",
    "PreprocRequest",
    "apply_chain",
    "apply_transform",
    "combat_global_params",
    "combat_local_params",
    "combat_pooled",
    "describe_spec",
    "impute_params",
    "minmax_params",
    "onehot_params",
    "standardize_params",
]
