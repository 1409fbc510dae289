"""`fedlab demo --no-lab` as a user runs it: a real command, real node processes, real data.

The demo makes uneven sites from scikit-learn's data, starts them and a researcher service that
several researchers attach to at once, and stops every process it
started on Ctrl-C, on SIGTERM, and even when it is killed itself (its children get SIGTERM from
the kernel). A second run over the same directory works; a taken port or a foreign directory
is a one-line error and a non-zero exit. (JupyterLab mode: tests/browser/test_demo_lab.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from federation import free_port, processes_mentioning, wait_until

from fedlab import Researcher

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

pytestmark = pytest.mark.integration


class Demo:
    def __init__(self, directory: Path, port: int, *args: str) -> None:
        self.directory = directory
        self.output = directory.parent / f"{directory.name}-demo.out"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedlab", "demo", "--no-lab", "--dir", str(directory), "--port", str(port),
                 *args], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_running(self) -> None:
        wait_until(lambda: "Ctrl-C stops the nodes" in self.text() or self.proc.poll() is not None, 120,
                   "the demo to start its nodes")
        assert self.proc.poll() is None, self.text()

    def stop(self, signum: int = signal.SIGINT) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(30)


@pytest.fixture
def demo_dir(tmp_path):
    directory = tmp_path / "demo-federation"
    yield directory
    for line in processes_mentioning(str(directory)):  # never leave a process behind, even on failure
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_demo_serves_uneven_sites_and_ctrl_c_leaves_no_process(demo_dir):
    port = free_port()
    demo = Demo(demo_dir, port, "--nodes", "3")
    demo.wait_running()
    assert f"Researcher('tcp://127.0.0.1:{port}')" in demo.text()
    assert len(processes_mentioning(str(demo_dir))) == 5  # the demo, its researcher service and its three nodes
    assert f"researcher service for tcp://127.0.0.1:{port} running" in demo.text()
    from sklearn.datasets import load_breast_cancer, load_diabetes

    with Researcher(f"tcp://127.0.0.1:{port}") as researcher, Researcher(f"tcp://127.0.0.1:{port}") as second:
        assert researcher.attached and second.attached  # two kernels at once: both through the demo's service
        researcher.wait_for_nodes(3, timeout=60)
        assert sorted(second.wait_for_nodes(3, timeout=60)) == sorted(researcher.online_node_ids())
        for tag, data_type in (("breast-cancer", "csv"), ("diabetes", "csv"), ("digits", "images")):
            found = researcher.search([tag]).to_frame()
            assert len(found) == 3 and set(found["data_type"]) == {data_type}, found
        sizes = researcher.search(["digits"]).to_frame()["n_samples"]
        assert sizes.sum() == 1797  # every digit image, each at one site
        cancer = researcher.search(["breast-cancer"])
        per_site = researcher.stats(cancer, ["count", "mean"], columns=["target"])
        means = per_site.node_stats()["mean"].to_numpy()
        counts = per_site.node_stats()["count"].to_numpy()
        assert len(set(counts)) == 3 and means.max() - means.min() > 0.1  # uneven sizes and case mix
        pooled = load_breast_cancer(as_frame=True).frame
        result = researcher.stats(cancer, ["count", "mean", "std"], columns=["mean radius"]).global_stats()
        assert result.loc["mean radius", "count"] == len(pooled)
        assert result.loc["mean radius", "mean"] == pytest.approx(pooled["mean radius"].mean(), rel=1e-9)
        assert result.loc["mean radius", "std"] == pytest.approx(pooled["mean radius"].std(), rel=1e-9)
        diabetes = researcher.search(["diabetes"])
        ages = researcher.stats(diabetes, ["count", "mean"], columns=["age"])
        site_ages = ages.node_stats()["mean"].to_numpy()
        assert site_ages.max() - site_ages.min() > 5  # the sites' patients differ in age
        assert ages.global_stats().loc["age", "mean"] == pytest.approx(
            load_diabetes(as_frame=True, scaled=False).frame["age"].mean(), rel=1e-9)
    assert demo.stop(signal.SIGINT) == 0
    assert "stopped" in demo.text()
    assert processes_mentioning(str(demo_dir)) == []


def test_a_second_run_recreates_the_directory_and_sigterm_stops_it(demo_dir):
    port = free_port()
    first = Demo(demo_dir, port, "--nodes", "2")
    first.wait_running()
    first_ids = sorted(p.name for p in demo_dir.iterdir())
    assert first.stop(signal.SIGTERM) == 0 and processes_mentioning(str(demo_dir)) == []
    (demo_dir / "hospital-a" / "note.txt").write_text("from the first run")
    second = Demo(demo_dir, port, "--nodes", "2")
    second.wait_running()
    assert sorted(p.name for p in demo_dir.iterdir()) == first_ids
    assert not (demo_dir / "hospital-a" / "note.txt").exists()  # recreated, not reused half-way
    with Researcher(f"tcp://127.0.0.1:{port}") as researcher:
        researcher.wait_for_nodes(2, timeout=60)
    assert second.stop() == 0 and processes_mentioning(str(demo_dir)) == []


def test_killing_the_demo_itself_stops_its_nodes(demo_dir):
    """SIGKILL gives the demo no chance to clean up: its nodes get SIGTERM from the kernel
    (PR_SET_PDEATHSIG) and exit by themselves."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux-only")
    demo = Demo(demo_dir, free_port(), "--nodes", "2")
    demo.wait_running()
    assert len(processes_mentioning(str(demo_dir))) == 4  # the demo, its service and two nodes
    demo.proc.kill()
    demo.proc.wait(10)
    wait_until(lambda: processes_mentioning(str(demo_dir)) == [], 30, "the orphaned nodes and service to stop")


def run_demo_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedlab", "demo", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_taken_port_is_a_clear_error(demo_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_demo_cli("--no-browser", "--dir", str(demo_dir), "--port", str(port),
                            "--lab-port", str(free_port()))
        assert done.returncode == 2
        assert f"port {port} is taken" in done.stderr and "--port" in done.stderr
        assert "Traceback" not in done.stderr
        lab = run_demo_cli("--dir", str(demo_dir), "--port", str(free_port()), "--lab-port", str(port))
        assert lab.returncode == 2 and f"port {port} for JupyterLab is taken" in lab.stderr, lab.stderr
    assert processes_mentioning(str(demo_dir)) == []


def test_no_lab_joins_a_researcher_already_listening(demo_dir):
    """`binder/start CMD` may bind its researcher before the demo checks the port: with --no-lab
    the nodes then join it, with a note, instead of the demo refusing to start."""
    port = free_port()
    with Researcher(f"tcp://127.0.0.1:{port}") as researcher:
        demo = Demo(demo_dir, port, "--nodes", "2")
        demo.wait_running()
        assert f"something already listens on port {port}" in demo.text()
        researcher.wait_for_nodes(2, timeout=60)
        assert demo.stop() == 0
    assert processes_mentioning(str(demo_dir)) == []


def test_a_directory_not_made_by_the_demo_is_left_alone(tmp_path):
    mine = tmp_path / "my-data"
    mine.mkdir()
    (mine / "precious.csv").write_text("a,b\n1,2\n")
    done = run_demo_cli("--no-lab", "--dir", str(mine), "--port", str(free_port()))
    assert done.returncode == 2 and "was not made by `fedlab demo`" in done.stderr
    assert (mine / "precious.csv").read_text() == "a,b\n1,2\n"


def test_the_sites_are_uneven_like_real_hospitals():
    """The split itself: sizes fall off, the malignant share and the patients' age differ by site."""
    from fedlab.demo import load_breast_cancer_frame, load_diabetes_frame, split_by_age, split_like_sites

    sites = split_like_sites(load_breast_cancer_frame(), 4)
    assert sum(len(s) for s in sites) == 569
    assert [len(s) for s in sites] == sorted((len(s) for s in sites), reverse=True)
    malignant = [float((s["target"] == 0).mean()) for s in sites]
    assert malignant[0] - malignant[-1] > 0.2
    ages = [s["age"].mean() for s in split_by_age(load_diabetes_frame(), 4)]
    assert ages == sorted(ages) and ages[-1] - ages[0] > 10
    frame = load_breast_cancer_frame()
    pd.testing.assert_frame_equal(pd.concat(sites).sort_values(list(frame.columns)).reset_index(drop=True),
                                  frame.sort_values(list(frame.columns)).reset_index(drop=True))  # each row once
    assert np.isfinite(ages).all()
