"""Split virtqueues (VIRTIO 1.x, section 2.7 "Split Virtqueues") living in guest memory.

Theory of operation
-------------------
A virtqueue is three areas in guest-physical memory, all little-endian:

- the descriptor table: ``size`` entries of 16 bytes ``{u64 addr; u32 len; u16 flags;
  u16 next}`` (alignment 16);
- the available ring, written by the driver: ``{u16 flags; u16 idx; u16 ring[size];
  u16 used_event}`` (alignment 2);
- the used ring, written by the device: ``{u16 flags; u16 idx; {u32 id; u32 len}
  ring[size]; u16 avail_event}`` (alignment 4).

The driver (``DriverQueue``) writes a chain of descriptors, puts its head in the next
available slot and then publishes the new ``avail.idx``; the device (``DeviceQueue``) pops
heads between its own ``last_avail`` and ``avail.idx``, walks each chain, and returns it by
writing ``{id, len}`` into the used ring and bumping ``used.idx``. Both indexes are free
running 16-bit counters; slots are ``idx % size``.

Everything the device reads was written by the driver and is untrusted (and the other way
round for the used ring): every index, flag, address and length is checked here and a
violation raises ``DescriptorError`` or ``GuestAddressError`` (both ``PeerError``), never
anything else. A queue's memory is read through ``GuestRamView``: the part of guest memory
this process can see.

No I/O, no clock: the caller owns the buffer.
"""

from __future__ import annotations

import functools
import itertools
import math
import mmap
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import DescriptorError, GuestAddressError, UsageError

# VIRTIO 1.x 2.7.5 "The Virtqueue Descriptor Table" (struct virtq_desc flags)
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
# 2.7.6 / 2.7.8: ring flags (we never suppress notifications, but decode them)
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

VIRTQ_MAX_SIZE: Final = 32768  # 2.7: "Queue Size ... maximum 32768"
VIRTQ_DESC_BYTES: Final = 16
VIRTQ_DESC_ALIGN: Final = 16
VIRTQ_AVAIL_ALIGN: Final = 2
VIRTQ_USED_ALIGN: Final = 4
_U16: Final = 0xFFFF


class VirtqueueCounter(CounterName):
    """What a ``DriverQueue`` counts in its owner's bag (the device's used ring is untrusted)."""

    USED_IDX_JUMP = "used_idx_jump"  # used.idx ran ahead of the chains in flight: queue broken
    USED_UNKNOWN_HEAD = "used_unknown_head"  # used entries naming a head not in flight (skipped)
    USED_LEN_TOO_LONG = "used_len_too_long"  # used lengths over the chain's writable bytes (cut)


_DESC = struct.Struct("<QIHH")
_U16S = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U16_DTYPE = np.dtype("<u2")
_USED_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

#: Chains at least this long are written as one array (shorter: a struct write each is cheaper).
_ADD_ARRAY_MIN: Final = 8

Buffer = bytearray | memoryview | mmap.mmap


class GuestRamView:
    """A writable window ``[base_gpa, base_gpa + len(buf))`` onto a guest of ``guest_bytes``.

    Accesses outside the guest, or inside it but outside this window, raise
    ``GuestAddressError``: the address came from the peer, so a bad one is the peer's fault.
    """

    __slots__ = ("_mem", "_u16", "base_gpa", "guest_bytes")

    def __init__(self, buf: Buffer, *, base_gpa: int, guest_bytes: int) -> None:
        mem = memoryview(buf).cast("B")
        if mem.readonly:
            raise UsageError("GuestRamView needs a writable buffer")
        if base_gpa < 0 or guest_bytes <= 0 or base_gpa + len(mem) > guest_bytes:
            raise UsageError(
                f"view [{base_gpa:#x}, {base_gpa + len(mem):#x}) outside a guest of "
                f"{guest_bytes:#x} bytes"
            )
        self._mem = mem
        # Ring indices are read and written while the peer runs on another CPU: each must be
        # one 16-bit load or store, never torn. struct's "<H" goes byte by byte (a reader may
        # see the new low byte with the old high byte: a used index that jumps by 256);
        # a native "H" memoryview item is one aligned 2-byte access (virtio is little-endian).
        self._u16: memoryview | None = None
        if sys.byteorder == "little" and len(mem) % 2 == 0:
            self._u16 = mem.cast("H")
        self.base_gpa = base_gpa
        self.guest_bytes = guest_bytes

    @property
    def size_bytes(self) -> int:
        return len(self._mem)

    @property
    def end_gpa(self) -> int:
        return self.base_gpa + len(self._mem)

    def in_guest(self, gpa: int, length: int) -> bool:
        return gpa >= 0 and length >= 0 and gpa + length <= self.guest_bytes

    def check_guest(self, gpa: int, length: int) -> None:
        """Raise unless ``[gpa, gpa + length)`` lies inside the guest's memory."""
        if not self.in_guest(gpa, length):
            raise GuestAddressError(
                f"[{gpa:#x}, +{length:#x}) outside guest memory of {self.guest_bytes:#x} bytes"
            )

    def _offset(self, gpa: int, length: int) -> int:
        off = gpa - self.base_gpa
        if off >= 0 and length >= 0 and off + length <= len(self._mem):
            return off  # inside this window, hence inside the guest (checked at __init__)
        self.check_guest(gpa, length)
        if off < 0 or off + length > len(self._mem):
            raise GuestAddressError(
                f"[{gpa:#x}, +{length:#x}) is guest memory this view does not map "
                f"([{self.base_gpa:#x}, {self.end_gpa:#x}))"
            )
        return off

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return self._mem[off : off + length].tobytes()

    def unpack(self, fmt: struct.Struct, gpa: int) -> tuple[Any, ...]:
        """``fmt`` unpacked from the bytes at ``gpa`` (``read`` then unpack, without the copy)."""
        return fmt.unpack_from(self._mem, self._offset(gpa, fmt.size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        off = self._offset(gpa, n)
        self._mem[off : off + n] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        off = self._offset(gpa, length)
        self._mem[off : off + length] = bytes([value]) * length

    def read_u16(self, gpa: int) -> int:
        """One 16-bit load (see ``__init__``); a misaligned address is read bytewise."""
        off = self._offset(gpa, 2)
        if self._u16 is not None and not off & 1:
            return int(self._u16[off >> 1])
        return int(_U16S.unpack_from(self._mem, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store (see ``__init__``); a misaligned address is written bytewise."""
        off = self._offset(gpa, 2)
        if self._u16 is not None and not off & 1:
            self._u16[off >> 1] = value & _U16
        else:
            _U16S.pack_into(self._mem, off, value & _U16)

    def read_array(self, gpa: int, count: int, dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
        """``count`` items of ``dtype`` at ``gpa`` (a copy: the peer may change the memory)."""
        dt = np.dtype(dtype)
        off = self._offset(gpa, count * dt.itemsize)
        return np.frombuffer(self._mem, dtype=dt, count=count, offset=off).copy()

    def array(self, gpa: int, count: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        """``count`` items of ``dtype`` at ``gpa`` as a writable array over the memory itself
        (no copy: for a bulk path's writes; the peer may change what it reads)."""
        off = self._offset(gpa, count * dtype.itemsize)
        return np.frombuffer(self._mem, dtype=dtype, count=count, offset=off)

    def write_array(self, gpa: int, arr: npt.NDArray[np.generic]) -> None:
        self.write(gpa, np.ascontiguousarray(arr).tobytes())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def desc_table_bytes(size: int) -> int:
    return VIRTQ_DESC_BYTES * size


def avail_ring_bytes(size: int) -> int:
    return 6 + 2 * size  # flags, idx, ring[size], used_event


def used_ring_bytes(size: int) -> int:
    return 6 + 8 * size  # flags, idx, ring[size], avail_event


@dataclass(frozen=True, slots=True)
class QueueLayout:
    """Where one queue's three areas sit in guest-physical memory (what the driver tells the
    device through the transport; untrusted on the device's side until ``check`` passes)."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    @classmethod
    def packed(cls, gpa: int, size: int) -> QueueLayout:
        """Descriptor table at ``gpa``, available ring right after it, used ring aligned to 4."""
        avail = gpa + desc_table_bytes(size)
        used = -(-(avail + avail_ring_bytes(size)) // VIRTQ_USED_ALIGN) * VIRTQ_USED_ALIGN
        layout = cls(size, gpa, avail, used)
        layout.check_shape()
        return layout

    @property
    def end_gpa(self) -> int:
        return max(
            self.desc_gpa + desc_table_bytes(self.size),
            self.avail_gpa + avail_ring_bytes(self.size),
            self.used_gpa + used_ring_bytes(self.size),
        )

    def check_shape(self) -> None:
        """Size a power of two within the maximum; areas aligned (2.7 "Virtqueues")."""
        if not _is_pow2(self.size) or self.size > VIRTQ_MAX_SIZE:
            raise DescriptorError(f"queue size {self.size} is not a power of two <= 32768")
        for name, gpa, align in (
            ("descriptor table", self.desc_gpa, VIRTQ_DESC_ALIGN),
            ("available ring", self.avail_gpa, VIRTQ_AVAIL_ALIGN),
            ("used ring", self.used_gpa, VIRTQ_USED_ALIGN),
        ):
            if gpa < 0 or gpa % align:
                raise DescriptorError(f"{name} at {gpa:#x} is not {align}-byte aligned")

    def check(self, view: GuestRamView) -> None:
        """``check_shape`` plus: every area is memory ``view`` maps."""
        self.check_shape()
        view.read(self.desc_gpa, desc_table_bytes(self.size))
        view.read(self.avail_gpa, avail_ring_bytes(self.size))
        view.read(self.used_gpa, used_ring_bytes(self.size))


@dataclass(frozen=True, slots=True)
class UsedElem:
    """One returned chain: its head and the bytes the device wrote into it."""

    head: int
    length: int


@dataclass(slots=True)
class _Flight:
    descs: list[int]
    writable_bytes: int


class DriverQueue:
    """The driver's end of a split virtqueue: it owns the descriptor table and the avail ring.

    ``add`` writes a chain and queues its head; ``publish`` makes queued heads visible to the
    device (one ``avail.idx`` store, after the ring slots, as 2.7.13 orders it); ``collect``
    reads what the device used. Bad used entries are counted in ``counters`` and skipped; a
    used index that runs more than ``size`` ahead breaks the queue (``DescriptorError``).
    """

    def __init__(
        self, view: GuestRamView, layout: QueueLayout, counters: Counters, *, start_index: int = 0
    ) -> None:
        layout.check(view)
        self.view = view
        self.layout = layout
        self.size = layout.size
        self.counters = counters
        view.fill(layout.desc_gpa, desc_table_bytes(self.size))
        self._desc_off = view._offset(layout.desc_gpa, desc_table_bytes(self.size))
        view.fill(layout.avail_gpa, avail_ring_bytes(self.size))
        view.fill(layout.used_gpa, used_ring_bytes(self.size))
        self._free: list[int] = list(range(self.size - 1, -1, -1))  # stack: 0 first
        # start_index: both ends resume at the same free-running index (snapshot restore,
        # tests of the 16-bit wrap-around); a fresh queue starts at 0
        self._avail_idx = start_index & _U16  # shadow of avail.idx incl. unpublished heads
        self._last_used = start_index & _U16
        self._flight: dict[int, _Flight] = {}
        self.broken = False
        view.write_u16(layout.avail_gpa + 2, self._avail_idx)
        view.write_u16(layout.used_gpa + 2, self._last_used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def add(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Queue a chain of ``(gpa, len, device_writable)`` buffers; returns its head index."""
        n = len(bufs)
        free = self._free
        if n == 0 or n > len(free):
            raise UsageError(f"add: {n} buffers, {len(free)} free descriptors")
        if self.broken:
            raise UsageError("add: the queue is broken")
        seen_w = False
        wbytes = 0
        for _, length, w in bufs:
            if w:
                seen_w = True
                wbytes += length
            elif seen_w:
                raise UsageError("add: device-readable buffer after a device-writable one")
        ids = free[-n:]  # popped one by one: the top of the stack first
        ids.reverse()
        del free[-n:]
        if n >= _ADD_ARRAY_MIN:
            # a long chain (a free page report): the descriptors in one array write
            rows = np.empty(n, dtype=_DESC_DTYPE)
            rows["addr"] = [gpa for gpa, _, _ in bufs]
            rows["len"] = [length for _, length, _ in bufs]
            rows["flags"] = [VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT if w else VIRTQ_DESC_F_NEXT
                             for _, _, w in bufs]
            rows["flags"][-1] ^= VIRTQ_DESC_F_NEXT
            rows["next"][:-1] = ids[1:]
            rows["next"][-1] = 0
            self.view.array(self.layout.desc_gpa, self.size, _DESC_DTYPE)[ids] = rows
        else:
            # the table lies in the view (checked at __init__): entries packed straight in
            mem, table = self.view._mem, self._desc_off
            last = n - 1
            for i, (gpa, length, w) in enumerate(bufs):
                flags = VIRTQ_DESC_F_WRITE if w else 0
                if i < last:
                    _DESC.pack_into(mem, table + VIRTQ_DESC_BYTES * ids[i], gpa, length,
                                    flags | VIRTQ_DESC_F_NEXT, ids[i + 1])
                else:
                    _DESC.pack_into(mem, table + VIRTQ_DESC_BYTES * ids[i], gpa, length, flags, 0)
        head = ids[0]
        slot = self._avail_idx % self.size
        self.view.write_u16(self.layout.avail_gpa + 4 + 2 * slot, head)
        self._avail_idx = (self._avail_idx + 1) & _U16
        self._flight[head] = _Flight(ids, wbytes)
        return head

    def add_uniform(self, gpas: npt.NDArray[np.int64], length: int, writable: bool) -> int:
        """``add`` of one ``length``-byte buffer at each of ``gpas`` (a free page report's
        blocks), without building the list: the same descriptors, ring slot and chain."""
        n = int(gpas.size)
        if n < _ADD_ARRAY_MIN:
            return self.add([(g, length, writable) for g in gpas.tolist()])
        free = self._free
        if n > len(free):
            raise UsageError(f"add: {n} buffers, {len(free)} free descriptors")
        if self.broken:
            raise UsageError("add: the queue is broken")
        if int(gpas.min()) < 0 or length < 0:
            raise UsageError("add: a negative address or length")
        ids = free[-n:]  # popped one by one: the top of the stack first
        ids.reverse()
        del free[-n:]
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        rows = np.empty(n, dtype=_DESC_DTYPE)
        rows["addr"] = gpas
        rows["len"] = length
        rows["flags"] = flags | VIRTQ_DESC_F_NEXT
        rows["flags"][-1] = flags
        rows["next"][:-1] = ids[1:]
        rows["next"][-1] = 0
        self.view.array(self.layout.desc_gpa, self.size, _DESC_DTYPE)[ids] = rows
        head = ids[0]
        slot = self._avail_idx % self.size
        self.view.write_u16(self.layout.avail_gpa + 4 + 2 * slot, head)
        self._avail_idx = (self._avail_idx + 1) & _U16
        self._flight[head] = _Flight(ids, n * length if writable else 0)
        return head

    def publish(self) -> None:
        self.view.write_u16(self.layout.avail_gpa + 2, self._avail_idx)

    def collect(self) -> list[UsedElem]:
        """Every chain the device returned since the last call, in used-ring order."""
        if self.broken or not self._flight:
            return []
        used_idx = self.view.read_u16(self.layout.used_gpa + 2)
        n = (used_idx - self._last_used) & _U16
        if n == 0:
            return []
        if n > len(self._flight):
            self.broken = True
            self.counters.inc(VirtqueueCounter.USED_IDX_JUMP)
            raise DescriptorError(
                f"used.idx {used_idx} is {n} ahead with {len(self._flight)} chains in flight"
            )
        out: list[UsedElem] = []
        ring = self.layout.used_gpa + 4
        for k in range(n):
            slot = (self._last_used + k) % self.size
            head, length = self.view.unpack(_USED_ELEM, ring + 8 * slot)
            fl = self._flight.pop(head, None)
            if fl is None:
                self.counters.inc(VirtqueueCounter.USED_UNKNOWN_HEAD)
                continue
            if length > fl.writable_bytes:
                self.counters.inc(VirtqueueCounter.USED_LEN_TOO_LONG)
                length = fl.writable_bytes
            self._free.extend(reversed(fl.descs))
            out.append(UsedElem(head, length))
        self._last_used = used_idx
        return out


def complete_rounds(
    driver: DriverQueue,
    device: DeviceQueue,
    chains: Sequence[Sequence[tuple[int, int, bool]]],
    lengths: Sequence[int],
    rounds: int,
) -> None:
    """``rounds`` honest round trips at once: each time the driver adds every chain of
    ``chains`` and publishes, the device pops them all and returns each used with its length
    in ``lengths``, in order, and the driver collects them. Both ends, the descriptor free list
    and the guest memory of the rings end as those round trips leave them (the last write of
    every descriptor and ring slot). Only for two ends in one process with nothing in flight:
    the simulator's bulk inflate (a property test holds it to the round trips)."""
    if driver.broken or device.broken or driver._flight:
        raise UsageError("complete_rounds: a broken queue or chains in flight")
    if not (driver._avail_idx == device.last_avail and driver._last_used == device.used_idx
            == device.last_avail):
        raise UsageError("complete_rounds: the two ends do not agree")
    if len(lengths) != len(chains) or sum(map(len, chains)) > len(driver._free):
        raise UsageError("complete_rounds: bad chains")
    size, free = driver.size, driver._free
    c, m = len(chains), sum(map(len, chains))
    aidx = driver._avail_idx
    view, lay = driver.view, driver.layout
    if rounds > 0 and m:
        # which of the top's descriptors each write names (``_round_plan_of``): the same for
        # every call of these chains, so only the gathers and the ring writes are per call
        plan = _round_plan(tuple(map(tuple, chains)), tuple(lengths), rounds, size)
        base = np.array(free[len(free) - m:], dtype=np.int64)
        free[len(free) - m:] = base[plan.top].tolist()
        heads = base[plan.heads]
        slots = (aidx + rounds * c + plan.writes) % size
        view.array(lay.avail_gpa + 4, size, _U16_DTYPE)[slots] = heads
        used = view.array(lay.used_gpa + 4, size, _USED_DTYPE)
        used["id"][slots] = heads
        used["len"][slots] = plan.lens
        ids = base[plan.ids]
        rows = plan.rows.copy()
        rows["next"][:-1] = ids[1:]
        rows["next"][plan.last] = 0
        view.array(lay.desc_gpa, size, _DESC_DTYPE)[ids] = rows
    aidx = (aidx + rounds * c) & _U16 if rounds > 0 else aidx
    view.write_u16(lay.avail_gpa + 2, aidx)
    view.write_u16(lay.used_gpa + 2, aidx)
    driver._avail_idx = driver._last_used = device.last_avail = device.used_idx = aidx
    device.descriptors_read += max(rounds, 0) * m


@dataclass(frozen=True, slots=True)
class _RoundShape:
    """What ``complete_rounds`` derives from the chains alone (the same every inflate)."""

    cyc: npt.NDArray[np.int64]  # the round permutation's cycles (``_cycles``)
    start: npt.NDArray[np.int64]
    pos: npt.NDArray[np.int64]
    clen: npt.NDArray[np.int64]
    head_cols: list[int]  # where each chain's head sits in the free list's top
    rows: npt.NDArray[Any]  # the descriptors, ``next`` left 0
    last: npt.NDArray[np.bool_]  # the last buffer of each chain
    period: int  # rounds after which the permutation is the identity again


@dataclass(frozen=True, slots=True)
class _RoundPlan:
    """Where ``complete_rounds`` finds its writes in the free list's top (``base``, the m
    descriptors every round pops): the same for every call with these chains, lengths, ring
    size and number of rounds (up to the permutation's period, past a ring's worth)."""

    top: npt.NDArray[np.int64]  # the top after the rounds: base[top]
    heads: npt.NDArray[np.int64]  # the heads of the last k ring writes: base[heads]
    writes: npt.NDArray[np.int64]  # those writes' numbers, less rounds * chains
    lens: npt.NDArray[np.uint32]  # their used lengths
    ids: npt.NDArray[np.int64]  # the last round's descriptors, in buffer order: base[ids]
    rows: npt.NDArray[Any]  # the descriptors, ``next`` left 0
    last: npt.NDArray[np.bool_]  # the last buffer of each chain


@functools.lru_cache(maxsize=1024)
def _round_plan(chains: tuple[tuple[tuple[int, int, bool], ...], ...],
                lengths: tuple[int, ...], rounds: int, size: int) -> _RoundPlan:
    """``_round_plan_of`` for ``rounds`` (one lookup a call: the class of rounds once)."""
    shape = _round_shape(chains)
    full = -(-size // len(chains))  # rounds a ring's worth of slots takes
    if rounds > full:  # the tail is the same past that, and the permutation repeats
        rounds = full + (rounds - full) % shape.period
    return _round_plan_of(chains, lengths, rounds, size)


@functools.lru_cache(maxsize=512)
def _round_plan_of(chains: tuple[tuple[tuple[int, int, bool], ...], ...],
                   lengths: tuple[int, ...], rounds: int, size: int) -> _RoundPlan:
    # Every round pops the same m descriptors (the top of the free list) chain by chain and
    # frees them in used order: the top comes out permuted, the same way each round
    # (``perm``: afterwards entry j holds what entry perm[j] held). Round r's descriptors are
    # the top permuted r times; of its ring writes only the last ``size`` (a ring's worth,
    # the last ``tail`` rounds) leave a mark, and of its descriptor writes only the last
    # round's (each round writes the same m entries).
    shape = _round_shape(chains)
    c = len(chains)
    tail = min(rounds, -(-size // c))
    rs = np.arange(rounds - tail, rounds + 1)[:, None]  # the tail rounds, then the end
    idx = shape.cyc[shape.start + (shape.pos + rs) % shape.clen]
    k = min(tail * c, size)
    writes = np.arange(k, dtype=np.int64) - k  # the last k writes, less rounds * c
    lens = np.array([n & 0xFFFF_FFFF for n in lengths], np.int64)[writes % c]
    return _RoundPlan(top=idx[-1], heads=idx[:-1, shape.head_cols].ravel()[-k:],
                      writes=writes, lens=lens.astype(np.uint32), ids=idx[-2, ::-1].copy(),
                      rows=shape.rows, last=shape.last)


@functools.lru_cache(maxsize=64)
def _round_shape(chains: tuple[tuple[tuple[int, int, bool], ...], ...]) -> _RoundShape:
    sizes = [len(bufs) for bufs in chains]
    m = sum(sizes)
    firsts = list(itertools.accumulate(sizes, initial=0))[:-1]  # chain j's first buffer
    # pops run from the top (index m - 1) down; each chain is freed in reverse
    perm = [m - 1 - i for a, n in zip(firsts, sizes, strict=True)
            for i in range(a + n - 1, a - 1, -1)]
    last = np.zeros(m, dtype=np.bool_)
    last[[a + n - 1 for a, n in zip(firsts, sizes, strict=True)]] = True
    bufs = [buf for chain in chains for buf in chain]
    rows = np.array([(gpa, n, (VIRTQ_DESC_F_WRITE if w else 0)
                      | (0 if end else VIRTQ_DESC_F_NEXT), 0)
                     for (gpa, n, w), end in zip(bufs, last.tolist(), strict=True)],
                    dtype=_DESC_DTYPE)
    cyc, start, pos, clen = _cycles(perm)
    return _RoundShape(cyc, start, pos, clen, head_cols=[m - 1 - a for a in firsts], rows=rows,
                       last=last, period=math.lcm(*clen.tolist()))


def _cycles(perm: list[int]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                                     npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``perm``'s cycles, so that ``perm`` applied r times maps j to
    ``cyc[start[j] + (pos[j] + r) % clen[j]]``: ``cyc`` lists each cycle (j, perm[j], ...)."""
    m = len(perm)
    cyc: list[int] = []
    start, pos, clen = [0] * m, [0] * m, [0] * m
    seen = [False] * m
    for j in range(m):
        members = []
        i = j
        while not seen[i]:
            seen[i] = True
            members.append(i)
            i = perm[i]
        for p, i in enumerate(members):
            start[i], pos[i], clen[i] = len(cyc), p, len(members)
        cyc.extend(members)
    return (np.array(cyc, dtype=np.int64), np.array(start, dtype=np.int64),
            np.array(pos, dtype=np.int64), np.array(clen, dtype=np.int64))


@dataclass(slots=True)
class Chain:
    """A validated descriptor chain as the device sees it (buffers as ``(gpa, len)``)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_bytes(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(n for _, n in self.writable)

    def read_all(self, view: GuestRamView, limit: int) -> bytes:
        """The readable buffers, concatenated (``DescriptorError`` beyond ``limit`` bytes)."""
        if self.readable_bytes > limit:
            raise DescriptorError(f"chain carries {self.readable_bytes} bytes, limit {limit}")
        return b"".join(view.read(gpa, n) for gpa, n in self.readable)

    def write_all(self, view: GuestRamView, data: bytes) -> int:
        """Scatter ``data`` over the writable buffers; returns bytes written."""
        done = 0
        for gpa, n in self.writable:
            if done >= len(data):
                break
            part = data[done : done + n]
            view.write(gpa, part)
            done += len(part)
        return done


class DeviceQueue:
    """The device's end of a split virtqueue: pops validated chains, pushes used entries.

    ``readable`` / ``writable`` say which buffer directions this queue's use allows (the
    balloon's inflateq carries only device-readable PFN arrays, the reporting queue only
    device-writable ranges); a chain with the other kind is a ``DescriptorError``.
    ``indirect`` is whether VIRTIO_F_INDIRECT_DESC was negotiated.

    After a failed ``pop`` the head that was consumed, if it was a valid index, is in
    ``failed_head`` so the caller can return it used with length 0. An available index that
    runs more than ``size`` ahead sets ``broken``: the ring can no longer be trusted.

    ``guard(gpa, length)``, if given, is asked about every buffer and indirect table before
    anything in it is read: True refuses the chain (``DescriptorError``). The balloon device
    refuses memory it released this way. ``descriptors_read`` counts descriptor entries read
    (the work a peer's chains cost us).
    """

    def __init__(
        self,
        view: GuestRamView,
        layout: QueueLayout,
        *,
        readable: bool = True,
        writable: bool = True,
        indirect: bool = False,
        start_index: int = 0,
        guard: Callable[[int, int], bool] | None = None,
    ) -> None:
        layout.check(view)
        self.view = view
        self.layout = layout
        self.size = layout.size
        self.readable = readable
        self.writable = writable
        self.indirect = indirect
        self.guard = guard
        self.descriptors_read = 0
        self.last_avail = start_index & _U16
        self.used_idx = start_index & _U16  # our own shadow: the driver could scribble on the ring
        self.failed_head: int | None = None
        self.broken = False  # the avail ring itself is corrupt: nothing more can be trusted

    def pending(self) -> int:
        """Heads made available and not popped yet (``DescriptorError`` if more than size)."""
        avail_idx = self.view.read_u16(self.layout.avail_gpa + 2)
        n = (avail_idx - self.last_avail) & _U16
        if n > self.size:
            self.broken = True
            raise DescriptorError(
                f"avail.idx {avail_idx} runs {n} ahead of {self.last_avail}, queue size "
                f"{self.size}"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, fully validated, or None when there is none."""
        self.failed_head = None
        if self.pending() == 0:
            return None
        slot = self.last_avail % self.size
        head = self.view.read_u16(self.layout.avail_gpa + 4 + 2 * slot)
        self.last_avail = (self.last_avail + 1) & _U16
        if head >= self.size:
            raise DescriptorError(f"head index {head} out of range (queue size {self.size})")
        self.failed_head = head
        chain = Chain(head)
        self._walk(chain, self.layout.desc_gpa, self.size, head, top=True)
        self.failed_head = None
        return chain

    def take_known(self, head: int, descriptors: int) -> bool:
        """Pop the one chain available, ``head``, without walking it: its ``descriptors``
        entries are known valid (a driver in this process just added it: the simulator's bulk
        report). False, having popped nothing, unless exactly that chain is available; after
        True the queue is where ``pop`` leaves it (the walk's reads counted)."""
        if self.broken:
            return False
        lay = self.layout
        n = (self.view.read_u16(lay.avail_gpa + 2) - self.last_avail) & _U16
        if n != 1 or self.view.read_u16(lay.avail_gpa + 4 + 2 * (self.last_avail % self.size)
                                        ) != head:
            return False
        self.failed_head = None
        self.last_avail = (self.last_avail + 1) & _U16
        self.descriptors_read += descriptors
        return True

    def _walk(self, chain: Chain, table: int, count: int, first: int, *, top: bool) -> None:
        # The table lies in the view (the layout was checked, an indirect table read), so its
        # entries are unpacked straight from the buffer. A buffer must lie inside the guest,
        # pass the guard before anything in it is read, and go the queue's way, readable ones
        # first (this loop runs once per descriptor of every chain: no call per buffer).
        view = self.view
        mem, base = view._mem, view._offset(table, VIRTQ_DESC_BYTES * count)
        guest, guard = view.guest_bytes, self.guard
        readable, writable = chain.readable, chain.writable
        unpack = _DESC.unpack_from
        idx = first
        steps = 0
        while True:
            if idx >= count:
                raise DescriptorError(f"descriptor index {idx} out of range ({count})")
            steps += 1
            if steps > count:
                raise DescriptorError(f"chain from {first} loops or exceeds {count} entries")
            addr, length, flags, nxt = unpack(mem, base + VIRTQ_DESC_BYTES * idx)
            self.descriptors_read += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                self._indirect(chain, addr, length, flags, top=top)
            else:
                if addr + length > guest:
                    view.check_guest(addr, length)  # raises
                if guard is not None and guard(addr, length):
                    raise DescriptorError(
                        f"buffer [{addr:#x}, +{length:#x}) refused by the device")
                if flags & VIRTQ_DESC_F_WRITE:
                    if not self.writable:
                        raise DescriptorError(
                            "device-writable buffer on a device-read-only queue")
                    writable.append((addr, length))
                else:
                    if not self.readable:
                        raise DescriptorError(
                            "device-readable buffer on a device-write-only queue")
                    if writable:
                        raise DescriptorError("device-readable buffer after a device-writable one")
                    readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            idx = nxt

    def _indirect(self, chain: Chain, addr: int, length: int, flags: int, *, top: bool) -> None:
        # 2.7.5.3: only if negotiated; never nested; never combined with NEXT; a whole
        # number of descriptors
        if not self.indirect:
            raise DescriptorError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
        if not top:
            raise DescriptorError("nested INDIRECT descriptor")
        if flags & VIRTQ_DESC_F_NEXT:
            raise DescriptorError("INDIRECT descriptor with NEXT set")
        if length == 0 or length % VIRTQ_DESC_BYTES or length // VIRTQ_DESC_BYTES > VIRTQ_MAX_SIZE:
            raise DescriptorError(f"indirect table of {length} bytes")
        self.view.check_guest(addr, length)
        if self.guard is not None and self.guard(addr, length):
            raise DescriptorError(f"indirect table [{addr:#x}, +{length:#x}) refused by the device")
        self.view.read(addr, length)  # mapped?
        self._walk(chain, addr, length // VIRTQ_DESC_BYTES, 0, top=False)

    def push_used(self, head: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written (2.7.8: entry, then idx)."""
        if not 0 <= head < self.size:
            raise UsageError(f"push_used: head {head} out of range")
        slot = self.used_idx % self.size
        buf = _USED_ELEM.pack(head, length & 0xFFFF_FFFF)
        self.view.write(self.layout.used_gpa + 4 + 8 * slot, buf)
        self.used_idx = (self.used_idx + 1) & _U16
        self.view.write_u16(self.layout.used_gpa + 2, self.used_idx)

    def used_ring(self) -> npt.NDArray[np.generic]:
        """The used ring's entries (for tests and debugging)."""
        return self.view.read_array(self.layout.used_gpa + 4, self.size, _USED_DTYPE)

    def avail_ring(self) -> npt.NDArray[np.generic]:
        return self.view.read_array(self.layout.avail_gpa + 4, self.size, _U16_DTYPE)
