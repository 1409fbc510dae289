"""Server-side optimizers: the round's average update is a pseudo-gradient the server steps with.

FedAvg moves the global model ``x`` to the nodes' sample-weighted mean, that is by the round's
average update ``Δ = mean_k(x_k) - x``. These aggregators keep FedAvg's running sums (so they
hold no model per node, and they work under secure aggregation, which gives only the sum) and
then, instead of ``x <- x + Δ``, step a server optimizer on ``Δ``, each in float64:

- ``FedAvgM`` (server momentum; Hsu, Qi and Brown, 2019): ``u <- β u + Δ``, ``x <- x + η u``.
  Defaults ``server_lr`` η = 1.0, ``momentum`` β = 0.9. With β = 0 and η = 1 it is FedAvg. In
  steady state the step is ``η / (1 - β)`` times the average update (10 with the defaults);
  Hsu et al. tune η together with β, so lower ``server_lr`` when the accuracy oscillates.
- ``FedAdagrad``, ``FedAdam``, ``FedYogi`` (Reddi et al., "Adaptive Federated Optimization",
  ICLR 2021, Algorithm 2): ``m <- β1 m + (1 - β1) Δ`` and

  - Adagrad: ``v <- v + Δ²``
  - Adam:    ``v <- β2 v + (1 - β2) Δ²``
  - Yogi:    ``v <- v - (1 - β2) Δ² sign(v - Δ²)``

  then ``x <- x + η m / (sqrt(v) + τ)``, without bias correction, with ``m`` starting at 0 and
  ``v`` at ``τ²`` (the paper asks ``v_{-1} >= τ²``). Defaults: β1 = 0.9, β2 = 0.99 and τ = 1e-3,
  the paper's values (it finds τ = 1e-3 works across its tasks); FedAdagrad's β1 defaults to 0
  (Adagrad has no momentum). The paper tunes the server rate η per task on a grid and has no
  single value; the default here is 0.01 for FedAdam and FedYogi and 0.1 for FedAdagrad (whose
  ``v`` only grows). Each coordinate moves by about η per round at most, whatever the size of
  ``Δ``, so η sets the pace: tune it (``benchmarks/convergence.py`` says what it used).

The mean is weighted by the nodes' training samples, as FedAvg's (Reddi et al. write an
unweighted mean over the sampled clients; with equal sizes the two agree). Only floating-point
(and complex: ``Δ²`` is ``|Δ|²``) entries are stepped. Integer and bool entries (BatchNorm's
``num_batches_tracked``) take FedAvg's rounded mean, and so do the names listed in ``averaged``
(for example a BatchNorm's ``running_mean`` and ``running_var``, which are statistics, not
weights). The optimizer's state (``m``, ``v``, the step count) is kept in breakpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedlab.errors import FedlabTrainingError
from fedlab.researcher.aggregators import AGGREGATORS, Aggregator, Params, _rounded

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]


def _number(owner: str, name: str, value: Any, *, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a float in the interval, or a FedlabTrainingError naming the argument and the interval."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise FedlabTrainingError(f"{owner} needs a finite {name} in {interval}, got {value!r}")
    return float(value)


class ServerOptimizer(Aggregator):
    """FedAvg's weighted mean, then a server optimizer's step on the average update ``Δ``.

    Subclasses say which state they keep (``slots``) and how one parameter steps (``_increment``).
    """

    name: ClassVar[str] = "serveropt"
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, server_lr: float, averaged: Sequence[str] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.server_lr = _number(owner, "server_lr", server_lr, low=0.0, low_open=True)
        if averaged is None:
            averaged = []
        if isinstance(averaged, str) or not all(isinstance(n, str) for n in averaged):
            raise FedlabTrainingError(f"{owner}'s averaged must be a list of parameter names, got {averaged!r}")
        self.averaged = list(averaged)
        self.step = 0  # rounds stepped so far
        self.state_arrays: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}

    def args(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "averaged": list(self.averaged)}

    def begin_round(self, global_params: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(self.averaged) - set(global_params))
        if unknown:
            raise FedlabTrainingError(f"{type(self).__name__}'s averaged names {unknown} are not in the model; "
                                      f"its entries are {sorted(global_params)}")
        super().begin_round(global_params)

    def stepped(self, name: str, dtype: np.dtype) -> bool:
        """Whether ``name`` is stepped by the optimizer (else it takes FedAvg's rounded mean)."""
        return name not in self.averaged and not _rounded(np.dtype(dtype))

    def _state_for(self, name: str, like: np.ndarray) -> dict[str, np.ndarray]:
        """This parameter's optimizer state, made at its initial value on first use."""
        state = {}
        for slot in self.slots:
            array = self.state_arrays[slot].get(name)
            if array is None:
                array = self.state_arrays[slot][name] = self._initial(slot, like)
            elif array.shape != like.shape:
                raise FedlabTrainingError(
                    f"the server optimizer's {slot} for {name} has shape {array.shape}, the model has {like.shape}; "
                    "the state (a breakpoint's) is not from this model: start the experiment again")
            state[slot] = array
        return state

    def _initial(self, slot: str, like: np.ndarray) -> np.ndarray:
        return np.zeros(like.shape, like.dtype)

    def _increment(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """Update ``state`` in place from the pseudo-gradient ``delta`` (float64, ours to overwrite);
        return what is added to the parameter."""
        raise NotImplementedError

    def end_round(self, n_nodes_total: int) -> Params:
        """``x + increment(Δ)`` for the stepped entries, FedAvg's mean for the others, each in its dtype."""
        self._require_added()
        self._open = False
        self.step += 1
        result: Params = {}
        for name, x in self._global.items():
            if not self.stepped(name, x.dtype):
                result[name] = self._sums.finish(name, self._weight, x.dtype)
                continue
            delta = self._sums.buffers[name] / self._weight  # the mean, then Δ = mean - x, in float64
            np.subtract(delta, x, out=delta)
            out = np.add(x, self._increment(delta, self._state_for(name, delta)), dtype=delta.dtype)
            value = out.astype(x.dtype, casting="unsafe")
            value.flags.writeable = False
            result[name] = value
        return result

    def state(self) -> tuple[dict[str, Any], Params]:
        arrays = {f"{slot}.{name}": value for slot in self.slots for name, value in self.state_arrays[slot].items()}
        return {"step": self.step}, arrays

    def load_state(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        step = meta.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise FedlabTrainingError(f"the breakpoint's server optimizer step count is {step!r}, not a count; "
                                      "resume from another breakpoint or start again")
        state: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}
        for key, value in arrays.items():
            slot, _, name = key.partition(".")
            if slot not in state or not name:
                raise FedlabTrainingError(f"the breakpoint holds {key!r}, which {type(self).__name__} does not keep "
                                          f"(it keeps {list(self.slots)}); is it from another aggregator?")
            complex_ = np.iscomplexobj(value)
            state[slot][name] = np.array(value, dtype=np.complex128 if complex_ else np.float64)
        self.step, self.state_arrays = step, state


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): ``u <- β u + Δ``, ``x <- x + η u``; η = 1.0, β = 0.9."""

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, averaged: Sequence[str] | None = None) -> None:
        super().__init__(server_lr, averaged)
        self.momentum = _number("FedAvgM", "momentum", momentum, low=0.0)
        if self.momentum >= 1.0:
            raise FedlabTrainingError(f"FedAvgM needs a finite momentum in [0, 1), got {momentum!r}")

    def args(self) -> dict[str, Any]:
        return {**super().args(), "momentum": self.momentum}

    def _increment(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        u = state["momentum"]
        np.multiply(u, self.momentum, out=u)
        np.add(u, delta, out=u)
        np.multiply(u, self.server_lr, out=delta)
        return delta


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s Algorithm 2: first moment ``m``, second moment ``v`` (the rule is the subclass's)."""

    slots = ("m", "v")

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float,
                 averaged: Sequence[str] | None) -> None:
        super().__init__(server_lr, averaged)
        owner = type(self).__name__
        self.beta1 = _number(owner, "beta1", beta1, low=0.0)
        self.beta2 = _number(owner, "beta2", beta2, low=0.0)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise FedlabTrainingError(f"{owner} needs beta1 and beta2 in [0, 1), got {beta1!r} and {beta2!r}")
        self.tau = _number(owner, "tau", tau, low=0.0, low_open=True)

    def args(self) -> dict[str, Any]:
        return {**super().args(), "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _initial(self, slot: str, like: np.ndarray) -> np.ndarray:
        if slot == "v":  # real, and v_{-1} = τ² as the paper asks (v_{-1} >= τ²)
            return np.full(like.shape, self.tau ** 2, np.float64)
        return np.zeros(like.shape, like.dtype)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        raise NotImplementedError

    def _increment(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        m, v = state["m"], state["v"]
        np.multiply(m, self.beta1, out=m)
        m += (1.0 - self.beta1) * delta
        squared = np.abs(delta) ** 2 if np.iscomplexobj(delta) else np.square(delta)
        self._second_moment(v, squared)
        np.sqrt(v, out=squared)
        squared += self.tau
        np.divide(m, squared, out=delta)
        delta *= self.server_lr
        return delta


class FedAdagrad(_Adaptive):
    """Reddi et al.: ``v <- v + Δ²``; η = 0.1, β1 = 0 (no momentum, as Adagrad), τ = 1e-3."""

    name = "fedadagrad"

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3,
                 averaged: Sequence[str] | None = None) -> None:
        super().__init__(server_lr, beta1, 0.0, tau, averaged)

    def args(self) -> dict[str, Any]:
        args = super().args()
        del args["beta2"]  # Adagrad's v has no decay
        return args

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v += squared


class FedAdam(_Adaptive):
    """Reddi et al.: ``v <- β2 v + (1 - β2) Δ²``; η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 averaged: Sequence[str] | None = None) -> None:
        super().__init__(server_lr, beta1, beta2, tau, averaged)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v *= self.beta2
        v += (1.0 - self.beta2) * squared


class FedYogi(_Adaptive):
    """Reddi et al.: ``v <- v - (1 - β2) Δ² sign(v - Δ²)``; η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3."""

    name = "fedyogi"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 averaged: Sequence[str] | None = None) -> None:
        super().__init__(server_lr, beta1, beta2, tau, averaged)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v -= (1.0 - self.beta2) * squared * np.sign(v - squared)


AGGREGATORS.update({cls.name: cls for cls in (FedAvgM, FedAdagrad, FedAdam, FedYogi)})
