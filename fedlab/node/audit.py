"""The node's audit log: what it was asked, by whom, and what it answered or refused.

One JSON object per line in ``DIR/audit.log``, appended after every request the node handles
and for every message its transport refuses before dispatch (unreadable, oversize, wrong
version). A line records *what was asked* (dataset ids, statistics, columns, plan id: the
shape of the question), never data values or a plan's source, so the log itself discloses
nothing a reply would not.

Tamper evidence is a hash chain: each line carries ``prev``, the sha256 of the previous line's
bytes (64 zeros for the first), so editing, inserting or deleting a line breaks every link
after it and :func:`verify` names the first broken line. A chain cannot show that lines were
cut from the *end*; an operator who needs that copies the last hash elsewhere (``--tail 1``).

Writing must never cost a reply: a failed write is logged at ERROR and the request goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlab.protocol import Envelope, ErrorReply, Header, Message
from fedlab.training.source import plan_id

__all__ = ["AUDIT_FILE", "GENESIS", "AuditLog", "Verification", "outcome_of", "read_entries",
           "summarize", "verify"]

AUDIT_FILE = "audit.log"
GENESIS = "0" * 64
# refused by a rule of the node's: disclosure, approval, or too many requests at once (busy)
REFUSAL_CODES = frozenset({"disclosure_refused", "budget_exhausted", "not_approved", "busy"})
log = logging.getLogger("fedlab.node.audit")

# Request fields that describe the question and are copied as they are (ids, names, small lists).
_PLAIN_FIELDS = ("dataset_id", "stats", "columns", "crosstab", "tags", "preproc_type", "preproc_step",
                 "preproc_id", "state_id", "experiment_id", "round", "plan_class", "request_id",
                 "echo_buffers", "do_training")
_MAX_TEXT = 256


def _short(value: Any) -> Any:
    """Caps strings and lists so a hostile request cannot make one audit line huge."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
    if isinstance(value, list | tuple):
        items = [_short(v) for v in value[:64]]
        return items + [f"... {len(value) - 64} more"] if len(value) > 64 else items
    return value


def summarize(content: Message, n_buffers: int = 0) -> dict[str, Any]:
    """What a request asked, without data values: ids, statistic and column names, the plan id.

    Per-column arguments (``stats_args``) and quantile ``thresholds`` are reduced to the names of
    their columns and statistics; a plan's source is reduced to its sha256 (the plan id).
    """
    asked: dict[str, Any] = {}
    for name in _PLAIN_FIELDS:
        value = getattr(content, name, None)
        if value is not None and value != [] and value != "":
            asked[name] = _short(value)
    stats_args = getattr(content, "stats_args", None)
    if isinstance(stats_args, dict) and stats_args:
        asked["stats_args"] = {_short(col): _short(sorted(args)) for col, args in list(stats_args.items())[:64]}
    thresholds = getattr(content, "thresholds", None)
    if isinstance(thresholds, dict) and thresholds:
        asked["quantile_columns"] = _short(sorted(thresholds))
    source = getattr(content, "plan_source", None)
    if isinstance(source, str):
        asked["plan_id"] = plan_id(source)
    params = getattr(content, "params", None)
    if isinstance(params, list):
        asked["n_params"] = len(params)
    if n_buffers:
        asked["n_buffers"] = n_buffers
    dp = getattr(content, "dp", None)  # a DP analytics request: what it offered to spend
    if dp is not None and hasattr(dp, "epsilon"):
        asked["dp"] = {"epsilon": dp.epsilon, "delta": dp.delta, "mechanism": dp.mechanism}
    return asked


def outcome_of(reply: Message) -> dict[str, Any]:
    """``ok``, ``refused`` (disclosure, approval or busy) or ``error``, with the code and message."""
    if isinstance(reply, ErrorReply):
        outcome = "refused" if reply.code in REFUSAL_CODES else "error"
        return {"outcome": outcome, "code": reply.code, "message": _short(reply.message)}
    result: dict[str, Any] = {"outcome": "ok"}
    # an FAReply that withheld some columns, or a preprocessing fit's partials that did
    refused = getattr(reply, "refused", None) or getattr(getattr(reply, "partials", None), "refused", None)
    if isinstance(refused, dict) and refused:
        result["refused_columns"] = _short(sorted(refused))
    status = getattr(reply, "status", None)  # a plan status or approval reply
    if isinstance(status, str):
        result["status"] = status
    spent = getattr(reply, "dp", None)  # a DP answer: what it cost and what remains (fedlab.node.dp_ledger)
    if spent is not None and hasattr(spent, "balance"):
        result["dp_spent"] = {"epsilon": spent.epsilon, "delta": spent.delta, "mechanism": spent.mechanism,
                              "epsilon_remaining": spent.balance.epsilon_remaining}
    return result


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The file's last line (without its newline), reading only the end of the file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            block, data = 4096, b""
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
                stripped = data.rstrip(b"\n")
                if b"\n" in stripped:
                    return stripped.rsplit(b"\n", 1)[1]
            stripped = data.rstrip(b"\n")
            return stripped or None
    except FileNotFoundError:
        return None


class AuditLog:
    """Appends hash-chained lines to ``path`` (thread-safe; one writer per node process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._failed = False
        self._prev = GENESIS
        self._file = None
        try:  # a node whose audit file is unusable still starts and serves, and says so loudly
            last = _last_line(self.path)
            self._prev = GENESIS if last is None else _digest(last)
            if self.path.exists() and self.path.stat().st_size and not self._ends_with_newline():
                with open(self.path, "ab") as f:  # a line cut short by a crash stays visible to verify
                    f.write(b"\n")
            self._file = open(self.path, "ab")  # held open for the node's lifetime
        except OSError as exc:
            self._report(exc)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def record_reply(self, request: Envelope, reply: Envelope, *, peer: str | None = None) -> None:
        """One line for a handled request and the reply the node sent."""
        self.write({
            "msg_id": request.msg_id, "msg_type": request.msg_type, "sender": request.sender, "peer": peer,
            "asked": summarize(request.content, len(request.buffers)), **outcome_of(reply.content),
        })

    def record_refusal(self, code: str, message: str, header: Header | None, *, size: int = 0,
                       n_frames: int = 0, peer: str | None = None) -> None:
        """One line for a message refused before dispatch (the header, if it could be read)."""
        self.write({
            "msg_id": header.msg_id if header else None, "msg_type": header.msg_type if header else None,
            "sender": header.sender if header else None, "peer": peer,
            "asked": {"bytes": size, "frames": n_frames},
            "outcome": "refused", "code": code, "message": _short(message),
        })

    def write(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` with the time and the previous line's hash; never raises."""
        try:
            with self._lock:
                if self._file is None:
                    raise OSError(f"{self.path} is not open")
                record = {"time": datetime.now(UTC).isoformat(timespec="microseconds"), **entry,
                          "prev": self._prev}
                line = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str).encode()
                self._file.write(line + b"\n")
                self._file.flush()
                self._prev = _digest(line)
                self._failed = False
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: BaseException) -> None:
        # loud, but once per run of failures: a full disk must not also flood the node's log
        if not self._failed:
            log.error("AUDIT LOG NOT WRITTEN (%s): %s: %s; requests are still answered, fix the file "
                      "so the audit trail resumes", self.path, type(exc).__name__, exc)
        self._failed = True

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclass(frozen=True)
class Verification:
    """The result of checking a log: how many lines, and the first broken one (1-based) and why."""

    n_lines: int
    broken_line: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_line is None


def verify(path: str | Path) -> Verification:
    """Check every line parses and links to the line before it."""
    prev = GENESIS
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):  # noqa: B007 - n is the count afterwards
            line = raw.rstrip(b"\n")
            try:
                entry = json.loads(line)
            except ValueError:
                return Verification(n, n, "not a JSON object (edited, or cut short by a crash)")
            if not isinstance(entry, dict) or entry.get("prev") != prev:
                return Verification(n, n, "its 'prev' hash does not match the line before it "
                                          "(a line was edited, inserted or removed here)")
            prev = _digest(line)
    return Verification(n)


def read_entries(path: str | Path) -> Iterator[dict[str, Any]]:
    """The log's entries in order (a line that is not JSON comes back as ``{"unreadable": text}``)."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"unreadable": raw.decode("utf-8", "replace").rstrip("\n")}
            yield entry if isinstance(entry, dict) else {"unreadable": str(entry)}
