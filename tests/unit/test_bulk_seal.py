"""The bulk path's sealed records (fedlab.transport.bulk_seal): what the receiver accepts and refuses.

A message sealed by one side opens, frame for frame, on the other; any change an attacker on
the network can make to the byte stream (a flipped byte anywhere, a replayed, dropped or
reordered record, a record moved to another message, session, node or direction, a truncated
or oversized record, another key) is refused with a SealError before anything is delivered.
"""

from __future__ import annotations

import os
import struct

import pytest

from fedlab.transport.bulk_seal import (
    HEADER_BYTES,
    MAX_START_BODY,
    MIN_CHUNK_BYTES,
    TAG_BYTES,
    TO_NODE,
    TO_RESEARCHER,
    Opener,
    Sealer,
    SealError,
    SessionKeys,
    check_hello,
    hello_session,
)

CHUNK = MIN_CHUNK_BYTES  # 4 KiB records: many records from small frames
MAX = 1 << 24


def keys_pair(node_id: str = "node-a") -> tuple[SessionKeys, SessionKeys]:
    """The researcher's keys and the node's, derived from what the offer carries."""
    mine, secret = SessionKeys.new(node_id)
    return mine, SessionKeys.derive(secret, mine.session_id, node_id)


def seal(sealer: Sealer, msg_id: str, frames: list[bytes]) -> list[bytes]:
    """The records of one message, each header + body, as the sending thread writes them."""
    out = memoryview(bytearray(HEADER_BYTES + sealer.chunk_bytes + TAG_BYTES))
    records = [sealer.start(msg_id, [len(f) for f in frames])]
    for frame, offset, size in sealer.records(msg_id, frames):
        records.append(bytes(sealer.data_into(out, memoryview(frames[frame])[offset:offset + size], msg_id, frame,
                                              offset)))
    return records


def feed(opener: Opener, records: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Open records in order as the receiving thread does; the messages completed."""
    done = []
    for record in records:
        size = opener.check_header(record[:HEADER_BYTES])
        result = opener.open(record[HEADER_BYTES:HEADER_BYTES + size])
        if result is not None:
            done.append((result[0], [bytes(f) for f in result[1]]))
    return done


def frames_of(*sizes: int) -> list[bytes]:
    return [os.urandom(s) for s in sizes]


@pytest.fixture
def pair():
    researcher, node = keys_pair()
    return Sealer(researcher, TO_NODE, CHUNK), Opener(node, TO_NODE, MAX)


def test_messages_open_frame_for_frame_across_chunk_boundaries(pair):
    sealer, opener = pair
    first = frames_of(60, 200, 0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5)
    second = frames_of(10, 20, 5 * CHUNK)
    records = seal(sealer, "msg-1", first) + seal(sealer, "msg-2", second)
    # a start each, then one record per chunk of each frame (none for the empty one)
    assert len(records) == (1 + 1 + 1 + 0 + 1 + 1 + 1 + 2 + 4) + (1 + 1 + 1 + 5)
    assert feed(opener, records) == [("msg-1", first), ("msg-2", second)]
    assert opener.counter == len(records) and opener.msg_id is None


def test_delivered_buffers_are_read_only(pair):
    sealer, opener = pair
    records = seal(sealer, "m", frames_of(8, 8, 3 * CHUNK))
    for record in records[:-1]:
        assert opener.open(record[HEADER_BYTES:HEADER_BYTES + opener.check_header(record[:HEADER_BYTES])]) is None
    last = records[-1]
    done = opener.open(last[HEADER_BYTES:HEADER_BYTES + opener.check_header(last[:HEADER_BYTES])])
    assert done is not None and all(view.readonly for view in done[1])


@pytest.mark.parametrize("where", ["start header", "start body", "data header", "data body", "data tag"])
def test_a_flipped_byte_anywhere_is_refused(pair, where):
    sealer, opener = pair
    records = [bytearray(r) for r in seal(sealer, "m", frames_of(16, 16, 2 * CHUNK))]
    index, offset = {
        "start header": (0, 15),  # the counter's low byte
        "start body": (0, HEADER_BYTES + 3),
        "data header": (3, 7),  # the length's low byte
        "data body": (3, HEADER_BYTES + 100),
        "data tag": (3, len(records[3]) - 1),
    }[where]
    records[index][offset] ^= 0x01
    with pytest.raises(SealError) as refused:
        feed(opener, [bytes(r) for r in records])
    assert refused.value.reason in {"bad_tag", "replay", "unexpected"}
    if where.endswith(("body", "tag")):
        assert refused.value.reason == "bad_tag"


def test_a_replayed_message_is_refused_after_its_first_delivery(pair):
    sealer, opener = pair
    frames = frames_of(4, 4, 100)
    records = seal(sealer, "m", frames)
    assert feed(opener, records) == [("m", frames)]
    with pytest.raises(SealError, match="replayed, dropped or reordered") as refused:
        feed(opener, records)
    assert refused.value.reason == "replay"


def test_reordered_records_are_refused_even_with_their_counters_rewritten(pair):
    sealer, opener = pair
    records = seal(sealer, "m", frames_of(4, 4, 2 * CHUNK))
    swapped = [records[0], records[1], records[2], records[4], records[3]]
    with pytest.raises(SealError) as refused:
        feed(Opener(opener.keys, TO_NODE, MAX), swapped)
    assert refused.value.reason == "replay"
    # an attacker who also rewrites the clear counters: the nonce and the offset in the tag still differ
    rewritten = [*swapped[:3], recount(swapped[3], 4), recount(swapped[4], 5)]
    with pytest.raises(SealError) as refused:
        feed(opener, rewritten)
    assert refused.value.reason == "bad_tag"


def recount(record: bytes, counter: int) -> bytes:
    return record[:8] + struct.pack(">Q", counter) + record[16:]


def test_a_record_moved_into_another_message_is_refused(pair):
    sealer, opener = pair
    a = seal(sealer, "message-a", frames_of(4, 4, CHUNK))
    b = seal(sealer, "message-b", frames_of(4, 4, CHUNK))
    assert [m for m, _ in feed(opener, a)] == ["message-a"]
    # b's start, then a's first data record in place of b's (its counter rewritten to fit)
    spliced = [b[0], recount(a[1], 6)]
    with pytest.raises(SealError) as refused:
        feed(opener, spliced)
    assert refused.value.reason == "bad_tag"


@pytest.mark.parametrize("other", ["key", "session", "node", "direction"])
def test_another_key_session_node_or_direction_is_refused(other):
    researcher, node = keys_pair("node-a")
    records = seal(Sealer(researcher, TO_NODE, CHUNK), "m", frames_of(4, 4, 10))
    if other == "key":
        wrong = SessionKeys.derive(os.urandom(32), node.session_id, "node-a")
    elif other == "session":
        wrong = SessionKeys(os.urandom(16), "node-a", node.to_node, node.to_researcher)
    elif other == "node":
        wrong = SessionKeys(node.session_id, "node-b", node.to_node, node.to_researcher)
    else:
        wrong = SessionKeys(node.session_id, "node-a", node.to_researcher, node.to_node)  # keys swapped
    with pytest.raises(SealError) as refused:
        feed(Opener(wrong, TO_NODE, MAX), records)
    assert refused.value.reason == "bad_tag"


def test_a_record_reflected_back_to_its_sender_is_refused():
    researcher, _ = keys_pair()
    records = seal(Sealer(researcher, TO_NODE, CHUNK), "m", frames_of(4, 4, 10))
    with pytest.raises(SealError) as refused:
        feed(Opener(researcher, TO_RESEARCHER, MAX), records)
    assert refused.value.reason == "bad_tag"


def test_truncated_records_are_refused(pair):
    sealer, opener = pair
    records = seal(sealer, "m", frames_of(4, 4, 100))
    with pytest.raises(SealError) as refused:
        opener.check_header(records[0][:HEADER_BYTES - 1])
    assert refused.value.reason == "truncated"
    size = opener.check_header(records[0][:HEADER_BYTES])
    with pytest.raises(SealError) as refused:
        opener.open(records[0][HEADER_BYTES:HEADER_BYTES + size - 1])
    assert refused.value.reason == "truncated"


def test_a_data_record_of_the_wrong_length_is_refused_before_its_body_is_read(pair):
    sealer, opener = pair
    records = seal(sealer, "m", frames_of(4, 4, 100))
    feed(opener, records[:3])  # start, header frame, content frame
    longer = bytearray(records[3][:HEADER_BYTES])
    struct.pack_into(">I", longer, 4, 100 + TAG_BYTES + 1)
    with pytest.raises(SealError, match="were next") as refused:
        opener.check_header(bytes(longer))
    assert refused.value.reason == "unexpected"


def test_an_oversized_message_is_refused_before_anything_is_allocated():
    researcher, node = keys_pair()
    sealer = Sealer(researcher, TO_NODE, CHUNK)
    opener = Opener(node, TO_NODE, max_message_bytes=1000)
    start = sealer.start("huge", [10, 10, 1 << 40])  # declares a terabyte
    size = opener.check_header(start[:HEADER_BYTES])
    with pytest.raises(SealError, match="exceeds the limit of 1000 bytes") as refused:
        opener.open(start[HEADER_BYTES:HEADER_BYTES + size])
    assert refused.value.reason == "too_large"
    header = bytearray(start[:HEADER_BYTES])
    struct.pack_into(">I", header, 4, MAX_START_BODY + 1)  # a start larger than any frame table
    with pytest.raises(SealError) as refused:
        Opener(node, TO_NODE, 1000).check_header(bytes(header))
    assert refused.value.reason == "too_large"


def test_junk_and_data_before_a_start_are_refused(pair):
    sealer, opener = pair
    with pytest.raises(SealError) as refused:
        opener.check_header(os.urandom(HEADER_BYTES))
    assert refused.value.reason == "not_bulk"
    records = seal(sealer, "m", frames_of(4, 4, 10))
    with pytest.raises(SealError) as refused:
        opener.check_header(recount(records[1], 1)[:HEADER_BYTES])  # data where a message must start
    assert refused.value.reason == "unexpected"


def test_hello_and_welcome_prove_the_session_key():
    researcher, node = keys_pair()
    hello = Sealer(node, TO_RESEARCHER).greeting()
    assert hello_session(hello[:HEADER_BYTES], hello[HEADER_BYTES:]) == researcher.session_id
    opener = Opener(researcher, TO_RESEARCHER, MAX)
    opener.check_header(hello[:HEADER_BYTES], greeting=True)
    opener.open_greeting(hello[HEADER_BYTES:])
    welcome = Sealer(researcher, TO_NODE).greeting()
    back = Opener(node, TO_NODE, MAX)
    back.check_header(welcome[:HEADER_BYTES], greeting=True)
    back.open_greeting(welcome[HEADER_BYTES:])

    forged = bytearray(hello)
    forged[-1] ^= 1
    opener = Opener(researcher, TO_RESEARCHER, MAX)
    opener.check_header(bytes(forged[:HEADER_BYTES]), greeting=True)
    with pytest.raises(SealError) as refused:
        opener.open_greeting(bytes(forged[HEADER_BYTES:]))
    assert refused.value.reason == "bad_tag"
    other, _ = keys_pair()  # a hello of another session, checked against this one
    stranger = Sealer(SessionKeys(other.session_id, "node-a", node.to_node, node.to_researcher),
                      TO_RESEARCHER).greeting()
    opener = Opener(researcher, TO_RESEARCHER, MAX)
    opener.check_header(stranger[:HEADER_BYTES], greeting=True)
    with pytest.raises(SealError) as refused:
        opener.open_greeting(stranger[HEADER_BYTES:])
    assert refused.value.reason == "bad_session"


@pytest.mark.parametrize("first", ["junk", "a start", "a welcome", "long"])
def test_anything_but_a_hello_first_is_refused_from_its_header(first):
    researcher, node = keys_pair()
    header = {
        "junk": os.urandom(HEADER_BYTES),
        "a start": Sealer(node, TO_RESEARCHER).start("m", [1, 1])[:HEADER_BYTES],
        "a welcome": Sealer(researcher, TO_NODE).greeting()[:HEADER_BYTES],
        "long": b"FB\x01\x01" + struct.pack(">I", 1 << 30) + bytes(8),
    }[first]
    with pytest.raises(SealError) as refused:
        check_hello(header)
    assert refused.value.reason in {"not_bulk", "no_hello"}


def test_keys_differ_per_direction_session_and_node_and_never_show_in_repr():
    researcher, node = keys_pair("node-a")
    assert (researcher.to_node, researcher.to_researcher) == (node.to_node, node.to_researcher)
    assert researcher.to_node != researcher.to_researcher
    again, _ = keys_pair("node-a")
    assert again.to_node != researcher.to_node and again.session_id != researcher.session_id
    assert researcher.to_node.hex() not in repr(researcher) and str(researcher.to_node) not in repr(researcher)
    with pytest.raises(SealError):
        SessionKeys.derive(b"short", researcher.session_id, "node-a")
