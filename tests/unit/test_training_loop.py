"""One round of local work (``run_round``) on real data: breast-cancer rows for a logistic regression,
sklearn's 8x8 digits as a folder of PNGs for a small CNN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn

from fedlab.errors import FedlabDatasetError, FedlabRequestStopped, FedlabTrainingError
from fedlab.training import (
    ImageFolderData,
    Progress,
    TorchTrainingPlan,
    decode_state,
    encode_state,
    initial_params,
    load_dataset,
    load_plan_class,
    pack_named,
    plan_source,
    run_round,
    shared_param_names,
    unpack_named,
)
from fedlab.training.source import PRELUDE

N_FEATURES = 30


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
        return {
            "loss": F.binary_cross_entropy_with_logits(logits, target.float()),
            "accuracy": ((logits > 0).long() == target).float().mean(),
        }


class AdamLogReg(LogReg):
    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), **{"lr": 0.01, **optimizer_args})


class BatchNormNet(LogReg):
    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(model_args["n_features"]), nn.Dropout(0.2),
                             nn.Linear(model_args["n_features"], 1))


ARGS: dict[str, Any] = {"n_features": N_FEATURES}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_breast_cancer(as_frame=True).frame


@pytest.fixture(scope="module")
def plan() -> type[TorchTrainingPlan]:
    """LogReg as a node runs it: turned into source text and loaded back."""
    return load_plan_class(*plan_source(LogReg))


@pytest.fixture(scope="module")
def params0(plan: type[TorchTrainingPlan]) -> dict[str, np.ndarray]:
    return initial_params(plan, ARGS, seed=0)


def run(plan: type, frame: Any, params: Any, **kwargs: Any) -> Any:
    training_args = {"epochs": 2, "batch_size": 32, **kwargs.pop("training_args", {})}
    return run_round(plan, frame, round=kwargs.pop("round", 0), model_args=kwargs.pop("model_args", ARGS),
                     training_args=training_args, params=params, **kwargs)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# --- determinism and parameters ---------------------------------------------------------------


def test_round_returns_float32_arrays_of_the_shared_entries(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    result = run(plan, frame, params0)
    assert list(result.params) == ["weight", "bias"]
    assert result.params["weight"].dtype == np.float32 and result.params["weight"].shape == (1, N_FEATURES)
    assert all(a.flags.writeable for a in result.params.values())  # views of the round's own model, no copy
    assert result.n_samples == len(frame) and result.n_test_samples == 0
    assert result.n_updates == 2 * math.ceil(len(frame) / 32)
    assert result.train_loss is not None and 0 < result.train_loss < 0.7
    assert result.compute_seconds > 0
    assert not same(result.params, params0)


def test_two_rounds_with_the_same_inputs_are_bit_identical(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    kwargs = {"training_args": {"test_ratio": 0.2, "test_on_global_updates": True, "test_on_local_updates": True,
                                "seed": 7}, "round": 3}
    a = run(plan, frame, params0, **kwargs)
    b = run(load_plan_class(*plan_source(LogReg)), frame, params0, **kwargs)  # a fresh load of the same plan
    assert same(a.params, b.params)
    assert (a.train_loss, a.metrics_before, a.metrics_after) == (b.train_loss, b.metrics_before, b.metrics_after)
    assert same(a.state_arrays, b.state_arrays) and a.state_meta == b.state_meta


def test_the_callers_torch_random_state_is_left_alone(plan: type, frame: pd.DataFrame) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    run(BatchNormNet, frame, None)
    initial_params(plan, ARGS)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_seed_and_round_drive_the_randomness(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    base = run(plan, frame, params0)
    assert not same(run(plan, frame, params0, round=1).params, base.params)  # another batch order
    assert not same(run(plan, frame, params0, training_args={"seed": 1}).params, base.params)
    assert not same(run(plan, frame, params0, training_args={"shuffle": False}).params, base.params)
    assert same(run(plan, frame, None).params, run(plan, frame, None).params)
    assert same(initial_params(plan, ARGS, seed=5), initial_params(plan, ARGS, seed=5))
    assert not same(initial_params(plan, ARGS, seed=5), params0)


def test_received_params_are_the_starting_point(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    validate = {"training_args": {"test_ratio": 0.3, "epochs": 1}, "do_training": False}
    zeros = {k: np.zeros_like(v) for k, v in params0.items()}
    assert run(plan, frame, zeros, **validate).metrics_before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert run(plan, frame, params0, **validate).metrics_before["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert not same(run(plan, frame, zeros).params, run(plan, frame, params0).params)


def test_read_only_received_frames_are_neither_warned_about_nor_written(
    plan: type, frame: pd.DataFrame, params0: dict
) -> None:
    specs, frames = pack_named(params0)
    received = unpack_named(specs, [bytes(f) for f in frames])  # read-only views, as off the wire
    copies = {k: v.copy() for k, v in received.items()}
    result = run(plan, frame, received)  # pytest turns torch's "not writable" UserWarning into an error
    assert same(received, copies)
    assert same(result.params, run(plan, frame, params0).params)


def test_float64_params_are_cast_to_the_model_dtype(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    as64 = {k: v.astype(np.float64) for k, v in params0.items()}
    assert same(run(plan, frame, as64).params, run(plan, frame, params0).params)


def test_params_that_do_not_fit_the_model_are_refused(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    with pytest.raises(FedlabTrainingError, match="missing bias"):
        run(plan, frame, {"weight": params0["weight"]})
    with pytest.raises(FedlabTrainingError, match="unexpected extra"):
        run(plan, frame, {**params0, "extra": np.zeros(1, np.float32)})
    with pytest.raises(FedlabTrainingError, match=r"weight received with shape \[1, 29\].*\[1, 30\]"):
        run(plan, frame, {**params0, "weight": np.zeros((1, 29), np.float32)})


def test_persistent_buffers_are_shared_only_when_asked(frame: pd.DataFrame) -> None:
    with_buffers = run(BatchNormNet, frame, None)
    assert list(with_buffers.params) == ["0.weight", "0.bias", "0.running_mean", "0.running_var",
                                         "0.num_batches_tracked", "2.weight", "2.bias"]
    assert with_buffers.params["0.num_batches_tracked"].shape == ()
    assert int(with_buffers.params["0.num_batches_tracked"]) == with_buffers.n_updates
    without = run(BatchNormNet, frame, None, share_persistent_buffers=False)
    assert list(without.params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    model = BatchNormNet().init_model(ARGS)
    assert shared_param_names(model, False) == list(without.params)
    # a round-trip over the wire keeps the 0-d buffer 0-d, so the next round loads it
    specs, frames = pack_named(with_buffers.params)
    again = run(BatchNormNet, frame, unpack_named(specs, frames), round=1)
    assert int(again.params["0.num_batches_tracked"]) == 2 * with_buffers.n_updates


def test_num_updates_overrides_epochs(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    result = run(plan, frame, params0, training_args={"epochs": 5, "num_updates": 20})
    assert result.n_updates == 20


# --- federated corrections --------------------------------------------------------------------


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a))


def test_fedprox(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    plain = run(plan, frame, params0)
    assert same(run(plan, frame, params0, training_args={"fedprox_mu": 0.0}).params, plain.params)
    prox = run(plan, frame, params0, training_args={"fedprox_mu": 5.0})
    assert not same(prox.params, plain.params)
    assert distance(prox.params, params0) < distance(plain.params, params0)


def test_scaffold_first_round_is_plain_sgd_and_returns_delta_c(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    plain = run(plan, frame, params0)
    result = run(plan, frame, params0, aggregator_args={"name": "scaffold"})
    assert same(result.params, plain.params)
    delta = result.aux_vars["scaffold"]
    assert list(delta) == ["weight", "bias"]
    assert all(delta[k].shape == params0[k].shape and delta[k].dtype == np.float32 for k in delta)
    lr, k = 0.01, result.n_updates
    for name in delta:
        np.testing.assert_allclose(delta[name], (params0[name] - result.params[name]) / (k * lr), rtol=1e-5, atol=1e-6)
        assert np.array_equal(result.state_arrays[f"scaffold.{name}"], delta[name])  # c_i = 0 + delta


def test_scaffold_second_round_uses_c_and_the_kept_c_i(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    first = run(plan, frame, params0, aggregator_args={"name": "scaffold"})
    c_i = {name: first.state_arrays[f"scaffold.{name}"] for name in params0}
    c = {name: 0.5 * value for name, value in c_i.items()}
    state_arrays, state_meta = decode_state(encode_state(first.state_arrays, first.state_meta))
    second = run(plan, frame, first.params, round=1, aggregator_args={"name": "scaffold"},
                 aux_vars={"scaffold": c}, state_arrays=state_arrays, state_meta=state_meta)
    plain = run(plan, frame, first.params, round=1)
    assert not same(second.params, plain.params)
    k, lr = second.n_updates, 0.01
    for name in params0:
        expected = c_i[name] - c[name] + (first.params[name] - second.params[name]) / (k * lr)
        np.testing.assert_allclose(second.state_arrays[f"scaffold.{name}"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(second.aux_vars["scaffold"][name], expected - c_i[name], rtol=1e-5, atol=1e-6)


def test_scaffold_refuses_control_variates_of_unknown_parameters(
    plan: type, frame: pd.DataFrame, params0: dict
) -> None:
    with pytest.raises(FedlabTrainingError, match="unknown parameters: nope"):
        run(plan, frame, params0, aggregator_args={"name": "scaffold"}, aux_vars={"scaffold": {"nope": np.zeros(1)}})
    with pytest.raises(FedlabTrainingError, match=r"variate for bias has shape \[2\]"):
        run(plan, frame, params0, aggregator_args={"name": "scaffold"},
            aux_vars={"scaffold": {"bias": np.zeros(2, np.float32)}})


def test_optimizer_state_carries_over_to_the_next_round(frame: pd.DataFrame) -> None:
    first = run(AdamLogReg, frame, None)
    assert "optimizer.state.0.exp_avg" in first.state_arrays
    blob = encode_state(first.state_arrays, first.state_meta)
    with_state = run(AdamLogReg, frame, first.params, round=1, state_arrays=first.state_arrays,
                     state_meta=first.state_meta)
    restored = run(AdamLogReg, frame, first.params, round=1, **dict(zip(("state_arrays", "state_meta"),
                                                                         decode_state(blob), strict=True)))
    fresh = run(AdamLogReg, frame, first.params, round=1)
    assert same(with_state.params, restored.params)
    assert not same(with_state.params, fresh.params)
    step = with_state.state_arrays["optimizer.state.0.step"]
    assert float(step) == first.n_updates + with_state.n_updates


# --- validation, progress, cancel -------------------------------------------------------------


def test_validation_before_and_after(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    result = run(plan, frame, params0, training_args={
        "test_ratio": 0.2, "test_on_global_updates": True, "test_on_local_updates": True, "epochs": 5})
    assert result.n_test_samples == round(0.2 * len(frame)) and result.n_samples == len(frame) - result.n_test_samples
    assert set(result.metrics_before) == set(result.metrics_after) == {"loss", "accuracy"}
    assert result.metrics_after["loss"] < result.metrics_before["loss"]
    assert result.metrics_after["accuracy"] > 0.9
    only_after = run(plan, frame, params0, training_args={"test_ratio": 0.2, "test_on_local_updates": True})
    assert only_after.metrics_before == {} and set(only_after.metrics_after) == {"loss", "accuracy"}


def test_the_test_split_is_the_same_every_round(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    args = {"training_args": {"test_ratio": 0.25, "test_on_global_updates": True}}
    assert run(plan, frame, params0, **args).metrics_before == run(plan, frame, params0, round=9, **args).metrics_before


def test_metrics_are_averaged_weighted_by_batch_size(frame: pd.DataFrame) -> None:
    class Sizes(LogReg):
        def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> Any:
            return {"size": float(len(target))}

    result = run(Sizes, frame, None, do_training=False, training_args={"test_ratio": 0.2})
    sizes = [32, 32, 32, result.n_test_samples - 96]
    assert result.metrics_before == {"size": pytest.approx(sum(s * s for s in sizes) / sum(sizes))}


def test_validation_only_returns_no_params_and_keeps_the_state(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    state = {"scaffold.weight": np.ones((1, N_FEATURES), np.float32)}
    result = run(plan, frame, params0, do_training=False, training_args={"test_ratio": 0.2},
                 state_arrays=state, state_meta={"k": 1})
    assert result.params == {} and result.n_updates == 0 and result.train_loss is None
    assert set(result.metrics_before) == {"loss", "accuracy"} and result.metrics_after == {}
    assert result.state_arrays == state and result.state_meta == {"k": 1}
    assert run(plan, frame, params0, do_training=False).metrics_before == {}


def test_a_tensor_from_testing_step_is_the_metric(frame: pd.DataFrame) -> None:
    class TensorMetric(LogReg):
        def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> Any:
            return self.training_step(data, target)

    result = run(TensorMetric, frame, None, do_training=False, training_args={"test_ratio": 0.1})
    assert list(result.metrics_before) == ["metric"]


def test_progress_is_throttled_but_every_epoch_end_is_reported(
    plan: type, frame: pd.DataFrame, params0: dict
) -> None:
    events: list[Progress] = []
    result = run(plan, frame, params0, progress=events.append, training_args={
        "epochs": 3, "progress_interval": 1e9, "test_ratio": 0.2, "test_on_local_updates": True})
    per_epoch = math.ceil(result.n_samples / 32)
    training = [e for e in events if e.phase == "training"]
    assert [(e.epoch, e.iteration) for e in training] == [(1, 1), (1, per_epoch), (2, 2 * per_epoch),
                                                            (3, 3 * per_epoch)]
    assert all(e.n_epochs == 3 and e.n_iterations == 3 * per_epoch and e.round == 0 for e in training)
    assert all(isinstance(e.loss, float) for e in training)
    assert [e.phase for e in events][-1] == "validation after"
    every: list[Progress] = []
    run(plan, frame, params0, progress=every.append, training_args={"progress_interval": 0})
    assert [e.iteration for e in every] == list(range(1, 2 * math.ceil(len(frame) / 32) + 1))


def test_should_stop_cancels_the_round(plan: type, frame: pd.DataFrame, params0: dict) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(FedlabRequestStopped, match="cancelled in round 0, epoch 1, iteration 6"):
        run(plan, frame, params0, should_stop=should_stop)


# --- the plan's own errors --------------------------------------------------------------------

BROKEN = PRELUDE + '''
class Broken(TorchTrainingPlan):
    def init_model(self, model_args):
        if model_args.get("fail"):
            raise KeyError("fail")
        return nn.Linear(30, 1)

    def training_data(self, dataset):
        return dataset.drop(columns="target").to_numpy(), dataset["target"].to_numpy()

    def training_step(self, data, target):
        if data.shape[1] == 30:
            raise ValueError("bad shape")
        return self.model(data)
'''


def test_a_plan_raising_in_training_step_names_the_method_and_line(frame: pd.DataFrame) -> None:
    source, name = plan_source(BROKEN, "Broken")
    broken = load_plan_class(source, name)
    with pytest.raises(FedlabTrainingError) as info:
        run(broken, frame, None)
    line = source.splitlines().index('            raise ValueError("bad shape")') + 1
    assert str(info.value) == (
        f"training plan Broken.training_step raised ValueError: bad shape "
        f'(plan line {line}: `raise ValueError("bad shape")`)'
    )
    line = next(i for i, text in enumerate(source.splitlines(), 1) if 'raise KeyError("fail")' in text)
    with pytest.raises(FedlabTrainingError, match=rf"init_model raised KeyError: 'fail' \(plan line {line}: `raise"):
        run(broken, frame, None, model_args={"fail": True})


def test_a_plan_calling_exit_is_a_training_error(frame: pd.DataFrame) -> None:
    class Quitter(LogReg):
        def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            raise SystemExit(3)

    with pytest.raises(FedlabTrainingError, match=r"Quitter.training_step raised SystemExit: 3 \(plan line \d+"):
        run(Quitter, frame, None)


def test_errors_inside_torch_point_at_the_plan_line_that_called_it(frame: pd.DataFrame) -> None:
    class Mismatch(LogReg):
        def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.model(data[:, :3]).sum()

    with pytest.raises(FedlabTrainingError, match=r"Mismatch.training_step raised RuntimeError: mat1 and mat2 .*"
                                                  r"\(plan line \d+: `return self.model\(data\[:, :3\]\).sum\(\)`\)"):
        run(Mismatch, frame, None)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("return self.model(data)", r"one-element tensor, not a tensor of shape \[32, 1\]"),
        ("return 1.0", "one-element tensor, not float"),
        ("return self.model(data).sum().detach()", "does not depend on the model's parameters"),
    ],
)
def test_a_loss_that_cannot_be_trained_on_is_explained(frame: pd.DataFrame, step: str, message: str) -> None:
    source = BROKEN.replace('raise ValueError("bad shape")', step)
    with pytest.raises(FedlabTrainingError, match=message):
        run(load_plan_class(source, "Broken"), frame, None)


def test_bad_training_data_and_arguments_are_training_errors(frame: pd.DataFrame) -> None:
    class Listy(LogReg):
        def training_data(self, dataset: Any) -> Any:
            return [1, 2, 3]

    class Texty(LogReg):
        def training_data(self, dataset: Any) -> Any:
            return dataset.astype(str).to_numpy(), dataset["target"].to_numpy()

    class Ragged(LogReg):
        def training_data(self, dataset: Any) -> Any:
            return dataset.to_numpy(), dataset["target"].to_numpy()[:10]

    class Raw(LogReg):
        def training_data(self, dataset: Any) -> Any:
            return dataset.drop(columns="target").to_numpy(), dataset["target"].to_numpy()

    with pytest.raises(FedlabTrainingError, match="must return \\(X, y\\) or a torch Dataset"):
        run(Listy, frame, None)
    with pytest.raises(FedlabTrainingError, match="X of dtype object; it must be numeric"):
        run(Texty, frame, None)
    with pytest.raises(FedlabTrainingError, match="same number of rows"):
        run(Ragged, frame, None)
    with pytest.raises(FedlabTrainingError, match="unknown training argument 'epoch'"):
        run(LogReg, frame, None, training_args={"epoch": 1})
    with pytest.raises(FedlabTrainingError, match="nothing to train on"):
        run(Raw, frame.iloc[:0], None)


# --- image folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits 0, 1 and 2 of sklearn's 8x8 digits as grayscale PNGs, one sub-folder per class."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for label, name in enumerate(["zero", "one", "two"]):
        (root / name).mkdir()
        images = digits.images[digits.target == label][:40]
        for i, image in enumerate(images):
            Image.fromarray((image * 16).clip(0, 255).astype(np.uint8), mode="L").save(root / name / f"{i}.png")
    (root / "zero" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


class DigitsCNN(TorchTrainingPlan):
    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, model_args["n_classes"]))

    def training_data(self, dataset: ImageFolderData) -> Any:
        images, labels = dataset.arrays()
        return images.transpose(0, 3, 1, 2) / 255.0, labels

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(data), target)

    def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        return {"accuracy": (self.model(data).argmax(1) == target).float().mean()}


class DigitsFromDataset(DigitsCNN):
    def training_data(self, dataset: ImageFolderData) -> Any:
        class Images(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(dataset)

            def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
                pixels = torch.from_numpy(dataset.load(i)).permute(2, 0, 1)
                return pixels.float() / 255.0, int(dataset.labels[i])

        return Images()


def test_image_folder_data(digits_folder: Path) -> None:
    data = load_dataset("images", str(digits_folder))
    assert isinstance(data, ImageFolderData)
    assert data.classes == ["one", "two", "zero"] and len(data) == 120
    assert data.labels.dtype == np.int64 and sorted(set(data.labels.tolist())) == [0, 1, 2]
    assert all(f.suffix == ".png" for f in data.files)
    image = data.load(0)
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and image.flags.writeable
    images, labels = data.arrays()
    assert images.shape == (120, 8, 8, 1) and np.array_equal(labels, data.labels)
    assert np.array_equal(images[5], data.load(5))


@pytest.mark.parametrize("plan_cls", [DigitsCNN, DigitsFromDataset])
def test_a_cnn_trains_one_round_on_an_image_folder(digits_folder: Path, plan_cls: type) -> None:
    data = ImageFolderData(digits_folder)
    training_args = {"epochs": 4, "batch_size": 16, "optimizer_args": {"lr": 0.1}, "test_ratio": 0.25,
                     "test_on_global_updates": True, "test_on_local_updates": True}
    result = run_round(plan_cls, data, round=0, model_args={"n_classes": 3}, training_args=training_args,
                       params=None)
    assert result.params["0.weight"].shape == (4, 1, 3, 3) and result.params["3.weight"].shape == (3, 256)
    assert result.n_samples == 90 and result.n_test_samples == 30 and result.n_updates == 4 * 6
    assert result.metrics_after["accuracy"] > result.metrics_before["accuracy"]
    again = run_round(plan_cls, data, round=0, model_args={"n_classes": 3}, training_args=training_args,
                      params=None)
    assert same(result.params, again.params)


def test_arrays_and_dataset_plans_see_the_same_data(digits_folder: Path) -> None:
    data = ImageFolderData(digits_folder)
    args: dict[str, Any] = {"model_args": {"n_classes": 3}, "training_args": {"batch_size": 200}, "params": None}
    a = run_round(DigitsCNN, data, round=0, **args)
    b = run_round(DigitsFromDataset, data, round=0, **args)  # one full batch: same order, same sum
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], atol=1e-6)


def test_a_failing_dataset_item_is_the_plans_error(digits_folder: Path) -> None:
    class BadItem(DigitsFromDataset):
        def training_data(self, dataset: ImageFolderData) -> Any:
            class Items(torch.utils.data.Dataset):
                def __len__(self) -> int:
                    return 3

                def __getitem__(self, i: int) -> Any:
                    raise IndexError(f"no item {i}")

            return Items()

    with pytest.raises(FedlabTrainingError, match=r"BadItem.training_data \(loading a batch\) raised IndexError: "
                                                  r"no item \d \(plan line \d+ in __getitem__"):
        run_round(BadItem, ImageFolderData(digits_folder), round=0, model_args={"n_classes": 3},
                  training_args={"shuffle": False}, params=None)


def test_image_modes_become_uint8_channels(tmp_path: Path) -> None:
    for mode, channels in (("RGB", 3), ("RGBA", 4), ("P", 4), ("1", 1)):
        (tmp_path / mode / "a").mkdir(parents=True)
        Image.new(mode, (5, 4)).save(tmp_path / mode / "a" / "x.png")
        image = ImageFolderData(tmp_path / mode).load(0)
        assert image.shape == (4, 5, channels) and image.dtype == np.uint8, mode
    (tmp_path / "deep" / "a").mkdir(parents=True)
    Image.new("I;16", (5, 4)).save(tmp_path / "deep" / "a" / "x.png")
    with pytest.raises(FedlabDatasetError, match="not 8 bits per channel"):
        ImageFolderData(tmp_path / "deep").load(0)


def test_dataset_loading_errors(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    loaded = load_dataset("csv", path)
    assert isinstance(loaded, pd.DataFrame) and loaded.shape == frame.shape
    with pytest.raises(FedlabDatasetError, match="does not exist"):
        load_dataset("csv", tmp_path / "gone.csv")
    with pytest.raises(FedlabDatasetError, match="type 'parquet'"):
        load_dataset("parquet", path)
    with pytest.raises(FedlabDatasetError, match="not a directory"):
        load_dataset("images", path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FedlabDatasetError, match="holds no images"):
        load_dataset("images", tmp_path / "empty")
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(FedlabDatasetError, match="cannot read image"):
        ImageFolderData(tmp_path / "broken").load(0)
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    Image.new("L", (3, 3)).save(tmp_path / "mixed" / "a" / "1.png")
    Image.new("L", (4, 3)).save(tmp_path / "mixed" / "a" / "2.png")
    with pytest.raises(FedlabDatasetError, match="must share one height"):
        ImageFolderData(tmp_path / "mixed").arrays()


def _cpu_inits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the device of every tensor ``kaiming_uniform_`` (nn.Linear's initialiser) draws into."""
    devices: list[str] = []
    original = torch.nn.init.kaiming_uniform_

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        devices.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    return devices


def test_a_model_that_params_overwrite_is_not_randomly_initialised_first(
        plan: type, frame: pd.DataFrame, params0: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run(plan, frame, params0)
    devices = _cpu_inits(monkeypatch)
    again = run(plan, frame, params0)
    assert devices and "cpu" not in devices  # built on the meta device only: no weights drawn
    assert same(reference.params, again.params)


class WithScratchBuffer(LogReg):
    """A non-persistent buffer never travels, so the model must be initialised the ordinary way."""

    def init_model(self, model_args: dict) -> nn.Module:
        model = nn.Linear(model_args["n_features"], 1)
        model.register_buffer("scale", torch.ones(1), persistent=False)
        return model


def test_a_model_with_entries_that_do_not_travel_is_initialised_normally(
        frame: pd.DataFrame, params0: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = _cpu_inits(monkeypatch)
    result = run(WithScratchBuffer, frame, params0)
    assert "cpu" in devices and set(result.params) == {"weight", "bias"}
