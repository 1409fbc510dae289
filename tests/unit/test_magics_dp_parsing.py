"""%fed stats --epsilon ... and %fed budget without nodes: the DP options parse, every mistake is one
UsageError line, and what they parse to reaches researcher.stats / privacy_budget and the budget panel
(a scripted researcher stands in for the network)."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("IPython")
pytest.importorskip("ipywidgets")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from fedlab.notebook import current_session  # noqa: E402
from fedlab.notebook.budget import BudgetPanel  # noqa: E402
from fedlab.notebook.parsing import SUBCOMMANDS, FedArgumentError, parse  # noqa: E402
from fedlab.protocol.dp_messages import DPBalance, DPSpent  # noqa: E402
from fedlab.protocol.messages import DatasetInfo  # noqa: E402
from fedlab.researcher.dp_budget import BUDGET_COLUMNS  # noqa: E402
from fedlab.researcher.fa_result import FAResult  # noqa: E402
from fedlab.researcher.federated_dataset import FederatedDataset  # noqa: E402


@pytest.fixture
def ip(monkeypatch):
    import ipywidgets

    monkeypatch.delenv("FEDLAB_ADDRESS", raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fedlab")
    yield shell
    shell.run_line_magic("unload_ext", "fedlab")
    InteractiveShell.clear_instance()
    ipywidgets.Widget.close_all()


def usage(ip, line: str) -> str:
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("fed", line)
    assert type(info.value) is UsageError  # a subclass would print a traceback
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_a_dp_stats_line_parses_to_what_researcher_stats_takes():
    args = parse(["stats", "count", "mean", "median", "--tags", "breast-cancer", "--columns", "mean radius", "age",
                  "--epsilon", "1.5", "--delta", "1e-7", "--mechanism", "gaussian",
                  "--bounds", "mean radius=5:30", "age=-1.5:120", "--categories", "sex=F,M", "stage=I, II ,III",
                  "--quantile-bins", "64", "--out", "s"])
    assert args.epsilon == 1.5 and args.delta == 1e-7 and args.mechanism == "gaussian"
    assert args.bounds == {"mean radius": (5.0, 30.0), "age": (-1.5, 120.0)}
    assert args.categories == {"sex": ["F", "M"], "stage": ["I", "II", "III"]}
    assert args.quantile_bins == 64 and args.out == "s" and args.tags == ["breast-cancer"]


def test_without_epsilon_nothing_is_private_and_the_dp_options_are_unset():
    args = parse(["stats", "count", "--tags", "a"])
    assert (args.epsilon, args.delta, args.mechanism, args.bounds, args.categories, args.quantile_bins) == (
        None, None, None, None, None, None)
    args = parse(["stats", "count", "--tags", "a", "--epsilon", "2"])
    assert args.epsilon == 2.0 and args.bounds == {} and args.categories == {} and args.delta is None


@pytest.mark.parametrize("line, expected", [
    ("stats mean --tags c --delta 1e-7", "--delta only apply to differentially private statistics: add --epsilon"),
    ("stats mean --tags c --bounds age=0:120 --mechanism laplace", "--mechanism, --bounds only apply"),
    ("stats mean --tags c --quantile-bins 8", "--quantile-bins only apply"),
    ("stats mean --tags c --epsilon 0", "'0' must be a positive number"),
    ("stats mean --tags c --epsilon -1", "'-1' must be a positive number"),
    ("stats mean --tags c --epsilon inf", "'inf' must be a positive number"),
    ("stats mean --tags c --epsilon lots", "'lots' is not a number"),
    ("stats mean --tags c --epsilon 1 --delta 1", "'1' must be at least 0 and below 1"),
    ("stats mean --tags c --epsilon 1 --mechanism exponential", "invalid choice: 'exponential'"),
    ("stats mean --tags c --epsilon 1 --mechanism gaussian", "--mechanism gaussian needs --delta"),
    ("stats mean --tags c --epsilon 1 --delta 1e-7", "the Laplace mechanism spends no delta"),
    ("stats mean --tags c --epsilon 1 --secagg", "--epsilon and --secagg cannot be combined"),
    ("stats mean --tags c --epsilon 1 --bounds age", "'age' is not COLUMN=LO:HI"),
    ("stats mean --tags c --epsilon 1 --bounds age=0-120", "'age=0-120' is not COLUMN=LO:HI"),
    ("stats mean --tags c --epsilon 1 --bounds =0:1", "is not COLUMN=LO:HI"),
    ("stats mean --tags c --epsilon 1 --bounds age=120:0", "LO < HI"),
    ("stats mean --tags c --epsilon 1 --bounds age=0:nan", "LO < HI"),
    ("stats mean --tags c --epsilon 1 --bounds age=0:1 age=0:2", "--bounds gives 'age' more than once"),
    ("stats mean --tags c --epsilon 1 --categories sex=", "'sex=' is not COLUMN=LEVEL,LEVEL"),
    ("stats mean --tags c --epsilon 1 --categories sex", "is not COLUMN=LEVEL,LEVEL"),
    ("stats mean --tags c --epsilon 1 --quantile-bins 0", "must be at least 1"),
    ("budget", "the following arguments are required: --tags"),
    ("budget --tags c --out 2x", "is not a Python variable name"),
])
def test_bad_dp_arguments_are_one_usage_error_line_with_the_help_hint(ip, line, expected):
    message = usage(ip, line)
    assert expected in message
    assert f"`%fed help {line.split()[0]}` shows the options" in message
    assert not current_session(ip).connected  # refused before anything was asked of the network


def test_help_lists_budget_and_the_dp_options_of_stats(ip, capsys):
    assert "budget" in SUBCOMMANDS
    ip.run_line_magic("fed", "help")
    text = capsys.readouterr().out
    assert "  budget" in text and "--epsilon E" in text
    ip.run_line_magic("fed", "help stats")
    text = capsys.readouterr().out
    for option in ("--epsilon", "--delta", "--mechanism", "--bounds", "--categories", "--quantile-bins",
                   "differential privacy"):
        assert option in text, option
    ip.run_line_magic("fed", "help budget")
    assert "--tags" in capsys.readouterr().out
    with pytest.raises(FedArgumentError, match="--epsilon"):
        parse(["stats", "count", "--tags", "a", "--categories", "sex=F,M"])


# -- what the magics do with it, against a scripted researcher ---------------------------------------
def _balance(spent: float, n: int) -> DPBalance:
    return DPBalance(epsilon_budget=10.0, delta_budget=1e-6, epsilon_spent=spent, delta_spent=0.0,
                     epsilon_remaining=10.0 - spent, delta_remaining=1e-6, require_dp=False, n_spends=n)


class _Researcher:
    """What %fed stats and %fed budget use of a Researcher; it records the calls."""

    names = {"n1": "hospital-a", "n2": "hospital-b"}

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.spent = 0.0

    def search(self, tags):
        info = {n: DatasetInfo(dataset_id=f"ds-{n}", name="bc", tags=list(tags), data_type="csv", shape=[10, 2],
                               columns=["age", "sex"], dtypes={"age": "float64", "sex": "object"}, n_samples=10)
                for n in self.names}
        return FederatedDataset(info, node_names=self.names)

    def stats(self, fds, stats, columns=None, **kwargs):
        self.calls.append(("stats", kwargs))
        dp = {}
        if kwargs.get("epsilon") is not None:
            self.spent += kwargs["epsilon"]
            dp = {n: DPSpent(epsilon=kwargs["epsilon"], delta=0.0, mechanism=kwargs["mechanism"],
                             balance=_balance(self.spent, len(self.calls)), noise={"age.sum": 12.0})
                  for n in fds.node_ids()}
        return FAResult(stats=list(stats), quantile_levels=[], node_names=self.names, replies={}, dp=dp)

    def privacy_budget(self, fds):
        self.calls.append(("privacy_budget", fds.node_ids()))
        b = _balance(self.spent, 1)
        rows = [{"node": name, "epsilon_spent": b.epsilon_spent, "epsilon_remaining": b.epsilon_remaining,
                 "epsilon_budget": b.epsilon_budget, "delta_spent": 0.0, "delta_remaining": 1e-6,
                 "delta_budget": 1e-6, "require_dp": False, "spends": 1, "status": "answered"}
                for name in self.names.values()]
        return pd.DataFrame(rows, columns=BUDGET_COLUMNS).set_index("node")

    def close(self) -> None:
        pass


@pytest.fixture
def scripted(ip):
    researcher = _Researcher()
    current_session(ip)._researcher = researcher
    return researcher


def test_dp_stats_passes_the_options_through_and_shows_the_budget_panel(ip, scripted, capsys):
    ip.run_line_magic("fed", "stats count mean --tags bc --columns age --epsilon 1.5 --bounds age=0:120 "
                             "--categories sex=F,M")
    (kind, kwargs), = scripted.calls
    assert kind == "stats"
    assert kwargs == {"quantiles": [0.25, 0.5, 0.75], "secagg": False, "epsilon": 1.5, "delta": 0.0,
                      "mechanism": "laplace", "bounds": {"age": (0.0, 120.0)}, "categories": {"sex": ["F", "M"]},
                      "quantile_bins": 32}
    assert "differentially private (laplace)" in capsys.readouterr().err  # the result's notes
    panel = current_session(ip).budget
    assert isinstance(panel, BudgetPanel)
    assert set(panel.rows) == {("hospital-a", "bc"), ("hospital-b", "bc")}
    assert panel.rows[("hospital-a", "bc")].bar.value == 1.5
    assert panel.rows[("hospital-a", "bc")].last.value == "last answer: ε 1.5 (laplace, noise scale up to 12)"

    ip.run_line_magic("fed", "stats count --tags bc --epsilon 2")
    assert current_session(ip).budget is panel  # one panel per session, updated
    assert panel.rows[("hospital-b", "bc")].bar.value == 3.5

    frame = ip.run_line_magic("fed", "budget --tags bc --out left")
    assert scripted.calls[-1] == ("privacy_budget", ["n1", "n2"])
    assert ip.user_ns["left"] is frame and frame["epsilon_remaining"].tolist() == [6.5, 6.5]
    assert current_session(ip).budget is panel and panel.rows[("hospital-a", "bc")].last.value == "answered"


def test_exact_stats_pass_no_dp_options_and_leave_the_panel_alone(ip, scripted):
    ip.run_line_magic("fed", "stats count --tags bc --secagg")
    (_, kwargs), = scripted.calls
    assert kwargs == {"quantiles": [0.25, 0.5, 0.75], "secagg": True}
    assert current_session(ip).budget is None
