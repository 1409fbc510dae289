"""Memory reused between the node and its training worker: kept mappings on both sides, the node's result
buffers. What must hold: every message reads its own data (never a previous one's, nor a dead worker's),
and a result still held elsewhere (a reply queued in zmq) is never overwritten by the next round."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zmq

from fedlab.node.plan_worker import PlanWorker, ResultCopies, WorkerDied
from fedlab.training.source import plan_id
from fedlab.training.tensors import pack_named, unpack_named
from fedlab.training.worker_wire import (
    Ready,
    RoundDone,
    RunRound,
    SharedArena,
    SharedMapping,
    recv_message,
    send_message,
)

ECHO_PLAN = '''import numpy as np
from torch import nn
from fedlab.training import TorchTrainingPlan


class Echo(TorchTrainingPlan):
    """One linear layer and a learning rate of 0: the parameters come back as they were sent."""

    def init_model(self, model_args):
        return nn.Linear(model_args["n"], model_args["n"])

    def training_data(self, dataset):
        n = self.model.in_features
        return np.zeros((len(dataset), n), dtype=np.float32), np.zeros((len(dataset), n), dtype=np.float32)

    def training_step(self, data, target):
        return ((self.model(data) - target) ** 2).mean()
'''
N = 600  # 600 x 600 float32: 1.4 MB, through the shared memory files


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send(a: socket.socket, value: float, size: int, arena: SharedArena) -> None:
    send_message(a, Ready(n_buffers=1), [np.full(size, value).data], arena)


def test_a_kept_mapping_is_reused_for_the_same_file_and_reads_each_messages_data(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    arena, mapping = SharedArena(), SharedMapping()
    try:
        seen = []
        for value, size in ((1.0, 300_000), (2.0, 300_000), (3.0, 200_000), (4.0, 500_000)):  # the last grows it
            _send(a, value, size, arena)
            _, buffers = recv_message(b, mapping)
            assert np.array_equal(np.frombuffer(buffers[0]), np.full(size, value))
            seen.append(buffers[0].obj)
            del buffers
        assert seen[0] is seen[1] is seen[2]  # one mapping for the first three messages
        assert seen[3] is not seen[0]  # the file grew past the mapping: mapped again
        other = SharedArena()  # another sender's file (a respawned worker): its own data, not the kept mapping's
        try:
            _send(a, 5.0, 300_000, other)
            _, buffers = recv_message(b, mapping)
            assert buffers[0].obj is not seen[3] and np.array_equal(np.frombuffer(buffers[0]), np.full(300_000, 5.0))
        finally:
            other.close()
    finally:
        arena.close()
        mapping.close()


def test_closing_a_mapping_leaves_frames_still_held_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    arena, mapping = SharedArena(), SharedMapping()
    try:
        _send(a, 7.0, 300_000, arena)
        _, buffers = recv_message(b, mapping)
        mapping.close()  # must not raise, nor unmap under the frame
        assert np.array_equal(np.frombuffer(buffers[0]), np.full(300_000, 7.0))
    finally:
        arena.close()


def test_a_result_buffer_is_reused_only_once_no_frame_of_it_is_alive() -> None:
    copies = ResultCopies()
    first = copies.copy([memoryview(b"abc"), memoryview(b"de")])
    second = copies.copy([memoryview(b"xyz")])
    assert copies.reused == 0 and [bytes(f) for f in first] == [b"abc", b"de"]  # both held: fresh memory
    del first
    third = copies.copy([memoryview(b"12")])
    assert copies.reused == 1 and bytes(third[0]) == b"12" and bytes(second[0]) == b"xyz"


def test_a_result_queued_in_zmq_is_not_overwritten_by_the_next_round() -> None:
    """The node sends a reply's frames with copy=False: zmq holds them until sent, so they stay off limits."""
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        sender.bind("inproc://reply")
        receiver.connect("inproc://reply")
        copies = ResultCopies()
        payload = np.full(200_000, 1.0).data.cast("B")  # above pyzmq's copy threshold: really zero-copy
        frames = copies.copy([payload])
        sender.send_multipart(frames, zmq.NOBLOCK, copy=False)  # not received yet: queued, referencing the buffer
        del frames
        again = copies.copy([np.full(200_000, 2.0).data.cast("B")])
        assert copies.reused == 0  # the queued reply's buffer was not handed out again
        assert receiver.poll(10_000)
        assert np.array_equal(np.frombuffer(receiver.recv()), np.full(200_000, 1.0))
        assert np.array_equal(np.frombuffer(again[0]), np.full(200_000, 2.0))
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        context.term()


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "one-row.csv"
    pd.DataFrame({"x": [0.0]}).to_csv(path, index=False)
    return path


def _round(worker: PlanWorker, csv: Path, value: float, job_id: str) -> tuple[dict[str, np.ndarray], RoundDone]:
    specs, frames = pack_named({"weight": np.full((N, N), value, np.float32), "bias": np.full(N, value, np.float32)})
    job = RunRound(job_id=job_id, n_buffers=len(frames), plan_id=plan_id(ECHO_PLAN), plan_source=ECHO_PLAN,
                   plan_class="Echo", dataset_id="d", data_type="csv", data_path=str(csv), model_args={"n": N},
                   training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}}, params=specs)
    result, out = worker.run(job, frames, timeout=120, cancelled=threading.Event(), on_progress=lambda p: None)
    assert isinstance(result, RoundDone), result
    assert result.shared is not None  # the test is about the shared memory path
    return unpack_named(result.params, out), result


def test_every_round_gets_its_own_parameters_back_across_rounds_and_a_killed_worker(csv: Path) -> None:
    worker = PlanWorker(node_name="unit", threads=1)
    try:
        held, _ = _round(worker, csv, 1.0, "r1")  # held, like a reply not sent yet
        for i, value in enumerate((2.0, 3.0)):
            got, _ = _round(worker, csv, value, f"r{i + 2}")
            assert np.all(got["weight"] == value) and np.all(got["bias"] == value)
        assert np.all(held["weight"] == 1.0) and np.all(held["bias"] == 1.0)  # never overwritten
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            _round(worker, csv, 4.0, "r4")
        got, _ = _round(worker, csv, 5.0, "r5")  # a fresh worker: its own file, nothing of the dead one's
        assert worker.pid not in (None, pid)
        assert np.all(got["weight"] == 5.0) and np.all(got["bias"] == 5.0)
    finally:
        worker.close()
