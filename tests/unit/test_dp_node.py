"""DP on one node's dispatcher over a real node.db: the budget is the node's and holds against a researcher
who sends hand-written messages, repeats or varies requests, asks concurrently, derives datasets or
re-registers a file, and against a restart."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.config import init_node_dir
from fedlab.node.dispatch import Dispatcher
from fedlab.node.dp_ledger import DPLedger
from fedlab.node.registry import DatasetRegistry
from fedlab.preprocessing.messages import PreprocRequest
from fedlab.privacy.dp_rules import DPRules
from fedlab.protocol import PROTOCOL_VERSION, DecodeError, ErrorReply, decode, make_envelope
from fedlab.protocol.dp_messages import DPQuery, PrivacyBudgetReply, PrivacyBudgetRequest

pytest.importorskip("opendp")
N = 400


class Node:
    def __init__(self, root: Path, rules: DPRules) -> None:
        self.root, self.rules = root, rules
        config = init_node_dir(root / "node", "n")
        self.db = config.db_path
        rng = np.random.default_rng(3)
        frame = pd.DataFrame({"age": rng.integers(20, 80, N), "weight": rng.normal(70, 12, N),
                              "sex": rng.choice(["F", "M"], N), "patient_id": [f"P{i}" for i in range(N)]})
        frame.loc[:20, "weight"] = np.nan
        frame.to_csv(root / "cohort.csv", index=False)
        self.frame = frame
        self.registry = DatasetRegistry(self.db)
        self.dataset = self.registry.add("cohort", ["c"], "csv", str(root / "cohort.csv")).dataset_id
        self.restart()

    def restart(self) -> None:
        from fedlab.analytics.disclosure_rules import DisclosureRules

        self.dispatcher = Dispatcher("n1", "n", self.registry, DisclosureRules(excluded_columns=("patient_id",)),
                                     node_dir=self.root / "node", privacy=self.rules)

    def ask(self, dataset: str | None = None, **kw: Any) -> FAReply | ErrorReply:
        envelope = make_envelope(FARequest(dataset_id=dataset or self.dataset, **kw), "researcher")
        return self.dispatcher.handle(envelope).content

    def spent(self) -> float:
        return sum(r.epsilon_spent for r in DPLedger(self.db, self.rules).rows())


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, DPRules(require_dp=True, epsilon_budget=3.0, bounds={"weight": (0.0, 200.0)}))


def test_require_dp_refuses_exact_answers_and_fits(node: Node) -> None:
    refused = node.ask(stats=["mean"], columns=["age"])
    assert isinstance(refused, ErrorReply) and refused.code == "disclosure_refused"
    assert refused.message.startswith("require_dp:")
    fit = node.dispatcher.handle(make_envelope(PreprocRequest(
        dataset_id=node.dataset, preproc_type="standardize", preproc_step="fit", preproc_id="p",
        preproc_args={"columns": ["age"]}), "researcher")).content
    assert isinstance(fit, ErrorReply) and "require_dp" in fit.message, fit
    assert node.spent() == 0.0


def test_dp_answer_is_noisy_spends_and_reports_its_noise(node: Node) -> None:
    reply = node.ask(stats=["count", "mean", "std", "median"], columns=["age", "weight"],
                     dp=DPQuery(epsilon=1.0, bounds={"age": [0.0, 100.0], "weight": [-1e9, 1e9]}))
    assert isinstance(reply, FAReply), reply
    assert reply.dp is not None and reply.dp.epsilon == pytest.approx(1.0)
    # the operator's bounds win over the researcher's
    assert reply.dp.bounds == {"age": [0.0, 100.0], "weight": [0.0, 200.0]}
    assert reply.dp.balance.epsilon_remaining == pytest.approx(2.0)
    assert set(reply.dp.noise) == {f"{c}.{q}" for c in ("age", "weight") for q in ("count", "sum", "sumsq",
                                                                                   "quantiles")}
    k = len(reply.dp.noise)
    assert reply.dp.noise["weight.sum"] == pytest.approx(200.0 * k / 1.0, rel=1e-6)
    assert node.spent() == pytest.approx(1.0)
    age = reply.numeric["age"]
    assert abs(age.mean - node.frame["age"].mean()) < 15  # noisy, but near: Laplace(b=k*100) over N=400
    assert age.below is not None and age.below_at is not None and age.below_at[0] == 0.0


def test_budget_refusal_names_what_remains_and_sends_nothing(node: Node) -> None:
    assert isinstance(node.ask(stats=["count"], dp=DPQuery(epsilon=2.5)), FAReply)
    refused = node.ask(stats=["count"], dp=DPQuery(epsilon=1.0))
    assert isinstance(refused, ErrorReply) and refused.code == "budget_exhausted"
    assert "epsilon=0.5" in refused.message
    assert node.spent() == pytest.approx(2.5)
    assert isinstance(node.ask(stats=["count"], dp=DPQuery(epsilon=0.5)), FAReply)  # exactly what is left
    assert isinstance(node.ask(stats=["count"], dp=DPQuery(epsilon=1e-6)), ErrorReply)


def test_a_restart_keeps_the_spent_budget(node: Node) -> None:
    node.ask(stats=["count"], dp=DPQuery(epsilon=2.0))
    node.restart()
    refused = node.ask(stats=["count"], dp=DPQuery(epsilon=1.5))
    assert isinstance(refused, ErrorReply) and refused.code == "budget_exhausted"
    budget = node.dispatcher.handle(make_envelope(PrivacyBudgetRequest(dataset_id=node.dataset), "r")).content
    assert isinstance(budget, PrivacyBudgetReply)
    assert budget.balance.epsilon_spent == pytest.approx(2.0) and budget.balance.require_dp


def test_concurrent_requests_never_overspend(node: Node) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        results.append(node.ask(stats=["count"], columns=["age"], dp=DPQuery(epsilon=1.0)))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    answered = [r for r in results if isinstance(r, FAReply)]
    assert len(results) == 8 and len(answered) == 3
    assert all(r.code == "budget_exhausted" for r in results if isinstance(r, ErrorReply))
    assert node.spent() == pytest.approx(3.0)


def test_derived_datasets_and_a_second_registration_spend_the_source_budget(node: Node) -> None:
    spec = {"type": "impute", "columns": ["weight"], "values": {"weight": 70.0}}  # a set step: nothing is fitted
    state = node.dispatcher.handle(make_envelope(PreprocRequest(
        dataset_id=node.dataset, preproc_type="impute", preproc_step="set", preproc_id="p",
        preproc_args={"transform": spec}), "r")).content
    assert not isinstance(state, ErrorReply), state
    applied = node.dispatcher.handle(make_envelope(PreprocRequest(
        dataset_id=node.dataset, preproc_type="impute", preproc_step="apply", preproc_id="p",
        preproc_args={"name": "imputed", "tags": ["d"]}, state_id=state.state_id), "r")).content
    assert not isinstance(applied, ErrorReply) and applied.derived is not None, applied
    derived = applied.derived.dataset_id
    again = node.registry.add("cohort-again", ["c2"], "csv", str(node.root / "cohort.csv")).dataset_id
    assert isinstance(node.ask(stats=["count"], dp=DPQuery(epsilon=1.5)), FAReply)
    assert isinstance(node.ask(dataset=again, stats=["count"], dp=DPQuery(epsilon=1.5)), FAReply)
    for dataset in (again, derived):
        refused = node.ask(dataset=dataset, stats=["count"], dp=DPQuery(epsilon=0.1))
        assert isinstance(refused, ErrorReply) and refused.code == "budget_exhausted", dataset


def test_excluded_columns_min_max_and_missing_bounds_or_categories_are_refused(node: Node) -> None:
    reply = node.ask(stats=["min", "mean", "value_counts"], columns=["patient_id", "age", "sex"],
                     dp=DPQuery(epsilon=1.0))
    assert isinstance(reply, FAReply)
    assert "excluded" in reply.refused["patient_id"]
    assert "not released with differential privacy" in reply.refused["age.min"]
    assert "bounds" in reply.refused["age.bounds"] and "age" not in (reply.dp.bounds if reply.dp else {})
    assert "categories" in reply.refused["sex.value_counts"]
    assert not any(k.startswith("patient_id") for k in (reply.dp.noise if reply.dp else {}))
    given = node.ask(stats=["value_counts"], columns=["sex"],
                     dp=DPQuery(epsilon=2.0, categories={"sex": ["F"]}))
    assert isinstance(given, FAReply), given
    counts = given.categorical["sex"].value_counts
    assert set(counts) == {"F", "<other>"}  # M is never named: it is not a public category
    assert abs(counts["F"] - int((node.frame["sex"] == "F").sum())) <= 15  # Laplace b = 1


def _raw(content: dict[str, Any]) -> list[bytes]:
    header = msgspec.msgpack.encode({"msg_id": "m-1", "msg_type": "fa_request", "sender": "s",
                                     "version": PROTOCOL_VERSION, "time": 0.0})
    return [header, msgspec.msgpack.encode(content)]


@pytest.mark.parametrize("dp", [{"epsilon": 0.0}, {"epsilon": -1.0}, {"epsilon": float("nan")},
                                {"epsilon": 1e9}, {"epsilon": 1.0, "mechanism": "none"},
                                {"epsilon": 1.0, "delta": 1.0}, {"epsilon": 1.0, "quantile_bins": 1},
                                {"epsilon": 1.0, "extra": 1}, {"epsilon": 1.0, "bounds": {"age": [1.0]}}])
def test_hand_written_dp_fields_out_of_range_do_not_decode(dp: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(_raw({"dataset_id": "d", "stats": ["count"], "dp": dp}))


def test_hand_written_bad_bounds_and_a_gaussian_without_delta_are_refused(node: Node) -> None:
    flipped = node.ask(stats=["mean"], columns=["age"], dp=DPQuery(epsilon=1.0, bounds={"age": [100.0, 0.0]}))
    assert isinstance(flipped, ErrorReply) and flipped.code == "invalid_field"
    gauss = node.ask(stats=["count"], dp=DPQuery(epsilon=1.0, mechanism="gaussian"))
    assert isinstance(gauss, ErrorReply) and "delta" in gauss.message
    thresholds = node.ask(stats=["quantiles"], columns=["age"], thresholds={"age": [50.0]},
                          dp=DPQuery(epsilon=1.0, bounds={"age": [0.0, 100.0]}))
    assert isinstance(thresholds, ErrorReply)
    assert node.spent() == 0.0


def test_gaussian_answers_spend_delta_and_refuse_past_it(tmp_path: Path) -> None:
    node = Node(tmp_path, DPRules(epsilon_budget=100.0, delta=1e-6))
    first = node.ask(stats=["count"], dp=DPQuery(epsilon=1.0, delta=6e-7, mechanism="gaussian"))
    assert isinstance(first, FAReply) and first.dp is not None and first.dp.delta == 6e-7
    second = node.ask(stats=["count"], dp=DPQuery(epsilon=1.0, delta=6e-7, mechanism="gaussian"))
    assert isinstance(second, ErrorReply) and second.code == "budget_exhausted" and "delta" in second.message
    exact = node.ask(stats=["mean"], columns=["age"])  # require_dp is off here: exact answers stay possible
    assert isinstance(exact, FAReply) and exact.dp is None
