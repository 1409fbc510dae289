"""Experiment: federated training of one training plan over the nodes that hold a tagged dataset.

The seed's names and flow: find the nodes (a tag search), ask them to approve the plan
(``approve``) and whether it may run (``check``), then ``run`` rounds. Each round sends the
global parameters to every node (``TrainingJob``), folds their replies into the aggregator
as they arrive and makes the next global model. Validation follows the training arguments:
``test_on_global_updates`` has each node validate the global model it receives before
training on it (and, after the last round, one validation-only request validates the
final model, as the seed does), ``test_on_local_updates`` validates after local training.

A round waits at most ``round_timeout`` seconds (``DiscardOnTimeout``); a node that fails or
is late is left out of that round and comes back in the next, and ``history`` says who and
why. A round in which no node succeeds raises ``FedlabNodeError``. With ``breakpoint_dir``
the experiment is saved after every round, and ``Experiment.load_breakpoint`` resumes it
in a new process with the same result as an uninterrupted run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlab.errors import FedlabError, FedlabNodeError
from fedlab.researcher import held_fetch
from fedlab.researcher.aggregators import AGGREGATORS, Aggregator, aggregator_name, handed_out, make_aggregator
from fedlab.researcher.breakpoint import Breakpoint, read_breakpoint, write_breakpoint
from fedlab.researcher.held_fetch import PulledRound
from fedlab.researcher.local_job import build_model, training_loop
from fedlab.researcher.policies import DiscardOnDisconnect, DiscardOnTimeout, RequestPolicy
from fedlab.researcher.researcher import Researcher
from fedlab.researcher.secure_round import check_secagg_aggregator, check_secagg_arguments, run_secure_round
from fedlab.researcher.training_jobs import (
    TrainingJob,
    TrainingPlanApproveJob,
    TrainingPlanCheckJob,
    TrainResult,
    check_plain,
)
from fedlab.researcher.training_tables import history_frame, history_row, privacy_frame, status_frame
from fedlab.training.messages import TrainProgress
from fedlab.training.source import load_plan_class, plan_id, plan_source

__all__ = ["Experiment"]

log = logging.getLogger("fedlab.researcher")
ProgressListener = Callable[[str, TrainProgress], None]


class Experiment:
    """Federated training of ``training_plan`` on the nodes holding a dataset tagged ``tags``."""

    def __init__(
        self,
        researcher: Researcher,
        tags: str | Sequence[str],
        training_plan: type | str,
        *,
        model_args: Mapping[str, Any] | None = None,
        training_args: Mapping[str, Any] | None = None,
        rounds: int = 1,
        aggregator: str | Aggregator = "fedavg",
        aggregator_args: Mapping[str, Any] | None = None,
        nodes: Sequence[str] | None = None,
        round_timeout: float = 600.0,
        policies: Sequence[RequestPolicy] | None = None,
        breakpoint_dir: str | Path | None = None,
        on_progress: ProgressListener | None = None,
        experiment_id: str | None = None,
        share_persistent_buffers: bool = True,
        plan_class: str | None = None,
        search_timeout: float = 10.0,
        disconnect_grace: float = 10.0,
        secagg: bool = False,
        secagg_arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """``training_plan`` is a ``TorchTrainingPlan`` subclass, or module source text with
        ``plan_class`` naming the class. ``on_progress(node_id, TrainProgress)`` is called on the
        network thread for every progress event: keep it quick.

        ``secagg=True``: every round is securely aggregated (see :mod:`fedlab.researcher.secure_round`);
        ``secagg_arguments`` may set ``threshold`` (how many nodes must remain, default a majority),
        ``clip`` (|x| above which a value is clipped, default 4096) and ``timeout`` (seconds per
        set-up or unmasking step, default 30)."""
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise FedlabError(f"rounds must be a positive integer, got {rounds!r}")
        if not round_timeout > 0:
            raise FedlabError(f"round_timeout must be a positive number of seconds, got {round_timeout!r}")
        loop = training_loop()
        self.researcher = researcher
        self.tags = [tags] if isinstance(tags, str) else list(tags)
        self.plan_source, self.plan_class = plan_source(training_plan, plan_class)
        self.plan_id = plan_id(self.plan_source)  # what node operators see in `fedlab node plan list`
        self.model_args = dict(model_args or {})
        self.training_args = dict(training_args or {})
        loop.TrainingArgs.from_dict(self.training_args)  # wrong keys fail here, not on every node
        check_plain(model_args=self.model_args, training_args=self.training_args)
        self.rounds = rounds
        self.aggregator = make_aggregator(aggregator, aggregator_args)
        self._nodes_filter = list(nodes) if nodes is not None else None
        self.round_timeout = float(round_timeout)
        self.policies = list(policies or [])
        self.disconnect_grace = float(disconnect_grace)
        self.breakpoint_dir = Path(breakpoint_dir) if breakpoint_dir is not None else None
        self.on_progress = on_progress
        self.experiment_id = experiment_id or "exp-" + uuid.uuid4().hex[:12]
        self.share_persistent_buffers = share_persistent_buffers
        self.secagg = bool(secagg)
        self.secagg_arguments = check_secagg_arguments(secagg_arguments)
        if self.secagg:
            check_secagg_aggregator(self.aggregator)
        self.secagg_rounds: list[dict[str, Any]] = []  # per secure round: session, nodes, dropped, totals
        self._secagg_buffer: np.ndarray | None = None  # the masked sum's memory, kept from round to round
        self._secagg_next: Any = None  # the next round's session, being set up (secure_round._NextSession)
        self.fds = researcher.search(self.tags, nodes=self._nodes_filter, timeout=search_timeout)
        self.node_ids = self.fds.node_ids()
        self.state_ids: dict[str, str | None] = {n: None for n in self.node_ids}
        self.round_current = 0
        self._records: list[dict[str, Any]] = []
        self._plan_cls = load_plan_class(self.plan_source, self.plan_class)
        self._params = self._frozen(loop.initial_params(
            self._plan_cls, self.model_args, seed=int(self.training_args.get("seed", 0)),
            share_persistent_buffers=share_persistent_buffers))

    # -- what the researcher reads -------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """The global parameters (read-only arrays) after ``round_current`` rounds."""
        return dict(self._params)

    @property
    def history(self) -> pd.DataFrame:
        """One row per node and round: samples, train loss, validation metrics, timing, status.

        ``status`` is ok, refused (the node's privacy rules: its budget is spent, or it requires DP),
        error or missing, with the ``reason``. A DP round (``training_args["dp_args"]``) adds
        ``epsilon`` and ``delta`` (what the round spent on the node) and ``epsilon_spent`` and
        ``epsilon_remaining`` (this researcher's balance there afterwards). ``global_<metric>`` is the
        node's validation of the global model it received (before local training),
        ``local_<metric>`` after local training; the final validation-only request is a row of
        ``kind`` validation labelled round N + 1. ``total_seconds`` is measured on the
        researcher's side (send to reply), ``compute_seconds`` on the node.
        """
        return history_frame(self._records)

    def privacy(self) -> pd.DataFrame:
        """Per node: this experiment's DP rounds there, the ε and δ they spent (the ε of the rounds
        composed by the node's accountant), what remains of this researcher's budget on the node, and the
        last round's status and reason (``refused`` with the node's reason once its budget is spent)."""
        return privacy_frame(self._records, self.node_ids, self._names())

    def model(self) -> Any:
        """A torch module of the plan's model holding the global parameters."""
        return build_model(self._plan_cls, self.model_args, self._params)

    def _names(self) -> dict[str, str]:
        return self.researcher._names()

    @staticmethod
    def _frozen(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Read-only arrays nobody else can change. What a built-in aggregator's ``end_round``
        handed out already is (its memory is not written while the array lives) and is kept as
        it is; anything else (the plan's initial parameters, a custom aggregator's) is copied."""
        out = {}
        for name, value in params.items():
            if handed_out(value):
                out[name] = value
                continue
            array = np.array(value)  # our own copy: nobody else's buffer, nobody else can change it
            array.flags.writeable = False
            out[name] = array
        return out

    # -- approval ----------------------------------------------------------------------------
    def _job_kwargs(self, nodes_override: Sequence[str] | None = None) -> dict[str, Any]:
        nodes = self.node_ids if nodes_override is None else list(nodes_override)
        return {"researcher_id": self.researcher.id, "requests": self.researcher.requests, "nodes": nodes}

    def approve(self, description: str = "") -> pd.DataFrame:
        """Ask each node's operator to approve this plan; one row per node with its plan status."""
        job = TrainingPlanApproveJob(self.plan_source, self.plan_class, description, **self._job_kwargs())
        return status_frame(job.execute(), job, self.node_ids, self._names())

    def check(self) -> pd.DataFrame:
        """Whether each node may run this plan: approval required, status, plan id, message."""
        job = TrainingPlanCheckJob(self.experiment_id, self.plan_source, self.plan_class, **self._job_kwargs())
        return status_frame(job.execute(), job, self.node_ids, self._names())

    # -- training ----------------------------------------------------------------------------
    def _job(self, round_: int, do_training: bool, on_reply: Callable[[TrainResult], None] | None,
             nodes: Sequence[str] | None = None, secagg_arguments: Mapping[str, Any] | None = None,
             hold_min_bytes: int = 0) -> TrainingJob:
        node_ids = list(self.node_ids if nodes is None else nodes)
        node_args = {n: self.aggregator.node_args(n) for n in node_ids} if do_training else {}
        training_args = self.aggregator.training_args(self.training_args) if do_training else self.training_args
        return TrainingJob(
            self.experiment_id, round_, {n: self.fds.dataset(n).dataset_id for n in node_ids},
            self.plan_source, self.plan_class, self._params, **self._job_kwargs(node_ids),
            policies=self._round_policies(), model_args=self.model_args,
            training_args=training_args, aggregator_args={n: a for n, (a, _) in node_args.items()},
            aux_vars={n: v for n, (_, v) in node_args.items()}, state_ids=self.state_ids, do_training=do_training,
            share_persistent_buffers=self.share_persistent_buffers, on_reply=on_reply,
            on_progress=self.on_progress, secagg_arguments=secagg_arguments, hold_min_bytes=hold_min_bytes)

    def _round_policies(self) -> list[RequestPolicy]:
        """A round ends after ``round_timeout``; a node whose heartbeats stop is dropped after
        ``disconnect_grace`` (unless the researcher's own policies decide about disconnects)."""
        policies = [DiscardOnTimeout(self.round_timeout), *self.policies]
        if not any(p.handles_disconnect for p in self.policies):
            policies.append(DiscardOnDisconnect(self.disconnect_grace))
        return policies

    def _record(self, round_: int, kind: str, results: Mapping[str, Any]) -> None:
        names = self._names()
        for node_id, row in results.items():
            self._records.append(history_row(round_, kind, node_id, names.get(node_id, node_id), row))
            if row.status == "ok" and row.state_id is not None:
                self.state_ids[node_id] = row.state_id

    def _raise_if_none_ok(self, results: Mapping[str, Any], what: str) -> None:
        if any(r.status == "ok" for r in results.values()):
            return
        names = self._names()
        detail = "; ".join(f"{names.get(n, n)}: {r.status} ({r.reason})" for n, r in results.items()) \
            or "no node was asked"
        errors = {n: (r.code or r.status, r.reason) for n, r in results.items()}
        if results and all(r.status == "refused" for r in results.values()):
            raise FedlabNodeError(
                f"every node refused {what} under its privacy rules: {detail}. A spent privacy budget stays spent: "
                "ask the nodes' operators for a larger epsilon_budget, or start a new experiment that spends less "
                "(a larger sigma, fewer rounds or steps); see Experiment.history", errors)
        raise FedlabNodeError(f"every node failed {what}: {detail}. See Experiment.history; fix the cause "
                              "and call run() again to retry the round.", errors)

    def run_once(self) -> pd.DataFrame:
        """Run one round; return its rows of the history."""
        round_ = self._run_round()
        return history_frame([r for r in self._records if r["round"] == round_ and r["kind"] == "training"])

    def _run_round(self) -> int:
        """Run one round and return its number. ``run`` calls this, not ``run_once``: building the round's
        DataFrame costs milliseconds of pandas per round, as much as a small model's whole aggregation."""
        round_ = self.round_current + 1
        aggregator = self.aggregator
        aggregator.begin_round(self._params)

        def fold(result: TrainResult) -> None:
            aggregator.add(result.node_id, result.params, result.reply.n_samples, result.aux_vars)

        if self.secagg:
            run_secure_round(self, round_)
        elif aggregator.streams and sum(np.asarray(v).nbytes for v in self._params.values()) >= \
                held_fetch.HOLD_MIN_BYTES:  # large replies stay on their nodes and are pulled, two nodes at a time
            pulled = PulledRound(aggregator, self.researcher.requests, self._params)
            results: dict[str, Any] = {}
            try:
                results = dict(self._job(round_, True, pulled.fold, hold_min_bytes=held_fetch.HOLD_MIN_BYTES).execute())
            finally:
                pulled.finish(results)
            self._record(round_, "training", results)
            self._raise_if_none_ok(results, f"round {round_}")
        else:
            results = self._job(round_, True, fold).execute()
            self._record(round_, "training", results)
            self._raise_if_none_ok(results, f"round {round_}")
        self._params = self._frozen(aggregator.end_round(len(self.node_ids)))
        self.round_current = round_
        log.info("round %d done: %d of %d nodes contributed", round_, len(aggregator.added), len(self.node_ids))
        if self.breakpoint_dir is not None:
            self.save_breakpoint()
        return round_

    def validate(self) -> pd.DataFrame:
        """Have every node validate the current global model on its test split (no training)."""
        round_ = self.round_current + 1
        results = self._job(round_, False, None).execute()
        self._record(round_, "validation", results)
        self._raise_if_none_ok(results, "the validation")
        return history_frame(self._records[-len(results):])

    def run(self, rounds: int | None = None, *, increase: bool = False) -> pd.DataFrame:
        """Run ``rounds`` more rounds (default: up to ``self.rounds``); return the whole history.

        Past ``self.rounds`` only with ``increase=True``, which raises the limit, as in the seed.
        """
        remaining = self.rounds - self.round_current
        todo = remaining if rounds is None else int(rounds)
        if todo > remaining:
            if not increase:
                raise FedlabError(f"{todo} more rounds would pass the experiment's {self.rounds} rounds "
                                  f"({self.round_current} done); pass increase=True to raise the limit")
            self.rounds = self.round_current + todo
        try:
            for _ in range(max(todo, 0)):
                self._run_round()
        finally:
            self.aggregator.release()  # the sums it keeps from round to round: not needed between runs
            self._secagg_buffer = None
            if self._secagg_next is not None:  # a set-up for a round that will not run now: let it end
                self._secagg_next.wait()
                self._secagg_next = None
        args = self.training_args
        final = self.round_current + 1
        if (self.round_current == self.rounds and args.get("test_on_global_updates")
                and args.get("test_ratio", 0) > 0
                and not any(r["round"] == final and r["kind"] == "validation" for r in self._records)):
            self.validate()
            if self.breakpoint_dir is not None:
                self.save_breakpoint()
        return self.history

    # -- breakpoints -------------------------------------------------------------------------
    def save_breakpoint(self, path: str | Path | None = None) -> Path:
        """Save the experiment between rounds (default ``breakpoint_dir/round-NNNN``); return where."""
        if path is None:
            if self.breakpoint_dir is None:
                raise FedlabError("give a path, or create the experiment with breakpoint_dir=...")
            path = self.breakpoint_dir / f"round-{self.round_current:04d}"
        meta, arrays = self.aggregator.state()
        bp = Breakpoint(
            experiment_id=self.experiment_id, tags=self.tags, nodes=self._nodes_filter, node_ids=self.node_ids,
            plan_source=self.plan_source, plan_class=self.plan_class, model_args=self.model_args,
            training_args=self.training_args, aggregator=aggregator_name(self.aggregator),
            aggregator_args=self.aggregator.args(), aggregator_meta=meta, rounds=self.rounds,
            round_current=self.round_current, state_ids=self.state_ids, history=self._records,
            round_timeout=self.round_timeout, share_persistent_buffers=self.share_persistent_buffers,
            breakpoint_dir=str(self.breakpoint_dir.resolve()) if self.breakpoint_dir is not None else None,
            disconnect_grace=self.disconnect_grace, secagg=self.secagg, secagg_arguments=self.secagg_arguments)
        return write_breakpoint(bp, self._params, arrays, path)

    @classmethod
    def load_breakpoint(cls, path: str | Path, researcher: Researcher, *, aggregator: Aggregator | None = None,
                        on_progress: ProgressListener | None = None,
                        policies: Sequence[RequestPolicy] | None = None) -> Experiment:
        """A new experiment that goes on from the breakpoint at ``path`` (or the latest one under it).

        ``aggregator`` is needed only for a custom Aggregator class (the built-in ones are
        rebuilt from their saved arguments).
        """
        bp, params, arrays = read_breakpoint(path)
        if aggregator is None:
            if bp.aggregator not in AGGREGATORS:
                raise FedlabError(f"the breakpoint was made with the custom aggregator {bp.aggregator}; pass one: "
                                  f"Experiment.load_breakpoint(path, researcher, aggregator={bp.aggregator}(...))")
            aggregator = make_aggregator(bp.aggregator, bp.aggregator_args)
        exp = cls(researcher, bp.tags, bp.plan_source, plan_class=bp.plan_class, model_args=bp.model_args,
                  training_args=bp.training_args, rounds=bp.rounds, aggregator=aggregator, nodes=bp.nodes,
                  round_timeout=bp.round_timeout, policies=policies, breakpoint_dir=bp.breakpoint_dir,
                  on_progress=on_progress, experiment_id=bp.experiment_id,
                  share_persistent_buffers=bp.share_persistent_buffers, disconnect_grace=bp.disconnect_grace,
                  secagg=bp.secagg, secagg_arguments=bp.secagg_arguments)
        if set(exp.node_ids) != set(bp.node_ids):
            log.warning("the experiment ran on nodes %s; the search now finds %s", sorted(bp.node_ids),
                        sorted(exp.node_ids))
        if set(params) != set(exp._params):
            raise FedlabError(f"the breakpoint's parameters ({sorted(params)}) do not match the plan's model "
                              f"({sorted(exp._params)}); the breakpoint at {path} is not from this plan")
        exp.aggregator.load_state(bp.aggregator_meta, arrays)
        exp._params = cls._frozen(params)
        exp.round_current = bp.round_current
        exp.state_ids.update({n: s for n, s in bp.state_ids.items() if n in exp.state_ids})
        exp._records = list(bp.history)
        return exp

    def __repr__(self) -> str:
        return (f"Experiment({self.experiment_id}, plan {self.plan_class}, {self.aggregator.name}, "
                f"round {self.round_current}/{self.rounds}, {len(self.node_ids)} nodes)")
