"""A training plan as source text: extract it, hash it, load it, and explain its errors.

Code crosses the wire as text, never pickled, and a node runs it only if its operator
approved that exact text: ``plan_id`` (the sha256 of the source) is what gets approved, so
one changed byte is another plan. ``plan_source`` turns a class into a self-contained
module (a fixed prelude, the plan's ``dependencies``, the class) — also for classes typed
into a notebook, which have no file and which ``inspect.getsource`` cannot find.
``load_plan_class`` runs such a module under the file name ``<plan ID>`` with its lines in
``linecache``, so that ``plan_error`` can point at the plan's own line when it raises.

This module does not import torch; the functions that need ``TorchTrainingPlan`` import it.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import linecache
import textwrap
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from fedlab.errors import FedlabError, FedlabTrainingError

if TYPE_CHECKING:  # pragma: no cover
    from fedlab.training.plan import TorchTrainingPlan

__all__ = ["PRELUDE", "call_plan", "load_plan_class", "plan_error", "plan_id", "plan_source"]

_T = TypeVar("_T")

PRELUDE = (
    "import numpy as np\n"
    "import torch\n"
    "from torch import nn\n"
    "import torch.nn.functional as F\n"
    "import fedlab\n"  # so that `class P(fedlab.TorchTrainingPlan)` works as written in a notebook
    "from fedlab.training import TorchTrainingPlan\n"
)
_BASE_NAME = "TorchTrainingPlan"
_MAX_ERROR_TEXT = 1000


def plan_id(source: str) -> str:
    """The sha256 hex digest of the UTF-8 source: the identity a node approves."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _parse(source: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as exc:
        raise FedlabTrainingError(
            f"{what} has a syntax error at line {exc.lineno}: {exc.msg}"
            + (f" (`{exc.text.strip()}`)" if exc.text else "")
        ) from exc


def _plan_classes(tree: ast.Module) -> list[str]:
    """Top-level classes that name ``TorchTrainingPlan`` (or ``x.TorchTrainingPlan``) as a base."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
                if name == _BASE_NAME:
                    found.append(node.name)
                    break
    return found


def _own_codes(cls: type) -> list[CodeType]:
    """Code objects of the functions defined in ``cls`` itself (methods, static/class methods, properties)."""
    codes = []
    for value in vars(cls).values():
        candidates = [value.fget, value.fset] if isinstance(value, property) else [getattr(value, "__func__", value)]
        for func in candidates:
            code = getattr(inspect.unwrap(func), "__code__", None) if callable(func) else None
            if isinstance(code, CodeType):
                codes.append(code)
    return codes


def _class_source_from_lines(cls: type) -> str | None:
    """Find ``class NAME`` in the lines its methods were compiled from (a file, or a notebook cell in linecache)."""
    for code in _own_codes(cls):
        lines = linecache.getlines(code.co_filename)
        if not lines:
            continue
        try:
            tree = ast.parse("".join(lines))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__ and node.end_lineno is not None:
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if start <= code.co_firstlineno <= node.end_lineno:
                    return textwrap.dedent("".join(lines[start - 1 : node.end_lineno]))
    return None


def _class_source(cls: type) -> str:
    found = _class_source_from_lines(cls)
    if found is not None:
        return found
    try:
        return textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError) as exc:
        raise FedlabTrainingError(
            f"cannot find the source code of training plan {cls.__name__}: it defines no method whose "
            "source is available; define it in a file or notebook cell, or pass the module source as a "
            "string with plan_class=..."
        ) from exc


def plan_source(plan: type | str, plan_class: str | None = None) -> tuple[str, str]:
    """``(module_source, class_name)`` for a plan class, or for module source text plus its class name.

    For a class, the module is ``PRELUDE`` + the class's ``dependencies`` + the class source.
    For a string (a notebook cell, say), the module is ``PRELUDE`` + the text, so a plan reads
    the same names either way; ``plan_class`` may be left out when the source defines exactly
    one ``TorchTrainingPlan`` subclass.
    """
    if isinstance(plan, str):
        if not plan.startswith(PRELUDE):
            text = textwrap.dedent(plan).strip("\n") + "\n"
            _parse(text, "the training plan source")  # line numbers of errors as the user wrote them
            plan = PRELUDE + "\n\n" + text
        tree = _parse(plan, "the training plan source")
        if plan_class is None:
            candidates = _plan_classes(tree)
            if len(candidates) != 1:
                raise FedlabTrainingError(
                    f"the training plan source defines {len(candidates)} TorchTrainingPlan subclasses "
                    f"({', '.join(candidates) or 'none'}); pass plan_class= to say which one to train"
                )
            return plan, candidates[0]
        if not any(isinstance(n, ast.ClassDef) and n.name == plan_class for n in tree.body):
            raise FedlabTrainingError(f"the training plan source defines no top-level class {plan_class!r}")
        return plan, plan_class

    from fedlab.training.plan import TorchTrainingPlan

    if not isinstance(plan, type) or not issubclass(plan, TorchTrainingPlan) or plan is TorchTrainingPlan:
        raise FedlabTrainingError(
            f"a training plan must be a subclass of TorchTrainingPlan or module source text, not {plan!r}"
        )
    deps = getattr(plan, "dependencies", [])
    if not isinstance(deps, list | tuple) or not all(isinstance(d, str) for d in deps):
        raise FedlabTrainingError(
            f"{plan.__name__}.dependencies must be a list of import lines (strings), not {deps!r}"
        )
    dep_lines = "".join(line.strip() + "\n" for line in deps if line.strip())
    source = PRELUDE + dep_lines + "\n\n" + _class_source(plan).rstrip() + "\n"
    _parse(source, f"the module built for training plan {plan.__name__}")
    return source, plan.__name__


def load_plan_class(source: str, class_name: str) -> type[TorchTrainingPlan]:
    """Execute the plan module in a fresh namespace and return its class ``class_name``.

    The module's file name is ``<plan ID12>`` and its lines are registered in ``linecache``,
    so tracebacks and ``plan_error`` show the plan's own lines.
    """
    from fedlab.training.plan import TorchTrainingPlan

    short = plan_id(source)[:12]
    filename = f"<plan {short}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise FedlabTrainingError(
            f"training plan {class_name} has a syntax error at line {exc.lineno}: {exc.msg}"
            + (f" (`{exc.text.strip()}`)" if exc.text else "")
        ) from exc
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": f"fedlab_plan_{short}", "__builtins__": builtins}
    try:
        exec(code, namespace)  # noqa: S102 -- plan code is only run after its exact hash was approved
    except (Exception, SystemExit) as exc:  # a plan calling exit() must not end the worker
        raise _describe(f"training plan module of {class_name}", exc, {filename}) from exc
    cls = namespace.get(class_name)
    if not isinstance(cls, type) or not issubclass(cls, TorchTrainingPlan):
        what = "is not defined" if cls is None else f"is a {type(cls).__name__}, not a TorchTrainingPlan subclass"
        raise FedlabTrainingError(f"training plan class {class_name!r} {what} in the plan source")
    return cls


def _plan_files(plan_cls: type) -> set[str]:
    """File names of the plan's own code: the ``<plan …>`` module, or the file or cell that defines the class."""
    from fedlab.training.plan import TorchTrainingPlan

    return {
        code.co_filename
        for klass in plan_cls.__mro__
        if klass not in (TorchTrainingPlan, object)
        for code in _own_codes(klass)
    }


def _describe(label: str, exc: BaseException, files: set[str]) -> FedlabTrainingError:
    text = str(exc).strip()
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + " …"
    message = f"{label} raised {type(exc).__name__}" + (f": {text}" if text else "")
    where: tuple[str, int, str] | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename in files:
            where = (code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    if where is None and isinstance(exc, SyntaxError) and exc.filename in files and exc.lineno:
        where = (exc.filename, exc.lineno, "")
    if where is not None:
        filename, lineno, func = where
        line = linecache.getline(filename, lineno).strip()
        in_func = f" in {func}" if func and func != "<module>" and not label.endswith(f".{func}") else ""
        message += f" (plan line {lineno}{in_func}" + (f": `{line}`" if line else "") + ")"
    return FedlabTrainingError(message)


def plan_error(plan_cls: type, method: str | None, exc: BaseException) -> FedlabTrainingError:
    """A ``FedlabTrainingError`` saying which plan method raised what, at which line of the plan.

    For example ``training plan MyPlan.training_step raised ValueError: bad shape (plan line
    23: `return self.model(x)`)``. The line is the deepest frame of the traceback that is
    the plan's own code, so an error inside torch points at the plan line that called it.
    """
    label = f"training plan {plan_cls.__name__}" + (f".{method}" if method else "")
    return _describe(label, exc, _plan_files(plan_cls))


def call_plan(plan_cls: type, method: str, func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` for plan code: anything but a ``FedlabError`` becomes ``plan_error(plan_cls, method, …)``."""
    try:
        return func(*args)
    except FedlabError:
        raise
    except (Exception, SystemExit) as exc:  # a plan calling exit() must not end the worker
        raise plan_error(plan_cls, method, exc) from exc
