"""Static results beside the live widgets: MIME bundles for DataFrames, figures and text.

A widget needs a kernel to render; a notebook saved after a run and opened later has none.
So every run leaves its final results as plain display data (HTML table, PNG, text) that
any Jupyter front end, nbviewer or GitHub shows without a kernel. The bundles are built
here, by hand, rather than through ``IPython.display``: ``Output.append_display_data``
formats through ``InteractiveShell.instance()``, which would create a shell in a plain
Python process, and building the bundle ourselves lets a background thread append it to an
``Output`` widget by setting one trait (the thread-safe way, see the testing guide).
"""

from __future__ import annotations

import base64
import html
import io
import threading
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from ipywidgets import Output
    from matplotlib.figure import Figure

__all__ = ["append", "bundle", "figure_png", "frame_html", "notes_html"]

_APPEND_LOCK = threading.Lock()  # two threads appending at once must not drop either


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, drawn by the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def frame_html(frame: pd.DataFrame, max_rows: int = 60) -> str:
    """The frame as the HTML table pandas gives notebooks (``table.dataframe``)."""
    return str(frame.to_html(max_rows=max_rows, classes="dataframe", border=1))


def notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in notes) + "</ul>"


def bundle(obj: Any) -> dict[str, Any]:
    """A display_data MIME bundle for ``obj``: a DataFrame, a matplotlib Figure, an object with
    ``_repr_html_`` (FAResult) or anything else (shown as text)."""
    from matplotlib.figure import Figure

    if isinstance(obj, pd.DataFrame):
        return {"text/plain": obj.to_string(max_rows=60), "text/html": frame_html(obj)}
    if isinstance(obj, Figure):
        png = base64.b64encode(figure_png(obj)).decode("ascii")
        title = obj.get_suptitle() or "figure"
        return {"text/plain": f"<{title}>", "image/png": png}
    data: dict[str, Any] = {"text/plain": str(obj) if isinstance(obj, str) else repr(obj)}
    html_repr = getattr(obj, "_repr_html_", None)
    if callable(html_repr):
        data["text/html"] = html_repr()
    return data


def append(output: Output, *objects: Any, stream: str | None = None) -> None:
    """Append ``objects`` to ``output`` from any thread: one assignment of its ``outputs`` trait.

    ``stream`` ("stdout"/"stderr") appends the objects as text on that stream instead.
    """
    if stream is not None:
        text = "".join(f"{o}\n" for o in objects)
        new: tuple[dict[str, Any], ...] = ({"output_type": "stream", "name": stream, "text": text},)
    else:
        new = tuple({"output_type": "display_data", "data": bundle(o), "metadata": {}} for o in objects)
    with _APPEND_LOCK:
        output.outputs = (*output.outputs, *new)
