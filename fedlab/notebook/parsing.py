"""The ``%fed`` command line: one argparse parser per sub-command, which raises instead of exiting.

Kept apart from the magics so that parsing is tested without IPython or nodes, and so that
``%fed help`` and every error message come from the same table. argparse's own behaviour on
a mistake (print usage, ``sys.exit(2)``) would kill nothing in a kernel but leave a traceback;
here every mistake is a :class:`FedArgumentError` whose message names the sub-command, and
``-h`` is a :class:`HelpShown` after the help text was printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import keyword
import math
from collections.abc import Sequence
from typing import Any, NoReturn

from fedlab.argtypes import positive_int, seconds

__all__ = ["SUBCOMMANDS", "FedArgumentError", "HelpShown", "build_parser", "command_parser", "overview", "parse"]

# sub-command -> one line for `%fed help` (the order is the order of the help text)
SUBCOMMANDS = {
    "connect": "connect [ADDRESS] [--wait N] [--key FILE --allowlist FILE]: bind the socket the nodes dial into",
    "nodes": "nodes: the nodes seen so far, online or not",
    "datasets": "datasets [--tags T ...]: every dataset on the online nodes, or those carrying all tags",
    "stats": "stats STAT ... --tags T ... [--columns C ...] [--epsilon E --bounds C=LO:HI ...]: federated "
             "statistics, one row per column (with --epsilon: differentially private)",
    "hist": "hist COLUMN --tags T ... [--bins N | --edges E ...]: a federated histogram and its plot",
    "budget": "budget --tags T ...: each node's differential-privacy budget for this researcher, as a panel",
    "preprocess": "preprocess --tags T ... --name NAME --new-tags T ... --standardize C ... (steps in order)",
    "plan": "%%fed plan NAME: the cell below is a training plan (its class is defined here too)",
    "plans": "plans: the training plans defined with %%fed plan",
    "approve": "approve NAME --tags T ...: ask the nodes' operators to approve a plan; a live panel",
    "status": "status NAME --tags T ...: whether each node may run the plan",
    "train": "train NAME --tags T ... --rounds N [--background]: federated training with live progress",
    "jobs": "jobs: the background trainings of this kernel",
    "cancel": "cancel JOB: stop a background training (the running round is cancelled on the nodes)",
    "form": "form stats|train|preprocess: a form that builds and runs the same commands",
    "help": "help [SUB-COMMAND]: this list, or the options of one sub-command",
}


class FedArgumentError(Exception):
    """A mistake on the ``%fed`` line; the message says what was wrong and what to type."""


class HelpShown(Exception):  # noqa: N818 -- a signal, not an error
    """``-h`` printed the help text; there is nothing more to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FedArgumentError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise FedArgumentError(f"{self.prog}: {(message or 'bad arguments').strip()}")
        raise HelpShown()


def json_object(text: str) -> dict[str, Any]:
    """A JSON object, or the Python dict IPython made of it (``{...}`` on a magic line is expanded)."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a JSON object; quote it, e.g. '{{\"epochs\": 1}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object, e.g. '{{\"epochs\": 1}}'")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0 (an epsilon)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number, e.g. 1")
    return value


def probability(text: str) -> float:
    """A number in [0, 1) (a delta)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0 and below 1, e.g. 1e-7")
    return value


def column_bounds(text: str) -> tuple[str, tuple[float, float]]:
    """``COL=LO:HI`` -> ``(COL, (LO, HI))``; a column with spaces is quoted: ``"mean radius=5:30"``."""
    column, sep, pair = text.rpartition("=")
    lo_text, colon, hi_text = pair.partition(":")
    try:
        if not (sep and column and colon):
            raise ValueError
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=LO:HI, e.g. age=0:120") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"{text!r}: the bounds must be finite numbers with LO < HI")
    return column, (lo, hi)


def column_levels(text: str) -> tuple[str, list[str]]:
    """``COL=a,b,c`` -> ``(COL, ["a", "b", "c"])``: the public levels of a column."""
    column, sep, levels = text.partition("=")
    values = [v.strip() for v in levels.split(",") if v.strip()]
    if not (sep and column and values):
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=LEVEL,LEVEL,..., e.g. sex=F,M")
    return column, values


def variable(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


class _Step(argparse.Action):
    """``--standardize a b --onehot c``: steps kept in the order they were written."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((self.dest, list(values or [])))
        namespace.steps = steps


def _tags(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--tags", nargs="+", required=required, metavar="T",
                   help="the dataset's tags on the nodes (all must match)")


def _out(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--out", type=variable, metavar="VAR", help=f"also store {what} in this variable")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%fed", add_help=False)
    sub = parser.add_subparsers(dest="command", metavar="SUB-COMMAND", parser_class=_Parser)

    def add(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, prog=f"%fed {name}", description=SUBCOMMANDS[name].split(": ", 1)[-1])

    p = add("connect")
    p.add_argument("address", nargs="?", help="tcp://HOST:PORT (default: $FEDLAB_ADDRESS or tcp://127.0.0.1:5555)")
    p.add_argument("--wait", type=positive_int, metavar="N", help="wait until N nodes are online")
    p.add_argument("--timeout", type=seconds, default=30.0, help="how long to wait for the nodes (default 30 s)")
    p.add_argument("--key", metavar="FILE", help="this researcher's NAME.key_secret (default: $FEDLAB_KEY)")
    p.add_argument("--allowlist", metavar="FILE", help="the node public keys accepted (default: $FEDLAB_ALLOWLIST)")
    add("nodes")
    p = add("datasets")
    _tags(p, required=False)
    _out(p)
    p = add("stats")
    p.add_argument("stats", nargs="+", metavar="STAT", help="count missing sum mean var std min max median quantiles")
    _tags(p)
    p.add_argument("--columns", nargs="+", metavar="C", help="default: every column")
    p.add_argument("--quantiles", nargs="+", type=float, metavar="Q", default=[0.25, 0.5, 0.75])
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation: only the sum over the nodes is received (no min, max, quantiles)")
    dp = p.add_argument_group("differential privacy", "each node adds calibrated noise and spends E of this "
                              "researcher's budget on its dataset (its operator's epsilon_budget); the budget "
                              "panel shows what is left")
    dp.add_argument("--epsilon", type=positive_number, metavar="E",
                    help="what the request spends on each node (split over its statistics and columns)")
    dp.add_argument("--delta", type=probability, metavar="D", help="with --mechanism gaussian: the delta it spends")
    dp.add_argument("--mechanism", choices=["laplace", "gaussian"], help="the noise (default laplace, no delta)")
    dp.add_argument("--bounds", nargs="+", type=column_bounds, metavar="C=LO:HI",
                    help="clamp bounds for sums, means, variances and quantiles, e.g. age=0:120 "
                    "(the node's own bounds win)")
    dp.add_argument("--categories", nargs="+", type=column_levels, metavar="C=A,B",
                    help="public levels for value counts and crosstabs, e.g. sex=F,M")
    dp.add_argument("--quantile-bins", type=positive_int, metavar="N",
                    help="the grid DP quantiles are read from (default 32)")
    _out(p, "the DataFrame")
    p = add("hist")
    p.add_argument("column")
    _tags(p)
    p.add_argument("--bins", type=positive_int, default=10, help="bins over the federated range (default 10)")
    p.add_argument("--edges", nargs="+", type=float, metavar="E", help="explicit bin edges (no range needed)")
    p.add_argument("--no-plot", action="store_true", help="the table only")
    _out(p, "the DataFrame")
    p = add("preprocess")
    _tags(p)
    p.add_argument("--name", required=True, help="name of the derived dataset on each node")
    p.add_argument("--new-tags", nargs="+", required=True, metavar="T", help="tags of the derived dataset")
    p.add_argument("--description", default="")
    for step in ("impute", "standardize", "minmax", "onehot", "combat"):
        p.add_argument(f"--{step}", nargs="+", metavar="C", action=_Step, dest=step)
    p.add_argument("--strategy", default="mean", help="impute strategy: mean, median or most_frequent")
    _out(p, "the derived datasets' table")
    p = add("plan")
    p.add_argument("name")
    p.add_argument("--class", dest="class_name", metavar="CLASS",
                   help="the plan class, when the cell defines several TorchTrainingPlan subclasses")
    add("plans")
    p = add("approve")
    p.add_argument("name")
    _tags(p)
    p.add_argument("--description", default="", help="what the operators read next to the plan")
    p.add_argument("--wait", type=seconds, metavar="S", help="block until every node approved, at most S s")
    p.add_argument("--poll", type=seconds, default=1.0, help="how often the panel asks the nodes (default 1 s)")
    _out(p, "the approval panel")
    p = add("status")
    p.add_argument("name")
    _tags(p)
    _out(p, "the DataFrame")
    p = add("train")
    p.add_argument("name")
    _tags(p)
    p.add_argument("--rounds", type=positive_int, required=True)
    p.add_argument("--aggregator", default="fedavg", help="fedavg, fedprox, scaffold, fedavgm, fedadagrad, fedadam, "
                   "fedyogi, median, trimmed_mean, krum or multikrum (docs/aggregation.md)")
    p.add_argument("--aggregator-args", type=json_object, default=None, metavar="JSON")
    p.add_argument("--model-args", type=json_object, default=None, metavar="JSON")
    p.add_argument("--training-args", type=json_object, default=None, metavar="JSON")
    p.add_argument("--round-timeout", type=seconds, default=600.0, metavar="S")
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation: each round's parameters reach the researcher only summed")
    p.add_argument("--background", action="store_true", help="return at once; see %%fed jobs")
    _out(p, "the history (foreground) or the job (background)")
    p = add("jobs")
    _out(p, "the DataFrame")
    p = add("cancel")
    p.add_argument("job")
    p = add("budget")
    _tags(p)
    _out(p, "the DataFrame")
    p = add("form")
    p.add_argument("kind", choices=["stats", "train", "preprocess"])
    p = add("help")
    p.add_argument("topic", nargs="?")
    return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (for ``%fed help NAME``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def overview() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["%fed SUB-COMMAND ... (`%fed help SUB-COMMAND` for its options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def parse(tokens: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse one ``%fed`` line (already split); unknown sub-commands are named with the known ones."""
    if not tokens:
        raise FedArgumentError("%fed needs a sub-command; `%fed help` lists them")
    if tokens[0] not in SUBCOMMANDS and tokens[0] not in ("-h", "--help"):
        raise FedArgumentError(f"unknown sub-command {tokens[0]!r}; use one of {', '.join(SUBCOMMANDS)} "
                               "(`%fed help` says what each does)")
    if tokens[0] in ("-h", "--help"):
        tokens = ["help"]
    args = (parser or build_parser()).parse_args(list(tokens))
    if not hasattr(args, "steps"):
        args.steps = []
    if args.command == "stats":
        _check_dp(args)
    return args


_DP_OPTIONS = {"delta": "--delta", "mechanism": "--mechanism", "bounds": "--bounds", "categories": "--categories",
               "quantile_bins": "--quantile-bins"}


def _check_dp(args: argparse.Namespace) -> None:
    """The DP options of ``%fed stats`` fit together; ``bounds``/``categories`` become dicts."""
    given = [flag for name, flag in _DP_OPTIONS.items() if getattr(args, name) is not None]
    if args.epsilon is None:
        if given:
            raise FedArgumentError(f"%fed stats: {', '.join(given)} only apply to differentially private "
                                   "statistics: add --epsilon E (what the request spends on each node)")
        return
    if args.secagg:
        raise FedArgumentError("%fed stats: --epsilon and --secagg cannot be combined yet: choose one")
    if args.mechanism == "gaussian" and not args.delta:
        raise FedArgumentError("%fed stats: --mechanism gaussian needs --delta D > 0, e.g. --delta 1e-7")
    if args.delta and args.mechanism != "gaussian":
        raise FedArgumentError("%fed stats: the Laplace mechanism spends no delta: drop --delta, or add "
                               "--mechanism gaussian")
    for name in ("bounds", "categories"):
        pairs = getattr(args, name) or []
        columns = [column for column, _ in pairs]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise FedArgumentError(f"%fed stats: --{name} gives {', '.join(map(repr, twice))} more than once")
        setattr(args, name, dict(pairs))
