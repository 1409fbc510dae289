"""An encrypted researcher service: `fedlab researcher start --key --allowlist` with keyed nodes.

The service holds the researcher's secret key and the allowlist; kernels attach without them (they
are the same user, who can read the key file anyway). A kernel that names a key attaches only to
a service using that key, so asking for encryption never ends on an insecure or other service; large
messages (a 4 MB buffer each way) cross the service and the encrypted bulk path intact.
"""

from __future__ import annotations

import pytest
from federation import NodeProcess, breast_cancer_splits
from service_helpers import ServiceProcess, private_run_dir

from fedlab import DiscardOnTimeout, Researcher
from fedlab.errors import FedlabConfigError
from fedlab.protocol import PingRequest
from fedlab.transport.keys import create_keypair, read_public_key
from fedlab.transport.service_files import RUN_DIR_ENV

pytest.importorskip("sklearn")
pytestmark = pytest.mark.integration


@pytest.fixture
def keyed(tmp_path, address, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(private_run_dir()))
    monkeypatch.delenv("FEDLAB_KEY", raising=False)
    monkeypatch.delenv("FEDLAB_ALLOWLIST", raising=False)
    public, secret = create_keypair(tmp_path / "keys", "researcher")
    nodes = [NodeProcess.create(tmp_path, f"site-{i}", address, frame=frame, researcher_key=str(public))
             for i, frame in enumerate(breast_cancer_splits(2))]
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("".join(f"{read_public_key(str(n.directory / 'node.key'))} {n.directory.name} "
                                 f"({n.node_id})\n" for n in nodes), encoding="utf-8")
    svc = ServiceProcess(address, "--key", str(secret), "--allowlist", str(allowlist))
    info = svc.wait_listening()
    for node in nodes:
        node.start()
    yield svc, info, nodes, public, secret, allowlist
    for node in nodes:
        node.stop()
    svc.stop()


def test_kernels_attach_to_an_encrypted_service_and_large_messages_cross_it(keyed, address):
    svc, info, nodes, public, secret, allowlist = keyed
    assert info.public_key == read_public_key(str(public)) and info.allowlist == str(allowlist.resolve())
    assert "encrypted, public key" in svc.log() and "INSECURE" not in svc.log()
    with Researcher(address) as plain, Researcher(address, key=secret, allowlist=allowlist) as named:
        assert plain.attached and named.attached
        assert plain.public_key == named.public_key == info.public_key
        plain.wait_for_nodes(2, timeout=60)
        payload = bytes(range(256)) * (4 * 4096)  # 4 MiB: the service's memory files and the bulk path
        request = named.requests.send(PingRequest(), buffers=[payload], policies=[DiscardOnTimeout(60)]).wait()
        assert sorted(request.replies()) == sorted(n.node_id for n in nodes), request.missing()
        for reply in request.replies().values():
            assert [bytes(b) for b in reply.buffers] == [payload]
        stats = plain.stats(plain.search(["breast-cancer"]), ["count"], columns=["mean radius"]).global_stats()
        assert stats.loc["mean radius", "count"] == 569


def test_a_kernel_naming_another_key_or_allowlist_is_refused(keyed, address, tmp_path):
    svc, info, nodes, public, secret, allowlist = keyed
    _, other = create_keypair(tmp_path / "other-keys", "researcher")
    with pytest.raises(FedlabConfigError, match="uses the public key .* not"):
        Researcher(address, key=other, allowlist=allowlist)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(allowlist.read_text())
    with pytest.raises(FedlabConfigError, match="admits the nodes of"):
        Researcher(address, key=secret, allowlist=elsewhere)


def test_a_kernel_naming_a_key_is_not_attached_to_an_insecure_service(tmp_path, address, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(private_run_dir()))
    monkeypatch.delenv("FEDLAB_KEY", raising=False)
    monkeypatch.delenv("FEDLAB_ALLOWLIST", raising=False)
    _, secret = create_keypair(tmp_path / "keys", "researcher")
    svc = ServiceProcess(address)  # insecure
    try:
        svc.wait_listening()
        monkeypatch.setenv("FEDLAB_KEY", str(secret))  # a notebook given a key by its environment
        with pytest.raises(FedlabConfigError, match="runs without a key"):
            Researcher(address)
    finally:
        svc.stop()
