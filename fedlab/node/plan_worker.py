"""The node's handle on its training worker process: start it, give it a round, wait with a deadline, kill it.

Training plans run in ``fedlab.training.worker``, a separate process, so that a plan stuck in
``while True: pass`` can be stopped (killed) and the node keeps serving, and so that a plan
shares nothing of the node's memory. The worker is started as a fresh interpreter (never
a fork: the node runs zmq threads) at the first training message and kept warm for the
next rounds; after it is killed, or dies, the next round starts another.

``run`` is called from the node's one training thread, so one round at a time. While it
waits it forwards the worker's progress events, watches the request's cancel flag (passed on
as a ``Cancel`` message, which the training loop sees at its next iteration; a plan that does
not stop within ``cancel_grace`` seconds is killed) and the round's deadline (past it, the worker
is killed).

A round's parameters cross to the worker and back in a memory file of the node's (an arena,
``fedlab.training.worker_wire.SharedArena``), lent with the round: the node copies the received
frames into it (the one copy in), the worker trains the model in those very bytes, and the
result's frames are views of the node's own mapping of the file, handed to the network as they
are (no copy out, but for what the worker had to write there). The network holds those views
until the reply is sent, so an arena is reused only once they are all gone: the node keeps two,
used alternately when a reply is still queued as the next round starts, and a third, dropped
after its round, when both are. A round on a GPU copies the frames to the device and the trained
parameters back into the same frames (``fedlab.training.placement``): they stay in place all the same.
The worker is started with the node's ``device`` setting, so that a GPU the node always trains on is
set up with torch, before the first round.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from fedlab.errors import FedlabConfigError, FedlabTrainingError
from fedlab.training.worker_wire import (
    Cancel,
    DPGo,
    DPPlanned,
    Failed,
    Ready,
    RoundDone,
    RoundProgress,
    RunRound,
    SharedArena,
    WorkerMessage,
    recv_message,
    send_message,
)

__all__ = ["PlanWorker", "WorkerDied", "WorkerTimeout"]

log = logging.getLogger("fedlab.node")
_POLL_S = 0.1  # how often a waiting round looks at its cancel flag
_STOP_WAIT_S = 10.0
_KEEP_ARENAS = 2  # memory files kept for rounds: one in use, one while the last reply is still being sent


class WorkerTimeout(Exception):
    """The round ran past its deadline; the worker was killed."""


class WorkerDied(Exception):
    """The worker ended during a round (killed from outside, out of memory, a crash)."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode
        if returncode is not None and returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        elif returncode is None:
            how = "stopped answering"
        else:
            how = f"exited with status {returncode}"
        super().__init__(how)


class PlanWorker:
    """One warm training worker process, started on demand and replaced after it is killed."""

    def __init__(self, *, node_name: str, threads: int = 0, start_timeout: float = 300.0,
                 cancel_grace: float = 5.0, device: str = "auto") -> None:
        self.node_name = node_name
        self.threads = threads
        self.device = device  # the node's device setting; a GPU it names is warmed up with torch
        self.start_timeout = start_timeout
        self.cancel_grace = cancel_grace
        self.ready: Ready | None = None
        self.loads: dict[str, int] = {"plan": 0, "dataset": 0}  # what workers (re)loaded, for the log and tests
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._scratch: str | None = None
        self._arenas: list[SharedArena] = []  # the rounds' memory files, kept (see the module's docstring)
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> Ready:
        """Start the worker unless one is running, and wait until torch is loaded in it."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self.ready is not None:
                return self.ready
            self._discard()
            ours, theirs = socket.socketpair()
            self._scratch = tempfile.mkdtemp(prefix="fedlab-plan-")
            command = [sys.executable, "-m", "fedlab.training.worker", "--fd", str(theirs.fileno()),
                       "--parent", str(os.getpid()), "--name", self.node_name, "--threads", str(self.threads),
                       "--device", self.device]
            try:
                self._proc = subprocess.Popen(command, pass_fds=(theirs.fileno(),), cwd=self._scratch,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                ours.close()
                raise FedlabConfigError(
                    f"node {self.node_name} cannot start its training worker ({exc.strerror or exc})") from exc
            finally:
                theirs.close()
            self._sock = ours
            started = time.monotonic()
            try:
                message, _ = self._receive(started + self.start_timeout)
            except (EOFError, WorkerTimeout) as exc:
                code = self._kill()
                raise FedlabConfigError(
                    f"the training worker of node {self.node_name} did not start ({WorkerDied(code)}): "
                    "its error is in the node's log; the node's operator checks that torch imports in the "
                    "node's Python environment") from exc
            assert isinstance(message, Ready), message
            self.ready = message
            gpus = "" if self.device == "cpu" else (
                f", {message.cuda_devices} CUDA GPU{'' if message.cuda_devices == 1 else 's'} seen")
            log.info("torch %s loaded for training in %.1f s, in training worker process %d (%d threads, device = "
                     "%s%s)", message.torch_version, message.seconds, self._proc.pid, message.threads, self.device,
                     gpus)
            if self.device.startswith("cuda") and int(self.device.partition(":")[2] or 0) >= message.cuda_devices:
                log.warning("config.toml sets device = %r, but torch sees %d CUDA GPU%s: training rounds will fail "
                            "until device is \"auto\" or \"cpu\", or the GPU is usable", self.device,
                            message.cuda_devices, "" if message.cuda_devices == 1 else "s")
            return message

    def run(self, job: RunRound, buffers: Sequence[bytes | memoryview], *, timeout: float,
            cancelled: threading.Event, on_progress: Callable[[RoundProgress], None],
            on_dp_plan: Callable[[int], None] | None = None) -> tuple[RoundDone | Failed, list[memoryview]]:
        """One round in the worker: its result or failure. ``WorkerTimeout`` past ``timeout`` seconds and
        ``WorkerDied`` if the worker ends meanwhile (killed then; the next ``run`` starts a fresh one).
        A cancel the plan has not honoured within ``cancel_grace`` kills the worker and returns a ``Failed``.

        A DP round asks, before its first step, whether the node's budget pays for it (``DPPlanned``):
        ``on_dp_plan(n_train)`` answers by returning, or refuses by raising; the refusal is what this
        method raises once the worker has given the round up."""
        self.start()
        arena = self._free_arena()
        try:
            return self._run(job, buffers, arena, timeout, cancelled, on_progress, on_dp_plan)
        finally:
            if not arena.kept:
                arena.close()  # frames of it still being sent keep their mapping until they go

    def _run(self, job: RunRound, buffers: Sequence[bytes | memoryview], arena: SharedArena, timeout: float,
             cancelled: threading.Event, on_progress: Callable[[RoundProgress], None],
             on_dp_plan: Callable[[int], None] | None) -> tuple[RoundDone | Failed, list[memoryview]]:
        assert self._sock is not None and self._proc is not None
        deadline = time.monotonic() + timeout
        try:
            send_message(self._sock, job, buffers, arena, lend=True)  # the one copy of the parameters in
        except OSError as exc:
            raise WorkerDied(self._kill()) from exc
        kill_at: float | None = None
        refusal: Exception | None = None  # why the node refused the DP round the worker asked about
        while True:
            if cancelled.is_set() and kill_at is None:
                kill_at = time.monotonic() + self.cancel_grace
                try:
                    send_message(self._sock, Cancel(job_id=job.job_id))
                except OSError:
                    pass  # the worker is gone: the receive below says so
            if kill_at is not None and time.monotonic() >= kill_at:
                self._kill()
                return Failed(job_id=job.job_id, error="FedlabRequestStopped", message=(
                    f"training cancelled on node {self.node_name}; the plan did not stop within "
                    f"{self.cancel_grace:g} s, so its worker process was stopped")), []
            limit = deadline if kill_at is None else min(deadline, kill_at)
            try:
                message, frames = self._receive(min(limit, time.monotonic() + _POLL_S), arena)
            except (EOFError, OSError, ValueError) as exc:  # closed: the worker died, or the node is stopping
                raise WorkerDied(self._kill()) from exc
            except WorkerTimeout:
                if time.monotonic() >= deadline:
                    self._kill()
                    raise
                continue
            if isinstance(message, RoundProgress):
                on_progress(message)
            elif isinstance(message, DPPlanned) and message.job_id == job.job_id:
                refusal = self._dp_answer(job, message, on_dp_plan)
            elif isinstance(message, RoundDone | Failed) and message.job_id == job.job_id:
                if refusal is not None:
                    raise refusal
                if isinstance(message, RoundDone):
                    for what in message.loaded:
                        self.loads[what] = self.loads.get(what, 0) + 1
                return message, frames  # views of the arena, when large: it stays busy until they are gone

    def _dp_answer(self, job: RunRound, planned: DPPlanned, on_dp_plan: Callable[[int], None] | None
                   ) -> Exception | None:
        """Run the node's budget check for a DP round and tell the worker to go on or give up; the refusal."""
        refusal: Exception | None = None
        try:
            if on_dp_plan is None:
                raise FedlabTrainingError(f"node {self.node_name} did not expect a DP round here")
            on_dp_plan(planned.n_train)
        except Exception as exc:  # the worker must hear back whatever happened, or it waits for nothing
            refusal = exc
        assert self._sock is not None
        try:
            send_message(self._sock, DPGo(job_id=job.job_id, go=refusal is None))
        except OSError:
            pass  # the worker is gone: the next receive says so
        return refusal

    def close(self) -> None:
        """Stop the worker (the node is shutting down), without waiting for a start in progress."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # a start waiting for torch to load sees the end at once and gives up the lock
        with self._lock:
            self._discard()
            for arena in self._arenas:
                arena.close()
            self._arenas = []

    # -- internals ---------------------------------------------------------------------------
    def _free_arena(self) -> SharedArena:
        """A memory file no frame of an earlier reply is still using: a kept one if there is, else one
        for this round only (kept, while fewer than ``_KEEP_ARENAS`` are)."""
        for arena in self._arenas:
            if not arena.busy:
                return arena
        arena = SharedArena(kept=len(self._arenas) < _KEEP_ARENAS)
        if arena.kept:
            self._arenas.append(arena)
        return arena

    def _receive(self, deadline: float, arena: SharedArena | None = None) -> tuple[WorkerMessage, list[memoryview]]:
        """The next message; ``WorkerTimeout`` if none starts before ``deadline``. A message that has
        started arriving is read to its end (the worker writes each in one go). Large frames are views
        of ``arena``, the file lent with the round."""
        assert self._sock is not None
        remaining = max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([self._sock], [], [], remaining)
        if not readable:
            raise WorkerTimeout()
        return recv_message(self._sock, None, arena)

    def _kill(self) -> int | None:
        """Kill the worker now (SIGKILL: a hung plan ignores everything else); its exit status."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                code = self._proc.wait(_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("training worker %d did not end after SIGKILL", self._proc.pid)
            else:
                log.info("training worker %d ended (%s)", self._proc.pid, WorkerDied(code))
        self._proc = None
        self.ready = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        return code

    def _discard(self) -> None:
        if self._proc is not None or self._sock is not None:
            self._kill()
