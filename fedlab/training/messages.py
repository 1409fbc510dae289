"""Wire types of training: plan approval, one training round on one node, progress, cancel.

Code travels as source text (``plan_source``, a whole Python module) with the name of the
class to use (``plan_class``); the node hashes the source itself and runs it only if its
operator approved that exact hash. Model parameters and auxiliary variables travel as
``NamedArray`` specs in the content plus one raw buffer frame each (``fedlab.protocol.arrays``),
never pickled: the researcher serializes them once and the same frames go to every node.

This module imports neither torch nor numpy, so both sides can decode training messages
without the training extra installed.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from fedlab.protocol.dp_messages import DPSpent
from fedlab.protocol.messages import ArraySpec, Event, Message, register
from fedlab.protocol.secagg_messages import SecaggInput

__all__ = [
    "APPROVAL_STATES",
    "APPROVED",
    "NOT_REGISTERED",
    "PENDING",
    "REJECTED",
    "NamedArray",
    "TrainCancelReply",
    "TrainCancelRequest",
    "TrainProgress",
    "TrainReply",
    "TrainRequest",
    "TrainingPlanApproveReply",
    "TrainingPlanApproveRequest",
    "TrainingPlanStatusReply",
    "TrainingPlanStatusRequest",
]

# Approval states, as the node reports them (the seed's names).
PENDING = "Pending"
APPROVED = "Approved"
REJECTED = "Rejected"
NOT_REGISTERED = "Not registered"
APPROVAL_STATES = (PENDING, APPROVED, REJECTED, NOT_REGISTERED)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=65536)]
# A training plan is a Python module; 1 MiB of source is far more than any plan needs.
PlanSource = Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)]
ClassName = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Round = Annotated[int, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
# Where a round trained: "cpu", "cuda:0"... ("" from a node that does not say).
DeviceName = Annotated[str, msgspec.Meta(max_length=32, pattern=r"^([a-z]{1,16}(:[0-9]{1,3})?)?$")]
Note = Annotated[str, msgspec.Meta(max_length=1024)]
# Arguments are plain JSON-like values (msgpack builtins): never objects.
Args = dict[Annotated[str, msgspec.Meta(max_length=256)], Any]


class NamedArray(Message, frozen=True):
    """One tensor by name (``fc.weight``), its bytes in raw buffer frame ``array.buffer``."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    array: ArraySpec


# -- approval ------------------------------------------------------------------------------------
class TrainingPlanApproveRequest(Message, frozen=True):
    """Queue a plan for the node operator's decision (the seed's TrainingPlanApproveJob)."""

    plan_source: PlanSource
    plan_class: ClassName
    description: Text = ""
    researcher_id: Annotated[str, msgspec.Meta(max_length=256)] = ""


class TrainingPlanStatusRequest(Message, frozen=True):
    """Ask whether this exact plan may run here (the seed's TrainingPlanCheckJob)."""

    plan_source: PlanSource
    plan_class: ClassName


class TrainingPlanStatusReply(Message, frozen=True):
    """The node's view of a plan: ``plan_id`` is the sha256 of the source, computed by the node.

    ``status`` is one of ``APPROVAL_STATES``; ``message`` says what happens next, e.g. the
    exact command the node's operator has to run.
    """

    plan_id: Name
    status: Name
    approval_required: bool
    message: Text = ""


class TrainingPlanApproveReply(TrainingPlanStatusReply, frozen=True):
    """The answer to an approval request: the plan's state after queueing it."""


# -- training ------------------------------------------------------------------------------------
class TrainRequest(Message, frozen=True):
    """One round of local training (or, with ``do_training=False``, validation only) on one node.

    ``params`` are the global parameters to start from (their frames are shared by all
    nodes of the round); ``aux_vars`` are optimizer auxiliary variables by aggregator
    (Scaffold sends ``{"scaffold": [c for each parameter]}``); ``aggregator_args`` are this
    node's own aggregator arguments; ``state_id`` names the node-side state (optimizer
    state, Scaffold's control variates) that the node returned in the previous round,
    ``None`` in the first. ``secagg``: this round is securely aggregated; the node answers its
    parameters, aux vars and sample count only masked, in one vector (see ``SecaggInput``).
    """

    experiment_id: Name
    round: Round
    dataset_id: Name
    plan_source: PlanSource
    plan_class: ClassName
    params: list[NamedArray]
    model_args: Args = {}
    training_args: Args = {}
    aggregator_args: Args = {}
    aux_vars: dict[Name, list[NamedArray]] = {}
    state_id: Name | None = None
    do_training: bool = True
    share_persistent_buffers: bool = True
    secagg: SecaggInput | None = None
    # hold a result of at least this many bytes and let the researcher pull it (held_messages); 0: send it whole
    hold_min_bytes: Count = 0


class TrainReply(Message, frozen=True):
    """The outcome of a ``TrainRequest``: updated parameters (empty for validation only),
    sample counts, metrics, timing and the handle of the state the node kept.

    Under secure aggregation ``params`` and ``aux_vars`` are empty and ``n_samples`` is 0: the
    node's figures are in ``masked``, one uint64 buffer in the layout of ``SecaggInput.fields``.

    ``dp``: a round trained with ``training_args["dp_args"]`` says what it cost on the node's privacy
    budget (ε, δ, mechanism "dp-sgd" or "gaussian-update", the noise std) and what remains; such a
    round sends no ``train_loss`` and no metrics.

    ``device``: where the round trained (``"cpu"``, ``"cuda:0"``); ``device_note``: why, when that is not
    what ``training_args["use_gpu"]`` asked for (a node without a GPU, or one whose operator set its
    device; see docs/gpu.md).

    ``held``: the frames are not attached; the node keeps them and the researcher pulls them in chunks
    (``fedlab.training.held_messages``)."""

    experiment_id: Name
    round: Round
    dataset_id: Name
    params: list[NamedArray]
    n_samples: Count
    n_test_samples: Count = 0
    n_updates: Count = 0
    train_loss: float | None = None
    metrics_before: dict[str, float] = {}  # validation of the received global parameters
    metrics_after: dict[str, float] = {}  # validation after local training
    aux_vars: dict[Name, list[NamedArray]] = {}
    compute_seconds: float = 0.0
    state_id: Name | None = None
    masked: ArraySpec | None = None
    secagg_session: Annotated[str, msgspec.Meta(max_length=256)] = ""
    dp: DPSpent | None = None
    device: DeviceName = ""
    device_note: Note = ""
    # the node holds the frames that ``params`` and ``aux_vars`` name, to be pulled (``TrainRequest.hold_min_bytes``)
    held: bool = False


class TrainProgress(Event, frozen=True):
    """Where a node is in its round; throttled by the node, separate from the result."""

    experiment_id: Name
    round: Round
    phase: Name  # "training", "validation before" or "validation after"
    epoch: Count = 0
    n_epochs: Count = 0
    iteration: Count = 0
    n_iterations: Count = 0
    loss: float | None = None


class TrainCancelRequest(Message, frozen=True):
    """Stop the training request whose msg_id is ``request_id`` at its next iteration."""

    request_id: Name


class TrainCancelReply(Message, frozen=True):
    """``cancelled`` is False when no such request was running (it had already ended)."""

    cancelled: bool


_TYPES: dict[str, type[Message]] = {
    "training_plan_approve_request": TrainingPlanApproveRequest,
    "training_plan_approve_reply": TrainingPlanApproveReply,
    "training_plan_status_request": TrainingPlanStatusRequest,
    "training_plan_status_reply": TrainingPlanStatusReply,
    "train_request": TrainRequest,
    "train_reply": TrainReply,
    "train_progress": TrainProgress,
    "train_cancel_request": TrainCancelRequest,
    "train_cancel_reply": TrainCancelReply,
}
for _name, _cls in _TYPES.items():
    register(_name, _cls)

# the wire types of a held result (pulled in chunks) register themselves beside these
from fedlab.training import held_messages  # noqa: E402, F401
