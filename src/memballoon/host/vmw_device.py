"""The host side of the VMware balloon: answers backdoor frames for one guest.

Source: the behaviour a Linux ``drivers/misc/vmw_balloon.c`` guest expects of the VMware
monitor (v2.6.34 for version 2; v4.20+ for capabilities, batches and 2 MiB pages).

Theory of operation
-------------------
``handle(frame) -> frame`` never raises. A frame is decoded (``protocol.vmw``), then, in order:
1. ``busy_next(n)``: the next ``n`` commands answer ERROR_BUSY;
2. ``request_reset()``: the next command other than START answers ERROR_RESET, and the host
   forgets every locked page as it says so (readmitted through the RAM backend);
3. without a START since the device was made or reset, every other command answers
   ERROR_RESET too (the host has no balloon session: the guest must start one);
4. the command itself. START opens a session and, as on VMware, resets the host's view (every
   locked page is forgotten: the seed's unload sends START before it frees its pages).
   A START offering only BASIC_CMDS (== version 2) is a version-2 peer: plain SUCCESS, never
   batching. One offering BATCHED_CMDS gets SUCCESS_WITH_CAPABILITIES with what this device
   grants in ``result``; BATCHED_2M_CMDS only together with BATCHED_CMDS (as the driver
   requires).

LOCK checks, in order: PFN outside the guest (PPN_INVALID), already locked (PPN_LOCKED), pinned
by the host (PPN_PINNED), the balloon already at target (PPN_NOTNEEDED); a locked page's memory
is released through the RAM backend. UNLOCK: outside (PPN_INVALID), not locked (PPN_UNLOCKED);
the page is readmitted. Batches check every entry the same way (a PFN given twice in one batch
is PPN_LOCKED the second time) and release or readmit the accepted pages as coalesced ranges in
one call. Replies to GET_TARGET, LOCK and UNLOCK carry the target in ``result`` (v4.20+ reads
it there; the seed ignores it).

2 MiB batches (BATCHED_2M_LOCK/UNLOCK) name the first frame of each 2 MiB page: one not
aligned to 512 frames or running past the guest is PPN_INVALID; a page with any frame locked
is PPN_LOCKED, with any frame pinned PPN_PINNED; a page that would take the balloon past its
target is PPN_NOTNEEDED (the balloon never exceeds the target). A page locked as 2 MiB is
unlocked as 2 MiB only: a 4 KiB UNLOCK of one of its frames, or a 2 MiB UNLOCK of a page not
locked as one, is PPN_UNLOCKED, so both sides always agree on the balloon's frames.

Huge-page RAM (``ram.host_page_frames`` > 1): locked frames are released through
``HostPages``, a 2 MiB host page only once all its frames are locked (QEMU's
partially-ballooned-page rule; ``partial_huge_pages`` counts the others). An UNLOCK whose host
page the host cannot back again (a hugetlb pool run dry) answers ERROR_BUSY for that page,
which stays locked: the driver keeps it in its balloon and tries again in a later cycle.

Every rejected input bumps a named counter in ``counters``.

Snapshots
---------
``snapshot()`` is what a restarted host needs to keep serving the same guest
(``VmwDeviceSnapshot``, version 1): the target, the locked frames as ranges, 4 KiB and 2 MiB
pages apart (so a 2 MiB page still unlocks only as one), the pinned frames and the session
(started, granted capabilities, a reset or busy spell still to be told, the guest's id and
limit). Deferred releases are flushed first: every locked frame's memory is released when the
snapshot is taken. ``restore`` builds a device over the same guest's RAM from one without
releasing or readmitting anything (that memory is released already); counters start from zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from memballoon.host.hostpages import HostPages, in_ranges
from memballoon.host.persist import FrameRanges, check_disjoint, check_inside, mask_of, ranges_of
from memballoon.host.ram import RamBackend
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.pages import (
    PfnArray,
    RangeArray,
    as_pfns,
    coalesce,
    merge_range_lists,
    merge_ranges,
)
from memballoon.model.snapshot import Snapshot
from memballoon.protocol.vmw import (
    VMW_BALLOON_2M_ORDER,
    Capability,
    Command,
    Request,
    Response,
    Status,
    VmwFrameError,
    decode_request,
    encode_response,
    scalar_response,
)

#: What this device can grant at START.
DEVICE_CAPABILITIES = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
_START, _GET_TARGET, _LOCK, _UNLOCK, _GUEST_ID, _BATCHED_LOCK, _BATCHED_2M_LOCK = (
    Command.START, Command.GET_TARGET, Command.LOCK, Command.UNLOCK, Command.GUEST_ID,
    Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK,
)
_2M_COMMANDS = (Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK)
_2M_PAGES = 1 << VMW_BALLOON_2M_ORDER
# enum members as module constants: member lookups are slow on 3.11 (a batch makes several)
_SUCCESS = Status.SUCCESS
_PPN_INVALID, _PPN_LOCKED, _PPN_UNLOCKED, _PPN_PINNED, _PPN_NOTNEEDED, _BUSY = (
    Status.ERROR_PPN_INVALID, Status.ERROR_PPN_LOCKED, Status.ERROR_PPN_UNLOCKED,
    Status.ERROR_PPN_PINNED, Status.ERROR_PPN_NOTNEEDED, Status.ERROR_BUSY,
)
_BATCHED_BIT, _BATCHED_2M_BIT = int(Capability.BATCHED_CMDS), int(Capability.BATCHED_2M_CMDS)
# and as plain ints for numpy: it probes an enum member for array protocols on every use
_I_SUCCESS, _I_PPN_INVALID, _I_PPN_LOCKED, _I_PPN_UNLOCKED, _I_PPN_PINNED = (
    int(_SUCCESS), int(_PPN_INVALID), int(_PPN_LOCKED), int(_PPN_UNLOCKED), int(_PPN_PINNED))
_I_PPN_NOTNEEDED, _I_BUSY = int(_PPN_NOTNEEDED), int(_BUSY)
# runs of frames a version-2 run of LOCKs or UNLOCKs checks with slices of the tables, one
# each (``lock_run``); more go frame by frame
_FEW_RUNS = 32
_FEW_FRAMES = 64  # up to this many frames, their runs are found in plain Python


class VmwDeviceCounter(CounterName):
    """What ``VmwBalloonDevice.counters`` counts (names read by tests, benches and metrics)."""

    # commands decoded and answered, one member per Command
    CMD_START = "cmd_start"
    CMD_GET_TARGET = "cmd_get_target"
    CMD_LOCK = "cmd_lock"
    CMD_UNLOCK = "cmd_unlock"
    CMD_GUEST_ID = "cmd_guest_id"
    CMD_BATCHED_LOCK = "cmd_batched_lock"
    CMD_BATCHED_UNLOCK = "cmd_batched_unlock"
    CMD_BATCHED_2M_LOCK = "cmd_batched_2m_lock"
    CMD_BATCHED_2M_UNLOCK = "cmd_batched_2m_unlock"
    # frames that failed to decode, one member per ``VmwFrameError.reason`` of a request
    FRAME_SHORT_FRAME = "frame_short_frame"  # shorter than its header, count or entries
    FRAME_LONG_FRAME = "frame_long_frame"  # bytes past what the command carries
    FRAME_BAD_MAGIC = "frame_bad_magic"  # not VMW_BALLOON_HV_MAGIC
    FRAME_UNKNOWN_COMMAND = "frame_unknown_command"  # a command number we do not know
    FRAME_PFN_OVER_32_BITS = "frame_pfn_over_32_bits"  # LOCK/UNLOCK of a PFN past 32 bits
    FRAME_COUNT_OVER_MAX = "frame_count_over_max"  # a batch over VMW_BALLOON_BATCH_MAX_PAGES
    FRAME_COUNT_MISMATCH = "frame_count_mismatch"  # a batch whose count is not its data
    FRAME_ENTRY_LOW_BITS = "frame_entry_low_bits"  # a batch entry with status bits set
    # pages refused, one member per per-page status we answer (single or in a batch)
    ERROR_PPN_INVALID = "error_ppn_invalid"  # outside the guest (or a misaligned 2 MiB page)
    ERROR_PPN_LOCKED = "error_ppn_locked"  # LOCK of a page already locked (or given twice)
    ERROR_PPN_PINNED = "error_ppn_pinned"  # LOCK of a page the host pinned
    ERROR_PPN_NOTNEEDED = "error_ppn_notneeded"  # LOCK past the target
    ERROR_PPN_UNLOCKED = "error_ppn_unlocked"  # UNLOCK of a page not locked (at that size)
    ERROR_BUSY = "error_busy"  # UNLOCK of a page the host has no memory to back again
    # sessions
    BUSY = "busy"  # commands answered ERROR_BUSY (busy_next)
    RESET = "reset"  # ERROR_RESET answers that told the guest of a requested reset
    # a requested reset put off: the host could not back every balloon page (hugetlb pool dry)
    RESET_DEFERRED_UNBACKED = "reset_deferred_unbacked"
    CMD_BEFORE_START = "cmd_before_start"  # commands outside a session (answered ERROR_RESET)
    PAGES_FORGOTTEN = "pages_forgotten"  # locked pages dropped by a reset or START
    BATCH_NOT_NEGOTIATED = "batch_not_negotiated"  # 4 KiB batches without BATCHED_CMDS
    BATCH_2M_NOT_NEGOTIATED = "batch_2m_not_negotiated"  # 2 MiB batches without BATCHED_2M_CMDS


_CMD_COUNTER = {c: VmwDeviceCounter[f"CMD_{c.name}"] for c in Command}
_FRAME_COUNTER = {m.value.removeprefix("frame_"): m for m in VmwDeviceCounter
                  if m.value.startswith("frame_")}
# by int value too: batch statuses come as numpy ints (an IntEnum hashes as its value)
_STATUS_COUNTER = {
    s: VmwDeviceCounter[s.name]
    for s in (Status.ERROR_PPN_INVALID, Status.ERROR_PPN_LOCKED, Status.ERROR_PPN_PINNED,
              Status.ERROR_PPN_NOTNEEDED, Status.ERROR_PPN_UNLOCKED, Status.ERROR_BUSY)
}
_KNOWN_CAPABILITIES = int(
    Capability.BASIC_CMDS
    | Capability.BATCHED_CMDS
    | Capability.BATCHED_2M_CMDS
    | Capability.SIGNALLED_WAKEUP_CMD
    | Capability.TARGET_64_BIT
)


class VmwDeviceSnapshot(Snapshot):
    """``VmwBalloonDevice`` bookkeeping that survives a host restart (version 1)."""

    version: Literal[1] = 1
    device: Literal["vmw"] = "vmw"
    guest_pages: Annotated[int, Field(gt=0)]  # the guest these frames belong to
    target_pages: Annotated[int, Field(ge=0)]
    locked_4k: FrameRanges  # frames locked as 4 KiB pages
    locked_2m: FrameRanges  # frames locked as whole 2 MiB pages (aligned to 512 frames)
    pinned: FrameRanges  # frames LOCK answers PPN_PINNED
    started: bool  # a session is open (a START since the last reset)
    capabilities: Annotated[int, Field(ge=0)]  # what the session's START granted
    reset_pending: bool  # request_reset() not told to the guest yet
    busy_left: Annotated[int, Field(ge=0)]  # commands still to answer ERROR_BUSY
    guest_limit: Annotated[int, Field(ge=0)] | None  # from the last GET_TARGET
    guest_id: Annotated[int, Field(ge=0)] | None  # from GUEST_ID

    @model_validator(mode="after")
    def _fits_the_guest(self) -> Self:
        for name, ranges in (("locked_4k", self.locked_4k), ("locked_2m", self.locked_2m),
                             ("pinned", self.pinned)):
            check_inside(name, ranges, self.guest_pages)
        if any(s % _2M_PAGES or e % _2M_PAGES for s, e in self.locked_2m):
            raise ConfigError(f"locked_2m: ranges must be whole 2 MiB pages ({_2M_PAGES} "
                              "frames, aligned)")
        check_disjoint("locked_4k", self.locked_4k, "locked_2m", self.locked_2m)
        if self.capabilities & ~int(DEVICE_CAPABILITIES):
            raise ConfigError(f"capabilities {self.capabilities:#x}: this device grants at "
                              f"most {int(DEVICE_CAPABILITIES):#x}")
        return self


class VmwBalloonDevice:
    """One guest's VMware balloon, host side (see the module docstring)."""

    def __init__(self, ram: RamBackend, *, supports_batched: bool = True,
                 supports_2m: bool = True, defer_release: bool = False) -> None:
        self.ram = ram
        self.supports_batched = supports_batched
        self.supports_2m = supports_2m
        # With defer_release, a batched LOCK's pages are released by flush_release(), which a
        # transport calls right after it has sent the reply: the guest allocates its next
        # batch while the host punches. Every later command flushes first, so no UNLOCK,
        # RESET or START can overtake a release.
        self.defer_release = defer_release
        self._to_release: list[RangeArray] = []
        self.counters = Counters()
        n = ram.guest_pages
        self._guest_pages = n
        self._locked: npt.NDArray[np.bool_] = np.zeros(n, dtype=np.bool_)
        self._pinned: npt.NDArray[np.bool_] = np.zeros(n, dtype=np.bool_)
        # per 2 MiB page: locked by a 2 MiB LOCK (a partial last block never is)
        self._huge: npt.NDArray[np.bool_] = np.zeros(-(-n // _2M_PAGES), dtype=np.bool_)
        # the same flags a row per whole 2 MiB page (views): a 2 MiB batch reads its pages'
        # rows, not a gather of every frame
        whole = n // _2M_PAGES
        self._locked_rows = self._locked[: whole * _2M_PAGES].reshape(whole, _2M_PAGES)
        self._pinned_rows = self._pinned[: whole * _2M_PAGES].reshape(whole, _2M_PAGES)
        self._host = HostPages(ram, self.counters)
        self._n_locked = 0
        self._target = 0
        self._started = False
        self._caps = Capability(0)
        self._reset_pending = False
        self._busy_left = 0
        #: the guest's RAM limit from its last GET_TARGET; None before the first one
        self.guest_limit: int | None = None
        #: guest type from GUEST_ID (1 = Linux)
        self.guest_id: int | None = None

    # ------------------------------------------------------------------ control (host side)
    def set_target(self, pages: int) -> None:
        if pages < 0:
            raise UsageError(f"negative balloon target: {pages} pages")
        self._target = pages

    @property
    def target_pages(self) -> int:
        return self._target

    @property
    def actual_pages(self) -> int:
        return self._n_locked

    @property
    def capabilities(self) -> Capability:
        """What the current session granted (empty before START)."""
        return self._caps

    @property
    def started(self) -> bool:
        return self._started

    def balloon_pfns(self) -> PfnArray:
        return np.flatnonzero(self._locked).astype(np.int64, copy=False)

    @property
    def partial_huge_pages(self) -> int:
        """Host huge pages partly locked: held, not released (0 with 4 KiB host pages), as of
        the last release (a deferred one is counted once flushed)."""
        return self._host.partial_huge_pages

    @property
    def host_pages(self) -> HostPages:
        return self._host

    def set_pinned(self, pfns: npt.ArrayLike) -> None:
        """Pages the host will not take (LOCK answers PPN_PINNED); replaces the previous set."""
        p = as_pfns(pfns)
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self._guest_pages):
            raise UsageError("pinned PFN outside the guest")
        self._pinned[:] = False
        self._pinned[p] = True

    def request_reset(self) -> None:
        """The next command (other than START) answers ERROR_RESET and forgets the balloon.

        The pages are forgotten when the guest is told, not before, so both sides agree on
        the balloon between commands (a BUSY spell may delay the news).
        """
        self._reset_pending = True

    @property
    def plain(self) -> bool:
        """A session is open, no busy spell or reset is still to be told and no release is
        deferred: the next command is answered on its own merits (the simulator lets a quiet
        guest sleep only then)."""
        return (self._started and not self._reset_pending and self._busy_left == 0
                and not self._to_release)

    def busy_next(self, n: int) -> None:
        """The next ``n`` commands answer ERROR_BUSY."""
        if n < 0:
            raise UsageError(f"busy_next: negative count {n}")
        self._busy_left = n

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> VmwDeviceSnapshot:
        """The bookkeeping a restarted host needs (flushes deferred releases first)."""
        self.flush_release()  # every frame in the snapshot's balloon has its memory released
        huge_frames = np.repeat(self._huge, _2M_PAGES)[: self._guest_pages]
        return VmwDeviceSnapshot(
            guest_pages=self._guest_pages,
            target_pages=self._target,
            locked_4k=ranges_of(self._locked & ~huge_frames),
            locked_2m=tuple((s * _2M_PAGES, e * _2M_PAGES) for s, e in ranges_of(self._huge)),
            pinned=ranges_of(self._pinned),
            started=self._started,
            capabilities=int(self._caps),
            reset_pending=self._reset_pending,
            busy_left=self._busy_left,
            guest_limit=self.guest_limit,
            guest_id=self.guest_id,
        )

    @classmethod
    def restore(cls, snap: VmwDeviceSnapshot, ram: RamBackend, *, supports_batched: bool = True,
                supports_2m: bool = True, defer_release: bool = False) -> VmwBalloonDevice:
        """A device over ``ram`` (the same guest's) that takes up ``snap``; nothing is released
        or readmitted. The session keeps the capabilities it was granted until the guest's
        next START, whatever ``supports_*`` say. ``ConfigError`` if ``ram`` is another size."""
        if snap.guest_pages != ram.guest_pages:
            raise ConfigError(f"VmwDeviceSnapshot: for a guest of {snap.guest_pages} pages, "
                              f"the RAM has {ram.guest_pages}")
        dev = cls(ram, supports_batched=supports_batched, supports_2m=supports_2m,
                  defer_release=defer_release)
        n = dev._guest_pages
        blocks = tuple((s // _2M_PAGES, e // _2M_PAGES) for s, e in snap.locked_2m)
        dev._huge[:] = mask_of(blocks, dev._huge.size)
        dev._locked[:] = mask_of(snap.locked_4k, n) | mask_of(snap.locked_2m, n)
        dev._pinned[:] = mask_of(snap.pinned, n)
        dev._n_locked = int(np.count_nonzero(dev._locked))
        dev._host.rebuild(dev._locked)
        dev._target = snap.target_pages
        dev._started = snap.started
        dev._caps = Capability(snap.capabilities)
        dev._reset_pending = snap.reset_pending
        dev._busy_left = snap.busy_left
        dev.guest_limit = snap.guest_limit
        dev.guest_id = snap.guest_id
        return dev

    # ------------------------------------------------------------------ the backdoor
    @property
    def release_owed_pages(self) -> int:
        """Balloon frames whose host memory a failed release still holds (retried)."""
        return self._host.release_owed_pages

    def retry_releases(self) -> int:
        """Release what the host failed to before (``HostPages.retry_releases``)."""
        return self._host.retry_releases()

    def flush_release(self) -> None:
        """Release what batched LOCKs accepted (with ``defer_release``), and what the host
        failed to release before; idempotent."""
        self._host.retry_releases()  # returns at once when nothing is owed
        if self._to_release:
            ranges = merge_range_lists(self._to_release)
            self._to_release.clear()
            self._host.take(ranges)

    def handle(self, request: bytes) -> bytes:
        """Answer one request frame (never raises)."""
        if self._to_release or self._host.owing:
            self.flush_release()  # whatever an earlier LOCK accepted is released first
        try:
            req = decode_request(request)
        except VmwFrameError as exc:
            self.counters.inc(_FRAME_COUNTER[exc.reason])
            return encode_response(scalar_response(exc.status))
        self.counters.inc(_CMD_COUNTER[req.command])
        return encode_response(self._answer(req))

    def answer(self, req: Request) -> Response:
        """``handle`` of a request given as the message its frame decodes to: the response
        whose frame ``handle`` would send, with the same state and counters (a driver in the
        same process, which never sends a frame that does not decode; no bytes either way)."""
        if self._to_release or self._host.owing:
            self.flush_release()
        self.counters.inc(_CMD_COUNTER[req.command])
        return self._answer(req)

    def _answer(self, req: Request) -> Response:
        if self._busy_left > 0:
            self._busy_left -= 1
            self.counters.inc(VmwDeviceCounter.BUSY)
            return scalar_response(Status.ERROR_BUSY)
        cmd = req.command
        if cmd is _START:
            return self._start(req.data)
        if self._reset_pending and self._forget_all(backed_only=True):
            self._reset_pending = False
            self._started = False
            self.counters.inc(VmwDeviceCounter.RESET)
            return scalar_response(Status.ERROR_RESET)
        if not self._started:
            self.counters.inc(VmwDeviceCounter.CMD_BEFORE_START)
            return scalar_response(Status.ERROR_RESET)
        # plain comparisons, not ``match``: member lookups are slow on 3.11 and LOCK/UNLOCK
        # come once per page
        if cmd is _LOCK:
            return scalar_response(self._lock_one(req.data), self._target)
        if cmd is _UNLOCK:
            return scalar_response(self._unlock_one(req.data), self._target)
        if cmd is _GET_TARGET:
            self.guest_limit = req.data
            return scalar_response(_SUCCESS, min(self._target, req.data))
        if cmd is _GUEST_ID:
            self.guest_id = req.data
            return scalar_response(_SUCCESS)
        # a batch of 4 KiB or 2 MiB pages
        huge = cmd in _2M_COMMANDS
        if not int(self._caps) & (_BATCHED_2M_BIT if huge else _BATCHED_BIT):
            self.counters.inc(VmwDeviceCounter.BATCH_2M_NOT_NEGOTIATED if huge
                              else VmwDeviceCounter.BATCH_NOT_NEGOTIATED)
            return scalar_response(Status.ERROR_CMD_INVALID)
        if cmd is _BATCHED_LOCK:
            statuses = self._lock_batch(req.pfns)
        elif cmd is _BATCHED_2M_LOCK:
            statuses = self._lock_batch_2m(req.pfns)
        elif huge:
            statuses = self._unlock_batch_2m(req.pfns)
        else:
            statuses = self._unlock_batch(req.pfns)
        return Response(_SUCCESS, self._target, req.pfns, statuses)

    def _start(self, offered: int) -> Response:
        self._forget_all()
        self._reset_pending = False
        self._started = True
        offer = Capability(offered & _KNOWN_CAPABILITIES)
        if self.supports_batched and offer & Capability.BATCHED_CMDS:
            grant = DEVICE_CAPABILITIES
            if not self.supports_2m:
                grant &= ~Capability.BATCHED_2M_CMDS
            self._caps = offer & grant | Capability.BASIC_CMDS
            return scalar_response(Status.SUCCESS_WITH_CAPABILITIES, int(self._caps))
        # a version-2 peer (data 2 == BASIC_CMDS), or batching not on offer here
        self._caps = Capability.BASIC_CMDS
        return scalar_response(Status.SUCCESS)

    def _forget_all(self, *, backed_only: bool = False) -> bool:
        """The balloon is gone: the guest takes every page back at once. With ``backed_only``
        (a reset we ask for), only if the host can back every one (a hugetlb pool run dry
        cannot: the guest would fault into nothing); else nothing changes, the frames it could
        back are released again, ``reset_deferred_unbacked`` counts it and False: the reset is
        told at a later command, once memory is back. A START (the guest's own restart) takes
        them back regardless."""
        # with nothing locked the tables are clear already: writing them anyway would make a
        # simulated guest's untouched tables resident
        if self._n_locked:
            pfns = self.balloon_pfns()
            if not backed_only:
                self._host.give(coalesce(pfns), force=True)
            elif not self._host.give_all(pfns):
                self.counters.inc(VmwDeviceCounter.RESET_DEFERRED_UNBACKED)
                return False
            self.counters.inc(VmwDeviceCounter.PAGES_FORGOTTEN, self._n_locked)
            self._locked[:] = False
            self._huge[:] = False
        self._n_locked = 0
        return True

    # ------------------------------------------------------------------ single pages
    def _lock_one(self, pfn: int) -> Status:
        if pfn >= self._guest_pages:
            st = _PPN_INVALID
        elif self._locked[pfn]:
            st = _PPN_LOCKED
        elif self._pinned[pfn]:
            st = _PPN_PINNED
        elif self._n_locked >= self._target:
            st = _PPN_NOTNEEDED
        else:
            self._host.take(np.array([[pfn, pfn + 1]], dtype=np.int64))
            self._locked[pfn] = True
            self._n_locked += 1
            return _SUCCESS
        self.counters.inc(_STATUS_COUNTER[st])
        return st

    def _unlock_one(self, pfn: int) -> Status:
        if pfn >= self._guest_pages:
            st = _PPN_INVALID
        elif not self._locked[pfn] or self._huge[pfn >> VMW_BALLOON_2M_ORDER]:
            st = _PPN_UNLOCKED  # not locked, or locked as part of a 2 MiB page
        elif len(self._host.give(np.array([[pfn, pfn + 1]], dtype=np.int64))):
            st = _BUSY  # no host memory behind it now: it stays locked
        else:
            self._locked[pfn] = False
            self._n_locked -= 1
            return _SUCCESS
        self.counters.inc(_STATUS_COUNTER[st])
        return st

    # ------------------------------------------------------------------ runs of single pages
    def lock_run(self, pfns: PfnArray) -> int:
        """Answer a version-2 LOCK of each of ``pfns`` in turn, as ``handle`` would, and stop
        before the first that would not be SUCCESS: returns how many were locked, with the
        state and counters of that many LOCK commands. The simulator's bulk path for the
        seed's driver, which sends one per page (a property test holds it to that). Nothing
        with huge host pages or while the device would not answer plainly."""
        if not self.plain or self._host.frames != 1 or pfns.size == 0:
            return 0
        p = pfns[: max(0, self._target - self._n_locked)]  # the rest: PPN_NOTNEEDED
        if p.size == 0:
            return 0
        cut = self._runs_of(p)
        if cut is None:
            return self._lock_run_checked(p)
        runs, ascending = cut
        locked, pinned = self._locked, self._pinned

        def taken(lo: int, hi: int) -> npt.NDArray[np.bool_] | None:
            # (count_nonzero: a C call, where ``any`` is a Python wrapper around a reduction)
            if np.count_nonzero(locked[lo:hi]) or np.count_nonzero(pinned[lo:hi]):
                return locked[lo:hi] | pinned[lo:hi]
            return None

        # a few runs of free frames (the usual): slices of the tables
        take = self._runs_until(runs, ascending, taken)
        n = sum(hi - lo for lo, hi in take)
        if n:
            self._host.take(self._ranges(take))
            for lo, hi in take:
                locked[lo:hi] = True
            self._n_locked += n
            self.counters.inc(VmwDeviceCounter.CMD_LOCK, n)
        return n

    def _lock_run_checked(self, p: PfnArray) -> int:
        """``lock_run`` of ``p`` (at most the room under the target) frame by frame: the
        reference its slices of runs keep."""
        n = self._run_length(p, locked=False)
        if n:
            take = p[:n]
            self._host.take(coalesce(take))
            self._locked[take] = True
            self._n_locked += n
            self.counters.inc(VmwDeviceCounter.CMD_LOCK, n)
        return n

    def unlock_run(self, pfns: PfnArray) -> int:
        """``lock_run`` for version-2 UNLOCKs: how many of ``pfns``, in turn, were unlocked
        before the first that would not be SUCCESS."""
        if not self.plain or self._host.frames != 1 or pfns.size == 0:
            return 0
        cut = self._runs_of(pfns)
        if cut is None:
            return self._unlock_run_checked(pfns)
        runs, ascending = cut
        huge = self._huge
        if any(np.count_nonzero(huge[lo >> VMW_BALLOON_2M_ORDER :
                                     ((hi - 1) >> VMW_BALLOON_2M_ORDER) + 1]) for lo, hi in runs):
            return self._unlock_run_checked(pfns)  # a 2 MiB page among them: never in v2
        locked = self._locked

        def not_locked(lo: int, hi: int) -> npt.NDArray[np.bool_] | None:
            seg = locked[lo:hi]
            return ~seg if np.count_nonzero(seg) != hi - lo else None

        # a few runs of a stack's newest first (the usual): slices of the table
        give = self._runs_until(runs, ascending, not_locked)
        n = sum(hi - lo for lo, hi in give)
        if n:
            self._host.give(self._ranges(give))  # 4 KiB host pages: every frame leaves
            for lo, hi in give:
                locked[lo:hi] = False
            self._n_locked -= n
            self.counters.inc(VmwDeviceCounter.CMD_UNLOCK, n)
        return n

    def _unlock_run_checked(self, pfns: PfnArray) -> int:
        """``unlock_run`` frame by frame: the reference its slices of runs keep."""
        n = self._run_length(pfns, locked=True)
        if n:
            give = pfns[:n]
            self._host.give(coalesce(give[::-1]))  # newest first: ascending when reversed
            self._locked[give] = False
            self._n_locked -= n
            self.counters.inc(VmwDeviceCounter.CMD_UNLOCK, n)
        return n

    def _runs_of(self, p: PfnArray) -> tuple[list[tuple[int, int]], bool] | None:
        """``p`` (not empty) as its runs of consecutive frames in its order, each ``[first,
        end)``, and whether they are named ascending (else descending: a stack's newest
        first); None when the runs are many, overlap (a frame named twice) or reach outside
        the guest: then the run's checks go frame by frame. The seed driver's runs are a
        few blocks' free frames, so a slice of the tables a run beats a gather per frame."""
        k = int(p.size)
        if k <= _FEW_FRAMES:
            runs, ascending = self._runs_of_few(p.tolist())
            if len(runs) >= _FEW_RUNS:
                return None
        else:
            steps = p[1:] - p[:-1]
            ascending = int(steps[0]) >= 0  # the first run's way (runs may go back)
            brk = (steps != (1 if ascending else -1)).nonzero()[0]
            if brk.size >= _FEW_RUNS:
                return None
            edges = [0, *(brk + 1).tolist(), k]
            heads = p[edges[:-1]].tolist()
            runs = [(h, h + b - a) if ascending else (h - (b - a) + 1, h + 1)
                    for h, a, b in zip(heads, edges[:-1], edges[1:], strict=True)]
        ordered = sorted(runs)
        end = ordered[0][0]
        if end < 0:
            return None
        for lo, hi in ordered:
            if lo < end:
                return None  # overlapping runs: a frame named twice
            end = hi
        return (runs, ascending) if end <= self._guest_pages else None

    @staticmethod
    def _runs_of_few(frames: list[int]) -> tuple[list[tuple[int, int]], bool]:
        """``_runs_of``'s runs of a few frames (not none), in plain Python (numpy calls on a
        few frames, a sleeping allocation's, cost more than a walk over them)."""
        head = prev = frames[0]
        ascending = len(frames) == 1 or frames[1] >= head
        step = 1 if ascending else -1
        runs: list[tuple[int, int]] = []
        for f in frames[1:]:
            if f != prev + step:
                runs.append((head, prev + 1) if ascending else (prev, head + 1))
                head = f
            prev = f
        runs.append((head, prev + 1) if ascending else (prev, head + 1))
        return runs, ascending

    @classmethod
    def _runs_until(cls, runs: list[tuple[int, int]], ascending: bool,
                    bad: Callable[[int, int], npt.NDArray[np.bool_] | None],
                    ) -> list[tuple[int, int]]:
        """``runs``, in turn, up to the first frame ``bad`` flags (``bad(lo, hi)``: the flags of
        the run's frames, or None when none is): a command per frame stops there (LOCK on a
        locked or pinned frame, UNLOCK on one not locked)."""
        out: list[tuple[int, int]] = []
        for lo, hi in runs:
            flags = bad(lo, hi)
            if flags is not None:
                lo, hi = cls._before_first(flags, lo, hi, ascending)
                if hi > lo:
                    out.append((lo, hi))
                break
            out.append((lo, hi))
        return out

    @staticmethod
    def _before_first(bad: npt.NDArray[np.bool_], lo: int, hi: int, ascending: bool
                      ) -> tuple[int, int]:
        """The frames of the run ``[lo, hi)`` named before the first of it that is ``bad``
        (flags of its frames, ascending, one at least set): the run's head up to it when
        the run is named ascending, else its top down to it."""
        if ascending:
            return lo, lo + int(bad.argmax())
        return hi - int(bad[::-1].argmax()), hi

    @staticmethod
    def _ranges(runs: list[tuple[int, int]]) -> RangeArray:
        """Disjoint ``[first, end)`` runs as the sorted, merged ranges ``coalesce`` makes of
        their frames (a few runs: plain Python)."""
        out: list[list[int]] = []
        for lo, hi in sorted(runs):
            if out and out[-1][1] == lo:
                out[-1][1] = hi
            else:
                out.append([lo, hi])
        return np.array(out, dtype=np.int64)

    def _span(self, p: PfnArray, limit: int | None = None) -> tuple[int, int] | None:
        """``[first, end)`` when ``p`` is one run of consecutive frames inside the guest (or
        of numbers under ``limit``: blocks), ascending or descending (a run's pages, a stack's
        newest first), else None: then its checks are slices of the tables, not a gather per
        frame."""
        if p.size == 0:
            return None
        lo, hi = int(p[0]), int(p[-1])
        if lo > hi:
            lo, hi = hi, lo
        if (lo < 0 or hi >= (self._guest_pages if limit is None else limit)
                or hi - lo != p.size - 1):
            return None
        # p.size - 1 steps, each of +-1 at least in size, add up to hi - lo: all are +-1
        steps = p[1:] - p[:-1]
        if p.size > 1 and not bool((steps == steps[0]).all()):
            return None
        return lo, hi + 1

    def _run_length(self, p: PfnArray, *, locked: bool) -> int:
        """How many of ``p``, from the first, pass a single LOCK's checks (``locked`` False:
        inside, not locked, not pinned) or a single UNLOCK's (True: inside, locked, not as
        part of a 2 MiB page), a page given twice failing the second time."""
        if p.size == 0:
            return 0
        if int(p.max()) < self._guest_pages:  # the usual: no frame outside, no masking
            if locked:
                bad = ~self._locked[p] | self._huge[p >> VMW_BALLOON_2M_ORDER]
            else:
                bad = self._locked[p] | self._pinned[p]
        else:
            inside = p < self._guest_pages
            q = np.where(inside, p, 0)
            if locked:
                bad = ~inside | ~self._locked[q] | self._huge[q >> VMW_BALLOON_2M_ORDER]
            else:
                bad = ~inside | self._locked[q] | self._pinned[q]
        bad |= self._repeats(p)
        i = int(bad.argmax())  # the first that fails, or 0 when none does
        return i if bool(bad[i]) else int(p.size)

    # ------------------------------------------------------------------ batches
    def _classify(self, pfns: PfnArray) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
        """Statuses preset to SUCCESS, with PPN_INVALID marked; and the in-guest mask."""
        st = np.zeros(pfns.size, dtype=np.int32)
        inside = pfns < self._guest_pages
        if not bool(inside.all()):
            st[~inside] = _I_PPN_INVALID
        return st, inside

    @staticmethod
    def _repeats(pfns: PfnArray) -> npt.NDArray[np.bool_]:
        """True for every entry whose PFN already appeared earlier in the batch."""
        if pfns.size < 2:
            return np.zeros(pfns.size, dtype=np.bool_)
        steps = pfns[1:] - pfns[:-1]
        if bool((steps > 0).all()) or bool((steps < 0).all()):
            # ascending, as drivers send batches, or descending, a stack's newest first
            return np.zeros(pfns.size, dtype=np.bool_)
        _, first = np.unique(pfns, return_index=True)
        rep = np.ones(pfns.size, dtype=np.bool_)
        rep[first] = False
        return rep

    def _count_statuses(self, st: npt.NDArray[np.int32]) -> None:
        bad = st[st != _I_SUCCESS]
        if bad.size == 0:
            return
        codes, counts = np.unique(bad, return_counts=True)
        for code, n in zip(codes.tolist(), counts.tolist(), strict=True):
            self.counters.inc(_STATUS_COUNTER[code], n)

    def _lock_batch(self, pfns: PfnArray) -> npt.NDArray[np.int32]:
        n = int(pfns.size)
        span = self._span(pfns) if n <= self._target - self._n_locked else None
        if span is not None and not (self._locked[span[0]:span[1]].any()
                                     or self._pinned[span[0]:span[1]].any()):
            # one run of free frames, under the target: slices of the tables, one range
            self._release(np.array([span], dtype=np.int64))
            self._locked[span[0]:span[1]] = True
            self._n_locked += n
            return np.zeros(n, dtype=np.int32)
        if 0 < n <= self._target - self._n_locked and int(pfns.max()) < self._guest_pages:
            # the usual batch: inside, under the target; if no page is locked, pinned or
            # given twice, every one is SUCCESS (the checks below, in a few numpy calls)
            bad = self._locked[pfns]
            bad |= self._pinned[pfns]
            if not bool(bad.any()) and not self._repeats(pfns).any():
                self._release(coalesce(pfns))
                self._locked[pfns] = True
                self._n_locked += n
                return np.zeros(n, dtype=np.int32)
        return self._lock_batch_checked(pfns)

    def _lock_batch_checked(self, pfns: PfnArray) -> npt.NDArray[np.int32]:
        """``_lock_batch`` entry by entry: every status (the reference its fast path keeps)."""
        st, inside = self._classify(pfns)
        idx = inside.nonzero()[0]
        p = pfns[idx]
        locked = self._locked[p] | self._repeats(p)
        st[idx[locked]] = _I_PPN_LOCKED
        pinned = ~locked & self._pinned[p]
        st[idx[pinned]] = _I_PPN_PINNED
        cand = idx[~locked & ~pinned]
        room = max(0, self._target - self._n_locked)
        st[cand[room:]] = _I_PPN_NOTNEEDED
        take = pfns[cand[:room]]
        if take.size:
            self._release(coalesce(take))
            self._locked[take] = True
            self._n_locked += int(take.size)
        self._count_statuses(st)
        return st

    def _unlock_batch(self, pfns: PfnArray) -> npt.NDArray[np.int32]:
        span = self._span(pfns)
        if span is None or not bool(self._locked[span[0]:span[1]].all()) or bool(
                self._huge[span[0] >> VMW_BALLOON_2M_ORDER:
                           ((span[1] - 1) >> VMW_BALLOON_2M_ORDER) + 1].any()):
            return self._unlock_batch_checked(pfns)
        # one run of frames locked as 4 KiB pages (a stack's newest first): every one leaves
        # unless the host cannot back it again; slices of the tables, one range
        st = np.zeros(pfns.size, dtype=np.int32)
        stuck = self._host.give(np.array([span], dtype=np.int64))
        if len(stuck):  # no host memory behind these now: they stay locked
            busy = in_ranges(pfns, stuck)
            st[busy] = _I_BUSY
            give = pfns[~busy]
            self._locked[give] = False
            self._n_locked -= int(give.size)
            self._count_statuses(st)
        else:
            self._locked[span[0]:span[1]] = False
            self._n_locked -= int(pfns.size)
        return st

    def _unlock_batch_checked(self, pfns: PfnArray) -> npt.NDArray[np.int32]:
        """``_unlock_batch`` entry by entry: every status (the reference of its fast path)."""
        st, inside = self._classify(pfns)
        idx = inside.nonzero()[0]
        p = pfns[idx]
        unlocked = ~self._locked[p] | self._huge[p >> VMW_BALLOON_2M_ORDER] | self._repeats(p)
        st[idx[unlocked]] = _I_PPN_UNLOCKED
        give = p[~unlocked]
        if give.size:
            stuck = self._host.give(coalesce(give))
            if len(stuck):  # no host memory behind these now: they stay locked
                busy = np.zeros(pfns.size, dtype=np.bool_)
                busy[idx[~unlocked]] = in_ranges(give, stuck)
                st[busy] = _I_BUSY
                give = give[~in_ranges(give, stuck)]
            self._locked[give] = False
            self._n_locked -= int(give.size)
        self._count_statuses(st)
        return st

    def _release(self, ranges: RangeArray) -> None:
        if self.defer_release:
            self._to_release.append(ranges)  # punched by flush_release, before any reply
        else:                                # to a later command
            self._host.take(ranges)

    # ------------------------------------------------------------------ 2 MiB batches
    def _classify_2m(
        self, heads: PfnArray
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Statuses with PPN_INVALID marked, the valid entries' indices and their blocks."""
        st = np.zeros(heads.size, dtype=np.int32)
        valid = (heads % _2M_PAGES == 0) & (heads + _2M_PAGES <= self._guest_pages)
        if not bool(valid.all()):
            st[~valid] = _I_PPN_INVALID
        idx = valid.nonzero()[0]
        return st, idx, heads[idx] >> VMW_BALLOON_2M_ORDER

    @staticmethod
    def _block_any(rows: npt.NDArray[np.bool_], blocks: npt.NDArray[np.int64]
                   ) -> npt.NDArray[np.bool_]:
        """Per whole block: is any of its frames set in ``rows`` (flags, a row per block)?"""
        return np.asarray(rows[blocks].any(axis=1))

    def _set_blocks(self, blocks: npt.NDArray[np.int64], locked: bool) -> RangeArray:
        """Mark whole 2 MiB pages (un)locked; returns their frames as merged ranges."""
        # the runs of consecutive blocks, in frames: what merge_ranges makes of the blocks'
        # extents (they touch), in the two numpy calls of coalesce's usual single run
        ranges = coalesce(blocks) << VMW_BALLOON_2M_ORDER
        self._locked_rows[blocks] = locked  # whole blocks (valid heads): one write
        self._huge[blocks] = locked
        delta = int(blocks.size) * _2M_PAGES
        self._n_locked += delta if locked else -delta
        return ranges

    def _lock_batch_2m(self, heads: PfnArray) -> npt.NDArray[np.int32]:
        n = int(heads.size)
        if (n > 0 and n * _2M_PAGES <= self._target - self._n_locked
                and int(heads.max()) + _2M_PAGES <= self._guest_pages
                and not bool((heads % _2M_PAGES).any())):
            # the usual batch: whole aligned pages inside, under the target; if no frame of
            # theirs is locked or pinned and none is given twice, every one is SUCCESS
            blocks = heads >> VMW_BALLOON_2M_ORDER
            span = self._span(blocks, len(self._locked_rows))
            if span is not None:  # consecutive pages: their frames are one slice
                lo, hi = span[0] * _2M_PAGES, span[1] * _2M_PAGES
                if not (self._locked[lo:hi].any() or self._pinned[lo:hi].any()):
                    self._locked[lo:hi] = True  # what _set_blocks does, with slices
                    self._huge[span[0]:span[1]] = True
                    self._n_locked += hi - lo
                    self._release(np.array([[lo, hi]], dtype=np.int64))
                    return np.zeros(n, dtype=np.int32)
            elif not (bool(self._locked_rows[blocks].any()) or bool(self._pinned_rows[blocks].any())
                    or bool(self._repeats(blocks).any())):
                self._release(self._set_blocks(blocks, True))
                return np.zeros(n, dtype=np.int32)
        return self._lock_batch_2m_checked(heads)

    def _lock_batch_2m_checked(self, heads: PfnArray) -> npt.NDArray[np.int32]:
        """``_lock_batch_2m`` page by page: every status (the reference of its fast path)."""
        st, idx, blocks = self._classify_2m(heads)
        locked = self._block_any(self._locked_rows, blocks) | self._repeats(blocks)
        st[idx[locked]] = _I_PPN_LOCKED
        pinned = ~locked & self._block_any(self._pinned_rows, blocks)
        st[idx[pinned]] = _I_PPN_PINNED
        ok = ~locked & ~pinned
        cand = idx[ok]
        room = max(0, self._target - self._n_locked) // _2M_PAGES  # never past the target
        st[cand[room:]] = _I_PPN_NOTNEEDED
        take = blocks[ok][:room]
        if take.size:
            self._release(self._set_blocks(take, True))
        self._count_statuses(st)
        return st

    def _unlock_batch_2m(self, heads: PfnArray) -> npt.NDArray[np.int32]:
        st, idx, blocks = self._classify_2m(heads)
        unlocked = ~self._huge[blocks] | self._repeats(blocks)
        st[idx[unlocked]] = _I_PPN_UNLOCKED
        give = blocks[~unlocked]
        if give.size:
            starts = give * _2M_PAGES
            stuck = self._host.give(merge_ranges(starts, starts + _2M_PAGES))
            if len(stuck):  # no host memory behind these now: they stay locked
                busy_blocks = in_ranges(starts, stuck)
                busy = np.zeros(heads.size, dtype=np.bool_)
                busy[idx[~unlocked]] = busy_blocks
                st[busy] = _I_BUSY
                give = give[~busy_blocks]
            self._set_blocks(give, False)
        self._count_statuses(st)
        return st
