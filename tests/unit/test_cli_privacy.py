"""`fedlab node privacy DIR`: the operator's table of what each researcher spent and has left, read from
the node's own node.db, on a real node directory made by `fedlab node init`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlab.cli import main
from fedlab.node.config import load_config
from fedlab.node.dp_ledger import DPLedger

KEY = "rq5]x&Wl!^F0b.9A-0zQ*k3t]8r=1D2b7Ys@cE+P"  # a researcher's public key as the ledger keeps it (Z85, 40)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def node_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "site-a"
    assert main(["node", "init", str(directory), "--name", "site-a", "--insecure"]) == 0
    capsys.readouterr()
    return directory


def spend(directory: Path, peer: str, source: str, dataset: str, epsilon: float, delta: float = 0.0) -> None:
    config = load_config(directory)
    with DPLedger(config.db_path, config.privacy).spending(peer, source, dataset) as spending:
        spending.spend(epsilon=epsilon, delta=delta, kind="analytics", label=dataset, msg_id="m-1",
                       what=f"a test request (epsilon={epsilon})")


def set_privacy(directory: Path, *, require_dp: bool | None = None, budget: str | None = None) -> None:
    path = directory / "config.toml"
    text = path.read_text()
    if require_dp is not None:
        assert "require_dp = false" in text
        text = text.replace("require_dp = false", f"require_dp = {'true' if require_dp else 'false'}")
    if budget is not None:
        assert "epsilon_budget = 10.0" in text
        text = text.replace("epsilon_budget = 10.0", f"epsilon_budget = {budget}")
    path.write_text(text)


def table(out: str) -> dict[tuple[str, str], list[str]]:
    """The rows under the RESEARCHER header, keyed by (researcher, dataset)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("RESEARCHER"))
    assert lines[start].split() == ["RESEARCHER", "DATASET", "EPS", "SPENT", "EPS", "BUDGET", "EPS", "LEFT",
                                    "DELTA", "SPENT", "DELTA", "LEFT", "SPENDS", "LAST", "SPEND"]
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != 9:
            break
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_empty_ledger_prints_the_settings_and_says_nothing_was_spent(node_dir, capsys):
    code, out, err = cli(capsys, "node", "privacy", node_dir)
    assert code == 0 and err == ""
    first = out.splitlines()[0]
    assert "require_dp = false, epsilon_budget = 10, delta = 1e-06" in first
    assert str(node_dir / "config.toml") in first
    assert out.splitlines()[-1].startswith("no differential-privacy spending recorded yet")
    assert "RESEARCHER" not in out


def test_spends_per_researcher_and_dataset_with_what_is_left(node_dir, capsys):
    spend(node_dir, "insecure", "/data/tumours.csv", "tumours", 1.0)
    spend(node_dir, "insecure", "/data/tumours.csv", "tumours", 2.5, delta=2e-7)
    spend(node_dir, "insecure", "/data/scans.csv", "scans", 0.25)
    spend(node_dir, KEY, "/data/tumours.csv", "tumours", 10.0, delta=1e-7)
    code, out, err = cli(capsys, "node", "privacy", node_dir)
    assert code == 0 and err == ""
    rows = table(out)
    short = KEY[:12] + "…"
    assert KEY not in out  # the key is shortened, not printed whole
    assert set(rows) == {("insecure", "tumours"), ("insecure", "scans"), (short, "tumours")}
    # eps spent, budget, left, delta spent, delta left, spends, last
    assert rows[("insecure", "tumours")][:6] == ["3.5", "10", "6.5", "2e-07", "8e-07", "2"]
    assert rows[("insecure", "scans")][:6] == ["0.25", "10", "9.75", "0", "1e-06", "1"]
    assert rows[(short, "tumours")][:6] == ["10", "10", "0", "1e-07", "9e-07", "1"]
    last = rows[("insecure", "tumours")][6]
    assert last[:4].isdigit() and "T" in last  # an ISO time stamp of the latest spend
    assert out.splitlines()[-1] == "1 budget is spent: the node refuses further DP requests there"


def test_the_configured_budget_and_require_dp_are_what_the_table_uses(node_dir, capsys):
    set_privacy(node_dir, require_dp=True, budget="4.0")
    spend(node_dir, "insecure", "/data/tumours.csv", "tumours", 1.5)
    code, out, _ = cli(capsys, "node", "privacy", node_dir)
    assert code == 0
    assert "require_dp = true, epsilon_budget = 4, delta = 1e-06" in out.splitlines()[0]
    assert "only with differential privacy" in out
    assert table(out)[("insecure", "tumours")][:3] == ["1.5", "4", "2.5"]
    assert "budget is spent" not in out


def test_the_command_spends_nothing(node_dir, capsys):
    spend(node_dir, "insecure", "/data/tumours.csv", "tumours", 1.0)
    config = load_config(node_dir)
    before = DPLedger(config.db_path, config.privacy).rows()
    assert cli(capsys, "node", "privacy", node_dir)[0] == 0
    assert cli(capsys, "node", "privacy", node_dir)[0] == 0
    assert DPLedger(config.db_path, config.privacy).rows() == before


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("not-a-node", "is not a fedlab node directory"),
    ("bad-budget", "epsilon_budget must be a finite number >= 0"),
    ("no-db", "no dataset registry at"),
])
def test_a_missing_or_invalid_directory_is_one_error_line_and_exit_2(tmp_path, node_dir, capsys, case, expected):
    target = {"missing": tmp_path / "nowhere", "not-a-node": tmp_path / "empty", "bad-budget": node_dir,
              "no-db": node_dir}[case]
    if case == "not-a-node":
        target.mkdir()
    if case == "bad-budget":
        set_privacy(node_dir, budget="-1.0")
    if case == "no-db":
        (node_dir / "node.db").unlink()
    code, out, err = cli(capsys, "node", "privacy", target)
    assert code == 2 and out == ""
    assert err.startswith("fedlab: error: ") and expected in err and err.count("\n") == 1
    assert "Traceback" not in err
    if case == "no-db":
        assert not (node_dir / "node.db").exists()  # the command does not make a database where there is none


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedlab", "node", "privacy", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("fedlab: error: node directory") and "Traceback" not in done.stderr
