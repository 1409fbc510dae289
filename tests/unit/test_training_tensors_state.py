"""Named arrays on the wire, node-side state blobs without pickle, optimizer state round trips,
and the checked training arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlab.errors import FedlabProtocolError, FedlabTrainingError
from fedlab.protocol.envelope import decode, encode, make_envelope
from fedlab.protocol.messages import ArraySpec
from fedlab.training import (
    TrainingArgs,
    decode_state,
    encode_state,
    load_optimizer_state,
    optimizer_state,
    pack_named,
    split_indices,
    unpack_named,
)
from fedlab.training.messages import NamedArray, TrainReply

ARRAYS = {
    "fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "fc.bias": np.array([1.5, -2.0, 3.25], dtype=np.float64),
    "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    "mask": np.array([[True, False]]),
    "empty": np.zeros((0, 5), dtype=np.float32),
}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


# --- pack_named / unpack_named ----------------------------------------------------------------


def test_pack_unpack_round_trip_keeps_names_dtypes_shapes_and_order() -> None:
    specs, frames = pack_named(ARRAYS)
    assert [s.name for s in specs] == list(ARRAYS)
    assert [s.array.buffer for s in specs] == list(range(len(ARRAYS)))
    out = unpack_named(specs, [bytes(f) for f in frames])
    assert_same(out, ARRAYS)
    assert all(not a.flags.writeable for a in out.values())


def test_pack_numbers_frames_from_first_buffer_so_groups_share_one_message() -> None:
    params, params_frames = pack_named({"w": np.ones(2, np.float32)})
    aux, aux_frames = pack_named({"w": np.full(2, 3.0, np.float32)}, first_buffer=len(params_frames))
    assert aux[0].array.buffer == 1
    buffers = [*params_frames, *aux_frames]
    assert unpack_named(aux, buffers)["w"].tolist() == [3.0, 3.0]
    assert unpack_named(params, buffers)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="first_buffer"):
        pack_named({}, first_buffer=-1)


def test_packing_is_zero_copy_and_unpacking_views_the_frames() -> None:
    weight = np.arange(6, dtype=np.float32)
    _, frames = pack_named({"w": weight})
    assert np.shares_memory(np.frombuffer(frames[0], dtype=np.float32), weight)
    specs, _ = pack_named({"w": weight})
    frame = bytearray(weight.tobytes())
    view = unpack_named(specs, [memoryview(frame)])["w"]
    frame[:4] = np.float32(42).tobytes()
    assert view[0] == 42


def test_duplicate_names_are_a_protocol_error() -> None:
    specs, frames = pack_named({"w": np.ones(1, np.float32)})
    with pytest.raises(FedlabProtocolError, match="'w' appears twice") as info:
        unpack_named([specs[0], specs[0]], frames)
    assert info.value.field == "name"


def test_spec_that_disagrees_with_its_buffer_is_refused() -> None:
    bad = NamedArray(name="w", array=ArraySpec(buffer=0, dtype="<f4", shape=[3]))
    with pytest.raises(FedlabProtocolError, match="needs 12 bytes"):
        unpack_named([bad], [b"\x00" * 8])


def test_named_arrays_travel_in_a_train_reply() -> None:
    specs, frames = pack_named(ARRAYS)
    reply = TrainReply(experiment_id="e", round=1, dataset_id="d", params=specs, n_samples=10)
    envelope = decode(encode(make_envelope(reply, "node", buffers=frames)))
    assert_same(unpack_named(envelope.content.params, envelope.buffers), ARRAYS)


# --- state blobs ------------------------------------------------------------------------------


def test_state_round_trip() -> None:
    meta = {"optimizer": {"param_groups": [{"lr": 0.1, "betas": [0.9, 0.999], "foreach": None}]}, "round": 3}
    arrays, decoded_meta = decode_state(encode_state(ARRAYS, meta))
    assert_same(arrays, ARRAYS)
    assert decoded_meta == meta


def test_empty_state_round_trip() -> None:
    assert decode_state(encode_state({}, {})) == ({}, {})


def test_corrupt_state_is_a_training_error() -> None:
    blob = encode_state(ARRAYS, {"a": 1})
    with pytest.raises(FedlabTrainingError, match="not a fedlab state blob"):
        decode_state(b"PK\x03\x04" + blob)
    with pytest.raises(FedlabTrainingError, match="corrupt"):
        decode_state(blob[:-1])
    with pytest.raises(FedlabTrainingError, match="too many"):
        decode_state(blob + b"\x00")
    with pytest.raises(FedlabTrainingError, match="corrupt"):
        decode_state(blob[:30])


def test_meta_must_be_plain_data() -> None:
    with pytest.raises(FedlabTrainingError, match="not plain data"):
        encode_state({}, {"x": object()})


# --- optimizer state --------------------------------------------------------------------------


def make_model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    return model, torch.randn(16, 5), torch.randn(16, 1)


def steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def params_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("make", "args"),
    [(torch.optim.Adam, {"lr": 0.01}), (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})],
)
def test_optimizer_state_round_trip_continues_identically(make: type, args: dict) -> None:
    model, x, y = make_model_and_data()
    optimizer = make(model.parameters(), **args)
    steps(model, optimizer, x, y, 3)
    arrays, meta = optimizer_state(optimizer)
    if make is torch.optim.Adam:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step", "state.3.exp_avg"} <= set(arrays)
    blob = encode_state({f"optimizer.{k}": v for k, v in arrays.items()}, {"optimizer": meta})
    saved = params_of(model)

    steps(model, optimizer, x, y, 4)  # the original, continuing
    expected = params_of(model)

    restored_arrays, restored_meta = decode_state(blob)
    model2, _, _ = make_model_and_data()
    model2.load_state_dict({k: torch.tensor(v) for k, v in saved.items()})
    optimizer2 = make(model2.parameters(), **args)
    load_optimizer_state(
        optimizer2, {k.removeprefix("optimizer."): v for k, v in restored_arrays.items()}, restored_meta["optimizer"]
    )
    steps(model2, optimizer2, x, y, 4)
    assert_same(params_of(model2), expected)


def test_without_the_state_adam_continues_differently() -> None:
    model, x, y = make_model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    steps(model, optimizer, x, y, 3)
    saved = params_of(model)
    steps(model, optimizer, x, y, 2)
    model2, _, _ = make_model_and_data()
    model2.load_state_dict({k: torch.tensor(v) for k, v in saved.items()})
    steps(model2, torch.optim.Adam(model2.parameters(), lr=0.01), x, y, 2)
    assert not np.array_equal(params_of(model2)["0.weight"], params_of(model)["0.weight"])


def test_hyperparameters_are_the_current_ones_unless_asked() -> None:
    model, x, y = make_model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    steps(model, optimizer, x, y, 1)
    arrays, meta = optimizer_state(optimizer)
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    load_optimizer_state(fresh, arrays, meta)
    assert fresh.param_groups[0]["lr"] == 0.5
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"],
                       optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"])
    restored = torch.optim.Adam(model.parameters(), lr=0.5)
    load_optimizer_state(restored, arrays, meta, keep_hyperparameters=False)
    assert restored.param_groups[0]["lr"] == 0.01


def test_saved_arrays_are_copies_of_the_optimizer_state() -> None:
    model, x, y = make_model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps(model, optimizer, x, y, 1)
    arrays, _ = optimizer_state(optimizer)
    before = arrays["state.0.momentum_buffer"].copy()
    steps(model, optimizer, x, y, 1)
    assert np.array_equal(arrays["state.0.momentum_buffer"], before)


def test_optimizer_state_that_does_not_fit_is_a_training_error() -> None:
    model, x, y = make_model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    steps(model, optimizer, x, y, 1)
    arrays, meta = optimizer_state(optimizer)
    other = torch.optim.Adam(nn.Linear(2, 2).parameters())
    with pytest.raises(FedlabTrainingError, match="parameter groups differ"):
        load_optimizer_state(other, arrays, meta)
    with pytest.raises(FedlabTrainingError, match="state.<index>.<key>"):
        load_optimizer_state(optimizer, {"exp_avg": arrays["state.0.exp_avg"]}, meta)


# --- training arguments and the test split ----------------------------------------------------


def test_training_args_defaults_and_values() -> None:
    assert TrainingArgs.from_dict({}) == TrainingArgs()
    assert TrainingArgs.from_dict(None) == TrainingArgs()
    args = TrainingArgs.from_dict({"epochs": np.int64(3), "test_ratio": 0, "fedprox_mu": 1,
                                   "optimizer_args": {"lr": 0.1}, "shuffle": False, "num_updates": None})
    assert args.epochs == 3 and type(args.epochs) is int
    assert args.test_ratio == 0.0 and isinstance(args.test_ratio, float)
    assert args.fedprox_mu == 1.0 and args.optimizer_args == {"lr": 0.1} and args.shuffle is False


def test_unknown_training_args_are_named_with_the_valid_keys() -> None:
    with pytest.raises(FedlabTrainingError, match=r"argument 'epoch'; valid keys are batch_size, dp_args, epochs"):
        TrainingArgs.from_dict({"epoch": 3})
    with pytest.raises(FedlabTrainingError, match=r"arguments 'a', 'b'"):
        TrainingArgs.from_dict({"b": 1, "a": 2})


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs", 0), ("epochs", "3"), ("epochs", 2.0), ("epochs", True), ("batch_size", -1), ("num_updates", 0),
     ("test_ratio", 1.0), ("test_ratio", -0.1), ("test_ratio", "0.2"), ("seed", -1), ("seed", 2**40),
     ("fedprox_mu", -1.0), ("fedprox_mu", float("nan")), ("progress_interval", None), ("shuffle", 1),
     ("test_on_local_updates", "yes"), ("optimizer_args", [("lr", 1)]), ("optimizer_args", {1: 2})],
)
def test_bad_training_arg_types_name_the_key(key: str, value: object) -> None:
    with pytest.raises(FedlabTrainingError, match=f"training argument {key} must be"):
        TrainingArgs.from_dict({key: value})


def test_split_is_fixed_for_a_seed_disjoint_and_complete() -> None:
    train, test = split_indices(100, 0.25, seed=3)
    assert len(test) == 25 and len(train) == 75
    assert sorted([*train, *test]) == list(range(100))
    again_train, again_test = split_indices(100, 0.25, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not np.array_equal(split_indices(100, 0.25, seed=4)[1], test)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_split_edge_cases() -> None:
    assert [len(a) for a in split_indices(10, 0.0, 0)] == [10, 0]
    assert [len(a) for a in split_indices(10, 0.01, 0)] == [9, 1]
    assert [len(a) for a in split_indices(10, 0.99, 0)] == [1, 9]
    assert [len(a) for a in split_indices(1, 0.5, 0)] == [1, 0]
    assert [len(a) for a in split_indices(0, 0.5, 0)] == [0, 0]
    with pytest.raises(FedlabTrainingError, match="test_ratio"):
        split_indices(10, 1.0, 0)
