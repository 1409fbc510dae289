"""Each real node keeps an append-only, hash-chained log of what it was asked, by whom, and what
it answered or refused; `fedlab node audit` shows and verifies it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from federation import NodeProcess, breast_cancer_splits, wait_until

from fedlab import DiscardOnTimeout, Researcher
from fedlab.node.audit import AUDIT_FILE, read_entries
from fedlab.node.config import init_node_dir
from fedlab.protocol import DatasetListReply

pytestmark = pytest.mark.integration


def set_rule(node: NodeProcess, key: str, value: str) -> None:
    path = node.directory / "config.toml"
    path.write_text("\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line
                              for line in path.read_text().splitlines()) + "\n")


def fedlab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedlab", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def entries(node: NodeProcess) -> list[dict]:
    path = node.directory / AUDIT_FILE
    return list(read_entries(path)) if path.exists() else []


def test_audit_log_records_questions_answers_and_refusals(tmp_path, address):
    a_frame, b_frame = breast_cancer_splits(2)
    a = NodeProcess.create(tmp_path, "hospital-a", address, frame=a_frame)
    b = NodeProcess.create(tmp_path, "hospital-b", address, frame=b_frame)
    set_rule(a, "excluded_columns", '["worst area"]')
    set_rule(b, "min_count", "100000")  # b refuses every statistic over its 300-odd rows
    try:
        with Researcher(address, heartbeat_interval=0.2) as researcher:
            a.start()
            b.start()
            researcher.wait_for_nodes(2, timeout=30)
            fds = researcher.search(["breast-cancer"])
            result = researcher.stats(fds, ["count", "mean"], columns=["mean radius", "worst area"],
                                      # the outer edges lie beyond any node's noisy range (the data's range
                                      # widened by up to 2 * min_max_noise of it, from the node's random
                                      # secret): answered as 0 and n, never withheld as cuts near an end
                                      stats_args={"mean radius": {"histogram": {"edges": [0.0, 15.0, 40.0]}}})
            assert b.node_id in result.participation().to_string() or result.notes()
            with researcher.requests.send(DatasetListReply(datasets=[]), nodes=[a.node_id],
                                          policies=[DiscardOnTimeout(10)]) as odd:
                assert odd.errors()[a.node_id].code == "unknown_type"

            wait_until(lambda: len(entries(a)) >= 3 and len(entries(b)) >= 2, 10, "the audit lines")
            a_log, b_log = entries(a), entries(b)
            assert all(e["sender"] == researcher.id and e["peer"] == "unauthenticated (insecure mode)"
                       for e in a_log + b_log)
            fa = [e for e in a_log if e["msg_type"] == "fa_request"]
            assert fa and {"count", "mean"} <= set(fa[0]["asked"]["stats"]) and fa[0]["outcome"] == "ok"
            assert fa[0]["asked"]["columns"] == ["mean radius", "worst area"]
            assert "histogram" in fa[0]["asked"]["stats_args"]["mean radius"]  # per-column stat names only
            assert fa[0]["refused_columns"] == ["worst area"]
            assert "15.0" not in json.dumps(fa)  # histogram edges are arguments, not logged
            assert [e["outcome"] for e in a_log if e["msg_type"] == "dataset_search_request"] == ["ok"]
            assert [(e["outcome"], e["code"]) for e in a_log if e["msg_type"] == "dataset_list_reply"] == [
                ("error", "unknown_type")]
            refused = [e for e in b_log if e["msg_type"] == "fa_request"]
            assert refused and all(e["outcome"] == "refused" and e["code"] == "disclosure_refused" for e in refused)
            assert "min_count" in refused[0]["message"]
            # no row value from the data ever lands in the log
            text = (a.directory / AUDIT_FILE).read_text()
            assert f"{a_frame['mean radius'].iloc[0]}" not in text and str(a_frame["mean radius"].mean()) not in text
    finally:
        a.stop()
        b.stop()

    shown = fedlab_cli("node", "audit", a.directory, "--tail", "2")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 2
    assert "dataset_list_reply" in shown.stdout and researcher.id in shown.stdout
    ok = fedlab_cli("node", "audit", a.directory, "--verify")
    assert ok.returncode == 0 and f"{len(entries(a))} entries, hash chain intact" in ok.stdout

    path = a.directory / AUDIT_FILE
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(researcher.id, "someone-else")  # someone rewrites history
    path.write_text("\n".join(lines) + "\n")
    broken = fedlab_cli("node", "audit", a.directory, "--verify")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.startswith("fedlab: error: ") and "broken at line 3" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_audit_cli_on_a_node_that_has_answered_nothing(tmp_path):
    init_node_dir(tmp_path / "quiet", "quiet", "tcp://127.0.0.1:5999")
    quiet = fedlab_cli("node", "audit", tmp_path / "quiet")
    assert quiet.returncode == 0 and "no audit log yet" in quiet.stdout
    missing = fedlab_cli("node", "audit", tmp_path / "nowhere", "--verify")
    assert missing.returncode == 2 and missing.stderr.startswith("fedlab: error: ")
