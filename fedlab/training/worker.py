"""The training worker: a separate process that runs a node's training rounds, one at a time.

A node starts it (``python -m fedlab.training.worker --fd N``, a fresh interpreter, never a
fork of the node with its zmq threads) at its first training message and keeps it warm:
torch is imported once, a plan class is compiled once per plan id, a dataset read once per
file version. The node can therefore kill it at any time (a plan past the node's
``training_timeout``, a cancel the plan ignores) and start another for the next round.

What the worker gets is what a round needs and nothing more: the plan source (already
approved by the node), its arguments, the parameters and the kept state as bytes, and the
dataset's type and path. It reads the dataset itself from that path, so a table is not
copied through the socket every round and an image folder stays lazy. It never opens the
node's database or config, its working directory is a scratch directory, and
``fedlab.training.import_guard`` refuses the node's own modules to the plan. A reader thread
takes the node's messages while a round runs, so a ``Cancel`` for that round is seen by the
training loop at its next iteration. The worker ends when the node closes its socket or dies.

A DP round (``dp_args``) asks the node, before its first step, whether its privacy budget pays for the
round on that many rows (``DPPlanned``), and trains only once the node said go (``DPGo``): the reader
thread hands the answer over.

A round trains on the device the node's ``device`` setting (sent with every round) and its ``use_gpu``
choose (``fedlab.training.device``); a GPU the setting names is set up at warm-up, so that its first
round does not pay for CUDA's start.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from fedlab.errors import (
    FedlabDatasetError,
    FedlabDisclosureError,
    FedlabError,
    FedlabProtocolError,
    FedlabRequestStopped,
    FedlabTrainingError,
)
from fedlab.training.worker_wire import (
    Cancel,
    DPGo,
    DPPlanned,
    Failed,
    LentFile,
    Ready,
    RoundDone,
    RoundProgress,
    RunRound,
    SharedMapping,
    recv_message,
    send_message,
)

__all__ = ["Worker", "main"]

_PLAN_CACHE = 16  # plan classes kept loaded
_DATA_CACHE = 4  # datasets kept in memory
_PARENT_CHECK_S = 1.0
_DP_ANSWER_S = 300.0  # the node answers a DP round's budget check at once; this is for a node gone astray
_POLL_S = 0.1


class Worker:
    """Runs ``RunRound`` messages from ``sock`` and answers each with ``RoundDone`` or ``Failed``."""

    def __init__(self, sock: socket.socket, *, node_name: str, threads: int = 0, device: str = "auto") -> None:
        self.sock = sock
        self.node_name = node_name
        self.threads = threads
        self.device = device  # the node's device setting: a GPU it names is warmed up with the rest
        self._cancelled: set[str] = set()  # job ids; cleared after every round, so a late cancel stays harmless
        self._params = SharedMapping()  # the node's arenas, each mapped once (the reader thread's alone)
        self._plans: OrderedDict[tuple[str, str], type] = OrderedDict()
        self._data: OrderedDict[str, tuple[tuple[int, int], Any]] = OrderedDict()
        self._dp_answers: dict[str, bool] = {}  # job id -> the node's answer to its DP budget check
        self._dp_answered = threading.Condition()

    def warm_up(self) -> Ready:
        """Import torch and the loop and take one tiny optimizer step, so the first round is as fast as the next."""
        started = time.monotonic()
        import torch
        import torch.utils.data

        import fedlab.training.loop  # noqa: F401
        import fedlab.training.source  # noqa: F401
        import fedlab.training.state  # noqa: F401

        if self.threads:
            torch.set_num_threads(self.threads)
        weight = torch.zeros(2, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=0.1)
        (weight * weight).sum().backward()
        optimizer.step()
        batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2,
                                              shuffle=True, generator=torch.Generator().manual_seed(0))
        for _ in batches:
            pass
        cuda_devices = torch.cuda.device_count() if self.device != "cpu" else 0
        if self.device.startswith("cuda") and int(self.device.partition(":")[2] or 0) < cuda_devices:
            self._warm_gpu(torch.device(self.device))
        return Ready(torch_version=str(torch.__version__), threads=torch.get_num_threads(),
                     seconds=time.monotonic() - started, cuda_devices=cuda_devices)

    @staticmethod
    def _warm_gpu(device: Any) -> None:
        """Set up CUDA on the GPU every round of this node trains on (its context costs a second or more)."""
        import torch

        weight = torch.zeros(2, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=0.1)
        (weight * weight).sum().backward()
        optimizer.step()
        torch.cuda.synchronize(device)

    def serve(self) -> None:
        """Answer rounds until the node closes the socket.

        A round's model is built over the frames of the node's memory file lent with it, and the
        reply's large frames go in that file (in place, or written once past the round's frames):
        nothing of the round may hold on to that memory once the reply is sent, since the node
        writes the file again for a later round (see ``fedlab.training.worker_wire``).
        """
        jobs: queue.Queue[tuple[RunRound, list[memoryview], LentFile | None] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(jobs,), name="fedlab-worker-reader", daemon=True).start()
        while (item := jobs.get()) is not None:
            job, buffers, lent = item
            del item
            try:
                reply, out = self.run(job, buffers)
                del buffers
                self._cancelled.clear()
                with self._dp_answered:
                    self._dp_answers.clear()
                send_message(self.sock, reply, out, into=lent)
                del out, reply  # the model's memory (the node's file): let it go with the round
            finally:
                if lent is not None:
                    lent.close()

    def _read(self, jobs: queue.Queue[tuple[RunRound, list[memoryview], LentFile | None] | None]) -> None:
        """The node's messages: rounds go to the queue, cancels are noted at once."""
        try:
            while True:
                message, buffers = recv_message(self.sock, self._params)
                lent = self._params.take_lent()
                if isinstance(message, RunRound):
                    jobs.put((message, buffers, lent))
                else:
                    if lent is not None:
                        lent.close()
                    if isinstance(message, Cancel):
                        self._cancelled.add(message.job_id)
                        with self._dp_answered:
                            self._dp_answered.notify_all()
                    elif isinstance(message, DPGo):
                        with self._dp_answered:
                            self._dp_answers[message.job_id] = message.go
                            self._dp_answered.notify_all()
        except (EOFError, OSError):
            jobs.put(None)

    def run(self, job: RunRound, buffers: list[memoryview]) -> tuple[RoundDone | Failed, list[memoryview]]:
        try:
            return self._run(job, buffers)
        except FedlabProtocolError as exc:
            return Failed(job_id=job.job_id, error=type(exc).__name__, code=exc.code, message=str(exc)), []
        except FedlabError as exc:
            return Failed(job_id=job.job_id, error=type(exc).__name__, message=str(exc)), []
        except Exception as exc:  # a bug of ours: still one clear reply, the worker keeps serving
            return Failed(job_id=job.job_id, error="FedlabError",
                          message=f"the training worker of node {self.node_name} failed: "
                                  f"{type(exc).__name__}: {exc}"), []

    def _run(self, job: RunRound, buffers: list[memoryview]) -> tuple[RoundDone, list[memoryview]]:
        from fedlab.training.loop import Progress, run_round
        from fedlab.training.state import decode_state, encode_state
        from fedlab.training.tensors import pack_named, unpack_named

        loaded: list[str] = []
        dataset = self._dataset(job, loaded)
        plan_cls = self._plan_class(job, loaded)
        state_arrays, state_meta = decode_state(job.state) if job.state is not None else (None, None)
        # the frames are this round's alone (the node's file, lent for it): the model is built over them
        params = unpack_named(job.params, buffers, writable=True) if job.params else None
        aux_vars = {name: unpack_named(specs, buffers, writable=True) for name, specs in job.aux_vars.items()}

        def progress(p: Progress) -> None:
            send_message(self.sock, RoundProgress(
                job_id=job.job_id, phase=p.phase, epoch=p.epoch, n_epochs=p.n_epochs, iteration=p.iteration,
                n_iterations=p.n_iterations, loss=p.loss))

        result = run_round(
            plan_cls, dataset, round=job.round, model_args=dict(job.model_args),
            training_args=dict(job.training_args), params=params, aggregator_args=dict(job.aggregator_args),
            aux_vars=aux_vars or None, state_arrays=state_arrays, state_meta=state_meta,
            do_training=job.do_training, share_persistent_buffers=job.share_persistent_buffers,
            progress=progress, should_stop=lambda: job.job_id in self._cancelled, adopt_params=True,
            dp_gate=lambda n_train: self._dp_gate(job.job_id, n_train), device_setting=job.device,
            device_owner=f"node {self.node_name}")
        state = None
        # Only arrays (moments, control variates) need keeping: the hyperparameters in the meta come
        # from the next request's optimizer_args anyway. Plain SGD keeps nothing.
        if job.do_training and result.state_arrays:
            state = encode_state(result.state_arrays, result.state_meta)
        specs, frames = pack_named(result.params)
        out: list[memoryview] = list(frames)
        aux_out = {}
        for name, arrays in result.aux_vars.items():
            aux_specs, aux_frames = pack_named(arrays, first_buffer=len(out))
            aux_out[name] = aux_specs
            out += aux_frames
        return RoundDone(
            job_id=job.job_id, n_buffers=len(out), params=specs, aux_vars=aux_out, n_samples=result.n_samples,
            n_test_samples=result.n_test_samples, n_updates=result.n_updates,
            train_loss=None if result.train_loss is None else float(result.train_loss),
            metrics_before={k: float(v) for k, v in result.metrics_before.items()},
            metrics_after={k: float(v) for k, v in result.metrics_after.items()},
            state=state, compute_seconds=float(result.compute_seconds), loaded=loaded, device=result.device,
            device_note=result.device_note), out

    def _dp_gate(self, job_id: str, n_train: int) -> None:
        """Ask the node whether its budget pays for this DP round on ``n_train`` rows; wait for its answer."""
        send_message(self.sock, DPPlanned(job_id=job_id, n_train=n_train))
        deadline = time.monotonic() + _DP_ANSWER_S
        with self._dp_answered:
            while job_id not in self._dp_answers:
                if job_id in self._cancelled:
                    raise FedlabRequestStopped("training cancelled before its first DP step")
                if time.monotonic() > deadline:
                    raise FedlabTrainingError(f"node {self.node_name} did not answer the privacy budget check of "
                                              f"this DP round within {_DP_ANSWER_S:g} s")
                self._dp_answered.wait(_POLL_S)
            go = self._dp_answers.pop(job_id)
        if not go:
            raise FedlabDisclosureError(f"node {self.node_name} refused this DP round before it trained")

    def _plan_class(self, job: RunRound, loaded: list[str]) -> type:
        """The plan's class, compiled once per plan id (the node checked the id against its approvals)."""
        from fedlab.training.source import load_plan_class

        key = (job.plan_id, job.plan_class)
        cls = self._plans.get(key)
        if cls is not None:
            self._plans.move_to_end(key)
            return cls
        cls = load_plan_class(job.plan_source, job.plan_class)
        loaded.append("plan")
        self._plans[key] = cls
        while len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        return cls

    def _dataset(self, job: RunRound, loaded: list[str]) -> Any:
        """The dataset as the plan sees it, read again only when its file (or folder) changed; each
        round gets its own copy of a table, so a plan that pops a column leaves the next round alone."""
        import pandas as pd

        from fedlab.training.data import load_dataset

        try:
            stat = os.stat(job.data_path)
        except OSError as exc:
            raise FedlabDatasetError(
                f"dataset {job.dataset_id} is no longer readable on node {self.node_name} ({exc.strerror}); "
                "the node's operator should register it again") from None
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._data.get(job.dataset_id)
        if cached is not None and cached[0] == version:
            self._data.move_to_end(job.dataset_id)
            dataset = cached[1]
        else:
            dataset = load_dataset(job.data_type, job.data_path)
            loaded.append("dataset")
            self._data[job.dataset_id] = (version, dataset)
            while len(self._data) > _DATA_CACHE:
                self._data.popitem(last=False)
        return dataset.copy() if isinstance(dataset, pd.DataFrame) else dataset


def _exit_with_parent(parent: int) -> None:
    """End this process when the node that started it is gone, even in the middle of a hung plan."""
    while True:
        time.sleep(_PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlab.training.worker")
    parser.add_argument("--fd", type=int, required=True, help="this end of the node's socket pair")
    parser.add_argument("--parent", type=int, required=True, help="the node's process id")
    parser.add_argument("--name", default="node", help="the node's name, for messages")
    parser.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="the node's device setting (auto, cpu, cuda, cuda:N)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    threading.Thread(target=_exit_with_parent, args=(args.parent,), name="parent-watch", daemon=True).start()
    worker = Worker(sock, node_name=args.name, threads=args.threads, device=args.device)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the node's terminal is the node's to handle
    ready = worker.warm_up()
    from fedlab.training import import_guard

    import_guard.install()  # before any plan runs
    send_message(sock, ready)
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
