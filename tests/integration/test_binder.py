"""binder/: the files Binder (repo2docker) builds and starts the demo from, run here the way it runs them.

repo2docker installs ``binder/requirements.txt`` with pip from the repository root, runs
``binder/postBuild`` once from the repository root when it builds the image, and at every session
start runs ``binder/start`` with the notebook server's command line as its arguments. Here that
command is a Python researcher instead of the server: it attaches to the demo's researcher service
for ``FEDLAB_ADDRESS`` as a notebook would, waits for the demo's real ``fedlab node`` processes and
asks them for statistics, which must equal pandas on the same scikit-learn data. When the command
exits, the demo must stop its service and nodes by itself (it is tied to the command's lifetime),
leaving no process behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from federation import free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BINDER = REPO / "binder"
COLUMNS = ["mean radius", "worst area", "target"]

# The command binder/start execs: a researcher, as the quickstart notebook's kernel would be.
RESEARCHER = r"""
import json, os, sys

import fedlab

address, demo_dir, columns = os.environ["FEDLAB_ADDRESS"], os.environ["FEDLAB_DEMO_DIR"], json.loads(sys.argv[1])
with fedlab.Researcher(address) as researcher:
    researcher.wait_for_nodes(3, timeout=180)
    result = researcher.stats(researcher.search(["breast-cancer"]), ["count", "mean", "std"], columns=columns)
    table = result.global_stats()[["count", "mean", "std", "nodes"]]
    with open(os.path.join(demo_dir, "pids")) as f:  # the demo's record of its processes: service and nodes
        pids = [line.split(maxsplit=1) for line in f if line.strip()]
    service_pid = researcher.service.pid if researcher.attached else None
print(json.dumps({"address": address, "demo_dir": demo_dir, "service_pid": service_pid,
                  "node_pids": [int(p) for p, path in pids if "hospital-" in path],
                  "all_pids": [int(p) for p, _ in pids], "stats": table.to_dict(orient="index")}))
"""


def binder_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This checkout's Python first on PATH (as the image's environment is), a private HOME and tmp,
    and no FEDLAB_* variables from outside, so that what the command sees was set by binder/start."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLAB_")}
    env.update(HOME=str(home), TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still a running process whose command line names ``marker`` (a zombie, or
    a pid reused by something else, is not)."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_leftovers(pids: list[int], marker: str) -> list[int]:
    """SIGTERM, then SIGKILL, whichever of ``pids`` are still ours; return those that were."""
    left = [p for p in pids if alive(p, marker)]
    for pid in left:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(alive(p, marker) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        if alive(pid, marker):
            os.kill(pid, signal.SIGKILL)
    return left


def code_lines(script: Path) -> list[str]:
    return [line.strip() for line in script.read_text().splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.timeout(420)
def test_start_runs_demo_nodes_that_answer_and_they_stop_when_the_command_exits(tmp_path):
    from sklearn.datasets import load_breast_cancer

    port = free_port()
    demo_dir = tmp_path / "demo"
    env = binder_env(tmp_path, FEDLAB_DEMO_PORT=str(port), FEDLAB_DEMO_DIR=str(demo_dir))
    pid_file, log_file = Path(f"{demo_dir}.pid"), Path(f"{demo_dir}.log")
    # cwd is not the repository: Binder may start the container elsewhere; start finds its own way
    proc = subprocess.Popen([str(BINDER / "start"), sys.executable, "-c", RESEARCHER, json.dumps(COLUMNS)],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=30)
        pids.append(int(pid_file.read_text()))
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        assert proc.returncode == 0, f"the command failed ({proc.returncode}):\n{err}\n--- demo log:\n{log}"
        answer = json.loads(out.strip().splitlines()[-1])
        pids.extend(answer["all_pids"])

        # start exported where the demo is, for the command it exec'd
        assert answer["address"] == f"tcp://127.0.0.1:{port}"
        assert answer["demo_dir"] == str(demo_dir)
        assert len(answer["node_pids"]) == 3
        # start waited for the demo's researcher service, and the command attached to it (as every notebook will)
        assert answer["service_pid"] is not None and answer["service_pid"] in answer["all_pids"]
        assert len(answer["all_pids"]) == 4
        assert sorted(p.name for p in demo_dir.glob("hospital-*")) == ["hospital-a", "hospital-b", "hospital-c"]

        # the federated figures over the three sites are pandas' on the pooled data
        frame = load_breast_cancer(as_frame=True).frame
        for column in COLUMNS:
            got = answer["stats"][column]
            assert got["count"] == len(frame), column
            assert got["nodes"] == 3, column
            assert got["mean"] == pytest.approx(frame[column].mean(), rel=1e-9), column
            assert got["std"] == pytest.approx(frame[column].std(), rel=1e-9), column

        # the demo's output went to its log, not to the terminal the command owns. Its first line, written
        # before any node starts: "3 nodes running" may not be written at all, when the command is done
        # (and the demo stopped) before the demo's next look at its nodes' logs
        assert "creating 3 sites in" in log
        assert "creating 3 sites" not in out + err and "nodes running" not in out + err
        assert f"log: {log_file}" in err

        # the command has exited, so the demo got SIGTERM and stops its nodes in order
        wait_until(lambda: not any(alive(p, str(demo_dir)) for p in pids), 60,
                   "the demo and its nodes to stop after the command exited")
        assert "stopped" in log_file.read_text(errors="replace").splitlines()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if not pids and pid_file.exists():
            pids.append(int(pid_file.read_text()))
        if (demo_dir / "pids").exists():  # the demo's own record, while it runs (service and nodes)
            pids.extend(int(line.split()[0]) for line in (demo_dir / "pids").read_text().splitlines() if line)
        left = stop_leftovers(pids, str(demo_dir))
    assert not left, f"processes left behind: {left}"


def test_start_without_a_command_says_what_to_do(tmp_path):
    demo_dir = tmp_path / "demo"
    env = binder_env(tmp_path, FEDLAB_DEMO_PORT=str(free_port()), FEDLAB_DEMO_DIR=str(demo_dir))
    result = subprocess.run([str(BINDER / "start")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "give the command to run" in result.stderr
    assert not Path(f"{demo_dir}.pid").exists() and not demo_dir.exists()  # nothing was started


def test_start_and_postbuild_are_what_repo2docker_expects():
    for name in ("start", "postBuild"):
        script = BINDER / name
        assert os.access(script, os.X_OK), f"binder/{name} must be executable"
        assert script.read_text().startswith("#!/bin/bash\n"), name
    # repo2docker does not stop a build on a failing postBuild command unless the script says so
    first = code_lines(BINDER / "postBuild")[0].split()
    assert first[0] == "set" and any(re.fullmatch(r"-[a-z]*e[a-z]*", flag) for flag in first[1:]), first
    # and a start script must end by becoming the command it was given
    assert code_lines(BINDER / "start")[-1] == 'exec "$@"'
    # repo2docker's default Python is older than this project's: runtime.txt must name one it supports
    runtime = re.fullmatch(r"python-(\d+)\.(\d+)", (BINDER / "runtime.txt").read_text().strip())
    floor = re.fullmatch(r">=(\d+)\.(\d+)", tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                         ["requires-python"])
    assert runtime and floor and tuple(map(int, runtime.groups())) >= tuple(map(int, floor.groups()))


@pytest.mark.timeout(300)
def test_postbuild_passes_in_this_environment(tmp_path):
    result = subprocess.run([str(BINDER / "postBuild")], cwd=REPO, env=binder_env(tmp_path), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "postBuild: fedlab" in result.stdout and "breast_cancer.csv" in result.stdout


@pytest.mark.timeout(300)
def test_requirements_install_this_checkout_with_the_demo_extra_under_the_constraints(tmp_path):
    """pip, run from the repository root as repo2docker runs it, must read binder/requirements.txt:
    find ../constraints.txt beside it, take `.` as the repository, and resolve the demo extra under the
    pins against what this environment has (no index: --no-index also drops the file's extra index)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("binder", "fedlab"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("constraints.txt", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, repo / name)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
         "--report", str(report), "-r", "binder/requirements.txt"],
        cwd=repo, env=binder_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    install = json.loads(report.read_text())["install"]
    assert [(i["metadata"]["name"], i.get("requested_extras"), i["download_info"]["url"]) for i in install] == [
        ("fedlab-research", ["demo"], repo.as_uri())
    ]
