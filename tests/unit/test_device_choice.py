"""Which device a round trains on: the node's ``device`` setting in config.toml, ``use_gpu``, the reply's
device fields and the history's columns. Pure rules: no torch device is touched here."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlab.errors import FedlabConfigError, FedlabTrainingError
from fedlab.node.config import CONFIG_FILE, init_node_dir, load_config
from fedlab.protocol import DecodeError, decode, encode, make_envelope
from fedlab.researcher.training_jobs import NodeRound
from fedlab.researcher.training_tables import history_frame, history_row
from fedlab.training.args import TrainingArgs
from fedlab.training.device import DeviceChoice, check_device_setting, choose_device
from fedlab.training.messages import TrainReply


@pytest.mark.parametrize("text, setting", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
                                           ("cuda:3", "cuda:3"), (" CUDA:01 ", "cuda:1"), ("Auto", "auto")])
def test_device_settings_are_normalised(text: str, setting: str) -> None:
    assert check_device_setting(text) == setting


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:-1", "cuda:a", "cuda:1234", "cpu:0", "auto:0", "mps", "",
                                   "cuda 0", 0, None, True])
def test_bad_device_settings_say_what_is_allowed(value: object) -> None:
    with pytest.raises(FedlabConfigError, match=r'is not one of "auto", "cpu", "cuda" or "cuda:N"'):
        check_device_setting(value)


def test_auto_gives_a_gpu_only_to_a_round_that_asks_and_falls_back_with_a_note() -> None:
    assert choose_device("auto", False, 2, owner="node a") == choose_device("auto", False, 0) == DeviceChoice("cpu")
    assert choose_device("auto", True, 2, owner="node a").device == "cuda:0"
    assert choose_device("auto", True, 2).note == ""
    fallback = choose_device("auto", True, 0, owner="node a")
    assert fallback.device == "cpu"
    assert fallback.note == "use_gpu: node a has no CUDA GPU that torch can use; this round trained on the CPU"


def test_cpu_is_the_operators_rule_whatever_use_gpu_says() -> None:
    assert choose_device("cpu", False, 4) == DeviceChoice("cpu")
    refused = choose_device("cpu", True, 4, owner="node a")
    assert refused.device == "cpu" and 'node a trains on the CPU only (its operator set device = "cpu")' in refused.note


def test_cuda_trains_every_round_on_that_gpu_and_says_so_when_not_asked() -> None:
    assert choose_device("cuda", True, 1) == DeviceChoice("cuda:0")
    assert choose_device("cuda:1", True, 2) == DeviceChoice("cuda:1")
    forced = choose_device("cuda:1", False, 2, owner="node a")
    assert forced.device == "cuda:1"
    assert forced.note == ('node a trains every round on its GPU (its operator set device = "cuda:1"), so this round '
                           "trained on cuda:1 although use_gpu is False")


def test_a_gpu_the_node_does_not_have_is_an_error_for_its_operator() -> None:
    with pytest.raises(FedlabConfigError, match=r"node a is set to train on cuda .* torch there sees no CUDA GPU; "
                                                r"its operator .* sets device = \"auto\" or \"cpu\""):
        choose_device("cuda", False, 0, owner="node a")
    with pytest.raises(FedlabConfigError, match=r"set to train on cuda:2 .* sees 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        choose_device("cuda:2", True, 2, owner="node a")
    with pytest.raises(FedlabConfigError, match=r"sees 1 CUDA GPU \(cuda:0 to cuda:0\)"):
        choose_device("cuda:1", True, 1)


def test_use_gpu_is_a_checked_training_argument() -> None:
    assert TrainingArgs().use_gpu is False
    assert TrainingArgs.from_dict({"use_gpu": True}).use_gpu is True
    for bad in (1, "yes", None):
        with pytest.raises(FedlabTrainingError, match=r"training argument use_gpu must be True or False"):
            TrainingArgs.from_dict({"use_gpu": bad})


# -- config.toml ------------------------------------------------------------------------------------
def _set_device(directory: Path, line: str) -> Path:
    path = directory / CONFIG_FILE
    text = path.read_text(encoding="utf-8")
    assert 'device = "auto"' in text
    path.write_text(text.replace('device = "auto"', line), encoding="utf-8")
    return directory


def test_init_writes_device_auto_with_a_comment_saying_what_each_value_does(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n1")
    assert config.device == "auto" and load_config(tmp_path / "n").device == "auto"
    lines = (tmp_path / "n" / CONFIG_FILE).read_text(encoding="utf-8").splitlines()
    at = lines.index('device = "auto"')
    comment = " ".join(line for line in lines[at - 5:at] if line.startswith("#"))
    for words in ('"auto" (the default)', "use_gpu=True", '"cpu"', '"cuda" or "cuda:N"', "docs/gpu.md"):
        assert words in comment


@pytest.mark.parametrize("line, device", [('device = "cpu"', "cpu"), ('device = "cuda:2"', "cuda:2"),
                                          ('device = "CUDA"', "cuda")])
def test_edited_device_is_read(tmp_path: Path, line: str, device: str) -> None:
    init_node_dir(tmp_path / "n", "n1")
    assert load_config(_set_device(tmp_path / "n", line)).device == device


@pytest.mark.parametrize("line, message", [
    ('device = "gpu"', r"config.toml: device 'gpu' is not one of \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    ('device = "cuda:x"', r"device 'cuda:x' is not one of"),
    ("device = 0", r"config.toml: device must be a string, not int 0"),
    ("device = true", r"config.toml: device must be a string, not bool True"),
])
def test_bad_device_in_config_is_a_clear_error(tmp_path: Path, line: str, message: str) -> None:
    init_node_dir(tmp_path / "n", "n1")
    with pytest.raises(FedlabConfigError, match=message):
        load_config(_set_device(tmp_path / "n", line))


# -- the reply and the history ----------------------------------------------------------------------
def _reply(**fields: object) -> TrainReply:
    return TrainReply(experiment_id="e", round=1, dataset_id="d", params=[], n_samples=3, **fields)  # type: ignore[arg-type]


def _decoded(reply: TrainReply) -> object:
    """``reply`` through the real wire: encoded by a node, decoded (and checked) by the researcher."""
    return decode(encode(make_envelope(reply, "node-1"))).content


def test_the_reply_carries_the_device_and_its_note_and_bounds_them_at_decode() -> None:
    reply = _decoded(_reply(device="cuda:0", device_note="use_gpu: ..."))
    assert isinstance(reply, TrainReply) and (reply.device, reply.device_note) == ("cuda:0", "use_gpu: ...")
    silent = _decoded(_reply())
    assert isinstance(silent, TrainReply) and silent.device == ""  # a node that does not say
    for bad in ({"device": "CUDA:0"}, {"device": "cuda:0; rm"}, {"device": "x" * 40}, {"device_note": "n" * 1025}):
        with pytest.raises(DecodeError, match=r"device"):
            _decoded(_reply(**bad))


def test_history_has_a_device_column_and_the_notes_when_some_round_has_one() -> None:
    plain = [history_row(1, "training", "n1", "a", NodeRound("n1", "ok", device="cpu")),
             history_row(1, "training", "n2", "b", NodeRound("n2", "ok", device="cuda:0")),
             history_row(1, "training", "n3", "c", NodeRound("n3", "missing", reason="timeout"))]
    frame = history_frame(plain)
    assert frame["device"].tolist() == ["cpu", "cuda:0", ""] and "device_note" not in frame.columns
    noted = [*plain, history_row(2, "training", "n1", "a", NodeRound("n1", "ok", device="cpu", device_note="why"))]
    frame = history_frame(noted)
    assert frame["device_note"].tolist() == ["", "", "", "why"]
    old = {k: v for k, v in plain[0].items() if k not in ("device", "device_note")}  # a record from a breakpoint
    assert history_frame([old])["device"].tolist() == [""]

