"""Plan approvals and training state in the node database: who may decide, what a request may change,
and how the operator names a plan."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from fedlab.errors import FedlabApprovalError, FedlabConfigError, FedlabTrainingError
from fedlab.node import approvals as approvals_module
from fedlab.node.approvals import ApprovalRegistry
from fedlab.node.config import init_node_dir, load_config
from fedlab.node.registry import DatasetRegistry
from fedlab.node.training_state import StateStore
from fedlab.training.messages import APPROVED, PENDING, REJECTED

SOURCE = "from fedlab.training import TorchTrainingPlan\n\nclass Net(TorchTrainingPlan):\n    pass\n"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return init_node_dir(tmp_path / "node", "node").db_path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- ApprovalRegistry -------------------------------------------------------------------------


def test_request_inserts_pending_with_the_hash_computed_here(db: Path) -> None:
    registry = ApprovalRegistry(db)
    record = registry.request(SOURCE, "Net", "logistic regression", "researcher-1")
    assert record.plan_id == sha(SOURCE) and record.short_id == sha(SOURCE)[:12]
    assert (record.status, record.plan_class, record.source) == (PENDING, "Net", SOURCE)
    assert (record.description, record.researcher_id) == ("logistic regression", "researcher-1")
    assert record.decided_at is None
    assert registry.status(record.plan_id) == record
    assert registry.list() == [record]


def test_unknown_plan_has_no_status(db: Path) -> None:
    assert ApprovalRegistry(db).status(sha("other")) is None


def test_asking_again_never_changes_a_decision_or_the_description(db: Path) -> None:
    registry = ApprovalRegistry(db)
    first = registry.request(SOURCE, "Net", "first")
    approved = registry.approve(first.plan_id, note="reviewed")
    again = registry.request(SOURCE, "Net", "sneaky new description", "someone-else")
    assert again == approved
    assert (again.status, again.description, again.note) == (APPROVED, "first", "reviewed")
    rejected = registry.reject(first.plan_id)
    assert registry.request(SOURCE, "Net").status == REJECTED == rejected.status


def test_one_byte_changed_is_another_plan(db: Path) -> None:
    registry = ApprovalRegistry(db)
    registry.approve(registry.request(SOURCE, "Net").plan_id)
    other = registry.request(SOURCE + " ", "Net")
    assert other.status == PENDING and other.plan_id != sha(SOURCE)
    assert len(registry.list()) == 2


def test_approve_and_reject_by_prefix_set_decided_at_and_note(db: Path) -> None:
    registry = ApprovalRegistry(db)
    pid = registry.request(SOURCE, "Net").plan_id
    approved = registry.approve(pid[:8].upper(), note="ok")
    assert (approved.status, approved.note) == (APPROVED, "ok") and approved.decided_at
    rejected = registry.reject(pid[:12], note="changed my mind")
    assert (rejected.status, rejected.note) == (REJECTED, "changed my mind")
    assert registry.find(pid[:10]) == rejected == registry.status(pid)


@pytest.mark.parametrize("prefix", ["abc", "", "zzzzzzzzzz", "0123456 ", "../../etc"])
def test_malformed_prefix_is_refused(db: Path, prefix: str) -> None:
    with pytest.raises(FedlabConfigError, match="at least 8 hexadecimal"):
        ApprovalRegistry(db).find(prefix)


def test_unknown_and_ambiguous_prefixes_are_refused(db: Path) -> None:
    registry = ApprovalRegistry(db)
    with pytest.raises(FedlabConfigError, match=r"no training plan 00000000 .*plan list"):
        registry.approve("00000000")
    # find two sources whose hashes share their first 8 hex characters... too costly; use the table
    registry.request(SOURCE, "Net")
    pid = sha(SOURCE)
    twin = pid[:8] + "f" * 56 if pid[8] != "f" else pid[:8] + "0" * 56
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO training_plans (plan_id, plan_class, source, status, requested_at)"
                     " VALUES (?, 'Net', 'x', 'Pending', '2020')", (twin,))
    conn.close()
    with pytest.raises(FedlabConfigError, match="matches 2 plans"):
        registry.approve(pid[:8])
    assert registry.approve(pid[:9]).plan_id == pid


def test_a_decision_is_seen_at_once_by_another_registry_object(db: Path) -> None:
    """The node and the CLI are different processes: nothing may be cached."""
    node_side, cli_side = ApprovalRegistry(db), ApprovalRegistry(db)
    pid = node_side.request(SOURCE, "Net").plan_id
    cli_side.approve(pid)
    assert node_side.status(pid).status == APPROVED
    cli_side.reject(pid)
    assert node_side.status(pid).status == REJECTED


def test_table_is_added_to_an_existing_node_db_and_creation_is_idempotent(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'training_plans'").fetchone()
    conn.close()
    ApprovalRegistry(db).request(SOURCE, "Net")
    assert len(ApprovalRegistry(db).list()) == 1  # a second open keeps the rows
    assert DatasetRegistry(db).list() == []  # the dataset registry still works on the same file


def test_missing_database_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(FedlabConfigError, match="fedlab node init"):
        ApprovalRegistry(tmp_path / "nowhere" / "node.db")


def test_too_many_pending_plans_are_refused(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals_module, "MAX_PENDING", 2)
    registry = ApprovalRegistry(db)
    first = registry.request("a = 1", "A")
    registry.request("a = 2", "A")
    with pytest.raises(FedlabApprovalError, match="2 training plans waiting"):
        registry.request("a = 3", "A")
    assert registry.request("a = 4", "A", limit=False).status == PENDING  # recorded, not asked: no cap
    registry.reject(first.plan_id)
    registry.reject(sha("a = 4"))
    assert registry.request("a = 3", "A").status == PENDING


def test_concurrent_requests_of_one_plan_make_one_record(db: Path) -> None:
    registry = ApprovalRegistry(db)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            registry.request(SOURCE, "Net")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(registry.list()) == 1


def test_approve_command_names_the_node_directory(db: Path) -> None:
    registry = ApprovalRegistry(db)
    assert registry.approve_command("ab" * 32) == f"fedlab node plan approve {db.parent} {'ab' * 6}"


# --- require_approval in the node config ------------------------------------------------------


def test_require_approval_defaults_to_true_and_is_written_with_a_comment(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n")
    assert config.require_approval is True
    lines = config.config_path.read_text().splitlines()
    at = lines.index("require_approval = true")
    assert lines[at - 1].startswith("#") and "reject" in lines[at - 1]
    assert load_config(tmp_path / "n").require_approval is True


def test_require_approval_false_and_bad_values(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n")
    text = config.config_path.read_text()
    config.config_path.write_text(text.replace("require_approval = true", "require_approval = false"))
    assert load_config(tmp_path / "n").require_approval is False
    config.config_path.write_text(text.replace("require_approval = true", 'require_approval = "no"'))
    with pytest.raises(FedlabConfigError, match="require_approval must be true or false"):
        load_config(tmp_path / "n")
    config.config_path.write_text(text.replace("require_approval = true", "require_approval = 0"))
    with pytest.raises(FedlabConfigError, match="require_approval must be true or false"):
        load_config(tmp_path / "n")


def test_old_config_without_the_key_requires_approval(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n")
    text = config.config_path.read_text().replace("require_approval = true\n", "")
    config.config_path.write_text(text)
    assert load_config(tmp_path / "n").require_approval is True


def test_other_keys_still_refuse_booleans(tmp_path: Path) -> None:
    config = init_node_dir(tmp_path / "n", "n")
    text = config.config_path.read_text()
    config.config_path.write_text(text.replace("heartbeat_interval = 1.0", "heartbeat_interval = true"))
    with pytest.raises(FedlabConfigError, match="heartbeat_interval must be a number"):
        load_config(tmp_path / "n")


# --- StateStore -------------------------------------------------------------------------------


def test_state_round_trips_and_ids_are_fresh(db: Path) -> None:
    store = StateStore(db)
    first = store.put(b"\x00\x01blob", "exp-1", "dataset-a")
    second = store.put(b"other", "exp-1", "dataset-a")
    assert first != second and len(first) == 32 and int(first, 16) >= 0
    assert store.get(first) == b"\x00\x01blob"
    assert store.get(second, experiment_id="exp-1", dataset_id="dataset-a") == b"other"
    assert StateStore(db).get(first) == b"\x00\x01blob"  # another process would see it too


def test_unknown_state_says_what_to_do(db: Path) -> None:
    with pytest.raises(FedlabTrainingError, match=r"unknown on this node.*state_id=None"):
        StateStore(db).get("f" * 32)


def test_state_of_another_experiment_or_dataset_is_refused(db: Path) -> None:
    store = StateStore(db)
    state_id = store.put(b"x", "exp-1", "dataset-a")
    with pytest.raises(FedlabTrainingError, match="belongs to experiment 'exp-1'"):
        store.get(state_id, experiment_id="exp-2")
    with pytest.raises(FedlabTrainingError, match="made on dataset dataset-a"):
        store.get(state_id, dataset_id="dataset-b")


def test_forget_deletes_an_experiments_states(db: Path) -> None:
    store = StateStore(db)
    kept = store.put(b"k", "exp-2")
    store.put(b"a", "exp-1")
    store.put(b"b", "exp-1")
    assert store.forget("exp-1") == 2
    assert store.get(kept) == b"k"


# --- the `fedlab node plan` commands, in process ----------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    from fedlab.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_show_approve_reject(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node_dir = db.parent
    assert cli(capsys, "node", "plan", "list", node_dir)[1].splitlines()[-1] == (
        "no training plans have been sent to this node")
    pid = ApprovalRegistry(db).request(SOURCE, "Net", "a tiny\nplan", "researcher-1").plan_id
    code, out, _ = cli(capsys, "node", "plan", "list", node_dir)
    assert code == 0 and "approval of training plans: required" in out
    row = out.splitlines()[-1].split()
    assert row[:3] == [pid[:12], PENDING, "Net"] and "a tiny plan" in out
    code, out, _ = cli(capsys, "node", "plan", "show", node_dir, pid[:8])
    assert code == 0 and pid in out and SOURCE in out and "WARNING" not in out
    code, out, _ = cli(capsys, "node", "plan", "approve", node_dir, pid[:8], "--note", "reviewed")
    assert code == 0 and f"approved training plan {pid[:12]} (Net)" in out
    assert ApprovalRegistry(db).status(pid).note == "reviewed"
    code, out, _ = cli(capsys, "node", "plan", "reject", node_dir, pid)
    assert code == 0 and "rejected" in out and ApprovalRegistry(db).status(pid).status == REJECTED


def test_cli_show_escapes_what_would_hide_code_from_the_reviewer(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = "x = 1  # \u202e }\n\x1b[2Kimport os\nclass Net:\n\tpass\n"
    pid = ApprovalRegistry(db).request(source, "Net", "desc\x1b[31m").plan_id
    code, out, _ = cli(capsys, "node", "plan", "show", db.parent, pid[:8])
    assert code == 0 and "\x1b" not in out and "\u202e" not in out
    assert "\\u202e" in out and "\\x1b[2Kimport os" in out and "\tpass" in out
    assert "WARNING: the source contains 2 invisible or control characters" in out
    assert "\x1b" not in cli(capsys, "node", "plan", "list", db.parent)[1]


@pytest.mark.parametrize("args", [
    ("node", "plan", "approve", "{dir}", "0123"),
    ("node", "plan", "reject", "{dir}", "0123abcd"),
    ("node", "plan", "show", "{dir}", "zzzzzzzzzz"),
    ("node", "plan", "list", "{dir}/missing"),
])
def test_cli_errors_are_one_line_and_exit_2(db: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
                                            ) -> None:
    code, out, err = cli(capsys, *(a.format(dir=db.parent) for a in args))
    assert code == 2 and out == ""
    assert err.startswith("fedlab: error: ") and len(err.strip().splitlines()) == 1


def test_cli_list_says_when_approval_is_not_required(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = db.parent / "config.toml"
    config_path.write_text(config_path.read_text().replace("require_approval = true", "require_approval = false"))
    assert "not required" in cli(capsys, "node", "plan", "list", db.parent)[1]
