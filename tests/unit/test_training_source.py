"""A training plan as source text: extracted from a file, a string or a notebook cell, hashed, loaded,
and its errors traced back to the plan's own line."""

from __future__ import annotations

import hashlib
import inspect
import linecache
import math
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlab.errors import FedlabTrainingError
from fedlab.training import TorchTrainingPlan, load_plan_class, plan_id, plan_source
from fedlab.training.source import PRELUDE, plan_error


class FilePlan(TorchTrainingPlan):
    """A plan defined in an ordinary module file."""

    dependencies = ["import math"]

    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        return nn.Linear(model_args.get("n", 3), 1)

    def training_data(self, dataset: Any) -> Any:
        return dataset

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(1.0)  # on a node, `math` comes from `dependencies`
        return F.mse_loss(self.model(data).squeeze(1) * scale, target)


class Raiser(TorchTrainingPlan):
    def training_step(self, data: Any, target: Any) -> Any:
        return self.helper(data)

    def helper(self, data: Any) -> Any:
        raise ValueError(f"bad shape {data}")


MODULE = '''\
from fedlab.training import TorchTrainingPlan
from torch import nn


class Tiny(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(2, 1)

    def training_step(self, data, target):
        raise ValueError("bad shape")
'''

CELL = '''\
import torch.nn.functional as F
from torch import nn

x = 41 + 1

class CellPlan(TorchTrainingPlan):
    """Typed into a notebook."""

    def init_model(self, model_args):
        return nn.Linear(4, 2)

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)

class Other:
    pass
'''


def run_cell(source: str, filename: str) -> dict[str, Any]:
    """What IPython does with a cell: lines in linecache under a pseudo file name, exec in __main__'s namespace."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": "__main__", "TorchTrainingPlan": TorchTrainingPlan}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 -- the test's own code
    return namespace


def test_plan_id_is_the_sha256_of_the_source_and_changes_with_one_byte() -> None:
    assert plan_id("abc") == hashlib.sha256(b"abc").hexdigest()
    assert plan_id(MODULE) != plan_id(MODULE.replace("bad shape", "bad shapE"))
    assert plan_id("é") == hashlib.sha256("é".encode()).hexdigest()


def test_class_from_a_module_file_becomes_a_self_contained_module() -> None:
    source, name = plan_source(FilePlan)
    assert name == "FilePlan"
    assert source.startswith(PRELUDE + "import math\n")
    assert textwrap.dedent(inspect.getsource(FilePlan)).rstrip() in source
    cls = load_plan_class(source, name)
    assert cls.__name__ == "FilePlan" and issubclass(cls, TorchTrainingPlan) and cls is not FilePlan
    plan = cls()
    plan.model = plan.init_model({"n": 3})
    loss = plan.training_step(torch.ones(2, 3), torch.zeros(2))
    assert loss.shape == () and loss.requires_grad


def test_a_loaded_plan_gives_back_the_same_source() -> None:
    source, name = plan_source(FilePlan)
    assert plan_source(load_plan_class(source, name)) == (source, name)


def test_plans_are_built_hashed_and_checked_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fedlab.training as t\n"
        "import fedlab.training.messages, fedlab.training.state, fedlab.training.data\n"
        f"source, name = t.plan_source({MODULE!r})\n"
        "assert name == 'Tiny' and len(t.plan_id(source)) == 64\n"
        "assert t.TrainingArgs.from_dict({'epochs': 2}).epochs == 2\n"
        "specs, frames = t.pack_named({'w': __import__('numpy').ones(2)})\n"
        "assert t.decode_state(t.encode_state(t.unpack_named(specs, frames), {}))[0]['w'].tolist() == [1, 1]\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    t.TorchTrainingPlan\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('torch was not blocked')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_string_source_gets_the_prelude_once_and_its_single_plan_class_is_found() -> None:
    module = PRELUDE + "\n\n" + MODULE
    assert plan_source(MODULE) == (module, "Tiny")
    assert plan_source(MODULE, "Tiny") == (module, "Tiny")
    assert plan_source(module) == (module, "Tiny")  # already a whole module: used as is


def test_string_source_errors_say_what_to_do() -> None:
    two = MODULE + "\n\nclass Tiny2(TorchTrainingPlan):\n    pass\n"
    with pytest.raises(FedlabTrainingError, match=r"2 TorchTrainingPlan subclasses \(Tiny, Tiny2\).*plan_class="):
        plan_source(two)
    assert plan_source(two, "Tiny2") == (PRELUDE + "\n\n" + two, "Tiny2")
    with pytest.raises(FedlabTrainingError, match="none"):
        plan_source("x = 1\n")
    with pytest.raises(FedlabTrainingError, match="no top-level class 'Nope'"):
        plan_source(MODULE, "Nope")
    with pytest.raises(FedlabTrainingError, match="syntax error at line 2"):
        plan_source("x = 1\ndef f(:\n", "A")


def test_class_from_a_notebook_cell_is_found_through_linecache() -> None:
    namespace = run_cell(CELL, "<ipython-input-3-abc123>")
    cls = namespace["CellPlan"]
    with pytest.raises((OSError, TypeError)):
        inspect.getsource(cls)  # what the fallback exists for
    source, name = plan_source(cls)
    assert name == "CellPlan"
    assert source.startswith(PRELUDE)
    assert 'class CellPlan(TorchTrainingPlan):\n    """Typed into a notebook."""' in source
    assert "x = 41" not in source and "class Other" not in source
    loaded = load_plan_class(source, name)
    plan = loaded()
    plan.model = plan.init_model({})
    assert plan.training_step(torch.ones(3, 4), torch.tensor([0, 1, 1])).requires_grad


def test_cell_redefining_a_class_picks_the_definition_that_made_it() -> None:
    first = run_cell(CELL, "<ipython-input-4-def>")["CellPlan"]
    second = run_cell(CELL.replace("nn.Linear(4, 2)", "nn.Linear(4, 3)"), "<ipython-input-5-def>")["CellPlan"]
    assert "nn.Linear(4, 2)" in plan_source(first)[0]
    assert "nn.Linear(4, 3)" in plan_source(second)[0]


def test_nested_class_in_a_cell_is_dedented() -> None:
    cell = textwrap.dedent("""\
        def make():
            class Inner(TorchTrainingPlan):
                def init_model(self, model_args):
                    return nn.Linear(1, 1)
            return Inner

        Plan = make()
        """)
    namespace = run_cell(cell, "<ipython-input-6-nested>")
    source, name = plan_source(namespace["Plan"])
    assert name == "Inner"
    assert "\nclass Inner(TorchTrainingPlan):\n    def init_model" in source
    assert "make" not in source
    load_plan_class(source, name)


def test_class_whose_source_cannot_be_found_is_a_clear_error() -> None:
    namespace: dict[str, Any] = {"TorchTrainingPlan": TorchTrainingPlan, "__name__": "__main__"}
    exec(compile(CELL, "<never-registered>", "exec"), namespace)  # noqa: S102
    with pytest.raises(FedlabTrainingError, match="cannot find the source code of training plan CellPlan"):
        plan_source(namespace["CellPlan"])


def test_only_plan_subclasses_and_strings_are_plans() -> None:
    for bad in (int, TorchTrainingPlan, 3):
        with pytest.raises(FedlabTrainingError, match="subclass of TorchTrainingPlan"):
            plan_source(bad)  # type: ignore[arg-type]


def test_bad_dependencies_are_refused() -> None:
    class BadDeps(FilePlan):
        dependencies = "import math"  # type: ignore[assignment]

        def init_model(self, model_args: dict[str, Any]) -> nn.Module:
            return nn.Linear(1, 1)

    with pytest.raises(FedlabTrainingError, match="list of import lines"):
        plan_source(BadDeps)


def test_load_plan_class_errors_name_the_problem_and_line() -> None:
    with pytest.raises(FedlabTrainingError, match=r"syntax error at line 2: .*`def f\(:`"):
        load_plan_class("x = 1\ndef f(:\n", "A")
    with pytest.raises(FedlabTrainingError, match=r"ZeroDivisionError: division by zero \(plan line 2: `y = 1 / 0`\)"):
        load_plan_class("x = 1\ny = 1 / 0\n", "A")
    with pytest.raises(FedlabTrainingError, match=r"ModuleNotFoundError: .*no_such_module"):
        load_plan_class("import no_such_module\n", "A")
    with pytest.raises(FedlabTrainingError, match="'A' is not defined"):
        load_plan_class("x = 1\n", "A")
    with pytest.raises(FedlabTrainingError, match="'A' is a int, not a TorchTrainingPlan subclass"):
        load_plan_class("A = 1\n", "A")
    with pytest.raises(FedlabTrainingError, match="'A' is a type, not a TorchTrainingPlan"):
        load_plan_class("class A:\n    pass\n", "A")


def test_loaded_plan_has_its_lines_in_linecache_and_a_fresh_namespace() -> None:
    a = load_plan_class(MODULE, "Tiny")
    b = load_plan_class(MODULE, "Tiny")
    assert a is not b
    filename = a.training_step.__code__.co_filename
    assert filename == f"<plan {plan_id(MODULE)[:12]}>"
    assert linecache.getline(filename, 10).strip() == 'raise ValueError("bad shape")'


def test_plan_error_names_method_exception_and_plan_line() -> None:
    cls = load_plan_class(MODULE, "Tiny")
    with pytest.raises(ValueError) as info:
        cls().training_step(None, None)
    error = plan_error(cls, "training_step", info.value)
    assert str(error) == (
        'training plan Tiny.training_step raised ValueError: bad shape (plan line 10: `raise ValueError("bad shape")`)'
    )


def test_plan_error_points_at_the_deepest_plan_frame_of_a_file_plan() -> None:
    with pytest.raises(ValueError) as info:
        Raiser().training_step(7, None)
    message = str(plan_error(Raiser, "training_step", info.value))
    line = inspect.getsourcelines(Raiser.helper)[1] + 1
    assert message == (
        f"training plan Raiser.training_step raised ValueError: bad shape 7 "
        f'(plan line {line} in helper: `raise ValueError(f"bad shape {{data}}")`)'
    )


def test_plan_error_without_a_plan_frame_has_no_line() -> None:
    message = str(plan_error(Raiser, None, KeyError("k")))
    assert message == "training plan Raiser raised KeyError: 'k'"
    long = str(plan_error(Raiser, "x", RuntimeError("y" * 5000)))
    assert len(long) < 1100 and long.endswith("…")


def test_a_plan_naming_its_base_through_the_package_loads() -> None:
    """`class P(fedlab.TorchTrainingPlan)`, as a notebook user may write it, runs on a node too."""
    source, name = plan_source("class P(fedlab.TorchTrainingPlan):\n    pass\n", "P")
    assert issubclass(load_plan_class(source, name), TorchTrainingPlan)
