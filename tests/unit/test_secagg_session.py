"""The secure aggregation state machines (fedlab.secagg.session) and sealed channel (fedlab.secagg.channel)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import msgspec
import numpy as np
import pytest

from fedlab.errors import FedlabSecaggError
from fedlab.secagg.channel import open_sealed, seal
from fedlab.secagg.fixed_point import decode_int, decode_sum, encode_int, encode_into, frac_bits_for
from fedlab.secagg.server_session import ServerSession
from fedlab.secagg.session import NodeSession
from fedlab.secagg.shamir import P, split

NODES = ["alice", "bob", "carol", "dave", "erin"]
SIZE = 300
CLIP = 16.0
FB = frac_bits_for(len(NODES), CLIP)


class Run:
    """A session set up through the share step, relayed by a ServerSession as the researcher does."""

    def __init__(self, session_id: str = "s1", nodes: Sequence[str] = NODES, threshold: int = 3,
                 keys_from: Sequence[str] | None = None, shares_from: Sequence[str] | None = None) -> None:
        self.session_id = session_id
        self.server = ServerSession(session_id, nodes, threshold)
        self.nodes = {n: NodeSession.new(session_id, n, nodes, threshold) for n in nodes}
        for n in keys_from or nodes:
            self.server.add_keys(n, *self.nodes[n].public_keys())
        keys = self.server.keys()
        self.shares = {n: self.nodes[n].share(keys) for n in shares_from or keys}
        for n, blobs in self.shares.items():
            self.server.add_shares(n, blobs)
        rng = np.random.default_rng(7)
        self.values = {n: rng.normal(0, 3, SIZE) for n in nodes}
        self.counts = {n: int(rng.integers(-1000, 1000)) for n in nodes}

    def encoded(self, node: str) -> np.ndarray:
        vector = np.zeros(SIZE + 1, np.uint64)
        encode_into(vector[:SIZE], self.values[node], scale=1.0, clip=CLIP, frac_bits=FB)
        vector[SIZE] = encode_int(self.counts[node])
        return vector

    def masked(self, node: str) -> np.ndarray:
        session = self.nodes[node]
        session.receive(self.server.blobs_for(node))
        vector = self.encoded(node)
        session.mask(vector)
        return vector

    def finish(self, survivors: Sequence[str], dropped: Sequence[str], answering: Sequence[str] | None = None,
               vectors: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
        vectors = vectors or {n: self.masked(n) for n in survivors}
        total = np.zeros(SIZE + 1, np.uint64)
        for n in survivors:
            total += vectors[n]
        answers = {n: self.nodes[n].unmask_shares(survivors, dropped) for n in answering or survivors}
        unmasked = self.server.unmask(total, survivors, dropped, answers)
        return decode_sum(unmasked[:SIZE], FB), decode_int(int(unmasked[SIZE]))

    def plain(self, nodes: Sequence[str]) -> tuple[np.ndarray, int]:
        return np.sum([self.values[n] for n in nodes], axis=0), sum(self.counts[n] for n in nodes)


def _close(got: np.ndarray, expected: np.ndarray, n: int) -> bool:
    return bool(np.max(np.abs(got - expected)) <= n * 2.0 ** -(FB + 1) + 1e-12)


# -- whole sessions ----------------------------------------------------------------------------
def test_full_run_gives_the_plain_sum() -> None:
    run = Run()
    got, count = run.finish(NODES, [])
    expected, expected_count = run.plain(NODES)
    assert _close(got, expected, 5) and count == expected_count
    assert {s.state for s in run.nodes.values()} == {"unmasked"}


def test_a_node_that_drops_out_after_sharing_is_unmasked_away() -> None:
    run = Run()
    survivors = ["alice", "carol", "erin"]
    run.nodes["bob"].receive(run.server.blobs_for("bob"))  # bob and dave never send a masked vector
    got, count = run.finish(survivors, ["bob", "dave"], answering=["erin", "alice", "carol"])
    expected, expected_count = run.plain(survivors)
    assert _close(got, expected, 3) and count == expected_count


def test_nodes_that_drop_out_before_sharing_are_left_out() -> None:
    run = Run(keys_from=["alice", "bob", "carol", "dave"], shares_from=["alice", "bob", "dave"])
    with pytest.raises(FedlabSecaggError, match="did not take part in the share step"):
        run.server.blobs_for("carol")
    got, count = run.finish(["alice", "bob", "dave"], [])
    expected, expected_count = run.plain(["alice", "bob", "dave"])
    assert _close(got, expected, 3) and count == expected_count


def test_more_answers_than_needed_and_any_subset_of_them() -> None:
    run = Run()
    vectors = {n: run.masked(n) for n in NODES[:4]}
    got, _ = run.finish(NODES[:4], ["erin"], answering=["bob", "dave", "carol"], vectors=vectors)
    assert _close(got, run.plain(NODES[:4])[0], 4)


def test_fewer_answers_than_the_threshold_fail_clearly() -> None:
    run = Run()
    vectors = {n: run.masked(n) for n in NODES[:4]}
    total = sum(vectors.values(), np.zeros(SIZE + 1, np.uint64))
    answers = {n: run.nodes[n].unmask_shares(NODES[:4], ["erin"]) for n in ["alice", "bob"]}
    before = total.copy()
    with pytest.raises(FedlabSecaggError, match="2 nodes answered the unmasking step, 3 are needed"):
        run.server.unmask(total, NODES[:4], ["erin"], answers)
    assert np.array_equal(total, before)  # untouched


def test_the_masked_vector_says_nothing_about_the_input() -> None:
    run = Run()
    encoded = run.encoded("alice")
    masked = run.masked("alice")
    difference = masked.view(np.int64).astype(np.float64) - encoded.view(np.int64).astype(np.float64)
    assert np.count_nonzero(masked == encoded) == 0
    assert np.all(np.abs(difference) > 1e6)
    correlation = np.corrcoef(masked[:SIZE].astype(np.float64), encoded[:SIZE].view(np.int64).astype(np.float64))
    assert abs(correlation[0, 1]) < 0.3


def test_state_survives_a_round_trip_through_bytes_mid_protocol() -> None:
    run = Run()
    for n in NODES:
        run.nodes[n].receive(run.server.blobs_for(n))
    restored = {n: NodeSession.from_bytes(run.nodes[n].to_bytes()) for n in NODES}
    assert restored["bob"].state == "received" and restored["bob"].session_id == "s1"
    assert restored["bob"].public_keys() == run.nodes["bob"].public_keys()
    vectors = {}
    for n in NODES:
        original, again = run.encoded(n), run.encoded(n)
        run.nodes[n].mask(original)
        restored[n].mask(again)
        assert np.array_equal(original, again)
        vectors[n] = again
    run.nodes = restored
    got, count = run.finish(NODES, [], vectors=vectors)
    expected, expected_count = run.plain(NODES)
    assert _close(got, expected, 5) and count == expected_count


def test_stored_state_that_does_not_decode_is_refused() -> None:
    with pytest.raises(FedlabSecaggError, match="does not decode"):
        NodeSession.from_bytes(b"\x93garbage")
    with pytest.raises(FedlabSecaggError, match="does not decode"):
        NodeSession.from_bytes(msgspec.msgpack.encode({"version": 1}))


def test_states_in_order() -> None:
    run = Run()
    alice = run.nodes["alice"]
    assert alice.state == "shared" and NodeSession.new("x", "a", ["a", "b"], 2).state == "keys"
    run.masked("alice")
    assert alice.state == "masked"


# -- refusals on the node ----------------------------------------------------------------------
@pytest.mark.parametrize(("node", "nodes", "threshold", "match"), [
    ("alice", ["alice", "bob", "carol", "dave"], 2, "majority"),
    ("alice", ["alice", "bob"], 3, "majority"),
    ("zoe", ["alice", "bob"], 2, "does not list this node"),
    ("alice", ["alice", "bob", "alice"], 2, "more than once"),
    ("alice", ["alice"], 1, "at least 2 nodes"),
])
def test_new_session_refusals(node: str, nodes: list[str], threshold: int, match: str) -> None:
    with pytest.raises(FedlabSecaggError, match=match):
        NodeSession.new("s", node, nodes, threshold)


def test_share_twice_is_refused() -> None:
    run = Run()
    with pytest.raises(FedlabSecaggError, match="already answered the share step"):
        run.nodes["alice"].share(run.server.keys())


def test_share_checks_the_key_list() -> None:
    sessions = {n: NodeSession.new("s", n, NODES, 3) for n in NODES}
    keys = {n: s.public_keys() for n, s in sessions.items()}
    alice = sessions["alice"]
    with pytest.raises(FedlabSecaggError, match="own keys"):
        alice.share({n: k for n, k in keys.items() if n != "alice"})
    with pytest.raises(FedlabSecaggError, match="own keys"):
        alice.share({**keys, "alice": (keys["alice"][0], keys["bob"][1])})
    with pytest.raises(FedlabSecaggError, match="repeats a public key"):
        alice.share({**keys, "carol": keys["bob"]})
    with pytest.raises(FedlabSecaggError, match="not in it: zoe"):
        alice.share({**keys, "zoe": keys["bob"]})
    with pytest.raises(FedlabSecaggError, match="2 nodes answered the keys step"):
        alice.share({n: keys[n] for n in ["alice", "bob"]})
    with pytest.raises(FedlabSecaggError, match="weak X25519 key"):
        alice.share({**keys, "bob": (bytes(32), keys["bob"][1])})
    assert alice.state == "keys"  # nothing was taken
    assert len(alice.share(keys)) == 4


def test_a_tampered_blob_is_refused() -> None:
    run = Run()
    blobs = run.server.blobs_for("carol")
    blob = bytearray(blobs["alice"])
    blob[-5] ^= 1
    with pytest.raises(FedlabSecaggError, match="sealed by node alice for secure aggregation session s1 do not open"):
        run.nodes["carol"].receive({**blobs, "alice": bytes(blob)})
    assert run.nodes["carol"].state == "shared"
    run.nodes["carol"].receive(blobs)


def test_a_blob_replayed_from_another_session_is_refused() -> None:
    first, second = Run("s1"), Run("s2")
    blobs = second.server.blobs_for("carol")
    with pytest.raises(FedlabSecaggError, match="do not open"):
        second.nodes["carol"].receive({**blobs, "alice": first.server.blobs_for("carol")["alice"]})


def test_a_blob_addressed_to_another_node_is_refused() -> None:
    run = Run()
    blobs = run.server.blobs_for("carol")
    with pytest.raises(FedlabSecaggError, match="sealed by node alice .* do not open"):
        run.nodes["carol"].receive({**blobs, "alice": run.server.blobs_for("bob")["alice"]})
    with pytest.raises(FedlabSecaggError, match="do not open"):  # relabelled sender
        run.nodes["carol"].receive({**blobs, "alice": blobs["bob"]})


def test_receive_checks_the_senders() -> None:
    run = Run(keys_from=["alice", "bob", "carol", "dave"])
    blobs = run.server.blobs_for("carol")
    with pytest.raises(FedlabSecaggError, match="not among the nodes of its share step"):
        run.nodes["carol"].receive({**blobs, "erin": blobs["alice"]})
    with pytest.raises(FedlabSecaggError, match="from itself"):
        run.nodes["carol"].receive({**blobs, "carol": blobs["alice"]})
    with pytest.raises(FedlabSecaggError, match="2 nodes took part in the share step"):
        run.nodes["carol"].receive({"alice": blobs["alice"]})
    run.nodes["carol"].receive(blobs)
    with pytest.raises(FedlabSecaggError, match="shares are taken once"):
        run.nodes["carol"].receive(blobs)


def test_mask_twice_is_refused() -> None:
    run = Run()
    run.masked("alice")
    with pytest.raises(FedlabSecaggError, match="already masked a vector"):
        run.nodes["alice"].mask(run.encoded("alice"))
    with pytest.raises(FedlabSecaggError, match="has not received"):
        run.nodes["bob"].mask(run.encoded("bob"))
    with pytest.raises(FedlabSecaggError, match="uint64"):
        run.nodes["bob"].receive(run.server.blobs_for("bob"))
        run.nodes["bob"].mask(np.zeros(3))


def test_unmask_shares_for_another_split_is_refused() -> None:
    run = Run()
    for n in NODES:
        run.masked(n)
    alice = run.nodes["alice"]
    first = alice.unmask_shares(NODES[:4], ["erin"])
    assert first["erin"][0] == "s" and first["bob"][0] == "b" and first["alice"][0] == "b"
    assert alice.unmask_shares(list(reversed(NODES[:4])), ["erin"]) == first  # same split: same answer
    with pytest.raises(FedlabSecaggError, match="never answers for another split"):
        alice.unmask_shares(NODES, [])


def test_b_shares_then_s_shares_of_one_node_are_refused() -> None:
    """A server that shows one split to some nodes and another to others cannot get both secrets of
    erin from the same node, and a majority threshold leaves too few for either split alone."""
    run = Run()
    for n in NODES:
        run.masked(n)
    asked_b = {n: run.nodes[n].unmask_shares(NODES, []) for n in ["alice", "bob", "carol"]}
    assert all(a["erin"][0] == "b" for a in asked_b.values())
    for n in ["alice", "bob", "carol"]:
        with pytest.raises(FedlabSecaggError, match="never answers for another split"):
            run.nodes[n].unmask_shares(NODES[:4], ["erin"])
    # only dave (and erin, who is then claimed dropped and refuses) are left for the s-shares
    run.nodes["dave"].unmask_shares(NODES[:4], ["erin"])
    with pytest.raises(FedlabSecaggError, match="counts node erin as dropped"):
        run.nodes["erin"].unmask_shares(NODES[:4], ["erin"])


def test_unmask_shares_checks_the_split() -> None:
    run = Run()
    for n in NODES:
        run.masked(n)
    alice = run.nodes["alice"]
    with pytest.raises(FedlabSecaggError, match="exactly the nodes of its share step"):
        alice.unmask_shares(NODES[:4], [])
    with pytest.raises(FedlabSecaggError, match="both survivors and dropped"):
        alice.unmask_shares(NODES, ["erin"])
    with pytest.raises(FedlabSecaggError, match="2 nodes survived"):
        alice.unmask_shares(["alice", "bob"], ["carol", "dave", "erin"])
    fresh = Run()
    fresh.nodes["alice"].receive(fresh.server.blobs_for("alice"))
    with pytest.raises(FedlabSecaggError, match="has not sent a masked vector"):
        fresh.nodes["alice"].unmask_shares(NODES, [])


# -- refusals on the server --------------------------------------------------------------------
def test_server_refuses_blobs_for_nodes_outside_the_keys_step() -> None:
    run = Run(keys_from=["alice", "bob", "carol", "dave"], shares_from=["alice", "bob", "carol"])
    blobs = run.nodes["dave"].share(run.server.keys())
    with pytest.raises(FedlabSecaggError, match=r"for others: \[erin\]"):
        run.server.add_shares("dave", {**blobs, "erin": b"x"})
    with pytest.raises(FedlabSecaggError, match=r"missing: \[alice\]"):
        run.server.add_shares("dave", {k: v for k, v in blobs.items() if k != "alice"})
    with pytest.raises(FedlabSecaggError, match="already sent its shares"):
        run.server.add_shares("alice", run.shares["alice"])
    with pytest.raises(FedlabSecaggError, match="keys step .* is closed"):
        run.server.add_keys("erin", *run.nodes["erin"].public_keys())


def test_server_keys_step_needs_the_threshold() -> None:
    server = ServerSession("s", NODES, 3)
    server.add_keys("alice", *NodeSession.new("s", "alice", NODES, 3).public_keys())
    with pytest.raises(FedlabSecaggError, match="already sent its keys"):
        server.add_keys("alice", *NodeSession.new("s", "alice", NODES, 3).public_keys())
    with pytest.raises(FedlabSecaggError, match="1 nodes answered the keys step of session s, 3 are needed"):
        server.keys()


def test_a_rebuilt_mask_key_that_does_not_match_is_refused() -> None:
    run = Run()
    survivors = NODES[:4]
    total = sum((run.masked(n) for n in survivors), np.zeros(SIZE + 1, np.uint64))
    answers = {n: run.nodes[n].unmask_shares(survivors, ["erin"]) for n in survivors}
    positions = [NODES.index(n) + 1 for n in survivors]
    wrong = split(secrets.token_bytes(32), positions, 3)  # shares of another 32-byte key
    forged = {n: {**a, "erin": ("s", a["erin"][1], wrong[a["erin"][1]])} for n, a in answers.items()}
    with pytest.raises(FedlabSecaggError, match="mask key of dropped node erin .* does not match"):
        run.server.unmask(total, survivors, ["erin"], forged)
    bob = answers["bob"]["bob"]
    garbled = {**answers, "bob": {**answers["bob"], "bob": ("b", bob[1], secrets.randbelow(P))}}  # one altered share
    with pytest.raises(FedlabSecaggError, match="secret of node bob"):
        run.server.unmask(total, survivors, ["erin"], garbled)
    mislabelled = {**answers, "alice": {**answers["alice"], "bob": ("s", 1, answers["alice"]["bob"][2])}}
    with pytest.raises(FedlabSecaggError, match="expected kind 'b'"):
        run.server.unmask(total, survivors, ["erin"], mislabelled)
    with pytest.raises(FedlabSecaggError, match="no survivors"):
        run.server.unmask(total, survivors[:3], ["dave", "erin"], answers)


# -- the sealed channel ------------------------------------------------------------------------
def test_channel_round_trip_and_refusals() -> None:
    key = secrets.token_bytes(32)
    blob = seal(key, "s1", "a", "b", b"hello")
    assert open_sealed(key, "s1", "a", "b", blob) == b"hello"
    assert seal(key, "s1", "a", "b", b"hello") != blob  # a fresh nonce each time
    tampered = bytearray(blob)
    tampered[0] ^= 1
    for args in [(key, "s1", "b", "a", blob),  # wrong direction
                 (key, "s2", "a", "b", blob),  # another session
                 (key, "s1", "a", "c", blob),  # another receiver
                 (secrets.token_bytes(32), "s1", "a", "b", blob),  # another key
                 (key, "s1", "a", "b", bytes(tampered))]:
        with pytest.raises(FedlabSecaggError, match="sealed by node .* for secure aggregation session s"):
            open_sealed(*args)
    with pytest.raises(FedlabSecaggError, match="truncated"):
        open_sealed(key, "s1", "a", "b", blob[:20])


def test_masks_added_in_parallel_slices_equal_the_whole_stream():
    from fedlab.secagg.prg import add_mask, add_masks

    rng = np.random.default_rng(4)
    seeds = [(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), sign) for sign in (1, -1, 1)]
    start = rng.integers(0, 2**63, 100_003, dtype=np.uint64)
    one, many = start.copy(), start.copy()
    for seed, sign in seeds:
        add_mask(one, seed, sign)
    add_masks(many, seeds, workers=3)
    np.testing.assert_array_equal(one, many)
    assert not np.array_equal(one, start)
