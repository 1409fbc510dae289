"""Who may attach to a researcher service: the user who started it, on the same machine, and no one else.

Three layers, each tested: the run directory is 0700 (another user cannot reach the socket in
it), the socket and the service file are 0600, and the service reads the connecting process's
uid from the connection (``SO_PEERCRED``) and refuses any other. As root the test runs a client as
user ``nobody`` (uid 65534): refused with the directory as it is, and refused by the uid check
once the directory and socket are opened up on purpose. (Not root: the modes are still checked.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from service_helpers import ServiceProcess, private_run_dir

from fedlab.transport.service_files import RUN_DIR_ENV, service_paths

pytestmark = pytest.mark.integration
NOBODY = 65534

# The interpreter lives under /root, which user nobody cannot enter: the client starts as root, imports
# what it needs, and only then becomes nobody (uid and gid), before it touches the run directory.
BECOME_NOBODY = f"""
import os
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
assert os.getuid() == {NOBODY}
"""
ATTACH = "import fedlab, fedlab.researcher.service\n" + BECOME_NOBODY + """
import sys
fedlab.Researcher(sys.argv[1], service="attach")
"""
# A raw attach attempt, as another user would make it: hello on the service's socket, print the answer.
RAW_HELLO = "import sys, zmq\nfrom fedlab.transport.service_link import Hello, decode_link, encode_link\n" \
    + BECOME_NOBODY + r"""
ctx = zmq.Context(); sock = ctx.socket(zmq.DEALER); sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
sock.send_multipart(encode_link(Hello("kernel-intruder", os.getpid(), "researcher-intruder")))
if sock.poll(3000):
    print("answer:", type(reply := decode_link(sock.recv())).__name__, getattr(reply, "reason", ""))
else:
    print("no answer")
"""


@pytest.fixture
def service(monkeypatch, address):
    monkeypatch.setenv(RUN_DIR_ENV, str(private_run_dir()))
    svc = ServiceProcess(address)
    svc.wait_listening()
    yield svc
    svc.stop()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HOME="/nonexistent"), check=False)


def test_only_its_user_can_reach_the_socket(service, address):
    paths = service_paths(address)
    assert mode(paths.info.parent) == 0o700
    assert mode(paths.socket) == 0o600 and mode(paths.info) == 0o600 and mode(paths.lock) == 0o600
    assert stat.S_IMODE(os.stat(paths.info.parent.parent).st_mode) & 0o005  # others may traverse the parent
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    # another user finds nothing it may use: not the run directory, not the socket in it
    refused = as_nobody(ATTACH, address)
    assert refused.returncode != 0 and "belongs to user id 0" in refused.stderr, refused.stderr
    raw = as_nobody(RAW_HELLO, paths.endpoint)
    assert raw.stdout.strip() == "no answer", raw  # connect() on the socket was refused by the directory
    assert "attached" not in service.log().split("kernels of user id")[-1]


def test_the_uid_check_refuses_another_user_even_with_the_directory_open(service, address):
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    paths = service_paths(address)
    os.chmod(paths.info.parent, 0o755)  # noqa: S103 -- a mistake on purpose: the directory and socket opened up
    os.chmod(paths.socket, 0o666)  # noqa: S103
    try:
        raw = as_nobody(RAW_HELLO, paths.endpoint)
    finally:
        os.chmod(paths.info.parent, 0o700)
        os.chmod(paths.socket, 0o600)
    assert "answer: Bye refused: this researcher service belongs to user id 0" in raw.stdout, raw
    assert "only user id 0 may attach" in service.log() and f"of user id {NOBODY}" in service.log()
    assert "kernel-intruder" not in service.log()
