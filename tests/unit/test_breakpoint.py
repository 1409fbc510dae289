"""Breakpoints: a directory written atomically, read back exactly, and every way it can be broken
answered with a FedlabError that says what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlab.errors import FedlabError
from fedlab.researcher.breakpoint import (
    AGGREGATOR_FILE,
    JSON_FILE,
    PARAMS_FILE,
    Breakpoint,
    find_breakpoint,
    read_breakpoint,
    write_breakpoint,
)


def sample(round_current=3):
    bp = Breakpoint(
        experiment_id="exp-1", tags=["cancer"], nodes=None, node_ids=["a", "b"],
        plan_source="class P(TorchTrainingPlan):\n    pass\n", plan_class="P", model_args={"n": 3},
        training_args={"epochs": 1, "optimizer_args": {"lr": 0.1}}, aggregator="scaffold",
        aggregator_args={"server_lr": 1.0}, aggregator_meta={}, rounds=10, round_current=round_current,
        state_ids={"a": "state-a", "b": None},
        history=[{"round": 1, "node_id": "a", "status": "ok", "train_loss": 0.5, "metrics_before": {"acc": 0.9}}],
        round_timeout=60.0, share_persistent_buffers=True, breakpoint_dir="/tmp/x")
    params = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2, np.float64),
              "bn.num_batches_tracked": np.array(7, np.int64),
              "file": np.zeros(1), "allow_pickle": np.ones(1)}  # names np.savez itself uses
    return bp, params, {"c.fc.weight": np.full((2, 3), 0.5)}


def test_round_trip_keeps_everything(tmp_path):
    bp, params, arrays = sample()
    where = write_breakpoint(bp, params, arrays, tmp_path / "round-0003")
    assert sorted(p.name for p in where.iterdir()) == [AGGREGATOR_FILE, JSON_FILE, PARAMS_FILE]
    back, back_params, back_arrays = read_breakpoint(where)
    assert back.experiment_id == "exp-1" and back.state_ids == {"a": "state-a", "b": None}
    assert back.history == bp.history and back.training_args == bp.training_args
    assert list(back_params) == list(params)
    for name, value in params.items():
        assert back_params[name].dtype == value.dtype
        np.testing.assert_array_equal(back_params[name], value)
    np.testing.assert_array_equal(back_arrays["c.fc.weight"], arrays["c.fc.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["round-0003"]  # no temporary left over


def test_rewriting_replaces_atomically(tmp_path):
    bp, params, arrays = sample()
    write_breakpoint(bp, params, arrays, tmp_path / "bp")
    write_breakpoint(bp, {"fc.weight": np.zeros(2, np.float32)}, {}, tmp_path / "bp")
    _, back, _ = read_breakpoint(tmp_path / "bp")
    assert list(back) == ["fc.weight"]
    assert [p.name for p in tmp_path.iterdir()] == ["bp"]


def test_a_folder_of_rounds_gives_the_latest(tmp_path):
    for k in (1, 2, 10):
        bp, params, arrays = sample(k)
        write_breakpoint(bp, params, arrays, tmp_path / f"round-{k:04d}")
    (tmp_path / "round-0011").mkdir()  # an empty one (a crash before the rename cannot make it, but still)
    assert find_breakpoint(tmp_path).name == "round-0010"
    assert read_breakpoint(tmp_path)[0].round_current == 10


def test_missing_breakpoints_say_what_to_give(tmp_path):
    with pytest.raises(FedlabError, match="does not exist"):
        read_breakpoint(tmp_path / "nowhere")
    with pytest.raises(FedlabError, match="no round-NNNN folder"):
        read_breakpoint(tmp_path)


def npy_instead_of_npz(where):
    with open(where / PARAMS_FILE, "wb") as f:
        np.save(f, np.zeros(3))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / JSON_FILE).write_text("{not json"), "unreadable"),
    (lambda d: (d / JSON_FILE).write_text("[1, 2]"), "unreadable"),
    (lambda d: (d / PARAMS_FILE).unlink(), "is missing"),
    (lambda d: (d / PARAMS_FILE).write_bytes(b"PK\x03\x04 truncated"), "is corrupt"),
    (lambda d: (d / AGGREGATOR_FILE).write_bytes(b""), "is corrupt"),
    (npy_instead_of_npz, "is corrupt"),
])
def test_corrupt_breakpoints_are_refused_with_what_to_do(tmp_path, damage, message):
    bp, params, arrays = sample()
    where = write_breakpoint(bp, params, arrays, tmp_path / "round-0003")
    damage(where)
    with pytest.raises(FedlabError, match=message) as info:
        read_breakpoint(where)
    assert "start the experiment again" in str(info.value)


def edit_json(where, **changes):
    doc = json.loads((where / JSON_FILE).read_text())
    doc.update(changes)
    (where / JSON_FILE).write_text(json.dumps(doc))


def test_invalid_fields_and_other_versions_are_named(tmp_path):
    bp, params, arrays = sample()
    where = write_breakpoint(bp, params, arrays, tmp_path / "bp")
    edit_json(where, round_current="three")
    with pytest.raises(FedlabError, match="round_current"):
        read_breakpoint(where)
    edit_json(where, round_current=3, format_version=99)
    with pytest.raises(FedlabError, match="format version 99"):
        read_breakpoint(where)


def test_params_that_would_need_pickle_are_refused(tmp_path):
    bp, params, arrays = sample()
    where = write_breakpoint(bp, params, arrays, tmp_path / "bp")
    with open(where / PARAMS_FILE, "wb") as f:
        np.savez(f, a0=np.array([{"evil": 1}], dtype=object))
    edit_json(where, param_names=["fc.weight"])
    with pytest.raises(FedlabError, match="corrupt"):
        read_breakpoint(where)
