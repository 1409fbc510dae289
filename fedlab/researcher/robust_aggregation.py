"""Robust aggregation: next global models that a few faulty or malicious nodes cannot drag far.

A mean follows any one node as far as it likes: a node that sends ``x + 1000 Δ`` moves the
FedAvg model by about ``1000 Δ / N``. These aggregators look at every node's parameters
separately, so, unlike the others, they keep one model per node for the round (N models in
the parameters' dtypes) and cannot run under secure aggregation, which shows the researcher
only the sum (``Experiment(..., secagg=True)`` refuses them).

- ``Median``: the coordinate-wise median (Yin et al., 2018). Breakdown point 1/2: fewer than
  half the nodes cannot move a coordinate outside the range of the honest values.
- ``TrimmedMean(beta=0.1)``: per coordinate, the ``k = ceil(beta * n)`` largest and ``k``
  smallest of the n values are dropped and the rest averaged (Yin et al., 2018). Rounding up
  means that any ``beta > 0`` trims at least one value from each end, so the default still
  trims with 5 to 10 nodes (rounding down, as ``floor(0.1 * 5) = 0``, would be a plain mean).
  It tolerates up to ``k`` bad nodes and needs ``n > 2k``.
- ``Krum(f=1)``: Blanchard et al. (2017). Each node's score is the sum of its squared
  distances to its ``n - f - 2`` nearest other nodes; the node with the lowest score is the
  next global model, whole. Needs ``n >= 2f + 3`` replies in the round.
- ``MultiKrum(f=1, m=None)``: the unweighted mean of the ``m`` nodes with the lowest Krum
  scores (one scoring, as Blanchard et al. describe it); ``m`` defaults to ``n - f``.

The nodes' sample counts are not used as weights: a node could claim any number, and robust
rules treat nodes, not samples, as the unit of trust. All arithmetic is float64 (complex
entries by their real and imaginary parts); integer and bool entries (BatchNorm's
``num_batches_tracked``) are rounded, as FedAvg rounds them. Under label skew the honest
nodes disagree too, so the median and the trimmed mean lose some accuracy against FedAvg
even with no attacker: see docs/aggregation.md and ``benchmarks/convergence.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedlab.errors import FedlabSecaggError, FedlabTrainingError
from fedlab.researcher.aggregators import AGGREGATORS, Aggregator, Params, _rounded

__all__ = ["Krum", "Median", "MultiKrum", "RobustAggregator", "TrimmedMean"]

_BLOCK = 1 << 16  # coordinates x nodes per block of float64 work (512 KiB)


def _real64(array: np.ndarray) -> np.ndarray:
    """A flat float64 view of ``array`` (complex as interleaved real and imaginary parts)."""
    if np.iscomplexobj(array):
        return np.ascontiguousarray(array, np.complex128).reshape(-1).view(np.float64)
    return np.asarray(array, np.float64).reshape(-1)


def _count(owner: str, name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FedlabTrainingError(f"{owner} needs an integer {name} >= {low}, got {value!r}")
    return value


class RobustAggregator(Aggregator):
    """Keeps each node's parameters for the round; ``_combine`` makes the next model from them."""

    name: ClassVar[str] = "robust"
    needs_node_updates: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._replies: dict[str, Params] = {}

    def begin_round(self, global_params: Mapping[str, np.ndarray]) -> None:
        super().begin_round(global_params)
        self._replies = {}

    def release(self) -> None:
        super().release()
        self._replies = {}

    def add(self, node_id: str, params: Mapping[str, np.ndarray], n_samples: int,
            aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Keep a copy of the node's parameters (the reply's buffers may be reused after this)."""
        self._require_open("add")
        if n_samples <= 0:  # trained on nothing: not a contribution, as for FedAvg
            return
        if node_id in self._replies:
            raise FedlabTrainingError(f"node {node_id} answered twice in one round; only one reply counts")
        self._check(node_id, params)
        self._replies[node_id] = {name: np.array(value, copy=True) for name, value in params.items()}
        self._weight += float(n_samples)
        self.added.append(node_id)

    def add_secure(self, sums: Any, node_ids: list[str]) -> None:
        raise FedlabSecaggError(refusal(self))

    def _stacked(self, name: str) -> tuple[list[np.ndarray], int]:
        """Each node's entry ``name`` as flat float64 (node_id order, so ties never depend on arrival)."""
        flats = [_real64(self._replies[n][name]) for n in sorted(self._replies)]
        return flats, flats[0].size

    def _finish(self, name: str, flat: np.ndarray) -> np.ndarray:
        """The flat float64 result for ``name``, back in the global model's shape and dtype, read-only."""
        like = self._global[name]
        values = flat.view(np.complex128) if np.iscomplexobj(like) else flat
        if _rounded(like.dtype):
            values = np.rint(values)
        out = values.reshape(like.shape).astype(like.dtype, casting="unsafe")
        out.flags.writeable = False
        return out

    def end_round(self, n_nodes_total: int) -> Params:
        self._require_added()
        self._open = False
        try:
            return self._combine(len(self._replies))
        finally:
            self._replies = {}

    def _combine(self, n: int) -> Params:
        """Coordinate-wise: ``_reduce`` each block of (nodes x coordinates)."""
        self._require_enough(n)
        result = {}
        for name in self._global:
            flats, size = self._stacked(name)
            out = np.empty(size, np.float64)
            step = max(1, _BLOCK // n)
            for start in range(0, size, step):
                block = np.stack([f[start:start + step] for f in flats])
                out[start:start + step] = self._reduce(block)
            result[name] = self._finish(name, out)
        return result

    def _require_enough(self, n: int) -> None:
        """Raise when ``n`` replies are too few for this rule's guarantee."""

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Median(RobustAggregator):
    """The coordinate-wise median of the nodes' parameters (for an even count, the mean of the middle two)."""

    name = "median"

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        return np.median(block, axis=0)


class TrimmedMean(RobustAggregator):
    """Per coordinate, the mean after dropping the ``ceil(beta * n)`` largest and smallest values."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not (isinstance(beta, int | float) and not isinstance(beta, bool) and 0 <= beta < 0.5):
            raise FedlabTrainingError(f"trimmed_mean needs beta in [0, 0.5), the fraction trimmed from each end; "
                                      f"got {beta!r}")
        self.beta = float(beta)

    def args(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def trimmed(self, n: int) -> int:
        """How many values are dropped from each end with ``n`` nodes."""
        return math.ceil(self.beta * n - 1e-9)  # 1e-9: beta * n a whole number up to rounding is that number

    def _require_enough(self, n: int) -> None:
        k = self.trimmed(n)
        if n <= 2 * k:
            raise FedlabTrainingError(
                f"trimmed_mean with beta={self.beta:g} drops {k} value(s) from each end, which leaves nothing of "
                f"the {n} replies this round (it needs at least {2 * k + 1}); the global model is unchanged. "
                "Use a smaller beta, or more nodes.")

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        k = self.trimmed(block.shape[0])
        ordered = np.sort(block, axis=0)
        return ordered[k:block.shape[0] - k].mean(axis=0)


class Krum(RobustAggregator):
    """Blanchard et al. (2017): the one node's model closest to its ``n - f - 2`` nearest neighbours."""

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        super().__init__()
        self.f = _count(type(self).__name__, "f (the number of Byzantine nodes tolerated)", f, 0)
        self.chosen: list[str] = []  # whose models made the last round's global model

    def args(self) -> dict[str, Any]:
        return {"f": self.f}

    def _require_enough(self, n: int) -> None:
        if n < 2 * self.f + 3:
            raise FedlabTrainingError(
                f"{self.name} with f={self.f} needs at least 2f + 3 = {2 * self.f + 3} replies in a round, "
                f"this round has {n}; the global model is unchanged. Use a smaller f, or more nodes.")

    def scores(self) -> dict[str, float]:
        """Each node's Krum score this round: the sum of its ``n - f - 2`` smallest squared distances."""
        order = sorted(self._replies)
        n = len(order)
        squared = np.zeros((n, n), np.float64)
        for name in self._global:
            flats, size = self._stacked(name)
            step = max(1, _BLOCK // n)
            for start in range(0, size, step):
                block = np.stack([f[start:start + step] for f in flats])
                for i in range(n):
                    squared[i] += np.square(block - block[i]).sum(axis=1)
        neighbours = n - self.f - 2
        scores = {}
        for i, node_id in enumerate(order):
            others = np.sort(np.delete(squared[i], i))
            scores[node_id] = float(others[:neighbours].sum())
        return scores

    def selected(self, n: int) -> list[str]:
        """The nodes whose models make the next global model, best score first (ties: node id order)."""
        scores = self.scores()
        return sorted(scores, key=lambda node: (scores[node], node))[:self._m(n)]

    def _m(self, n: int) -> int:
        return 1

    def _combine(self, n: int) -> Params:
        self._require_enough(n)
        chosen = self.selected(n)
        self.chosen = chosen
        result = {}
        for name in self._global:
            flats = [_real64(self._replies[node][name]) for node in chosen]
            total = flats[0].copy()
            for flat in flats[1:]:
                total += flat
            result[name] = self._finish(name, total / len(flats))
        return result


class MultiKrum(Krum):
    """Blanchard et al. (2017): the unweighted mean of the ``m`` best-scored nodes (default ``n - f``)."""

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else _count("MultiKrum", "m (the number of nodes averaged)", m, 1)

    def args(self) -> dict[str, Any]:
        return {"f": self.f, "m": self.m}

    def _m(self, n: int) -> int:
        m = n - self.f if self.m is None else self.m
        if m > n - self.f:
            raise FedlabTrainingError(f"multikrum with f={self.f} averages at most n - f = {n - self.f} of this "
                                      f"round's {n} replies, not m={m}; the global model is unchanged. Use a "
                                      "smaller m, or leave it unset (n - f).")
        return m


def refusal(aggregator: Aggregator) -> str:
    """Why ``aggregator`` cannot run under secure aggregation, and what to do instead."""
    return (f"the {aggregator.name} aggregator needs each node's own parameters, and secure aggregation gives the "
            "researcher only their sum: run it without secagg (secagg=False, or %fed train without --secagg), or keep "
            "secure aggregation with an aggregator that needs only the sum: fedavg, fedprox, scaffold, fedavgm, "
            "fedadagrad, fedadam or fedyogi")


AGGREGATORS.update({cls.name: cls for cls in (Median, TrimmedMean, Krum, MultiKrum)})
