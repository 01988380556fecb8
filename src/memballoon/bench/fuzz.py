"""``memballoon bench fuzz``: every decoder a guest or peer can reach, fed hostile input.

Theory of operation
-------------------
A *target* is one entry point where untrusted bytes come in (``TARGETS``): a VMware frame, a
virtqueue over guest memory, a device behind its transport, a stats buffer, a pressure report,
a wire frame, a HELLO, a QMP reply, an agent line, a config file, a control request. Its
``run(data, seen)`` feeds one input through the real code and checks what came out. An input
*crashes* the target when it raises anything but the target's documented typed errors
(``model/errors.py``: ``PeerError`` subclasses for a guest or peer, ``ConfigError`` for an
admin), when it hangs (an input using ``hang_s`` of CPU, interrupted by a SIGALRM watchdog),
or when the decoder accepts it and returns what it promises never to (``BrokenPromise``: a
PFN outside the guest, a balloon frame the host still backs, a report that does not encode
back). Entry points that must never raise (the devices, the control server) have no expected
errors; what they reject shows in their counters instead.

Two engines feed the targets. atheris (libFuzzer, coverage guided, starting from each
target's ``seeds`` and ``tokens``) where it is installed (``pip install memballoon[fuzz]``);
hypothesis (generation from the target's ``strategy``, no coverage) otherwise. libFuzzer owns
its process and ends it, so every target runs in a worker process of its own
(``python -m memballoon.bench.fuzz --worker NAME``): the worker writes its tally to a file
every few seconds and when done; the parent runs ``jobs`` workers at once, prints progress on
stderr and kills a worker that overruns (a hang inside C code, where the watchdog cannot
reach), counting it as a crash. Nothing here needs the network.

The targets' imports sit inside their builders: the atheris worker instruments, for coverage,
exactly the modules a builder imports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from memballoon.cliargs import nonneg_int, positive_float, positive_int
from memballoon.model.errors import ConfigError, HostResourceError

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

Reach = Literal["guest", "peer", "admin"]
ENGINES: Final = ("auto", "atheris", "hypothesis")
SECONDS: Final = 10.0
HANG_S: Final = 2.0
_PROGRESS_FILE_S: Final = 2.0  # how often a worker writes its tally
_PROGRESS_LINE_S: Final = 15.0  # how often the parent says how far the workers are
_WORKER_GRACE_S: Final = 60.0  # start-up and last write, beyond --seconds, before a kill
_SAMPLES: Final = 5
_SAMPLE_BYTES: Final = 256
_HYPOTHESIS_ROUND: Final = 20_000  # examples per hypothesis run (its search tree grows)


class BrokenPromise(Exception):
    """A decoder accepted an input but returned what it promises never to (a crash)."""


class _Hang(BaseException):
    """Raised by the watchdog inside an input past ``hang_s``; a BaseException so that a
    decoder's own ``except Exception`` cannot swallow it."""


class _Stop(BaseException):
    """Ends a hypothesis run at its deadline (hypothesis lets BaseExceptions through)."""


@dataclass(slots=True)
class Seen:
    """What inputs made a target say: the typed errors its steps raised (those a multi-step
    target catches to go on, and those that ended an input) and its counters' totals."""

    errors: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)


Runner = Callable[[bytes, Seen], None]


@dataclass(frozen=True)
class Target:
    """One decoder entry point (see the module docstring)."""

    name: str
    reach: Reach  # who controls the input: a guest, a peer (QEMU, the host), an admin
    what: str  # one line: what is fed to what
    run: Runner
    expected: tuple[type[Exception], ...] = ()  # its documented typed errors
    seeds: tuple[bytes, ...] = ()  # well-formed inputs to start from
    tokens: tuple[bytes, ...] = ()  # libFuzzer dictionary entries (keys, magic numbers)
    max_len: int = 4096
    strategy: Callable[[], SearchStrategy[bytes]] | None = None  # hypothesis; None: bytes
    close: Callable[[], None] | None = None  # frees what the builder made (temp files)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise BrokenPromise(what)


class _Reader:
    """A fuzz input read front to back; past its end every read is empty or zero (atheris'
    FuzzedDataProvider idea in plain Python, so both engines share each target's format)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(n, 0)]
        self.pos += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")


class _LedgerRam:
    """A RAM backend that keeps which frames the device released, to check its bookkeeping:
    every call inside the guest, whole host pages only, a readmission only of released
    memory. With ``pool`` it stands for a hugetlb pool as ``NullRam`` does (a readmission it
    cannot back raises ``HostResourceError`` naming the pages left without memory)."""

    def __init__(self, guest_pages: int, *, host_page_frames: int = 1,
                 pool: int | None = None, strict_release: bool = True) -> None:
        self.guest_pages = guest_pages
        self.host_page_frames = host_page_frames
        self.pool = pool
        self.strict_release = strict_release  # False where free page reporting re-releases
        self.released = np.zeros(guest_pages, dtype=np.bool_)
        self.calls = 0  # releases and readmissions so far

    def _ranges(self, ranges: npt.NDArray[np.int64], what: str) -> list[list[int]]:
        r = np.asarray(ranges)
        _check(r.ndim == 2 and (r.size == 0 or r.shape[1] == 2), f"{what}: ranges of shape "
               f"{r.shape}")
        out: list[list[int]] = r.tolist()
        hp = self.host_page_frames
        for s, e in out:
            _check(0 <= s < e <= self.guest_pages,
                   f"{what} [{s}, {e}) outside a guest of {self.guest_pages} pages")
            _check(s % hp == 0 and e % hp == 0, f"{what} [{s}, {e}): not whole host pages")
        return out

    def release(self, ranges: npt.NDArray[np.int64]) -> int:
        self.calls += 1
        n = 0
        for s, e in self._ranges(ranges, "release"):
            if self.strict_release:
                _check(not self.released[s:e].any(), f"release [{s}, {e}): released twice")
            self.released[s:e] = True
            n += e - s
        if self.pool is not None:
            self.pool += n // self.host_page_frames
        return n

    def readmit(self, ranges: npt.NDArray[np.int64]) -> int:
        self.calls += 1
        hp = self.host_page_frames
        spans = self._ranges(ranges, "readmit")
        for s, e in spans:
            _check(bool(self.released[s:e].all()), f"readmit [{s}, {e}): never released")
        unbacked: list[tuple[int, int]] = []
        n = 0
        for s, e in spans:
            for a in range(s, e, hp):
                if self.pool is not None and self.pool == 0:
                    unbacked.append((a, a + hp))
                    continue
                if self.pool is not None:
                    self.pool -= 1
                self.released[a : a + hp] = False
                n += hp
        if unbacked:
            raise HostResourceError(f"the pool cannot back {len(unbacked)} host pages",
                                    tuple(unbacked))
        return n

    def resident_bytes(self) -> int:
        return 0


def _whole_pages(mask: npt.NDArray[np.bool_], hp: int) -> npt.NDArray[np.bool_]:
    """Frames of the host pages every frame of which is in ``mask``."""
    if hp == 1:
        return mask
    return np.repeat(mask.reshape(-1, hp).all(axis=1), hp)


# ====================================================================== VMware
def _vmw_frame() -> Target:
    from memballoon.protocol import vmw

    def run(data: bytes, seen: Seen) -> None:
        req = vmw.decode_request(data)
        _check(vmw.encode_request(req) == data, "a request does not encode back to its frame")
        if req.command.batched:
            _check(req.data == req.pfns.size <= vmw.VMW_BALLOON_BATCH_MAX_PAGES,
                   "batch count")
            _check(not req.pfns.size or 0 <= int(req.pfns.min()) <= int(req.pfns.max())
                   <= vmw.ENTRY_PFN_MAX, "batch PFN out of range")

    return Target("vmw_frame", "guest", "VMware backdoor request frames -> decode_request",
                  run, (vmw.VmwFrameError,), _vmw_seed_frames(), _VMW_TOKENS, max_len=4200,
                  strategy=lambda: _vmw_strategy(_vmw_seed_frames()))


def _vmw_seed_frames() -> tuple[bytes, ...]:
    from memballoon.protocol.vmw import Command, Request, batch_request, encode_request

    return tuple(encode_request(r) for r in (
        Request(Command.START, 2), Request(Command.START, 0x3E), Request(Command.GET_TARGET, 2048),
        Request(Command.LOCK, 5), Request(Command.UNLOCK, 5), Request(Command.GUEST_ID, 1),
        batch_request(Command.BATCHED_LOCK, [1, 2, 3]),
        batch_request(Command.BATCHED_UNLOCK, [1, 2, 3]),
        batch_request(Command.BATCHED_2M_LOCK, [0, 512]),
        batch_request(Command.BATCHED_2M_UNLOCK, [512]),
    ))


_VMW_TOKENS: Final = (struct.pack("<I", 0x456C6D6F), struct.pack("<Q", 512 << 12),
                      struct.pack("<I", 512))


def _vmw_reply() -> Target:
    from memballoon.protocol import vmw
    from memballoon.protocol.vmw import Command, Request, Response, Status, batch_request

    requests = (Request(Command.START, 0x3E), Request(Command.GET_TARGET, 2048),
                Request(Command.LOCK, 7), batch_request(Command.BATCHED_LOCK, [1, 2, 3]),
                batch_request(Command.BATCHED_2M_UNLOCK, [0, 512]))

    def run(data: bytes, seen: Seen) -> None:
        req = requests[data[0] % len(requests)] if data else requests[0]
        frame = data[1:]
        resp = vmw.decode_response(frame, req)
        _check(vmw.encode_response(resp) == frame, "a reply does not encode back to its frame")
        _check(not resp.pfns.size or np.array_equal(resp.pfns, req.pfns),
               "a batch reply names other pages than the request")

    seeds = [bytes([0]) + vmw.encode_response(Response(Status.SUCCESS_WITH_CAPABILITIES, 0x3E)),
             bytes([1]) + vmw.encode_response(Response(Status.SUCCESS, 100)),
             bytes([2]) + vmw.encode_response(Response(Status.ERROR_PPN_NOTNEEDED, 5)),
             bytes([3]) + vmw.encode_response(Response(
                 Status.SUCCESS, 9, requests[3].pfns, np.array([0, 3, -1], dtype=np.int32))),
             bytes([4]) + vmw.encode_response(Response(Status.ERROR_BUSY))]
    return Target("vmw_reply", "peer", "VMware backdoor replies -> decode_response (the "
                  "guest driver's side)", run, (vmw.VmwFrameError,), tuple(seeds), _VMW_TOKENS,
                  max_len=4200, strategy=lambda: _vmw_strategy(tuple(seeds)))


_VMW_GUEST_PAGES: Final = 2048  # 8 MiB: four 2 MiB pages


def _vmw_device() -> Target:
    from memballoon.host.vmw_device import VmwBalloonDevice, VmwDeviceSnapshot
    from memballoon.local.transport_vmw import VmwHostEndpoint
    from memballoon.protocol import vmw
    from memballoon.protocol.wire import Decoder, Kind

    n = _VMW_GUEST_PAGES
    fallback = vmw.Request(vmw.Command.GET_TARGET)

    def check_reply(out: bytes | None, frame: bytes) -> None:
        msgs = Decoder().messages(out or b"")
        _check(len(msgs) == 1 and msgs[0].kind is Kind.VMW, "the reply is not one VMW message")
        try:
            req = vmw.decode_request(frame)
        except vmw.VmwFrameError:
            req = fallback
        try:
            vmw.decode_response(msgs[0].payload, req)
        except vmw.VmwFrameError as exc:
            raise BrokenPromise(f"the device answered a frame the driver refuses: {exc}") from exc

    def check_balloon(dev: VmwBalloonDevice, ram: _LedgerRam, before: int,
                      last: list[tuple[int, int]], *, force: bool = False) -> None:
        _check(dev.actual_pages <= before or dev.actual_pages <= dev.target_pages,
               "a LOCK took the balloon past its target")
        token = (ram.calls, dev.actual_pages)
        if token == last[0] and not force:
            return  # no page moved since the last check: what held then holds now
        last[0] = token
        locked = dev.balloon_pfns()
        _check(dev.actual_pages == locked.size, "actual_pages differs from the balloon")
        _check(not locked.size or (int(locked[0]) >= 0 and int(locked[-1]) < n),
               "a locked PFN outside the guest")
        mask = np.zeros(n, dtype=np.bool_)
        mask[locked] = True
        want = _whole_pages(mask, ram.host_page_frames)
        if ram.pool is None:
            _check(np.array_equal(want, ram.released), "host memory released differs from "
                   "the balloon")
        else:  # a reset gives back pages the pool could not back: they stay released
            _check(not bool((want & ~ram.released).any()), "a balloon page the host backs")

    def run(data: bytes, seen: Seen) -> None:
        r = _Reader(data)
        conf = r.uint(1)
        ram = _LedgerRam(n, host_page_frames=512 if conf & 8 else 1,
                         pool=r.uint(1) % 4 if conf & 16 else None)
        dev = VmwBalloonDevice(ram, supports_batched=bool(conf & 1),
                               supports_2m=bool(conf & 2), defer_release=bool(conf & 4))
        ep = VmwHostEndpoint(dev, signalled=bool(conf & 32))
        dev.set_target(r.uint(2) % (n + 1))
        last = [(-1, -1)]
        for _ in range(32):
            if not r.left:
                break
            op = r.uint(1) % 8
            if op <= 2:
                frame = r.take(r.uint(2) % 4200) if op == 0 else _vmw_shaped(r, n)
                before = dev.actual_pages
                out = ep.handle_message(Kind.VMW, frame)
                ep.after_send()
                check_reply(out, frame)
                check_balloon(dev, ram, before, last)
            elif op == 3:
                ep.set_target(r.uint(2) % (n + 1))
            elif op == 4:
                dev.request_reset()
            elif op == 5:
                dev.busy_next(r.uint(1) % 3)
            elif op == 6:
                dev.set_pinned([r.uint(2) % n for _ in range(r.uint(1) % 4)])
            else:
                dev.flush_release()
        dev.flush_release()
        check_balloon(dev, ram, dev.actual_pages, last, force=True)
        if conf & 128:  # half the sessions end in a snapshot (pydantic is not cheap)
            snap = VmwDeviceSnapshot.from_json(dev.snapshot().to_json())
            again = VmwBalloonDevice.restore(snap, ram)
            _check(np.array_equal(again.balloon_pfns(), dev.balloon_pfns()),
                   "a restored device has another balloon")
        seen.counters.update(dev.counters.as_dict())

    seeds = (
        bytes([1 | 2 | 32 | 128]) + struct.pack("<H", 600) + _vmw_op_start(0x3E)
        + _vmw_op(1, 0) + _vmw_op(2, 5) + _vmw_op(2, 6) + _vmw_op(3, 5)
        + _vmw_op_batch(6, [10, 11, 12]) + _vmw_op_batch(7, [11]) + _vmw_op_batch(8, [512]),
        bytes([1 | 2 | 4 | 8]) + struct.pack("<H", 1100) + _vmw_op_start(0x3E)
        + _vmw_op_batch(8, [0, 512, 1024]) + _vmw_op_batch(9, [512])
        + _vmw_op_batch(6, list(range(1536, 1536 + 20))),
        bytes([0]) + struct.pack("<H", 3) + _vmw_op_start(2) + _vmw_op(2, 1) + _vmw_op(2, 2)
        + _vmw_op(2, 3) + _vmw_op(2, 4) + bytes([4]) + _vmw_op(1, 0),
    )
    return Target("vmw_device", "guest", "VMware frames and host actions -> VmwHostEndpoint "
                  "and its device over a ledger RAM (never raises; balloon == released)",
                  run, (), seeds, _VMW_TOKENS, max_len=8192)


def _vmw_op_start(caps: int) -> bytes:
    return _vmw_op(0, caps)


def _vmw_op(cmd: int, data: int) -> bytes:
    """A shaped single-page command in ``_vmw_shaped``'s format (op byte 1)."""
    return bytes([1, cmd]) + struct.pack("<Q", data)


def _vmw_op_batch(cmd: int, pfns: Sequence[int]) -> bytes:
    """A shaped batch (op byte 1): count, then each PFN."""
    return bytes([1, cmd]) + struct.pack("<Q", len(pfns)) + bytes([len(pfns), 0]) + b"".join(
        struct.pack("<H", p) for p in pfns)


def _vmw_shaped(r: _Reader, guest_pages: int) -> bytes:
    """A frame with the right magic and shape, built from the input's fields (so sessions get
    past the codec); a count byte's high bit makes ``data`` disagree with it."""
    cmd = r.uint(1) % 11  # 10: no such command
    data = r.uint(8)
    if cmd not in (6, 7, 8, 9):
        return struct.pack("<IIQ", 0x456C6D6F, cmd, data)
    count = r.uint(1)
    low = r.uint(1)  # nonzero: stray low bits in the first entry
    k = count % 40
    pfns = [r.uint(2) % (guest_pages + 600) for _ in range(k)]
    entries = [p << 12 for p in pfns]
    if entries and low:
        entries[0] |= low & 0xFFF
    return (struct.pack("<IIQ", 0x456C6D6F, cmd, k if count < 128 else data)
            + struct.pack("<I", k) + b"".join(struct.pack("<Q", e) for e in entries))


# ====================================================================== virtqueues
_VQ_BASE: Final = 0x10000
_VQ_VIEW: Final = 0x4000
_VQ_DATA: Final = _VQ_BASE + 0x2000  # the second half of the view: buffers, indirect tables
_VQ_GUEST: Final = 1 << 20


def _virtqueue() -> Target:
    from memballoon.model.errors import DescriptorError, GuestAddressError
    from memballoon.protocol.virtqueue import DeviceQueue, GuestRamView, QueueLayout

    def run(data: bytes, seen: Seen) -> None:
        r = _Reader(data)
        conf = r.uint(1)
        size = 1 << (conf & 7)
        start = r.uint(2)
        view = GuestRamView(bytearray(_VQ_VIEW), base_gpa=_VQ_BASE, guest_bytes=_VQ_GUEST)
        lay = QueueLayout.packed(_VQ_BASE, size)
        dq = DeviceQueue(view, lay, indirect=bool(conf & 8), readable=not conf & 16,
                         writable=not conf & 32, start_index=start)
        if conf & 64:
            view.write(_VQ_BASE, r.take(_VQ_VIEW))  # raw: whatever the guest wrote
        else:
            _write_ring(r, view, lay, start)
            view.write(_VQ_DATA, r.take(_VQ_BASE + _VQ_VIEW - _VQ_DATA))
        for _ in range(size + 2):
            try:
                chain = dq.pop()
            except (DescriptorError, GuestAddressError) as exc:
                seen.errors[type(exc).__name__] += 1
                if dq.broken:
                    break
                if dq.failed_head is not None:
                    _check(0 <= dq.failed_head < size, "a failed head outside the table")
                    dq.push_used(dq.failed_head, 0)
                continue
            if chain is None:
                break
            _check(0 <= chain.head < size, "a head outside the table")
            _check(dq.readable or not chain.readable, "a readable buffer on a write-only queue")
            _check(dq.writable or not chain.writable, "a writable buffer on a read-only queue")
            for gpa, length in chain.readable + chain.writable:
                _check(gpa >= 0 and length >= 0 and gpa + length <= _VQ_GUEST,
                       f"a buffer [{gpa:#x}, +{length:#x}) outside the guest")
            try:
                chain.read_all(view, 1 << 16)
                chain.write_all(view, b"\xa5" * 64)
            except (DescriptorError, GuestAddressError) as exc:
                seen.errors[type(exc).__name__] += 1
            dq.push_used(chain.head, 0)

    seeds = []
    for indirect in (False, True):
        # a two-descriptor chain (readable then writable) and one more head: compact format
        d = [(0, 0, 16, 1, 1), (0, 0x100, 8, 2, 0)]
        if indirect:
            d = [(0, 0x200, 32, 4, 0), (0, 0x100, 8, 2, 0)]
        body = b"".join(bytes([a]) + struct.pack("<HHBB", off, ln, fl, nx)
                        for a, off, ln, fl, nx in d)
        table = struct.pack("<QIHH", _VQ_DATA, 16, 1, 1) + struct.pack("<QIHH", _VQ_DATA + 0x100,
                                                                         8, 2, 0)
        blob = bytes(0x200) + table
        seeds.append(bytes([1 | (8 if indirect else 0)]) + struct.pack("<H", 0) + body
                     + bytes([2, 0, 1]) + blob)
    return Target("virtqueue", "guest", "split virtqueue descriptor tables, avail rings and "
                  "indirect tables in guest memory -> DeviceQueue.pop", run,
                  (DescriptorError, GuestAddressError), tuple(seeds), max_len=_VQ_VIEW + 64)


def _write_ring(r: _Reader, view: Any, lay: Any, start: int) -> None:
    """The compact format: per descriptor an address selector, offset, length, flags, next;
    then how many heads are made available, and each head."""
    size = lay.size
    for i in range(size):
        if not r.left:
            break
        sel = r.uint(1)
        off, length, flags, nxt = r.uint(2), r.uint(2), r.uint(1), r.uint(1)
        if sel < 192:
            addr = _VQ_DATA + off % 0x2000  # mapped buffers
        elif sel < 224:
            addr = _VQ_BASE + _VQ_VIEW + off * 16  # guest memory this view does not map
        else:
            addr = r.uint(8)  # anything
        view.write(lay.desc_gpa + 16 * i, struct.pack("<QIHH", addr, length, flags & 0xFF, nxt))
    n = r.uint(1) % (size + 3)
    for k in range(min(n, size)):
        view.write_u16(lay.avail_gpa + 4 + 2 * ((start + k) % size), r.uint(1) % (size + 2))
    view.write_u16(lay.avail_gpa + 2, (start + n) & 0xFFFF)


def _virtqueue_used() -> Target:
    from memballoon.model.counters import Counters
    from memballoon.model.errors import DescriptorError, GuestAddressError
    from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout

    def run(data: bytes, seen: Seen) -> None:
        r = _Reader(data)
        conf = r.uint(1)
        size = 1 << (conf % 7)
        view = GuestRamView(bytearray(_VQ_VIEW), base_gpa=_VQ_BASE, guest_bytes=_VQ_GUEST)
        lay = QueueLayout.packed(_VQ_BASE, size)
        bag = Counters()
        drv = DriverQueue(view, lay, bag, start_index=r.uint(2))
        flight: dict[int, int] = {}  # head -> writable bytes
        for _ in range(4):
            for _ in range(r.uint(1) % (drv.num_free + 1)):
                if drv.num_free == 0:
                    break
                bufs = [(_VQ_DATA + 64 * j, 1 + r.uint(1), bool(r.uint(1) & 1))
                        for j in range(1 + r.uint(1) % min(3, drv.num_free))]
                bufs.sort(key=lambda b: b[2])  # readable before writable, as add requires
                head = drv.add(bufs)
                flight[head] = sum(n for _, n, w in bufs if w)
            drv.publish()
            # the device's used ring: whatever the peer wrote
            view.write(lay.used_gpa, r.take(6 + 8 * size))
            free_before = drv.num_free
            try:
                used = drv.collect()
            except DescriptorError as exc:
                seen.errors[type(exc).__name__] += 1
                _check(drv.broken, "a used.idx jump that did not break the queue")
                break
            heads = [u.head for u in used]
            _check(len(set(heads)) == len(heads), "a chain returned twice")
            for u in used:
                _check(u.head in flight, f"head {u.head} was not in flight")
                _check(0 <= u.length <= flight.pop(u.head), "a used length over the chain")
            _check(drv.num_free >= free_before and drv.in_flight == len(flight),
                   "descriptors lost")
        seen.counters.update(bag.as_dict())

    seeds = (bytes([3]) + struct.pack("<H", 0) + bytes([2, 0, 7, 0, 1, 1]) + struct.pack(
        "<HH", 0, 1) + struct.pack("<II", 0, 8) + bytes(64),)
    return Target("virtqueue_used", "peer", "used rings written by the device -> "
                  "DriverQueue.collect (the guest driver's side)", run,
                  (DescriptorError, GuestAddressError), seeds, max_len=2048)


# ====================================================================== virtio-balloon
def _virtio_stats() -> Target:
    from memballoon.model.counters import Counters
    from memballoon.model.errors import StatsError
    from memballoon.protocol import virtio_balloon as vb

    def run(data: bytes, seen: Seen) -> None:
        bag = Counters()
        got = vb.decode_stats(data, counters=bag)
        _check(all(0 <= t < vb.VIRTIO_BALLOON_S_NR for t in got), "a stat tag out of range")
        _check(all(0 <= v < 1 << 64 for v in got.values()), "a stat value not a u64")
        names = {vb.stat_name(t) for t in got}
        _check(len(names) == len(got), "two tags with one name")
        try:
            strict = vb.decode_stats(data, strict=True)
        except StatsError as exc:
            seen.errors[type(exc).__name__] += 1
            _check(bag.total() > 0, "strict refused what lenient did not count")
        else:
            _check(strict == got and bag.total() == 0, "strict and lenient disagree")
        _check(vb.decode_stats(vb.encode_stats(got), strict=True) == got,
               "stats do not encode back")
        seen.counters.update(bag.as_dict())

    seeds = (vb.encode_stats({0: 1, 4: 1 << 30, 5: 1 << 31, 6: 5 << 20, 15: 7}),
             vb.encode_stats([(3, 1), (3, 2), (16, 9)]) + b"\x01")
    return Target("virtio_stats", "guest", "virtio-balloon stats buffers -> decode_stats "
                  "(lenient and strict)", run, (StatsError,), seeds, max_len=4096)


def _virtio_config() -> Target:
    from memballoon.model.errors import DeviceConfigError
    from memballoon.protocol.virtio_balloon import BalloonConfig, decode_u32, encode_u32

    def run(data: bytes, seen: Seen) -> None:
        try:
            _check(encode_u32(decode_u32(data[:4])) == data[:4], "a u32 field does not encode "
                   "back")
        except DeviceConfigError as exc:
            seen.errors[type(exc).__name__] += 1
        cfg = BalloonConfig.decode(data)
        _check(cfg.encode(extended=len(data) == 24) == data, "a config does not encode back")

    return Target("virtio_config", "peer", "virtio-balloon config spaces -> BalloonConfig."
                  "decode (the driver's side)", run, (DeviceConfigError,),
                  (BalloonConfig(5, 3).encode(), BalloonConfig(5, 3, 0, 0, 2, 1).encode(
                      extended=True)), max_len=64)


_VIO_SMALL_PAGES: Final = 64  # 256 KiB guest with 4 KiB host pages
_VIO_HUGE_PAGES: Final = 1024  # 4 MiB guest: two 2 MiB host pages


def _virtio_device() -> Target:
    from memballoon.host.virtio_device import (
        SUPPORTED_FEATURES,
        VirtioBalloonDevice,
        VirtioDeviceSnapshot,
    )
    from memballoon.local.transport_virtio import VirtioHostEndpoint, VirtioOp
    from memballoon.protocol.virtio_balloon import (
        VIRTIO_BALLOON_X_F_HOST_RESET,
        BalloonConfig,
        has,
    )
    from memballoon.protocol.virtqueue import GuestRamView, QueueLayout
    from memballoon.protocol.wire import Decoder, Kind

    def check_reply(out: bytes | None) -> None:
        if out is None:
            return
        msgs = Decoder().messages(out)
        _check(len(msgs) == 1 and msgs[0].kind is Kind.VIRTIO_REPLY
               and msgs[0].payload[:1] in (b"\x00", b"\x01"), "a malformed VIRTIO_REPLY")

    def check_state(dev: VirtioBalloonDevice, ram: _LedgerRam, pushed: list[bytes],
                    last: list[tuple[int, int]], *, force: bool = False) -> None:
        g = ram.guest_pages
        _check(0 <= dev.actual_pages <= dev.inflated_pages, "actual beyond what the device "
               "holds")
        for m in Decoder().messages(b"".join(pushed)):
            _check(m.kind is Kind.CONFIG, "the device sent something else than CONFIG")
            _check(BalloonConfig.decode(m.payload).num_pages <= g, "a target over the guest")
        pushed.clear()
        _check(all(0 <= v < 1 << 64 for v in dev.stats.values()), "a stat not a u64")
        token = (ram.calls, dev.inflated_pages)
        if token == last[0] and not force:
            return  # no page moved since the last check: what held then holds now
        last[0] = token
        ball = dev.balloon_pfns()
        _check(dev.inflated_pages == ball.size, "inflated_pages differs from the balloon")
        _check(not ball.size or (int(ball[0]) >= 0 and int(ball[-1]) < g),
               "a balloon PFN outside the guest")
        mask = np.zeros(g, dtype=np.bool_)
        mask[ball] = True
        want = _whole_pages(mask, ram.host_page_frames)
        _check(not bool((want & ~ram.released).any()), "a balloon page the host still backs")

    def run(data: bytes, seen: Seen) -> None:
        r = _Reader(data)
        conf = r.uint(1)
        huge = bool(conf & 1)
        g = _VIO_HUGE_PAGES if huge else _VIO_SMALL_PAGES
        ram = _LedgerRam(g, host_page_frames=512 if huge else 1,
                         pool=r.uint(1) % 3 if conf & 2 else None, strict_release=False)
        mem = mmap.mmap(-1, g * 4096)  # zero pages on demand: a bytearray memsets them all
        view = GuestRamView(mem, base_gpa=0, guest_bytes=len(mem))
        offered = SUPPORTED_FEATURES & r.uint(8)
        dev = VirtioBalloonDevice(ram, view, features=offered,
                                  queue_size=1 << (r.uint(1) % 9))
        pushed: list[bytes] = []
        ep = VirtioHostEndpoint(dev, [-1] * 5, [], pushed.append)
        layouts: dict[int, QueueLayout] = {}
        last = [(-1, -1)]
        for _ in range(32):
            if not r.left:
                break
            op = r.uint(1) % 10
            if op == 0:
                check_reply(ep.handle_message(Kind.VIRTIO, r.take(r.uint(1) % 48)))
            elif op == 1:
                feats = dev.device_features() & r.uint(8) if r.uint(1) < 240 else r.uint(8)
                check_reply(ep.handle_message(Kind.VIRTIO, bytes([VirtioOp.SET_FEATURES])
                                              + struct.pack("<Q", feats)))
                layouts.clear()
            elif op == 2:
                q, size = r.uint(1) % 6, 1 << (r.uint(1) % 10)
                gpa = r.uint(2) * 16 % len(mem)
                lay = QueueLayout.packed(gpa, size) if r.uint(1) < 200 else QueueLayout(
                    r.uint(4), r.uint(8), r.uint(8), r.uint(8))
                check_reply(ep.handle_message(Kind.VIRTIO, bytes([VirtioOp.SETUP_QUEUE])
                                              + struct.pack("<HIQQQ", q, lay.size & 0xFFFFFFFF,
                                                            lay.desc_gpa, lay.avail_gpa,
                                                            lay.used_gpa)))
                if 0 < lay.size <= 1 << 15:  # chains can only go where a queue might be
                    layouts[q] = lay
            elif op == 3:
                off = r.uint(1)
                off = off % 28 // 4 * 4 if off < 224 else off
                check_reply(ep.handle_message(Kind.VIRTIO, bytes([VirtioOp.WRITE_CONFIG])
                                              + struct.pack("<I", off) + r.take(4)))
            elif op == 4:
                check_reply(ep.handle_message(Kind.VIRTIO, bytes([r.uint(1) % 7])
                                              + r.take(r.uint(1) % 3)))
            elif op == 5:
                gpa = r.uint(4) % len(mem)
                chunk = r.take(r.uint(1))
                mem[gpa : gpa + len(chunk)] = chunk[: len(mem) - gpa]
            elif op == 6 and layouts:
                _virtio_chain(r, view, layouts[sorted(layouts)[r.uint(1) % len(layouts)]], g)
            elif op == 7:
                q = r.uint(1)
                ep.handle_message(Kind.NOTIFY, struct.pack("<H", q % 6) if q < 250
                                  else r.take(q - 248))
                bound = q // 6 % 5  # the host's turn: all chains, or at most 1 to 4
                for pq in sorted(ep.pending):
                    for _ in range(64):  # the next turns (a used ring over the avail ring
                        if ep.run(pq, bound or None) != bound:  # can refill it for ever)
                            break
            elif op == 8:
                what = r.uint(1) % 4
                if what == 0:
                    ep.set_target(r.uint(2) % (g + 1))
                elif what == 1:
                    dev.request_stats()
                elif what == 2 and has(dev.features, VIRTIO_BALLOON_X_F_HOST_RESET):
                    dev.request_reset()
                else:
                    ep.retry()
            elif op == 9:
                page = r.uint(1) % g
                pfns = [r.uint(2) % (g + 16) for _ in range(r.uint(1) % 64)]
                view.write(page * 4096, b"".join(struct.pack("<I", p) for p in pfns))
            if op not in (5, 6, 9):  # those only write guest memory
                check_state(dev, ram, pushed, last)
        check_state(dev, ram, pushed, last, force=True)
        if conf & 128:  # half the sessions end in a snapshot (pydantic is not cheap)
            snap = VirtioDeviceSnapshot.from_json(dev.snapshot().to_json())
            again = VirtioBalloonDevice.restore(snap, ram, view)
            _check(np.array_equal(again.balloon_pfns(), dev.balloon_pfns()),
                   "a restored device has another balloon")
        seen.counters.update(dev.counters.as_dict())

    return Target("virtio_device", "guest", "virtio transport requests, doorbells and guest "
                  "memory (rings, chains, PFN arrays) -> VirtioHostEndpoint and its device "
                  "over a ledger RAM (never raises)", run, (), _virtio_seeds(), max_len=8192)


def _virtio_chain(r: _Reader, view: Any, lay: Any, guest_pages: int) -> None:
    """Up to three chained descriptors from the input at a slot of ``lay``, made available."""
    from memballoon.model.errors import GuestAddressError

    size = lay.size
    first = r.uint(1) % size
    k = 1 + r.uint(1) % 3
    for j in range(k):
        i = (first + j) % size
        addr = (r.uint(1) % guest_pages) * 4096 + r.uint(1) % 4 * 1024
        length, flags = r.uint(2) % 8192, r.uint(1) & 0x6
        if j + 1 < k:
            flags |= 1
        try:
            view.write(lay.desc_gpa + 16 * i, struct.pack("<QIHH", addr, length, flags,
                                                          (i + 1) % size))
        except GuestAddressError:  # the driver put this queue outside its memory
            return
    with contextlib.suppress(GuestAddressError):
        idx = view.read_u16(lay.avail_gpa + 2)
        view.write_u16(lay.avail_gpa + 4 + 2 * (idx % size), first)
        view.write_u16(lay.avail_gpa + 2, idx + 1)


def _virtio_seeds() -> tuple[bytes, ...]:
    """Sessions of a well-behaved driver in ``_virtio_device``'s op format."""
    feats = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 22) | (1 << 23) | (1 << 32)

    def setup(q: int, page: int, size_log: int) -> bytes:
        return bytes([2, q, size_log]) + struct.pack("<H", page * 256) + bytes([0])

    def chain(qi: int, *descs: tuple[int, int, int]) -> bytes:
        """Descriptors (page, length, flags) chained from slot 0 of the ``qi``-th queue."""
        return bytes([6, qi, 0, len(descs) - 1]) + b"".join(
            bytes([page, 0]) + struct.pack("<H", length) + bytes([flags])
            for page, length, flags in descs)

    def pfns(page: int, values: Sequence[int]) -> bytes:
        return bytes([9, page, len(values)]) + b"".join(struct.pack("<H", v) for v in values)

    out = []
    for conf in (128, 1):  # 4 KiB host pages and a snapshot; 2 MiB pages
        s = bytes([conf]) + struct.pack("<Q", feats) + bytes([3])
        s += bytes([1, 0]) + struct.pack("<Q", feats)  # SET_FEATURES, all offered
        s += setup(0, 1, 3) + setup(1, 2, 3) + setup(2, 3, 3) + setup(3, 4, 3)
        s += bytes([8, 0]) + struct.pack("<H", 40)  # target 40 pages
        # inflate 8 (PFN array, then a status byte each: HOST_REFUSE), deflate 4
        s += pfns(10, range(20, 28)) + chain(0, (10, 32, 0), (13, 8, 2)) + bytes([7, 0])
        s += pfns(11, range(20, 24)) + chain(1, (11, 16, 0)) + bytes([7, 1])
        s += chain(2, (12, 40, 0)) + bytes([7, 2, 8, 1])  # stats buffer, then ask again
        s += chain(3, (30, 4096, 2)) + bytes([7, 3])  # a free page report
        s += bytes([3, 4]) + struct.pack("<I", 4)  # actual = 4
        out.append(s)
    return tuple(out)


# ====================================================================== local world
def _pressure() -> Target:
    from dataclasses import fields, replace

    from memballoon.model.counters import Counters
    from memballoon.protocol.pressure import MAX_VALUE, PressureReport, ReportError

    ints = [f.name for f in fields(PressureReport) if f.type in ("int", "int | None")]

    def run(data: bytes, seen: Seen) -> None:
        bag = Counters()
        try:
            rep = PressureReport.decode(data, counters=bag)
        except ReportError as exc:
            _check(bag.as_dict() == {exc.counter.value: 1}, "a refusal not counted once")
            raise
        for name in ints:
            v = getattr(rep, name)
            _check(v is None or 0 <= v <= MAX_VALUE, f"{name} = {v}")
        _check(0.0 <= rep.stall_pct <= 100.0 and 0.0 <= rep.time_s <= MAX_VALUE,
               "stall_pct or time_s out of range")
        _check(rep.active_touched <= rep.active_sampled, "touched more than sampled")
        _check(PressureReport.decode(rep.encode()) == rep, "a report does not encode back")

    sample = PressureReport("g1", 12.5, 1 << 29, 1 << 26, 1 << 27, 1 << 28, 1 << 25, 1 << 20,
                            3, 4, 5, 0, 1000, 1.5, 300, 256, 7, 100, 40)
    seeds = (sample.encode(), replace(sample, refused_pages=None, active_sampled=0,
                                      active_touched=0).encode())
    return Target("pressure_report", "guest", "STATUS payloads -> PressureReport.decode", run,
                  (ReportError,), seeds, _json_tokens(_PRESSURE_KEYS), max_len=4200,
                  strategy=lambda: _json_strategy(_PRESSURE_KEYS, seeds))


_PRESSURE_KEYS: Final = ("v", "guest", "time_s", "total_bytes", "free_bytes",
                         "available_bytes", "anon_bytes", "cache_bytes", "balloon_bytes",
                         "swap_in_pages", "swap_out_pages", "major_faults", "oom_kills",
                         "stall_us", "stall_pct", "balloon_target_pages",
                         "balloon_actual_pages", "refused_pages", "active_sampled",
                         "active_touched")


def _wire() -> Target:
    from memballoon.model.errors import FrameError
    from memballoon.protocol.wire import MAX_FRAME, Decoder, Kind, Message, encode

    def drain(dec: Decoder, chunks: list[bytes]) -> tuple[list[Message], str | None]:
        out: list[Message] = []
        try:
            for c in chunks:
                dec.feed(c)
                while (m := dec.next()) is not None:
                    out.append(m)
        except FrameError as exc:
            return out, str(exc)
        return out, None

    def run(data: bytes, seen: Seen) -> None:
        step = 1 + (data[0] % 7 if data else 0)
        whole, err = drain(Decoder(), [data])
        dec = Decoder()
        parts, err2 = drain(dec, [data[i : i + step] for i in range(0, len(data), step)])
        _check(whole == parts and err == err2, "byte by byte and all at once disagree")
        _check(all(len(m.payload) < MAX_FRAME for m in whole), "a payload over MAX_FRAME")
        used = b"".join(encode(m.kind, m.payload) for m in whole)
        _check(data.startswith(used), "messages do not re-encode to the bytes they came from")
        if err is not None:
            seen.errors["FrameError"] += 1
            _check(dec.broken, "a frame error that did not break the decoder")
            try:
                dec.feed(b"\x00")
            except FrameError:
                return
            raise BrokenPromise("a broken decoder took more bytes")
        _check(dec.pending == len(data) - len(used), "pending bytes miscounted")

    seeds = (encode(Kind.HELLO, b'{"v":1}') + encode(Kind.STATUS, b"{}") + encode(Kind.BYE),
             encode(Kind.VMW, bytes(16)) + encode(Kind.NOTIFY, b"\x00\x00")[:7])
    return Target("wire", "guest", "bytes on a local guest's socket -> wire.Decoder (fed at "
                  "once and in pieces)", run, (FrameError,), seeds, max_len=4096)


def _hello() -> Target:
    from memballoon.local.host import hello_matches, peer_json_object

    want = {"v": 1, "guest": "g1", "protocol": "virtio", "pages": 65536, "pid": 4242}

    def run(data: bytes, seen: Seen) -> None:
        doc = peer_json_object(data)
        _check(doc is None or isinstance(doc, dict), "a JSON object that is not a dict")
        ok = hello_matches(data, want)
        _check(not ok or (doc is not None and all(doc.get(k) == v for k, v in want.items())),
               "a HELLO accepted that does not match")
        if doc is None:
            seen.errors["not_an_object"] += 1
        elif not ok:
            seen.errors["mismatch"] += 1

    seeds = (json.dumps(want).encode(), b'{"ok": true, "verified": 0}')
    return Target("hello", "guest", "HELLO and CONTROL_REPLY payloads -> the local host's "
                  "JSON check (hello_matches, peer_json_object; never raise)", run, (), seeds,
                  _json_tokens(tuple(want)), max_len=4096,
                  strategy=lambda: _json_strategy(tuple(want), seeds))


# ====================================================================== QEMU world
def _qmp() -> Target:
    from qemu.qmp import ExecInterruptedError, ExecuteError
    from qemu.qmp.message import Message
    from qemu.qmp.models import ErrorResponse
    from qemu.qmp.protocol import Runstate
    from qemu.qmp.qmp_client import BadReplyError

    from memballoon.model.counters import Counters
    from memballoon.qemu.errors import QmpError
    from memballoon.qemu.qmp import STAT_MISSING, QmpClient

    class Session:
        """Stands for qemu.qmp's client: each command gets the next fuzzed line, treated as
        the library treats a reply (qemu.qmp.qmp_client.execute_msg); an event line goes to
        the event callback; a line the library cannot parse ends the session."""

        def __init__(self, lines: list[bytes], owner: QmpClient) -> None:
            self.lines = lines
            self.owner = owner
            self.runstate = Runstate.RUNNING
            self.cause: BaseException | None = None

        async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None
                          ) -> object:
            sent = Message({"execute": cmd, "arguments": dict(arguments or {})})
            while True:
                if not self.lines:
                    self.runstate, self.cause = Runstate.IDLE, EOFError("EOF")
                    raise ExecInterruptedError("disconnected")
                raw = self.lines.pop(0)
                try:
                    msg = Message(raw, eager=True)
                except Exception as exc:  # the library's reader dies on it, then hangs up
                    self.runstate, self.cause = Runstate.IDLE, exc
                    raise ExecInterruptedError("disconnected") from exc
                if "event" in msg:
                    self.owner._on_event(msg)
                    continue
                if "error" in msg:
                    try:
                        err = ErrorResponse(msg)
                    except (KeyError, TypeError) as exc:
                        raise BadReplyError("QMP error reply is malformed", msg, sent) from exc
                    raise ExecuteError(err, sent, msg)
                if "return" not in msg:
                    raise BadReplyError("no 'error' or 'return' member", msg, sent)
                return msg["return"]

        async def disconnect(self) -> None:
            if self.cause is not None and not isinstance(self.cause, EOFError):
                raise self.cause

    class Client(QmpClient):
        def __init__(self, lines: list[bytes], bag: Counters) -> None:
            super().__init__("(fuzz)", counters=bag)
            self.lines = lines

        async def _connect_once(self, *, count: bool = True) -> None:
            await self._drop()
            self._qmp = Session(self.lines, self)  # type: ignore[assignment]

    async def session(data: bytes, seen: Seen) -> None:
        bag = Counters()
        c = Client(data[1:].split(b"\n"), bag)
        ops = data[0] if data else 0
        for step in range(8):
            if not c.lines:
                break
            try:
                match (ops + step) % 6:
                    case 0:
                        ram = await c.ram_bytes()
                        _check(ram > 0, f"RAM {ram}")
                    case 1:
                        logical = await c.query_balloon()
                        _check(logical > 0, f"logical size {logical}")
                    case 2:
                        pages = await c.balloon_pages()
                        ram = await c.ram_bytes()
                        _check(0 <= pages <= ram // 4096, f"balloon of {pages} pages")
                    case 3:
                        st = await c.guest_stats()
                        _check(0 <= st.last_update_s < 1 << 63, "last-update not a time_t")
                        _check(all(v is None or 0 <= v < STAT_MISSING
                                   for k, v in vars(st).items() if k != "last_update_s"),
                               "a stat not a u64")
                    case 4:
                        await c.set_logical_size(1 << 20)
                    case _:
                        await c.enable_stats(2)
            except QmpError as exc:
                seen.errors[type(exc).__name__] += 1
            _check(c.last_change_bytes is None or c.last_change_bytes > 0, "a BALLOON_CHANGE "
                   "hint not positive")
        seen.counters.update(bag.as_dict())

    loop = asyncio.new_event_loop()

    def run(data: bytes, seen: Seen) -> None:
        loop.run_until_complete(session(data, seen))

    lines = [b'{"return": {"base-memory": 1073741824, "plugged-memory": 0}}',
             b'{"return": {"actual": 536870912}}',
             b'{"event": "BALLOON_CHANGE", "data": {"actual": 600000000}, "timestamp": '
             b'{"seconds": 1, "microseconds": 2}}',
             b'{"return": {"stats": {"stat-free-memory": 1000, "stat-total-memory": '
             b'18446744073709551615}, "last-update": 5}}',
             b'{"error": {"class": "DeviceNotActive", "desc": "No balloon device"}}',
             b'{"return": {}}']
    seeds = (b"\x00" + b"\n".join(lines), b"\x03" + b"\n".join(lines[3:] + lines[:3]))
    keys = ("return", "error", "class", "desc", "event", "data", "actual", "base-memory",
            "stats", "last-update", "stat-free-memory", "BALLOON_CHANGE", "SHUTDOWN",
            "DeviceNotActive", "GenericError")
    return Target("qmp", "peer", "QMP reply and event lines -> QmpClient (ram_bytes, "
                  "query_balloon, balloon_pages, guest_stats, events)", run, (QmpError,),
                  seeds, _json_tokens(keys), max_len=4096,
                  strategy=lambda: _lines_strategy(keys, seeds), close=loop.close)


def _agent() -> Target:
    from memballoon.model.counters import Counters
    from memballoon.protocol.pressure import PressureReport
    from memballoon.qemu.agent import (
        MAX_LINE_BYTES,
        AgentReport,
        LineSplitter,
        parse_report,
        to_pressure_report,
    )
    from memballoon.qemu.errors import AgentError

    def run(data: bytes, seen: Seen) -> None:
        bag = Counters()
        split = LineSplitter(bag)
        step = (7, 64, 1000, 1 << 16)[data[0] % 4] if data else 1
        lines = [ln for i in range(0, len(data), step) for ln in split.feed(data[i : i + step])]
        prev: AgentReport | None = None
        for line in lines:
            _check(len(line) <= MAX_LINE_BYTES and b"\n" not in line, "a line over the limit")
            try:
                rep = parse_report(line, guest="g1", counters=bag)
            except AgentError as exc:
                seen.errors[type(exc).__name__] += 1
                continue
            for k, v in vars(rep).items():
                if k.startswith("psi_") and k.endswith("avg10"):
                    _check(v is None or 0.0 <= v <= 100.0, f"{k} = {v}")
                elif k != "guest":
                    _check(v is None or 0 <= v < 1 << 63, f"{k} = {v}")
            pr = to_pressure_report(rep, ram_bytes=1 << 30, balloon_target_pages=1000,
                                    balloon_actual_pages=500, prev=prev, period_s=1.0)
            _check(PressureReport.decode(pr.encode()) == pr, "a converted report does not "
                   "decode")
            prev = rep
        seen.counters.update(bag.as_dict())

    line = (b'{"v": 1, "t": 12.5, "meminfo": {"MemTotal": 1000000, "MemFree": 200000, '
            b'"MemAvailable": 500000, "Cached": 100000, "SwapTotal": 0, "SwapFree": 0}, '
            b'"psi": {"some_avg10": 1.5, "some_total": 12345, "full_avg10": 0.5, '
            b'"full_total": 100}, "vmstat": {"pswpin": 1, "pswpout": 2, "pgmajfault": 3, '
            b'"oom_kill": 0, "balloon_inflate": 500, "balloon_deflate": 100}}')
    seeds = (b"\x03" + line + b"\n" + line.replace(b"12.5", b"13.5") + b"\n",
             b"\x00" + line.replace(b'"psi": {', b'"psi": null, "x": {') + b"\n")
    keys = ("v", "t", "meminfo", "psi", "vmstat", "MemTotal", "MemFree", "MemAvailable",
            "Cached", "SwapTotal", "SwapFree", "some_avg10", "some_total", "full_avg10",
            "full_total", "pswpin", "pswpout", "pgmajfault", "oom_kill", "balloon_inflate",
            "balloon_deflate")
    return Target("agent", "guest", "the in-guest agent's byte stream -> LineSplitter, "
                  "parse_report, to_pressure_report", run, (AgentError,), seeds,
                  _json_tokens(keys), max_len=9000, strategy=lambda: _lines_strategy(keys, seeds))


def _qga() -> Target:
    import base64

    from memballoon.model.counters import Counters
    from memballoon.protocol.pressure import PressureReport
    from memballoon.qemu.agent import to_pressure_report
    from memballoon.qemu.errors import GuestAgentError, QgaRefusedError, QgaUnresponsiveError
    from memballoon.qemu.qga import MAX_VALUE, read_report

    files = ("/proc/meminfo", "/proc/vmstat", "/proc/pressure/memory")

    def files_agent(texts: list[bytes], chunk: int) -> Callable[[str], str]:
        """qemu-ga serving ``texts`` as the three files, ``chunk`` bytes a read; a text
        starting with ``!`` is a file it refuses to open."""
        handles: dict[int, list[bytes]] = {}

        def command(text: str) -> str:
            cmd = json.loads(text)
            ex, args = cmd["execute"], cmd["arguments"]
            if ex == "guest-file-open":
                data = texts[files.index(args["path"])] if args["path"] in files else b"!"
                if data.startswith(b"!"):
                    raise QgaRefusedError("Failed to open file")
                handles[len(handles) + 7] = [data]
                return json.dumps({"return": len(handles) + 6})
            if ex == "guest-file-read":
                data = handles[args["handle"]][0]
                part, handles[args["handle"]][0] = data[:chunk], data[chunk:]
                return json.dumps({"return": {"count": len(part), "eof": len(part) < chunk,
                                              "buf-b64": base64.b64encode(part).decode()}})
            return json.dumps({"return": {}})

        return command

    def lines_agent(lines: list[bytes]) -> Callable[[str], str]:
        """qemu-ga answering each command with the next line, whatever it is."""

        def command(text: str) -> str:
            if not lines:
                raise QgaUnresponsiveError("the agent went away")
            return lines.pop(0).decode("utf-8", "replace")

        return command

    def run(data: bytes, seen: Seen) -> None:
        bag = Counters()
        if data[:1] == b"\x00":  # raw reply lines
            command = lines_agent(data[1:].split(b"\n"))
        else:  # the three files' text, as qemu-ga would carry it
            texts = [*data[1:].split(b"\x00"), b"", b"", b""][:3]
            command = files_agent(texts, 1 + (data[0] if data else 0) * 64)
        try:
            rep = read_report(command, guest="g1", counters=bag, now=5.0)
        finally:
            seen.counters.update(bag.as_dict())
        for k, v in vars(rep).items():
            if k.endswith("avg10"):
                _check(v is None or 0.0 <= v <= 100.0, f"{k} = {v}")
            elif k not in ("guest", "uptime_s"):
                _check(v is None or 0 <= v < MAX_VALUE, f"{k} = {v}")
        pr = to_pressure_report(rep, ram_bytes=1 << 30, balloon_target_pages=1000,
                                balloon_actual_pages=500, prev=None, period_s=1.0)
        _check(PressureReport.decode(pr.encode()) == pr, "a converted report does not decode")

    meminfo = (b"MemTotal:  996624 kB\nMemFree:   855028 kB\nMemAvailable: 788300 kB\n"
               b"Cached:    104700 kB\nSwapTotal: 0 kB\nSwapFree:  0 kB\n")
    vmstat = b"pswpin 3\npswpout 4\npgmajfault 17\noom_kill 1\nballoon_inflate 70000\n"
    psi = (b"some avg10=2.50 avg60=1.00 avg300=0.20 total=123456\n"
           b"full avg10=1.25 avg60=0.50 avg300=0.10 total=65432\n")
    seeds = (b"\x02" + meminfo + b"\x00" + vmstat + b"\x00" + psi,
             b"\x40" + meminfo + b"\x00" + vmstat + b"\x00!",
             b"\x00" + b'{"return": 7}\n{"return": {"count": 4, "eof": true, "buf-b64": '
             b'"TWVtVA=="}}\n{"return": {}}')
    words = (b"MemTotal:", b"MemAvailable:", b" kB\n", b"some ", b"full ", b"avg10=",
             b"avg60=", b"total=", b"pswpin ", b"balloon_inflate ", b"\x00")
    return Target("qga", "guest", "qemu-ga replies and the guest's /proc text they carry -> "
                  "qga.read_report (procfs parsers), to_pressure_report", run,
                  (GuestAgentError,), seeds,
                  words + _json_tokens(("return", "buf-b64", "eof", "count")), max_len=8192)


# ====================================================================== the daemon's inputs
def _config() -> Target:
    from memballoon.app.config import load_config, reserve_bytes, resolve_settings
    from memballoon.app.daemon import make_policy

    tmp = tempfile.TemporaryDirectory(prefix="memballoon-fuzz-")
    path = Path(tmp.name) / "host.toml"
    ram_pages = 1 << 18

    def run(data: bytes, seen: Seen) -> None:
        path.write_bytes(data)
        cfg = load_config(path)
        _check(cfg.budget == "auto" or (isinstance(cfg.budget, int) and cfg.budget > 0),
               f"budget {cfg.budget!r}")
        _check(reserve_bytes(cfg.host_reserve, 1 << 34) >= 0, "a negative host reserve")
        names = [g.name for g in cfg.guests]
        _check(len(set(names)) == len(names), "two guests of one name")
        for p in (cfg.journal, cfg.socket, cfg.run_dir):
            _check(p is None or p.is_absolute(), f"a relative path {p} after loading")
        for g in (*cfg.guests, None):
            s = g.settings(ram_pages) if g is not None else resolve_settings(
                None, cfg.defaults, ram_pages)
            _check(0 <= s.min_pages <= ram_pages and (
                s.max_pages is None or s.min_pages <= s.max_pages <= ram_pages),
                f"settings {s}")
        make_policy(cfg.policy.name, cfg.policy.params)

    seeds = tuple(p.read_bytes() for p in sorted(_examples().glob("*.toml")))
    keys = ("world", "budget", "host_reserve", "period_s", "guests", "name", "mib", "max_mib",
            "protocol", "workload", "min", "max", "shares", "policy", "params", "hysteresis",
            "journal", "socket", "defaults", "uri", "domains", "GiB", "MiB", "%", "auto")
    return Target("config", "admin", "config files -> load_config, settings, make_policy",
                  run, (ConfigError,), seeds, _json_tokens(keys), max_len=4096,
                  strategy=lambda: _toml_strategy(keys, seeds), close=tmp.cleanup)


def _examples() -> Path:
    """The repository's examples/ (a checkout); none when installed elsewhere."""
    return Path(__file__).resolve().parents[3] / "examples"


def _control() -> Target:
    from memballoon.app.config import parse_size
    from memballoon.app.control import ControlCounter, ControlServer
    from memballoon.model.counters import Counters
    from memballoon.model.errors import UsageError

    class Daemon:
        """Answers as the daemon does, without a world: sizes parsed the same way."""

        async def op_status(self) -> dict[str, Any]:
            return {"guests": []}

        async def op_set(self, guest: str, size: str | int, force: bool = False) -> dict[str, Any]:
            if size == "auto":
                return {"guest": guest, "manual": False}
            return {"guest": guest, "size_bytes": parse_size(size)}

        async def op_journal(self, last: int | None, guest: str | None) -> list[dict[str, Any]]:
            return [{"guest": guest, "last": last}]

        async def op_register_qemu(self, name: str, qmp: str, agent: str | None,
                                   ram_bytes: int) -> dict[str, Any]:
            raise UsageError('register_qemu needs a daemon with world = "qemu"')

        async def op_shutdown(self) -> dict[str, Any]:
            return {"stopping": True}

    loop = asyncio.new_event_loop()

    def run(data: bytes, seen: Seen) -> None:
        bag = Counters()
        server = ControlServer(Daemon(), "/nonexistent/memballoon.sock", counters=bag)
        reply = loop.run_until_complete(server.handle_line(data))
        json.dumps(reply, default=str)  # what _reply sends must serialize
        _check(bag[ControlCounter.CONTROL_INTERNAL_ERROR] == 0,
               f"an op raised an untyped error: {reply.get('error')}")
        _check(isinstance(reply.get("ok"), bool), "a reply without ok")
        seen.counters.update(bag.as_dict())

    seeds = (b'{"op": "set", "guest": "g1", "size": "512MiB"}\n', b'{"op": "status"}',
             b'{"op": "journal", "last": 5, "guest": "g1"}',
             b'{"op": "register_qemu", "name": "vm", "qmp": "/x", "ram_bytes": 1024}',
             b'{"op": "set", "guest": "g1", "size": 1073741824}')
    keys = ("op", "status", "set", "journal", "register_qemu", "shutdown", "guest", "size",
            "last", "name", "qmp", "agent", "ram_bytes", "auto", "MiB", "GiB")
    return Target("control", "peer", "control socket request lines -> ControlServer."
                  "handle_line (never raises; no internal error)", run, (), seeds,
                  _json_tokens(keys), max_len=4096, strategy=lambda: _json_strategy(keys, seeds),
                  close=loop.close)


#: Every target, by name (built on demand: a builder imports what it fuzzes).
TARGETS: Final[Mapping[str, Callable[[], Target]]] = {
    "vmw_frame": _vmw_frame,
    "vmw_reply": _vmw_reply,
    "vmw_device": _vmw_device,
    "virtqueue": _virtqueue,
    "virtqueue_used": _virtqueue_used,
    "virtio_stats": _virtio_stats,
    "virtio_config": _virtio_config,
    "virtio_device": _virtio_device,
    "pressure_report": _pressure,
    "wire": _wire,
    "hello": _hello,
    "qmp": _qmp,
    "agent": _agent,
    "qga": _qga,
    "config": _config,
    "control": _control,
}


# ====================================================================== hypothesis strategies
def _json_tokens(keys: Sequence[str]) -> tuple[bytes, ...]:
    return (*(json.dumps(k).encode() for k in keys), b"null", b"true", b"1e308", b"-1", b"NaN",
            b"[[[[", b"{}")


def _mutations(seeds: Sequence[bytes]) -> SearchStrategy[bytes]:
    """Seeds with bytes overwritten, inserted, cut, or two seeds spliced."""
    from hypothesis import strategies as st

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        b = bytearray(draw(st.sampled_from(list(seeds))))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b)))
            match draw(st.integers(0, 4)):
                case 0:
                    b[i : i + 1] = draw(st.binary(min_size=1, max_size=1))
                case 1:
                    b[i:i] = draw(st.binary(min_size=1, max_size=8))
                case 2:
                    del b[i : i + draw(st.integers(1, 16))]
                case 3:
                    b = b[:i] + draw(st.sampled_from(list(seeds)))[i:]
                case _:
                    b[i:i] = str(draw(st.integers(-(2**65), 2**65))).encode()
        return bytes(b)

    return mutate()


def _vmw_strategy(seeds: Sequence[bytes]) -> SearchStrategy[bytes]:
    from hypothesis import strategies as st

    header = st.builds(
        lambda cmd, data, tail: struct.pack("<IIQ", 0x456C6D6F, cmd, data) + tail,
        st.integers(0, 11), st.integers(0, 2**64 - 1), st.binary(max_size=64))
    return st.one_of(st.binary(max_size=64), header, _mutations(seeds))


def _json_values() -> SearchStrategy[object]:
    from hypothesis import strategies as st

    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True), st.text(max_size=20))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def _json_strategy(keys: Sequence[str], seeds: Sequence[bytes]) -> SearchStrategy[bytes]:
    """JSON objects over the schema's keys with any values, deep nests, seeds mutated."""
    from hypothesis import strategies as st

    docs = st.dictionaries(st.sampled_from(list(keys)) | st.text(max_size=8), _json_values(),
                           max_size=len(keys))
    deep = st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d)
    return st.one_of(docs.map(lambda d: json.dumps(d).encode()), deep, st.binary(max_size=200),
                     _mutations(seeds))


def _lines_strategy(keys: Sequence[str], seeds: Sequence[bytes]) -> SearchStrategy[bytes]:
    from hypothesis import strategies as st

    one = _json_strategy(keys, seeds)
    return st.one_of(st.lists(one, max_size=4).map(b"\n".join).map(lambda b: b"\x00" + b),
                     _mutations(seeds))


def _toml_strategy(keys: Sequence[str], seeds: Sequence[bytes]) -> SearchStrategy[bytes]:
    from hypothesis import strategies as st

    value = st.one_of(st.integers(-(2**70), 2**70), st.floats().map(repr),
                      st.text(max_size=12).map(json.dumps), st.sampled_from(
                          ['"1GiB"', '"512 MiB"', '"1.5GiB"', '"25%"', '"auto"', "true", "[]",
                           "{}", '"' + "9" * 400 + '.5GiB"', "[" * 40 + "]" * 40]))
    line = st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(list(keys)), value)
    table = st.sampled_from(["", "[policy]", "[[guests]]", "[hysteresis]", "[defaults]"])
    doc = st.lists(st.one_of(line, table), max_size=12).map(lambda ls: "\n".join(
        ['budget = "1GiB"', *ls]).encode())
    return st.one_of(doc, _mutations(seeds), st.binary(max_size=100))


# ====================================================================== running a target
class Tally:
    """One target's figures while it runs; ``one`` feeds it one input."""

    def __init__(self, target: Target, *, hang_s: float = HANG_S) -> None:
        self.target = target
        self.hang_s = hang_s
        self.inputs = 0
        self.accepted = 0
        self.crashes = 0
        self.crash_classes: Counter[str] = Counter()
        self.samples: list[dict[str, object]] = []
        self._sampled: set[tuple[str, str]] = set()
        self.seen = Seen()
        self.in_input = False
        self.started = time.monotonic()

    def one(self, data: bytes) -> None:
        self.inputs += 1
        self.in_input = True
        try:
            try:
                self.target.run(data, self.seen)
            finally:  # before any handler below: the watchdog may only interrupt ``run``
                self.in_input = False
        except _Hang:
            self.crash("Hang", f"an input ran over {self.hang_s} s", data, None)
        except self.target.expected as exc:
            self.seen.errors[type(exc).__name__] += 1
        except Exception as exc:
            self.crash(type(exc).__name__, str(exc), data, exc)
        else:
            self.accepted += 1

    def crash(self, cls: str, message: str, data: bytes | None,
              exc: BaseException | None) -> None:
        self.crashes += 1
        self.crash_classes[cls] += 1
        where = ""
        if exc is not None:
            # the innermost frame of project code (not the stdlib's, a library's or _check's)
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if f.name != "_check" and "site-packages" not in
                    f.filename and not f.filename.startswith(sys.base_prefix)] or frames
            if ours:
                f = ours[-1]
                where = f"{Path(f.filename).name}:{f.lineno} {f.name}"
        if (cls, where) in self._sampled or len(self.samples) >= _SAMPLES:
            return
        self._sampled.add((cls, where))
        sample: dict[str, object] = {"class": cls, "message": message[:300], "where": where}
        if data is not None:
            sample["input_hex"] = data[:_SAMPLE_BYTES].hex()
            sample["input_bytes"] = len(data)
        self.samples.append(sample)

    def as_dict(self, engine: str, *, done: bool) -> dict[str, Any]:
        secs = time.monotonic() - self.started
        return {
            "reach": self.target.reach, "what": self.target.what, "engine": engine,
            "done": done, "inputs": self.inputs, "accepted": self.accepted,
            "crashes": self.crashes, "seconds": round(secs, 2),
            "inputs_per_second": round(self.inputs / secs, 1) if secs > 0 else 0.0,
            "error_classes": dict(sorted(self.seen.errors.items())),
            "counters": dict(sorted(self.seen.counters.items())),
            "crash_classes": dict(sorted(self.crash_classes.items())),
            "crash_samples": self.samples,
        }


class _Watchdog:
    """SIGALRM every tick: an input that has used ``hang_s`` of CPU gets ``_Hang`` raised in it
    (Python code only; the parent's kill covers a hang inside C). CPU time, not wall time: on a
    loaded machine (or under ``nice``) a 30 ms input can wait seconds for a core, which is no
    hang of the decoder's."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.tick = min(0.25, tally.hang_s / 4)
        self._last = -1
        self._since = time.process_time()
        self._old: Any = None

    def __enter__(self) -> _Watchdog:
        self._old = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.tick, self.tick)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        t, now = self.tally, time.process_time()
        if not t.in_input or t.inputs != self._last:
            self._last, self._since = t.inputs, now
        elif now - self._since > t.hang_s:
            self._since = now
            raise _Hang


def fuzz_in_process(target: Target, *, seconds: float, seed: int = 0, hang_s: float = HANG_S,
                    max_inputs: int | None = None,
                    tick: Callable[[Tally], None] | None = None) -> Tally:
    """Fuzz ``target`` with hypothesis in this process for ``seconds`` (or ``max_inputs``).

    atheris cannot run here: libFuzzer ends the process it runs in (``run_fuzz`` gives it a
    worker). Needs the main thread (the watchdog is a signal handler)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    tally = Tally(target, hang_s=hang_s)
    deadline = time.monotonic() + seconds
    strategy = target.strategy() if target.strategy is not None else st.one_of(
        st.binary(max_size=target.max_len), st.sampled_from(target.seeds or (b"",)),
        _mutations(target.seeds or (b"",)))

    @settings(max_examples=_HYPOTHESIS_ROUND, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet, print_blob=False)
    @given(strategy)
    def feed(data: bytes) -> None:
        if time.monotonic() >= deadline or (max_inputs is not None
                                            and tally.inputs >= max_inputs):
            raise _Stop
        tally.one(data)
        if tick is not None:
            tick(tally)

    with _Watchdog(tally):
        for s in tally.target.seeds:
            tally.one(s)
        for k in range(1_000_000):
            try:
                hseed(seed * 1_000_003 + k)(feed)()
            except _Stop:
                break
            if time.monotonic() >= deadline:
                break
    return tally


# ====================================================================== workers
def _worker(argv: Sequence[str]) -> int:
    """One target in this process (``python -m memballoon.bench.fuzz --worker NAME``)."""
    p = argparse.ArgumentParser(prog="memballoon.bench.fuzz")
    p.add_argument("--worker", required=True, choices=sorted(TARGETS))
    p.add_argument("--engine", choices=ENGINES[1:], required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=HANG_S)
    p.add_argument("--max-inputs", type=int)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    engine = a.engine

    def write(tally: Tally, *, done: bool) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(tally.as_dict(engine, done=done)))
        os.replace(tmp, out)

    if engine == "hypothesis":
        target = TARGETS[a.worker]()
        next_write = [time.monotonic() + _PROGRESS_FILE_S]

        def tick(t: Tally) -> None:
            if t.inputs & 63 == 0 and time.monotonic() >= next_write[0]:
                write(t, done=False)
                next_write[0] = time.monotonic() + _PROGRESS_FILE_S

        try:
            tally = fuzz_in_process(target, seconds=a.seconds, seed=a.seed,
                                    hang_s=a.hang_seconds, max_inputs=a.max_inputs, tick=tick)
        finally:
            if target.close is not None:
                target.close()
        write(tally, done=True)
        return 0
    _atheris(a.worker, a.seconds, a.seed, a.hang_seconds, a.max_inputs, write)
    return 0  # pragma: no cover (atheris ends the process)


def _dict_entry(token: bytes) -> str:
    """One libFuzzer dictionary line (every byte escaped)."""
    return '"' + "".join(f"\\x{b:02x}" for b in token) + '"\n'


def _atheris(name: str, seconds: float, seed: int, hang_s: float, max_inputs: int | None,
             write: Callable[..., None]) -> None:
    import atheris

    # coverage of our code and the pure-Python parsers it leans on (TOML, qemu.qmp)
    with atheris.instrument_imports(include=["memballoon", "tomllib", "qemu"]):
        target = TARGETS[name]()
    tally = Tally(target, hang_s=hang_s)
    deadline = time.monotonic() + seconds
    next_write = time.monotonic() + _PROGRESS_FILE_S
    work = Path(tempfile.mkdtemp(prefix=f"memballoon-fuzz-{name}-"))
    corpus = work / "corpus"
    corpus.mkdir()
    for i, s in enumerate(target.seeds):
        (corpus / f"seed{i}").write_bytes(s)
    args = [sys.argv[0], "-timeout=0", f"-max_len={target.max_len}", f"-seed={seed + 1}",
            "-rss_limit_mb=4096", str(corpus)]
    if target.tokens:
        d = work / "tokens.dict"
        d.write_text("".join(_dict_entry(t) for t in target.tokens))
        args.insert(-1, f"-dict={d}")
    watchdog = _Watchdog(tally)

    def finish() -> None:
        watchdog.__exit__()
        write(tally, done=True)
        if target.close is not None:
            target.close()
        for f in sorted(work.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                f.unlink() if f.is_file() else f.rmdir()
        with contextlib.suppress(OSError):
            work.rmdir()
        os._exit(0)  # libFuzzer never returns: end here, the tally written

    def one(data: bytes) -> None:
        nonlocal next_write
        tally.one(data)
        if tally.inputs & 63 == 0 or max_inputs is not None:
            now = time.monotonic()
            if now >= deadline or (max_inputs is not None and tally.inputs >= max_inputs):
                finish()
            if now >= next_write:
                write(tally, done=False)
                next_write = now + _PROGRESS_FILE_S

    atheris.Setup(args, one)
    watchdog.__enter__()
    atheris.Fuzz()


# ====================================================================== the bench
def resolve_engine(engine: str) -> str:
    """``auto``: atheris where it is installed, hypothesis otherwise."""
    have_atheris = importlib.util.find_spec("atheris") is not None
    if engine == "atheris" and not have_atheris:
        raise ConfigError("--engine atheris: atheris is not installed (pip install "
                          "'memballoon[fuzz]')")
    if engine == "auto":
        engine = "atheris" if have_atheris else "hypothesis"
    if engine == "hypothesis" and importlib.util.find_spec("hypothesis") is None:
        raise ConfigError("bench fuzz needs atheris or hypothesis (pip install "
                          "'memballoon[fuzz]' or 'memballoon[test]')")
    return engine


@dataclass
class _Job:
    name: str
    out: Path
    log: Path
    proc: subprocess.Popen[bytes]
    started: float


def run_fuzz(names: Sequence[str] | None = None, *, seconds: float = SECONDS,
             engine: str = "auto", jobs: int = 1, seed: int = 0, hang_s: float = HANG_S,
             max_inputs: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fuzz every target in ``names`` (all by default) for ``seconds`` each (or until
    ``max_inputs``), ``jobs`` at a time, each in a worker process; the figures as a dict."""
    names = list(names) if names else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown fuzz target(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(TARGETS)}")
    if not seconds > 0 or jobs < 1 or not hang_s > 0:
        raise ConfigError("seconds and hang_s must be positive, jobs at least 1")
    engine = resolve_engine(engine)
    say = progress or (lambda msg: None)
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="memballoon-fuzz-") as tmp:
        work = Path(tmp)
        pending = list(names)
        running: list[_Job] = []
        next_line = time.monotonic() + _PROGRESS_LINE_S
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                running.append(_spawn(name, work, engine, seconds, seed, hang_s, max_inputs))
                say(f"bench fuzz: {name}: started ({engine}, {seconds:g} s)")
            time.sleep(0.2)
            for job in list(running):
                overdue = time.monotonic() - job.started > seconds + hang_s + _WORKER_GRACE_S
                if job.proc.poll() is None and not overdue:
                    continue
                if job.proc.poll() is None:
                    job.proc.kill()
                    job.proc.wait()
                running.remove(job)
                results[job.name] = _collect(job, engine, overdue)
                r = results[job.name]
                say(f"bench fuzz: {job.name}: {r['inputs']} inputs, {r['crashes']} crashes "
                    f"({r['inputs_per_second']:g}/s)")
            if running and time.monotonic() >= next_line:
                next_line = time.monotonic() + _PROGRESS_LINE_S
                for job in running:
                    r = _read(job.out) or {"inputs": 0, "crashes": 0}
                    say(f"bench fuzz: {job.name}: {r['inputs']} inputs, {r['crashes']} "
                        f"crashes so far ({time.monotonic() - job.started:.0f} s)")
    targets = {n: results[n] for n in names}
    guest = [r["inputs"] for r in targets.values() if r["reach"] == "guest"]
    return {
        "engine": engine, "seconds_per_target": seconds, "max_inputs": max_inputs,
        "jobs": jobs, "seed": seed, "hang_seconds": hang_s,
        "inputs": sum(r["inputs"] for r in targets.values()),
        "crashes": sum(r["crashes"] for r in targets.values()),
        "guest_facing_min_inputs": min(guest) if guest else 0,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "targets": targets,
    }


def _spawn(name: str, work: Path, engine: str, seconds: float, seed: int, hang_s: float,
           max_inputs: int | None) -> _Job:
    out, log = work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, "-m", "memballoon.bench.fuzz", "--worker", name, "--engine", engine,
           "--seconds", repr(seconds), "--seed", str(seed), "--hang-seconds", repr(hang_s),
           "--out", str(out)]
    if max_inputs is not None:
        cmd += ["--max-inputs", str(max_inputs)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=work)
    return _Job(name, out, log, proc, time.monotonic())


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _collect(job: _Job, engine: str, overdue: bool) -> dict[str, Any]:
    """The worker's last tally; a worker that died or overran is a crash of its target."""
    r = _read(job.out)
    if r is not None and r.get("done") and not overdue:
        del r["done"]
        return r
    if r is None:  # it died before its first write
        target = TARGETS[job.name]()
        if target.close is not None:
            target.close()
        r = Tally(target).as_dict(engine, done=False)
    r.pop("done", None)
    tail = job.log.read_bytes()[-1500:].decode("utf-8", "replace") if job.log.exists() else ""
    why = (f"killed after {time.monotonic() - job.started:.0f} s (a hang)" if overdue
           else f"exit status {job.proc.returncode}")
    r["crashes"] = int(r.get("crashes", 0)) + 1
    classes = dict(r.get("crash_classes", {}))
    cls = "Hang" if overdue else "WorkerDied"
    classes[cls] = classes.get(cls, 0) + 1
    r["crash_classes"] = classes
    r.setdefault("crash_samples", []).append({"class": cls, "message": why, "log_tail": tail})
    return r


def print_table(result: Mapping[str, Any]) -> None:
    print(f"engine {result['engine']}, {result['seconds_per_target']:g} s a target, "
          f"{result['inputs']} inputs, {result['crashes']} crashes, "
          f"{result['wall_seconds']:g} s")
    print(f"{'target':<16} {'reach':<6} {'inputs':>10} {'per s':>9} {'crashes':>7}  "
          "error classes")
    for name, r in result["targets"].items():
        errors = ", ".join(f"{k} {v}" for k, v in r["error_classes"].items()) or "-"
        print(f"{name:<16} {r['reach']:<6} {r['inputs']:>10} {r['inputs_per_second']:>9g} "
              f"{r['crashes']:>7}  {errors}")
        for s in r["crash_samples"]:
            print(f"  crash {s['class']}: {s.get('where', '')} {s['message']}")


def register(bsub: Any) -> None:
    """Add ``bench fuzz`` to the ``bench`` subparsers."""

    def cmd(a: argparse.Namespace) -> int:
        def progress(msg: str) -> None:
            print(f"memballoon: {msg}", file=sys.stderr, flush=True)

        res = run_fuzz(a.target, seconds=a.seconds, engine=a.engine, jobs=a.jobs,
                       seed=a.seed, hang_s=a.hang_seconds, max_inputs=a.inputs,
                       progress=progress)
        if a.json:
            print(json.dumps(res))
        else:
            print_table(res)
        return 0 if res["crashes"] == 0 else 1

    p = bsub.add_parser(
        "fuzz", help="every decoder a guest or peer can reach, fed hostile input",
        description="Fuzz each target (a decoder a guest, peer or admin reaches) in a worker "
                    "process: atheris where installed, hypothesis otherwise. A crash is an "
                    "untyped error, a hang or a broken promise; the exit status is 1 if any.")
    p.add_argument("--seconds", type=positive_float, default=SECONDS,
                   help=f"time per target (default {SECONDS:g})")
    p.add_argument("--inputs", type=positive_int,
                   help="stop a target after this many inputs (default: only --seconds)")
    p.add_argument("--target", action="append", choices=list(TARGETS),
                   help="fuzz this target (repeat for more; default all)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="atheris, hypothesis, or auto: atheris where installed (default)")
    p.add_argument("--jobs", type=positive_int, default=1, help="targets at once (default 1)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--hang-seconds", type=positive_float, default=HANG_S,
                   help=f"an input running longer is a hang (default {HANG_S:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


__all__ = ["TARGETS", "BrokenPromise", "Seen", "Tally", "Target",
           "fuzz_in_process", "print_table", "register", "resolve_engine", "run_fuzz"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
