"""A BPF ring buffer read through its mmap, without libbpf or BCC.

Layout (kernel/bpf/ringbuf.c): page 0 is the consumer position (read-write); from page 1 the
producer position page, then the data area mapped twice in a row, so a record that wraps is
still contiguous. Each record has an 8-byte header: u32 length (bit 31 busy: still being
written, bit 30 discarded) and u32 page offset; records are 8-byte aligned. The kernel wakes a
poller only once the consumer has caught up, so each wake-up reads everything there is.

Reads are batched: `consume` hands the callback the mmap and the offsets of every record ready
now, and advances the consumer position once per batch, so a burst costs one Python call per
batch, not one per record. x86-64 and arm64 loads through the mmap are single aligned 8-byte
reads here; on x86 (TSO) that gives the acquire order libbpf needs barriers for elsewhere.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from collections.abc import Callable

from agent.datapath import bpfsys

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")

# callback(buffer, offsets, lengths): where each record's payload starts in buffer, and its size.
BatchCallback = Callable[[mmap.mmap, list[int], list[int]], None]


class RingBuffer:
    """Consumer of one pinned (or otherwise opened) BPF_MAP_TYPE_RINGBUF map."""

    def __init__(self, map_fd: int) -> None:
        self.fd = os.dup(map_fd)
        self.size = bpfsys.map_max_entries(self.fd)
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._data = page  # where the data area starts in _prod
        self._mask = self.size - 1
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def pending_bytes(self) -> int:
        return int(_U64.unpack_from(self._prod, 0)[0] - _U64.unpack_from(self._cons, 0)[0])

    def consume(self, callback: BatchCallback, max_records: int = 4096) -> int:
        """Deliver the records ready now, in batches; returns how many were delivered."""
        total = 0
        cons = _U64.unpack_from(self._cons, 0)[0]
        while True:
            prod = _U64.unpack_from(self._prod, 0)[0]
            if cons >= prod:
                return total
            offsets: list[int] = []
            lengths: list[int] = []
            while cons < prod and len(offsets) < max_records:
                at = self._data + (cons & self._mask)
                length = _U32.unpack_from(self._prod, at)[0]
                if length & BUSY:
                    break  # still being written; the kernel wakes us when it is committed
                size = length & ~(BUSY | DISCARD)
                cons += (size + HEADER + 7) & ~7
                if not length & DISCARD:
                    offsets.append(at + HEADER)
                    lengths.append(size)
            if offsets:
                try:
                    callback(self._prod, offsets, lengths)
                finally:
                    # Records are consumed even when a callback fails: they cannot be retried.
                    _U64.pack_into(self._cons, 0, cons)
                total += len(offsets)
            else:
                _U64.pack_into(self._cons, 0, cons)
            if length & BUSY:
                return total

    def wait(self, timeout_ms: int) -> None:
        """Return once records are ready (or after timeout_ms)."""
        if self.pending_bytes() == 0:
            self._poll.poll(timeout_ms)

    def poll(self, callback: BatchCallback, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records, then consume them."""
        self.wait(timeout_ms)
        return self.consume(callback)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
        os.close(self.fd)
