"""Memory shared and reused between the node and its training worker: the node's arenas, lent with each round,
kept mappings on the worker's side, results in place. What must hold: every message reads its own data (never
a previous one's, nor a dead worker's), a result still held elsewhere (a reply queued in zmq) is never
overwritten by the next round, and a round's model crosses once each way at most (trained parameters not at all
on the way back)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest
import zmq
from plan_sources import LOGREG_PLAN

from fedlab.node.plan_worker import PlanWorker, WorkerDied
from fedlab.training.messages import NamedArray
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


def _lend_and_answer(a: socket.socket, b: socket.socket, arena: SharedArena, mapping: SharedMapping,
                     sent: list[np.ndarray], answer: object) -> tuple[list[memoryview], int]:
    """The node's side lends ``arena`` with ``sent``; the worker's side calls ``answer(arrays)`` on the frames it
    received (writable views of the node's file) and replies with the arrays it returns. The node's frames of the
    reply, and the bytes the worker had to write."""
    send_message(a, Ready(n_buffers=len(sent)), [x.data for x in sent], arena, lend=True)
    message, frames = recv_message(b, mapping)
    lent = mapping.take_lent()
    assert message.lent and lent is not None
    try:
        arrays = [np.frombuffer(f, x.dtype).reshape(x.shape) for f, x in zip(frames, sent, strict=True)]
        assert all(x.flags.writeable for x in arrays)  # the worker may train in them
        out = answer(arrays)  # type: ignore[operator]
        del arrays, frames
        send_message(b, Ready(n_buffers=len(out)), [x.data for x in out], into=lent)
        del out
        written = lent.written
    finally:
        lent.close()
    reply, back = recv_message(a, None, arena)
    assert reply.in_lent and reply.shared is not None
    return back, written


def test_frames_trained_in_place_come_back_without_a_copy_and_others_are_written_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    arena, mapping = SharedArena(), SharedMapping()
    try:
        sent = [np.full(100_000, 1.0), np.arange(7, dtype=np.int8), np.full(50_000, 3.0, np.float32)]

        def train(arrays: list[np.ndarray]) -> list[np.ndarray]:
            arrays[0] += 1.0  # in place, as an optimizer step
            arrays[2] *= 2.0
            return [arrays[0], arrays[2], np.full(20_000, 9.0)]  # the last one is new (an auxiliary variable)

        back, written = _lend_and_answer(a, b, arena, mapping, sent, train)
        assert written == 20_000 * 8  # only the new array was copied into the file
        assert np.array_equal(np.frombuffer(back[0]), np.full(100_000, 2.0))
        assert np.array_equal(np.frombuffer(back[1], np.float32), np.full(50_000, 6.0, np.float32))
        assert np.array_equal(np.frombuffer(back[2]), np.full(20_000, 9.0))
        assert arena.busy  # the node's views of its own file: nobody may write it now
        with pytest.raises(RuntimeError, match="still in use"):
            arena.put([memoryview(b"x")])
        del back
        assert not arena.busy
        back, _ = _lend_and_answer(a, b, arena, mapping, [np.full(100_000, 5.0)], lambda arrays: arrays)
        assert np.array_equal(np.frombuffer(back[0]), np.full(100_000, 5.0))  # this message's data, not the last
    finally:
        arena.close()
        mapping.close()


def test_small_round_frames_still_lend_the_file_for_a_large_reply(pair: tuple[socket.socket, socket.socket]) -> None:
    """A round whose frames go through the socket (a first round without parameters, say) can still get a
    model-sized reply back through the node's file."""
    a, b = pair
    arena, mapping = SharedArena(), SharedMapping()
    try:
        back, written = _lend_and_answer(a, b, arena, mapping, [np.arange(3.0)],
                                         lambda arrays: [arrays[0], np.full(300_000, 4.0)])
        assert written == 3 * 8 + 300_000 * 8  # the small frame was the worker's own (socket) memory
        assert np.array_equal(np.frombuffer(back[0]), np.arange(3.0))
        assert np.array_equal(np.frombuffer(back[1]), np.full(300_000, 4.0))
    finally:
        arena.close()
        mapping.close()


def test_a_reply_naming_frames_outside_the_lent_file_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    arena = SharedArena()
    try:
        arena.put([memoryview(bytes(100_000))])
        forged = Ready(n_buffers=1, shared=[100_000], offsets=[4096], in_lent=True)
        header = msgspec.msgpack.encode(forged)
        b.sendall(len(header).to_bytes(8, "little") + header)
        with pytest.raises(EOFError, match="past the end"):
            recv_message(a, None, arena)
    finally:
        arena.close()


def test_a_result_queued_in_zmq_keeps_its_arena_and_the_next_round_uses_another(csv: Path) -> None:
    """The node sends a reply's frames with copy=False: zmq holds them until sent, so their file stays off limits."""
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    worker = PlanWorker(node_name="unit", threads=1)
    try:
        sender.bind("inproc://reply")
        receiver.connect("inproc://reply")
        specs, frames = _frames(1.0)
        result, out = _run(worker, csv, specs, frames, "r1")
        sender.send_multipart(out, zmq.NOBLOCK, copy=False)  # not received yet: queued, referencing the file
        del out
        first = worker._arenas[0]
        assert first.busy
        got, _ = _round(worker, csv, 2.0, "r2")
        assert len(worker._arenas) == 2 and worker._arenas[0] is first  # the second arena took that round
        assert np.all(got["weight"] == 2.0)
        del got
        assert receiver.poll(10_000)
        weight = np.frombuffer(receiver.recv_multipart()[0], np.float32)
        assert np.all(weight == 1.0)  # the queued reply was not overwritten
        del weight
        deadline = time.monotonic() + 10
        while first.busy and time.monotonic() < deadline:  # pyzmq lets go of sent frames on its gc thread
            time.sleep(0.01)
        assert not first.busy
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        context.term()
        worker.close()


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "one-row.csv"
    pd.DataFrame({"x": [0.0]}).to_csv(path, index=False)
    return path


def _frames(value: float, n: int = N) -> tuple[list[NamedArray], list[memoryview]]:
    return pack_named({"weight": np.full((n, n), value, np.float32), "bias": np.full(n, value, np.float32)})


def _run(worker: PlanWorker, csv: Path, specs: list[NamedArray], frames: list[memoryview], job_id: str,
         n: int = N) -> tuple[RoundDone, list[memoryview]]:
    job = RunRound(job_id=job_id, n_buffers=len(frames), plan_id=plan_id(ECHO_PLAN), plan_source=ECHO_PLAN,
                   plan_class="Echo", dataset_id="d", data_type="csv", data_path=str(csv), model_args={"n": n},
                   training_args={"num_updates": 1, "batch_size": 1, "optimizer_args": {"lr": 0.0}}, params=specs)
    result, out = worker.run(job, frames, timeout=120, cancelled=threading.Event(), on_progress=lambda p: None)
    assert isinstance(result, RoundDone), result
    assert result.shared is not None and result.in_lent  # the test is about the shared memory path
    assert result.offsets == job.offsets  # trained in place: the reply names the very bytes the round was sent in
    return result, out


def _round(worker: PlanWorker, csv: Path, value: float, job_id: str, n: int = N
           ) -> tuple[dict[str, np.ndarray], RoundDone]:
    result, out = _run(worker, csv, *_frames(value, n), job_id, n)
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


def test_rounds_of_a_model_that_grows_and_shrinks_each_get_their_own_parameters(csv: Path) -> None:
    worker = PlanWorker(node_name="unit", threads=1)
    try:
        for value, n in ((1.0, N), (2.0, 900), (3.0, 300), (4.0, N)):
            got, _ = _round(worker, csv, value, f"n{n}", n)
            assert got["weight"].shape == (n, n) and np.all(got["weight"] == value) and np.all(got["bias"] == value)
            del got
        assert len(worker._arenas) == 1  # every reply was let go of before the next round: one file did
    finally:
        worker.close()


SCAFFOLD_PLAN = LOGREG_PLAN.replace("nn.Linear(model_args[\"n_features\"], 1)", """nn.Sequential(
            nn.Linear(model_args["n_features"], 600), nn.BatchNorm1d(600), nn.Linear(600, 1))""")


def test_worker_rounds_equal_local_rounds_to_the_bit_with_buffers_and_scaffold(tmp_path: Path) -> None:
    """The worker trains in the node's file (parameters adopted, Scaffold's c used in place, c_i+ and the
    control variate deltas written past the frames); a local run_round copies everything. Same bits."""
    import torch
    from sklearn.datasets import load_breast_cancer

    from fedlab.training.data import load_dataset
    from fedlab.training.loop import initial_params, run_round
    from fedlab.training.source import load_plan_class

    data = load_breast_cancer(as_frame=True).frame
    path = tmp_path / "cancer.csv"
    data.to_csv(path, index=False)
    plan_cls = load_plan_class(SCAFFOLD_PLAN, "LogReg")
    params = initial_params(plan_cls, {"n_features": 30})
    assert params["1.num_batches_tracked"].dtype == np.int64 and params["0.weight"].nbytes > 64_000
    c = {name: np.full_like(value, 0.01) for name, value in params.items() if value.dtype == np.float32}
    args = {"training_args": {"epochs": 1, "batch_size": 50, "optimizer_args": {"lr": 0.1}},
            "aggregator_args": {"name": "scaffold"}, "model_args": {"n_features": 30}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: another thread count sums in another order
    try:
        local = run_round(plan_cls, load_dataset("csv", str(path)), round=1, params=params,
                          aux_vars={"scaffold": c}, **args)
    finally:
        torch.set_num_threads(threads)
    specs, frames = pack_named(params)
    aux_specs, aux_frames = pack_named(c, first_buffer=len(frames))
    job = RunRound(job_id="s", n_buffers=len(frames) + len(aux_frames), plan_id=plan_id(SCAFFOLD_PLAN),
                   plan_source=SCAFFOLD_PLAN, plan_class="LogReg", dataset_id="d", data_type="csv",
                   data_path=str(path), params=specs, aux_vars={"scaffold": aux_specs}, round=1, **args)
    worker = PlanWorker(node_name="unit", threads=1)
    try:
        result, out = worker.run(job, frames + aux_frames, timeout=120, cancelled=threading.Event(),
                                 on_progress=lambda p: None)
        assert isinstance(result, RoundDone) and result.in_lent, result
        got = unpack_named(result.params, out)
        assert set(got) == set(local.params)
        for name, value in local.params.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        assert int(got["1.num_batches_tracked"]) == local.n_updates
        aux = unpack_named(result.aux_vars["scaffold"], out)
        assert set(aux) == set(local.aux_vars["scaffold"])
        assert all(np.array_equal(aux[k], v) for k, v in local.aux_vars["scaffold"].items())
        assert result.offsets is not None and job.offsets is not None
        assert result.offsets[:len(specs)] == job.offsets[:len(specs)]  # the parameters: in place
        assert min(result.offsets[len(specs):]) >= job.offsets[-1]  # the deltas: past the round's frames
    finally:
        worker.close()
