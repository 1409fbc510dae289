"""The privacy budget panel through its traits: updated from a privacy_budget() frame, from what a DP
answer or a training round reported ({node: DPSpent or DPBalance}) and from a DP FAResult."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

w = pytest.importorskip("ipywidgets")

from fedlab.notebook.budget import BudgetPanel, bar_style  # noqa: E402
from fedlab.protocol.dp_messages import DPBalance, DPSpent  # noqa: E402
from fedlab.researcher.dp_budget import BUDGET_COLUMNS  # noqa: E402
from fedlab.researcher.fa_result import FAResult  # noqa: E402


@pytest.fixture(autouse=True)
def close_widgets():
    yield
    w.Widget.close_all()


def balance(spent: float, budget: float = 10.0, *, require_dp: bool = False, n: int = 1,
            delta_spent: float = 0.0, delta_budget: float = 1e-6) -> DPBalance:
    return DPBalance(epsilon_budget=budget, delta_budget=delta_budget, epsilon_spent=spent,
                     delta_spent=delta_spent, epsilon_remaining=max(0.0, budget - spent),
                     delta_remaining=max(0.0, delta_budget - delta_spent), require_dp=require_dp, n_spends=n)


def spent(epsilon: float, after: DPBalance, noise: dict[str, float] | None = None, delta: float = 0.0,
          mechanism: str = "laplace") -> DPSpent:
    return DPSpent(epsilon=epsilon, delta=delta, mechanism=mechanism, balance=after, noise=noise or {})


def budget_frame(rows: list[dict]) -> pd.DataFrame:
    """The shape researcher.privacy_budget(fds) returns."""
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS).set_index("node")


def answered(node: str, b: DPBalance) -> dict:
    return {"node": node, "epsilon_spent": b.epsilon_spent, "epsilon_remaining": b.epsilon_remaining,
            "epsilon_budget": b.epsilon_budget, "delta_spent": b.delta_spent, "delta_remaining": b.delta_remaining,
            "delta_budget": b.delta_budget, "require_dp": b.require_dp, "spends": b.n_spends, "status": "answered"}


def test_a_privacy_budget_frame_makes_one_row_per_node_with_bar_numbers_and_badge():
    panel = BudgetPanel()
    panel.update(budget_frame([answered("hospital-a", balance(2.5, require_dp=True, n=3)),
                               answered("hospital-b", balance(9.0, n=4, delta_spent=4e-7)),
                               {"node": "hospital-c", "status": "[timeout] no reply within 30 s"}]),
                 dataset="tumours")
    assert list(panel.rows) == [("hospital-a", "tumours"), ("hospital-b", "tumours"), ("hospital-c", "tumours")]
    assert panel.children == (panel.header, *panel.rows.values())
    a, b, c = panel.rows.values()
    assert a.name.value == "hospital-a · tumours"
    assert (a.bar.min, a.bar.max, a.bar.value, a.bar.bar_style) == (0.0, 10.0, 2.5, "info")
    assert a.numbers.value == "ε 2.5 / 10 spent, 7.5 left · δ 0 / 1e-06 · 3 spends"
    assert (a.badge.value, a.badge.style.text_color, a.badge.style.font_weight) == ("DP required", "red", "bold")
    assert b.badge.value == "DP optional" and b.bar.bar_style == "warning"  # 1 of 10 left: under a fifth
    assert b.numbers.value == "ε 9 / 10 spent, 1 left · δ 4e-07 / 1e-06 · 4 spends"
    # a node that did not answer has a row saying why, and no figures it never sent
    assert c.bar.value == 0 and c.numbers.value == "" and c.last.value == "[timeout] no reply within 30 s"
    assert c.last.style.text_color == "red"
    assert panel.header.value.startswith("privacy budget (ε per researcher and dataset")
    assert "least left ε 1 of 10 on hospital-b · tumours" in panel.header.value
    assert "1 without a current answer" in panel.header.value
    frame = panel.frame
    assert frame["node"].tolist() == ["hospital-a", "hospital-b", "hospital-c"]
    assert frame["epsilon_spent"].tolist()[:2] == [2.5, 9.0] and np.isnan(frame["epsilon_spent"].iloc[2])
    assert frame["require_dp"].tolist()[:2] == [True, False] and frame["spends"].tolist()[:2] == [3, 4]


def test_what_a_dp_answer_reported_moves_the_same_row_and_says_what_it_cost():
    panel = BudgetPanel()
    panel.update({"hospital-a": balance(1.0)}, dataset="tumours")
    row = panel.rows[("hospital-a", "tumours")]
    assert row.bar.value == 1.0 and row.last.value == "answered"
    panel.update({"hospital-a": spent(2.0, balance(3.0, n=2), noise={"age.sum": 240.0, "age.count": 4.0})},
                 dataset="tumours")
    assert list(panel.rows) == [("hospital-a", "tumours")] and panel.rows[("hospital-a", "tumours")] is row
    assert row.bar.value == 3.0 and row.numbers.value.startswith("ε 3 / 10 spent, 7 left")
    assert row.last.value == "last answer: ε 2 (laplace, noise scale up to 240)"
    assert row.last.style.text_color is None
    panel.update({"hospital-a": spent(0.5, balance(3.5, delta_spent=1e-7, n=3), delta=1e-7, mechanism="gaussian")},
                 dataset="tumours")
    assert row.last.value == "last answer: ε 0.5, δ 1e-07 (gaussian)"  # no noise scales reported: none shown
    assert panel.updates == 3


def test_each_dataset_has_its_own_row_and_labels_can_differ_per_node():
    panel = BudgetPanel()
    panel.update({"hospital-a": balance(1.0), "hospital-b": balance(2.0)},
                 dataset={"hospital-a": "diabetes", "hospital-b": "diabetes-b"})
    panel.update({"hospital-a": balance(4.0)}, dataset="tumours")
    assert set(panel.rows) == {("hospital-a", "diabetes"), ("hospital-b", "diabetes-b"), ("hospital-a", "tumours")}
    assert panel.rows[("hospital-a", "diabetes")].bar.value == 1.0  # the other dataset's budget is untouched
    assert panel.rows[("hospital-a", "tumours")].bar.value == 4.0
    unlabelled = BudgetPanel()
    unlabelled.update({"hospital-a": balance(1.0)})
    assert unlabelled.rows[("hospital-a", "")].name.value == "hospital-a"


def test_a_node_that_stops_answering_keeps_its_last_figures_and_says_so():
    panel = BudgetPanel()
    panel.update(budget_frame([answered("hospital-a", balance(4.0, n=2))]))
    panel.update(budget_frame([{"node": "hospital-a", "status": "no answer: offline"}]))
    row = panel.rows[("hospital-a", "")]
    assert row.bar.value == 4.0 and row.numbers.value.startswith("ε 4 / 10 spent")
    assert row.last.value == "no answer: offline (figures from its last answer)" and row.last.style.text_color == "red"
    assert panel.frame.loc[0, "status"] == "no answer: offline" and panel.frame.loc[0, "epsilon_spent"] == 4.0


def test_spent_and_zero_budgets_are_red_and_the_bar_never_runs_past_its_end():
    assert bar_style(balance(10.0)) == "danger" and bar_style(balance(8.5)) == "warning"
    assert bar_style(balance(8.0)) == "info"  # exactly a fifth left is not low yet
    panel = BudgetPanel()
    panel.update({"a": balance(10.0, n=7), "b": balance(0.0, budget=0.0, n=0)})
    a, b = panel.rows[("a", "")], panel.rows[("b", "")]
    assert (a.bar.value, a.bar.max, a.bar.bar_style) == (10.0, 10.0, "danger")
    assert (b.bar.value, b.bar.max, b.bar.bar_style) == (1.0, 1.0, "danger")  # no budget: DP is refused there
    assert b.numbers.value == "ε 0 / 0 spent, 0 left · δ 0 / 1e-06 · 0 spends"
    # a node's figures after a float sum slightly over the budget still fit the bar
    panel.update({"a": DPBalance(epsilon_budget=10.0, delta_budget=0.0, epsilon_spent=10.000000001, delta_spent=0.0,
                                 epsilon_remaining=0.0, delta_remaining=0.0)})
    assert a.bar.value == a.bar.max == 10.0


def test_a_dp_stats_result_updates_the_panel_by_node_name():
    result = FAResult(stats=["count"], quantile_levels=[], node_names={"n1": "hospital-a", "n2": "hospital-b"},
                      replies={}, dp={"n1": spent(1.0, balance(1.0)), "n2": spent(1.0, balance(6.0, n=5))})
    panel = BudgetPanel()
    panel.update(result, dataset={"hospital-a": "bc", "hospital-b": "bc"})
    assert set(panel.rows) == {("hospital-a", "bc"), ("hospital-b", "bc")}
    assert panel.rows[("hospital-b", "bc")].bar.value == 6.0
    assert panel.rows[("hospital-a", "bc")].last.value == "last answer: ε 1 (laplace)"


def test_training_rounds_without_dp_are_skipped_and_wrong_inputs_are_refused():
    panel = BudgetPanel()
    panel.update({"hospital-a": None})  # TrainReply.dp is None when the round did not use DP
    assert panel.rows == {} and panel.header.value == "privacy budget: no node has reported a balance"
    with pytest.raises(TypeError, match="not a DPBalance or DPSpent"):
        panel.update({"hospital-a": 3.0})
    with pytest.raises(TypeError, match="privacy_budget"):
        panel.update([balance(1.0)])
    with pytest.raises(ValueError, match="lacks"):
        panel.update(pd.DataFrame({"node": ["a"], "spent": [1.0]}))


def test_updates_from_several_threads_all_land():
    panel = BudgetPanel()

    def feed(node: str) -> None:
        for i in range(1, 51):
            panel.update({node: balance(i * 0.1, n=i)}, dataset="tumours")

    threads = [threading.Thread(target=feed, args=(f"site-{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert panel.updates == 200 and len(panel.rows) == 4 and len(panel.children) == 5
    assert all(row.bar.value == pytest.approx(5.0) for row in panel.rows.values())
    assert panel.frame["spends"].tolist() == [50] * 4
