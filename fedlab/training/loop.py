"""One round of local work on one dataset: the code a node runs for a ``TrainRequest`` and ``LocalJob`` runs locally.

Both call ``run_round`` with the same arguments, so a federated round on one node and a
local run agree to the bit: every source of randomness is derived from ``seed`` and
``round`` (model initialisation, batch order, dropout), batches are drawn in the calling
thread, and the test split depends on the seed only, so it is the same in every round.
The caller's torch random state is left as it was.

A plan's exceptions never escape raw: each call into plan code is wrapped so that the
error names the plan method, the exception and the plan line (``source.plan_error``). The
iterations themselves (training steps, validation) are in ``fedlab.training.steps``.

A round trains on the device the operator's setting and ``use_gpu`` choose
(``fedlab.training.device``): the model, its optimizer state, Scaffold's control variates,
FedProx's anchors and the batches are there, and the parameters come back as CPU arrays
(``fedlab.training.placement``). Rounds on the CPU are reproducible to the bit; on a GPU they agree
with them to rounding, not to the bit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedlab.errors import FedlabError, FedlabTrainingError
from fedlab.privacy.dp_training import LOCAL, DPArgs, parse_dp_args
from fedlab.training.args import Progress, RoundResult, TrainingArgs
from fedlab.training.convert import PlanData, load_params, model_params, shared_param_names, torch_dtype
from fedlab.training.device import AUTO, CPU, DeviceChoice, check_device_setting, choose_device
from fedlab.training.placement import is_host, params_to_host, seed_device, torch_device
from fedlab.training.source import call_plan, plan_error
from fedlab.training.state import load_optimizer_state, optimizer_state
from fedlab.training.steps import Reporter, RoundContext, train, validate

__all__ = [
    "Progress",
    "RoundResult",
    "TrainingArgs",
    "initial_params",
    "run_round",
    "shared_param_names",
    "split_indices",
]

_SEED_STRIDE = 1_000_003
_OPTIMIZER = "optimizer."
_SCAFFOLD = "scaffold."


def split_indices(n: int, test_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted row indices; the same for a given ``n``, ratio and seed, whatever the round.

    A non-zero ratio keeps at least one test row and at least one training row.
    """
    if not 0.0 <= test_ratio < 1.0:
        raise FedlabTrainingError(f"test_ratio must be at least 0 and below 1, not {test_ratio}")
    n_test = 0 if test_ratio == 0.0 or n < 2 else min(n - 1, max(1, round(n * test_ratio)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _new_model(plan_cls: type, model_args: Mapping[str, Any], device: torch.device | None = None) -> Any:
    plan = call_plan(plan_cls, "__init__", plan_cls)
    plan.device = device if device is not None else torch.device("cpu")  # where the round trains, for the plan
    model = call_plan(plan_cls, "init_model", plan.init_model, dict(model_args))
    return _attach(plan_cls, plan, model)


def _model_to_overwrite(plan_cls: type, model_args: Mapping[str, Any], params: Mapping[str, np.ndarray],
                        share_persistent_buffers: bool, device: torch.device) -> Any:
    """A plan whose model will be overwritten entirely by ``params``: skip its random initialisation.

    Initialising a model draws every weight (a quarter of a second for 25M parameters), only
    for the received parameters to replace them. So the model is first built on torch's
    "meta" device (shapes, no data) and given uninitialised memory, which ``load_params``
    then fills. Only when every entry of the model is among ``params``; otherwise (entries
    that do not travel, or an ``init_model`` that cannot run on the meta device) the model
    is built the ordinary way, on the CPU. The memory is on ``device``: a GPU's is filled
    straight from ``params``.
    """
    try:
        with torch.device("meta"):
            plan = _new_model(plan_cls, model_args, device)
        model = plan.model
        entries = set(model.state_dict())
        covered = entries <= set(params) and all(n in entries for n, _ in model.named_buffers())
        if covered and set(shared_param_names(model, share_persistent_buffers)) == entries:
            plan.model = model.to_empty(device=device)
            return plan
    except FedlabError:
        pass
    return _new_model(plan_cls, model_args, device)


def _placed_model(plan_cls: type, model_args: Mapping[str, Any], params: Mapping[str, np.ndarray] | None,
                  share_persistent_buffers: bool, adopt: bool, device: torch.device) -> Any:
    """The round's plan with its model on ``device``, holding ``params`` when given.

    On the CPU, ``adopt`` makes the received arrays the model's memory; elsewhere they are copied
    to the device (and the trained values copied back into them at the end, ``params_to_host``)."""
    if params is None:
        plan = _new_model(plan_cls, model_args, device)
    else:
        plan = _model_to_overwrite(plan_cls, model_args, params, share_persistent_buffers, device)
        load_params(plan.model, params, shared_param_names(plan.model, share_persistent_buffers),
                    adopt=adopt and is_host(device))
    try:
        plan.model.to(device)  # a no-op for what is there already
    except RuntimeError as exc:
        raise FedlabTrainingError(f"training plan {plan_cls.__name__}'s model cannot be moved to {device}: "
                                  f"{exc}") from None
    return plan


def _attach(plan_cls: type, plan: Any, model: Any) -> Any:
    if not isinstance(model, torch.nn.Module):
        raise FedlabTrainingError(
            f"training plan {plan_cls.__name__}.init_model must return a torch.nn.Module, not {type(model).__name__}"
        )
    plan.model = model
    return plan


def initial_params(
    plan_cls: type, model_args: Mapping[str, Any], *, seed: int = 0, share_persistent_buffers: bool = True
) -> dict[str, np.ndarray]:
    """The shared entries of a freshly initialised model, seeded with ``seed`` (the round-0 global model)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        plan = _new_model(plan_cls, model_args)
        return model_params(plan.model, shared_param_names(plan.model, share_persistent_buffers))


def _scaffold_tensors(
    ctx: RoundContext, aux_vars: Mapping[str, Mapping[str, np.ndarray]], state: Mapping[str, np.ndarray],
    adopt: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scaffold's server control variate ``c`` and this node's ``c_i`` (zeros where none was sent yet).

    Neither is written in place: with ``adopt``, a writable array of the parameter's dtype is used as it is."""
    received = aux_vars.get("scaffold", {})
    known = {name for name, _ in ctx.trainable}
    unknown = [name for name in received if name not in known and name not in ctx.plan.model.state_dict()]
    if unknown:
        raise FedlabTrainingError(f"Scaffold control variates name unknown parameters: {', '.join(unknown[:5])}")
    c: dict[str, torch.Tensor] = {}
    c_i: dict[str, torch.Tensor] = {}
    for name, param in ctx.trainable:
        for out, source, key in ((c, received, name), (c_i, state, _SCAFFOLD + name)):
            if key in source:
                array = np.asarray(source[key])
                shareable = array.flags.writeable and torch_dtype(array.dtype) == param.dtype
                if adopt and shareable and param.device.type == "cpu":
                    value = torch.from_numpy(array)
                else:
                    value = torch.tensor(array, dtype=param.dtype, device=param.device)
                if value.shape != param.shape:
                    raise FedlabTrainingError(
                        f"Scaffold control variate for {name} has shape {list(value.shape)}, "
                        f"the parameter has {list(param.shape)}"
                    )
                out[name] = value
            else:
                out[name] = torch.zeros_like(param, memory_format=torch.contiguous_format).detach()
    return c, c_i


def run_round(
    plan_cls: type,
    dataset: Any,
    *,
    round: int,
    model_args: Mapping[str, Any],
    training_args: Mapping[str, Any],
    params: Mapping[str, np.ndarray] | None,
    aggregator_args: Mapping[str, Any] | None = None,
    aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    state_arrays: Mapping[str, np.ndarray] | None = None,
    state_meta: Mapping[str, Any] | None = None,
    do_training: bool = True,
    share_persistent_buffers: bool = True,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    adopt_params: bool = False,
    dp_gate: Callable[[int], None] | None = None,
    device_setting: str = AUTO,
    device_owner: str = "this machine",
) -> RoundResult:
    """Train (or only validate) ``plan_cls`` on ``dataset`` for one round, starting from ``params``.

    Deterministic: the same arguments give bit-identical results. ``state_arrays`` and
    ``state_meta`` are what the previous round's result asked to keep (optimizer state,
    Scaffold's ``c_i``); ``should_stop`` is polled before every batch.

    ``adopt_params``: writable arrays of ``params`` (and of ``aux_vars``) become the model's memory
    (and Scaffold's ``c``) without a copy where their dtype allows (``load_params(adopt=True)``), so
    the round trains in them and the parameters returned are views of them. Only for a caller that
    owns those arrays and reads them no more (the training worker, whose frames they are); the
    default copies, leaving the caller's arrays untouched.

    ``training_args["dp_args"]`` trains with differential privacy (:mod:`fedlab.training.dp_sgd`): the
    round then releases no loss (``train_loss`` and the progress events' loss are None), its noise is
    drawn from a secret seed (not reproducible), and ``dp_gate(n_train)`` is called before any training
    step: the node checks its privacy budget there, and refuses the round by raising.

    ``device_setting`` is the rule of the machine's operator (``"auto"``, ``"cpu"``, ``"cuda[:N]"``),
    within which ``training_args["use_gpu"]`` picks the device (``fedlab.training.device``; ``device_owner``
    names the machine in its notes and errors). The result says which device trained, and why when that
    is not the one asked for. On a GPU the parameters are copied back into ``params`` with ``adopt_params``.
    """
    started = time.perf_counter()
    args = TrainingArgs.from_dict(training_args)
    if args.dp_args is not None and progress is not None:
        progress = _without_loss(progress)
    choice = _choose(device_setting, args.use_gpu, device_owner)
    device = torch_device(choice.device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = _run(
                plan_cls, dataset, round, args, model_args, params,
                scaffold=(aggregator_args or {}).get("name") == "scaffold",
                aux_vars=aux_vars or {},
                state=(dict(state_arrays or {}), dict(state_meta or {})),
                do_training=do_training,
                share_persistent_buffers=share_persistent_buffers,
                report=Reporter(progress, args.progress_interval, round),
                should_stop=should_stop,
                adopt=adopt_params,
                dp_gate=dp_gate,
                device=device,
            )
    except FedlabError:
        raise
    except (Exception, SystemExit) as exc:  # a plan bug surfacing in the loop is still the plan's error
        raise plan_error(plan_cls, None, exc) from exc
    result.compute_seconds = time.perf_counter() - started
    result.device, result.device_note = str(device), choice.note
    return result


def _choose(setting: str, use_gpu: bool, owner: str) -> DeviceChoice:
    """The device of a round; torch counts the GPUs only where one may be used, so CUDA is not touched
    otherwise (a torch without CUDA counts 0)."""
    setting = check_device_setting(setting)
    count = torch.cuda.device_count() if setting != CPU and (use_gpu or setting != AUTO) else 0
    return choose_device(setting, use_gpu, count, owner=owner)


def _run(
    plan_cls: type, dataset: Any, round_: int, args: TrainingArgs, model_args: Mapping[str, Any],
    params: Mapping[str, np.ndarray] | None, *, scaffold: bool, aux_vars: Mapping[str, Mapping[str, np.ndarray]],
    state: tuple[dict[str, np.ndarray], dict[str, Any]], do_training: bool, share_persistent_buffers: bool,
    report: Reporter, should_stop: Callable[[], bool] | None, adopt: bool,
    dp_gate: Callable[[int], None] | None, device: torch.device,
) -> RoundResult:
    seed = args.seed * _SEED_STRIDE + round_
    torch.default_generator.manual_seed(seed)
    seed_device(device, seed)
    plan = _placed_model(plan_cls, model_args, params, share_persistent_buffers, adopt, device)
    names = shared_param_names(plan.model, share_persistent_buffers)
    data = PlanData(call_plan(plan_cls, "training_data", plan.training_data, dataset))
    data.place(device)
    trainable = [(n, p) for n, p in plan.model.named_parameters() if p.requires_grad]
    ctx = RoundContext(plan_cls, plan, args, data, round_, seed, report, should_stop, trainable, device)
    train_idx, test_idx = split_indices(data.n, args.test_ratio, args.seed)
    before: dict[str, float] = {}
    if len(test_idx) and (args.test_on_global_updates or not do_training):
        before = validate(ctx, test_idx, "validation before")
    if not do_training:
        return RoundResult({}, len(train_idx), len(test_idx), 0, None, before, {}, {}, *state, 0.0)
    if not len(train_idx):
        raise FedlabTrainingError(
            f"nothing to train on: the dataset gives {data.n} samples and test_ratio is {args.test_ratio}"
        )
    optimizer = _new_optimizer(plan_cls, plan, args, state)
    lr = float(optimizer.param_groups[0]["lr"])
    if scaffold and lr <= 0:
        raise FedlabTrainingError(f"Scaffold needs a positive learning rate, the optimizer has lr={lr}")
    x = {name: p.detach().clone() for name, p in trainable} if scaffold else {}
    c, c_i = _scaffold_tensors(ctx, aux_vars, state[0], adopt) if scaffold else ({}, {})
    correction = {n: c[n] - c_i[n] for n in c} if scaffold else None
    dp = parse_dp_args(args.dp_args)
    if dp is None:
        n_updates, train_loss = train(ctx, train_idx, args.fedprox_mu, correction)
    else:
        n_updates = _train_dp(ctx, train_idx, names, dp, scaffold, correction, dp_gate)
        train_loss = None  # an exact statistic of the rows: not released with DP
    after = validate(ctx, test_idx, "validation after") if len(test_idx) and args.test_on_local_updates else {}

    opt_arrays, opt_meta = optimizer_state(optimizer)
    new_state = {_OPTIMIZER + k: v for k, v in opt_arrays.items()}
    aux: dict[str, dict[str, np.ndarray]] = {}
    if scaffold:  # c_i+ = c_i - c + (x - y) / (K lr); the server gets c_i+ - c_i, the node keeps c_i+
        aux["scaffold"] = {}
        for name, param in trainable:
            c_new = c_i[name] - c[name] + (x[name] - param.detach()) / (n_updates * lr)
            aux["scaffold"][name] = (c_new - c_i[name]).cpu().numpy()  # fresh tensors: no copy needed
            new_state[_SCAFFOLD + name] = c_new.cpu().numpy()
    shared = params_to_host(plan.model, names, params, adopt)  # the model is dropped after the round: no copy
    return RoundResult(shared, len(train_idx), len(test_idx), n_updates, train_loss,
                       before, after, aux, new_state, {"optimizer": opt_meta}, 0.0)


def _train_dp(ctx: RoundContext, train_idx: np.ndarray, names: list[str], dp: DPArgs, scaffold: bool,
              correction: dict[str, torch.Tensor] | None, dp_gate: Callable[[int], None] | None) -> int:
    """The steps of a DP round: DP-SGD (local), or ordinary steps and then a clipped, noised update (central)."""
    from fedlab.training import dp_sgd

    if dp.type == LOCAL:
        return dp_sgd.train_local(ctx, train_idx, dp, ctx.args.fedprox_mu, correction, dp_gate)
    if scaffold:
        raise FedlabTrainingError("central DP cannot be used with Scaffold: its control variates would leave the "
                                  "node without noise; use dp_args type 'local', or FedAvg or FedProx")
    if dp_gate is not None:
        dp_gate(len(train_idx))
    state = ctx.plan.model.state_dict()
    before = {name: state[name].detach().clone() for name in names}
    n_updates, _ = train(ctx, train_idx, ctx.args.fedprox_mu, correction)
    dp_sgd.noise_update(ctx, names, before, dp)
    return n_updates


def _without_loss(progress: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """Progress events of a DP round: the batch loss is an exact statistic of the rows, so it stays here."""
    def report(p: Progress) -> None:
        progress(dataclasses.replace(p, loss=None))

    return report


def _new_optimizer(
    plan_cls: type, plan: Any, args: TrainingArgs, state: tuple[dict[str, np.ndarray], dict[str, Any]]
) -> torch.optim.Optimizer:
    """The plan's optimizer, with the state the previous round kept (moments, step counts) if any."""
    optimizer = call_plan(plan_cls, "init_optimizer", plan.init_optimizer, dict(args.optimizer_args))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FedlabTrainingError(f"training plan {plan_cls.__name__}.init_optimizer must return a "
                                  f"torch.optim.Optimizer, not {type(optimizer).__name__}")
    plan.optimizer = optimizer
    arrays, meta = state
    if "optimizer" in meta:
        saved = {k[len(_OPTIMIZER):]: v for k, v in arrays.items() if k.startswith(_OPTIMIZER)}
        load_optimizer_state(optimizer, saved, meta["optimizer"])
    return optimizer
