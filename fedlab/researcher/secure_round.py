"""One securely aggregated training round of an ``Experiment`` (``Experiment(..., secagg=True)``).

The round is the plain round with a session around it: ``SecureSum.setup`` (keys and shares), the
``TrainingJob`` whose requests carry each node's ``SecaggInput`` and whose replies are masked vectors
added up as they arrive, then ``SecureSum.unmask`` and ``train_vector.decode``. The aggregator gets the
sums only (``Aggregator.add_secure``): ``sum_k n_k x_k`` for the parameters, the unweighted sums of the
aux vars (Scaffold's control variate updates) and ``sum_k n_k``. No node's parameters, corrections or
sample count reach the researcher.

A node that fails or is silent during set-up is left out of the round (a ``missing`` row saying why);
a node that drops out after set-up, before its masked vector arrives, is named in the history and its
masks are removed with the others' shares, as long as ``threshold`` nodes remain. Below that the round
fails with a ``FedlabSecaggError`` saying how many answered and how many were needed; the global model
is unchanged.

Robust aggregators (median, trimmed mean, Krum) need each node's own parameters, which a secure
round never has: ``check_secagg_aggregator`` refuses them, when the experiment is made and again
before a round's set-up.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedlab.errors import FedlabError, FedlabSecaggError
from fedlab.researcher.secure_sum import SecureSum
from fedlab.researcher.training_jobs import NodeRound
from fedlab.secagg import train_vector

if TYPE_CHECKING:
    from fedlab.researcher.experiment import Experiment

__all__ = ["check_secagg_aggregator", "check_secagg_arguments", "run_secure_round", "weight_bound"]

log = logging.getLogger("fedlab.researcher")
_ARGUMENTS = {"threshold", "clip", "timeout", "ring_bits"}
DEFAULT_STEP_TIMEOUT = 30.0
UNKNOWN_SIZE_BOUND = 1 << 24  # a dataset that does not say its size: assume at most 16M samples


def check_secagg_arguments(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``secagg_arguments``, checked: ``threshold`` (int >= 2), ``clip`` (> 0), ``timeout`` (seconds > 0),
    ``ring_bits`` (64, the default, or 32: two float values per 64-bit word, see docs/secagg.md)."""
    out = dict(args or {})
    unknown = sorted(set(out) - _ARGUMENTS)
    if unknown:
        raise FedlabError(f"unknown secagg_arguments {unknown}; they are {sorted(_ARGUMENTS)}")
    threshold = out.get("threshold")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2):
        raise FedlabError(f"secagg_arguments['threshold'] must be an integer >= 2, got {threshold!r}")
    ring_bits = out.get("ring_bits")
    if ring_bits is not None and (isinstance(ring_bits, bool) or ring_bits not in train_vector.RING_BITS):
        raise FedlabError(f"secagg_arguments['ring_bits'] must be 64 (the default) or 32 (two float values per "
                          f"word: half the bytes and masks, a coarser step; see docs/secagg.md), got {ring_bits!r}")
    if ring_bits == 32 and out.get("clip") is None:
        raise FedlabError("secagg_arguments['ring_bits'] = 32 needs secagg_arguments['clip'] too: the largest |value| "
                          "of a parameter or aux var (clipped beyond it), near the model's range, e.g. 8.0; the "
                          "default clip 4096 leaves too few fraction bits in 32 (see docs/secagg.md)")
    for key in ("clip", "timeout"):
        value = out.get(key)
        if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool)
                                      and value > 0 and math.isfinite(value)):
            raise FedlabError(f"secagg_arguments[{key!r}] must be a finite number > 0, got {value!r}")
    return out


def check_secagg_aggregator(aggregator: Any) -> None:
    """Refuse an aggregator that needs each node's parameters (``needs_node_updates``): a secure round
    gives only their sum. The error says why and what to use instead."""
    if getattr(aggregator, "needs_node_updates", False):
        from fedlab.researcher.robust_aggregation import refusal

        raise FedlabSecaggError(refusal(aggregator))


def weight_bound(exp: Experiment, nodes: list[str]) -> int:
    """The largest sample count any node can report: the largest dataset the nodes advertised (public)."""
    sizes = [exp.fds.dataset(n).n_samples for n in nodes]
    return max([s for s in sizes if s > 0] or [1]) if all(s > 0 for s in sizes) else UNKNOWN_SIZE_BOUND


def run_secure_round(exp: Experiment, round_: int) -> None:
    """Run round ``round_`` of ``exp`` under secure aggregation, folding its sum into ``exp.aggregator``."""
    check_secagg_aggregator(exp.aggregator)  # before any node is asked for anything
    args = exp.secagg_arguments
    prepared, exp._secagg_next = exp._secagg_next, None
    secure = prepared.wait() if prepared is not None else _NextSession(exp).wait()
    if isinstance(secure, FedlabSecaggError):
        exp._record(round_, "training", _left_rows(secure.args[1], {}))
        raise FedlabSecaggError(str(secure.args[0]))
    ready = list(secure.ready)
    aux = exp.aggregator.node_args(ready[0])[1]
    ring_bits = int(args.get("ring_bits", 64))
    fields = train_vector.layout(exp._params, aux, len(ready), clip=args.get("clip"), ring_bits=ring_bits)
    bound = weight_bound(exp, ready)
    job = exp._job(round_, True, None, nodes=ready,
                   secagg_arguments={"secure_sum": secure, "fields": fields, "weight_bound": bound,
                                     "sum_buffer": exp._secagg_buffer})
    results = job.execute()
    if exp.round_current + 1 < exp.rounds:  # the next round's set-up runs beside this one's unmasking
        exp._secagg_next = _NextSession(exp, background=True)
    results = {**results, **_left_rows(secure, results)}
    record = {"round": round_, "session": secure.session_id, "threshold": secure.threshold, "nodes": list(ready),
              "survivors": list(job.masked_nodes), "dropped": [n for n in ready if n not in job.masked_nodes],
              "ring_bits": ring_bits, "bound": train_vector.bound(fields, len(ready))}
    exp.secagg_rounds.append(record)
    if job.masked_sum is None:
        exp._record(round_, "training", results)
        exp._raise_if_none_ok(results, f"round {round_}")
    try:
        why = {n: f"{r.status}: {r.reason}" for n, r in results.items() if n not in job.masked_nodes}
        total = secure.unmask(job.masked_sum, job.masked_nodes, why) if job.masked_sum is not None else None
    except FedlabSecaggError as exc:
        for node_id in job.masked_nodes:  # their figures were masked and stay so: nothing of this round counts
            results[node_id] = NodeRound(node_id, "error", reason=f"secure aggregation: {exc}")
        exp._record(round_, "training", results)
        raise
    exp._record(round_, "training", results)
    assert total is not None
    sums = train_vector.decode(fields, total, bound)
    record.update(n_samples=sums.n_samples, contributors=sums.contributors, clipped=sums.clipped)
    if sums.clipped:
        log.warning("round %d: %d values were clipped to +-%g before secure aggregation; raise "
                    "secagg_arguments['clip'] if the model's values are larger", round_, sums.clipped,
                    max(f.clip for f in fields))
    exp.aggregator.add_secure(sums, list(job.masked_nodes))
    exp._secagg_buffer = total  # the sum's memory, decoded already: the next round adds into it


class _NextSession:
    """A session set up (keys and shares) for a round, now or in a background thread.

    Sessions are independent of one another, so the next round's set-up needs nothing of this round:
    it runs while this round is unmasked, and the next round starts at its data request. ``wait()``
    gives the set-up session, or the ``FedlabSecaggError`` (with the session) that stopped it."""

    def __init__(self, exp: Experiment, *, background: bool = False) -> None:
        args = exp.secagg_arguments
        timeout = float(args.get("timeout", min(DEFAULT_STEP_TIMEOUT, exp.round_timeout)))
        self.secure = SecureSum(exp.researcher.requests, exp.node_ids, purpose="training",
                                threshold=args.get("threshold"), timeout=timeout)
        self._outcome: SecureSum | FedlabSecaggError | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="secagg-setup", daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            self.secure.setup()
            self._outcome = self.secure
        except FedlabSecaggError as exc:
            self._outcome = FedlabSecaggError(str(exc), self.secure)
        except Exception as exc:  # noqa: BLE001 - reported to the round that waits for it, not lost
            self._outcome = FedlabSecaggError(f"the secure aggregation set-up failed: {exc!r}", self.secure)

    def wait(self) -> SecureSum | FedlabSecaggError:
        if self._thread is not None:
            self._thread.join()  # bounded: each of the set-up's two steps waits at most its timeout
        assert self._outcome is not None
        return self._outcome


def _left_rows(secure: SecureSum, results: Mapping[str, NodeRound]) -> dict[str, NodeRound]:
    """A ``missing`` row for every node that left the session before its data request was sent."""
    return {n: NodeRound(n, "missing", reason=f"secure aggregation: {why}")
            for n, why in secure.left.items() if n not in results}
