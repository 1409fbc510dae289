"""%fed without nodes: the extension loads, lines parse, and every mistake is one UsageError line."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from fedlab.notebook.background import BackgroundTraining, StopOnCancel  # noqa: E402
from fedlab.notebook.parsing import SUBCOMMANDS, FedArgumentError, json_object, parse  # noqa: E402
from fedlab.notebook.session import DEFAULT_ADDRESS, Session  # noqa: E402

PLAN = '''
class Tiny(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(2, 1)

    def training_data(self, dataset):
        return dataset, dataset

    def training_step(self, data, target):
        return self.model(data).sum()
'''


@pytest.fixture
def ip(monkeypatch):
    monkeypatch.delenv("FEDLAB_ADDRESS", raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fedlab")
    yield shell
    shell.run_line_magic("unload_ext", "fedlab")
    InteractiveShell.clear_instance()


def usage(ip, line, cell=None) -> str:
    with pytest.raises(UsageError) as info:
        if cell is None:
            ip.run_line_magic("fed", line)
        else:
            ip.run_cell_magic("fed", line, cell)
    assert type(info.value) is UsageError  # a subclass would print a traceback
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_load_ext_registers_line_and_cell_magic_and_a_session(ip):
    from fedlab.notebook import Session as Exported
    from fedlab.notebook import current_session

    assert "fed" in ip.magics_manager.magics["line"] and "fed" in ip.magics_manager.magics["cell"]
    session = current_session(ip)
    assert isinstance(session, Exported) and session.address == DEFAULT_ADDRESS and not session.connected
    ip.run_line_magic("reload_ext", "fedlab")
    assert current_session(ip) is session  # a reload keeps the (possibly bound) session


def test_unknown_or_missing_sub_command_is_one_line(ip):
    assert "unknown sub-command 'frobnicate'" in usage(ip, "frobnicate --tags x")
    assert "`%fed help` lists them" in usage(ip, "")


@pytest.mark.parametrize("line, expected", [
    ("stats mean", "the following arguments are required: --tags"),
    ("stats --tags cancer", "the following arguments are required: STAT"),
    ("train cnn --tags cancer", "--rounds"),
    ("train cnn --tags cancer --rounds zero", "'zero' is not a whole number"),
    ("train cnn --tags cancer --rounds 0", "must be at least 1"),
    ("train cnn --tags c --rounds 2 --model-args [1,2]", "is not a JSON object"),
    ("train cnn --tags c --rounds 2 --training-args {oops", "is not a JSON object"),
    ("hist age --tags c --bins -3", "must be at least 1"),
    ("stats mean --tags c --out 1x", "is not a Python variable name"),
    ("stats mean --tags c --colour red", "unrecognized arguments: --colour red"),
    ("form plots", "invalid choice: 'plots'"),
    ("connect tcp://x --timeout -1", "positive number of seconds"),
    ("stats mean --tags 'unclosed", "check the quotes"),
    ("preprocess --tags c --name n --new-tags d", "give at least one step"),
    ("help frobnicate", "no sub-command 'frobnicate'"),
])
def test_bad_arguments_are_usage_errors_that_say_what_to_do(ip, line, expected):
    message = usage(ip, line)
    assert expected in message
    command = line.split()[0]
    if command not in ("help", "preprocess") and "quotes" not in expected:
        assert f"`%fed help {command}` shows the options" in message


def test_cell_body_only_for_plan_and_plan_only_as_cell(ip):
    assert "takes no cell body" in usage(ip, "nodes", "x = 1")
    assert "%%fed plan cnn" in usage(ip, "plan cnn")
    assert "is empty" in usage(ip, "plan cnn", "\n  \n")


def test_help_lists_every_sub_command_and_each_ones_options(ip, capsys):
    assert ip.run_line_magic("fed", "help") is None
    text = capsys.readouterr().out
    assert all(f"  {name}" in text for name in SUBCOMMANDS)
    ip.run_line_magic("fed", "help train")
    text = capsys.readouterr().out
    assert "--rounds" in text and "--background" in text and "--model-args" in text
    assert ip.run_line_magic("fed", "stats --help") is None  # -h prints, never exits the kernel
    assert "--columns" in capsys.readouterr().out


def test_a_trailing_comment_is_not_an_argument(ip, capsys):
    # as in Python, and as the README writes them: `%fed help train   # the options`
    assert ip.run_line_magic("fed", "help train   # every option of train") is None
    assert "--rounds" in capsys.readouterr().out
    assert "--bogus" in usage(ip, "nodes --bogus")  # without the '#', the same word is refused
    assert ip.run_line_magic("fed", "help  # nodes --bogus") is None


def test_parse_keeps_preprocessing_steps_in_written_order():
    args = parse("preprocess --tags d --name clean --new-tags d2 --standardize a b --impute c "
                 "--onehot sex --standardize c --strategy median".split())
    assert args.steps == [("standardize", ["a", "b"]), ("impute", ["c"]), ("onehot", ["sex"]),
                          ("standardize", ["c"])]
    assert args.strategy == "median" and args.new_tags == ["d2"]


def test_parse_train_line():
    args = parse(["train", "cnn", "--tags", "a", "b", "--rounds", "3", "--model-args", '{"n": 30}',
                  "--training-args", "{'epochs': 1, 'seed': 0}", "--background", "--out", "job"])
    assert (args.name, args.tags, args.rounds, args.aggregator) == ("cnn", ["a", "b"], 3, "fedavg")
    assert args.model_args == {"n": 30} and args.training_args == {"epochs": 1, "seed": 0}
    assert args.background and args.out == "job"
    assert not args.secagg


def test_secagg_flags_of_stats_and_train():
    assert parse(["stats", "count", "mean", "--tags", "a", "--secagg"]).secagg
    assert not parse(["stats", "count", "--tags", "a"]).secagg
    assert parse(["train", "cnn", "--tags", "a", "--rounds", "2", "--secagg"]).secagg


def test_json_object_takes_json_or_the_dict_ipython_expanded():
    assert json_object('{"a": true, "b": [1, 2]}') == {"a": True, "b": [1, 2]}
    assert json_object("{'a': True}") == {"a": True}
    with pytest.raises(Exception, match="not a JSON object"):
        json_object("3")
    with pytest.raises(FedArgumentError, match="unknown sub-command"):
        parse(["nope"])


def test_plan_cell_defines_the_class_and_keeps_the_source(ip, capsys):
    pytest.importorskip("torch")
    from fedlab.notebook import current_session
    from fedlab.training.source import PRELUDE

    ip.run_cell_magic("fed", "plan tiny", PLAN)
    assert "class Tiny" in capsys.readouterr().out
    assert ip.user_ns["Tiny"].__name__ == "Tiny"
    source, cls = current_session(ip).plans["tiny"]
    assert cls == "Tiny" and source.startswith(PRELUDE)
    frame = ip.run_line_magic("fed", "plans")
    assert frame["plan"].tolist() == ["tiny"] and len(frame.loc[0, "plan_id"]) == 12
    assert "syntax error at line 1" in usage(ip, "plan broken", "class X(:\n")
    assert "2 TorchTrainingPlan subclasses" in usage(ip, "plan two", PLAN + PLAN.replace("Tiny", "Other"))
    ip.run_cell_magic("fed", "plan two --class Other", PLAN + PLAN.replace("Tiny", "Other"))
    assert current_session(ip).plans["two"][1] == "Other"


def test_commands_needing_a_plan_or_a_job_name_the_missing_one(ip):
    session = Session()
    with pytest.raises(Exception, match="no training plan named 'cnn'.*%%fed plan cnn"):
        session.plan("cnn")
    assert "no background job named 'job-1'" in usage(ip, "cancel job-1")
    assert ip.run_line_magic("fed", "jobs").empty


def test_connect_to_an_address_in_use_says_so_in_one_line(ip, monkeypatch):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = usage(ip, f"connect tcp://127.0.0.1:{port}")
    assert str(port) in message and "`%fed connect tcp://127.0.0.1:PORT`" in message


class _Experiment:
    """Just what BackgroundTraining and run_rounds use of an Experiment, with scripted rounds."""

    def __init__(self, rounds: int, fail_at: int | None = None, block: threading.Event | None = None) -> None:
        self.rounds, self.round_current, self.fail_at, self.block = rounds, 0, fail_at, block
        self.policies: list = []
        self.node_ids = ["n1"]
        self.plan_class = "Tiny"
        self.experiment_id = "exp-1"
        self.rows: list[dict] = []

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["round", "kind", "node_id", "status"])

    def run_once(self) -> pd.DataFrame:
        if self.block is not None:
            while not self.block.wait(0.01):
                if any(isinstance(p, StopOnCancel) and p.event.is_set() for p in self.policies):
                    raise RuntimeError("every node failed round 1: stopped")
        round_ = self.round_current + 1
        if round_ == self.fail_at:
            self.rows.append({"round": round_, "kind": "training", "node_id": "n1", "status": "error"})
            raise RuntimeError(f"every node failed round {round_}")
        self.rows.append({"round": round_, "kind": "training", "node_id": "n1", "status": "ok"})
        self.round_current = round_
        return self.history.tail(1)

    def run(self, rounds: int | None = None) -> pd.DataFrame:
        return self.history


class _Panel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def round_done(self, rows):
        self.calls.append(("round_done", rows["round"].tolist()))

    def finish(self, history):
        self.calls.append(("finish", len(history)))

    def fail(self, message):
        self.calls.append(("fail", message))


def test_background_training_runs_every_round_and_tells_the_panel():
    panel = _Panel()
    job = BackgroundTraining(_Experiment(3), panel, name="t-1")
    assert job.wait(10) and job.status == "done" and job.error is None
    assert panel.calls == [("round_done", [1]), ("round_done", [2]), ("round_done", [3]), ("finish", 3)]
    assert job.summary()["round"] == 3 and list(job.history["round"]) == [1, 2, 3]


def test_background_training_failure_turns_the_round_red_and_keeps_the_reason():
    panel = _Panel()
    job = BackgroundTraining(_Experiment(3, fail_at=2), panel, name="t-2")
    assert job.wait(10) and job.status == "failed" and job.error == "every node failed round 2"
    assert panel.calls == [("round_done", [1]), ("round_done", [2]), ("fail", "every node failed round 2")]


def test_cancel_stops_the_round_in_flight_through_its_policy():
    panel = _Panel()
    exp = _Experiment(5, block=threading.Event())
    job = BackgroundTraining(exp, panel, name="t-3")
    assert job.running and any(isinstance(p, StopOnCancel) for p in exp.policies)
    assert job.cancel(wait=10) and job.status == "cancelled"
    assert panel.calls[-1] == ("fail", "cancelled")


def test_plan_checks_polled_by_a_panel_log_no_warning_per_poll(caplog):
    import logging

    from fedlab.notebook.session import quiet

    log = logging.getLogger("fedlab.researcher")
    with quiet():
        log.warning("plan is Pending on node a")  # the panel shows it; no line under it every second
        log.error("a real error still shows")
    log.warning("a training round's warning still shows")
    assert [r.getMessage() for r in caplog.records] == ["a real error still shows",
                                                         "a training round's warning still shows"]
