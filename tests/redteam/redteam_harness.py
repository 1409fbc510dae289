"""The red team's harness: a seeded 40-patient cohort, real `fedlab node start` processes, and a
raw ZeroMQ ROUTER that plays an adversarial researcher (it sends what the typed API never would).

Nothing here asserts a disclosure rule; the tests do. What this module does assert is that the
plumbing works: a node that never connects, a reply that never comes or an unreadable reply is
a harness failure (``HarnessError``), never confused with a rule that failed to hold.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import zmq

import fedlab.analytics.messages  # noqa: F401 - registers fa_request / fa_reply for decoding
import fedlab.preprocessing.messages  # noqa: F401 - registers preproc_request / preproc_reply
from fedlab.node.config import init_node_dir
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import (
    PROTOCOL_VERSION,
    DatasetListReply,
    DatasetListRequest,
    Envelope,
    ErrorReply,
    Header,
    Heartbeat,
    PingReply,
    PingRequest,
    decode,
    new_msg_id,
)

HEARTBEAT = 0.2  # the nodes' heartbeat interval (s)
REPLY_TIMEOUT = 90.0  # generous: the development machine is a loaded 2-core box
START_TIMEOUT = 90.0

# --- the cohort -------------------------------------------------------------------------------

N_ROWS = 40
MIN_COUNT = 10
CELL_THRESHOLD = 3
COMMON_CODES = {"A": 14, "B": 12, "C": 10}
MID_CODE, MID_COUNT = "MID", 3  # a code held by 3 patients: a group smaller than min_count
RARE_CODE = "RARE"  # held by exactly one patient
N_CHOL = 9  # non-missing values of chol, below min_count
N_SEX_ONES = 2  # a binary column with only two ones
AGE_50 = 2  # patients aged exactly 50 (the histogram edge-shift attack)


class HarnessError(AssertionError):
    """The harness itself failed (no node, no reply): not a verdict on a disclosure rule."""


def make_cohort(seed: int = 7) -> pd.DataFrame:
    """40 patients, deterministic for ``seed``.

    patient_id 'P1000'..'P1039' (excluded on the node); age integers 20-80 with exactly two 50s;
    income distinct floats with cents; sex 0/1 with two ones; smoker 0/1 with 17 ones; dx: A 14,
    B 12, C 10, MID 3, RARE 1; chol 9 values, the rest missing; hosp_code 40 distinct id-like strings.
    """
    rng = np.random.default_rng(seed)
    n = N_ROWS
    ages = rng.choice([a for a in range(20, 81) if a != 50], size=n)
    ages[rng.choice(n, AGE_50, replace=False)] = 50
    incomes: list[float] = []
    while len(incomes) < n:
        value = round(float(rng.normal(52_000, 14_000)), 2)
        if 15_000 < value < 95_000 and value not in incomes and round(value) != value:
            incomes.append(value)
    sex = np.zeros(n, dtype=int)
    sex[rng.choice(n, N_SEX_ONES, replace=False)] = 1
    smoker = np.zeros(n, dtype=int)
    smoker[rng.choice(n, 17, replace=False)] = 1
    dx = [code for code, k in COMMON_CODES.items() for _ in range(k)] + [MID_CODE] * MID_COUNT + [RARE_CODE]
    dx = list(rng.permutation(dx))
    chol = np.full(n, np.nan)
    chol[rng.choice(n, N_CHOL, replace=False)] = np.round(rng.uniform(150, 290, N_CHOL), 1)
    codes = rng.choice(np.arange(10_000, 100_000), size=n, replace=False)
    return pd.DataFrame({
        "patient_id": [f"P{1000 + i}" for i in range(n)],
        "age": ages.astype(int),
        "income": incomes,
        "sex": sex,
        "smoker": smoker,
        "dx": dx,
        "chol": chol,
        "hosp_code": [f"H{c}" for c in codes],
    })


def secret_strings(frame: pd.DataFrame) -> list[str]:
    """Spellings of data values that must never appear in an error reply."""
    out = {"P10"}
    out |= set(frame["patient_id"])
    out |= set(frame["hosp_code"])
    for v in frame["income"]:
        out |= {repr(float(v)), f"{v:.2f}", str(v)}
    for v in frame["chol"].dropna():
        out |= {repr(float(v)), str(v)}
    return sorted(out)


def count_le(values: Iterable[float], t: float) -> int:
    return int(sum(1 for v in values if v <= t))


# --- node processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


class Node:
    """One node directory holding the cohort, and the `fedlab node start` process serving it."""

    def __init__(self, directory: Path, address: str, node_id: str, csv: Path, frame: pd.DataFrame) -> None:
        self.directory = directory
        self.address = address
        self.node_id = node_id
        self.csv = csv
        self.frame = frame
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = directory / "stderr.txt"

    @classmethod
    def create(cls, root: Path, name: str, address: str, frame: pd.DataFrame, *,
               rules: Mapping[str, Any] | None = None, tags: Sequence[str] = ("cohort",),
               dataset: str = "cohort") -> Node:
        directory = root / name
        config = init_node_dir(directory, name, address)
        data_dir = root / f"{name}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        csv = data_dir / f"{dataset}.csv"
        frame.to_csv(csv, index=False)
        DatasetRegistry(config.db_path).add(dataset, list(tags), "csv", str(csv), description="red-team cohort")
        node = cls(directory, address, config.node_id, csv, frame)
        node.set_rules(excluded_columns=["patient_id"], **(rules or {}))
        return node

    def add_dataset(self, name: str, frame: pd.DataFrame, tags: Sequence[str]) -> Path:
        csv = self.csv.parent / f"{name}.csv"
        frame.to_csv(csv, index=False)
        DatasetRegistry(self.directory / "node.db").add(name, list(tags), "csv", str(csv))
        return csv

    def set_rules(self, **rules: Any) -> None:
        """Set keys of the [disclosure] table of config.toml (before start, or restart after)."""
        path = self.directory / "config.toml"
        lines = path.read_text().splitlines()
        start = lines.index("[disclosure]")
        for key, value in rules.items():
            rendered = f"{key} = {_toml(value)}"
            for i in range(start + 1, len(lines)):
                if lines[i].split("=")[0].strip() == key and not lines[i].lstrip().startswith("#"):
                    lines[i] = rendered
                    break
            else:
                lines.append(rendered)
        path.write_text("\n".join(lines) + "\n")

    def start(self) -> Node:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedlab", "node", "start", str(self.directory),
                 "--researcher", self.address, "--heartbeat", str(HEARTBEAT)],
                stdout=subprocess.DEVNULL, stderr=err, env=env)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def audit_entries(self) -> list[dict[str, Any]]:
        from fedlab.node.audit import AUDIT_FILE, read_entries

        path = self.directory / AUDIT_FILE
        return list(read_entries(path)) if path.exists() else []

    def wait_for_audit(self, msg_ids: Iterable[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """The audit entries of ``msg_ids`` (the node writes a line just after sending its reply)."""
        wanted = set(msg_ids)
        entries: dict[str, dict[str, Any]] = {}

        def found() -> bool:
            entries.clear()
            entries.update({e["msg_id"]: e for e in self.audit_entries() if e.get("msg_id") in wanted})
            return set(entries) == wanted

        wait_until(found, timeout, f"audit lines for {len(wanted)} requests")
        return dict(entries)

    def derived_csv(self, dataset_id: str) -> pd.DataFrame:
        """The oracle's look at a derived dataset's file (the attacker never gets this)."""
        return pd.read_csv(DatasetRegistry(self.directory / "node.db").get(dataset_id).path)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- the raw researcher -----------------------------------------------------------------------


class RawResearcher:
    """A bare ROUTER bound where the nodes dial in: hand-made envelopes, raw msgspec content.

    It sends its own heartbeats (announcing a long interval) so that a node never decides the
    researcher went silent while a test thinks. Every reply is kept by parent id, so duplicates
    and replies to requests sent in a burst can be checked.
    """

    def __init__(self, address: str, sender: str = "researcher-redteam") -> None:
        self.address = address
        self.sender = sender
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(address)
        self.replies: dict[str, list[Envelope]] = {}
        self.heartbeats: dict[str, int] = {}
        self.sessions: dict[str, str] = {}
        self._last_beat = 0.0

    # -- plumbing --------------------------------------------------------------------------
    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < 1.0:
            return
        self._last_beat = now
        for node in list(self.heartbeats):
            self.send_frames(node, self.frames("heartbeat", Heartbeat(name="redteam", interval=60.0)))

    def pump(self, timeout: float) -> None:
        """Receive whatever arrives within ``timeout`` s (at least one poll)."""
        deadline = time.monotonic() + timeout
        while True:
            self._beat()
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if self.sock.poll(min(left, 100)):
                while True:
                    try:
                        identity, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._file(identity.decode(errors="replace"), frames)
            if time.monotonic() >= deadline:
                return

    def _file(self, node: str, frames: list[bytes]) -> None:
        try:
            env = decode(frames, max_bytes=2**33)
        except Exception as exc:  # a node must always send decodable messages
            raise HarnessError(f"undecodable message from {node}: {exc}") from exc
        if env.msg_type == "heartbeat":
            first = node not in self.heartbeats
            self.heartbeats[node] = self.heartbeats.get(node, 0) + 1
            self.sessions[node] = getattr(env.content, "session", "")
            if first:
                self._beat(force=True)
            return
        if env.parent_id is not None:
            self.replies.setdefault(env.parent_id, []).append(env)

    def wait_for_node(self, node_id: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while node_id not in self.heartbeats:
            if time.monotonic() > deadline:
                raise HarnessError(f"node {node_id} did not connect within {timeout} s")
            self.pump(0.1)

    def wait_for_restart(self, node_id: str, old_session: str, timeout: float = START_TIMEOUT) -> None:
        """Wait for heartbeats of a new process (a new session) of ``node_id``."""
        deadline = time.monotonic() + timeout
        while self.sessions.get(node_id, old_session) == old_session:
            if time.monotonic() > deadline:
                raise HarnessError(f"node {node_id} did not come back within {timeout} s")
            self.pump(0.1)

    def wait_for_heartbeats(self, node_id: str, more: int = 2, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``more`` further heartbeats of ``node_id`` arrived (it is alive and connected)."""
        target = self.heartbeats.get(node_id, 0) + more
        deadline = time.monotonic() + timeout
        while self.heartbeats.get(node_id, 0) < target:
            if time.monotonic() > deadline:
                raise HarnessError(f"node {node_id} stopped sending heartbeats")
            self.pump(0.1)

    def frames(self, msg_type: str, content: Any, *, msg_id: str | None = None,
               sender: str | None = None) -> list[bytes]:
        """Header and content frames; ``content`` is a Message struct or any msgspec-encodable dict."""
        header = Header(msg_id=msg_id or new_msg_id(), msg_type=msg_type, sender=sender or self.sender,
                        version=PROTOCOL_VERSION, time=time.time())
        return [msgspec.msgpack.encode(header), msgspec.msgpack.encode(content)]

    def send_frames(self, node_id: str, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart([node_id.encode(), *frames])

    def send(self, node_id: str, msg_type: str, content: Any, *, msg_id: str | None = None,
             sender: str | None = None) -> str:
        msg_id = msg_id or new_msg_id()
        self.send_frames(node_id, self.frames(msg_type, content, msg_id=msg_id, sender=sender))
        return msg_id

    def reply(self, msg_id: str, timeout: float = REPLY_TIMEOUT) -> Any:
        """The content of the (first) reply to ``msg_id``."""
        deadline = time.monotonic() + timeout
        while msg_id not in self.replies:
            if time.monotonic() > deadline:
                raise HarnessError(f"no reply to {msg_id} within {timeout} s")
            self.pump(0.05)
        return self.replies[msg_id][0].content

    def request(self, node_id: str, msg_type: str, content: Any, *, timeout: float = REPLY_TIMEOUT,
                sender: str | None = None) -> Any:
        return self.reply(self.send(node_id, msg_type, content, sender=sender), timeout)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    # -- the requests an attacker sends ----------------------------------------------------
    def ping(self, node_id: str, timeout: float = REPLY_TIMEOUT) -> None:
        reply = self.request(node_id, "ping_request", PingRequest(), timeout=timeout)
        if not isinstance(reply, PingReply):
            raise HarnessError(f"ping answered with {reply!r}")

    def datasets(self, node_id: str) -> dict[str, Any]:
        """{name: DatasetInfo} of the node's datasets (what any researcher may list)."""
        reply = self.request(node_id, "dataset_list_request", DatasetListRequest())
        if not isinstance(reply, DatasetListReply):
            raise HarnessError(f"dataset list answered with {reply!r}")
        return {d.name: d for d in reply.datasets}

    def dataset_id(self, node_id: str, name: str = "cohort") -> str:
        return str(self.datasets(node_id)[name].dataset_id)

    def fa(self, node_id: str, dataset_id: str, *, sender: str | None = None, timeout: float = REPLY_TIMEOUT,
           **fields: Any) -> Any:
        """An fa_request built as a raw dict: fields the typed API would check are not checked."""
        content = {"dataset_id": dataset_id, "stats": fields.pop("stats", []), **fields}
        return self.request(node_id, "fa_request", content, timeout=timeout, sender=sender)

    def preproc(self, node_id: str, dataset_id: str, preproc_type: str, step: str, args: Mapping[str, Any],
                state_id: str | None = None, *, preproc_id: str = "preproc-redteam",
                timeout: float = REPLY_TIMEOUT) -> Any:
        content: dict[str, Any] = {"dataset_id": dataset_id, "preproc_type": preproc_type, "preproc_step": step,
                                   "preproc_id": preproc_id, "preproc_args": dict(args)}
        if state_id is not None:
            content["state_id"] = state_id
        return self.request(node_id, "preproc_request", content, timeout=timeout)

    def thresholds(self, node_id: str, dataset_id: str, column: str, ts: Sequence[float], **kw: Any) -> Any:
        return self.fa(node_id, dataset_id, stats=["quantiles"], columns=[column],
                       stats_args={column: {"quantiles": {}}}, thresholds={column: [float(t) for t in ts]}, **kw)


# --- reading replies --------------------------------------------------------------------------


def is_error(reply: Any, code: str | None = None) -> bool:
    return isinstance(reply, ErrorReply) and (code is None or reply.code == code)


def refusal_text(reply: Any) -> str:
    """Everything a reply says about refusals: an error's message, or FAReply.refused keys and texts."""
    if isinstance(reply, ErrorReply):
        return f"[{reply.code}] {reply.message}"
    partials = getattr(reply, "partials", None)
    refused = getattr(reply if partials is None else partials, "refused", {}) or {}
    return "; ".join(f"{k}: {v}" for k, v in refused.items())


def fa_part(reply: Any) -> Any:
    """The FAReply in an FAReply or a PreprocReply (fit), or None."""
    if reply is None or isinstance(reply, ErrorReply):
        return None
    return getattr(reply, "partials", None) or (reply if hasattr(reply, "numeric") else None)


def is_power_of_ten(x: float) -> bool:
    return x > 0 and abs(math.log10(x) - round(math.log10(x))) < 1e-9


def grid_consistent(values: Sequence[float], t: float, count: int, resolution: float) -> bool:
    """Whether ``count`` is the count of values <= some grid point m*resolution next to ``t``
    (whichever rounding the node uses): then the answer says nothing finer than the grid."""
    lo = math.floor(t / resolution + 1e-9)
    hi = math.ceil(t / resolution - 1e-9)
    return any(count_le(values, m * resolution) == count for m in range(lo - 0, hi + 1))


def spacing_violations(counts: Iterable[int], threshold: int = CELL_THRESHOLD) -> list[tuple[int, int]]:
    """Pairs of answered cumulative counts that are 1..threshold-1 apart: a small cell revealed."""
    distinct = sorted(set(counts))
    return [(a, b) for a, b in zip(distinct, distinct[1:], strict=False) if 0 < b - a < threshold]


def one_raw_node(make_nodes: Callable[..., list[Node]], raw: RawResearcher, **kw: Any) -> tuple[Node, str]:
    """Start one node holding the cohort, wait for it at the raw researcher; (node, cohort dataset id)."""
    (node,) = make_nodes(1, **kw)
    raw.wait_for_node(node.node_id)
    return node, raw.dataset_id(node.node_id)


def answered(ts: Sequence[float], below: Sequence[int | None] | None) -> list[tuple[float, int]]:
    """(threshold, count) for the thresholds the node answered."""
    if below is None:
        return []
    assert len(below) == len(ts), f"{len(below)} counts for {len(ts)} thresholds"
    return [(t, c) for t, c in zip(ts, below, strict=True) if c is not None]


def income_grid_point(values: Sequence[float], step: float, rank: int) -> float:
    """A multiple of ``step`` with exactly ``rank`` values at or below it, or the closest there is."""
    ordered = sorted(values)
    lo = math.ceil(ordered[rank - 1] / step) * step if rank > 0 else math.floor(ordered[0] / step) * step - step
    return float(lo)


def public(call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a public-API call; a FedlabError passes through (a refusal the test may expect), any
    other exception becomes a test failure that says it is the researcher side that broke."""
    import pytest

    from fedlab import FedlabError

    try:
        return call(*args, **kw)
    except FedlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported, with its type, as the failure
        pytest.fail(f"the public API raised {type(exc).__name__}: {exc} -- the researcher side broke on the "
                    "node's answer; this is not a verdict on the disclosure rule")
