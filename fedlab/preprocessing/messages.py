"""Wire types of federated preprocessing: a step request, and the node's reply.

A preprocessing pipeline is fitted step by step, each step on the output of the previous
ones, and applied on each node. A node keeps, per pipeline, an immutable *state* in its
SQLite database: the dataset it started from and the chain of fitted transforms so far.
Every request names the state it builds on (``state_id``; None = the source dataset as it
is) and every reply names the new state, so a pipeline survives a node restart.

Steps (``preproc_step``):

``"fit"``
    ``preproc_args`` = ``{"columns": [...], "stats": [...], "stats_args": {...},
    "thresholds": {...}}`` (the same meaning as in an FARequest): the node applies its chain
    to the source data in memory and answers with partial statistics (``partials``), after
    its disclosure rules, from which the researcher computes the step's global parameters.
    A column of which the node's root source holds no measured value at all (a site that never
    measured it) is named in ``no_values`` instead, with no partial and no refusal: the
    researcher fits the step on the other nodes, and this node takes the fitted step like every
    node. Any other column under ``min_count`` is refused as in every statistic.
``"set"``
    ``preproc_args`` = ``{"transform": {...}}``, a transform spec (see
    ``fedlab.preprocessing.transforms``) with the global parameters; the node appends it to
    its chain (completing it with node-local parameters where the method needs them, as
    ComBat's empirical Bayes batch estimates) and answers with the new state.
``"apply"``
    ``preproc_args`` = ``{"name": ..., "tags": [...], "description": ...}``: the node writes
    the transformed data as a new dataset in its own directory, registers it with its
    lineage (source dataset and steps) and answers with its ``DatasetInfo`` (``derived``).
    The source dataset is never modified.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from fedlab.analytics.messages import FAReply
from fedlab.protocol.messages import DatasetInfo, Message, register

__all__ = ["PREPROC_STEPS", "PREPROC_TYPES", "PreprocReply", "PreprocRequest"]

PREPROC_TYPES = ("standardize", "minmax", "impute", "onehot", "combat")
PREPROC_STEPS = ("fit", "set", "apply")

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Columns = Annotated[list[Annotated[str, msgspec.Meta(max_length=1024)]], msgspec.Meta(max_length=4096)]


class PreprocRequest(Message, frozen=True):
    dataset_id: _Id
    preproc_type: _Id
    preproc_step: _Id
    preproc_id: _Id
    preproc_args: dict[str, Any] = {}
    state_id: _Id | None = None


class PreprocReply(Message, frozen=True):
    state_id: _Id
    partials: FAReply | None = None
    derived: DatasetInfo | None = None
    # the fit's columns of which the node holds no measured value (None: there is no such column)
    no_values: _Columns | None = None


register("preproc_request", PreprocRequest)
register("preproc_reply", PreprocReply)
