"""Node directory creation and config loading: the happy path and every way a config is wrong."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import tomllib
from pathlib import Path

import pytest

from fedlab.analytics.disclosure import RULE_HELP, DisclosureRules
from fedlab.errors import FedlabConfigError
from fedlab.node.config import (
    CONFIG_FILE,
    DB_FILE,
    LOG_FILE,
    NodeConfig,
    init_node_dir,
    load_config,
    validate_researcher_address,
)

VALID = {
    "node_id": "node-0123456789ab",
    "name": "hospital",
    "researcher": "tcp://127.0.0.1:5555",
    "heartbeat_interval": 1.0,
    "max_message_bytes": 1024,
    "log_level": "INFO",
}


def write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
    return directory


def toml_of(values: dict[str, object]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, str):
            rendered = '"' + value + '"'
        else:
            rendered = repr(value)
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


# --- init_node_dir ----------------------------------------------------------------------------


def test_init_creates_directory_config_and_database(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "node"
    config = init_node_dir(directory, "Hospital A")
    assert re.fullmatch(r"node-[0-9a-f]{12}", config.node_id)
    assert config.name == "Hospital A"
    assert config.directory == directory.resolve()
    assert config.researcher == "tcp://127.0.0.1:5555"
    assert config.heartbeat_interval == 1.0
    assert config.max_message_bytes == 256 * 1024 * 1024
    assert config.log_level == "INFO"
    assert (directory / CONFIG_FILE).is_file()
    assert config.db_path == directory.resolve() / DB_FILE
    assert config.log_path == directory.resolve() / LOG_FILE
    with sqlite3.connect(config.db_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {"datasets", "schema_version"} <= tables


def test_init_then_load_round_trips(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n1", researcher="tcp://researcher.example.org:6000")
    assert load_config(tmp_path / "n") == config
    assert load_config(str(tmp_path / "n")) == config


def test_init_writes_valid_toml_without_directory_key(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "n1")
    data = tomllib.loads((tmp_path / CONFIG_FILE).read_text(encoding="utf-8"))
    assert set(data) == {
        "node_id",
        "name",
        "researcher",
        "heartbeat_interval",
        "max_message_bytes",
        "log_level",
        "require_approval",
        "training_threads",
        "device",
        "insecure",
        "training_timeout",
        "secure_aggregation",
        "force_secure_aggregation",
        "secure_aggregation_min_nodes",
        "disclosure",
        "privacy",
    }
    assert data["privacy"] == {"require_dp": False, "epsilon_budget": 10.0, "delta": 1e-6, "bounds": {},
                               "categories": {}}
    assert data["insecure"] is True  # no researcher key: the config says the node is insecure
    assert isinstance(data["heartbeat_interval"], float)


def test_init_escapes_awkward_names(tmp_path: Path) -> None:
    name = 'Saint-Louis "Nord" \\ é # [x] = 1'
    config = init_node_dir(tmp_path, name)
    assert load_config(tmp_path).name == name == config.name


def test_init_leaves_no_temporary_files(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "n1")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_init_gives_each_node_a_fresh_id(tmp_path: Path) -> None:
    ids = {init_node_dir(tmp_path / str(i), "n").node_id for i in range(5)}
    assert len(ids) == 5


def test_init_accepts_existing_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    init_node_dir(tmp_path, "n1")
    assert (tmp_path / "notes.txt").read_text() == "hello"


def test_init_refuses_an_existing_node(tmp_path: Path) -> None:
    first = init_node_dir(tmp_path, "n1")
    before = (tmp_path / CONFIG_FILE).read_text()
    with pytest.raises(FedlabConfigError, match="already a fedlab node") as info:
        init_node_dir(tmp_path, "n2")
    assert first.node_id in str(info.value)
    assert "use another directory or remove it" in str(info.value)
    assert (tmp_path / CONFIG_FILE).read_text() == before


def test_init_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FedlabConfigError, match="not a directory"):
        init_node_dir(target, "n1")


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_init_refuses_empty_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(FedlabConfigError, match="node name must not be empty"):
        init_node_dir(tmp_path, name)
    assert not (tmp_path / CONFIG_FILE).exists()


def test_init_refuses_overlong_name(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="at most 256"):
        init_node_dir(tmp_path, "x" * 257)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:5555",
        "tcp://127.0.0.1",
        "tcp://:5555",
        "http://127.0.0.1:5555",
        "tcp://127.0.0.1:port",
        "tcp://127.0.0.1:5555/x",
        "tcp://host name:5555",
        "",
    ],
)
def test_init_refuses_malformed_researcher(tmp_path: Path, address: str) -> None:
    with pytest.raises(FedlabConfigError, match="tcp://HOST:PORT"):
        init_node_dir(tmp_path, "n1", researcher=address)
    assert not (tmp_path / CONFIG_FILE).exists()


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://h:99999"])
def test_init_refuses_out_of_range_port(tmp_path: Path, address: str) -> None:
    with pytest.raises(FedlabConfigError, match="1-65535"):
        init_node_dir(tmp_path, "n1", researcher=address)


@pytest.mark.parametrize(
    "address", ["tcp://localhost:1", "tcp://10.0.0.2:65535", "tcp://[::1]:5555", "tcp://my-host.example:80"]
)
def test_valid_researcher_addresses(address: str) -> None:
    assert validate_researcher_address(address) == address


# --- load_config ------------------------------------------------------------------------------


def test_load_valid_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, toml_of(VALID)))
    assert config == NodeConfig(**VALID, directory=tmp_path.resolve())


def test_load_applies_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, toml_of({"node_id": "node-1", "name": "n"})))
    assert config.researcher == "tcp://127.0.0.1:5555"
    assert config.heartbeat_interval == 1.0
    assert config.max_message_bytes == 256 * 1024 * 1024
    assert config.log_level == "INFO"


def test_load_accepts_integer_heartbeat_and_lowercase_level(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path, toml_of({**VALID, "heartbeat_interval": 2, "log_level": "debug"}))
    )
    assert config.heartbeat_interval == 2.0
    assert isinstance(config.heartbeat_interval, float)
    assert config.log_level == "DEBUG"


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="does not exist.*fedlab node init"):
        load_config(tmp_path / "nope")


def test_load_directory_that_is_not_a_node(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="is not a fedlab node directory: run `fedlab node init DIR"):
        load_config(tmp_path)


def test_load_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FedlabConfigError, match="not a directory"):
        load_config(tmp_path / "f")


def test_load_broken_toml(tmp_path: Path) -> None:
    write_config(tmp_path, 'node_id = "node-1"\nname = \n')
    with pytest.raises(FedlabConfigError, match="not valid TOML"):
        load_config(tmp_path)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(FedlabConfigError, match="not UTF-8"):
        load_config(tmp_path)


@pytest.mark.parametrize("missing", ["node_id", "name"])
def test_load_missing_required_key(tmp_path: Path, missing: str) -> None:
    values = {k: v for k, v in VALID.items() if k != missing}
    with pytest.raises(FedlabConfigError, match=f"missing required key.*{missing}"):
        load_config(write_config(tmp_path, toml_of(values)))


def test_load_unknown_keys_are_named(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of({**VALID, "colour": "blue", "zeta": 1}))
    with pytest.raises(FedlabConfigError, match="unknown key.*colour, zeta"):
        load_config(tmp_path)


def test_load_table_is_an_unknown_key(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of(VALID) + "[extra]\na = 1\n")
    with pytest.raises(FedlabConfigError, match="unknown key.*extra"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("node_id", 12),
        ("name", 1.5),
        ("researcher", 5555),
        ("heartbeat_interval", "1"),
        ("heartbeat_interval", True),
        ("max_message_bytes", 1.5),
        ("max_message_bytes", "1024"),
        ("max_message_bytes", False),
        ("log_level", 10),
    ],
)
def test_load_wrong_type(tmp_path: Path, key: str, value: object) -> None:
    write_config(tmp_path, toml_of({**VALID, key: value}))
    with pytest.raises(FedlabConfigError, match=f"{key} must be"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["0.0", "-1.0", "nan", "inf"])
def test_load_bad_heartbeat(tmp_path: Path, value: str) -> None:
    text = toml_of({k: v for k, v in VALID.items() if k != "heartbeat_interval"})
    write_config(tmp_path, text + f"heartbeat_interval = {value}\n")
    with pytest.raises(FedlabConfigError, match="heartbeat_interval must be a finite number of seconds > 0"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", [0, -5])
def test_load_bad_max_message_bytes(tmp_path: Path, value: int) -> None:
    write_config(tmp_path, toml_of({**VALID, "max_message_bytes": value}))
    with pytest.raises(FedlabConfigError, match="max_message_bytes must be > 0"):
        load_config(tmp_path)


def test_load_bad_researcher(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of({**VALID, "researcher": "localhost:5555"}))
    with pytest.raises(FedlabConfigError, match=r"config\.toml.*tcp://HOST:PORT"):
        load_config(tmp_path)


def test_load_bad_log_level(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of({**VALID, "log_level": "LOUD"}))
    with pytest.raises(FedlabConfigError, match="log_level 'LOUD' is not one of"):
        load_config(tmp_path)


@pytest.mark.parametrize("key", ["node_id", "name"])
def test_load_empty_identity(tmp_path: Path, key: str) -> None:
    write_config(tmp_path, toml_of({**VALID, key: "  "}))
    with pytest.raises(FedlabConfigError, match=f"{key} must not be empty"):
        load_config(tmp_path)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path, "n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]


# --- [disclosure] -----------------------------------------------------------------------------


def test_init_writes_every_disclosure_default_with_a_comment(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path, "n1")
    assert config.disclosure == DisclosureRules()
    text = (tmp_path / CONFIG_FILE).read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert data["disclosure"] == {
        "enabled": True,
        "min_count": 10,
        "cell_threshold": 3,
        "max_bins_fraction": 0.1,
        "min_max": "off",
        "min_max_noise": 0.05,
        "excluded_columns": [],
        "levels_max": 40,
        "levels_density": 0.33,
        "group_levels": 5,
        "threshold_resolution": 0.01,
        "threshold_allowance": 500,
        "max_thresholds": 2048,
        "max_onehot_categories": 100,
        "max_derived_cells": 20_000_000,
        "max_concurrent": 4,
    }
    lines = text.splitlines()
    table = lines[lines.index("[disclosure]") + 1 :]
    for key in data["disclosure"]:
        at = next(i for i, line in enumerate(table) if line.startswith(f"{key} = "))
        assert table[at - 1] == f"# {RULE_HELP[key]}"


def test_disclosure_defaults_when_the_table_is_absent(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, toml_of(VALID)))
    assert config.disclosure == DisclosureRules()


def test_edited_disclosure_values_are_honoured(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "n1")
    path = tmp_path / CONFIG_FILE
    text = path.read_text(encoding="utf-8")
    for old, new in [
        ("min_count = 10", "min_count = 25"),
        ("cell_threshold = 3", "cell_threshold = 5"),
        ('min_max = "off"', 'min_max = "noisy"'),
        ("min_max_noise = 0.05", "min_max_noise = 0.2"),
        ("max_bins_fraction = 0.1", "max_bins_fraction = 1"),
        ("excluded_columns = []", 'excluded_columns = ["patient_id", "notes"]'),
        ("enabled = true", "enabled = false"),
    ]:
        assert old in text
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    assert load_config(tmp_path).disclosure == DisclosureRules(
        enabled=False,
        min_count=25,
        cell_threshold=5,
        max_bins_fraction=1.0,
        min_max="noisy",
        min_max_noise=0.2,
        excluded_columns=("patient_id", "notes"),
    )


def test_partial_disclosure_table_keeps_other_defaults(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of(VALID) + '[disclosure]\nmin_max = "exact"\n')
    assert load_config(tmp_path).disclosure == DisclosureRules(min_max="exact")


def test_init_then_load_round_trips_with_disclosure(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path, "n1")
    assert load_config(tmp_path).disclosure == config.disclosure


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("min_count = 0", "min_count"),
        ('min_count = "10"', "min_count"),
        ("cell_threshold = -1", "cell_threshold"),
        ("max_bins_fraction = 1.5", "max_bins_fraction"),
        ("max_bins_fraction = 0", "max_bins_fraction"),
        ('min_max = "sometimes"', "min_max"),
        ("min_max_noise = 0.0", "min_max_noise"),
        ("min_max_noise = nan", "min_max_noise"),
        ("enabled = 1", "enabled"),
        ('excluded_columns = "patient_id"', "excluded_columns"),
        ("excluded_columns = [1, 2]", "excluded_columns"),
    ],
)
def test_bad_disclosure_values_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    write_config(tmp_path, toml_of(VALID) + f"[disclosure]\n{line}\n")
    with pytest.raises(FedlabConfigError, match=rf"config\.toml: disclosure\.{key} must be"):
        load_config(tmp_path)


def test_unknown_disclosure_key_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of(VALID) + "[disclosure]\nmin_cells = 3\n")
    with pytest.raises(FedlabConfigError, match=r"config\.toml: disclosure has unknown key.*min_cells"):
        load_config(tmp_path)


def test_disclosure_must_be_a_table(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of({**VALID, "disclosure": 5}))
    with pytest.raises(FedlabConfigError, match="disclosure must be a table"):
        load_config(tmp_path)


def test_other_tables_are_still_unknown_keys(tmp_path: Path) -> None:
    write_config(tmp_path, toml_of(VALID) + "[disclosure]\nmin_count = 5\n[extras]\nx = 1\n")
    with pytest.raises(FedlabConfigError, match="unknown key.*extras"):
        load_config(tmp_path)


@pytest.mark.parametrize("table, message", [
    ("[privacy]\nx = 1\n", r"\[privacy\] has unknown key\(s\) x"),
    ("[privacy]\nepsilon_budget = -1\n", "epsilon_budget must be a finite number >= 0"),
    ("[privacy]\ndelta = 1.0\n", "delta must be >= 0 and < 1"),
    ("[privacy]\nrequire_dp = 1\n", "require_dp must be true or false"),
    ("[privacy.bounds]\nage = [10, 0]\n", "bounds.*age must be"),
    ("[privacy.categories]\nsex = []\n", "categories.*sex must be a list"),
])
def test_privacy_table_is_checked(tmp_path: Path, table: str, message: str) -> None:
    write_config(tmp_path, toml_of(VALID) + table)
    with pytest.raises(FedlabConfigError, match=message):
        load_config(tmp_path)


def test_privacy_table_round_trips(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "site")
    path = tmp_path / "config.toml"
    text = path.read_text().replace("require_dp = false", "require_dp = true")
    text = text.replace("[privacy.bounds]\n", "[privacy.bounds]\nage = [0, 120]\n")
    path.write_text(text)
    privacy = load_config(tmp_path).privacy
    assert privacy.require_dp and privacy.bounds == {"age": (0.0, 120.0)} and privacy.epsilon_budget == 10.0


def test_init_writes_names_outside_the_bmp_as_valid_toml(tmp_path: Path) -> None:
    name = "Hôpital \U0001f3e5 \x7f"
    config = init_node_dir(tmp_path, name)
    assert load_config(tmp_path) == config
    assert load_config(tmp_path).name == name


def test_training_threads_is_read_and_checked(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "site")
    config_file = tmp_path / "config.toml"
    assert "training_threads = 0" in config_file.read_text()
    assert load_config(tmp_path).training_threads == 0
    config_file.write_text(config_file.read_text().replace("training_threads = 0", "training_threads = 2"))
    assert load_config(tmp_path).training_threads == 2
    config_file.write_text(config_file.read_text().replace("training_threads = 2", "training_threads = -1"))
    with pytest.raises(FedlabConfigError, match="training_threads must be 0"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan", "true", '"1h"'])
def test_training_timeout_must_be_a_positive_number_of_seconds(tmp_path: Path, value: str) -> None:
    init_node_dir(tmp_path, "site")
    config_file = tmp_path / "config.toml"
    text = config_file.read_text()
    assert "training_timeout = 3600.0" in text and "# Seconds one training round may take" in text
    assert load_config(tmp_path).training_timeout == 3600.0
    config_file.write_text(text.replace("training_timeout = 3600.0", "training_timeout = 90"))
    assert load_config(tmp_path).training_timeout == 90.0
    config_file.write_text(text.replace("training_timeout = 3600.0", f"training_timeout = {value}"))
    with pytest.raises(FedlabConfigError, match="training_timeout must be"):
        load_config(tmp_path)


def test_secure_aggregation_settings_are_checked(tmp_path: Path) -> None:
    init_node_dir(tmp_path, "n1")
    path = tmp_path / CONFIG_FILE
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("force_secure_aggregation = false", "force_secure_aggregation = true"),
                    encoding="utf-8")
    assert load_config(tmp_path).force_secure_aggregation
    path.write_text(text.replace("force_secure_aggregation = false", "force_secure_aggregation = true")
                    .replace("\nsecure_aggregation = true", "\nsecure_aggregation = false"), encoding="utf-8")
    with pytest.raises(FedlabConfigError, match="would answer nothing"):
        load_config(tmp_path)
    path.write_text(text.replace("secure_aggregation_min_nodes = 2", "secure_aggregation_min_nodes = 1"),
                    encoding="utf-8")
    with pytest.raises(FedlabConfigError, match="secure_aggregation_min_nodes must be 2 or more"):
        load_config(tmp_path)
