"""Keep fedlab's node-side API out of reach of training plans, in the training worker process.

A plan runs in a worker process that holds nothing of the node (no registry, no config, no
sockets), but fedlab itself is importable there, and ``fedlab.node.config.load_config`` or
``fedlab.node.registry.DatasetRegistry`` would let a plan read the node's configuration and
database as easily as the node does. ``install`` puts a finder first on ``sys.meta_path``
that refuses those packages with an ``ImportError`` saying why, which the plan's error reply
then carries.

This is a guard against a plan using fedlab's own API, not a sandbox: code that runs in
Python can remove the finder, open files by path or use the network with the permissions of
the user running the node. What stands between a plan and the node is the operator's review
of the exact source before approving it (see the README).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["BLOCKED", "NodeApiGuard", "install"]

# fedlab packages that belong to the node, the researcher or the command line, never to a plan.
BLOCKED = ("fedlab.node", "fedlab.cli", "fedlab.cli_node", "fedlab.cli_plans", "fedlab.cli_researcher",
           "fedlab.cli_format", "fedlab.researcher", "fedlab.transport", "fedlab.notebook", "fedlab.demo")


def _blocked(name: str) -> str | None:
    for prefix in BLOCKED:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


class NodeApiGuard(importlib.abc.MetaPathFinder):
    """A finder that refuses the ``BLOCKED`` packages (and everything under them)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix = _blocked(fullname)
        if prefix is None:
            return None  # not ours to decide: the next finder looks for it
        raise ImportError(
            f"training plans cannot import {fullname}: {prefix} is the node's (or researcher's) own code, "
            "and a plan runs in a separate worker process that sees only its dataset, arguments and "
            "parameters, not the node's database, config or network. Use the dataset the plan's "
            "training_data receives",
            name=fullname,
        )


def install() -> NodeApiGuard:
    """Put the guard first on ``sys.meta_path`` (once) and forget any blocked module already imported."""
    for finder in sys.meta_path:
        if isinstance(finder, NodeApiGuard):
            return finder
    guard = NodeApiGuard()
    sys.meta_path.insert(0, guard)
    for name in [n for n in sys.modules if _blocked(n)]:
        del sys.modules[name]
    fedlab = sys.modules.get("fedlab")
    for prefix in BLOCKED:  # `fedlab.node` as an attribute of the imported package
        attr = prefix.split(".", 1)[1]
        if fedlab is not None and isinstance(getattr(fedlab, attr, None), ModuleType):
            delattr(fedlab, attr)
    return guard
