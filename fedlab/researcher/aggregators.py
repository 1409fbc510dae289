"""Aggregators: how the nodes' updated parameters become the next global model.

Small verbs, like Flower's strategies: the experiment owns the loop and the network, an
aggregator only says what each node gets (``node_args``, ``training_args``) and folds
replies into the next global parameters (``begin_round`` / ``add`` / ``end_round``). It is
pure numpy, so its arithmetic is tested exactly without nodes.

Replies are folded in as they arrive, into running float64 sums (complex128 for complex
parameters), so the researcher holds the global model, the sums and the reply being added,
never one model per node, and the result does not depend on arrival order beyond float64
rounding. A reply is added in place, through one cache-sized scratch block: adding it
allocates nothing the size of the model. At the end of a round each parameter's mean is
divided and cast to the parameter's dtype in one pass, written over the front of its own
float64 sum; the rest of the sum's pages go back to the system. That memory is the next
global model, handed out read-only, and it is written again (as a later round's sum) only
once nothing holds that array or a view of it any more: the previous model is in use while
the next one is made, and a caller, or a send still queued for a slow node, may hold any of
them longer. So two such memories per parameter alternate, allocated in the first two rounds
(``release`` gives them back). Integer entries (BatchNorm's ``num_batches_tracked``) are
averaged and rounded.

- ``FedAvg``: the mean of the nodes' parameters weighted by their training samples.
- ``FedProx(mu)``: FedAvg aggregation; the nodes add ``mu/2 * ||w - w_global||^2`` to their
  loss (``fedprox_mu`` is put into their training arguments).
- ``Scaffold(server_lr)``: Karimireddy et al. (2020), option II. The global control variate
  ``c`` goes to every node as ``aux_vars["scaffold"]``; nodes answer with their ``delta_c``;
  ``x <- x + server_lr * weighted_mean(y_i - x)`` and ``c <- c + sum(delta_c) / N`` where N
  is the number of nodes in the experiment, not only those that answered this round.

Server optimizers (``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``) live in
``server_optimizers`` and robust rules (``median``, ``trimmed_mean``, ``krum``, ``multikrum``)
in ``robust_aggregation``; both register their names in ``AGGREGATORS`` (docs/aggregation.md).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from fedlab.errors import FedlabTrainingError

__all__ = ["AGGREGATORS", "Aggregator", "FedAvg", "FedProx", "Scaffold", "aggregator_name", "make_aggregator"]

Params = dict[str, np.ndarray]
AuxVars = dict[str, dict[str, np.ndarray]]


_BLOCK = 1 << 16  # elements per block: 512 KiB of float64 scratch, stays in cache
_MAPPED_BYTES = 1 << 16  # a parameter's memory from here up is its own mapping, whose unused pages go back
_KEEP_SLOTS = 2  # memory kept per parameter: the current global model's, and the one written next
_PAGE = mmap.PAGESIZE
# every global model array an aggregator handed out, while it lives (by id: arrays are not hashable)
_HANDED_OUT: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def handed_out(array: Any) -> bool:
    """Whether ``array`` is a global model array a built-in aggregator's ``end_round`` returned:
    read-only, and its memory is not written again while it or any view of it is alive, so the
    caller may keep it without a copy."""
    return _HANDED_OUT.get(id(array)) is array


def _sum_dtype(dtype: np.dtype) -> np.dtype:
    """What a parameter of ``dtype`` is summed in: complex128 for complex dtypes, else float64."""
    return np.dtype(np.complex128 if np.issubdtype(dtype, np.complexfloating) else np.float64)


def _rounded(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def _flat(array: np.ndarray) -> np.ndarray:
    """A flat view (a copy only for a non-contiguous array, which replies never are)."""
    return np.ascontiguousarray(array).reshape(-1)


class _Slot:
    """Memory for one parameter's running sum, which at the end of the round becomes, in place,
    the next global model's array (the mean, in the parameter's dtype, fills the front of it).

    The array handed out is a read-only view through its own base; the slot keeps only a weak
    reference to that base, which every view of the array (a frame queued in zmq, a caller's
    copy of ``Experiment.params``) keeps alive: while it lives the slot is ``busy`` and is not
    written. Large slots are a private anonymous mapping: once the mean is written, the pages
    behind it are given back (they held the float64 sum), so a global model costs its own size.
    """

    def __init__(self, nbytes: int) -> None:
        self.memory: mmap.mmap | bytearray
        if nbytes >= _MAPPED_BYTES and hasattr(mmap, "MAP_PRIVATE"):
            self.memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its own large arrays: far fewer page faults
                self.memory.madvise(mmap.MADV_HUGEPAGE)
        else:
            self.memory = bytearray(nbytes)
        self.nbytes = nbytes
        self._bytes = np.frombuffer(self.memory, np.uint8)  # ours alone, never handed out
        self._handed: weakref.ref[np.ndarray] | None = None

    @property
    def busy(self) -> bool:
        return self._handed is not None and self._handed() is not None

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writeable array over the front of the slot."""
        return self._bytes[:math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def hand_out(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The array ``view`` wrote, read-only for good; the slot is busy while it (or a view) lives."""
        nbytes = math.prod(shape) * dtype.itemsize
        base = np.frombuffer(memoryview(self.memory).toreadonly(), np.uint8)
        self._handed = weakref.ref(base)
        start = -(-nbytes // _PAGE) * _PAGE
        if isinstance(self.memory, mmap.mmap) and start < self.nbytes and hasattr(mmap, "MADV_DONTNEED"):
            self.memory.madvise(mmap.MADV_DONTNEED, start, self.nbytes - start)  # the sum's tail: not needed
        return base[:nbytes].view(dtype).reshape(shape)


class _RunningSums:
    """Weighted sums of named arrays, in memory kept from round to round, with one scratch block.

    ``reset`` starts a round; the first ``add`` of a name in a round writes its sum, the next
    ones add into it; ``finish`` makes the result. With ``in_place`` (the global model's sums)
    each sum lives in a ``_Slot`` and the result is written over it, in its memory; two slots
    per parameter alternate, as the previous global model is still in use (a third is made only
    while both are). Without (Scaffold's control variates) the sums are plain arrays, kept.
    """

    def __init__(self, *, in_place: bool) -> None:
        self.in_place = in_place
        self.buffers: dict[str, np.ndarray] = {}
        self.written: set[str] = set()
        self._slots: dict[str, list[_Slot]] = {}
        self._current: dict[str, _Slot] = {}
        self._scratch: dict[tuple[np.dtype, int], np.ndarray] = {}  # by dtype and thread (pulls fold in two)

    def reset(self, like: Mapping[str, np.ndarray]) -> None:
        buffers, self._current = {}, {}
        for name, array in like.items():
            dtype = _sum_dtype(array.dtype)
            if self.in_place:
                slot = self._free_slot(name, array.size * dtype.itemsize)
                self._current[name] = slot
                buffers[name] = slot.view(array.shape, dtype)
                continue
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape != array.shape or buffer.dtype != dtype:
                buffer = np.empty(array.shape, dtype)
            buffers[name] = buffer
        self._slots = {name: self._slots.get(name, []) for name in like} if self.in_place else {}
        self.buffers = buffers
        self.written = set()

    def _free_slot(self, name: str, nbytes: int) -> _Slot:
        slots = [slot for slot in self._slots.get(name, []) if slot.nbytes == nbytes or slot.busy]
        for slot in slots:
            if slot.nbytes == nbytes and not slot.busy:
                self._slots[name] = slots
                return slot
        slot = _Slot(nbytes)
        if len(slots) >= _KEEP_SLOTS:  # the oldest busy one lives on with whoever holds its array
            slots = slots[len(slots) - _KEEP_SLOTS + 1:]
        self._slots[name] = [*slots, slot]
        return slot

    def release(self) -> None:
        self.buffers, self.written, self._slots, self._current, self._scratch = {}, set(), {}, {}, {}

    def scratch(self, dtype: np.dtype) -> np.ndarray:
        key = (dtype, threading.get_ident())
        block = self._scratch.get(key)
        if block is None:
            block = self._scratch[key] = np.empty(_BLOCK, dtype)
        return block

    def zero(self) -> None:
        """Every sum to zero, so that any number of replies can be added into them in any order (pulls
        fold chunks of two nodes at once): a sum's mapping is handed back to the system, whose pages
        read as zeros (no pass over the memory), a small one is filled."""
        for name, buffer in self.buffers.items():
            slot = self._current.get(name)
            if slot is not None and isinstance(slot.memory, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                slot.memory.madvise(mmap.MADV_DONTNEED)
            else:
                buffer.fill(0)
        self.written = set(self.buffers)

    def refusal(self, name: str, value: np.ndarray | np.dtype) -> str | None:
        """Why ``value`` (an array, or its dtype) cannot be added to ``name``'s sum (a complex array into
        a real sum), or None."""
        dtype = self.buffers[name].dtype
        came = value if isinstance(value, np.dtype) else value.dtype
        if not np.can_cast(came, dtype, "same_kind"):
            return f"{name} came as {came}, which cannot be averaged as {dtype}"
        return None

    def add(self, name: str, value: np.ndarray, weight: float) -> None:
        """``sum[name] += weight * value``, in the sum's dtype and in place."""
        self.add_part(name, 0, _flat(value), weight, first=name not in self.written)
        self.written.add(name)

    def add_part(self, name: str, start: int, values: np.ndarray, weight: float, *, first: bool) -> None:
        """``sum[name].flat[start:start + values.size] += weight * values`` (``first``: written, not added:
        the round's first contribution to those elements needs no zeroing pass)."""
        flat_total = self.buffers[name].reshape(-1)
        if start < 0 or start + values.size > flat_total.size:
            raise FedlabTrainingError(f"elements {start}..{start + values.size} are outside {name} "
                                      f"({flat_total.size} elements)")
        total = flat_total[start:start + values.size]
        if first:
            if weight == 1.0:
                np.copyto(total, values)
            else:
                np.multiply(values, weight, out=total, dtype=total.dtype)
        elif weight == 1.0:
            np.add(total, values, out=total, dtype=total.dtype)
        else:  # weight * value block by block into the scratch, then added: no model-sized temporary
            scratch = self.scratch(total.dtype)
            for offset in range(0, total.size, _BLOCK):
                block = total[offset:offset + _BLOCK]
                step = scratch[:block.size]
                np.multiply(values[offset:offset + _BLOCK], weight, out=step, dtype=total.dtype)
                np.add(block, step, out=block)

    def finish(self, name: str, weight: float, dtype: np.dtype, x: np.ndarray | None = None,
               server_lr: float = 1.0) -> np.ndarray:
        """The result for ``name``, read-only, in ``dtype``: ``sum / weight`` or, with ``x``,
        ``x + server_lr * (sum / weight - x)``; rounded first for integer and bool dtypes.

        One pass over the sum, block by block: each block is computed in float64 (complex128)
        in the scratch, then cast into the result. With ``in_place`` the result is written over
        the sum's own memory (its front: a block's result never reaches a sum not yet read).
        The sum is gone after this, until the next ``reset``.
        """
        total = self.buffers.pop(name)
        slot = self._current.pop(name, None)
        dtype = np.dtype(dtype)
        in_place = slot is not None and dtype.itemsize <= total.dtype.itemsize
        out = slot.view(total.shape, dtype) if slot is not None and in_place else np.empty(total.shape, dtype)
        flat_total, flat_out, scratch = total.reshape(-1), out.reshape(-1), self.scratch(total.dtype)
        flat_x = _flat(x) if x is not None else None
        for start in range(0, flat_total.size, _BLOCK):
            stop = start + _BLOCK
            step = scratch[:flat_total[start:stop].size]
            np.divide(flat_total[start:stop], weight, out=step)
            if flat_x is not None:  # x + lr * (mean - x), in that order, as float64
                np.subtract(step, flat_x[start:stop], out=step, dtype=step.dtype)
                np.multiply(step, server_lr, out=step)
                np.add(step, flat_x[start:stop], out=step, dtype=step.dtype)
            if _rounded(dtype):
                np.rint(step, out=step)
            np.copyto(flat_out[start:stop], step, casting="unsafe")
        if slot is not None and in_place:
            result = slot.hand_out(total.shape, dtype)
        else:
            out.flags.writeable = False
            result = out
        _HANDED_OUT[id(result)] = result
        return result


class Aggregator:
    """Base class: a sample-weighted running mean of the nodes' parameters (that is FedAvg).

    Subclasses change what nodes receive (``node_args``, ``training_args``) or how the mean
    becomes the next global model (``end_round``), and keep their own state in ``state()``.
    """

    name: ClassVar[str] = "fedavg"
    #: True for rules that need each node's own parameters (robust aggregation): secure
    #: aggregation, which gives only their sum, refuses them.
    needs_node_updates: ClassVar[bool] = False

    def __init__(self) -> None:
        self._global: Params = {}
        self._sums = _RunningSums(in_place=True)
        self._weight = 0.0
        self._open = False  # between begin_round and end_round
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
        self._sums.reset(self._global)
        self._weight = 0.0
        self._open = True
        self.added = []

    def release(self) -> None:
        """Give back the memory kept between rounds (the sums); the next round makes it anew. The
        global model arrays already handed out stay valid (they keep their own memory alive)."""
        self._sums.release()

    def _check(self, node_id: str, params: Mapping[str, np.ndarray]) -> None:
        self.check_layout(node_id, {name: (np.shape(value), np.asarray(value).dtype)
                                     for name, value in params.items()})

    def check_layout(self, node_id: str, layout: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """That a reply's names, shapes and dtypes (``{name: (shape, dtype)}``) fit the global model."""
        missing = sorted(set(self._global) - set(layout))
        extra = sorted(set(layout) - set(self._global))
        if missing or extra:
            raise FedlabTrainingError(
                f"node {node_id} returned parameters that do not match the global model"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                + ". Every node must run the same training plan with the same model_args.")
        for name, (shape, dtype) in layout.items():
            if tuple(shape) != self._global[name].shape:
                raise FedlabTrainingError(
                    f"node {node_id} returned {name} of shape {tuple(shape)}, the global model has "
                    f"{self._global[name].shape}; check that model_args are the same everywhere")
            refusal = self._sums.refusal(name, np.dtype(dtype))
            if refusal is not None:
                raise FedlabTrainingError(f"node {node_id} returned parameters of the wrong type: {refusal} "
                                          f"(the global model has {self._global[name].dtype})")

    def add(self, node_id: str, params: Mapping[str, np.ndarray], n_samples: int,
            aux_vars: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Fold one node's reply into the running sums, in place; the caller may drop the reply after."""
        self._require_open("add")
        if n_samples <= 0:  # weight zero: it would not change the mean
            return
        self._check(node_id, params)
        weight = float(n_samples)
        for name, value in params.items():
            self._sums.add(name, np.asarray(value), weight)
        self._weight += weight
        self.added.append(node_id)

    @property
    def streams(self) -> bool:
        """Whether replies may be folded in chunk by chunk (``add_streamed``): FedAvg's sum, which every
        aggregator that keeps ``add`` as it is (FedProx, the server optimizers) folds; not Scaffold (its
        control variates come with the reply) nor the robust rules (they need each node's whole update).
        A subclass that overrides ``add`` streams only if it overrides ``add_streamed`` too."""
        cls = type(self)
        return (cls.add is Aggregator.add or cls.add_streamed is not Aggregator.add_streamed) \
            and not self.needs_node_updates

    def add_streamed(self, node_id: str, layout: Mapping[str, tuple[tuple[int, ...], np.dtype]], n_samples: int,
                     chunks: Iterable[tuple[str, int, np.ndarray]], *, lock: Any = None) -> None:
        """Fold one node's reply that arrives in chunks: ``layout`` is ``{name: (shape, dtype)}`` as the
        reply announced it, ``chunks`` yields ``(name, first_element, flat_values)`` covering every element
        once. The sums are written only by these chunks, so at most one chunk is held at a time.

        If ``chunks`` raises, the exception goes through; when other nodes were already added, the
        sums hold part of this node's update too and the round must be folded again without it
        (``begin_round``, then the others): ``fedlab.researcher.held_fetch.PulledRound`` does that.
        Several nodes may be folded at once from several threads once the sums are zeroed
        (``zero_sums``), each chunk under a lock of its place, and ``lock`` around the bookkeeping."""
        self._require_open("add")
        if not self.streams:
            raise FedlabTrainingError(f"{type(self).__name__} needs whole replies; it cannot fold them in chunks")
        if n_samples <= 0:
            return
        self.check_layout(node_id, layout)
        weight = float(n_samples)
        first = {name: name not in self._sums.written for name in layout}
        filled = dict.fromkeys(layout, 0)
        for name, start, values in chunks:
            if name not in first or values.dtype != np.dtype(layout[name][1]):
                raise FedlabTrainingError(f"node {node_id} sent a chunk of {name} that its reply did not announce")
            self._sums.add_part(name, start, values, weight, first=first[name])
            filled[name] += values.size
        short = [name for name, (shape, _) in layout.items() if filled[name] != math.prod(shape)]
        if short:
            raise FedlabTrainingError(f"node {node_id}'s reply did not cover every element of {short}")
        with lock if lock is not None else contextlib.nullcontext():
            self._sums.written.update(layout)
            self._weight += weight
            self.added.append(node_id)

    def zero_sums(self) -> None:
        """Start this round's sums at zero (right after ``begin_round``), for replies folded concurrently."""
        self._require_open("zero_sums")
        self._sums.zero()

    def add_secure(self, sums: Any, node_ids: list[str]) -> None:
        """Fold a secure aggregation's unmasked sum (``fedlab.secagg.train_vector.TrainingSums``) of
        ``node_ids``: the same sums ``add`` makes node by node, without any node's own figures."""
        self._require_open("add_secure")
        if sums.n_samples <= 0:
            return
        for name in sums.names():  # sum_k (n_k / W) x_k, times W: sum_k n_k x_k, decoded into the sum itself
            sums.decode_into("", name, self._sums.buffers[name], weight=float(sums.weight_bound))
            self._sums.written.add(name)
        self._weight += float(sums.n_samples)
        self.added.extend(node_ids)

    def _require_open(self, what: str) -> None:
        if not self._open:  # the sums' memory is the last global model's now: never write it
            raise FedlabTrainingError(f"{what}() outside a round: call begin_round() with the global model first")

    def _require_added(self) -> None:
        self._require_open("end_round")
        if not self.added:
            raise FedlabTrainingError(
                "no node contributed parameters this round (every node failed, was missing, or trained "
                "on 0 samples); the global model is unchanged. See the experiment's history for why.")

    def _mean(self) -> dict[str, np.ndarray]:
        """The weighted means in float64 (new arrays), for aggregators that want them whole."""
        self._require_added()
        return {name: self._sums.buffers[name] / self._weight for name in self._global}

    def end_round(self, n_nodes_total: int) -> Params:
        """The next global parameters, each in its own dtype.

        The arrays are read-only and their memory is not written again while any of them (or a
        view of one) is alive: the caller may keep them without a copy (the experiment does).
        """
        self._require_added()
        self._open = False  # whatever happens now, these sums are spent
        return {name: self._sums.finish(name, self._weight, like.dtype) for name, like in self._global.items()}

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
        self._delta_c = _RunningSums(in_place=False)

    def args(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def begin_round(self, global_params: Mapping[str, np.ndarray]) -> None:
        super().begin_round(global_params)
        if not self.c:
            self.c = {k: np.zeros(v.shape, np.float64) for k, v in self._global.items()
                      if np.issubdtype(v.dtype, np.floating)}
        # new arrays every round: last round's may still be on the wire, to a slow node
        self._c_sent = {k: v.astype(self._global[k].dtype) for k, v in self.c.items()}
        for sent in self._c_sent.values():
            sent.flags.writeable = False
        self._delta_c.reset(self.c)

    def release(self) -> None:
        super().release()
        self._delta_c.release()

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
            refusal = self._delta_c.refusal(name, np.asarray(value))
            if refusal is not None:
                raise FedlabTrainingError(f"node {node_id} returned a control variate of the wrong type: {refusal}")
        super().add(node_id, params, n_samples, aux_vars)
        if node_id not in self.added:  # trained on 0 samples: no contribution at all
            return
        for name, value in delta.items():
            self._delta_c.add(name, np.asarray(value), 1.0)

    def add_secure(self, sums: Any, node_ids: list[str]) -> None:
        super().add_secure(sums, node_ids)
        if sums.n_samples <= 0:
            return
        for name in sums.names("scaffold"):
            sums.decode_into("scaffold", name, self._delta_c.buffers[name])
            self._delta_c.written.add(name)

    def end_round(self, n_nodes_total: int) -> Params:
        """``x + server_lr * (mean - x)`` in each parameter's dtype; ``c`` is updated in place."""
        self._require_added()
        self._open = False
        n_total = max(int(n_nodes_total), len(self.added))
        result = {name: self._sums.finish(name, self._weight, x.dtype, x=x, server_lr=self.server_lr)
                  for name, x in self._global.items()}
        for name in self._delta_c.written:
            total = self._delta_c.buffers[name]
            np.divide(total, n_total, out=total)
            np.add(self.c[name], total, out=self.c[name])
        self._delta_c.written = set()
        return result

    def state(self) -> tuple[dict[str, Any], Params]:
        return {}, {f"c.{k}": v for k, v in self.c.items()}

    def load_state(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.c = {k[2:]: np.array(v, dtype=np.float64) for k, v in arrays.items() if k.startswith("c.")}


AGGREGATORS: dict[str, type[Aggregator]] = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold}


def make_aggregator(aggregator: str | Aggregator, args: Mapping[str, Any] | None = None) -> Aggregator:
    """An aggregator from its name (a key of ``AGGREGATORS``: ``"fedavg"``, ``"fedadam"``, ``"median"``...)
    and arguments."""
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


# the other built-in aggregators add themselves to AGGREGATORS when imported (they import this module)
from fedlab.researcher import robust_aggregation, server_optimizers  # noqa: E402, F401
