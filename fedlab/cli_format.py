"""How the ``fedlab`` command prints what a node operator reviews: tables, one-line cells, and text
with its invisible characters shown, so that what a terminal displays is what Python reads."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["DESCRIPTION_WIDTH", "one_line", "print_table", "visible"]

DESCRIPTION_WIDTH = 40


def one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def visible(text: str, keep: str = "") -> tuple[str, int]:
    """``text`` with control, format (bidi overrides) and unassigned characters shown as escapes, and
    how many there were: a plan's source must look to its reviewer exactly as Python will read it
    (no terminal escape sequences, no "Trojan Source" reordering)."""
    out, hidden = [], 0
    for char in text:
        if char not in keep and unicodedata.category(char) in _INVISIBLE:
            hidden += 1
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out), hidden


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
