"""BulkInbox (fedlab.transport.bulk_order): CURVE order kept across the two connections, nothing silent.

Messages that came over CURVE after a notice wait until its sealed message has arrived; a
sealed message that was never announced is never delivered; a session that ends turns every
notice still waiting into a Lost entry (which the transports log and answer as an error), and
what waited behind it moves on.
"""

from __future__ import annotations

import logging
import select

import pytest

from fedlab.protocol import PingRequest, make_envelope
from fedlab.transport.bulk_order import BulkInbox, Control, Lost, Sealed

S1, S2 = b"1" * 16, b"2" * 16


def env(name: str):
    return make_envelope(PingRequest(), "node-a", msg_id=name)


def what(ready) -> list[str]:
    out = []
    for item in ready:
        if isinstance(item, Control):
            out.append(item.envelope.msg_id)
        elif isinstance(item, Sealed):
            out.append(f"sealed {item.msg_id}")
        else:
            assert isinstance(item, Lost)
            out.append(f"lost {item.msg_id}")
    return out


def arrive(box: BulkInbox, peer: str, session_id: bytes, msg_id: str, frames: list) -> list:
    """A link's receiving thread hands a sealed message over; the loop drains the inbox."""
    box.link_message(peer, session_id, msg_id, frames)
    return box.drain()


@pytest.fixture
def inbox():
    box = BulkInbox()
    yield box
    box.close()


def test_without_notices_messages_pass_at_once(inbox):
    assert what(inbox.control("a", env("m1"))) == ["m1"]
    assert what(inbox.control("a", env("m2"))) == ["m2"]


def test_messages_after_a_notice_wait_for_its_sealed_message(inbox):
    assert what(inbox.notice("a", S1, "big", None, current=True)) == []
    assert what(inbox.control("a", env("after-1"))) == []
    assert what(inbox.control("b", env("other-peer"))) == ["other-peer"]  # one peer never holds up another
    assert what(inbox.control("a", env("after-2"))) == []
    assert what(arrive(inbox, "a", S1, "big", [memoryview(b"x")])) == ["sealed big", "after-1", "after-2"]
    assert what(inbox.control("a", env("later"))) == ["later"]


def test_a_sealed_message_that_arrives_before_its_notice_waits_for_it(inbox):
    assert what(arrive(inbox, "a", S1, "big", [memoryview(b"x")])) == []
    assert what(inbox.notice("a", S1, "big", None, current=True)) == ["sealed big"]


def test_two_notices_resolve_in_notice_order_whatever_order_the_bodies_come_in(inbox):
    inbox.notice("a", S1, "first", None, current=True)
    inbox.notice("a", S1, "second", None, current=True)
    assert what(arrive(inbox, "a", S1, "second", [])) == []
    assert what(arrive(inbox, "a", S1, "first", [])) == ["sealed first", "sealed second"]


def test_a_sealed_message_without_a_notice_is_never_delivered(inbox, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab.transport")
    assert what(arrive(inbox, "a", S1, "sneaky", [memoryview(b"x")])) == []
    assert what(inbox.control("a", env("m"))) == ["m"]
    assert what(inbox.session_ended("a", S1, "closed")) == []
    assert "dropped message sneaky from a: it came on the bulk connection but was never announced" in caplog.text
    assert what(inbox.notice("a", S1, "sneaky", None, current=False)) == ["lost sneaky"]


def test_a_notice_of_another_session_does_not_take_a_body_of_this_one(inbox):
    arrive(inbox, "a", S1, "m", [])
    inbox.notice("a", S2, "m", None, current=True)
    assert what(inbox.control("a", env("after"))) == []
    assert what(inbox.session_ended("a", S2, "its link closed")) == ["lost m", "after"]


def test_a_session_that_ends_loses_its_waiting_notices_and_releases_what_waited(inbox):
    inbox.notice("a", S1, "big", "request-7", current=True)
    inbox.control("a", env("after"))
    ready = inbox.session_ended("a", S1, "the bulk connection closed")
    assert what(ready) == ["lost big", "after"]
    assert ready[0] == Lost("a", "big", "request-7", "the bulk connection closed")
    assert what(arrive(inbox, "a", S1, "big", [])) == []  # too late: never delivered after its loss


def test_a_notice_for_an_ended_session_is_lost_in_its_place(inbox):
    inbox.notice("a", S1, "first", None, current=True)
    inbox.notice("a", S2, "stale", None, current=False)
    inbox.control("a", env("after"))
    assert what(arrive(inbox, "a", S1, "first", [])) == ["sealed first", "lost stale", "after"]


def test_at_most_max_held_messages_wait_behind_a_notice():
    box = BulkInbox(max_held=3)
    try:
        box.notice("a", S1, "stuck", None, current=True)
        assert what(box.control("a", env("m1"))) == []
        assert what(box.control("a", env("m2"))) == []
        assert what(box.control("a", env("m3"))) == ["lost stuck", "m1", "m2", "m3"]
    finally:
        box.close()


def test_links_hand_over_through_the_pipe_the_loop_polls(inbox, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab.transport")
    inbox.notice("a", S1, "one", None, current=True)
    inbox.notice("a", S1, "two", "req-2", current=True)
    inbox.link_message("a", S1, "one", [memoryview(b"payload")])
    inbox.link_closed("a", S1, "the connection closed after 10 of 20 bytes of a record", "two")
    readable, _, _ = select.select([inbox.fileno], [], [], 5.0)
    assert readable == [inbox.fileno]
    ready = inbox.drain()
    assert what(ready) == ["sealed one", "lost two"]
    assert bytes(ready[0].frames[0]) == b"payload"
    assert "message two from a was cut off mid-transfer" in caplog.text
    assert inbox.drain() == []


def test_a_sealed_message_of_another_size_than_its_notice_is_not_delivered(inbox):
    inbox.notice("a", S1, "m", "req", current=True, size=10)
    inbox.control("a", env("after"))
    ready = arrive(inbox, "a", S1, "m", [memoryview(b"12345"), memoryview(b"678901")])
    assert what(ready) == ["lost m", "after"]
    assert ready[0].reason == "it held 11 bytes where its notice announced 10"
    arrive(inbox, "a", S1, "n", [memoryview(b"1234567890")])  # before its notice, the right size
    assert what(inbox.notice("a", S1, "n", None, current=True, size=10)) == ["sealed n"]
