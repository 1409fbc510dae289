"""Differentially private local training in the training worker: DP-SGD through Opacus, or a noised update.

``local`` (:func:`train_local`): Opacus' per-sample gradient hooks (``GradSampleHooks``, which leave the
plan's model unwrapped, so its parameter names and the plan's calls stay as they are) and its
``DPOptimizer`` around the plan's optimizer: every step clips each row's gradient to ``clip`` and adds
Gaussian noise of std ``sigma * clip`` to their sum, divided by the expected batch size. The plan's loss
must be a mean (torch's default) or sum of per-row terms: a mean gives the gradients their usual scale,
and a loss that mixes rows would make the "per-row" gradients depend on other rows, which clipping
does not bound. Batches are drawn by Poisson sampling, each training row
with probability ``q = batch_size / n_train``, for exactly the planned number of steps (an empty batch
is a step of noise alone), so the steps taken are the steps the node accounted. FedProx's proximal
gradient and Scaffold's correction depend on no row: they are added after the noise (the optimizer's
step hook), where they cost nothing.

``central`` (:func:`noise_update`): the round trains as usual; then the change of every shared entry
from the received parameters is clipped to ``clip`` (L2 norm over all of them) and noised
(:func:`fedlab.privacy.dp_training.clip_and_noise`) in the model, before the parameters leave.

Before a row is touched, ``gate(n_train)`` lets the node check its budget for the planned round
(:mod:`fedlab.node.dp_rounds`); a refusal raises there and nothing trains.

The noise and the sampling are drawn from generators seeded with random bits from ``secrets``, not
from the round's seed: a researcher who knows ``seed`` (it is in the training arguments) could
otherwise regenerate the noise and subtract it. DP rounds are therefore not reproducible to the bit,
unlike other rounds. The generators themselves are torch's and numpy's (not cryptographic), and
Opacus' ``secure_mode`` (noise robust to floating-point attacks) needs torchcsprng and is not used.
On a GPU the noise is drawn there (a generator on the device); the Poisson sampling stays on the CPU.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from fedlab.errors import FedlabError, FedlabTrainingError
from fedlab.privacy.dp_training import DPArgs, clip_and_noise, planned_steps, sample_rate
from fedlab.training.convert import to_device
from fedlab.training.source import call_plan, plan_error
from fedlab.training.steps import RoundContext, _loss_of, _stop_check

__all__ = ["DPGate", "check_model", "noise_update", "train_local"]

DPGate = Callable[[int], None]  # called with the number of training rows; raises to refuse the round


def _secret_generator(device: torch.device | None = None) -> torch.Generator:
    """A generator seeded from ``secrets``, on ``device`` (the noise is drawn where the gradients are)."""
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(secrets.randbits(63))


def check_model(plan_cls: type, model: torch.nn.Module) -> None:
    """Refuse a model Opacus cannot train privately (BatchNorm mixes rows; its running statistics are
    buffers computed from the data without noise), naming the layers and the fix."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e).strip() for e in errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3
                                                                  else "")
        raise FedlabTrainingError(
            f"training plan {plan_cls.__name__}'s model cannot be trained with local DP (DP-SGD): {listed}. "
            "Replace BatchNorm with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix does it), "
            "or use dp_args type 'central'")


def _batch(ctx: RoundContext, rows: np.ndarray) -> tuple[Any, Any]:
    """The rows ``rows`` as one ``(data, target)`` batch."""
    data = ctx.data
    if data.x is not None and data.y is not None:
        return data.rows(torch.from_numpy(rows.astype(np.int64)))
    assert data.dataset is not None
    dataset = data.dataset
    try:
        batch = default_collate([dataset[int(i)] for i in rows])
    except FedlabError:
        raise
    except (Exception, SystemExit) as exc:  # the Dataset is the plan's code
        raise plan_error(ctx.plan_cls, "training_data (loading a batch)", exc) from exc
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise FedlabTrainingError("the Dataset returned by training_data must yield (data, target) pairs, "
                                  f"got batches of type {type(batch).__name__}")
    return to_device(batch[0], ctx.device), to_device(batch[1], ctx.device)


def train_local(ctx: RoundContext, train_idx: np.ndarray, dp: DPArgs, fedprox_mu: float | None,
                correction: Mapping[str, torch.Tensor] | None, gate: DPGate | None) -> int:
    """DP-SGD steps of one round (the plan's optimizer, made private); returns the steps taken."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    plan, args = ctx.plan, ctx.args
    check_model(ctx.plan_cls, plan.model)
    n = len(train_idx)
    q = sample_rate(args.batch_size, n)
    total = planned_steps(n, args.batch_size, args.epochs, args.num_updates)
    if gate is not None:
        gate(n)
    trained = {name for name, _ in ctx.trainable}
    fixed = {name: t.detach().clone() for name, t in plan.model.state_dict().items()
             if name not in trained}
    try:
        hooks = GradSampleHooks(plan.model, batch_first=True, loss_reduction="mean", strict=True)
    except NotImplementedError as exc:
        raise FedlabTrainingError(f"training plan {ctx.plan_cls.__name__}'s model cannot be trained with local DP: "
                                  f"{exc}") from None
    optimizer = DPOptimizer(plan.optimizer, noise_multiplier=dp.sigma, max_grad_norm=dp.clip,
                            expected_batch_size=max(1, round(q * n)), loss_reduction="mean",
                            generator=_secret_generator(ctx.device))
    names = {id(p): name for name, p in ctx.trainable}
    anchors = {id(p): p.detach().clone() for _, p in ctx.trainable} if fedprox_mu else {}

    def after_noise(opt: Any) -> None:  # row-independent terms: FedProx's proximal gradient, Scaffold's correction
        for p in opt.params:
            if fedprox_mu and id(p) in anchors:
                p.grad.add_(p.detach() - anchors[id(p)], alpha=fedprox_mu)
            if correction is not None and names.get(id(p)) in correction:
                p.grad.add_(correction[names[id(p)]])

    optimizer.attach_step_hook(after_noise)
    try:
        with warnings.catch_warnings():
            # a first layer whose input needs no gradient: Opacus' hooks still get all they need
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            _steps(ctx, train_idx, q, total, optimizer)
    finally:
        hooks.cleanup()
        for p in optimizer.params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
    changed = [name for name, before in fixed.items() if not torch.equal(before, plan.model.state_dict()[name])]
    if changed:
        raise FedlabTrainingError(
            f"model entries {', '.join(changed[:5])} changed during DP-SGD although they are not trained "
            "parameters (buffers computed from the data, without noise); remove them from the model")
    return total


def _steps(ctx: RoundContext, train_idx: np.ndarray, q: float, total: int, optimizer: Any) -> None:
    """``total`` DP-SGD steps, each on a Poisson sample of the training rows (an empty one is noise alone)."""
    n = len(train_idx)
    per_epoch = math.ceil(n / ctx.args.batch_size)
    n_epochs = math.ceil(total / per_epoch)
    sampler = _secret_generator()
    ctx.plan.model.train()
    for step in range(1, total + 1):
        epoch = (step - 1) // per_epoch + 1
        _stop_check(ctx.should_stop, f"in round {ctx.round}, epoch {epoch}, iteration {step}")
        rows = train_idx[(torch.rand(n, generator=sampler) < q).numpy()]
        optimizer.zero_grad()
        if len(rows):
            loss = _loss_of(ctx, _batch(ctx, rows))
            call_plan(ctx.plan_cls, "training_step (in loss.backward())", loss.backward)
        else:
            for p in optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        _step(ctx, optimizer)
        ctx.report("training", epoch, n_epochs, step, total, None, step % per_epoch == 0 or step == total)


def _step(ctx: RoundContext, optimizer: Any) -> None:
    try:
        optimizer.step()
    except FedlabError:
        raise
    except ValueError as exc:
        if "Per sample gradient" in str(exc):
            raise FedlabTrainingError(
                f"training plan {ctx.plan_cls.__name__}: a parameter of the optimizer got no per-sample gradient "
                "(training_step does not use it, or uses it outside a module's forward); freeze it "
                "(requires_grad=False) or leave it out of init_optimizer") from None
        raise plan_error(ctx.plan_cls, "optimizer.step", exc) from exc
    except (Exception, SystemExit) as exc:
        raise plan_error(ctx.plan_cls, "optimizer.step", exc) from exc


def noise_update(ctx: RoundContext, names: list[str], before: Mapping[str, torch.Tensor], dp: DPArgs) -> None:
    """Central DP: replace every shared entry by its received value plus the clipped, noised change."""
    state = ctx.plan.model.state_dict()
    update: dict[str, np.ndarray] = {}
    for name in names:
        tensor = state[name]
        if not tensor.is_floating_point():
            if not torch.equal(tensor, before[name]):
                raise FedlabTrainingError(
                    f"model entry {name} ({tensor.dtype}) changed during the round; central DP can noise "
                    "floating-point entries only: send it no more (share_persistent_buffers=False)")
            continue
        update[name] = (tensor.detach().to(torch.float64) - before[name].to(torch.float64)).cpu().numpy()
    rng = np.random.default_rng(secrets.randbits(128))
    noisy, _ = clip_and_noise(update, sigma=dp.sigma, clip=dp.clip, rng=rng)
    with torch.no_grad():
        for name, delta in noisy.items():
            start = before[name].to(torch.float64)
            state[name].copy_(start + torch.from_numpy(delta).to(start.device))
