"""Wire types of differential privacy: what a DP request asks, what a node says it spent, its budget.

A researcher asks for DP analytics with ``FARequest.dp`` (a :class:`DPQuery`); the node answers
noisy partials and, in ``FAReply.dp``, a :class:`DPSpent`: the ε and δ the request cost on this
node, what remains of this researcher's budget on the dataset's source, and the scale of the noise
of every released figure, so the researcher can judge the error. A DP training round reports the
same in ``TrainReply.dp``. ``PrivacyBudgetRequest`` asks a node for the balance alone.

Everything here is what the researcher *asks*; the node decides what is spent from its own
``[privacy]`` table and its own ledger in ``node.db`` (see :mod:`fedlab.node.dp_ledger`).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from fedlab.protocol.messages import Message, register

__all__ = ["DPBalance", "DPQuery", "DPSpent", "PrivacyBudgetReply", "PrivacyBudgetRequest"]

MECHANISMS = ("laplace", "gaussian")
_Column = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
_Level = Annotated[str, msgspec.Meta(max_length=1024)]


class DPQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A DP analytics request: spend ``epsilon`` (and ``delta``, Gaussian only) on this node.

    ``bounds``: column -> ``[lo, hi]`` to clamp values to for sums, means, variances and quantiles
    (the node's own ``[privacy.bounds]`` win). ``categories``: column -> public levels for value
    counts and crosstabs (the node's ``[privacy.categories]`` win); values outside them are counted
    under ``"<other>"``. ``quantile_bins``: the grid a DP quantile is read from.
    """

    epsilon: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)]
    delta: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0
    mechanism: Annotated[str, msgspec.Meta(pattern="^(laplace|gaussian)$")] = "laplace"
    bounds: Annotated[dict[_Column, Annotated[list[float], msgspec.Meta(min_length=2, max_length=2)]],
                      msgspec.Meta(max_length=4096)] = {}
    categories: Annotated[dict[_Column, Annotated[list[_Level], msgspec.Meta(min_length=1, max_length=10_000)]],
                          msgspec.Meta(max_length=64)] = {}
    quantile_bins: Annotated[int, msgspec.Meta(ge=2, le=4096)] = 32


class DPBalance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One researcher's budget on one source dataset of one node, after the last spend."""

    epsilon_budget: float
    delta_budget: float
    epsilon_spent: float
    delta_spent: float
    epsilon_remaining: float
    delta_remaining: float
    require_dp: bool = False
    n_spends: int = 0


class DPSpent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one DP answer cost on a node, and the noise it carries.

    ``noise``: released figure (``"column.query"``, e.g. ``"age.sum"``, ``"age.count"``,
    ``"crosstab"``, ``"update"``) -> the noise's scale: the Laplace scale b (std = b·√2), or the
    Gaussian standard deviation σ. ``bounds``: the clamp bounds used per column (the node's or the
    researcher's). ``mechanism``: "laplace", "gaussian" or "dp-sgd".
    """

    epsilon: float
    delta: float
    mechanism: str
    balance: DPBalance
    noise: dict[str, float] = {}
    bounds: dict[str, list[float]] = {}


class PrivacyBudgetRequest(Message, frozen=True):
    """Ask a node what remains of this researcher's DP budget on ``dataset_id``'s source."""

    dataset_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class PrivacyBudgetReply(Message, frozen=True):
    dataset_id: str
    balance: DPBalance


register("privacy_budget_request", PrivacyBudgetRequest)
register("privacy_budget_reply", PrivacyBudgetReply)
