"""The loop's moves to the round's device and back: model, received parameters, batches, optimizer state,
Scaffold's control variates, and the parameters copied back into the received CPU frames.

Without a GPU the moves are checked on torch's ``meta`` device (tensors with shapes and no data: where a
tensor is, not what it holds) and the round itself on the CPU; CUDA is never faked. The tests at the end run
a real round on a GPU and only where torch sees one.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import TensorDataset

import fedlab.training.convert as convert
from fedlab.errors import FedlabConfigError
from fedlab.training import TorchTrainingPlan, initial_params, load_optimizer_state, run_round
from fedlab.training.args import TrainingArgs
from fedlab.training.convert import PlanData, load_params, to_device
from fedlab.training.loop import _placed_model, _scaffold_tensors
from fedlab.training.placement import params_to_host, torch_device
from fedlab.training.steps import Reporter, RoundContext

META = torch.device("meta")
CPU = torch.device("cpu")
N_FEATURES = 30
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU that torch can use")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")


class LogReg(TorchTrainingPlan):
    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset: pd.DataFrame) -> Any:
        x = dataset.drop(columns="target").to_numpy()
        return (x - x.mean(axis=0)) / x.std(axis=0), dataset["target"].to_numpy()

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target.float())

    def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        logits = self.model(data).squeeze(1)
        return {"loss": F.binary_cross_entropy_with_logits(logits, target.float()),
                "accuracy": ((logits > 0).long() == target).float().mean()}


class AdamLogReg(LogReg):
    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), **{"lr": 0.01, **optimizer_args})


class BatchNormNet(LogReg):
    """BatchNorm's running statistics (persistent buffers) and dropout."""

    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(model_args["n_features"]), nn.Dropout(0.2),
                             nn.Linear(model_args["n_features"], 1))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_breast_cancer(as_frame=True).frame


def _params(plan: type = LogReg, fill: float | None = None) -> dict[str, np.ndarray]:
    params = initial_params(plan, {"n_features": N_FEATURES}, seed=0)
    if fill is not None:
        for array in params.values():
            array[...] = fill
    return params


# -- moves, on the meta device -----------------------------------------------------------------------
def test_to_device_moves_the_tensors_of_a_batch_wherever_they_are_nested() -> None:
    Pair = namedtuple("Pair", "image mask")
    batch = {"x": torch.ones(2, 3), "parts": [torch.zeros(2), (torch.ones(1), "label")],
             "pair": Pair(torch.ones(1), torch.zeros(1)), "n": 2}
    moved = to_device(batch, META)
    assert moved["x"].device == META and moved["x"].shape == (2, 3)
    assert moved["parts"][0].device == META and moved["parts"][1][0].device == META
    assert moved["parts"][1][1] == "label" and moved["n"] == 2
    assert isinstance(moved["pair"], Pair) and moved["pair"].mask.device == META
    already = torch.ones(2)
    assert to_device(already, CPU) is already  # no copy where it is already


def test_plan_data_moves_x_and_y_to_the_device_once_and_picks_rows_there() -> None:
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    on_cpu, placed = PlanData((x, y)), PlanData((x, y))
    placed.place(META)
    assert placed.x is not None and placed.x.device == META and placed.y is not None and placed.y.device == META
    order = np.arange(10)
    batches = list(placed.batches(order, 4, True, torch.Generator().manual_seed(1)))
    assert [tuple(b[0].shape) for b in batches] == [(4, 2), (4, 2), (2, 2)]
    assert all(b[0].device == META and b[1].device == META for b in batches)
    # the order is drawn on the CPU: the same on every device
    cpu_batches = list(on_cpu.batches(order, 4, True, torch.Generator().manual_seed(1)))
    same_place = PlanData((x, y))
    same_place.place(CPU)
    for (a, b), (c, d) in zip(cpu_batches, same_place.batches(order, 4, True, torch.Generator().manual_seed(1)),
                              strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_data_too_large_to_move_whole_goes_batch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert, "_RESIDENT_BYTES", 0)
    data = PlanData((np.ones((6, 2), np.float32), np.zeros(6)))
    data.place(META)
    assert data.x is not None and data.x.device == CPU  # kept where it was
    batches = list(data.batches(np.arange(6), 4, False, torch.Generator()))
    assert [b[0].device for b in batches] == [META, META] and [len(b[1]) for b in batches] == [4, 2]


def test_a_datasets_batches_are_moved_as_they_are_drawn() -> None:
    data = PlanData(TensorDataset(torch.ones(5, 3), torch.zeros(5)))
    data.place(META)
    batches = list(data.batches(np.arange(5), 2, False, torch.Generator()))
    assert len(batches) == 3 and all(b[0].device == META and b[1].device == META for b in batches)


def test_the_model_is_made_on_the_device_from_the_received_params_without_adopting_them() -> None:
    params = _params(fill=0.25)
    plan = _placed_model(LogReg, {"n_features": N_FEATURES}, params, True, adopt=True, device=META)
    assert plan.device == META
    assert all(p.device == META for p in plan.model.parameters())
    assert all(p.requires_grad for p in plan.model.parameters())
    assert all(np.all(a == 0.25) for a in params.values())  # the frames are read, never the model's memory
    on_cpu = _placed_model(LogReg, {"n_features": N_FEATURES}, params, True, adopt=True, device=CPU)
    assert all(np.shares_memory(on_cpu.model.state_dict()[n].numpy(), a) for n, a in params.items())


def test_a_model_not_covered_by_the_params_is_built_on_the_cpu_and_moved() -> None:
    params = _params(BatchNormNet)
    shared = {n: a for n, a in params.items() if "running" not in n and "num_batches" not in n}
    plan = _placed_model(BatchNormNet, {"n_features": N_FEATURES}, shared, False, adopt=True, device=META)
    assert {t.device for t in plan.model.state_dict().values()} == {META}


def test_optimizer_state_and_scaffold_variates_follow_the_model_to_the_device(frame: pd.DataFrame) -> None:
    kept = run_round(AdamLogReg, frame, round=0, model_args={"n_features": N_FEATURES},
                     training_args={"epochs": 1}, params=_params())
    arrays, meta = optimizer_state_arrays(kept.state_arrays), kept.state_meta["optimizer"]
    plan = _placed_model(AdamLogReg, {"n_features": N_FEATURES}, _params(), True, adopt=False, device=META)
    optimizer = plan.init_optimizer({})
    load_optimizer_state(optimizer, arrays, meta)
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(m.device == META for m in moments)

    trainable = [(n, p) for n, p in plan.model.named_parameters()]
    ctx = RoundContext(AdamLogReg, plan, TrainingArgs(), PlanData((np.ones((2, 1)), np.ones(2))), 0, 0,
                       Reporter(None, 1.0, 0), None, trainable, META)
    received = {"scaffold": {"weight": np.ones((1, N_FEATURES), np.float32)}}
    c, c_i = _scaffold_tensors(ctx, received, {"scaffold.bias": np.ones(1, np.float32)}, adopt=True)
    assert {t.device for t in (*c.values(), *c_i.values())} == {META}
    assert c.keys() == c_i.keys() == {"weight", "bias"}


def optimizer_state_arrays(state_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("optimizer."):]: v for k, v in state_arrays.items() if k.startswith("optimizer.")}


# -- back to the CPU ------------------------------------------------------------------------------------
def test_trained_params_are_copied_back_into_the_received_frames() -> None:
    model = nn.Linear(N_FEATURES, 1)
    received = _params(fill=0.0)
    load_params(model, received, list(received))  # copied: the model's memory is its own, as on a GPU
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(3.0)
    out = params_to_host(model, ["weight", "bias"], received, adopt=True)
    assert out["weight"] is received["weight"] and out["bias"] is received["bias"]
    assert np.all(received["weight"] == 2.0) and np.all(received["bias"] == 3.0)
    assert not np.shares_memory(out["weight"], model.weight.detach().numpy())


def test_without_adopt_or_where_a_frame_cannot_hold_an_entry_the_result_is_the_models_own() -> None:
    model = nn.Linear(N_FEATURES, 1)
    received = _params(fill=0.0)
    load_params(model, received, list(received))
    with torch.no_grad():
        model.weight.fill_(2.0)
    out = params_to_host(model, ["weight", "bias"], received, adopt=False)
    assert np.all(received["weight"] == 0.0) and np.all(out["weight"] == 2.0)  # the caller's arrays untouched
    cast = {"weight": received["weight"].astype(np.float64), "bias": received["bias"]}
    cast["bias"].flags.writeable = False
    out = params_to_host(model, ["weight", "bias"], cast, adopt=True)
    assert out["weight"] is not cast["weight"] and out["weight"].dtype == np.float32 and np.all(cast["weight"] == 0)
    assert out["bias"] is not cast["bias"]


def test_adopted_frames_the_model_trained_in_are_returned_without_a_copy(frame: pd.DataFrame) -> None:
    params = _params()
    before = {n: a.copy() for n, a in params.items()}
    result = run_round(LogReg, frame, round=0, model_args={"n_features": N_FEATURES}, training_args={},
                       params=params, adopt_params=True)
    assert all(result.params[n] is params[n] for n in params) and not np.array_equal(params["weight"],
                                                                                   before["weight"])


# -- the round's device on this machine -----------------------------------------------------------------
def test_a_cpu_node_trains_on_the_cpu_and_says_so_to_a_round_that_asked_for_a_gpu(frame: pd.DataFrame) -> None:
    common: dict[str, Any] = {"round": 1, "model_args": {"n_features": N_FEATURES}, "params": _params()}
    plain = run_round(LogReg, frame, training_args={"epochs": 1}, device_setting="cpu", **common)
    asked = run_round(LogReg, frame, training_args={"epochs": 1, "use_gpu": True}, device_setting="cpu",
                      device_owner="node a", **common)
    assert (plain.device, plain.device_note) == ("cpu", "")
    assert asked.device == "cpu" and 'node a trains on the CPU only (its operator set device = "cpu")' in \
        asked.device_note
    assert all(np.array_equal(plain.params[n], asked.params[n]) for n in plain.params)  # the very same round


@no_cuda
def test_use_gpu_without_a_gpu_trains_on_the_cpu_with_a_note(frame: pd.DataFrame) -> None:
    result = run_round(LogReg, frame, round=1, model_args={"n_features": N_FEATURES},
                       training_args={"use_gpu": True}, params=_params())
    assert result.device == "cpu"
    assert result.device_note == ("use_gpu: this machine has no CUDA GPU that torch can use; this round trained "
                                  "on the CPU")


@no_cuda
def test_a_gpu_the_operator_set_but_torch_does_not_see_fails_the_round_clearly(frame: pd.DataFrame) -> None:
    with pytest.raises(FedlabConfigError, match=r"node a is set to train on cuda:0 .* sees no CUDA GPU"):
        run_round(LogReg, frame, round=1, model_args={"n_features": N_FEATURES}, training_args={},
                  params=_params(), device_setting="cuda:0", device_owner="node a")


def test_torch_device_names_the_first_gpu_by_its_index() -> None:
    assert torch_device("cuda") == torch.device("cuda", 0) and torch_device("cpu") == CPU


# -- a real GPU ------------------------------------------------------------------------------------------
def _gpu_and_cpu(plan: type, frame: pd.DataFrame, **kw: Any) -> tuple[Any, Any]:
    args = {"epochs": 2, "batch_size": 32, "seed": 3, **kw.pop("training_args", {})}
    common = {"round": 1, "model_args": {"n_features": N_FEATURES}, **kw}
    gpu = run_round(plan, frame, training_args={**args, "use_gpu": True}, **common)
    cpu = run_round(plan, frame, training_args=args, **common)
    return gpu, cpu


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("plan, extra", [
    (LogReg, {}),
    (AdamLogReg, {}),
    (BatchNormNet, {"training_args": {"test_ratio": 0.2, "test_on_local_updates": True}}),
    (LogReg, {"training_args": {"fedprox_mu": 0.5}}),
])
def test_a_gpu_round_agrees_with_the_cpu_round(frame: pd.DataFrame, plan: type, extra: dict[str, Any]) -> None:
    gpu, cpu = _gpu_and_cpu(plan, frame, params=_params(plan), **extra)
    assert gpu.device == "cuda:0" and gpu.device_note == "" and cpu.device == "cpu"
    _close(gpu.params, cpu.params)
    _close(gpu.state_arrays, cpu.state_arrays)
    assert gpu.train_loss == pytest.approx(cpu.train_loss, rel=1e-4)
    assert gpu.metrics_after.keys() == cpu.metrics_after.keys()


@cuda
def test_scaffold_on_a_gpu_agrees_with_the_cpu(frame: pd.DataFrame) -> None:
    c = {"scaffold": {n: np.full_like(a, 0.01) for n, a in _params().items()}}
    gpu, cpu = _gpu_and_cpu(LogReg, frame, params=_params(), aggregator_args={"name": "scaffold"}, aux_vars=c)
    _close(gpu.params, cpu.params)
    _close(gpu.aux_vars["scaffold"], cpu.aux_vars["scaffold"])


@cuda
def test_a_gpu_round_writes_its_params_back_into_the_adopted_frames(frame: pd.DataFrame) -> None:
    params, reference = _params(), _params()
    result = run_round(LogReg, frame, round=1, model_args={"n_features": N_FEATURES},
                       training_args={"use_gpu": True}, params=params, adopt_params=True)
    assert result.device == "cuda:0" and all(result.params[n] is params[n] for n in params)
    cpu = run_round(LogReg, frame, round=1, model_args={"n_features": N_FEATURES}, training_args={},
                    params=reference)
    _close(result.params, cpu.params)


@cuda
@pytest.mark.parametrize("dp_type", ["local", "central"])
def test_dp_training_runs_on_a_gpu(frame: pd.DataFrame, dp_type: str) -> None:
    result = run_round(LogReg, frame, round=1, model_args={"n_features": N_FEATURES},
                       training_args={"use_gpu": True, "dp_args": {"type": dp_type, "sigma": 1.0, "clip": 1.0}},
                       params=_params())
    assert result.device == "cuda:0" and result.n_updates > 0 and result.train_loss is None
    assert all(np.isfinite(a).all() for a in result.params.values())
