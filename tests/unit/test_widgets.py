"""The notebook widgets through their traits: live progress fed from threads, the approval panel
flipping as a scripted check changes its answer, and the forms' %fed lines and runs."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

w = pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from fedlab.notebook.approval import ApprovalPanel, operator_command, ready  # noqa: E402
from fedlab.notebook.forms import (  # noqa: E402
    columns_for,
    default_tag,
    fed_line,
    parse_bins,
    stats_form,
    tag_options,
    train_form,
)
from fedlab.notebook.preprocess_form import PreprocessForm  # noqa: E402
from fedlab.notebook.progress import STEPS, TrainingProgress, format_elapsed  # noqa: E402
from fedlab.training.messages import TrainProgress  # noqa: E402


@pytest.fixture(autouse=True)
def close_widgets():
    yield
    w.Widget.close_all()


def event(round_=1, it=1, n_it=10, epoch=1, n_epochs=1, loss=0.5, phase="training"):
    return TrainProgress(experiment_id="exp-1", round=round_, phase=phase, epoch=epoch, n_epochs=n_epochs,
                         iteration=it, n_iterations=n_it, loss=loss)


def history_rows(round_, statuses, loss=0.3):
    return pd.DataFrame([
        {"round": round_, "kind": "training", "node_id": n, "node": f"site-{n}", "status": s,
         "reason": None if s == "ok" else "no reply within 10 s", "n_samples": 10 * (i + 1), "n_test_samples": 2,
         "n_updates": 3, "train_loss": loss + i if s == "ok" else None, "global_loss": 0.4 + i, "local_accuracy": 0.9}
        for i, (n, s) in enumerate(statuses.items())])


# -- TrainingProgress ----------------------------------------------------------------------------
def test_progress_has_one_row_per_node_with_bar_and_labels():
    panel = TrainingProgress({"a": "site-a", "b": "site-b"}, rounds=4)
    assert isinstance(panel, w.VBox)
    assert [r.name.value for r in panel.rows.values()] == ["site-a", "site-b"]
    bar = panel.rows["a"].bar
    assert (bar.min, bar.max, bar.value, bar.bar_style) == (0, 4 * STEPS, 0, "")
    assert panel.rows["a"] in panel.children and panel.output in panel.children


def test_events_from_threads_move_the_bars_throttled_and_the_last_one_always_shows():
    panel = TrainingProgress({"a": "site-a", "b": "site-b"}, rounds=2, min_interval=0.05)

    def feed(node):
        for it in range(1, 41):
            panel.on_event(node, event(round_=2, it=it, n_it=40, epoch=2, n_epochs=2, loss=1 / it))
            time.sleep(0.002)

    threads = [threading.Thread(target=feed, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 2
    while panel.rows["b"].where.value != "round 2/2 · epoch 2/2 · it 40/40" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert panel.events == 80
    assert 1 <= panel.flushes < 80  # batched, not one redraw per event
    for node in "ab":
        row = panel.rows[node]
        assert row.bar.value == 2 * STEPS  # round 2 of 2, iteration 40 of 40
        assert row.where.value == "round 2/2 · epoch 2/2 · it 40/40"
        assert row.loss.value == "loss 0.025"
        assert row.state.value == "training"
        assert row.elapsed.value.endswith(" s")


def test_bar_fills_within_a_round_by_iterations():
    panel = TrainingProgress({"a": "site-a"}, rounds=3, min_interval=0)
    panel.on_event("a", event(round_=2, it=5, n_it=10))
    assert panel.rows["a"].bar.value == STEPS + STEPS // 2
    panel.on_event("a", event(round_=2, it=3, n_it=3, epoch=0, n_epochs=0, phase="validation after", loss=None))
    assert panel.rows["a"].bar.value == STEPS + STEPS // 2  # validation does not move the training bar
    assert panel.rows["a"].state.value == "validating after"
    assert panel.rows["a"].where.value == "round 2/3 · it 3/3"


def test_the_validation_after_the_last_round_is_named_not_counted_as_a_round():
    panel = TrainingProgress({"a": "site-a"}, rounds=3, min_interval=0)
    panel.on_event("a", event(round_=4, it=2, n_it=2, epoch=0, n_epochs=0, phase="validation before", loss=None))
    assert panel.rows["a"].where.value == "final validation · it 2/2"


def test_an_unknown_node_gets_a_row_rather_than_being_dropped():
    panel = TrainingProgress({"a": "site-a"}, rounds=1, min_interval=0)
    panel.on_event("zz", event())
    assert "zz" in panel.rows and panel.rows["zz"] in panel.children


def test_round_done_advances_ok_nodes_and_turns_failed_ones_red_with_the_reason():
    panel = TrainingProgress({"a": "site-a", "b": "site-b"}, rounds=2, min_interval=0)
    panel.round_done(history_rows(1, {"a": "ok", "b": "missing"}))
    a, b = panel.rows["a"], panel.rows["b"]
    assert (a.bar.value, a.bar.bar_style, a.state.value) == (STEPS, "", "round 1 done")
    assert a.loss.value == "loss 0.3"
    assert b.bar.bar_style == "danger"
    assert b.state.value == "missing in round 1: no reply within 10 s"
    assert panel.header.value.endswith("round 1/2 done")
    panel.on_event("b", event(round_=2, it=1))  # the node is back in the next round
    assert b.bar.bar_style == "" and b.state.value == "training (missed round 1)"


def test_finish_turns_bars_green_and_leaves_the_history_and_a_png_as_static_output():
    panel = TrainingProgress({"a": "site-a", "b": "site-b"}, rounds=2, min_interval=0)
    first, second = history_rows(1, {"a": "ok", "b": "ok"}), history_rows(2, {"a": "ok", "b": "ok"}, loss=0.2)
    panel.round_done(first)
    panel.round_done(second)
    panel.finish(pd.concat([first, second], ignore_index=True))
    for row in panel.rows.values():
        assert (row.bar.value, row.bar.bar_style) == (2 * STEPS, "success")
        assert row.bar.get_state()["bar_style"] == "success"
        assert row.state.value == "done"
    assert panel.status == "done" and panel.header.value.startswith("federated training: done, 2/2 rounds")
    table, plot = panel.output.outputs
    assert 'class="dataframe' in table["data"]["text/html"]
    assert plot["data"]["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_finish_keeps_a_node_that_failed_the_last_round_red():
    panel = TrainingProgress({"a": "site-a", "b": "site-b"}, rounds=1, min_interval=0)
    rows = history_rows(1, {"a": "ok", "b": "error"})
    panel.round_done(rows)
    panel.finish(rows)
    assert panel.rows["a"].bar.bar_style == "success"
    assert panel.rows["b"].bar.bar_style == "danger"


def test_fail_marks_unfinished_rows_and_says_why():
    panel = TrainingProgress({"a": "site-a"}, rounds=3, min_interval=0)
    panel.on_event("a", event())
    panel.fail("every node failed round 2")
    assert panel.rows["a"].bar.bar_style == "danger" and panel.rows["a"].state.value == "stopped"
    assert panel.status == "failed" and "every node failed round 2" in panel.header.value
    assert panel.output.outputs[-1]["name"] == "stderr"
    panel.on_event("a", event(round_=3))  # late events after the end change nothing
    assert panel.rows["a"].state.value == "stopped"


def test_format_elapsed():
    assert format_elapsed(3.21) == "3.2 s"
    assert format_elapsed(125) == "2 min 05 s"


# -- ApprovalPanel ---------------------------------------------------------------------------------
def status_frame(statuses):
    rows = []
    for node, status in statuses.items():
        message = (f"plan abcdef123456 (P) is waiting for the decision of the operator of node {node}; they approve "
                   f"it with `fedlab node plan approve /srv/{node} abcdef123456`")
        if status == "Approved":
            message = f"plan abcdef123456 (P) is approved on node {node}; it may run"
        rows.append({"node_id": f"id-{node}", "node": node, "status": status, "approval_required": True,
                     "plan_id": "abcdef1234567890" * 4, "message": message})
    return pd.DataFrame(rows)


class ScriptedCheck:
    """Answers Pending for both nodes, then one approved, then both (and stays there)."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def __call__(self):
        answer = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return status_frame(answer)


def test_approval_panel_flips_live_without_a_rerun():
    check = ScriptedCheck([{"a": "Pending", "b": "Pending"}, {"a": "Approved", "b": "Pending"},
                           {"a": "Approved", "b": "Approved"}])
    panel = ApprovalPanel(check, poll_interval=0.02)
    assert isinstance(panel, w.VBox)
    a, b = panel.rows["id-a"], panel.rows["id-b"]
    assert (a.name.value, a.status.value, a.plan.value) == ("a", "Pending", "abcdef123456")
    assert a.command.value == "fedlab node plan approve /srv/a abcdef123456"
    assert a.status.style.text_color == "darkorange"
    assert panel.wait(5)
    assert panel.approved
    assert (a.status.value, b.status.value) == ("Approved", "Approved")
    assert a.status.style.text_color == "green" and a.command.value == "may run"
    assert "all 2 nodes may run the plan" in panel.header.value
    calls = check.calls
    time.sleep(0.1)
    assert check.calls == calls  # polling stopped once everyone approved


def test_approval_panel_shows_a_failing_check_and_keeps_polling():
    check = ScriptedCheck([RuntimeError("node unreachable"), {"a": "Approved"}])
    panel = ApprovalPanel(check, poll_interval=0.02, start=False)
    panel.poll()
    assert "node unreachable" in panel.message.value
    panel.start()
    assert panel.wait(5) and panel.message.value == ""


def test_approval_panel_stop_and_close_end_the_thread():
    check = ScriptedCheck([{"a": "Rejected"}])
    panel = ApprovalPanel(check, poll_interval=0.01)
    assert panel.rows["id-a"].status.style.text_color == "red"
    time.sleep(0.05)
    panel.stop()
    assert panel._thread is not None and not panel._thread.is_alive()
    assert not panel.approved


def test_a_retired_panel_looks_once_more_then_says_it_is_frozen():
    """Replaced by a newer panel (`%fed approve` again), a panel shows the latest answer, and a
    panel still waiting says it is no longer updated rather than pass for a live one."""
    check = ScriptedCheck([{"a": "Pending"}, {"a": "Approved"}])
    done = ApprovalPanel(check, poll_interval=60)
    done.retire()
    assert done.approved and done.rows["id-a"].status.value == "Approved"
    assert "no longer updated" not in done.header.value
    waiting = ApprovalPanel(ScriptedCheck([{"a": "Pending"}]), poll_interval=60)
    waiting.retire()
    assert not waiting.approved and waiting.header.value.endswith(
        "no longer updated: a newer panel for this plan replaces this one")
    assert waiting._thread is not None and not waiting._thread.is_alive()


def test_operator_command_and_readiness():
    assert operator_command("they approve it with `fedlab node plan approve /x 0123456789ab`") == \
        "fedlab node plan approve /x 0123456789ab"
    assert operator_command(None) == ""
    assert ready({"status": "Approved", "approval_required": True})
    assert ready({"status": "Pending", "approval_required": False})
    assert not ready({"status": "Rejected", "approval_required": False})
    assert not ready({"status": "no reply", "approval_required": None})


# -- forms -------------------------------------------------------------------------------------------
DATASETS = pd.DataFrame([
    {"node_id": "n1", "node": "site-a", "name": "bc", "tags": ["cancer", "csv"], "columns": ["age", "bmi"]},
    {"node_id": "n2", "node": "site-b", "name": "bc", "tags": ["cancer", "csv"], "columns": ["age", "bmi"]},
    {"node_id": "n2", "node": "site-b", "name": "img", "tags": ["images"], "columns": []},
])


class FakeResult:
    def __init__(self, stats, columns):
        self.stats, self.columns = stats, columns

    def histogram(self, column):
        return pd.DataFrame({"left": [0.0, 1.0], "right": [1.0, 2.0], "count": [4, 6], "suppressed_on": ["", ""],
                             "nodes": 2})

    def _repr_html_(self):
        return "<table class='dataframe'><tr><td>stats</td></tr></table>"


class FakeResearcher:
    def __init__(self):
        self.calls = []

    def list_datasets(self):
        return DATASETS

    def search(self, tags):
        self.calls.append(("search", tags))
        return ["n1", "n2"]

    def stats(self, fds, stats, columns=None, bins=None):
        self.calls.append(("stats", list(stats), columns, bins))
        return FakeResult(stats, columns)


class FakeSession:
    def __init__(self):
        self.researcher = FakeResearcher()
        self.plans = {"logreg": ("class LogReg: ...", "LogReg")}


def test_tag_options_and_columns_come_from_the_dataset_list():
    assert tag_options(DATASETS) == ["cancer", "csv", "images"]
    assert columns_for(DATASETS, ["cancer"]) == ["age", "bmi"]
    assert columns_for(DATASETS, ["images", "cancer"]) == []
    assert fed_line("train", "p", "--model-args", '{"a": 1}') == """%fed train p --model-args '{"a": 1}'"""


def test_the_form_starts_on_a_tag_that_names_one_dataset_per_node():
    # The demo's case: every site holds two csv datasets, so "csv" (held most widely) must not be
    # preselected: its equivalent %fed line would be refused ("holds 2 datasets tagged ['csv']").
    demo = pd.DataFrame([
        {"node_id": node, "node": node, "name": name, "tags": [name, "csv"], "columns": ["x"]}
        for node in ("a", "b", "c") for name in ("breast-cancer", "diabetes")
    ])
    assert tag_options(demo)[0] == "csv"
    assert default_tag(demo) == "breast-cancer"
    assert default_tag(DATASETS) == "cancer"
    only_shared = pd.DataFrame([{"node_id": "a", "node": "a", "name": n, "tags": ["csv"], "columns": []}
                                for n in ("x", "y")])
    assert default_tag(only_shared) is None


def test_stats_form_builds_the_same_line_as_the_magic():
    form = stats_form(FakeSession())
    assert form.tags.options == ("cancer", "csv", "images") and form.tags.value == ("cancer",)
    assert form.columns.options == ("age", "bmi")
    assert form.command.value == "equivalent: %fed stats count mean std --tags cancer"
    form.columns.value = ("age",)
    form.stat_boxes["median"].value = True
    form.hist_column.value = "bmi"
    form.bins.value = "5"
    assert form.commands() == ["%fed stats count mean std median --tags cancer --columns age",
                               "%fed hist bmi --tags cancer --bins 5"]
    form.bins.value = "10, 20.5, 40"
    assert form.commands()[1] == "%fed hist bmi --tags cancer --edges 10 20.5 40"
    assert form.command.value == "equivalent: " + " ; ".join(form.commands())


def test_stats_form_submit_runs_on_a_thread_and_shows_results_in_place():
    session = FakeSession()
    form = stats_form(session)
    form.hist_column.value = "age"
    form.submit_button.click()
    result = form.wait(10)
    assert form.error is None, form.error
    assert isinstance(result, FakeResult) and result.stats == ["count", "mean", "std"]
    assert session.researcher.calls == [("search", ["cancer"]), ("stats", ["count", "mean", "std"], None, None),
                                        ("stats", ["histogram"], ["age"], 10)]
    kinds = [set(o["data"]) for o in form.output.outputs]
    assert kinds == [{"text/plain", "text/html"}, {"text/plain", "text/html"}, {"text/plain", "image/png"}]
    assert form.status.value == "done: 2 nodes"
    assert not form.submit_button.disabled


def test_parse_bins():
    assert parse_bins("12") == 12
    assert parse_bins("0, 40 60,100") == [0.0, 40.0, 60.0, 100.0]
    for bad in ("", "ten", "1, x"):
        with pytest.raises(ValueError, match="bins must be"):
            parse_bins(bad)


def test_a_form_shows_errors_instead_of_raising():
    form = stats_form(FakeSession())
    for box in form.stat_boxes.values():
        box.value = False
    form.start().join(10)
    assert isinstance(form.error, ValueError)
    assert form.status.value.startswith("error: tick at least one statistic")
    assert form.output.outputs[-1]["name"] == "stderr"


def test_train_form_line_and_arguments():
    form = train_form(FakeSession())
    assert form.plan.options == ("logreg",)
    form.rounds.value = 5
    form.aggregator.value = "fedprox"
    form.model_args.value = '{"n_features": 30}'
    form.extra_args.value = '{"test_ratio": 0.2}'
    assert form.training_args() == {"epochs": 1, "batch_size": 32, "optimizer_args": {"lr": 0.01}, "test_ratio": 0.2}
    approve, train = form.commands()
    assert approve == "%fed approve logreg --tags cancer"
    assert train == ("%fed train logreg --tags cancer --rounds 5 --aggregator fedprox --model-args "
                     """'{"n_features": 30}' --training-args '{"epochs": 1, "batch_size": 32, """
                     """"optimizer_args": {"lr": 0.01}, "test_ratio": 0.2}' --background""")
    form.model_args.value = "[1"
    assert form.commands()[0].startswith("(fix the arguments: model args must be a JSON object")
    form.session.plans["cnn"] = ("class Cnn: ...", "Cnn")  # a plan cell run after the form was made
    form.refresh_button.click()
    assert form.plan.options == ("cnn", "logreg") and form.plan.value == "logreg"


def test_train_form_without_a_plan_says_what_to_do():
    session = FakeSession()
    session.plans = {}
    form = train_form(session)
    form.start().join(10)
    assert "define a plan first" in form.status.value


def test_preprocess_form_steps_and_line():
    form = PreprocessForm(FakeSession())
    assert form.columns.options == ("age", "bmi")
    with pytest.raises(ValueError, match="pick the columns"):
        form.add_step("standardize", [])
    form.add_step("impute", ["bmi"])
    form.add_step("standardize", ["age", "bmi"])
    form.strategy.value = "median"
    form.name.value = "cancer-clean"
    form.new_tags.value = "cancer-clean, csv"
    assert form.commands() == ["%fed preprocess --tags cancer --name cancer-clean --new-tags cancer-clean csv "
                               "--impute bmi --standardize age bmi --strategy median"]
    assert form.steps_label.value == "impute(bmi) → standardize(age, bmi)"
    form.clear_steps()
    assert form.steps == [] and form.steps_label.value == "no steps yet"
