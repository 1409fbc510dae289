"""The node <-> training worker protocol, the plan import guard, and the node's handle on the worker process
(deadline, cancel, a worker killed from outside), without a node around it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from plan_sources import LOGREG_PLAN
from sklearn.datasets import load_breast_cancer

from fedlab.node.plan_worker import PlanWorker, WorkerDied, WorkerTimeout
from fedlab.training.source import plan_id
from fedlab.training.tensors import pack_named, unpack_named
from fedlab.training.worker_wire import (
    Failed,
    Ready,
    RoundDone,
    RoundProgress,
    RunRound,
    SharedArena,
    recv_message,
    send_message,
)

PLAN = LOGREG_PLAN


# --- the wire ---------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_round_and_its_frames_cross_the_pair_unchanged(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5], dtype=np.float64)}
    specs, frames = pack_named(params)
    job = RunRound(job_id="j1", n_buffers=len(frames), plan_id="ab" * 32, plan_source="x = 1\n", plan_class="P",
                   round=3, model_args={"n": 2}, training_args={"epochs": 1}, params=specs, state=b"\x00\x01")
    sender = threading.Thread(target=send_message, args=(a, job, frames))  # the pair's buffer is small
    sender.start()
    got, buffers = recv_message(b)
    sender.join(5)
    assert got == job
    assert isinstance(got, RunRound)
    out = unpack_named(got.params, buffers)
    assert set(out) == {"w", "b"} and all(np.array_equal(out[k], params[k]) for k in params)
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float64


def test_large_frames_go_through_shared_memory_and_arrive_unchanged(pair: tuple[socket.socket, socket.socket]
                                                                    ) -> None:
    a, b = pair
    params = {"big": np.random.default_rng(0).standard_normal((600, 600)), "small": np.arange(3.0)}  # ~2.9 MB
    specs, frames = pack_named(params)
    send_message(a, RoundDone(job_id="j", n_buffers=len(frames), params=specs), frames)  # no reader needed: fd
    got, buffers = recv_message(b)
    assert isinstance(got, RoundDone) and got.shared == [params["big"].nbytes, params["small"].nbytes]
    out = unpack_named(got.params, buffers)
    assert np.array_equal(out["big"], params["big"]) and np.array_equal(out["small"], params["small"])
    send_message(a, Ready())  # the stream stays in step after a shared message
    assert recv_message(b) == (Ready(), [])


def test_an_arena_is_reused_for_successive_messages(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    arena = SharedArena()
    try:
        for value in (1.0, 2.0):
            frames = [np.full(300_000, value).data]  # 2.4 MB
            send_message(a, Ready(n_buffers=1), frames, arena)
            got, buffers = recv_message(b)
            assert np.array_equal(np.frombuffer(buffers[0]), np.full(300_000, value))
            del buffers  # the receiver is done before the next message, as the node and its worker are
    finally:
        arena.close()


def test_every_message_type_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    for message in (Ready(torch_version="2.0", threads=2, seconds=1.5),
                    RoundProgress(job_id="j", phase="training", epoch=1, n_epochs=2, iteration=3, n_iterations=4,
                                  loss=0.5),
                    RoundDone(job_id="j", n_samples=10, metrics_after={"loss": 0.1}, state=None, loaded=["plan"]),
                    Failed(job_id="j", error="FedlabDatasetError", message="gone")):
        send_message(a, message)
        assert recv_message(b) == (message, [])


def test_frame_count_must_match_and_a_closed_peer_is_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="announces 2 buffers, 0 given"):
        send_message(a, RunRound(n_buffers=2))
    a.close()
    with pytest.raises(EOFError):
        recv_message(b)


def test_a_header_no_peer_would_send_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall((1 << 40).to_bytes(8, "little"))
    with pytest.raises(EOFError, match="not speaking this protocol"):
        recv_message(b)


# --- the import guard -------------------------------------------------------------------------


def test_import_guard_refuses_the_nodes_modules_and_nothing_else(tmp_path: Path) -> None:
    """In a fresh interpreter (the guard is process-wide), the way the worker installs it."""
    code = """
import importlib, sys
import fedlab.node.config  # imported before: forgotten by install()
from fedlab.training import import_guard
import_guard.install()
import_guard.install()  # once
assert sum(isinstance(f, import_guard.NodeApiGuard) for f in sys.meta_path) == 1
assert not [m for m in sys.modules if m.startswith("fedlab.node")]
import fedlab
for name in ("fedlab.node.config", "fedlab.node.registry", "fedlab.cli", "fedlab.cli_node",
             "fedlab.cli_researcher", "fedlab.researcher", "fedlab.transport.zmq_node", "fedlab.notebook"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        assert "training plans cannot import" in str(exc), exc
    else:
        raise AssertionError(name + " was imported")
try:
    fedlab.Researcher
except ImportError as exc:
    assert "fedlab.researcher" in str(exc)
else:
    raise AssertionError("fedlab.Researcher was reachable")
assert not hasattr(fedlab, "node")
import fedlab.training.loop, fedlab.training.source, fedlab.protocol, fedlab.errors  # what plans may use
assert import_guard._blocked("fedlab.nodes") is None and import_guard._blocked("fedlab.node.x") == "fedlab.node"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- the worker process, through the node's handle ----------------------------------------------


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "bc.csv"
    load_breast_cancer(as_frame=True).frame.iloc[:100].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def worker() -> Iterator[PlanWorker]:
    """One warm worker for the tests below (started once: torch takes seconds to import)."""
    handle = PlanWorker(node_name="unit", threads=1, cancel_grace=1.0)
    yield handle
    handle.close()


def job(csv: Path, source: str = PLAN, job_id: str = "job", **training_args: object) -> RunRound:
    return RunRound(job_id=job_id, plan_id=plan_id(source), plan_source=source, plan_class="LogReg",
                    dataset_id="dataset-1", data_type="csv", data_path=str(csv), model_args={"n_features": 30},
                    training_args={"epochs": 1, "batch_size": 20, **training_args})


def run(worker: PlanWorker, round_: RunRound, *, timeout: float = 120.0, cancelled: threading.Event | None = None,
        progress: list[RoundProgress] | None = None) -> RoundDone | Failed:
    result, _ = worker.run(round_, (), timeout=timeout, cancelled=cancelled or threading.Event(),
                           on_progress=(progress if progress is not None else []).append)
    return result


def test_a_round_in_the_worker_returns_parameters_and_progress(worker: PlanWorker, csv: Path) -> None:
    progress: list[RoundProgress] = []
    result, frames = worker.run(job(csv, progress_interval=0.0), (), timeout=120, cancelled=threading.Event(),
                                on_progress=progress.append)
    assert isinstance(result, RoundDone), result
    assert worker.ready is not None and worker.ready.threads == 1 and worker.pid != os.getpid()
    params = unpack_named(result.params, frames)
    assert params["weight"].shape == (1, 30) and np.isfinite(params["weight"]).all()
    assert result.n_samples == 100 and result.n_updates == 5 and result.state is None  # plain SGD keeps nothing
    assert [p.iteration for p in progress] == [1, 2, 3, 4, 5] and all(p.job_id == "job" for p in progress)


def test_a_plan_error_comes_back_as_failed_and_the_worker_stays(worker: PlanWorker, csv: Path) -> None:
    source = PLAN.replace("time.sleep(self.delay)", "raise ValueError('bad labels')")
    pid = worker.pid
    result = run(worker, job(csv, source))
    assert isinstance(result, Failed) and result.error == "FedlabTrainingError"
    assert "ValueError: bad labels" in result.message and "plan line" in result.message
    missing = run(worker, msgspec.structs.replace(job(csv), data_path=str(csv) + ".gone"))
    assert isinstance(missing, Failed) and missing.error == "FedlabDatasetError" and "dataset-1" in missing.message
    assert worker.pid == pid


def test_a_round_past_its_deadline_kills_the_worker_and_the_next_starts_another(worker: PlanWorker,
                                                                                csv: Path) -> None:
    source = PLAN.replace("delay = 0.0", "delay = 1000.0")
    before = worker.pid
    with pytest.raises(WorkerTimeout):
        run(worker, job(csv, source), timeout=1.0)
    assert worker.pid is None
    assert isinstance(run(worker, job(csv)), RoundDone)
    assert worker.pid is not None and worker.pid != before


def test_cancel_stops_at_the_next_iteration_or_kills_after_the_grace(worker: PlanWorker, csv: Path) -> None:
    cancelled = threading.Event()
    cancelled.set()
    worker.start()
    pid = worker.pid
    stopped = run(worker, job(csv, PLAN.replace("delay = 0.0", "delay = 0.01")), cancelled=cancelled)
    assert isinstance(stopped, Failed) and stopped.error == "FedlabRequestStopped"
    assert worker.pid == pid  # the plan honoured it: the worker lives on
    stuck_plan = PLAN.replace("time.sleep(self.delay)",
                              "type(self).steps += 1\n        time.sleep(1000 if self.steps > 1 else 0)",
                              ).replace("delay = 0.0", "steps = 0")
    late = threading.Event()  # set after the first step: the plan is then stuck in its second
    stuck, _ = worker.run(job(csv, stuck_plan, progress_interval=0.0), (), timeout=120, cancelled=late,
                          on_progress=lambda p: (time.sleep(0.5), late.set()))  # let it get stuck
    assert isinstance(stuck, Failed) and stuck.error == "FedlabRequestStopped"
    assert "did not stop within 1 s" in stuck.message and worker.pid is None


def test_a_worker_killed_from_outside_is_reported_and_replaced(worker: PlanWorker, csv: Path) -> None:
    worker.start()
    pid = worker.pid
    assert pid is not None
    progress: list[RoundProgress] = []

    def kill_at_first_progress(p: RoundProgress) -> None:
        progress.append(p)
        if len(progress) == 1:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(WorkerDied, match="killed by signal SIGKILL"):
        worker.run(job(csv, PLAN.replace("delay = 0.0", "delay = 0.05"), epochs=100, progress_interval=0.0), (),
                   timeout=120, cancelled=threading.Event(), on_progress=kill_at_first_progress)
    assert isinstance(run(worker, job(csv)), RoundDone)
    assert worker.pid not in (None, pid)

