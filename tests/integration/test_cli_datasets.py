"""The real ``fedlab`` command in a subprocess: node init and dataset add/list/remove.

Every mistake must end with exit status 2 and exactly one ``fedlab: error:`` line, no traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer

pytestmark = pytest.mark.integration


def fedlab(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedlab", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def assert_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedlab: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def node(tmp_path: Path) -> Path:
    assert_ok(fedlab("node", "init", "node", "--name", "Hospital A", "--insecure", cwd=tmp_path))
    return tmp_path / "node"


@pytest.fixture
def breast_cancer_csv(tmp_path: Path) -> Path:
    path = tmp_path / "breast_cancer.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(path, index=False)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "xray"
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 12)).save(root / label / f"{i}.png")
    return root


def add(node: Path, name: str, kind: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return fedlab(
        "node", "dataset", "add", node, "--name", name, "--tags", "cancer,tabular", "--type", kind,
        "--path", path, *extra, cwd=node.parent,
    )  # fmt: skip


def test_version(tmp_path: Path) -> None:
    assert assert_ok(fedlab("--version", cwd=tmp_path)).strip() == "fedlab 0.1.0"


def test_init_prints_node_id_and_paths(tmp_path: Path) -> None:
    out = assert_ok(
        fedlab("node", "init", "site", "--name", "Site", "--researcher", "tcp://10.0.0.1:7000", "--insecure",
               cwd=tmp_path)
    )
    match = re.search(r"node id (node-[0-9a-f]{12})", out)
    assert match
    assert str(tmp_path / "site" / "config.toml") in out
    assert str(tmp_path / "site" / "node.db") in out
    config = (tmp_path / "site" / "config.toml").read_text()
    assert match.group(1) in config
    assert "tcp://10.0.0.1:7000" in config


def test_init_twice_is_refused(tmp_path: Path, node: Path) -> None:
    assert_error(fedlab("node", "init", node, "--name", "again", "--insecure", cwd=tmp_path), "already a fedlab node")


def test_init_with_bad_researcher(tmp_path: Path) -> None:
    assert_error(
        fedlab("node", "init", "n", "--name", "x", "--researcher", "localhost:1", "--insecure", cwd=tmp_path),
        "tcp://HOST:PORT",
    )
    assert not (tmp_path / "n" / "config.toml").exists()


def test_add_list_remove(node: Path, breast_cancer_csv: Path, images: Path) -> None:
    assert (
        assert_ok(fedlab("node", "dataset", "list", node, cwd=node.parent)).strip()
        == "no datasets registered"
    )

    out = assert_ok(add(node, "breast_cancer", "csv", breast_cancer_csv, "--description", "Wisconsin data"))
    assert len(out.strip().splitlines()) == 1
    assert "569 samples" in out
    assert "[569, 31]" in out
    csv_id = re.search(r"dataset-[0-9a-f]{12}", out)
    assert csv_id

    out = assert_ok(add(node, "xray", "images", images))
    assert "6 samples" in out
    assert "[6, 12, 16, 3]" in out

    listing = assert_ok(fedlab("node", "dataset", "list", node, cwd=node.parent)).splitlines()
    assert listing[0].split() == ["NAME", "ID", "TYPE", "TAGS", "SHAPE", "DESCRIPTION"]
    assert listing[1].split() == [
        "breast_cancer",
        csv_id.group(0),
        "csv",
        "cancer,tabular",
        "569x31",
        "Wisconsin",
        "data",
    ]
    assert listing[2].split()[0] == "xray"
    assert "6x12x16x3" in listing[2]
    assert str(breast_cancer_csv) not in "\n".join(listing)

    out = assert_ok(fedlab("node", "dataset", "remove", node, "breast_cancer", cwd=node.parent))
    assert "removed dataset 'breast_cancer'" in out
    assert breast_cancer_csv.exists()
    listing = assert_ok(fedlab("node", "dataset", "list", node, cwd=node.parent)).splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["xray"]


def test_remove_by_id(node: Path, breast_cancer_csv: Path) -> None:
    out = assert_ok(add(node, "bc", "csv", breast_cancer_csv))
    dataset_id = re.search(r"dataset-[0-9a-f]{12}", out).group(0)  # type: ignore[union-attr]
    assert_ok(fedlab("node", "dataset", "remove", node, dataset_id, cwd=node.parent))
    assert "no datasets registered" in assert_ok(fedlab("node", "dataset", "list", node, cwd=node.parent))


def test_remove_unknown(node: Path, breast_cancer_csv: Path) -> None:
    assert_ok(add(node, "bc", "csv", breast_cancer_csv))
    assert_error(
        fedlab("node", "dataset", "remove", node, "nope", cwd=node.parent), "no dataset named 'nope'", "bc"
    )


def test_add_missing_path(node: Path) -> None:
    assert_error(add(node, "d", "csv", node.parent / "missing.csv"), "does not exist")


def test_add_unreadable_csv(node: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    assert_error(add(node, "d", "csv", path), "cannot be parsed")


def test_add_not_utf8_csv(node: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("town\nBesançon\n".encode("latin-1"))
    assert_error(add(node, "d", "csv", path), "not UTF-8")


def test_add_empty_csv(node: Path, tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert_error(add(node, "d", "csv", path), "is empty")


def test_add_header_only_csv(node: Path, tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    pd.DataFrame(columns=["a", "b"]).to_csv(path, index=False)
    assert_error(add(node, "d", "csv", path), "no data rows")


def test_add_duplicate_name(node: Path, breast_cancer_csv: Path) -> None:
    assert_ok(add(node, "bc", "csv", breast_cancer_csv))
    assert_error(
        add(node, "bc", "csv", breast_cancer_csv), "already registered", "fedlab node dataset remove"
    )
    listing = assert_ok(fedlab("node", "dataset", "list", node, cwd=node.parent)).splitlines()
    assert len(listing) == 2


def test_add_bad_images(node: Path, tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"garbage")
    assert_error(add(node, "d", "images", tmp_path / "imgs"), "x.png", "not a readable image")


def test_add_empty_tags(node: Path, breast_cancer_csv: Path) -> None:
    result = fedlab(
        "node", "dataset", "add", node, "--name", "d", "--tags", ",", "--type", "csv",
        "--path", breast_cancer_csv, cwd=node.parent,
    )  # fmt: skip
    assert_error(result, "at least one tag")


@pytest.mark.parametrize("command", [["list"], ["remove", "x"]])
def test_not_a_node_directory(tmp_path: Path, command: list[str]) -> None:
    assert_error(
        fedlab("node", "dataset", command[0], tmp_path, *command[1:], cwd=tmp_path), "not a fedlab node"
    )


def test_add_to_missing_node_directory(tmp_path: Path, breast_cancer_csv: Path) -> None:
    assert_error(
        add(tmp_path / "nowhere", "d", "csv", breast_cancer_csv), "does not exist", "fedlab node init"
    )


def test_usage_errors_exit_2(tmp_path: Path, node: Path) -> None:
    for args in (
        [],
        ["node"],
        ["node", "dataset", "add", str(node), "--name", "d"],
        [
            "node",
            "dataset",
            "add",
            str(node),
            "--name",
            "d",
            "--tags",
            "t",
            "--type",
            "parquet",
            "--path",
            "x",
        ],
        ["demo", "--nodes", "0"],
        ["demo", "--port", "70000"],
    ):
        result = fedlab(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
        assert "usage:" in result.stderr
