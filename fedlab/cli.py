"""The ``fedlab`` command: make the researcher's key pair, set up a node, register its datasets,
decide which training plans may run on it, see what its privacy budgets have left, start it, run
the researcher service that notebooks share, or run the demo.

A data owner at a hospital uses this, not Python: every mistake they can make (a wrong
directory, a file that is not a CSV, a name already taken) ends as one ``fedlab: error:``
line that says what to do, with exit status 2, never a traceback.

This module wires the commands together and turns errors into that line; the commands live by
who runs them: ``cli_node`` and ``cli_plans`` (the node operator), ``cli_researcher`` (keys and
the researcher service), with ``cli_format`` for what they print.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedlab import __version__
from fedlab.argtypes import positive_int
from fedlab.cli_node import add_node_commands
from fedlab.cli_researcher import add_keygen_command, add_researcher_commands
from fedlab.errors import FedlabError

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedlab.demo import run_demo

    return int(run_demo(n_nodes=args.nodes, directory=args.dir, port=args.port, lab=not args.no_lab,
                        browser=not args.no_browser, lab_port=args.lab_port, notebooks=args.notebooks))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedlab`` command."""
    parser = argparse.ArgumentParser(
        prog="fedlab", description="Federated analytics over data that never leaves its node."
    )
    parser.add_argument("--version", action="version", version=f"fedlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_keygen_command(sub)
    add_node_commands(sub)
    add_researcher_commands(sub)

    demo = sub.add_parser(
        "demo", help="start local nodes holding public medical data and open JupyterLab on the quickstart",
        description="Create one node directory per site (breast cancer, diabetes and digit images from "
        "scikit-learn, split unevenly), start the nodes and open JupyterLab on notebooks/01_quickstart.ipynb. "
        "Ctrl-C stops everything it started.")
    demo.add_argument("--nodes", type=positive_int, default=3, help="how many nodes to start (default 3, at most 8)")
    demo.add_argument("--dir", type=Path, default=None,
                      help="where to put the node directories (default ./demo-federation; recreated on each run)")
    demo.add_argument("--port", type=_port, default=5555,
                      help="the port the notebook's researcher binds and the nodes dial (default 5555)")
    demo.add_argument("--no-lab", action="store_true",
                      help="start only the nodes and print how to connect to them (Ctrl-C stops them)")
    demo.add_argument("--no-browser", action="store_true",
                      help="start JupyterLab without opening a browser; it prints the URL to open")
    demo.add_argument("--lab-port", type=_port, default=8888, help="JupyterLab's port (default 8888)")
    demo.add_argument("--notebooks", type=Path, default=None,
                      help="the notebooks directory JupyterLab serves (default: this checkout's notebooks/)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedlab`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedlabError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fedlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
