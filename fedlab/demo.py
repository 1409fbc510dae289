"""`fedlab demo`: a local federation of hospitals on real public data, and JupyterLab to explore it.

It makes one node directory per site under ``--dir`` and gives every site its own share of
three datasets that ship inside scikit-learn, so nothing is downloaded:

* ``breast-cancer`` (CSV, Wisconsin diagnostic): sites differ in size and in their share of
  malignant tumours, as a referral centre and a screening clinic would;
* ``diabetes`` (CSV, disease progression after one year, in original units): sites differ in
  the age of their patients;
* ``digits`` (an image folder of 8x8 handwritten digits, one sub-folder per class): each site
  sees some digits far more often than others.

It starts a researcher service (``fedlab researcher start``, which holds the port the nodes dial,
so that every notebook of the demo can be open at once and a kernel restart keeps the nodes
connected), a real ``fedlab node start`` process per site (one torch thread each, since they
share this machine), then JupyterLab on ``notebooks/01_quickstart.ipynb`` with
``FEDLAB_ADDRESS`` and ``FEDLAB_DEMO_DIR`` set for the notebooks' kernels, which attach to the
service; with ``--no-lab`` it prints how to connect instead. Ctrl-C (or SIGTERM) stops everything it started. Every
child runs in its own session, so a Ctrl-C in the terminal reaches only the demo, which then
stops JupyterLab (and with it its kernels) and the nodes in order; on Linux a child also gets
SIGTERM if the demo itself is killed. A second run stops the nodes a first run may have left
(their pids are in the directory) and recreates the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlab.errors import FedlabConfigError, FedlabError
from fedlab.node.config import init_node_dir, load_config
from fedlab.node.registry import DatasetRegistry

__all__ = [
    "DATASETS",
    "load_breast_cancer_frame",
    "prepare_federation",
    "run_demo",
    "split_like_sites",
]

MARKER = ".fedlab-demo"
PIDS = "pids"  # one line per process the demo started: "PID NODE_DIR" (the service: "PID DIR/researcher.log")
SERVICE_LOG = "researcher.log"  # the researcher service's log in the demo directory (its output: researcher.out)
SITE_NAMES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e", "hospital-f",
              "hospital-g", "hospital-h"]
# dataset name -> (tags, description), the same at every site
DATASETS: dict[str, tuple[list[str], str]] = {
    "breast-cancer": (["breast-cancer", "csv"], "Wisconsin diagnostic breast cancer, this site's patients"),
    "diabetes": (["diabetes", "csv"], "diabetes progression one year after baseline, this site's patients"),
    "digits": (["digits", "images"], "8x8 handwritten digits, one folder per class"),
}
_START_TIMEOUT = 60.0  # seconds for a node process to log that it started
_STOP_TIMEOUT = 10.0


def _sklearn() -> Any:
    try:
        import sklearn.datasets
    except ImportError:
        raise FedlabConfigError(
            "the demo data ships with scikit-learn, which is not installed: "
            "pip install -c constraints.txt -e '.[demo]'"
        ) from None
    return sklearn.datasets


def load_breast_cancer_frame() -> pd.DataFrame:
    return _sklearn().load_breast_cancer(as_frame=True).frame


def load_diabetes_frame() -> pd.DataFrame:
    """Diabetes in original units (age in years, sex 1/2, BMI, blood pressure, six serum values)."""
    return _sklearn().load_diabetes(as_frame=True, scaled=False).frame


def _assign(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A site per row, row i drawn with probabilities ``weights[i] / weights[i].sum()``."""
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    return np.minimum((rng.random(len(weights))[:, None] > cumulative).sum(axis=1), weights.shape[1] - 1)


def split_like_sites(frame: pd.DataFrame, n_sites: int, seed: int = 7) -> list[pd.DataFrame]:
    """Breast cancer over uneven sites: sizes fall off site by site, the malignant share differs."""
    rng = np.random.default_rng(seed)
    size_w = np.arange(n_sites, 0, -1, dtype=float)          # site 0 is the largest
    malignant_w = size_w * np.linspace(1.6, 0.5, n_sites)     # and a referral centre
    benign_w = size_w * np.linspace(0.6, 1.4, n_sites)
    malignant = frame["target"].to_numpy() == 0
    site = np.where(
        malignant,
        rng.choice(n_sites, size=len(frame), p=malignant_w / malignant_w.sum()),
        rng.choice(n_sites, size=len(frame), p=benign_w / benign_w.sum()),
    )
    return [frame[site == i].reset_index(drop=True) for i in range(n_sites)]


def split_by_age(frame: pd.DataFrame, n_sites: int, seed: int = 11) -> list[pd.DataFrame]:
    """Diabetes over uneven sites: the first sites see younger patients, the last ones older."""
    rng = np.random.default_rng(seed)
    age_rank = frame["age"].rank(pct=True).to_numpy()
    centres = np.linspace(0.2, 0.8, n_sites) if n_sites > 1 else np.array([0.5])
    size_w = np.linspace(1.5, 0.7, n_sites)
    weights = size_w * np.exp(-((age_rank[:, None] - centres[None, :]) ** 2) / 0.08)
    site = _assign(weights, rng)
    return [frame[site == i].reset_index(drop=True) for i in range(n_sites)]


def split_digits(labels: np.ndarray, n_sites: int, seed: int = 3) -> np.ndarray:
    """A site per digit image: each site sees three digits about four times as often as the rest."""
    rng = np.random.default_rng(seed)
    weights = np.ones((len(labels), n_sites))
    for s in range(n_sites):
        favourite = np.isin(labels, [(3 * s + k) % 10 for k in range(3)])
        weights[favourite, s] = 4.0
    return _assign(weights, rng)


def _write_digits(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise FedlabConfigError(
            "the demo's digit images are written with Pillow, which is not installed: "
            "pip install -c constraints.txt -e '.[demo]'"
        ) from None
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = np.clip(np.asarray(image) * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255 grey levels
        Image.fromarray(pixels, mode="L").save(root / str(int(label)) / f"{i:04d}.png")


def prepare_federation(root: str | os.PathLike[str], n_sites: int, address: str, *,
                       training_threads: int = 1, exist_ok: bool = False) -> list[Path]:
    """Create ``n_sites`` node directories under ``root`` (which must not exist, unless ``exist_ok``:
    the demo makes it first, for its researcher service's log), each with its share of the three
    datasets registered under :data:`DATASETS`' names and tags.

    Returns the node directories. The nodes dial ``address`` and give torch ``training_threads``
    threads (they share one machine). The tests and notebooks run against exactly this data.
    """
    if not 1 <= n_sites <= len(SITE_NAMES):
        raise FedlabConfigError(f"--nodes must be between 1 and {len(SITE_NAMES)}, got {n_sites}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=exist_ok)
    (root / MARKER).write_text("made by `fedlab demo`; it deletes and recreates this directory on its next run\n")
    cancer = split_like_sites(load_breast_cancer_frame(), n_sites)
    diabetes = split_by_age(load_diabetes_frame(), n_sites)
    digits = _sklearn().load_digits()
    digit_site = split_digits(digits.target, n_sites)
    node_dirs = []
    for i, name in enumerate(SITE_NAMES[:n_sites]):
        node_dir = root / name
        config = init_node_dir(node_dir, name, address)
        text = config.config_path.read_text()
        config.config_path.write_text(text.replace("training_threads = 0", f"training_threads = {training_threads}"))
        data_dir = node_dir / "data"
        data_dir.mkdir()
        cancer[i].to_csv(data_dir / "breast_cancer.csv", index=False)
        diabetes[i].to_csv(data_dir / "diabetes.csv", index=False)
        mine = digit_site == i
        _write_digits(data_dir / "digits", digits.images[mine], digits.target[mine])
        registry = DatasetRegistry(config.db_path)
        paths = {"breast-cancer": ("csv", data_dir / "breast_cancer.csv"),
                 "diabetes": ("csv", data_dir / "diabetes.csv"),
                 "digits": ("images", data_dir / "digits")}
        for dataset, (tags, description) in DATASETS.items():
            data_type, path = paths[dataset]
            registry.add(dataset, tags, data_type, str(path), description=description)
        node_dirs.append(node_dir)
    return node_dirs


# -- processes ----------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    """Whether a listener may bind ``port``: as libzmq binds (SO_REUSEADDR), so the closed connections of
    a researcher that just stopped (TIME_WAIT) do not count, a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _child_setup() -> Callable[[], None] | None:
    """On Linux, a child gets SIGTERM when the demo dies, even by SIGKILL (no orphans left)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def setup() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def _spawn(argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True, preexec_fn=_child_setup())


def _stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM every process, wait, then SIGKILL the process group of any still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait(5)


def _is_our_node(pid: int, node_dir: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"fedlab" in b" ".join(cmdline) and node_dir.encode() in cmdline


def _stop_leftovers(root: Path) -> None:
    """Stop the nodes a previous demo in ``root`` left running (its pid file says which)."""
    pid_file = root / PIDS
    if not pid_file.exists():
        return
    for line in pid_file.read_text().splitlines():
        pid_text, _, node_dir = line.partition(" ")
        if pid_text.isdigit() and _is_our_node(int(pid_text), node_dir):
            print(f"stopping node {Path(node_dir).name} (pid {pid_text}) left running by an earlier demo")
            os.kill(int(pid_text), signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
            while _is_our_node(int(pid_text), node_dir) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_our_node(int(pid_text), node_dir):
                os.kill(int(pid_text), signal.SIGKILL)


def _recreate(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).exists():
            raise FedlabConfigError(f"{root} exists and was not made by `fedlab demo`; pass another --dir")
        _stop_leftovers(root)
        shutil.rmtree(root)


def _wait_started(procs: Sequence[subprocess.Popen[bytes]], node_dirs: Sequence[Path]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    waiting = list(zip(procs, node_dirs, strict=True))
    while waiting:
        for proc, node_dir in list(waiting):
            log = load_config(node_dir).log_path
            if proc.poll() is not None:
                tail = (node_dir / "stderr.txt").read_text(errors="replace")[-2000:]
                raise FedlabError(f"node {node_dir.name} exited with code {proc.returncode} at start: {tail}")
            if log.exists() and " started; " in log.read_text(errors="replace"):
                waiting.remove((proc, node_dir))
        if waiting and time.monotonic() > deadline:
            raise FedlabError(f"nodes {', '.join(d.name for _, d in waiting)} did not start within "
                              f"{_START_TIMEOUT:.0f} s; see node.log in their directories")
        time.sleep(0.1)


def _start_service(root: Path, address: str) -> subprocess.Popen[bytes]:
    """`fedlab researcher start` for ``address``, logging in ``root``; returns once it listens."""
    from fedlab.transport.service_files import find_service

    proc = _spawn([sys.executable, "-m", "fedlab", "researcher", "start", "--address", address,
                   "--log", str(root / SERVICE_LOG)], log=root / "researcher.out")
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        info = find_service(address, settle=0.0)
        if info is not None and info.pid == proc.pid:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop([proc])
            tail = (root / "researcher.out").read_text(errors="replace").strip().splitlines()[-2:]
            raise FedlabError(f"the demo's researcher service did not start (see {root / 'researcher.out'}): "
                              + " ".join(tail))
        time.sleep(0.05)


def _joined_service(address: str) -> str | None:
    """A note when a researcher service of this user already runs for ``address``'s port, else None."""
    from fedlab.transport.service_files import find_service

    try:
        info = find_service(address)
    except FedlabError:
        return None
    if info is None:
        return None
    return (f"note: a researcher service already runs for port {address.rsplit(':', 1)[1]} (pid {info.pid}); the "
            "nodes join it")


def find_notebooks() -> Path | None:
    """notebooks/ of a fedlab checkout: beside the package (editable install), else the cwd's."""
    for candidate in (Path(__file__).resolve().parents[1] / "notebooks", Path.cwd() / "notebooks"):
        if (candidate / "01_quickstart.ipynb").is_file():
            return candidate
    return None


def _lab_command(notebooks: Path, lab_port: int, browser: bool) -> list[str]:
    command = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.port={lab_port}",
               "--ServerApp.port_retries=0", f"--ServerApp.root_dir={notebooks}",
               "--LabApp.news_url=", "01_quickstart.ipynb"]
    if not browser:
        command.insert(4, "--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(4, "--allow-root")  # containers often run as root; Jupyter refuses that by default
    return command


class _Stopped(Exception):
    """SIGTERM reached the demo: stop like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Stopped


def run_demo(n_nodes: int = 3, directory: str | Path | None = None, port: int = 5555, *,
             lab: bool = True, browser: bool = True, lab_port: int = 8888,
             notebooks: str | Path | None = None) -> int:
    """Make the federation, start it (and JupyterLab), and stop it all on Ctrl-C or SIGTERM.

    JupyterLab serves ``notebooks`` (default: the checkout's notebooks/ directory) and opens
    its 01_quickstart.ipynb."""
    if not 1 <= n_nodes <= len(SITE_NAMES):
        raise FedlabConfigError(f"--nodes must be between 1 and {len(SITE_NAMES)}, got {n_nodes}")
    root = Path(directory or "demo-federation").resolve()
    address = f"tcp://127.0.0.1:{port}"
    if notebooks is not None:
        notebooks = Path(notebooks).resolve()
        if not (notebooks / "01_quickstart.ipynb").is_file():
            raise FedlabConfigError(f"{notebooks} has no 01_quickstart.ipynb; pass the fedlab notebooks/ directory")
    elif lab:
        notebooks = find_notebooks()
    if lab:
        if notebooks is None:
            raise FedlabConfigError("the demo notebooks (notebooks/01_quickstart.ipynb) are not here: run "
                                    "`fedlab demo` from a fedlab checkout, or pass --no-lab")
        if _missing("jupyterlab"):
            raise FedlabConfigError("JupyterLab is not installed: pip install -c constraints.txt -e '.[demo]' "
                                    "(or pass --no-lab)")
        if not _port_free(lab_port):
            raise FedlabConfigError(f"port {lab_port} for JupyterLab is taken (another demo or Jupyter?); "
                                    "stop it or pass --lab-port")
    _recreate(root)  # stops an earlier demo's nodes first, so the port check below sees the truth
    own_service = True
    if not _port_free(port):
        if lab:  # the demo's researcher service must bind it
            raise FedlabConfigError(f"port {port} is taken (a researcher, a researcher service or another demo is "
                                    "listening there); stop it (`fedlab researcher stop`, for a service) or pass "
                                    "--port")
        # --no-lab: the nodes dial whoever listens there, which is what `binder/start CMD` wants when
        # CMD binds its researcher first; anything else there would never answer them
        own_service = False
        print(_joined_service(address) or f"note: something already listens on port {port}; if it is your "
              "researcher, the nodes will join it, otherwise stop it or pass --port", flush=True)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by `fedlab demo`; it deletes and recreates this directory on its next run\n")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if own_service:  # first, so that notebooks (binder/start's command) find it while the sites are made
            service = _start_service(root, address)
            procs.append(service)
            (root / PIDS).write_text(f"{service.pid} {root / SERVICE_LOG}\n")
            print(f"researcher service for {address} running (pid {service.pid}, log {root / SERVICE_LOG}); "
                  "every notebook attaches to it", flush=True)
        print(f"creating {n_nodes} sites in {root} (breast-cancer, diabetes, digits) ...", flush=True)
        node_dirs = prepare_federation(root, n_nodes, address, exist_ok=True)
        for node_dir in node_dirs:
            procs.append(_spawn([sys.executable, "-m", "fedlab", "node", "start", str(node_dir)],
                                log=node_dir / "stderr.txt"))
        lines = [f"{procs[0].pid} {root / SERVICE_LOG}\n"] if own_service else []
        lines += [f"{p.pid} {d}\n" for p, d in zip(procs[-len(node_dirs):], node_dirs, strict=True)]
        (root / PIDS).write_text("".join(lines))
        _wait_started(procs[-len(node_dirs):], node_dirs)
        print(f"{n_nodes} nodes running, dialling the researcher at {address}", flush=True)
        env = dict(os.environ, FEDLAB_ADDRESS=address, FEDLAB_DEMO_DIR=str(root))
        if own_service:
            env["FEDLAB_SERVICE"] = "attach"  # a kernel never binds the port itself: the service holds it
        if lab:
            assert notebooks is not None
            lab_settings = Path(__file__).resolve().parents[1] / "binder" / "jupyter-config"  # in a checkout
            if (lab_settings / "labconfig").is_dir():  # no news toast, no autosave into the checkout
                env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
                    p for p in (str(lab_settings), os.environ.get("JUPYTER_CONFIG_PATH", "")) if p)
            lab_proc = _spawn(_lab_command(notebooks, lab_port, browser), log=root / "jupyterlab.log", env=env,
                              cwd=notebooks)
            procs.insert(0, lab_proc)  # stopped first: its kernels detach from the service
            print(f"JupyterLab on http://localhost:{lab_port}/lab (log: {root / 'jupyterlab.log'}); "
                  "open 01_quickstart.ipynb and run it (several notebooks may run at once). Ctrl-C stops "
                  "everything.", flush=True)
            if not browser:
                _print_lab_url(root / "jupyterlab.log", lab_proc)
        else:
            print("\nConnect from Python:   researcher = fedlab.Researcher(" + repr(address) + ")")
            print(f"or from a notebook:    %load_ext fedlab  then  %fed connect {address} --wait {n_nodes}")
            print(f"the notebooks:         FEDLAB_ADDRESS={address} FEDLAB_DEMO_DIR={root} jupyter lab notebooks/")
            if own_service:
                print("(each attaches to the demo's researcher service: several may be connected at once)")
            print("Ctrl-C stops the nodes.", flush=True)
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise FedlabError(f"{_describe(proc, procs, node_dirs, root)} stopped unexpectedly "
                                      f"(exit code {proc.returncode}); the demo stops the rest")
            time.sleep(0.3)
    except (KeyboardInterrupt, _Stopped):
        print("\nstopping the demo ...", flush=True)
    finally:
        _stop(procs)
        (root / PIDS).unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
    print("stopped", flush=True)
    return 0


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _print_lab_url(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Print JupyterLab's URL with its token once it logs it (for --no-browser)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if "http://" in line and "token=" in line:
                url = line[line.index("http://"):].strip().replace("/lab?", "/lab/tree/01_quickstart.ipynb?", 1)
                print("open " + url, flush=True)
                return
        time.sleep(0.2)


def _describe(proc: subprocess.Popen[bytes], procs: Sequence[subprocess.Popen[bytes]],
              node_dirs: Sequence[Path], root: Path) -> str:
    nodes = procs[-len(node_dirs):]
    if proc in nodes:
        node_dir = node_dirs[list(nodes).index(proc)]
        return f"node {node_dir.name} (see {node_dir / 'node.log'})"
    if "researcher" in (proc.args if isinstance(proc.args, list) else []):
        return f"the researcher service (see {root / SERVICE_LOG})"
    return f"JupyterLab (see {root / 'jupyterlab.log'})"
