"""``load_params(adopt=True)``: the training worker's frames become the model's memory, without a copy, wherever
torch allows; everything else is copied as before, and the default never shares the caller's arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fedlab.training.convert import load_params, model_params


class Mixed(nn.Module):
    """float32 and float16 parameters, BatchNorm's int64 counter (0-d), a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.zeros(5, dtype=torch.float16))
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("mask", torch.zeros(3, dtype=torch.bool))


def _arrays(model: nn.Module, fill: float = 0.5) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in model.state_dict().items():
        array = np.empty(tuple(tensor.shape), dtype=tensor.numpy().dtype)
        array[...] = fill if array.dtype != np.bool_ else True
        out[name] = array
    return out


def _shares(model: nn.Module, name: str, array: np.ndarray) -> bool:
    return bool(np.shares_memory(model.state_dict()[name].numpy(), array))


def test_adopted_arrays_are_the_models_memory_in_every_dtype() -> None:
    model = Mixed()
    weight = model.fc.weight
    arrays = _arrays(model)
    load_params(model, arrays, list(arrays), adopt=True)
    assert all(_shares(model, name, array) for name, array in arrays.items())
    assert model.fc.weight is weight and weight.requires_grad  # the same Parameter, still trainable
    assert model.bn.num_batches_tracked.dtype == torch.int64 and model.bn.num_batches_tracked.dim() == 0
    model.bn.train()
    model.bn(torch.randn(4, 3))  # updates the running statistics and the counter in place
    assert int(arrays["bn.num_batches_tracked"]) == 1 and not np.all(arrays["bn.running_mean"] == 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made afterwards, as in a round
    model.fc(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert np.all(arrays["fc.weight"] < 0.5)  # the step wrote into the array
    out = model_params(model, list(arrays), copy=False)
    assert all(np.shares_memory(out[name], arrays[name]) for name in arrays)  # results: views of the same bytes


def test_what_cannot_be_adopted_is_copied() -> None:
    model = nn.Linear(4, 3)
    model.weight = nn.Parameter(torch.zeros(3, 4).t().contiguous().t())  # non-contiguous (a transposed layout)
    assert not model.weight.is_contiguous()
    raw = bytearray(3 * 4 + 1)
    misaligned = np.frombuffer(raw, np.float32, count=3, offset=1)  # a float32 array one byte off
    assert not misaligned.flags.aligned
    arrays = {"weight": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": misaligned}
    load_params(model, arrays, ["weight", "bias"], adopt=True)
    assert not model.weight.is_contiguous() and not _shares(model, "weight", arrays["weight"])
    assert np.array_equal(model.weight.detach().numpy(), arrays["weight"])
    assert not _shares(model, "bias", arrays["bias"])
    as64 = {"weight": np.ones((3, 4)), "bias": np.ones(3)}  # float64 into a float32 model: cast
    plain = nn.Linear(4, 3)
    load_params(plain, as64, ["weight", "bias"], adopt=True)
    assert plain.weight.dtype == torch.float32 and not _shares(plain, "weight", as64["weight"])
    assert torch.equal(plain.weight, torch.ones(3, 4))


def test_a_bfloat16_model_gets_cast_copies() -> None:
    model = nn.Linear(4, 3).to(torch.bfloat16)
    arrays = {"weight": np.full((3, 4), 0.25, np.float32), "bias": np.full(3, 2.0, np.float32)}
    load_params(model, arrays, ["weight", "bias"], adopt=True)
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, torch.full((3, 4), 0.25).bfloat16())
    arrays["weight"][...] = 9.0
    assert torch.equal(model.weight, torch.full((3, 4), 0.25).bfloat16())  # a copy: independent


def test_read_only_arrays_and_the_default_are_never_shared() -> None:
    model = Mixed()
    arrays = _arrays(model)
    read_only = {}
    for name, array in arrays.items():
        view = array.view()
        view.flags.writeable = False
        read_only[name] = view
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would be an error
        load_params(model, read_only, list(arrays), adopt=True)
    assert not any(_shares(model, name, array) for name, array in arrays.items())
    other = Mixed()
    load_params(other, arrays, list(arrays))  # adopt=False: the caller's arrays stay the caller's
    assert not any(_shares(other, name, array) for name, array in arrays.items())
    assert torch.equal(other.fc.weight, torch.full((3, 4), 0.5))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight


def test_tied_weights_stay_tied() -> None:
    model = Tied()
    arrays = {"a.weight": np.full((3, 3), 1.0, np.float32), "b.weight": np.full((3, 3), 2.0, np.float32)}
    assert list(model.state_dict()) == ["a.weight", "b.weight"]
    load_params(model, arrays, ["a.weight", "b.weight"], adopt=True)
    assert model.a.weight is model.b.weight  # one Parameter, trained as one
    assert torch.equal(model.a.weight, torch.full((3, 3), 2.0))  # the last name's values, as a copy would give
    assert len(list(model.parameters())) == 1


@pytest.mark.parametrize("adopt", [False, True])
def test_names_and_shapes_are_checked_either_way(adopt: bool) -> None:
    from fedlab.errors import FedlabTrainingError

    model = nn.Linear(4, 3)
    with pytest.raises(FedlabTrainingError, match="missing bias"):
        load_params(model, {"weight": np.zeros((3, 4), np.float32)}, ["weight", "bias"], adopt=adopt)
    with pytest.raises(FedlabTrainingError, match=r"received with shape \[3, 5\]"):
        load_params(model, {"weight": np.zeros((3, 5), np.float32), "bias": np.zeros(3, np.float32)},
                    ["weight", "bias"], adopt=adopt)
