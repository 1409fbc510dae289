"""The node's account of one differentially private training round: checked before it trains, spent before
it replies.

A DP round (``training_args["dp_args"]``) spends from the same budget as DP analytics: this researcher's
(``peer``) ε and δ on the dataset's *source* (:mod:`fedlab.node.dp_ledger`). Its cost depends on how
many rows the plan trains on, which only the training worker knows once the plan's ``training_data``
ran; the worker says so (``DPPlanned``) before its first step, and :meth:`DPRoundAccount.check` works out
the round from that count and the node's own copy of the arguments (sample rate ``batch_size / n_train``,
the planned steps) and refuses it there when it does not fit: nothing trains.

After the round, :meth:`DPRoundAccount.spend` records the planned round (the steps taken are never more;
checked) in one transaction, checking the budget again (an analytics answer may have spent meanwhile);
the reply leaves only after that committed. The rounds of one experiment are composed with Opacus' RDP
accountant (:func:`fedlab.privacy.dp_training.round_cost`): each ledger row of kind ``training`` and label
``experiment_id`` keeps its round in ``detail``, and a new round spends only the increase of the
composed ε. The experiment's first DP round fixes its δ and spends it; later rounds spend δ 0.
"""

from __future__ import annotations

import math
from typing import Any

from fedlab.errors import FedlabTrainingError
from fedlab.node.dp_ledger import DPLedger, Spending, root_record, source_key
from fedlab.node.registry import DatasetRecord
from fedlab.privacy.dp_training import (
    LOCAL,
    DPArgs,
    DPRound,
    RoundCost,
    central_round,
    default_delta,
    local_round,
    mechanism,
    planned_steps,
    round_cost,
    sample_rate,
)
from fedlab.protocol.dp_messages import DPSpent
from fedlab.training.args import TrainingArgs

__all__ = ["KIND", "DPRoundAccount"]

KIND = "training"


class DPRoundAccount:
    """One DP round of ``experiment_id`` on ``record``, paid by ``peer``."""

    def __init__(self, ledger: DPLedger, registry: Any, record: DatasetRecord, *, peer: str, experiment_id: str,
                 round_: int, dp: DPArgs, args: TrainingArgs) -> None:
        root = root_record(registry, record)
        self.ledger, self.peer, self.source, self.dataset = ledger, peer, source_key(root), root.name
        self.experiment_id, self.round, self.dp, self.args = experiment_id, round_, dp, args
        self.planned: DPRound | None = None
        self.n_train = self.updates = 0  # the rows and the optimizer steps the round may take

    def _round(self, n_train: int) -> DPRound:
        if self.dp.type != LOCAL:
            return central_round(self.dp.sigma)  # one release of the whole update, whatever the steps
        return local_round(self.dp.sigma, sample_rate(self.args.batch_size, n_train), self._updates(n_train))

    def _updates(self, n_train: int) -> int:
        a = self.args
        return planned_steps(n_train, a.batch_size, a.epochs, a.num_updates)

    def _cost(self, spending: Spending, new: DPRound) -> tuple[RoundCost, float, float]:
        """The round's cost on top of the experiment's earlier rounds, its δ, and the δ it spends."""
        history = spending.history(KIND, self.experiment_id)
        if history:
            delta = float(history[0]["delta"])
            if self.dp.delta is not None and not math.isclose(self.dp.delta, delta, rel_tol=1e-9):
                raise FedlabTrainingError(
                    f"dp_args delta={self.dp.delta:g}, but the DP rounds of experiment {self.experiment_id} on this "
                    f"node are accounted together at delta={delta:g} (its first round's); keep that delta, or "
                    "start a new experiment")
            spend_delta = 0.0
        else:
            delta = spend_delta = default_delta(self.dp, self.ledger.rules.delta)
        cost = round_cost([DPRound.from_detail(d) for d in history], new, delta)
        return cost, delta, spend_delta

    def _what(self, new: DPRound) -> str:
        how = (f"DP-SGD, sigma={self.dp.sigma:g}, {new.steps} steps at sample rate {new.sample_rate:.3g}"
               if self.dp.type == LOCAL else f"a clipped update with noise sigma={self.dp.sigma:g}")
        return f"round {self.round} of experiment {self.experiment_id} ({how})"

    def check(self, n_train: int) -> None:
        """Before the round trains: refuse it (FedlabBudgetError) unless its planned cost fits."""
        new = self._round(n_train)
        with self.ledger.spending(self.peer, self.source, self.dataset) as spending:
            cost, _, spend_delta = self._cost(spending, new)
            spending.check(cost.epsilon, spend_delta, self._what(new))
        self.planned, self.n_train, self.updates = new, n_train, self._updates(n_train)

    def spend(self, n_updates: int, msg_id: str) -> DPSpent:
        """After the round: record its cost (the reply may leave once this returns) and say what it was."""
        new = self.planned
        if new is None:
            raise FedlabTrainingError("the training worker trained a DP round without asking the node's budget first; "
                                      "the round is discarded")
        if n_updates > self.updates:
            raise FedlabTrainingError(f"the DP round took {n_updates} steps, more than the {self.updates} the node "
                                      "accounted; the round is discarded")
        with self.ledger.spending(self.peer, self.source, self.dataset) as spending:
            cost, delta, spend_delta = self._cost(spending, new)
            balance = spending.spend(
                epsilon=cost.epsilon, delta=spend_delta, kind=KIND, label=self.experiment_id, msg_id=msg_id,
                what=self._what(new),
                detail={**new.detail(), "type": self.dp.type, "sigma": self.dp.sigma, "clip": self.dp.clip,
                        "delta": delta, "round": self.round, "n_train": self.n_train, "steps_taken": n_updates,
                        "epsilon_experiment": cost.total_after})
        noise = "gradient" if self.dp.type == LOCAL else "update"
        return DPSpent(epsilon=cost.epsilon, delta=spend_delta, mechanism=mechanism(self.dp), balance=balance,
                       noise={noise: self.dp.noise_std})
