"""The batch ring-buffer reader against a ring laid out as the kernel lays it out
(kernel/bpf/ringbuf.c): records with BUSY and DISCARD bits, a wrap through the double mapping,
and the consumer position it publishes."""

from __future__ import annotations

import mmap
import os
import struct
from typing import List, Tuple

import pytest

from rsttrace.capture import ringread
from rsttrace.capture.ringread import BUSY_BIT, DISCARD_BIT, Records, RingReader

pytestmark = pytest.mark.skipif(not ringread.supported(), reason="the direct reader is x86-64 only")

SIZE = 4096  # the ring's data: a power of two
REC = 40  # record payload; with its 8-byte header 48 bytes: records straddle the ring's end
PAGE = mmap.PAGESIZE


class FakeRing:
    """The two mappings the kernel offers, anonymous: the consumer page, then the producer page
    followed by the data twice (what the kernel's double mapping shows a reader)."""

    def __init__(self) -> None:
        self.consumer = mmap.mmap(-1, PAGE)
        self.producer = mmap.mmap(-1, PAGE + 2 * SIZE)
        self.prod = 0
        self.rfd, self.wfd = os.pipe()

    def write(self, payload: bytes, hdr_bits: int = 0) -> int:
        """Append one record; returns its position."""
        pos = self.prod
        rec = struct.pack("=II", len(payload) | hdr_bits, 0) + payload
        rec += b"\0" * (-len(rec) % 8)
        for copy in (0, SIZE):  # both views of the data
            at = PAGE + copy + (pos % SIZE)
            chunk = rec[: max(0, min(len(rec), 2 * SIZE - (copy + pos % SIZE)))]
            self.producer[at:at + len(chunk)] = chunk
        if pos % SIZE + len(rec) > SIZE:  # the part past the end also lands at the start
            over = pos % SIZE + len(rec) - SIZE
            self.producer[PAGE:PAGE + over] = rec[len(rec) - over:]
        self.prod += len(rec)
        self.producer[0:8] = struct.pack("=Q", self.prod)
        return pos

    def commit(self, pos: int, payload_len: int) -> None:
        for copy in (0, SIZE):
            at = PAGE + copy + (pos % SIZE)
            self.producer[at:at + 4] = struct.pack("=I", payload_len)

    def consumer_pos(self) -> int:
        return int(struct.unpack_from("=Q", self.consumer, 0)[0])

    def reader(self) -> RingReader:
        return RingReader(self.rfd, REC, size=SIZE, maps=(self.consumer, self.producer))


def payload(i: int) -> bytes:
    return struct.pack("=Q", i) * (REC // 8)


def collect() -> Tuple[List[int], Records]:
    got: List[int] = []

    def on_records(buf: bytes, offsets: List[int]) -> None:
        for off in offsets:
            got.append(struct.unpack_from("=Q", buf, off)[0])
    return got, on_records


def test_batches_stop_at_a_busy_record_and_resume_once_committed() -> None:
    ring = FakeRing()
    for i in range(3):
        ring.write(payload(i))
    busy = ring.write(payload(3), BUSY_BIT)
    ring.write(payload(4))
    r = ring.reader()
    got, cb = collect()
    assert r.consume(cb) == 3
    assert got == [0, 1, 2]
    assert ring.consumer_pos() == busy  # published up to the record still being written
    ring.commit(busy, REC)
    assert r.consume(cb) == 2
    assert got == [0, 1, 2, 3, 4]
    assert ring.consumer_pos() == ring.prod
    r.close()


def test_discarded_records_are_skipped_but_consumed() -> None:
    ring = FakeRing()
    ring.write(payload(1))
    ring.write(payload(2), DISCARD_BIT)
    ring.write(payload(3))
    got, cb = collect()
    r = ring.reader()
    assert r.consume(cb) == 2
    assert got == [1, 3]
    assert ring.consumer_pos() == ring.prod
    r.close()


def test_a_span_that_wraps_is_read_whole() -> None:
    ring = FakeRing()
    got, cb = collect()
    r = ring.reader()
    n = 0
    for _lap in range(6):  # round the ring several times, reading after every 50 records (2,400 bytes)
        for _ in range(50):
            ring.write(payload(n))
            n += 1
        r.consume(cb)
    assert got == list(range(n))
    assert ring.consumer_pos() == ring.prod == n * 48
    r.close()


def test_poll_waits_on_the_fd_and_returns_what_arrived() -> None:
    ring = FakeRing()
    got, cb = collect()
    r = ring.reader()
    assert r.poll(10, cb) == 0  # nothing: waited and timed out
    ring.write(payload(7))
    os.write(ring.wfd, b"x")  # the kernel's wakeup
    assert r.poll(1000, cb) == 1
    assert got == [7]
    r.close()
