"""The VMware balloon driver, guest side: the seed's algorithm over the guest memory model.

Source: Linux ``drivers/misc/vmw_balloon.c`` v2.6.34 ("1.2.1.0-K", seed 004), whole algorithm
in ../shared/notes/vmw-balloon-legacy.md; batched mode after v4.20+.

Theory of operation
-------------------
The driver talks to the host through a ``Backdoor``: request frame in, response frame out (the
pure stand-in for the ``inl`` instruction). ``load`` sends START then GUEST_ID; the caller then
runs ``work`` at once and every ``period_s`` (the seed queues its work with delay 0, then 1 s).

``work``: count the timer; if a RESET was seen, *reset* (pop every page without UNLOCK, START,
GUEST_ID); decrement ``slow_allocation_cycles``; GET_TARGET with the guest's RAM as limit; then
inflate or deflate by at most one cycle.

Version 2 (the seed, one page per command), kept line for line:
- inflate: ``rate`` is 16384 (non-sleeping allocations) unless the guest was under pressure in
  the last 4 cycles (then ``rate_alloc``). The loop index ``i`` counts from 0 and the cycle
  stops once ``i >= rate`` after an allocation, so a full cycle takes ``rate + 1`` pages.
  Each page: allocate, LOCK. A refusal with RESET or PPN_NOTNEEDED frees the page and ends
  the cycle; any other refusal parks it on ``refused_pages`` and takes another page, until 16
  are parked (then the cycle ends). A failed non-sleeping allocation sets
  ``slow_allocation_cycles = 4`` and, unless ``i >= rate_alloc`` already, switches to sleeping
  allocations at ``rate = rate_alloc``; a failed sleeping allocation halves ``rate_alloc``
  (floor 512) and ends the cycle. ``cond_resched`` runs when more than 1024 loop iterations
  passed since the last one. A cycle without error that reached ``i >= rate_alloc`` raises
  ``rate_alloc`` by ``(i // rate_alloc) * 16`` (cap 2048). Refused pages are freed at the end.
- deflate: ``min(size - target, rate_free)`` pages, newest first, UNLOCK *then* free; an UNLOCK
  failure halves ``rate_free`` (floor 512) and ends the cycle, else ``rate_free += 16`` (cap
  16384).
- Any reply RESET (to GUEST_ID, GET_TARGET, LOCK, UNLOCK; START is checked for SUCCESS only)
  sets ``reset_required``. Until the next ``work`` pops them, the host no longer holds the
  driver's pages: they count as transient, not as balloon.
- unload: START (the host forgets the balloon), then pop without UNLOCK.

Batched mode (``batched=True``) offers BASIC_CMDS|BATCHED_CMDS|BATCHED_2M_CMDS at START (without
2 MiB pages when ``huge_pages=False``). If the host grants
BATCHED_CMDS (SUCCESS_WITH_CAPABILITIES), LOCK and UNLOCK go in batches of up to 512 PFNs, as
v4.20+ does; otherwise the driver is the version-2 driver above. What follows v4.20+: a batch
is allocated, then locked in one command; the batch's overall status overrides the per-page
ones; a successful LOCK/UNLOCK reply updates ``target`` from ``result``; the cycle goes on while
``size < target`` and no reset is pending, so the per-cycle cap is the goal, not 16384;
deflation unlocks up to 512 pages per command down to the target; pages the host would not
unlock go back into the balloon. What stays from the seed: non-sleeping allocations first, the
switch to sleeping ones at ``rate_alloc`` pages a cycle after a failure (``i`` counts pages
here, with no off-by-one), the halving of ``rate_alloc`` and ``rate_free``, at most 16 refused
pages held (refusals past 16 in one batch are freed at once) and all freed at cycle end,
RESET and PPN_NOTNEEDED ending a cycle, the reset sequence and unload.

2 MiB pages (v4.20+), used when the host grants BATCHED_2M_CMDS with BATCHED_CMDS
(``supported_page_sizes`` 2): each page size keeps its own balloon and refused lists (the
driver's ``struct vmballoon_page_size``). Inflation starts with 2 MiB pages: wholly free 2 MiB
blocks taken without reclaim (``VMW_HUGE_PAGE_ALLOC_FLAGS``), up to 512 a BATCHED_2M_LOCK;
when a 2 MiB allocation fails, or 16 2 MiB pages were refused (they are freed then), the cycle
goes on with 4 KiB pages. A failed 2 MiB allocation is not memory pressure: it does not touch
the rates. Deflation unlocks 4 KiB pages first, then 2 MiB pages. Where v4.20 would pass the
target (it rounds the last 2 MiB inflate up and keeps a 2 MiB slack on deflate), this driver
inflates whole 2 MiB pages only while one fits under the target and finishes in 4 KiB pages,
and rounds a 2 MiB deflate up (the guest gets at least what the target gives back; the next
cycle refills the difference in 4 KiB pages), so the balloon never holds more than the host
asked for. Not followed: the doorbell and the shrinker.

Replies that do not decode are counted in ``counters`` and treated as FAILURE; ``work`` never
raises for anything the host sends.

In one process with its host (the simulator), a port may take shortcuts that change nothing
but the cost: a ``BulkBackdoor`` takes a run of version-2 LOCKs or UNLOCKs in one call, a
``DirectBackdoor`` takes each command as the message its frame decodes to and answers with
the message its reply decodes to (no bytes either way). Both stay command by command in what
the host sees and answers; a tapped link declines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final, Protocol, cast, runtime_checkable

import numpy as np

from memballoon.guest.memory import GuestMemory
from memballoon.guest.pfndeque import PfnDeque
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import PeerError
from memballoon.model.pages import PfnArray, block_frames, expand_runs, sorted_runs
from memballoon.model.units import PFN32_MAX
from memballoon.protocol.vmw import (
    VMW_BALLOON_2M_ORDER,
    VMW_BALLOON_BATCH_MAX_PAGES,
    VMW_BALLOON_GUEST_ID,
    VMW_BALLOON_PROTOCOL_VERSION,
    Capability,
    Command,
    Request,
    Response,
    Status,
    VmwFrameError,
    batch_request,
    decode_response,
    encode_request,
    scalar_request,
)


class VmwDriverCounter(CounterName):
    """What the VMware driver counts (``counters``): host replies it could not use, and failures."""

    REPLY_SHORT_FRAME = "reply_short_frame"  # replies shorter than their header or entries
    REPLY_LONG_FRAME = "reply_long_frame"  # replies longer than their header and entries
    REPLY_UNKNOWN_STATUS = "reply_unknown_status"  # replies with a status the codec does not know
    REPLY_COUNT_MISMATCH = "reply_count_mismatch"  # replies whose entries do not match the request
    REPLY_PFN_MISMATCH = "reply_pfn_mismatch"  # batch replies that do not echo the request's PFNs
    REPLY_OTHER = "reply_other"  # replies refused for another codec rule (none today)
    BACKDOOR_LINK_CLOSED = "backdoor_LinkClosedError"  # calls over a link to the host that closed
    BACKDOOR_PEER_ERROR = "backdoor_PeerError"  # calls failed by another PeerError
    BACKDOOR_OS_ERROR = "backdoor_OSError"  # calls that failed with an OSError
    LIMIT_OVER_32_BITS = "limit_over_32_bits"  # GET_TARGETs not sent: guest size over 32 bits
    LOAD_FAILED = "load_failed"  # loads that failed (START or GUEST_ID)


#: ``VmwFrameError.reason`` of a reply -> its counter (what ``decode_response`` raises).
_REPLY_COUNTERS: Final = {
    "short_frame": VmwDriverCounter.REPLY_SHORT_FRAME,
    "long_frame": VmwDriverCounter.REPLY_LONG_FRAME,
    "unknown_status": VmwDriverCounter.REPLY_UNKNOWN_STATUS,
    "count_mismatch": VmwDriverCounter.REPLY_COUNT_MISMATCH,
    "pfn_mismatch": VmwDriverCounter.REPLY_PFN_MISMATCH,
}
#: A ``PeerError`` class's name -> its counter (by name: the local link's error lives above
#: the guest package); any other ``PeerError`` counts as ``backdoor_PeerError``.
_BACKDOOR_COUNTERS: Final = {"LinkClosedError": VmwDriverCounter.BACKDOOR_LINK_CLOSED}

# The seed's constants (vmw_balloon.c v2.6.34), in pages or pages per second.
VMW_BALLOON_NOSLEEP_ALLOC_MAX = 16384
VMW_BALLOON_RATE_ALLOC_MIN = 512
VMW_BALLOON_RATE_ALLOC_MAX = 2048
VMW_BALLOON_RATE_ALLOC_INC = 16
VMW_BALLOON_RATE_FREE_MIN = 512
VMW_BALLOON_RATE_FREE_MAX = 16384
VMW_BALLOON_RATE_FREE_INC = 16
VMW_BALLOON_SLOW_CYCLES = 4
VMW_BALLOON_YIELD_THRESHOLD = 1024  # page allocations without yielding the CPU
VMW_BALLOON_MAX_REFUSED = 16  # refused pages held before a cycle gives up

#: What a batched driver offers at START (v4.20+ ``VMW_BALLOON_CAPABILITIES`` without the
#: doorbell, which the host here replaces with a WAKE message).
BATCHED_DRIVER_CAPABILITIES = (
    Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
)
_2M_PAGES = 1 << VMW_BALLOON_2M_ORDER  # frames in a 2 MiB page


class Backdoor(Protocol):
    """Frames in, frames out: the guest's ``inl`` to the hypervisor."""

    def call(self, request: bytes) -> bytes: ...


@runtime_checkable
class BulkBackdoor(Protocol):
    """A backdoor to a host in the same process that can take a run of version-2 LOCKs or
    UNLOCKs in one call (the simulator's pairs; never a real link): it answers them one by
    one as the host would, stops before the first it would not answer SUCCESS and says how
    many went through. The driver then goes on page by page, so the cycle ends exactly as if
    every page had been its own command."""

    def lock_run(self, pfns: PfnArray) -> int: ...

    def unlock_run(self, pfns: PfnArray) -> int: ...


@runtime_checkable
class DirectBackdoor(Protocol):
    """A backdoor to a host in the same process that takes a command as the message itself
    (the simulator's pairs; never a real link): ``answer(request)`` is the ``Response`` that
    the host's reply to the request's frame decodes to, with the host's state and counters
    of that frame, or None when this command must go as a frame (a tap that sees every one).
    A batch then costs no encoding and parsing of 4 KiB each way."""

    def answer(self, request: Request) -> Response | None: ...


#: Classes of port -> whether they are ``BulkBackdoor``s, ``DirectBackdoor``s (their methods,
#: not their instances, make them one).
_BULK_TYPES: dict[type, bool] = {}
_DIRECT_TYPES: dict[type, bool] = {}


@dataclass(slots=True)
class VmwBalloonStats:
    """The seed's ``struct vmballoon_stats`` (field names as in the seed)."""

    timer: int = 0
    alloc: int = 0
    alloc_fail: int = 0
    sleep_alloc: int = 0
    sleep_alloc_fail: int = 0
    refused_alloc: int = 0
    refused_free: int = 0
    free: int = 0
    lock: int = 0
    lock_fail: int = 0
    unlock: int = 0
    unlock_fail: int = 0
    target: int = 0
    target_fail: int = 0
    start: int = 0
    start_fail: int = 0
    guest_type: int = 0
    guest_type_fail: int = 0
    # v4.20+ ("batchLock", "batchUnlock"); zero in version-2 mode
    batch_lock: int = 0
    batch_lock_fail: int = 0
    batch_unlock: int = 0
    batch_unlock_fail: int = 0
    # v4.20+ 2 MiB pages ("2m-lock", "prim2mAlloc", ...), counted in 2 MiB pages: the 4 KiB
    # field's name + "_2m"
    batch_lock_2m: int = 0
    batch_lock_fail_2m: int = 0
    batch_unlock_2m: int = 0
    batch_unlock_fail_2m: int = 0
    alloc_2m: int = 0
    alloc_fail_2m: int = 0
    free_2m: int = 0
    refused_alloc_2m: int = 0
    refused_free_2m: int = 0


_SEED_STAT_NAMES: Final = tuple(f.name for f in fields(VmwBalloonStats))


# debugfs ``vmmemctl`` lines: (name, count field, failed field or None), in the seed's order
_DEBUGFS_COUNTERS: tuple[tuple[str, str, str | None], ...] = (
    ("timer", "timer", None),
    ("start", "start", "start_fail"),
    ("guestType", "guest_type", "guest_type_fail"),
    ("lock", "lock", "lock_fail"),
    ("unlock", "unlock", "unlock_fail"),
    ("target", "target", "target_fail"),
    ("primNoSleepAlloc", "alloc", "alloc_fail"),
    ("primCanSleepAlloc", "sleep_alloc", "sleep_alloc_fail"),
    ("primFree", "free", None),
    ("errAlloc", "refused_alloc", None),
    ("errFree", "refused_free", None),
)
_BATCH_COUNTERS: tuple[tuple[str, str, str | None], ...] = (
    ("batchLock", "batch_lock", "batch_lock_fail"),
    ("batchUnlock", "batch_unlock", "batch_unlock_fail"),
)
_2M_COUNTERS: tuple[tuple[str, str, str | None], ...] = (
    ("2m-lock", "batch_lock_2m", "batch_lock_fail_2m"),
    ("2m-unlock", "batch_unlock_2m", "batch_unlock_fail_2m"),
    ("prim2mAlloc", "alloc_2m", "alloc_fail_2m"),
    ("prim2mFree", "free_2m", None),
    ("err2mAlloc", "refused_alloc_2m", None),
    ("err2mFree", "refused_free_2m", None),
)


def frames_of(heads: PfnArray) -> PfnArray:
    """Every frame of the 2 MiB pages starting at ``heads``, page by page."""
    return block_frames(heads >> VMW_BALLOON_2M_ORDER, VMW_BALLOON_2M_ORDER)


class PfnStack:
    """A stack of PFNs (the seed's ``pages`` list, newest on top), kept as runs of consecutive
    frames in a ``PfnDeque``: a balloon of millions of pages is a few runs, not 8 bytes a page
    (a thousand simulated guests)."""

    __slots__ = ("_d",)

    def __init__(self, capacity: int = 0) -> None:
        self._d = PfnDeque()  # ``capacity``: kept for callers; runs need no reservation

    def __len__(self) -> int:
        return len(self._d)

    def push(self, pfn: int) -> None:
        self._d.push_back(np.array([pfn], dtype=np.int64))

    def extend(self, pfns: PfnArray) -> None:
        self._d.push_back(pfns)

    def top(self) -> int:
        return self._d.newest()

    def peek(self, k: int) -> PfnArray:
        """The ``k`` newest PFNs (a copy), newest first."""
        return self._d.tail(k)[::-1]

    def pop(self, k: int = 1) -> PfnArray:
        """Remove and return the ``k`` newest PFNs, newest first."""
        return self._d.pop_back(k)[::-1]

    def pop_runs(self, k: int) -> list[tuple[int, int]]:
        """Remove the ``k`` newest PFNs; returns them as ``(first, length)`` runs of
        consecutive frames, oldest first (``pop(k)`` reversed, as runs)."""
        return self._d.pop_back_runs(k)

    def to_array(self) -> PfnArray:
        return self._d.to_array()

    def runs(self) -> tuple[PfnArray, PfnArray]:
        """The runs of consecutive frames held, oldest first: first frames and lengths."""
        return self._d.runs()


# enum members as module constants: member lookups are slow on 3.11, paid once per page here
_SUCCESS, _ERROR_RESET, _ERROR_PPN_NOTNEEDED = (
    Status.SUCCESS, Status.ERROR_RESET, Status.ERROR_PPN_NOTNEEDED
)
_LOCK, _UNLOCK, _GET_TARGET = Command.LOCK, Command.UNLOCK, Command.GET_TARGET
# and as plain ints for numpy: it probes an enum member for array protocols on every use
_I_SUCCESS, _I_ERROR_RESET, _I_ERROR_PPN_NOTNEEDED = (
    int(_SUCCESS), int(_ERROR_RESET), int(_ERROR_PPN_NOTNEEDED))
_FAILED = Response(Status.FAILURE)  # what a reply that does not decode reads as

_NO_PAGES: PfnArray = np.empty(0, dtype=np.int64)
_OK = 0
_ENOMEM = 1  # a page allocation failed
_EIO = 2  # the host refused: stop this cycle


class PageSize:
    """One page size's balloon: the v4.20+ driver's ``struct vmballoon_page_size``."""

    __slots__ = ("frames", "lock", "n_refused_pages", "pages", "refused_pages", "stat_suffix",
                 "unlock")

    def __init__(self, frames: int, lock: Command, unlock: Command, stat_suffix: str) -> None:
        self.frames = frames  # 4 KiB frames in one page: 1, or 512 for 2 MiB
        self.lock, self.unlock = lock, unlock  # its batched commands
        self.stat_suffix = stat_suffix  # its VmwBalloonStats fields: the 4 KiB name + this
        self.pages = PfnStack()  # first frames, newest on top
        self.refused_pages = PfnStack(VMW_BALLOON_MAX_REFUSED)
        self.n_refused_pages = 0

    def frames_of(self, pfns: PfnArray) -> PfnArray:
        """Every frame of the pages starting at ``pfns``."""
        return pfns if self.frames == 1 else frames_of(pfns)

    def free(self, mem: GuestMemory, pfns: PfnArray) -> None:
        """Give the pages starting at ``pfns`` back to the guest (2 MiB ones a block each,
        not a list of their frames)."""
        if self.frames == 1:
            mem.free_balloon(pfns)
        else:
            mem.free_balloon_blocks(pfns)


class VmwBalloonDriver:
    """The seed's VMware balloon driver over a ``GuestMemory`` (see the module docstring)."""

    period_s: float = 1.0

    def __init__(
        self,
        mem: GuestMemory,
        port: Backdoor,
        *,
        batched: bool = False,
        huge_pages: bool = True,
        cond_resched: Callable[[], None] | None = None,
    ) -> None:
        self.mem = mem
        self.port = port
        self.batched = batched
        self.huge_pages = huge_pages  # offer 2 MiB pages in batched mode
        self.cond_resched = cond_resched
        self.counters = Counters()
        self.seed_stats = VmwBalloonStats()
        # the seed's struct vmballoon; v4.20+ keeps one PageSize per page size, the 4 KiB one
        # holding the seed's lists
        self.page_sizes = (
            PageSize(1, Command.BATCHED_LOCK, Command.BATCHED_UNLOCK, ""),
            PageSize(_2M_PAGES, Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK, "_2m"),
        )
        self.pages = self.page_sizes[0].pages
        self.refused_pages = self.page_sizes[0].refused_pages
        self.size = 0
        self.target = 0
        self.reset_required = False
        self.rate_alloc = VMW_BALLOON_RATE_ALLOC_MAX
        self.rate_free = VMW_BALLOON_RATE_FREE_MAX
        self.slow_allocation_cycles = 0
        # v4.20+
        self.capabilities = Capability(0)
        self.batch_max_pages = 1
        self.supported_page_sizes = 1  # 2: 4 KiB and 2 MiB pages
        self.loaded = False

    @property
    def n_refused_pages(self) -> int:
        """The seed's count of refused 4 KiB pages held this cycle."""
        return self.page_sizes[0].n_refused_pages

    @n_refused_pages.setter
    def n_refused_pages(self, n: int) -> None:
        self.page_sizes[0].n_refused_pages = n

    def _stat(self, ps: PageSize, name: str, n: int = 1) -> None:
        """Add ``n`` to the statistic ``name`` of page size ``ps``."""
        name += ps.stat_suffix
        setattr(self.seed_stats, name, getattr(self.seed_stats, name) + n)

    # ------------------------------------------------------------------ the backdoor
    def _cmd(self, req: Request) -> Response:
        """One command; a reply that does not decode is counted and read as FAILURE."""
        port = self.port
        direct = _DIRECT_TYPES.get(type(port))
        if direct is None:  # a runtime Protocol check costs ~10 us: once per class of port
            direct = _DIRECT_TYPES[type(port)] = isinstance(port, DirectBackdoor)
        if direct:
            resp = cast(DirectBackdoor, port).answer(req)
            if resp is not None:
                return resp
        try:
            frame = port.call(encode_request(req))
            return decode_response(frame, req)
        except VmwFrameError as exc:
            self.counters.inc(_REPLY_COUNTERS.get(exc.reason, VmwDriverCounter.REPLY_OTHER))
        except PeerError as exc:
            self.counters.inc(_BACKDOOR_COUNTERS.get(type(exc).__name__,
                                                     VmwDriverCounter.BACKDOOR_PEER_ERROR))
        except OSError:
            self.counters.inc(VmwDriverCounter.BACKDOOR_OS_ERROR)
        return _FAILED

    def _check_status(self, status: Status) -> bool:
        # the seed's vmballoon_check_status: RESET means the host wants the reset sequence
        if status is _SUCCESS:
            return True
        if status is _ERROR_RESET:
            self.reset_required = True
        return False

    def _send_start(self) -> bool:
        self.seed_stats.start += 1
        offer: int = VMW_BALLOON_PROTOCOL_VERSION
        if self.batched:
            offer = BATCHED_DRIVER_CAPABILITIES
            if not self.huge_pages:
                offer &= ~Capability.BATCHED_2M_CMDS
        resp = self._cmd(scalar_request(Command.START, int(offer)))
        if resp.status is Status.SUCCESS_WITH_CAPABILITIES and self.batched:
            self.capabilities = Capability(resp.result & int(offer))
        elif resp.status is Status.SUCCESS:
            self.capabilities = Capability.BASIC_CMDS
        else:
            self.seed_stats.start_fail += 1
            return False
        use_batches = bool(self.capabilities & Capability.BATCHED_CMDS)
        self.batch_max_pages = VMW_BALLOON_BATCH_MAX_PAGES if use_batches else 1
        # 2 MiB pages only with batches (v4.20+: the legacy commands cannot carry them)
        huge = use_batches and bool(self.capabilities & Capability.BATCHED_2M_CMDS)
        self.supported_page_sizes = 2 if huge else 1
        return True

    def _send_guest_id(self) -> bool:
        resp = self._cmd(scalar_request(Command.GUEST_ID, VMW_BALLOON_GUEST_ID))
        self.seed_stats.guest_type += 1
        if self._check_status(resp.status):
            return True
        self.seed_stats.guest_type_fail += 1
        return False

    def _send_get_target(self) -> int | None:
        # the seed's si_meminfo() totalram: the pages the kernel manages (MemTotal), not every
        # frame; this driver never takes its balloon out of it (no adjust_managed_page_count)
        limit = self.mem.managed_pages
        if limit > PFN32_MAX:
            self.counters.inc(VmwDriverCounter.LIMIT_OVER_32_BITS)
            return None
        self.seed_stats.target += 1
        resp = self._cmd(scalar_request(_GET_TARGET, limit))
        if self._check_status(resp.status):
            return resp.result & PFN32_MAX  # the seed stores it in a u32
        self.seed_stats.target_fail += 1
        return None

    def _send_lock_page(self, pfn: int) -> tuple[bool, Status | None]:
        if pfn > PFN32_MAX:
            return False, None  # the seed: no command, no status
        self.seed_stats.lock += 1
        status = self._cmd(scalar_request(_LOCK, pfn)).status
        if self._check_status(status):
            return True, status
        self.seed_stats.lock_fail += 1
        return False, status

    def _send_unlock_page(self, pfn: int) -> bool:
        if pfn > PFN32_MAX:
            return False
        self.seed_stats.unlock += 1
        if self._check_status(self._cmd(scalar_request(_UNLOCK, pfn)).status):
            return True
        self.seed_stats.unlock_fail += 1
        return False

    # ------------------------------------------------------------------ lifecycle
    def load(self, now: float) -> None:
        """START then GUEST_ID; if either fails the driver stays unloaded (``loaded`` False)."""
        self.loaded = self._send_start() and self._send_guest_id()
        if not self.loaded:
            self.counters.inc(VmwDriverCounter.LOAD_FAILED)

    def unload(self, now: float) -> None:
        """START first (the host forgets the balloon), then pop every page without UNLOCK."""
        if self.loaded:
            self._send_start()
        self._pop()
        self.loaded = False

    def work(self, now: float) -> None:
        if not self.loaded:
            return
        self.seed_stats.timer += 1
        if self.reset_required:
            self._reset()
        if self.slow_allocation_cycles > 0:
            self.slow_allocation_cycles -= 1
        target = self._send_get_target()
        if target is None:
            return
        self.target = target
        if self.size < target:
            self._inflate_batched() if self.batch_max_pages > 1 else self._inflate()
        elif self.size > target:
            self._deflate_batched() if self.batch_max_pages > 1 else self._deflate()

    def quiet(self) -> bool:
        """The next ``work`` finds nothing to do if the host answers GET_TARGET with the
        balloon's size again: loaded, no reset pending, the balloon at the target read last."""
        return (self.loaded and not self.reset_required and self.size == self.target
                and self.mem.total_pages <= PFN32_MAX)

    def idle_work(self, now: float) -> None:
        """What ``work`` does in a quiet period (``quiet`` held and GET_TARGET answered the
        size again): it counts its timer and the GET_TARGET, and one slow cycle passes. The
        simulator accounts the periods a quiet guest sleeps through with this."""
        self.seed_stats.timer += 1
        if self.slow_allocation_cycles > 0:
            self.slow_allocation_cycles -= 1
        self.seed_stats.target += 1

    def idle_run(self, now: float, period: float, limit: float) -> tuple[float, int]:
        """``idle_work`` of every period after ``now`` whose time falls at or before
        ``limit``, in one call: returns the last period's time (``now`` plus ``period`` as
        many times, added one at a time as the calls would be) and how many."""
        n = 0
        while now + period <= limit:
            now += period
            n += 1
        st = self.seed_stats
        st.timer += n
        if self.slow_allocation_cycles > 0:
            self.slow_allocation_cycles = max(0, self.slow_allocation_cycles - n)
        st.target += n
        return now, n

    def _yield(self) -> None:
        if self.cond_resched is not None:
            self.cond_resched()

    def _pop(self) -> None:
        """Free every ballooned page without telling the host (reset, unload)."""
        huge = self.page_sizes[1]
        heads = huge.pages.pop(len(huge.pages))
        if heads.size:
            huge.free(self.mem, heads)
            self._stat(huge, "free", int(heads.size))
            self.size -= int(heads.size) * huge.frames
        rate = max(1, self.rate_free)
        while len(self.pages):
            chunk = self.pages.pop(rate)
            self.mem.free_balloon(chunk)
            self.seed_stats.free += int(chunk.size)
            self.size -= int(chunk.size)
            if chunk.size == rate:  # the seed yields after every rate_free pages
                self._yield()

    def _reset(self) -> None:
        self._pop()
        if self._send_start():
            self.reset_required = False
            self._send_guest_id()

    # ------------------------------------------------------------------ version 2
    def _alloc_one(self, can_sleep: bool) -> PfnArray:
        if can_sleep:
            self.seed_stats.sleep_alloc += 1
            got = self.mem.alloc_sleep(1)
            if got.size == 0:
                self.seed_stats.sleep_alloc_fail += 1
        else:
            self.seed_stats.alloc += 1
            got = self.mem.alloc_nosleep(1)
            if got.size == 0:
                self.seed_stats.alloc_fail += 1
        return got

    def _reserve_page(self, can_sleep: bool, taken: int = -1) -> int:
        """The seed's allocate-and-lock of one page; ``taken``: the first allocation's frame,
        already taken (and counted) by a bulk run (``_lock_run``)."""
        while True:
            if taken >= 0:
                page = np.array([taken], dtype=np.int64)
                taken = -1
            else:
                page = self._alloc_one(can_sleep)
            if page.size == 0:
                return _ENOMEM
            pfn = int(page[0])
            locked, hv_status = self._send_lock_page(pfn)
            if locked:
                self.pages.push(pfn)
                self.size += 1
                return _OK
            self.seed_stats.refused_alloc += 1
            if hv_status is _ERROR_RESET or hv_status is _ERROR_PPN_NOTNEEDED:
                self.mem.free_balloon(page)
                return _EIO
            # keep the page so the allocator does not hand it back; try another one
            self.refused_pages.push(pfn)
            self.n_refused_pages += 1
            if self.n_refused_pages >= VMW_BALLOON_MAX_REFUSED:
                return _EIO

    def _allocation_failed(self, i: int, can_sleep: bool) -> bool:
        """The seed's rule for a failed allocation after ``i`` this cycle; True: stop the cycle.

        A failed sleeping allocation is severe pressure: halve rate_alloc (never under
        VMW_BALLOON_RATE_ALLOC_MIN) and stop. A failed non-sleeping one is pressure: slow down
        for VMW_BALLOON_SLOW_CYCLES cycles; stop if the cycle already took rate_alloc pages,
        else the caller goes on with sleeping allocations at rate_alloc.
        """
        if can_sleep:
            self.rate_alloc = max(self.rate_alloc // 2, VMW_BALLOON_RATE_ALLOC_MIN)
            return True
        self.slow_allocation_cycles = VMW_BALLOON_SLOW_CYCLES
        return i >= self.rate_alloc

    def _grow_rate_alloc(self, error: int, i: int) -> None:
        """A cycle that ended without error after rate_alloc pages raises the rate (seed)."""
        if error == _OK and i >= self.rate_alloc:
            mult = i // self.rate_alloc
            self.rate_alloc = min(
                self.rate_alloc + mult * VMW_BALLOON_RATE_ALLOC_INC, VMW_BALLOON_RATE_ALLOC_MAX
            )

    def _inflate(self) -> None:
        goal = self.target - self.size
        rate = self.rate_alloc if self.slow_allocation_cycles else VMW_BALLOON_NOSLEEP_ALLOC_MAX
        can_sleep = False
        error = _OK
        allocations = 0
        i = 0
        bulk = self._bulk() is not None and self.mem.host_page_frames == 1
        while i < goal:
            if bulk:
                # the pages up to the cycle's end that the allocator gives (sleeping ones with
                # the reclaims they need) and the host takes, in one go (a bulk host), as the
                # loop below would take them; the page where that stops (a refusal, none left
                # without sleeping) goes on its own, or the cycle fails as the seed's would
                want = min(goal, rate + 1) - i
                n, taken, failed = self._lock_run(want, can_sleep)
                if n:
                    error = _OK
                    allocations += n
                    for _ in range(allocations // (VMW_BALLOON_YIELD_THRESHOLD + 1)):
                        self._yield()
                    allocations %= VMW_BALLOON_YIELD_THRESHOLD + 1
                    if i + n > rate:  # its last page was the one at i == rate: the seed stops
                        i = rate
                        break
                    i += n
                    if n == want:
                        break
                if failed:  # a sleeping allocation found nothing: the seed's ENOMEM
                    error = _ENOMEM
                    self._allocation_failed(i, can_sleep)
                    break
            else:
                taken = -1
            error = self._reserve_page(can_sleep, taken)
            if error != _OK:
                if error != _ENOMEM:
                    break  # the host said stop; maybe a new target comes soon
                if self._allocation_failed(i, can_sleep):
                    break
                can_sleep = True
                rate = self.rate_alloc
            allocations += 1
            if allocations > VMW_BALLOON_YIELD_THRESHOLD:
                self._yield()
                allocations = 0
            if i >= rate:
                break
            i += 1
        self._grow_rate_alloc(error, i)
        self._release_refused(self.page_sizes[0])  # the seed's vmballoon_release_refused_pages

    def _deflate(self) -> None:
        goal = min(self.size - self.target, self.rate_free)  # >= 1: size > target
        i = self._unlock_run(min(goal, len(self.pages)))
        while len(self.pages) and i < goal:
            pfn = self.pages.top()
            if not self._send_unlock_page(pfn):
                self.rate_free = max(self.rate_free // 2, VMW_BALLOON_RATE_FREE_MIN)
                return
            self.mem.free_balloon(self.pages.pop(1))
            self.seed_stats.free += 1
            self.size -= 1
            i += 1
        self.rate_free = min(self.rate_free + VMW_BALLOON_RATE_FREE_INC, VMW_BALLOON_RATE_FREE_MAX)

    def _bulk(self) -> BulkBackdoor | None:
        """The port, when it takes runs of single-page commands (module BulkBackdoor)."""
        port = self.port
        bulk = _BULK_TYPES.get(type(port))
        if bulk is None:  # a runtime Protocol check costs ~10 us: once per class of port
            bulk = _BULK_TYPES[type(port)] = isinstance(port, BulkBackdoor)
        if bulk and self.mem.total_pages <= PFN32_MAX:
            return cast(BulkBackdoor, port)
        return None

    def _lock_run(self, k: int, can_sleep: bool = False) -> tuple[int, int, bool]:
        """The next ``k`` pages of an inflate cycle, allocated and locked, in one go as far
        as every one would succeed; returns how many, the frame of a sleeping allocation that
        reclaimed when the host would not lock it (taken and counted: the caller locks it the
        seed's way) or -1, and whether a sleeping allocation found nothing (counted; the
        caller fails the cycle as the seed does). Non-sleeping allocations stop where one
        would find no frame above the min watermark; sleeping ones reclaim as they would one
        at a time (``GuestMemory.alloc_sleep_each``)."""
        port = self._bulk()
        if port is None or self.mem.host_page_frames != 1:
            return 0, -1, False
        mem = self.mem
        stats = self.seed_stats
        taken, failed = -1, False
        if can_sleep:
            frames, taken, failed = mem.alloc_sleep_each(k, port.lock_run)
            stats.sleep_alloc += int(frames.size) + (taken >= 0) + failed
            if failed:
                stats.sleep_alloc_fail += 1
        else:
            k = min(k, mem.free_pages - mem.watermarks.min)  # past that: none
            if k <= 0:
                return 0, -1, False
            frames = mem.alloc_nosleep_each(k, port.lock_run)
            stats.alloc += int(frames.size)
        n = int(frames.size)
        if n:
            self.pages.extend(frames)
            self.size += n
            stats.lock += n
        return n, taken, failed

    def _unlock_run(self, k: int) -> int:
        """The first ``k`` pages of a deflate cycle, newest first, unlocked and freed in one
        go as far as every one would succeed; returns how many."""
        port = self._bulk()
        if port is None or k <= 0:
            return 0
        n = port.unlock_run(self.pages.peek(k))
        if n:
            # as the stack's runs: a slice of the guest's state each, not a list of frames
            self.mem.free_balloon_runs(self.pages.pop_runs(n))
            self.seed_stats.unlock += n
            self.seed_stats.free += n
            self.size -= n
        return n

    # ------------------------------------------------------------------ batched (v4.20+)
    def _alloc_batch(self, n: int, can_sleep: bool) -> PfnArray:
        got = self.mem.alloc_sleep(n) if can_sleep else self.mem.alloc_nosleep(n)
        short = got.size < n
        if can_sleep:
            self.seed_stats.sleep_alloc += int(got.size) + short
            self.seed_stats.sleep_alloc_fail += short
        else:
            self.seed_stats.alloc += int(got.size) + short
            self.seed_stats.alloc_fail += short
        return got

    def _alloc_batch_2m(self, n: int) -> PfnArray:
        got = self.mem.alloc_huge(n)
        short = got.size < n
        self.seed_stats.alloc_2m += int(got.size) + short
        self.seed_stats.alloc_fail_2m += short
        return got

    def _free_refused(self, ps: PageSize, pfns: PfnArray) -> None:
        ps.free(self.mem, pfns)
        self._stat(ps, "refused_free", int(pfns.size))

    def _lock_batch(self, ps: PageSize, pfns: PfnArray) -> int:
        """A batched LOCK of ``pfns`` of size ``ps``; _OK, or _EIO when the cycle must end.

        Refused pages are held (at most 16 of each size; the rest freed at once) so the
        allocator does not hand them back; the caller decides what 16 held pages mean.
        """
        self._stat(ps, "batch_lock")
        resp = self._cmd(batch_request(ps.lock, pfns))
        if not self._check_status(resp.status):
            # the batch's status overrides the pages' ones
            self._stat(ps, "batch_lock_fail")
            self._stat(ps, "refused_alloc", int(pfns.size))
            ps.free(self.mem, pfns)
            return _EIO
        self.target = resp.result & PFN32_MAX  # v4.20+: LOCK replies carry the target
        if not resp.statuses.any():  # every page locked (SUCCESS is 0): the usual answer
            ps.pages.extend(pfns)
            self.size += int(pfns.size) * ps.frames
            return _OK
        ok = resp.statuses == _I_SUCCESS
        ps.pages.extend(pfns[ok])
        self.size += int(ok.sum()) * ps.frames
        refused = pfns[~ok]
        if refused.size == 0:
            return _OK
        self._stat(ps, "refused_alloc", int(refused.size))
        codes = resp.statuses[~ok]
        stop = bool(np.isin(codes, (_I_ERROR_RESET, _I_ERROR_PPN_NOTNEEDED)).any())
        if bool((codes == _I_ERROR_RESET).any()):
            self.reset_required = True
        room = max(0, VMW_BALLOON_MAX_REFUSED - ps.n_refused_pages)
        keep, drop = refused[:room], refused[room:]
        if keep.size:
            ps.refused_pages.extend(keep)
            ps.n_refused_pages += int(keep.size)
        if drop.size:
            self._free_refused(ps, drop)
        return _EIO if stop else _OK

    def _release_refused(self, ps: PageSize) -> None:
        k = len(ps.refused_pages)
        if k:
            self._free_refused(ps, ps.refused_pages.pop(k))
        ps.n_refused_pages = 0

    def _inflate_batched(self) -> None:
        small, huge = self.page_sizes
        rate = self.rate_alloc if self.slow_allocation_cycles else None  # None: up to the goal
        can_sleep = False
        error = _OK
        i = 0  # frames allocated this cycle
        use_2m = self.supported_page_sizes == 2  # v4.20+ starts with 2 MiB pages
        while self.size < self.target and not self.reset_required:
            if use_2m:
                # whole 2 MiB pages while one fits under the target (and the rate)
                want = min(self.batch_max_pages, (self.target - self.size) // huge.frames)
                if rate is not None:
                    want = min(want, (rate - i) // huge.frames)
                got = self._alloc_batch_2m(want) if want > 0 else _NO_PAGES
                i += int(got.size) * huge.frames
                error = self._lock_batch(huge, got) if got.size else _OK
                if error != _OK:
                    break
                if got.size < want or want <= 0 or (
                        huge.n_refused_pages >= VMW_BALLOON_MAX_REFUSED):
                    # no 2 MiB page (left, free or wanted): go on with 4 KiB pages
                    self._release_refused(huge)
                    use_2m = False
                if got.size:
                    self._yield()
                continue
            want = min(self.batch_max_pages, self.target - self.size)
            if rate is not None:
                want = min(want, rate - i)
            if want <= 0:
                break
            got = self._alloc_batch(want, can_sleep)
            i += int(got.size)
            error = self._lock_batch(small, got) if got.size else _OK
            if error == _OK and small.n_refused_pages >= VMW_BALLOON_MAX_REFUSED:
                error = _EIO
            if error != _OK:
                break
            if got.size < want:
                error = _ENOMEM
                if self._allocation_failed(i, can_sleep):
                    break
                can_sleep = True
                rate = self.rate_alloc
            self._yield()  # v4.20+ yields after every batch
        self._grow_rate_alloc(error, i)
        self._release_refused(small)
        self._release_refused(huge)

    def _unlock_batch(self, ps: PageSize) -> bool:
        """One batched UNLOCK of size ``ps`` toward the target; False when deflation must stop."""
        # 2 MiB pages round up: the guest gets back at least what the target frees
        want = -(-(self.size - self.target) // ps.frames)
        batch = ps.pages.pop(min(self.batch_max_pages, want))
        self._stat(ps, "batch_unlock")
        resp = self._cmd(batch_request(ps.unlock, batch))
        if not self._check_status(resp.status):
            self._stat(ps, "batch_unlock_fail")
            ps.pages.extend(batch[::-1])  # back into the balloon, order kept
            self.rate_free = max(self.rate_free // 2, VMW_BALLOON_RATE_FREE_MIN)
            return False
        self.target = resp.result & PFN32_MAX
        every = not resp.statuses.any()  # every page unlocked (SUCCESS is 0): the usual answer
        freed = batch if every else batch[resp.statuses == _I_SUCCESS]
        if freed.size:
            # the stack's newest first: reversed, ascending (the guest's cheap case)
            ps.free(self.mem, freed[::-1] if freed[0] > freed[-1] else freed)
            self._stat(ps, "free", int(freed.size))
            self.size -= int(freed.size) * ps.frames
        if not every:
            # v4.20+: pages the host would not unlock go back into the balloon
            ps.pages.extend(batch[resp.statuses != _I_SUCCESS][::-1])
            if bool((resp.statuses == _I_ERROR_RESET).any()):
                self.reset_required = True
            self.rate_free = max(self.rate_free // 2, VMW_BALLOON_RATE_FREE_MIN)
            return False
        return True

    def _deflate_batched(self) -> None:
        # v4.20+: 4 KiB pages first, then 2 MiB pages
        for ps in self.page_sizes[: self.supported_page_sizes]:
            while self.size > self.target and not self.reset_required and len(ps.pages):
                if not self._unlock_batch(ps):
                    return
                self._yield()
        self.rate_free = min(self.rate_free + VMW_BALLOON_RATE_FREE_INC, VMW_BALLOON_RATE_FREE_MAX)

    # ------------------------------------------------------------------ BalloonDriver
    @property
    def balloon_pages(self) -> int:
        """Pages the host holds: none once it answered RESET (until the pop)."""
        return 0 if self.reset_required else self.size

    @property
    def target_pages(self) -> int:
        return self.target

    def balloon_pfns(self) -> PfnArray:
        if self.reset_required:
            return _NO_PAGES
        return sorted_runs(*self._runs(held=True, refused=False))

    def _runs(self, *, held: bool, refused: bool) -> tuple[PfnArray, PfnArray]:
        """Runs of frames (first frames, lengths) of the balloon lists (``held``) and the
        refused ones: sorting a balloon of millions of frames costs its runs then."""
        starts: list[PfnArray] = []
        lens: list[PfnArray] = []
        for ps in self.page_sizes:
            for stack, on in ((ps.pages, held), (ps.refused_pages, refused)):
                if not on:
                    continue
                s, n = stack.runs()
                if ps.frames > 1:  # a run of 2 MiB pages: each page a run of its frames
                    s = expand_runs(s, n)
                    n = np.full(s.size, ps.frames, dtype=np.int64)
                starts.append(s)
                lens.append(n)
        return np.concatenate(starts), np.concatenate(lens)

    def transient_pfns(self) -> PfnArray:
        # while a reset is pending, the balloon too: the host forgot it; the next work pops
        return sorted_runs(*self._runs(held=self.reset_required, refused=True))

    def _seed_counts(self) -> dict[str, int]:
        # a flat dict of ints: dataclasses.asdict deep-copies and costs 0.2 ms a call, once per
        # pressure report (the simulator makes thousands a second)
        st = self.seed_stats
        return {name: getattr(st, name) for name in _SEED_STAT_NAMES}

    def stats(self) -> dict[str, int]:
        """The seed's statistics by their ``vmmemctl`` names ("<name>Failed" for failures)."""
        s = self._seed_counts()
        out: dict[str, int] = {
            "current": self.size,
            "rateNoSleepAlloc": VMW_BALLOON_NOSLEEP_ALLOC_MAX,
            "rateSleepAlloc": self.rate_alloc,
            "rateFree": self.rate_free,
        }
        for name, count, failed in _DEBUGFS_COUNTERS + _BATCH_COUNTERS + _2M_COUNTERS:
            out[name] = s[count]
            if failed is not None:
                out[f"{name}Failed"] = s[failed]
        return out

    def vmmemctl_text(self) -> str:
        """The statistics in the seed's debugfs ``vmmemctl`` format (vmballoon_debug_show)."""
        s = self._seed_counts()
        lines = [
            f"{'target:':<20}{self.target:>8} pages",
            f"{'current:':<20}{self.size:>8} pages",
            f"{'rateNoSleepAlloc:':<20}{VMW_BALLOON_NOSLEEP_ALLOC_MAX:>8} pages/sec",
            f"{'rateSleepAlloc:':<20}{self.rate_alloc:>8} pages/sec",
            f"{'rateFree:':<20}{self.rate_free:>8} pages/sec",
            "",
        ]
        rows = _DEBUGFS_COUNTERS + (_BATCH_COUNTERS if self.batch_max_pages > 1 else ())
        rows += _2M_COUNTERS if self.supported_page_sizes == 2 else ()
        for name, count, failed in rows:
            line = f"{name + ':':<20}{s[count]:>8}"
            if failed is not None:
                line += f" ({s[failed]:>4} failed)"
            lines.append(line)
        return "\n".join(lines) + "\n"
