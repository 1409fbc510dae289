"""Error messages a node may send: no path on the node's disk, no text of a foreign exception.

Every failure a node reports to the researcher (who may be hostile) becomes an ``ErrorReply``.
A bug's exception text can quote a data value or a path, so :mod:`fedlab.node.dispatch` never
sends it: the researcher gets a reference id and the node's log gets the traceback. A
``FedlabError``'s message is written for the researcher, but some (the registry's, for one)
name the node's directory for the operator's sake; :func:`redact` takes those out.

Both functions here are pure apart from :func:`path_forms` resolving symbolic links.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = ["REDACTED", "new_reference", "path_forms", "redact"]

REDACTED = "<path on the node>"

# What may follow a given directory and still be part of the same path: a separator, then
# anything up to whitespace, a quote or a delimiter that does not belong in a path.
_REST = r"(?:[\\/][^\s'\"`,;()\[\]{}<>]*)?"
_TRAILING = ".:!?"  # sentence punctuation after a path stays in the message


def new_reference() -> str:
    """A short random hex id that ties an error reply to its traceback in the node's log."""
    return secrets.token_hex(5)


def _strip(path: str) -> str:
    """``path`` without trailing separators, or "" when nothing that can be redacted is left."""
    stripped = path.rstrip("/\\")
    # the root (or a bare drive) would redact every slash in every message; never useful
    if len(stripped) < 2 or re.fullmatch(r"[A-Za-z]:", stripped):
        return ""
    return stripped


def redact(message: str, paths: Iterable[str]) -> str:
    """``message`` with every occurrence of ``paths``, and any longer path below one of them,
    replaced by ``<path on the node>``.

    The longest paths go first, so a file below a directory that is also given is replaced
    whole. A path followed by sentence punctuation (``... /srv/node.``) keeps the punctuation.
    """
    candidates = sorted({s for s in (_strip(str(p)) for p in paths) if s}, key=len, reverse=True)
    if not candidates or not message:
        return message
    pattern = re.compile("|".join(f"(?:{re.escape(c)}){_REST}" for c in candidates))

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        kept = text.rstrip(_TRAILING)
        # keep what follows the path itself, never shorten the given path itself
        tail = text[len(kept):] if any(kept.startswith(c) for c in candidates) else ""
        return REDACTED + tail

    return pattern.sub(replace, message)


def path_forms(paths: Iterable[str | os.PathLike[str] | None]) -> set[str]:
    """Every spelling of ``paths`` a message may hold: as given (when absolute, or relative with
    a separator in it), absolute, and with symbolic links resolved. Never raises."""
    forms: set[str] = set()
    for path in paths:
        if path is None:
            continue
        text = os.fspath(path)
        if not text:
            continue
        if os.path.isabs(text) or "/" in text or os.sep in text:
            forms.add(text)  # a bare relative name ("data") would redact that word everywhere
        for resolve in (os.path.abspath, os.path.realpath, lambda p: str(Path(p).expanduser().resolve())):
            try:
                forms.add(resolve(text))
            except (OSError, RuntimeError, ValueError):
                continue
    return {f for f in forms if _strip(f)}
