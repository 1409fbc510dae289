"""The session's mask generator: AES-128-CTR for new sessions, AES-256-CTR for older researchers' ones."""

from __future__ import annotations

import secrets

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedlab.errors import FedlabSecaggError
from fedlab.protocol.secagg_messages import SecaggKeysRequest
from fedlab.secagg import prg
from fedlab.secagg.fixed_point import decode_sum, encode_into, frac_bits_for
from fedlab.secagg.server_session import ServerSession
from fedlab.secagg.session import NodeSession

NODES = ["a", "b", "c", "d"]
SIZE = 1001
FB = frac_bits_for(len(NODES), 8.0)


def test_each_generator_is_aes_ctr_keyed_by_its_share_of_the_seed() -> None:
    seed = secrets.token_bytes(32)
    for name, key in (("aes-128-ctr", seed[:16]), ("aes-256-ctr", seed)):
        expected = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * SIZE))
        assert np.array_equal(prg.mask_stream(seed, SIZE, name), np.frombuffer(expected, "<u8"))
    assert np.array_equal(prg.mask_stream(seed, 10), prg.mask_stream(seed, 10, "aes-256-ctr"))  # the default
    assert not np.array_equal(prg.mask_stream(seed, 10, "aes-128-ctr"), prg.mask_stream(seed, 10))
    with pytest.raises(FedlabSecaggError, match="unknown secure aggregation mask generator 'rc4'"):
        prg.mask_stream(seed, 10, "rc4")


def _session(node_prg: str, server_prg: str, dropped: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole session; returns (unmasked sum, plain sum of the survivors)."""
    server = ServerSession("s", NODES, 3, server_prg)
    nodes = {n: NodeSession.new("s", n, NODES, 3, prg=node_prg) for n in NODES}
    for n, session in nodes.items():
        server.add_keys(n, *session.public_keys())
    keys = server.keys()
    for n, session in nodes.items():
        server.add_shares(n, session.share(keys))
    rng = np.random.default_rng(1)
    values = {n: rng.uniform(-8, 8, SIZE) for n in NODES}
    survivors = [n for n in NODES if n != dropped]
    total = np.zeros(SIZE, np.uint64)
    for n in survivors:
        nodes[n].receive(server.blobs_for(n))
        vector = np.empty(SIZE, np.uint64)
        encode_into(vector, values[n], scale=1.0, clip=8.0, frac_bits=FB)
        nodes[n].mask(vector)
        total += vector
    gone = [dropped] if dropped else []
    answers = {n: nodes[n].unmask_shares(survivors, gone) for n in survivors}
    got = decode_sum(server.unmask(total, survivors, gone, answers), FB)
    return got, np.sum([values[n] for n in survivors], axis=0)


@pytest.mark.parametrize("dropped", [None, "b"])
def test_a_session_under_aes_128_unmasks_the_sum(dropped: str | None) -> None:
    got, plain = _session("aes-128-ctr", "aes-128-ctr", dropped)
    assert np.max(np.abs(got - plain)) <= len(NODES) * 2.0 ** -(FB + 1) + 1e-12  # + float64 rounding of the sums


def test_a_server_on_another_generator_would_not_unmask() -> None:
    """Why the generator is part of the session: masks of two generators do not cancel."""
    got, plain = _session("aes-128-ctr", "aes-256-ctr")
    assert np.max(np.abs(got - plain)) > 1.0


def test_unknown_generators_are_refused_and_stored_sessions_keep_theirs() -> None:
    with pytest.raises(FedlabSecaggError, match="mask generator 'aes-64'"):
        NodeSession.new("s", "a", NODES, 3, prg="aes-64")
    with pytest.raises(FedlabSecaggError, match="mask generator"):
        ServerSession("s", NODES, 3, "")
    session = NodeSession.new("s", "a", NODES, 3, prg="aes-128-ctr")
    stored = msgspec.msgpack.decode(session.to_bytes())
    assert NodeSession.from_bytes(session.to_bytes())._st.prg == "aes-128-ctr"
    stored.pop("prg")  # a session stored by a fedlab from before the choice
    assert NodeSession.from_bytes(msgspec.msgpack.encode(stored))._st.prg == "aes-256-ctr"


def test_the_keys_request_names_the_generator_and_an_older_node_refuses_it() -> None:
    class OlderKeysRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        session_id: str
        nodes: list[str]
        threshold: int
        purpose: str = "training"

    new = msgspec.msgpack.encode(SecaggKeysRequest(session_id="s", nodes=NODES, threshold=3, prg=prg.PRG))
    with pytest.raises(msgspec.ValidationError, match="unknown field `prg`"):
        msgspec.msgpack.decode(new, type=OlderKeysRequest)  # it leaves the session at the keys step
    old = msgspec.msgpack.encode(OlderKeysRequest(session_id="s", nodes=NODES, threshold=3))
    assert msgspec.msgpack.decode(old, type=SecaggKeysRequest).prg == prg.LEGACY_PRG == "aes-256-ctr"
    assert prg.PRG == "aes-128-ctr"
