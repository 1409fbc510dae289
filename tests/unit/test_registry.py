"""The dataset registry: schema, add/list/get/remove/search, atomicity, sharing one file, errors."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path

import msgspec
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer

import fedlab.node.registry as registry_module
from fedlab.errors import FedlabConfigError, FedlabDatasetError
from fedlab.node.registry import SCHEMA_VERSION, DatasetRecord, DatasetRegistry, create_schema
from fedlab.protocol.messages import DatasetInfo


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "node" / "node.db"
    path.parent.mkdir()
    create_schema(path)
    return path


@pytest.fixture
def registry(db_path: Path) -> DatasetRegistry:
    return DatasetRegistry(db_path)


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "small.csv"
    path.parent.mkdir(exist_ok=True)
    pd.DataFrame({"age": [50, 61, 70], "bmi": [21.5, 30.1, 25.0]}).to_csv(path, index=False)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "xray"
    for label, count in {"normal": 2, "pneumonia": 3}.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (10, 12)).save(root / label / f"{i}.png")
    return root


def raw_rows(db_path: Path) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT * FROM datasets").fetchall()


# --- schema -----------------------------------------------------------------------------------


def test_create_schema_tables_version_and_wal(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        columns = [r[1] for r in conn.execute("PRAGMA table_info(datasets)")]
    assert {"datasets", "schema_version"} <= tables
    assert versions == [(SCHEMA_VERSION,)]
    assert mode == "wal"
    assert columns == [
        "dataset_id",
        "name",
        "tags",
        "data_type",
        "path",
        "description",
        "metadata",
        "created_at",
    ]


def test_create_schema_is_idempotent(db_path: Path, csv_path: Path) -> None:
    DatasetRegistry(db_path).add("d", ["t"], "csv", csv_path)
    create_schema(db_path)
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    assert [r.name for r in DatasetRegistry(db_path).list()] == ["d"]


def test_create_schema_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="cannot be used"):
        create_schema(tmp_path / "no" / "such" / "node.db")


def test_create_schema_refuses_newer_version(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(FedlabConfigError, match="newer than this fedlab"):
        create_schema(db_path)


# --- opening a registry -----------------------------------------------------------------------


def test_registry_on_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="no dataset registry at .*fedlab node init"):
        DatasetRegistry(tmp_path / "node.db")
    assert not (tmp_path / "node.db").exists()


def test_registry_on_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(FedlabConfigError, match="cannot be used"):
        DatasetRegistry(path)


def test_registry_on_database_without_schema(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(FedlabConfigError, match="not a fedlab dataset registry"):
        DatasetRegistry(path)


def test_registry_on_newer_schema(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(FedlabConfigError, match="schema version 99.*upgrade fedlab"):
        DatasetRegistry(db_path)


def test_damaged_table_is_translated(registry: DatasetRegistry, db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("DROP TABLE datasets")
    with pytest.raises(FedlabConfigError, match="cannot be used.*no such table"):
        registry.list()


def test_damaged_row_is_translated(registry: DatasetRegistry, csv_path: Path) -> None:
    registry.add("d", ["t"], "csv", csv_path)
    with closing(sqlite3.connect(registry.db_path)) as conn, conn:
        conn.execute("UPDATE datasets SET metadata = '{not json'")
    with pytest.raises(FedlabConfigError, match="entry of dataset 'd' is damaged.*remove it"):
        registry.list()
    registry.remove("d")  # a damaged entry can still be removed
    assert registry.list() == []


# --- add --------------------------------------------------------------------------------------


def test_add_csv(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("small", ["cancer", "tabular"], "csv", csv_path, description="three rows")
    assert re.fullmatch(r"dataset-[0-9a-f]{12}", record.dataset_id)
    assert record.name == "small"
    assert record.tags == ("cancer", "tabular")
    assert record.data_type == "csv"
    assert record.path == str(csv_path.resolve())
    assert record.description == "three rows"
    assert record.metadata == {
        "n_samples": 3,
        "columns": ["age", "bmi"],
        "dtypes": {"age": "int64", "bmi": "float64"},
        "shape": [3, 2],
    }
    assert record.n_samples == 3
    assert record.shape == [3, 2]
    assert datetime.fromisoformat(record.created_at).tzinfo is not None
    assert registry.get("small") == record
    assert registry.get(record.dataset_id) == record


def test_add_images(registry: DatasetRegistry, image_dir: Path) -> None:
    record = registry.add("xray", ["imaging"], "images", image_dir)
    assert record.metadata["classes"] == ["normal", "pneumonia"]
    assert record.metadata["image_shape"] == [12, 10]
    assert record.metadata["channels"] == 1
    assert record.shape == [5, 12, 10, 1]
    assert registry.get("xray") == record


def test_add_breast_cancer(registry: DatasetRegistry, tmp_path: Path) -> None:
    path = tmp_path / "bc.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(path, index=False)
    record = registry.add("breast_cancer", ["cancer"], "csv", path)
    assert record.shape == [569, 31]
    assert registry.get("breast_cancer").metadata["columns"][-1] == "target"


def test_add_stores_resolved_absolute_path(
    registry: DatasetRegistry, csv_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(csv_path.parent)
    record = registry.add("d", ["t"], "csv", Path("..") / "data" / csv_path.name)
    assert record.path == str(csv_path.resolve())
    assert Path(raw_rows(registry.db_path)[0][4]).is_absolute()


def test_add_cleans_tags_and_name(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("  small  ", [" b ", "a", "b", "a ", "c"], "csv", csv_path)
    assert record.name == "small"
    assert record.tags == ("b", "a", "c")
    assert json.loads(raw_rows(registry.db_path)[0][2]) == ["b", "a", "c"]


def test_add_accepts_tuple_of_tags(registry: DatasetRegistry, csv_path: Path) -> None:
    assert registry.add("d", ("x", "y"), "csv", csv_path).tags == ("x", "y")


def test_add_name_of_256_characters(registry: DatasetRegistry, csv_path: Path) -> None:
    assert registry.add("n" * 256, ["t"], "csv", csv_path).name == "n" * 256


@pytest.mark.parametrize(
    ("name", "match"),
    [("", "must not be empty"), ("   ", "must not be empty"), ("n" * 257, "at most 256")],
)
def test_add_rejects_bad_name(registry: DatasetRegistry, csv_path: Path, name: str, match: str) -> None:
    with pytest.raises(FedlabDatasetError, match=match):
        registry.add(name, ["t"], "csv", csv_path)
    assert registry.list() == []


@pytest.mark.parametrize(
    ("tags", "match"),
    [
        ([], "at least one tag"),
        ("cancer", "must be a list of strings"),
        (["ok", ""], "non-empty string"),
        (["ok", "  "], "non-empty string"),
        (["ok", 3], "non-empty string"),
        (["a,b"], "contains a comma"),
        (["t" * 129], "longer than 128"),
    ],
)
def test_add_rejects_bad_tags(registry: DatasetRegistry, csv_path: Path, tags: object, match: str) -> None:
    with pytest.raises(FedlabDatasetError, match=match):
        registry.add("d", tags, "csv", csv_path)  # type: ignore[arg-type]
    assert registry.list() == []


@pytest.mark.parametrize("data_type", ["CSV", "image", "parquet", ""])
def test_add_rejects_unknown_type(registry: DatasetRegistry, csv_path: Path, data_type: str) -> None:
    with pytest.raises(FedlabDatasetError, match="unknown dataset type.*csv, images"):
        registry.add("d", ["t"], data_type, csv_path)


def test_add_rejects_overlong_description(registry: DatasetRegistry, csv_path: Path) -> None:
    with pytest.raises(FedlabDatasetError, match="description"):
        registry.add("d", ["t"], "csv", csv_path, description="x" * 65537)


def test_add_inspects_before_inserting(registry: DatasetRegistry, tmp_path: Path, image_dir: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(FedlabDatasetError, match="does not exist"):
        registry.add("d", ["t"], "csv", tmp_path / "missing.csv")
    with pytest.raises(FedlabDatasetError, match="is empty"):
        registry.add("d", ["t"], "csv", empty)
    with pytest.raises(FedlabDatasetError, match="is a directory"):
        registry.add("d", ["t"], "csv", image_dir)
    assert raw_rows(registry.db_path) == []


def test_add_duplicate_name(registry: DatasetRegistry, csv_path: Path, image_dir: Path) -> None:
    first = registry.add("d", ["t"], "csv", csv_path)
    with pytest.raises(FedlabDatasetError, match="already registered") as info:
        registry.add("d", ["other"], "images", image_dir)
    message = str(info.value)
    assert "fedlab node dataset remove" in message
    assert str(registry.db_path.parent) in message
    assert "pick another name" in message
    assert registry.list() == [first]


def test_add_duplicate_after_name_stripping(registry: DatasetRegistry, csv_path: Path) -> None:
    registry.add("d", ["t"], "csv", csv_path)
    with pytest.raises(FedlabDatasetError, match="already registered"):
        registry.add(" d ", ["t"], "csv", csv_path)


def test_failed_insert_leaves_no_row(
    registry: DatasetRegistry, csv_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error inside the transaction (here: metadata that cannot be stored) rolls it back."""
    monkeypatch.setattr(registry_module, "inspect_csv", lambda path: {"n_samples": object()})
    with pytest.raises(TypeError):
        registry.add("d", ["t"], "csv", csv_path)
    assert raw_rows(registry.db_path) == []


def test_integrity_error_becomes_duplicate_message(
    registry: DatasetRegistry, csv_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the in-transaction check were passed, the UNIQUE constraint gives the same error."""
    registry.add("d", ["t"], "csv", csv_path)
    real_connect = registry_module._connect

    class NoSelect:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *params: object) -> object:
            if sql.startswith("SELECT 1 FROM datasets"):
                return self.conn.execute("SELECT 1 WHERE 0")
            return self.conn.execute(sql, *params)

        def __enter__(self) -> NoSelect:
            self.conn.__enter__()
            return self

        def __exit__(self, *exc: object) -> object:
            return self.conn.__exit__(*exc)

    @contextmanager
    def patched(db_path: Path, **kwargs: bool) -> Iterator[NoSelect]:
        with real_connect(db_path, **kwargs) as conn:
            yield NoSelect(conn)

    monkeypatch.setattr(registry_module, "_connect", patched)
    with pytest.raises(FedlabDatasetError, match="already registered"):
        registry.add("d", ["t"], "csv", csv_path)
    monkeypatch.undo()
    assert len(raw_rows(registry.db_path)) == 1


def test_other_integrity_errors_are_not_reported_as_duplicates(
    registry: DatasetRegistry, csv_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = registry.add("a", ["t"], "csv", csv_path)
    fixed = uuid.UUID(hex=first.dataset_id.removeprefix("dataset-") + "0" * 20)
    monkeypatch.setattr(registry_module.uuid, "uuid4", lambda: fixed)
    with pytest.raises(FedlabConfigError, match="UNIQUE constraint failed: datasets.dataset_id"):
        registry.add("b", ["t"], "csv", csv_path)
    assert registry.list() == [first]


def test_busy_database_is_translated(
    registry: DatasetRegistry, csv_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "_BUSY_TIMEOUT_S", 0.1)
    with closing(sqlite3.connect(registry.db_path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(FedlabDatasetError, match="stayed busy.*try again"):
            registry.add("d", ["t"], "csv", csv_path)
        holder.execute("ROLLBACK")
    assert registry.list() == []


# --- list / get / remove ----------------------------------------------------------------------


def test_list_ordered_by_name(registry: DatasetRegistry, csv_path: Path) -> None:
    for name in ["zeta", "alpha", "Mid", "beta"]:
        registry.add(name, ["t"], "csv", csv_path)
    assert [r.name for r in registry.list()] == ["Mid", "alpha", "beta", "zeta"]


def test_list_empty(registry: DatasetRegistry) -> None:
    assert registry.list() == []


def test_get_unknown_lists_available(registry: DatasetRegistry, csv_path: Path) -> None:
    registry.add("alpha", ["t"], "csv", csv_path)
    registry.add("beta", ["t"], "csv", csv_path)
    with pytest.raises(
        FedlabDatasetError, match="no dataset named 'gamma'.*registered datasets: alpha, beta"
    ):
        registry.get("gamma")


def test_get_unknown_on_empty_registry(registry: DatasetRegistry) -> None:
    with pytest.raises(FedlabDatasetError, match="no datasets are registered.*fedlab node dataset list"):
        registry.get("anything")


def test_get_prefers_id_over_name(registry: DatasetRegistry, csv_path: Path) -> None:
    first = registry.add("first", ["t"], "csv", csv_path)
    impostor = registry.add(first.dataset_id, ["t"], "csv", csv_path)
    assert registry.get(first.dataset_id) == first
    assert registry.get(impostor.dataset_id) == impostor


def test_remove_by_name_and_by_id(registry: DatasetRegistry, csv_path: Path) -> None:
    a = registry.add("a", ["t"], "csv", csv_path)
    b = registry.add("b", ["t"], "csv", csv_path)
    assert registry.remove("a") == a
    assert registry.remove(b.dataset_id) == b
    assert registry.list() == []
    assert csv_path.exists()


def test_remove_unknown(registry: DatasetRegistry, csv_path: Path) -> None:
    registry.add("a", ["t"], "csv", csv_path)
    with pytest.raises(FedlabDatasetError, match="no dataset named 'b'.*registered datasets: a"):
        registry.remove("b")
    assert len(registry.list()) == 1


def test_name_can_be_reused_after_remove(registry: DatasetRegistry, csv_path: Path) -> None:
    first = registry.add("a", ["t"], "csv", csv_path)
    registry.remove("a")
    second = registry.add("a", ["t"], "csv", csv_path)
    assert second.dataset_id != first.dataset_id


# --- two registries, one file -----------------------------------------------------------------


def test_two_registries_see_each_others_changes(db_path: Path, csv_path: Path) -> None:
    cli_side, node_side = DatasetRegistry(db_path), DatasetRegistry(db_path)
    record = cli_side.add("d", ["t"], "csv", csv_path)
    assert node_side.get("d") == record
    assert node_side.search(["t"]) == [record]
    node_side.remove("d")
    assert cli_side.list() == []


def test_reader_does_not_see_uncommitted_write(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("d", ["t"], "csv", csv_path)
    with closing(sqlite3.connect(registry.db_path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM datasets")
        assert registry.list() == [record]  # WAL: readers are not blocked and see the last commit
        writer.execute("COMMIT")
    assert registry.list() == []


# --- search -----------------------------------------------------------------------------------


def test_search_requires_all_tags(registry: DatasetRegistry, csv_path: Path) -> None:
    a = registry.add("a", ["cancer", "tabular"], "csv", csv_path)
    b = registry.add("b", ["cancer"], "csv", csv_path)
    c = registry.add("c", ["tabular", "cardio"], "csv", csv_path)
    assert registry.search(["cancer"]) == [a, b]
    assert registry.search(["tabular"]) == [a, c]
    assert registry.search(["cancer", "tabular"]) == [a]
    assert registry.search(["tabular", "cancer", "cancer"]) == [a]
    assert registry.search([" cancer "]) == [a, b]
    assert registry.search(["cancer", "cardio"]) == []
    assert registry.search(["unknown"]) == []


def test_search_is_exact_not_substring(registry: DatasetRegistry, csv_path: Path) -> None:
    registry.add("a", ["cancer-breast"], "csv", csv_path)
    assert registry.search(["cancer"]) == []
    assert registry.search(["Cancer-breast"]) == []


def test_search_rejects_no_tags(registry: DatasetRegistry) -> None:
    with pytest.raises(FedlabDatasetError, match="at least one tag"):
        registry.search([])


# --- records and DatasetInfo ------------------------------------------------------------------


def test_record_is_frozen_and_hashable(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("a", ["t"], "csv", csv_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "b"  # type: ignore[misc]
    assert record in {record}


def test_to_info_csv_has_no_path(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("a", ["t", "u"], "csv", csv_path, description="desc")
    info = record.to_info()
    assert isinstance(info, DatasetInfo)
    assert not hasattr(info, "path")
    encoded = msgspec.json.encode(info)
    assert str(csv_path) not in encoded.decode()
    assert csv_path.name not in encoded.decode()
    decoded = msgspec.json.decode(encoded, type=DatasetInfo)  # validates every constraint
    assert decoded == info
    assert info.dataset_id == record.dataset_id
    assert info.name == "a"
    assert info.tags == ["t", "u"]
    assert info.data_type == "csv"
    assert info.shape == [3, 2]
    assert info.description == "desc"
    assert info.columns == ["age", "bmi"]
    assert info.dtypes == {"age": "int64", "bmi": "float64"}
    assert info.n_samples == 3
    assert info.classes == []
    assert info.image_shape == []
    assert info.channels == 0


def test_to_info_images(registry: DatasetRegistry, image_dir: Path) -> None:
    info = registry.add("x", ["imaging"], "images", image_dir).to_info()
    assert msgspec.json.decode(msgspec.json.encode(info), type=DatasetInfo) == info
    assert str(image_dir) not in msgspec.json.encode(info).decode()
    assert info.classes == ["normal", "pneumonia"]
    assert info.image_shape == [12, 10]
    assert info.channels == 1
    assert info.n_samples == 5
    assert info.shape == [5, 12, 10, 1]
    assert info.columns == []


def test_record_round_trips_through_database(registry: DatasetRegistry, csv_path: Path) -> None:
    record = registry.add("a", ["t"], "csv", csv_path)
    (row,) = raw_rows(registry.db_path)
    assert DatasetRecord._from_row(row) == record
