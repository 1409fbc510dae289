"""Memory files lent between the researcher service and a kernel: mapped by the other side, reused only
once every view of them is gone, the same buffers written once for many messages."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from fedlab.transport.service_bulk import BULK, Borrower, Lender

pytestmark = pytest.mark.skipif(not BULK, reason="memory files need Linux (memfd and /proc)")


@pytest.fixture
def pair():
    released: list[tuple[str, int]] = []
    lender = Lender(max_files=3)
    borrower = Borrower(os.getpid(), lambda token, seq: released.append((token, seq)))
    yield lender, borrower, released
    borrower.close()
    lender.close()


def test_the_borrower_reads_what_the_lender_wrote_without_a_copy_and_releases_once(pair):
    lender, borrower, released = pair
    a, b = np.arange(100_000, dtype=np.float32), np.arange(7, dtype=np.int64)
    ref = lender.place([memoryview(a), memoryview(b)])
    assert ref is not None and lender.in_use() == 1
    views = borrower.views(ref)
    assert np.array_equal(np.frombuffer(views[0], np.float32), a)
    assert np.array_equal(np.frombuffer(views[1], np.int64), b)
    assert all(o % 64 == 0 for o in ref.offsets)  # aligned: arrays are built over them in place
    again = borrower.views(ref)  # the same file, already mapped
    assert np.frombuffer(again[0], np.float32).__array_interface__["data"][0] == \
        np.frombuffer(views[0], np.float32).__array_interface__["data"][0]
    first = views[0]
    del views, again
    gc.collect()
    assert released == [(ref.token, ref.seq)]  # the second call's views are gone too, but one is still held
    del first
    gc.collect()
    assert released == [(ref.token, ref.seq)] * 2
    lender.release(ref.token, ref.seq)
    lender.release(ref.token, ref.seq)
    assert lender.in_use() == 0


def test_the_same_buffers_in_flight_are_written_once_and_a_busy_file_is_never_overwritten(pair):
    lender, borrower, _ = pair
    model = memoryview(np.ones(50_000, np.float32))
    first, second = lender.place([model]), lender.place([model])  # one round to two nodes
    assert first == second and lender.copied == model.nbytes
    other = lender.place([memoryview(np.full(50_000, 2.0, np.float32))])
    assert other is not None and other.token != first.token  # the first file is still in use
    assert np.frombuffer(borrower.views(first)[0], np.float32)[0] == 1.0
    for _ in range(2):
        lender.release(first.token, first.seq)
    reused = lender.place([memoryview(np.full(50_000, 3.0, np.float32))])
    assert reused is not None and reused.token == first.token and reused.seq == first.seq + 1
    assert np.frombuffer(borrower.views(reused)[0], np.float32)[0] == 3.0


def test_a_lender_with_every_file_in_use_says_so(pair):
    lender, _, _ = pair
    refs = [lender.place([memoryview(bytes([i]) * 100_000)]) for i in range(3)]
    assert all(r is not None for r in refs)
    assert lender.place([memoryview(b"x" * 100_000)]) is None  # the caller sends through the socket instead


def test_references_outside_their_file_or_to_another_file_are_refused(pair):
    lender, borrower, _ = pair
    ref = lender.place([memoryview(b"y" * 1000)])
    assert ref is not None
    with pytest.raises(ValueError, match="outside its file"):
        borrower.views(type(ref)(ref.token, ref.fd, ref.size, ref.seq, [0], [ref.size + 1]))
    with pytest.raises(ValueError, match="not the memory file"):
        borrower.views(type(ref)("0" * 32, ref.fd, ref.size, ref.seq, [0], [10]))
    with pytest.raises(OSError):
        borrower.views(type(ref)(ref.token, 10_000, ref.size, ref.seq, [0], [10]))  # no such descriptor


def test_a_probe_proves_the_peer_can_map_the_files(pair):
    lender, borrower, released = pair
    assert borrower.check_probe(lender.probe())
    gc.collect()
    assert len(released) == 1
    assert not Borrower(2**22 + 12345, lambda t, s: None).check_probe(lender.probe())  # no such process


def test_free_files_unused_for_a_while_are_closed(pair):
    lender, borrower, _ = pair
    ref = lender.place([memoryview(b"z" * 100_000)])
    assert ref is not None
    assert lender.trim(idle_seconds=0.0) == []  # in use: kept
    lender.release(ref.token, ref.seq)
    assert lender.trim(idle_seconds=3600.0) == []  # free, but only just
    assert lender.trim(idle_seconds=0.0) == [ref.token]
    again = lender.place([memoryview(b"w" * 100_000)])
    assert again is not None and again.token != ref.token
