"""The batches of one round: training steps with FedProx's and Scaffold's corrections, and validation.

``fedlab.training.loop`` prepares a round (model, parameters, optimizer, data split) and
hands the iterations to ``train`` and ``validate``. Every batch polls ``should_stop`` first,
so a cancelled round stops within one batch, and reports progress through a throttled
``Reporter`` whose events are forced at the end of every epoch so a progress bar always
completes. Calls into the plan go through ``call_plan``, so a plan's exception becomes a
``FedlabTrainingError`` naming the plan method and line. The batches, the model and the
corrections are on ``RoundContext.device``; the batch order is drawn on the CPU, the same
on every device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlab.errors import FedlabError, FedlabRequestStopped, FedlabTrainingError
from fedlab.training.args import Progress, TrainingArgs
from fedlab.training.convert import PlanData, batch_size_of
from fedlab.training.placement import seed_device
from fedlab.training.source import call_plan, plan_error

__all__ = ["Reporter", "RoundContext", "train", "validate"]


class Reporter:
    """Progress throttled to one event per ``interval`` seconds, with forced events at epoch ends."""

    def __init__(self, callback: Callable[[Progress], None] | None, interval: float, round_: int) -> None:
        self.callback, self.interval, self.round, self.last = callback, interval, round_, -math.inf

    def __call__(self, phase: str, epoch: int, n_epochs: int, it: int, n_it: int,
                 loss: float | torch.Tensor | None, force: bool) -> None:
        """``loss`` may be a tensor on a GPU: read (a wait for the GPU) only when an event goes out."""
        now = time.monotonic()
        if self.callback is not None and (force or now - self.last >= self.interval):
            self.last = now
            value = float(loss) if isinstance(loss, torch.Tensor) else loss
            self.callback(Progress(self.round, phase, epoch, n_epochs, it, n_it, value))


@dataclass
class RoundContext:
    """What the steps of one round share: the plan and its data, the arguments, the callbacks."""

    plan_cls: type
    plan: Any
    args: TrainingArgs
    data: PlanData
    round: int
    seed: int
    report: Reporter
    should_stop: Callable[[], bool] | None
    trainable: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model and batches are


def _stop_check(should_stop: Callable[[], bool] | None, where: str) -> None:
    if should_stop is not None and should_stop():
        raise FedlabRequestStopped(f"training cancelled {where}")


def _next_batch(plan_cls: type, batches: Iterator[tuple[Any, Any]]) -> tuple[Any, Any] | None:
    try:
        return next(batches)
    except StopIteration:
        return None
    except FedlabError:
        raise
    except (Exception, SystemExit) as exc:  # a plan calling exit() must not end the worker
        raise plan_error(plan_cls, "training_data (loading a batch)", exc) from exc


def _metric(value: Any, key: str, plan_cls: type) -> float:
    try:
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FedlabTrainingError(
            f"training plan {plan_cls.__name__}.testing_step returned metric {key!r} = {type(value).__name__}, "
            "not a number or a one-element tensor"
        ) from exc


def validate(ctx: RoundContext, indices: np.ndarray, phase: str) -> dict[str, float]:
    """Metrics of ``testing_step`` over the test rows, averaged weighted by batch size."""
    plan, plan_cls = ctx.plan, ctx.plan_cls
    was_training = plan.model.training
    plan.model.eval()
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    n_batches = math.ceil(len(indices) / ctx.args.batch_size)
    batches = ctx.data.batches(indices, ctx.args.batch_size, False, torch.Generator())
    with torch.no_grad():
        for it in range(1, n_batches + 1):
            _stop_check(ctx.should_stop, f"during {phase} of round {ctx.round}")
            batch = _next_batch(plan_cls, batches)
            if batch is None:
                break
            out = call_plan(plan_cls, "testing_step", plan.testing_step, *batch)
            metrics = {"metric": out} if isinstance(out, torch.Tensor) else out
            if not isinstance(metrics, Mapping):
                raise FedlabTrainingError(
                    f"training plan {plan_cls.__name__}.testing_step must return a dict of metrics or a tensor, "
                    f"not {type(out).__name__}"
                )
            size = batch_size_of(batch[1])
            for key, value in metrics.items():
                sums[str(key)] = sums.get(str(key), 0.0) + _metric(value, str(key), plan_cls) * size
                weights[str(key)] = weights.get(str(key), 0) + size
            ctx.report(phase, 0, 0, it, n_batches, None, it == n_batches)
    plan.model.train(was_training)
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}


def _loss_of(ctx: RoundContext, batch: tuple[Any, Any]) -> torch.Tensor:
    loss = call_plan(ctx.plan_cls, "training_step", ctx.plan.training_step, *batch)
    name = f"training plan {ctx.plan_cls.__name__}.training_step"
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FedlabTrainingError(f"{name} must return the loss as a one-element tensor, not {got}")
    if not loss.requires_grad:
        raise FedlabTrainingError(
            f"{name} returned a loss that does not depend on the model's parameters (it has no gradient); "
            "compute it from self.model(...) without .detach() or torch.no_grad()"
        )
    return loss



def train(
    ctx: RoundContext, train_idx: np.ndarray, fedprox_mu: float | None, correction: dict[str, torch.Tensor] | None
) -> tuple[int, float | None]:
    """The optimizer steps of one round; returns ``(n_updates, mean training loss)``."""
    args, plan, plan_cls = ctx.args, ctx.plan, ctx.plan_cls
    per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total = args.num_updates if args.num_updates is not None else args.epochs * per_epoch
    n_epochs = math.ceil(total / per_epoch)
    anchors = [(p, p.detach().clone()) for _, p in ctx.trainable] if fedprox_mu else []
    generator = torch.Generator().manual_seed(ctx.seed)
    # dropout & co. do not depend on what init_model or training_data drew; the CPU generator only:
    # torch.manual_seed would also queue CUDA seeding, which costs milliseconds per call; on a GPU its
    # own generator (dropout there draws from it)
    torch.default_generator.manual_seed(ctx.seed)
    seed_device(ctx.device, ctx.seed)
    plan.model.train()
    lazy = ctx.device.type != "cpu"  # on a GPU the loss is summed there: reading it every step would wait for it
    step = 0
    loss_sum: float | torch.Tensor = 0.0
    for epoch in range(1, n_epochs + 1):
        batches = ctx.data.batches(train_idx, args.batch_size, args.shuffle, generator)
        for in_epoch in range(1, per_epoch + 1):
            if step >= total:
                break
            _stop_check(ctx.should_stop, f"in round {ctx.round}, epoch {epoch}, iteration {step + 1}")
            batch = _next_batch(plan_cls, batches)
            if batch is None:
                break
            plan.optimizer.zero_grad()
            loss = _loss_of(ctx, batch)
            value: float | torch.Tensor = loss.detach().double() if lazy else float(loss.item())
            if fedprox_mu:
                loss = loss + fedprox_mu / 2 * sum((p - g).pow(2).sum() for p, g in anchors)
            call_plan(plan_cls, "training_step (in loss.backward())", loss.backward)
            if correction is not None:
                for name, param in ctx.trainable:
                    if param.grad is None:
                        param.grad = correction[name].clone()
                    else:
                        param.grad.add_(correction[name])
            call_plan(plan_cls, "optimizer.step", plan.optimizer.step)
            step += 1
            loss_sum += value
            ctx.report("training", epoch, n_epochs, step, total, value, in_epoch == per_epoch or step == total)
    return step, (float(loss_sum) / step if step else None)
