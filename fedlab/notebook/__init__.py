"""The notebook layer: %fed magics, live widgets, forms, plots.

``import fedlab.notebook`` imports nothing heavy: IPython, ipywidgets and matplotlib are
imported by the modules that need them, when they are used. ``%load_ext fedlab`` registers
the magics (``fedlab.notebook.magics``); ``fedlab.notebook.current_session()`` is what they
share (the researcher, the plans, the background jobs).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BackgroundTraining", "Session", "current_session"]

_EXPORTS = {
    "BackgroundTraining": "fedlab.notebook.background",
    "Session": "fedlab.notebook.session",
    "current_session": "fedlab.notebook.magics",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlab.notebook' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
