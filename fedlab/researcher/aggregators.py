"""Aggregators: how the nodes' updated parameters become the next global model.

Small verbs, like Flower's strategies: the experiment owns the loop and the network, an
aggregator only says what each node gets (``node_args``, ``training_args``) and folds
replies into the next global parameters (``begin_round`` / ``add`` / ``end_round``). It is
pure numpy, so its arithmetic is tested exactly without nodes.

Replies are folded in as they arrive, into running float64 sums, so the researcher holds
about two models (the global one and the sum), never one per node, and the result does not
depend on arrival order beyond float64 rounding. Parameters are cast back to their own dtype
at the end; integer entries (BatchNorm's ``num_batches_tracked``) are averaged and rounded.

- ``FedAvg``: the mean of the nodes' parameters weighted by their training samples.
- ``FedProx(mu)``: FedAvg aggregation; the nodes add ``mu/2 * ||w - w_global||^2`` to their
  loss (``fedprox_mu`` is put into their training arguments).
- ``Scaffold(server_lr)``: Karimireddy et al. (2020), option II. The global control variate
  ``c`` goes to every node as ``aux_vars["scaffold"]``; nodes answer with their ``delta_c``;
  ``x <- x + server_lr * weighted_mean(y_i - x)`` and ``c <- c + sum(delta_c) / N`` where N
  is the number of nodes in the experiment, not only those that answered this round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedlab.errors import FedlabTrainingError

__all__ = ["AGGREGATORS", "Aggregator", "FedAvg", "FedProx", "Scaffold", "aggregator_name", "make_aggregator"]

Params = dict[str, np.ndarray]
AuxVars = dict[str, dict[str, np.ndarray]]


def _accumulate(sums: dict[str, np.ndarray], name: str, value: np.ndarray, weight: float) -> None:
    """``sums[name] += weight * value`` in float64, in place: after the first reply of a round
    no model-sized array is allocated per reply (a 100 MB model would otherwise cost a fresh
    200 MB float64 array each time)."""
    total = sums.get(name)
    if total is None:
        total = sums[name] = np.array(value, dtype=np.float64)  # a copy, also for 0-d entries
        if weight != 1.0:
            total *= weight
    elif weight == 1.0:
        np.add(total, value, out=total)
    else:  # in blocks, so the temporary stays small whatever the parameter's size
        flat_total, flat_value = total.reshape(-1), np.asarray(value).reshape(-1)
        for start in range(0, flat_total.size, _BLOCK):
            block = slice(start, start + _BLOCK)
            flat_total[block] += flat_value[block].astype(np.float64) * weight


_BLOCK = 1 << 18  # 2 MiB of float64: stays in cache


def _cast_back(mean: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``mean`` (float64) in the dtype of ``like``; integer and bool dtypes are rounded first."""
    if np.issubdtype(like.dtype, np.integer) or like.dtype == np.bool_:
        return np.rint(mean).astype(like.dtype)
    return mean.astype(like.dtype)


class Aggregator:
    """Base class: a sample-weighted running mean of the nodes' parameters (that is FedAvg).

    Subclasses change what nodes receive (``node_args``, ``training_args``) or how the mean
    becomes the next global model (``end_round``), and keep their own state in ``state()``.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(self) -> None:
        self._global: Params = {}
        self._sums: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self.added: list[str] = []

    # -- what the nodes get ------------------------------------------------------------------
    def args(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-able: enough to rebuild it from a breakpoint."""
        return {}

    def training_args(self, training_args: Mapping[str, Any]) -> dict[str, Any]:
        """The training arguments every node gets (FedProx adds its ``fedprox_mu``)."""
        return dict(training_args)

    def node_args(self, node_id: str) -> tuple[dict[str, Any], AuxVars]:
        """``(aggregator_args, aux_vars)`` for ``node_id`` this round."""
        return {}, {}

    # -- folding replies in ------------------------------------------------------------------
    def begin_round(self, global_params: Mapping[str, np.ndarray]) -> None:
        self._global = {k: np.asarray(v) for k, v in global_params.items()}
        self._sums = {}
        self._weight = 0.0
        self.added = []

    def _check(self, node_id: str, params: Mapping[str, np.ndarray]) -> None:
        missing = sorted(set(self._global) - set(params))
        extra = sorted(set(params) - set(self._global))
        if missing or extra:
            raise FedlabTrainingError(
                f"node {node_id} returned parameters that do not match the global model"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                + ". Every node must run the same training plan with the same model_args.")
        for name, value in params.items():
            if np.shape(value) != self._global[name].shape:
                raise FedlabTrainingError(
                    f"node {node_id} returned {name} of shape {np.shape(value)}, the global model has "
                    f"{self._global[name].shape}; check that model_args are the same everywhere")

    def add(self, node_id: str, params: Mapping[str, np.ndarray], n_samples: int,
            aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Fold one node's reply into the running sums; the caller may drop the reply after."""
        if n_samples <= 0:  # weight zero: it would not change the mean
            return
        self._check(node_id, params)
        weight = float(n_samples)
        for name, value in params.items():
            _accumulate(self._sums, name, value, weight)
        self._weight += weight
        self.added.append(node_id)

    def _mean(self) -> dict[str, np.ndarray]:
        if not self.added:
            raise FedlabTrainingError(
                "no node contributed parameters this round (every node failed, was missing, or trained "
                "on 0 samples); the global model is unchanged. See the experiment's history for why.")
        return {name: total / self._weight for name, total in self._sums.items()}

    def end_round(self, n_nodes_total: int) -> Params:
        """The next global parameters, each in its own dtype."""
        mean = self._mean()
        result = {name: _cast_back(mean[name], like) for name, like in self._global.items()}
        self._sums = {}
        return result

    # -- breakpoints -------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], Params]:
        """``(json_meta, arrays)`` to save in a breakpoint (running sums are never saved:
        breakpoints are taken between rounds)."""
        return {}, {}

    def load_state(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state()`` returned."""


class FedAvg(Aggregator):
    """McMahan et al. (2017): the sample-weighted mean of the nodes' parameters."""

    name = "fedavg"


class FedProx(Aggregator):
    """Li et al. (2020): FedAvg aggregation; the proximal term ``mu`` is applied by the nodes."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if not (isinstance(mu, int | float) and not isinstance(mu, bool) and mu >= 0 and np.isfinite(mu)):
            raise FedlabTrainingError(f"FedProx needs a finite mu >= 0, got {mu!r}")
        self.mu = float(mu)

    def args(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def training_args(self, training_args: Mapping[str, Any]) -> dict[str, Any]:
        return {**training_args, "fedprox_mu": self.mu}


class Scaffold(Aggregator):
    """Karimireddy et al. (2020), SCAFFOLD with option II control variates.

    ``c`` covers the floating-point parameters of the model (integer buffers have no
    gradient) and starts at zero; it is kept in float64 and sent in the parameters' dtype.
    """

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(server_lr, int | float) and not isinstance(server_lr, bool) and server_lr > 0
                and np.isfinite(server_lr)):
            raise FedlabTrainingError(f"Scaffold needs a finite server_lr > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.c: dict[str, np.ndarray] = {}
        self._c_sent: Params = {}
        self._delta_c: dict[str, np.ndarray] = {}

    def args(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def begin_round(self, global_params: Mapping[str, np.ndarray]) -> None:
        super().begin_round(global_params)
        if not self.c:
            self.c = {k: np.zeros(v.shape, np.float64) for k, v in self._global.items()
                      if np.issubdtype(v.dtype, np.floating)}
        self._c_sent = {k: v.astype(self._global[k].dtype) for k, v in self.c.items()}
        self._delta_c = {}

    def node_args(self, node_id: str) -> tuple[dict[str, Any], AuxVars]:
        return {"name": "scaffold"}, {"scaffold": self._c_sent}

    def add(self, node_id: str, params: Mapping[str, np.ndarray], n_samples: int,
            aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        delta = (aux_vars or {}).get("scaffold")
        if delta is None:
            raise FedlabTrainingError(
                f"node {node_id} did not return Scaffold's control variate update (aux_vars['scaffold']); "
                "is the node running a fedlab version that supports Scaffold?")
        unknown = sorted(set(delta) - set(self.c))
        if unknown:
            raise FedlabTrainingError(f"node {node_id} returned control variates for unknown parameters {unknown}")
        for name, value in delta.items():
            if np.shape(value) != self.c[name].shape:
                raise FedlabTrainingError(f"node {node_id} returned a control variate for {name} of shape "
                                          f"{np.shape(value)}, expected {self.c[name].shape}")
        super().add(node_id, params, n_samples, aux_vars)
        if node_id not in self.added:  # trained on 0 samples: no contribution at all
            return
        for name, value in delta.items():
            _accumulate(self._delta_c, name, value, 1.0)

    def end_round(self, n_nodes_total: int) -> Params:
        mean = self._mean()
        n_total = max(int(n_nodes_total), len(self.added))
        result = {}
        for name, x in self._global.items():
            updated = x.astype(np.float64) + self.server_lr * (mean[name] - x.astype(np.float64))
            result[name] = _cast_back(updated, x)
        for name, total in self._delta_c.items():
            self.c[name] = self.c[name] + total / n_total
        self._sums, self._delta_c = {}, {}
        return result

    def state(self) -> tuple[dict[str, Any], Params]:
        return {}, {f"c.{k}": v for k, v in self.c.items()}

    def load_state(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.c = {k[2:]: np.array(v, dtype=np.float64) for k, v in arrays.items() if k.startswith("c.")}


AGGREGATORS: dict[str, type[Aggregator]] = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold}


def make_aggregator(aggregator: str | Aggregator, args: Mapping[str, Any] | None = None) -> Aggregator:
    """An aggregator from its name (``"fedavg"``, ``"fedprox"``, ``"scaffold"``) and arguments."""
    if isinstance(aggregator, Aggregator):
        if args:
            raise FedlabTrainingError("aggregator_args only go with an aggregator given by name; "
                                      "pass the arguments to the aggregator's constructor instead")
        return aggregator
    cls = AGGREGATORS.get(str(aggregator).lower())
    if cls is None:
        raise FedlabTrainingError(f"unknown aggregator {aggregator!r}; choose from {sorted(AGGREGATORS)} "
                                  "or pass an Aggregator instance")
    try:
        return cls(**dict(args or {}))
    except TypeError as exc:
        raise FedlabTrainingError(f"wrong aggregator_args for {cls.name}: {exc}") from None


def aggregator_name(aggregator: Aggregator) -> str:
    """The built-in name (``"scaffold"``), or the class name of a custom aggregator: a breakpoint
    rebuilds a built-in one from its name and arguments, a custom one must be passed again."""
    builtin = AGGREGATORS.get(aggregator.name)
    return aggregator.name if type(aggregator) is builtin else type(aggregator).__qualname__
