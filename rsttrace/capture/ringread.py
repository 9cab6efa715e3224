"""The BPF ring buffer read in batches from its mmap'd pages, as libbpf's ring_buffer__consume does,
without one ctypes callback per record.

bcc's ``ring_buffer_poll`` calls back into Python once per record through ctypes (measured with
py-spy under ``trace -w``: 1.5 us of a 8 us event). Here one ``epoll`` wait and one copy of the
ready span serve every record the kernel has committed since the last read; the caller decodes
them straight from that copy (``struct.unpack_from`` at each record's offset).

The layout is the kernel's (kernel/bpf/ringbuf.c, ringbuf_map_mmap_kern, and libbpf's
ring_buffer__add in tools/lib/bpf/ringbuf.c, which maps it the same way):

- offset 0, one page, read-write: ``consumer_pos`` (u64), which only the reader advances;
- offset PAGE_SIZE, read-only: ``producer_pos`` (u64) on its own page, then the data pages
  mapped **twice** in a row, so a record that wraps is contiguous in the mapping.

Each record is an 8-byte header (``struct bpf_ringbuf_hdr``: u32 length with BUSY bit 31 while
the producer still writes it and DISCARD bit 30 if it was discarded, u32 page offset) followed by
its data, rounded up to 8 bytes. A reader stops at the first BUSY record and publishes how far it
got by storing ``consumer_pos``; the kernel wakes a waiter only when a record is committed at the
position the reader had reached (bpf_ringbuf_commit), which is why the position is stored after
every batch.

Memory order: libbpf pairs ``smp_load_acquire``/``smp_store_release`` with the producer. On x86
(TSO) plain loads and stores give those orders, so the reader is used on x86-64 only; elsewhere
the tracer keeps bcc's ring_buffer_poll. The positions and headers are read and written as
aligned whole words, through memoryviews cast to ``Q``/``I`` (one 8- or 4-byte ``memcpy``, a
single move): ``struct``'s ``=Q`` moves bytes one at a time, and a position read half-old,
half-new once ran the reader past the producer, so that every reservation failed until the
kernel caught up (measured: ~30 events lost per 150 k at 25 k/s with the ring nearly empty).
A record's bytes are copied only after its header was read as committed.
"""

from __future__ import annotations

import mmap
import os
import platform
import select
from typing import Callable, List, Optional, Tuple

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8

# (the buffer, the offsets of its records' data): records are decoded from one copy
Records = Callable[[bytes, List[int]], None]


class RingUnavailable(Exception):
    """The ring buffer cannot be read directly here; bcc's per-record callback is used instead."""


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def max_entries(map_fd: int) -> int:
    """The ring's data size, from the map's fdinfo (the kernel's own account, whatever bcc
    computed from the page count)."""
    with open("/proc/self/fdinfo/%d" % map_fd) as f:
        for line in f:
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    raise RingUnavailable("no max_entries in the ring buffer's fdinfo")


class RingReader:
    """One BPF_MAP_TYPE_RINGBUF map, consumed in batches."""

    def __init__(self, map_fd: int, record_size: int, size: Optional[int] = None,
                 maps: Optional[Tuple[mmap.mmap, mmap.mmap]] = None) -> None:
        """``maps``: the consumer page and the producer mapping, already made (tests give
        anonymous ones laid out as the kernel's; ``map_fd`` is then only waited on)."""
        if not supported():
            raise RingUnavailable("direct ring buffer reads are implemented for x86-64 only")
        self.size = size if size is not None else max_entries(map_fd)
        if self.size <= 0 or self.size & (self.size - 1):
            raise RingUnavailable("ring buffer size %d is not a power of two" % self.size)
        self.mask = self.size - 1
        self.record_size = record_size
        page = mmap.PAGESIZE
        if maps is not None:
            self._consumer, self._producer = maps
        else:
            try:
                self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
                self._producer = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                           offset=page)
            except (OSError, ValueError) as e:
                raise RingUnavailable("mmap of the ring buffer failed: %s" % e) from e
        self._data_at = page  # the data's offset in _producer
        # whole-word views (module docstring): the positions, and the data as u32 for headers
        self._cons = memoryview(self._consumer).cast("Q")
        producer = memoryview(self._producer)
        self._prod = producer[:8].cast("Q")
        self._words = producer[page:].cast("I")
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def poll(self, timeout_ms: int, on_records: Records) -> int:
        """Wait up to ``timeout_ms`` for data (0: do not wait), then consume all there is.
        Returns how many records were handed over."""
        n = self.consume(on_records)
        if n or timeout_ms == 0:
            return n
        try:
            self._epoll.poll(timeout_ms / 1000.0)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for old interpreters
            pass
        return self.consume(on_records)

    def consume(self, on_records: Records) -> int:
        """Hand over every committed record, batch by batch, until the ring is empty or the
        next record is still being written."""
        total = 0
        while True:
            n = self._consume_once(on_records)
            if n < 0:
                return total
            total += n

    def _consume_once(self, on_records: Records) -> int:
        """Records handed over from one span, or -1 when nothing could be consumed."""
        cons = self._cons[0]
        prod = self._prod[0]
        if cons >= prod:
            return -1
        base = cons & self.mask
        words = self._words
        offsets: List[int] = []
        append = offsets.append
        off, end = 0, prod - cons
        # the double mapping keeps a wrapping span contiguous: base + end < 2 * size
        while off < end:
            hdr = words[(base + off) >> 2]
            if hdr & BUSY_BIT:
                break  # not yet committed: this and what follows wait for the next read
            length = hdr & ~DISCARD_BIT
            if not hdr & DISCARD_BIT and length >= self.record_size:
                append(off + HDR_SIZE)
            off += (length + HDR_SIZE + 7) & ~7
        if off == 0:
            return -1
        start = self._data_at + base
        buf = self._producer[start:start + off]  # the committed records, one copy
        # buf is a copy: the span goes back to the kernel before decoding, so a slow batch does
        # not keep the producers from the space
        self._cons[0] = cons + off
        if offsets:
            on_records(buf, offsets)
        return len(offsets)

    def close(self) -> None:
        for v in (self._cons, self._prod, self._words):
            v.release()  # exported views keep an mmap from closing
        for m in (self._consumer, self._producer):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._epoll.close()


def fd_of(table: object) -> int:
    """bcc's table object's map fd (``TableBase.map_fd``, present since bcc 0.1)."""
    fd = getattr(table, "map_fd", None)
    if not isinstance(fd, int) or fd < 0:
        raise RingUnavailable("this bcc does not expose the ring buffer's map fd")
    os.fstat(fd)  # an fd that is not open says so here, not in mmap
    return fd
