"""The guest's virtio-balloon driver, after Linux drivers/virtio/virtio_balloon.c.

Theory of operation
-------------------
``load`` negotiates features, lays the queues, PFN arrays and stats buffer out in a driver
area inside the guest's reserved frames (default at 1 MiB: never allocatable, so the balloon
can never take its own rings) and tells the device where they are. Each ``work`` call is one
run of Linux's ``update_balloon_size_func`` re-queued until done:

1. collect what the device used (complete inflates and deflates, refill the stats buffer the
   device handed back);
2. read the config; with the private HOST_RESET bit, a new ``x_reset_generation`` means the
   host took the balloon back: drop every frame WITHOUT telling the device, then ack (once
   every inflate buffer sent before is back: until the ack the device takes nothing, and
   those frames are dropped with the rest; the loop of step 3 stops when it sees a reset);
3. inflate (``fill_balloon``) or deflate (``leak_balloon``) in buffers of at most
   VIRTIO_BALLOON_ARRAY_PFNS_MAX PFNs until the target is reached or an allocation fails
   ("Out of puff!": Linux sleeps 200 ms and tries again, hence ``period_s`` = 0.2);
4. write ``actual``;
5. with REPORTING, every PAGE_REPORTING_DELAY seconds report free 2 MiB blocks
   (mm/page_reporting.c).

Never assume the device is synchronous: a buffer is complete only when it shows up in the used
ring. Until then its frames are transient (``transient_pfns``): an inflate's frames are not in
the balloon yet; a deflate's frames, with MUST_TELL_HOST, are not given back to the guest yet
(without it the host does not care, so they go back at once, as the spec allows).

Without DEFLATE_ON_OOM the balloon lowers MemTotal (Linux ``adjust_managed_page_count``);
with it MemTotal stays and an OOM notifier deflates VIRTIO_BALLOON_OOM_NR_PAGES per call.

Arrays hold VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) PFNs as in Linux unless ``array_pfns`` says
otherwise: the spec sets no limit and QEMU's device takes any length, and a guest whose host
backs its RAM with 2 MiB pages sends ``HUGE_ARRAY_PFNS`` (sixteen whole host pages) an array,
as there the cost of a buffer, not of the memory behind it, bounds the speed (the local
world's choice, said in its output). Several arrays are filled from one allocation and made
available with one doorbell (``FILL_BATCH``).

With the private HOST_REFUSE bit, each inflate buffer gets a status byte per PFN; refused
frames are kept aside (so the allocator does not hand them out again) and freed once the
target is reached or the work call ends.

The device is untrusted: a malformed config or used-ring entry is counted in ``counters`` and
survived; a used ring that breaks stops that queue, its frames stay transient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from memballoon.guest.memory import BLOCK_PAGES, GuestMemory
from memballoon.guest.pfndeque import PfnDeque
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import DescriptorError, DeviceConfigError, PeerError, UsageError
from memballoon.model.pages import (
    PfnArray,
    RangeArray,
    ascending_ranges,
    run_list_frames,
    run_list_ranges,
    sorted_pfns,
)
from memballoon.model.units import HPAGE_PMD_NR, KIB, MIB, PAGE_SIZE
from memballoon.protocol.virtio_balloon import (
    OFFSET_ACTUAL,
    OFFSET_X_RESET_ACK,
    STAT_ENTRY_BYTES,
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_OOM_NR_PAGES,
    VIRTIO_BALLOON_S_NR,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
    VIRTIO_BALLOON_X_STATUS_REFUSED,
    VIRTIO_BALLOON_X_STATUS_TAKEN,
    VIRTIO_F_VERSION_1,
    BalloonConfig,
    BalloonQueue,
    StatTag,
    encode_stats,
    encode_u32,
    features_of,
    has,
    queue_indices,
)
from memballoon.protocol.virtio_transport import BulkRounds, DirectTransport, VirtioTransport
from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout


class VirtioDriverCounter(CounterName):
    """What the virtio driver counts (``counters``; its ``DriverQueue``s add theirs)."""

    QUEUE_UNAVAILABLE = "queue_unavailable"  # queues not set up: size 0 or not a power of 2
    CONFIG_MALFORMED = "config_malformed"  # config space reads that did not decode
    # inflate cycles stopped after VIRTIO_BALLOON_X_MAX_REFUSED new refusals
    REFUSED_LIMIT = "refused_limit"
    INFLATE_QUEUE_FULL = "inflate_queue_full"  # inflates put off: no inflateq, or no free slot
    QUEUE_STALLED = "queue_stalled"  # inflates/deflates put off: the device holds earlier ones
    ALLOC_FAIL = "alloc_fail"  # inflates that got no frame ("Out of puff!")
    INFLATE_BUFFERS = "inflate_buffers"  # buffers sent on the inflateq
    DEFLATE_QUEUE_FULL = "deflate_queue_full"  # deflates put off: no deflateq, or no free slot
    DEFLATE_BUFFERS = "deflate_buffers"  # buffers sent on the deflateq
    DEFLATED_PAGES = "deflated_pages"  # frames given back to the guest (deflate or reset)
    REFUSED_FREED = "refused_freed"  # refused frames freed again
    RESETS = "resets"  # host resets handled (a new x_reset_generation)
    RESET_DROPPED_PAGES = "reset_dropped_pages"  # balloon frames dropped by host resets
    # resets acknowledged a period later: inflate buffers sent before were still out
    RESET_ACK_DEFERRED = "reset_ack_deferred"
    OOM_DEFLATED_PAGES = "oom_deflated_pages"  # frames the OOM notifier gave back
    USED_RING_BROKEN = "used_ring_broken"  # collects that found a queue's used ring broken
    USED_UNEXPECTED = "used_unexpected"  # used buffers the driver had not sent (skipped)
    STATS_REQUESTS = "stats_requests"  # stats buffers the device used (one per stats request)
    REPORTED_BLOCKS = "reported_blocks"  # free 2 MiB blocks reported to the device and returned
    INFLATED_PAGES = "inflated_pages"  # frames the device took into the balloon
    REFUSED_PAGES = "refused_pages"  # frames the device refused (HOST_REFUSE)
    STATUS_UNKNOWN = "status_unknown"  # inflate status bytes neither TAKEN nor REFUSED


#: Linux fill_balloon: "Out of puff! Can't get %u pages" then msleep(200) and retry.
VIRTIO_BALLOON_RETRY_S: Final = 0.2
#: mm/page_reporting.h: delay between reporting passes (2 * HZ) and blocks per report.
PAGE_REPORTING_DELAY_S: Final = 2.0
PAGE_REPORTING_CAPACITY: Final = 32
#: Refused frames kept aside before an inflate cycle gives up (4 buffers' worth): bounds what
#: a device refusing everything can make the guest allocate.
VIRTIO_BALLOON_X_MAX_REFUSED: Final = 4 * VIRTIO_BALLOON_ARRAY_PFNS_MAX
#: Refused frames kept aside across inflate cycles until the target is reached (16 MiB).
VIRTIO_BALLOON_X_MAX_REFUSED_HELD: Final = 4 * VIRTIO_BALLOON_X_MAX_REFUSED

#: The driver asks for at most this queue size (a device may offer up to 32768).
DRIVER_QUEUE_SIZE_MAX: Final = 256
#: How many times the OOM notifier waits for its deflate buffer to be used (each wait is
#: bounded by the transport's own timeout).
OOM_WAIT_TRIES: Final = 20
#: PFN buffers per inflate/deflate queue that may be in flight at once: with HOST_REFUSE's
#: two descriptors a buffer, the whole ring the local host offers (128 descriptors), so the
#: guest fills arrays while the device punches earlier ones and is woken once per half.
PFN_SLOTS: Final = 64
#: Inflate buffers filled from one allocation and made available with one doorbell. Linux
#: tells the host after each array; the spec lets a driver add several before notifying
#: (VIRTIO 1.2 2.7.13), and per-buffer costs in Python (allocate, kick, wait, collect) are
#: what bound a local guest's inflate speed.
FILL_BATCH: Final = 8
RUN_FRAMES_MIN: Final = 64  # frames a run on average, at least, for a give-back a slice a run
FEW_RUNS: Final = 64  # runs of frames, at most, pushed into the balloon one by one
#: The longest array the driver sends: what the device reads of one chain (64 KiB).
X_ARRAY_PFNS_MAX: Final = 16384
#: PFNs an array when the host's pages are 2 MiB: sixteen whole host pages (module docstring;
#: 4096 and 16384 measured slower, docs/engineering-notes.md).
HUGE_ARRAY_PFNS: Final = 16 * HPAGE_PMD_NR

DEFAULT_FEATURES: Final = features_of(
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
    VIRTIO_F_VERSION_1,
)

_EMPTY = np.empty(0, dtype=np.int64)
#: The status bytes of an inflate buffer whose every frame was taken (the longest array's).
_ALL_TAKEN: Final = bytes([VIRTIO_BALLOON_X_STATUS_TAKEN]) * X_ARRAY_PFNS_MAX


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def driver_area_bytes(array_pfns: int = VIRTIO_BALLOON_ARRAY_PFNS_MAX) -> int:
    """Room for the rings (64 KiB: five queues of DRIVER_QUEUE_SIZE_MAX entries and the stats
    buffer) and PFN_SLOTS arrays of ``array_pfns`` PFNs and status bytes per inflate and
    deflate queue; at least 128 KiB."""
    return max(128 * KIB, 64 * KIB + _align(2 * PFN_SLOTS * 5 * array_pfns, PAGE_SIZE))


#: Where the driver puts its rings and buffers, and how much room it takes with Linux arrays.
DRIVER_AREA_GPA: Final = 1 * MIB
DRIVER_AREA_BYTES: Final = driver_area_bytes()


def driver_area_view(total_pages: int, *, gpa: int = DRIVER_AREA_GPA,
                     array_pfns: int = VIRTIO_BALLOON_ARRAY_PFNS_MAX) -> GuestRamView:
    """A fresh buffer standing for the guest memory of the driver area (for in-process pairs)."""
    return GuestRamView(bytearray(driver_area_bytes(array_pfns)), base_gpa=gpa,
                        guest_bytes=total_pages * PAGE_SIZE)


@dataclass(slots=True)
class _Slot:
    gpa: int  # PFN array
    status_gpa: int  # status bytes (HOST_REFUSE)
    busy: bool = False


@dataclass(slots=True)
class _Pending:
    kind: BalloonQueue
    pfns: PfnArray = field(default_factory=lambda: _EMPTY)
    slot: _Slot | None = None
    freed: bool = False  # deflate: frames already back in the guest
    blocks: npt.NDArray[np.int64] = field(default_factory=lambda: _EMPTY)


class VirtioBalloonDriver:
    """A virtio-balloon driver for one ``GuestMemory`` (see the module docstring)."""

    period_s: float = VIRTIO_BALLOON_RETRY_S

    def __init__(
        self,
        mem: GuestMemory,
        transport: VirtioTransport,
        *,
        features: int = DEFAULT_FEATURES,
        ring_gpa: int | None = None,
        array_pfns: int = VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    ) -> None:
        self.mem = mem
        self.transport = transport
        self.view = transport.ram
        # a runtime Protocol check costs tens of microseconds: once, not every fill
        self._bulk = isinstance(transport, BulkRounds)
        self._want = features
        if not 1 <= array_pfns <= X_ARRAY_PFNS_MAX:
            raise UsageError(f"array_pfns {array_pfns} outside [1, {X_ARRAY_PFNS_MAX}]")
        self.array_pfns = array_pfns
        self._area = DRIVER_AREA_GPA if ring_gpa is None else ring_gpa
        self._area_bytes = driver_area_bytes(array_pfns)
        if self._area % PAGE_SIZE or (self._area + self._area_bytes) > (
            mem.reserved_pages * PAGE_SIZE
        ):
            raise UsageError(
                f"driver area of {self._area_bytes} bytes at {self._area:#x} must be "
                f"page-aligned inside the guest's {mem.reserved_pages} reserved frames"
            )
        try:
            self.view.read(self._area, self._area_bytes)
        except PeerError as exc:
            raise UsageError(f"the transport's view does not map the driver area: {exc}") from exc
        self.counters = Counters()
        self.features = 0
        self._reporting = False  # VIRTIO_BALLOON_F_REPORTING negotiated (set by load)
        self._loaded = False
        self._queues: dict[BalloonQueue, DriverQueue] = {}
        self._qidx: dict[BalloonQueue, int] = {}
        self._slots: dict[BalloonQueue, list[_Slot]] = {}
        self._stats_gpa = 0
        self._pending: dict[tuple[BalloonQueue, int], _Pending] = {}
        self._balloon = PfnDeque()
        self._refused = PfnDeque()
        self._inflight_inflate = 0
        self._target = 0
        # Linux runs update_balloon_size_func on a config change and re-queues it while it has
        # work left; nothing else moves the balloon (after deflate-on-OOM it stays deflated
        # until the host asks again)
        self._adjust_pending = True
        self._reset_gen = 0
        # queues whose last kick's wait gave up (the device holds buffers, e.g. a deflate the
        # host has no memory for): nothing more is sent on them until one comes back used
        self._stalled: set[BalloonQueue] = set()
        self._next_report = 0.0
        self._freed_total = 0
        self.config_interrupts = 0
        self.used_interrupts = 0
        self._used_seen = 0  # used_interrupts as of the end of the last work()
        self._actual_written = -1
        self._irq_seen = -1

    # ------------------------------------------------------------------ BalloonDriver
    @property
    def balloon_pages(self) -> int:
        return self._balloon.size  # (``len``: asked every period, an attribute costs less)

    @property
    def target_pages(self) -> int:
        return self._target

    def balloon_pfns(self) -> PfnArray:
        return self._balloon.sorted_array()

    @property
    def refused_pages(self) -> int:
        """Frames the device refused, held aside until the target is reached."""
        return len(self._refused)

    def transient_pfns(self) -> PfnArray:
        parts = [self._refused.to_array()]
        for p in self._pending.values():
            if p.kind is BalloonQueue.INFLATEQ or (p.kind is BalloonQueue.DEFLATEQ and not p.freed):
                parts.append(p.pfns)
        return sorted_pfns(np.concatenate(parts))

    def stats(self) -> dict[str, int]:
        out = {
            "balloon_pages": self.balloon_pages,
            "target_pages": self._target,
            "refused_held": len(self._refused),
            "in_flight_buffers": len(self._pending),
            "refused_pages": 0,  # cumulative; present before the first refusal too
        }
        out.update(self.counters.as_dict())
        return out

    def has_feature(self, feature: int) -> bool:
        return has(self.features, feature)

    def load(self, now: float) -> None:
        if self._loaded:
            raise UsageError("load: the driver is already loaded")
        t = self.transport
        self.features = t.device_features() & self._want
        self._reporting = self.has_feature(VIRTIO_BALLOON_F_REPORTING)
        t.set_driver_features(self.features)
        t.set_interrupt_handlers(self._irq_config, self._irq_used)
        if isinstance(t, DirectTransport):
            t.set_used_many_handler(self._irq_used_many)  # a bulk call's rounds at once
        cursor = self._area
        for role, q in queue_indices(self.features).items():
            size = min(t.queue_max_size(q), DRIVER_QUEUE_SIZE_MAX)
            if size <= 0 or size & (size - 1):
                self.counters.inc(VirtioDriverCounter.QUEUE_UNAVAILABLE)
                continue
            layout = QueueLayout.packed(cursor, size)
            cursor = _align(layout.end_gpa, PAGE_SIZE)
            self._queues[role] = DriverQueue(self.view, layout, self.counters)
            self._qidx[role] = q
            t.setup_queue(q, layout)
        for role in (BalloonQueue.INFLATEQ, BalloonQueue.DEFLATEQ):
            slots = []
            for _ in range(PFN_SLOTS):  # the PFN array, then one status byte a PFN
                slots.append(_Slot(cursor, cursor + 4 * self.array_pfns))
                cursor += 5 * self.array_pfns
            self._slots[role] = slots
        self._stats_gpa = cursor
        cursor += VIRTIO_BALLOON_S_NR * STAT_ENTRY_BYTES
        if cursor > self._area + self._area_bytes:
            raise UsageError(f"driver area overflows by {cursor - self._area - self._area_bytes}")
        self._loaded = True
        cfg = self._read_config()
        if cfg is not None:
            self._reset_gen = cfg.x_reset_generation
            self._target = cfg.num_pages
        if self.has_feature(VIRTIO_BALLOON_F_STATS_VQ):
            self._send_stats()  # prime the queue so the device can ask (init_vqs)
        if self.has_feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            self.mem.add_oom_notifier(self._oom_notify)
        self._next_report = now + PAGE_REPORTING_DELAY_S

    def work(self, now: float) -> None:
        if not self._loaded:
            raise UsageError("work: the driver is not loaded")
        self._collect_all()
        cfg = self._read_config()
        resetting = False  # a reset not finished yet: nothing else this period
        if cfg is not None:
            resetting = self._reset_seen(cfg) and not self._host_reset(cfg.x_reset_generation)
            if resetting:
                self._adjust_pending = True  # adjust next period
            else:
                if cfg.num_pages != self._target:
                    self._adjust_pending = True  # a transport that dropped the interrupt
                self._target = cfg.num_pages
                if self._adjust_pending:
                    self._adjust()
        self._update_actual()
        if not resetting and self._reporting and now >= self._next_report:
            self._report()
            self._next_report = now + PAGE_REPORTING_DELAY_S
        self._used_seen = self.used_interrupts  # what this run collected (quiet())

    def quiet(self) -> bool:
        """The next ``work`` changes nothing but when the next free-page report is due:
        loaded, no config change or used buffer unseen, nothing to adjust, nothing in flight
        but the stats buffer the device holds, no refused frame held, no free block to
        report (``quiet_at`` a time at which a reporting pass is always due)."""
        return self.quiet_at(math.inf)

    def quiet_at(self, now: float) -> bool:
        """``quiet`` for the period at ``now`` alone: whether ``work(now)`` would be
        ``idle_work(now)``. A reporting pass not due then does not run, so whether free
        blocks wait for the next one does not matter: their search (``has_reportable``, the
        costly part of ``quiet``) is left to the periods a pass is due."""
        if (not self._loaded or self._adjust_pending or self._stalled or self._refused.size
                or self.used_interrupts != self._used_seen
                or self._target != self._balloon.size):
            return False
        stats = BalloonQueue.STATSQ
        for role, _ in self._pending:  # (a loop: ``any`` of a generator costs a frame more)
            if role is not stats:
                return False
        if not self._reporting or now < self._next_report:
            return True
        # _report_room, inlined (this runs for every guest that might sleep, every period):
        # no report is in flight here, so only the queue and the zone's free pages decide
        q = self._queues.get(BalloonQueue.REPORTING_VQ)
        if q is None or q.broken or not q._free:
            return True
        mem = self.mem
        free, low = mem.free_pages, mem.watermarks.low
        if free < low + PAGE_REPORTING_CAPACITY * BLOCK_PAGES or free // 16 // BLOCK_PAGES <= 0:
            return True
        return not mem.has_reportable(low)

    def idle_work(self, now: float) -> None:
        """What ``work`` does in a quiet period (``quiet`` held): a reporting pass, if due,
        finds nothing, and only its clock moves. The simulator accounts the periods a quiet
        guest sleeps through with this."""
        if self._reporting and now >= self._next_report:
            self._next_report = now + PAGE_REPORTING_DELAY_S

    def idle_run(self, now: float, period: float, limit: float) -> tuple[float, int]:
        """``idle_work`` of every period after ``now`` whose time falls at or before
        ``limit``, in one call: returns the last period's time (``now`` plus ``period`` as
        many times, added one at a time as the calls would be) and how many."""
        n = 0
        if not self._reporting:
            while now + period <= limit:
                now += period
                n += 1
            return now, n
        due = self._next_report
        while now + period <= limit:
            now += period
            n += 1
            if now >= due:
                due = now + PAGE_REPORTING_DELAY_S
        self._next_report = due
        return now, n

    def unload(self, now: float) -> None:
        """Deflate everything, telling the host (Linux remove_common)."""
        if not self._loaded:
            return
        self._collect_all()
        while len(self._balloon) and self._leak(self.array_pfns):
            pass
        self._free_refused()
        self._update_actual()
        self._loaded = False

    # ------------------------------------------------------------------ interrupts
    def _irq_config(self) -> None:
        self.config_interrupts += 1  # the next work() reads the config and adjusts
        self._adjust_pending = True

    def _irq_used(self, queue: int) -> None:
        self.used_interrupts += 1  # the next collect picks the buffers up

    def _irq_used_many(self, queue: int, n: int) -> None:
        self.used_interrupts += n  # ``_irq_used`` ``n`` times

    # ------------------------------------------------------------------ config
    def _read_config(self) -> BalloonConfig | None:
        try:
            return BalloonConfig.decode(self.transport.read_config())
        except DeviceConfigError:
            self.counters.inc(VirtioDriverCounter.CONFIG_MALFORMED)
            return None

    def _update_actual(self) -> None:
        # Linux writes actual after every update_balloon_size_func run; we skip the write
        # when nothing changed and no config interrupt came in since (idle guests are cheap)
        n = len(self._balloon)
        if n != self._actual_written or self.config_interrupts != self._irq_seen:
            self.transport.write_config(OFFSET_ACTUAL, encode_u32(n))
            self._actual_written = n
            self._irq_seen = self.config_interrupts

    # ------------------------------------------------------------------ inflate / deflate
    def _adjust(self) -> None:
        self._adjust_pending = False
        held = len(self._refused)  # refused in earlier runs, still kept aside
        short = False  # "Out of puff!": the guest needs its memory more than we do
        while True:
            diff = self._target - (len(self._balloon) + self._inflight_inflate)
            if diff > 0:
                if len(self._refused) - held >= VIRTIO_BALLOON_X_MAX_REFUSED:
                    self.counters.inc(VirtioDriverCounter.REFUSED_LIMIT)
                    self._adjust_pending = True  # try again later
                    break
                if self._fill_rounds(diff) == 0 and self._fill(diff) == 0:
                    self._adjust_pending = True  # "Out of puff!": Linux retries in 200 ms
                    short = True
                    break
            elif diff < 0:
                if (self._leak_rounds(-diff) == 0
                        and self._leak(min(-diff, self.array_pfns)) == 0):
                    self._adjust_pending = True
                    break
            else:
                break
            cfg = self._read_config()  # Linux re-reads num_pages each time the work re-runs
            if cfg is None:
                break
            if self._reset_seen(cfg):
                self._adjust_pending = True  # the host reset the balloon: work() handles it
                break
            self._target = cfg.num_pages
        self._settle_refused(short)

    def _settle_refused(self, short: bool) -> None:
        """Seed 001: refused frames go back once the target is reached. Until then they stay
        aside, across runs too (a pipelined transport hears of refusals a run late, and a frame
        given back is the next one the allocator hands out), up to
        ``VIRTIO_BALLOON_X_MAX_REFUSED_HELD`` (the oldest go first), and all go back when the
        guest is short of memory or the balloon is not growing."""
        if short or len(self._balloon) + self._inflight_inflate >= self._target:
            self._free_refused()
        else:
            self._free_refused(len(self._refused) - VIRTIO_BALLOON_X_MAX_REFUSED_HELD)

    def _free_slot(self, role: BalloonQueue) -> _Slot | None:
        """``_free_slots(role, 1)``'s slot: the first idle one, found without a list of all."""
        for s in self._slots[role]:
            if not s.busy:
                return s
        slots = self._free_slots(role, 1)  # none idle: collect, then look again
        return slots[0] if slots else None

    def _free_slots(self, role: BalloonQueue, k: int) -> list[_Slot]:
        """Up to ``k`` idle PFN buffers of ``role`` (collecting used ones if none is idle)."""
        free = [s for s in self._slots[role] if not s.busy][:k]
        if not free:
            self._collect(role)
            free = [s for s in self._slots[role] if not s.busy][:k]
        return free

    def _queue_ready(self, role: BalloonQueue, ndesc: int) -> DriverQueue | None:
        q = self._queues.get(role)
        if q is None or q.broken or q.num_free < ndesc:
            return None
        return q

    def _kick(self, role: BalloonQueue) -> None:
        qi = self._qidx[role]
        self.transport.notify(qi)
        if not self.transport.wait(qi):
            self._stalled.add(role)
        self._collect(role)

    def _held_back(self, role: BalloonQueue) -> bool:
        """The device holds this queue's buffers: go on running, retry next period, rather
        than wait on it buffer by buffer (Linux's worker would sleep in tell_host)."""
        if role in self._stalled:
            self._collect(role)
        if role in self._stalled:
            self.counters.inc(VirtioDriverCounter.QUEUE_STALLED)
            return True
        return False

    def _round_in_bulk(self, role: BalloonQueue, q: DriverQueue) -> bool:
        """Whether one doorbell's buffers on ``role`` may go through the device in one call
        (``BulkRounds.take_rounds``): the simulator's bulk path, for a single round too, as
        cheap per buffer as whole rounds are. It ends where the doorbell, the device's work,
        its used interrupt and the collect end (a property test holds it to that)."""
        return (self._bulk and not q.in_flight and not q.broken and role not in self._stalled
                and not any(r is role for r, _ in self._pending)
                and cast(BulkRounds, self.transport).can_take_rounds(self._qidx[role]))

    def _fill(self, n: int) -> int:
        """Allocate up to ``n`` frames and send them on the inflateq, in up to ``FILL_BATCH``
        arrays of ``array_pfns`` frames and one doorbell; returns frames sent."""
        if self._held_back(BalloonQueue.INFLATEQ):
            return 0
        refuse = self.has_feature(VIRTIO_BALLOON_X_F_HOST_REFUSE)
        ndesc = 2 if refuse else 1
        q = self._queue_ready(BalloonQueue.INFLATEQ, ndesc)
        a = self.array_pfns
        want = min(FILL_BATCH, -(-n // a))
        slots = self._free_slots(BalloonQueue.INFLATEQ, want) if q is not None else []
        if q is None or not slots:
            self.counters.inc(VirtioDriverCounter.INFLATE_QUEUE_FULL)
            return 0
        slots = slots[: q.num_free // ndesc]
        pfns = self.mem.alloc_sleep(min(n, len(slots) * a))
        k = int(pfns.size)
        if k == 0:
            self.counters.inc(VirtioDriverCounter.ALLOC_FAIL)  # "Out of puff!"
            return 0
        wire = pfns.astype("<u4")
        if self._round_in_bulk(BalloonQueue.INFLATEQ, q):
            # this doorbell's buffers, in one call (the device takes every frame)
            sizes = [int(pfns[i * a : (i + 1) * a].size) for i in range(-(-k // a))]
            chains = [[(s.gpa, 4 * m, False), *([(s.status_gpa, m, True)] if refuse else [])]
                      for s, m in zip(slots, sizes, strict=False)]
            ranges = ascending_ranges(pfns)
            cast(BulkRounds, self.transport).take_rounds(
                self._qidx[BalloonQueue.INFLATEQ], q, chains,
                [m if refuse else 0 for m in sizes], 1, pfns, ranges=ranges)
            for i, slot in enumerate(slots[: len(sizes)]):
                self.view.write(slot.gpa, wire[i * a : (i + 1) * a].tobytes())
            self._into_balloon(pfns, ranges)
            self.counters.inc(VirtioDriverCounter.INFLATE_BUFFERS, len(sizes))
            return k
        for i, slot in enumerate(slots):
            part = pfns[i * a : (i + 1) * a]
            m = int(part.size)
            if m == 0:
                break
            self.view.write(slot.gpa, wire[i * a : (i + 1) * a].tobytes())
            bufs = [(slot.gpa, 4 * m, False)]
            if refuse:
                self.view.fill(slot.status_gpa, m, 0xFF)  # unknown until the device writes it
                bufs.append((slot.status_gpa, m, True))
            head = q.add(bufs)
            slot.busy = True
            self._pending[(BalloonQueue.INFLATEQ, head)] = _Pending(
                BalloonQueue.INFLATEQ, part, slot)
            self._inflight_inflate += m
            self.counters.inc(VirtioDriverCounter.INFLATE_BUFFERS)
        q.publish()
        self._kick(BalloonQueue.INFLATEQ)
        return k

    def _fill_rounds(self, n: int) -> int:
        """Whole rounds of ``_fill`` (``FILL_BATCH`` arrays of ``array_pfns`` frames and one
        doorbell each) in one call, when the transport carries them in this process and the
        device will take every frame (``BulkRounds``), and memory is there for every round
        without reclaim: the simulator's bulk path, ending where that many rounds and their
        config reads end (a property test holds it to that). Returns frames sent; 0: go
        round by round."""
        a = self.array_pfns
        k = FILL_BATCH * a
        rounds = min(n, self.mem.free_pages - self.mem.watermarks.min) // k
        role = BalloonQueue.INFLATEQ
        q = self._queues.get(role)
        if rounds < 2 or q is None or not self._bulk:
            return 0  # a round alone: _fill carries it (in bulk too, _round_in_bulk)
        t = cast(BulkRounds, self.transport)  # _bulk: checked once, at __init__
        refuse = self.has_feature(VIRTIO_BALLOON_X_F_HOST_REFUSE)
        slots = self._slots[role]
        if (q.broken or role in self._stalled or len(self._refused) or self._inflight_inflate
                or any(s.busy for s in slots) or q.num_free < FILL_BATCH * (1 + refuse)
                or any(r is role for r, _ in self._pending)
                or not t.can_take_rounds(self._qidx[role])):
            return 0
        slots = slots[:FILL_BATCH]
        chains = [[(s.gpa, 4 * a, False), *([(s.status_gpa, a, True)] if refuse else [])]
                  for s in slots]
        if k > BLOCK_PAGES and self.mem.host_page_frames == 1:
            # rounds of takes of more than a block each, none reclaiming: one take of them
            # all is the same frames in the same order (each starts at the lowest free block)
            every = self.mem.alloc_sleep(rounds * k)
            last = every[-k:]
        else:
            frames = [self.mem.alloc_sleep(k) for _ in range(rounds)]  # whole: no reclaim
            every, last = np.concatenate(frames), frames[-1]
        ranges = ascending_ranges(every)  # the usual: a few runs, found once for both ends
        t.take_rounds(self._qidx[role], q, chains, [a if refuse else 0] * FILL_BATCH, rounds,
                      every, ranges=ranges)
        wire = last.astype("<u4")
        for i, s in enumerate(slots):  # the arrays hold the last round's frames
            self.view.write(s.gpa, wire[i * a : (i + 1) * a].tobytes())
        self._into_balloon(every, ranges)
        self.counters.inc(VirtioDriverCounter.INFLATE_BUFFERS, rounds * FILL_BATCH)
        return int(every.size)

    def _leak_rounds(self, n: int) -> int:
        """Whole rounds of ``_leak`` (a full array and a doorbell each) in one call, as
        ``_fill_rounds`` does for inflation; returns frames taken out of the balloon."""
        a = self.array_pfns
        rounds = min(n, len(self._balloon)) // a
        role = BalloonQueue.DEFLATEQ
        q = self._queues.get(role)
        if rounds < 2 or q is None or not self._bulk:
            return 0
        t = cast(BulkRounds, self.transport)  # _bulk: checked once, at __init__
        slots = self._slots[role]
        if (q.broken or role in self._stalled or any(s.busy for s in slots) or q.num_free < 1
                or any(r is role for r, _ in self._pending)
                or not t.can_take_rounds(self._qidx[role])):
            return 0
        runs = self._balloon.pop_back_runs(rounds * a)  # the rounds took it newest first
        every = run_list_frames(runs)
        t.take_rounds(self._qidx[role], q, [[(slots[0].gpa, 4 * a, False)]], [0], rounds,
                      every, ranges=run_list_ranges(runs))
        self.view.write(slots[0].gpa, every[:a].astype("<u4").tobytes())  # the last array
        self._give_back(every, runs)
        self.counters.inc(VirtioDriverCounter.DEFLATE_BUFFERS, rounds)
        return int(every.size)

    def _leak(self, n: int) -> int:
        """Take up to ``n`` frames out of the balloon via the deflateq; returns frames taken."""
        n = min(n, len(self._balloon))
        if n <= 0 or self._held_back(BalloonQueue.DEFLATEQ):
            return 0
        q = self._queue_ready(BalloonQueue.DEFLATEQ, 1)
        slot = self._free_slot(BalloonQueue.DEFLATEQ) if q is not None else None
        if q is None or slot is None:
            self.counters.inc(VirtioDriverCounter.DEFLATE_QUEUE_FULL)
            return 0
        pfns = self._balloon.pop_back(n)
        if self._round_in_bulk(BalloonQueue.DEFLATEQ, q):
            # this doorbell's buffer, in one call (the device gives every frame back)
            cast(BulkRounds, self.transport).take_rounds(
                self._qidx[BalloonQueue.DEFLATEQ], q, [[(slot.gpa, 4 * n, False)]], [0], 1,
                pfns)
            self.view.write(slot.gpa, pfns.astype("<u4").tobytes())
            self.counters.inc(VirtioDriverCounter.DEFLATE_BUFFERS)
            self._give_back(pfns)
            return n
        self.view.write(slot.gpa, pfns.astype("<u4").tobytes())
        head = q.add([(slot.gpa, 4 * n, False)])
        q.publish()
        slot.busy = True
        must_tell = self.has_feature(VIRTIO_BALLOON_F_MUST_TELL_HOST)
        p = _Pending(BalloonQueue.DEFLATEQ, pfns, slot)
        self._pending[(BalloonQueue.DEFLATEQ, head)] = p
        self.counters.inc(VirtioDriverCounter.DEFLATE_BUFFERS)
        if not must_tell:
            self._give_back(pfns)  # advisory deflate: the guest may reuse them at once
            p.freed = True
        self._kick(BalloonQueue.DEFLATEQ)
        return n

    def _give_back(self, pfns: PfnArray, runs: list[tuple[int, int]] | None = None) -> None:
        """Frames out of the balloon, back to the guest; ``runs``: ``pfns`` as
        ``(first, length)`` runs, if the caller has them (long ones: a slice of the guest's
        state each; short ones cost less frame by frame)."""
        if runs is None or len(runs) * RUN_FRAMES_MIN > pfns.size:
            self.mem.free_balloon(pfns)
        else:
            self.mem.free_balloon_runs(runs)
        k = int(pfns.size)
        if not self.has_feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            self.mem.adjust_managed(-k)
        self._freed_total += k
        self.counters.inc(VirtioDriverCounter.DEFLATED_PAGES, k)

    def _free_refused(self, n: int | None = None) -> None:
        """Give the ``n`` oldest refused frames back to the guest (all by default)."""
        n = len(self._refused) if n is None else min(n, len(self._refused))
        if n <= 0:
            return
        pfns = self._refused.pop_front(n)
        if pfns.size:
            self.mem.free_balloon(pfns)
            self.counters.inc(VirtioDriverCounter.REFUSED_FREED, int(pfns.size))

    def _reset_seen(self, cfg: BalloonConfig) -> bool:
        return (self.has_feature(VIRTIO_BALLOON_X_F_HOST_RESET)
                and cfg.x_reset_generation != self._reset_gen)

    def _host_reset(self, generation: int) -> bool:
        """The host reset the balloon: drop every frame without telling it (seed 001).

        The device takes nothing while the reset is not acknowledged, so inflate buffers sent
        before the driver saw it must be back (and dropped with the rest) before the ack: one
        still in flight at the ack would be taken into the new balloon after we dropped its
        frames. False: some are still out; the ack waits for the next work."""
        self._collect_all()  # the device drained its queues before bumping the generation
        qi = self._qidx.get(BalloonQueue.INFLATEQ)
        if self._inflight_inflate and qi is not None:
            self.transport.wait_idle(qi)
            self._collect(BalloonQueue.INFLATEQ)
        if self._inflight_inflate:
            self.counters.inc(VirtioDriverCounter.RESET_ACK_DEFERRED)
            return False
        pfns = self._balloon.pop_back(len(self._balloon))
        if pfns.size:
            self._give_back(pfns)
        self._free_refused()
        for p in self._pending.values():
            if p.kind is BalloonQueue.DEFLATEQ and not p.freed:
                self._give_back(p.pfns)
                p.freed = True
        self._reset_gen = generation
        self.transport.write_config(OFFSET_X_RESET_ACK, encode_u32(generation))
        self.counters.inc(VirtioDriverCounter.RESETS)
        self.counters.inc(VirtioDriverCounter.RESET_DROPPED_PAGES, int(pfns.size))
        return True

    def _oom_notify(self) -> int:
        """virtballoon_oom_notify: deflate VIRTIO_BALLOON_OOM_NR_PAGES instead of an OOM kill."""
        if not self._loaded or not self.has_feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            return 0
        before = self._freed_total
        self._leak(VIRTIO_BALLOON_OOM_NR_PAGES)
        # Linux's notifier blocks in tell_host until the device used the buffer: with
        # MUST_TELL_HOST the pages are free only then. A pipelined transport's wait() may
        # return early, so wait (boundedly) for this deflate to come back.
        qi = self._qidx.get(BalloonQueue.DEFLATEQ)
        for _ in range(OOM_WAIT_TRIES):
            if qi is None or self._freed_total != before or not any(
                    role is BalloonQueue.DEFLATEQ for role, _ in self._pending):
                break
            self.transport.wait_idle(qi)
            self._collect(BalloonQueue.DEFLATEQ)
        self._update_actual()
        freed = self._freed_total - before
        self.counters.inc(VirtioDriverCounter.OOM_DEFLATED_PAGES, freed)
        return freed

    # ------------------------------------------------------------------ used buffers
    def _collect_all(self) -> None:
        for role, q in self._queues.items():  # _collect never adds or drops a queue
            if q.in_flight and not q.broken:  # else collect() finds nothing: skip the call
                self._collect(role)

    def _collect(self, role: BalloonQueue) -> None:
        q = self._queues.get(role)
        if q is None:
            return
        try:
            elems = q.collect()
        except DescriptorError:
            self.counters.inc(VirtioDriverCounter.USED_RING_BROKEN)
            return
        if elems:
            self._stalled.discard(role)  # the device is moving again
        taken: list[PfnArray] = []  # inflated frames, joined into the balloon in one go
        for e in elems:
            p = self._pending.pop((role, e.head), None)
            if p is None:
                self.counters.inc(VirtioDriverCounter.USED_UNEXPECTED)
                continue
            match p.kind:
                case BalloonQueue.INFLATEQ:
                    taken.append(self._inflated(p, e.length))
                case BalloonQueue.DEFLATEQ:
                    self._deflated(p)
                case BalloonQueue.STATSQ:
                    self.counters.inc(VirtioDriverCounter.STATS_REQUESTS)
                    self._send_stats()
                case BalloonQueue.REPORTING_VQ:
                    self.mem.return_isolated(p.blocks, reported=True)
                    self.counters.inc(VirtioDriverCounter.REPORTED_BLOCKS, int(p.blocks.size))
                case _:
                    self.counters.inc(VirtioDriverCounter.USED_UNEXPECTED)
        if taken:
            # one balloon update for every buffer this collect found used: the numpy calls
            # per buffer, not the frames, are what a Python guest pays (a used interrupt
            # brings a doorbell's worth, FILL_BATCH buffers)
            self._into_balloon(taken[0] if len(taken) == 1 else np.concatenate(taken))

    def _into_balloon(self, pfns: PfnArray, runs: RangeArray | None = None) -> None:
        """Frames the device took (a collect's used buffers, or a bulk call's): into the
        balloon, and out of MemTotal unless DEFLATE_ON_OOM. ``runs``: ``pfns``'s runs in
        order (``ascending_ranges``), if the caller has them: a few are pushed one by one,
        with no pass over every frame to find them again."""
        if runs is not None and len(runs) <= FEW_RUNS:
            push_run = self._balloon.push_run
            for first, end in runs.tolist():
                push_run(first, end - first)
        else:
            self._balloon.push_back(pfns)
        if pfns.size and not self.has_feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            self.mem.adjust_managed(int(pfns.size))
        self.counters.inc(VirtioDriverCounter.INFLATED_PAGES, int(pfns.size))

    def _inflated(self, p: _Pending, length: int) -> PfnArray:
        """One used inflate buffer: its refused frames aside; returns the frames the device
        took (``_collect`` adds them to the balloon)."""
        k = int(p.pfns.size)
        self._inflight_inflate -= k
        taken: npt.NDArray[np.bool_] | None = None  # None: all taken
        if self.has_feature(VIRTIO_BALLOON_X_F_HOST_REFUSE) and p.slot is not None:
            raw = self.view.read(p.slot.status_gpa, k)
            # every frame taken (the usual): one comparison of bytes, no array
            if length < k or raw != _ALL_TAKEN[:k]:
                taken = self._taken_mask(np.frombuffer(raw, dtype=np.uint8), length)
        if p.slot is not None:
            p.slot.busy = False
        acc = p.pfns if taken is None else p.pfns[taken]
        if taken is not None and not bool(taken.all()):
            ref = p.pfns[~taken]
            self._refused.push_back(ref)
            self.counters.inc(VirtioDriverCounter.REFUSED_PAGES, int(ref.size))
            # the fill counted these as on their way: with a pipelined transport the loop may
            # have ended on that count, so go round again (other frames, then free these)
            self._adjust_pending = True
        return acc

    def _taken_mask(self, status: npt.NDArray[np.uint8], length: int) -> npt.NDArray[np.bool_]:
        """Which frames of an inflate buffer the device took, from its status bytes."""
        written = np.arange(status.size) < length  # bytes the device did not write: not taken
        taken = written & (status == VIRTIO_BALLOON_X_STATUS_TAKEN)
        odd = written & (status != VIRTIO_BALLOON_X_STATUS_TAKEN) & (
            status != VIRTIO_BALLOON_X_STATUS_REFUSED
        )
        if odd.any():
            self.counters.inc(VirtioDriverCounter.STATUS_UNKNOWN, int(odd.sum()))
        return np.asarray(taken)

    def _deflated(self, p: _Pending) -> None:
        if p.slot is not None:
            p.slot.busy = False
        if not p.freed:
            self._give_back(p.pfns)  # MUST_TELL_HOST: only now may the guest reuse them
            p.freed = True

    # ------------------------------------------------------------------ stats
    def stat_values(self) -> dict[int, int]:
        """The values update_balloon_stats would send (memory in bytes, events in counts)."""
        mi = self.mem.meminfo()
        ev = self.mem.events
        return {
            StatTag.SWAP_IN: ev.swap_in * PAGE_SIZE,
            StatTag.SWAP_OUT: ev.swap_out * PAGE_SIZE,
            StatTag.MAJFLT: ev.major_faults,
            StatTag.MINFLT: ev.minor_faults,
            StatTag.MEMFREE: mi.free_pages * PAGE_SIZE,
            StatTag.MEMTOT: mi.managed_pages * PAGE_SIZE,
            StatTag.AVAIL: mi.available_pages * PAGE_SIZE,
            StatTag.CACHES: mi.cache_pages * PAGE_SIZE,
            StatTag.HTLB_PGALLOC: 0,
            StatTag.HTLB_PGFAIL: 0,
            StatTag.OOM_KILL: ev.oom_kills,
            StatTag.ALLOC_STALL: ev.alloc_stalls,
            StatTag.ASYNC_SCAN: ev.async_scan * PAGE_SIZE,
            StatTag.DIRECT_SCAN: ev.direct_scan * PAGE_SIZE,
            StatTag.ASYNC_RECLAIM: ev.async_reclaim * PAGE_SIZE,
            StatTag.DIRECT_RECLAIM: ev.direct_reclaim * PAGE_SIZE,
        }

    def _send_stats(self) -> None:
        q = self._queue_ready(BalloonQueue.STATSQ, 1)
        if q is None:
            return
        data = encode_stats(self.stat_values())
        self.view.write(self._stats_gpa, data)
        head = q.add([(self._stats_gpa, len(data), False)])
        q.publish()
        self._pending[(BalloonQueue.STATSQ, head)] = _Pending(BalloonQueue.STATSQ)
        # no wait: the device keeps the buffer until it wants fresh stats
        self.transport.notify(self._qidx[BalloonQueue.STATSQ])

    # ------------------------------------------------------------------ free page reporting
    def _report_room(self) -> tuple[DriverQueue, int] | None:
        """The queue and how many blocks a reporting pass may isolate now (None: it skips)."""
        role = BalloonQueue.REPORTING_VQ
        if any(k[0] is role for k in self._pending):
            return None  # Linux waits for each report before the next
        q = self._queue_ready(role, 1)
        if q is None:
            return None
        free = self.mem.free_pages
        # page_reporting_process_zone: skip the zone under low + one full report
        if free < self.mem.watermarks.low + PAGE_REPORTING_CAPACITY * BLOCK_PAGES:
            return None
        max_blocks = min(PAGE_REPORTING_CAPACITY, free // 16 // BLOCK_PAGES, q.num_free)
        return (q, max_blocks) if max_blocks > 0 else None

    def _report(self) -> None:
        """One page_reporting_process pass: isolate free blocks, hand them to the host."""
        role = BalloonQueue.REPORTING_VQ
        room = self._report_room()
        if room is None:
            return
        q, max_blocks = room
        wm = self.mem.watermarks
        blocks = self.mem.isolate_reportable(max_blocks, wm.low)
        if blocks.size == 0:
            return
        block_bytes = BLOCK_PAGES * PAGE_SIZE
        head = q.add_uniform(blocks * block_bytes, block_bytes, True)
        q.publish()
        self._pending[(role, head)] = _Pending(role, blocks=blocks)
        if self._bulk and cast(BulkRounds, self.transport).report_blocks(
                self._qidx[role], head, blocks, BLOCK_PAGES):
            self._collect(role)  # the doorbell, the device's work and its interrupt: done
        else:
            self._kick(role)
