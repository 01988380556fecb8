"""The host's virtio-balloon device: queues in, RAM backend calls out.

Theory of operation
-------------------
The device offers features, keeps the config space (``num_pages`` is ours, ``actual`` the
driver's) and processes its queues when the driver rings the doorbell (``notify``):

- inflateq: chains of device-readable u32 PFN arrays (VIRTIO 1.2 5.5.6). Every PFN is checked
  (inside the guest, not already in the balloon, not refused); the accepted ones are released
  through the backend in ONE ``release`` call per doorbell, after ``coalesce``: ``notify``
  takes every inflate buffer available at once, and returns them used only after the release.
- deflateq: the same arrays; PFNs in the balloon are readmitted, the rest counted.
- statsq: the driver's one stats buffer. We keep the latest values by tag name and hold the
  buffer; ``request_stats`` hands it back (used), which asks the driver for fresh values.
- reporting_vq: device-writable buffers, one per free block the guest reports
  (Linux mm/page_reporting.c, QEMU virtio_balloon_handle_report): released, not ballooned.

Huge-page RAM (``ram.host_page_frames`` > 1): releases and readmissions go through
``HostPages``, which releases a 2 MiB host page only once every frame of it is in the balloon
(QEMU's partially-ballooned-page rule) and counts the partial ones (``partial_huge_pages``). A
deflate whose host pages the host cannot back again (a hugetlb pool run dry) is held: its
frames stay in the balloon and the buffer is not used, so a MUST_TELL_HOST driver does not
reuse them; ``retry_held`` (run at every doorbell, target change and by the transport's
periodic retry) finishes it once memory is back. The guest keeps running on what it has.

The seed-001 extensions (private feature bits, see protocol/virtio_balloon.py): with
HOST_REFUSE the inflate chain carries a status byte per PFN and the device refuses pinned
frames (and any PFN it would not take anyway); with HOST_RESET, ``request_reset`` first
drains the inflate and deflate queues, then readmits the whole balloon (refused, and nothing
changed, if the host cannot back every frame of it: the driver would use them at once), bumps
``x_reset_generation`` and raises a config change: buffers the driver sees used before the new
generation belong to the old balloon, which the driver then drops without telling us. Until the
driver acknowledges the generation, inflate buffers take nothing (refused with HOST_REFUSE): a
driver between two inflate buffers when the reset came sends the second one before it sees the
reset, and drops its frames with the rest.

Everything in the queues is untrusted. A malformed chain is counted, returned used with length
0 and nothing in it is acted on. The device never reads or writes a frame in the balloon (the
host released it: a read would fault it back in, charged to no budget): a queue whose rings
lie in ballooned frames is refused at set-up, an inflate of a frame holding a ring is refused,
and a chain with a buffer or an indirect table in a ballooned frame is refused before any of
it is read (``buffer_in_balloon``, ``setup_ring_in_balloon``, ``inflate_pfn_ring``). A
broken ring (avail.idx running ahead, a layout outside guest memory) marks that queue broken,
the spec's DEVICE_NEEDS_RESET (VIRTIO 1.2 2.1.2): we stop processing it until the driver sets
it up again; the rest of the device keeps working.
No exception leaves ``notify``; the backend is only asked to release PFNs inside the guest
(and checks again itself). ``notify(queue, max_chains=k)`` pops at most ``k`` chains, so a
host can bound the work one guest gets per turn of its loop; ``work_bytes`` counts the guest
memory the queues made the device read or write (descriptors, buffers), for the same end.

Counter names (``counters``) are the Firecracker-style metrics of this device.

Snapshots
---------
``snapshot()`` is what a restarted host needs to keep serving the same guest
(``VirtioDeviceSnapshot``, version 1): the features offered and negotiated, the config space
(``num_pages``, ``actual``, ``poison_val``, the reset generation and its ack), the balloon and
the pinned frames as ranges, and each queue's layout and ring positions (``last_avail``,
``used_idx``; the rings themselves are guest memory and survive the restart), which queues are
broken, which stats buffer the device holds and the deflate buffers it holds for want of host
memory (``held_deflates``: head and frames still to give back). Partial huge pages need no
field: they are the balloon's frames in host pages not wholly ballooned. ``restore`` builds a
device over the same guest's RAM and view from one without releasing or readmitting anything
and without touching the rings; the transport attaches to it as to a new device. Counters and
the last stats values start afresh (``request_stats`` still works: the held buffer is part of
the snapshot).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from memballoon.host.hostpages import HostPages, in_ranges
from memballoon.host.persist import (
    FrameRanges,
    as_range_array,
    check_inside,
    mask_of,
    ranges_of,
)
from memballoon.host.ram import RamBackend
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, DescriptorError, PeerError, UsageError
from memballoon.model.pages import PfnArray, RangeArray, coalesce, merge_range_lists, merge_ranges
from memballoon.model.snapshot import Snapshot, SnapshotPart
from memballoon.model.units import PAGE_SHIFT, PAGE_SIZE, PFN32_MAX
from memballoon.protocol.virtio_balloon import (
    CONFIG_BYTES,
    CONFIG_X_BYTES,
    OFFSET_ACTUAL,
    OFFSET_POISON_VAL,
    OFFSET_X_RESET_ACK,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
    VIRTIO_BALLOON_X_STATUS_REFUSED,
    VIRTIO_BALLOON_X_STATUS_TAKEN,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    BalloonQueue,
    decode_stats,
    encode_config,
    features_of,
    has,
    queue_indices,
    stat_name,
)
from memballoon.protocol.virtio_transport import InterruptSink
from memballoon.protocol.virtqueue import (
    VIRTQ_DESC_BYTES,
    VIRTQ_MAX_SIZE,
    Chain,
    DeviceQueue,
    DriverQueue,
    GuestRamView,
    QueueLayout,
    avail_ring_bytes,
    complete_rounds,
    desc_table_bytes,
    used_ring_bytes,
)

#: What this device can offer; FREE_PAGE_HINT and PAGE_POISON are not implemented.
SUPPORTED_FEATURES = features_of(
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
#: Largest PFN buffer we read from one chain (Linux sends 1 KiB; bound what a guest can make
#: us copy, as Firecracker bounds its stats buffer).
MAX_PFN_BUFFER_BYTES = 64 * 1024
MAX_STATS_BUFFER_BYTES = 4096

_EMPTY = np.empty(0, dtype=np.int64)
_BALLOONED = b"\x01"  # a frame's byte in the balloon bitmap
_NOT_BALLOONED = b"\x00"
#: The status bytes of an inflate buffer whose every frame was taken (up to the longest).
_ALL_TAKEN = bytes([VIRTIO_BALLOON_X_STATUS_TAKEN]) * (MAX_PFN_BUFFER_BYTES // 4)
#: Up to this many runs of frames, a bulk inflate checks and marks them a slice each.
_FEW_RUNS = 64


class VirtioDeviceCounter(CounterName):
    """What ``VirtioBalloonDevice.counters`` counts (names read by tests, benches and metrics).

    The stats decoder counts its own names (``stats_truncated``, ``stats_unknown_tag``) in the
    same bag.
    """

    # transport: negotiation, queue set-up, config space, doorbells
    DRIVER_FEATURES_NOT_OFFERED = "driver_features_not_offered"  # feature bits we never offered
    SETUP_UNKNOWN_QUEUE = "setup_unknown_queue"  # set-up of a queue the features do not have
    SETUP_QUEUE_TOO_LARGE = "setup_queue_too_large"  # a queue larger than queue_max_size
    SETUP_BAD_LAYOUT = "setup_bad_layout"  # rings misaligned or outside the view (broken)
    CONFIG_WRITE_BAD = "config_write_bad"  # config writes not one aligned u32 inside the space
    CONFIG_WRITE_READONLY = "config_write_readonly"  # config writes to a field the device owns
    # ``actual`` writes claiming more pages than the device holds for the balloon (a lie: the
    # balloon is reported at what the device holds)
    ACTUAL_BEYOND_HELD = "actual_beyond_held"
    NOTIFY_DEAD_QUEUE = "notify_dead_queue"  # doorbells of a queue not set up, or broken
    # the host never touches a frame it released: rings or buffers there are refused
    SETUP_RING_IN_BALLOON = "setup_ring_in_balloon"  # set-ups with rings in ballooned frames
    BUFFER_IN_BALLOON = "buffer_in_balloon"  # buffers or indirect tables in ballooned frames
    INFLATE_PFN_RING = "inflate_pfn_ring"  # PFNs of frames holding a queue's rings (refused)
    # per queue we serve (_QUEUE_COUNTERS): chains whose content was malformed, chains whose
    # descriptors were, avail rings found corrupt (NEEDS_RESET), heads outside the table
    INFLATEQ_BAD_BUFFER = "inflateq_bad_buffer"  # malformed content
    INFLATEQ_BAD_DESCRIPTOR = "inflateq_bad_descriptor"  # malformed descriptors
    INFLATEQ_BROKEN_RING = "inflateq_broken_ring"  # corrupt avail ring
    INFLATEQ_BAD_HEAD = "inflateq_bad_head"  # head outside the table
    DEFLATEQ_BAD_BUFFER = "deflateq_bad_buffer"  # malformed content
    DEFLATEQ_BAD_DESCRIPTOR = "deflateq_bad_descriptor"  # malformed descriptors
    DEFLATEQ_BROKEN_RING = "deflateq_broken_ring"  # corrupt avail ring
    DEFLATEQ_BAD_HEAD = "deflateq_bad_head"  # head outside the table
    STATSQ_BAD_BUFFER = "statsq_bad_buffer"  # malformed content
    STATSQ_BAD_DESCRIPTOR = "statsq_bad_descriptor"  # malformed descriptors
    STATSQ_BROKEN_RING = "statsq_broken_ring"  # corrupt avail ring
    STATSQ_BAD_HEAD = "statsq_bad_head"  # head outside the table
    REPORTING_VQ_BAD_BUFFER = "reporting_vq_bad_buffer"  # malformed content
    REPORTING_VQ_BAD_DESCRIPTOR = "reporting_vq_bad_descriptor"  # malformed descriptors
    REPORTING_VQ_BROKEN_RING = "reporting_vq_broken_ring"  # corrupt avail ring
    REPORTING_VQ_BAD_HEAD = "reporting_vq_bad_head"  # head outside the table
    UNSUPPORTED_QUEUE = "unsupported_queue"  # chains on a queue with no handler (our bug)
    # inflate
    INFLATE_BUFFERS = "inflate_buffers"  # inflate buffers processed
    INFLATED_PAGES = "inflated_pages"  # frames taken into the balloon
    INFLATE_PFN_OUTSIDE_GUEST = "inflate_pfn_outside_guest"  # PFNs past the guest's end
    INFLATE_PFN_DUPLICATE = "inflate_pfn_duplicate"  # PFNs repeated within one doorbell
    INFLATE_PFN_ALREADY_IN_BALLOON = "inflate_pfn_already_in_balloon"  # PFNs we hold already
    INFLATE_REFUSED_PINNED = "inflate_refused_pinned"  # pinned frames refused (HOST_REFUSE)
    # frames of inflate buffers sent before the driver acknowledged a reset: not taken
    INFLATE_WHILE_RESET_PENDING = "inflate_while_reset_pending"
    INFLATE_PINNED_TAKEN = "inflate_pinned_taken"  # pinned frames taken (no HOST_REFUSE)
    # deflate
    DEFLATE_BUFFERS = "deflate_buffers"  # deflate buffers processed
    DEFLATED_PAGES = "deflated_pages"  # frames given back to the guest
    DEFLATE_PFN_OUTSIDE_GUEST = "deflate_pfn_outside_guest"  # PFNs past the guest's end
    DEFLATE_PFN_DUPLICATE = "deflate_pfn_duplicate"  # PFNs repeated within one buffer
    DEFLATE_PFN_NOT_IN_BALLOON = "deflate_pfn_not_in_balloon"  # PFNs we never held
    # stats, free page reporting, reset
    STATS_EXTRA_BUFFER = "stats_extra_buffer"  # a second stats buffer while we held one
    REPORT_BUFFERS = "report_buffers"  # free page reports processed
    REPORTED_PAGES = "reported_pages"  # frames released because the guest reported them free
    RESETS = "resets"  # balloon resets (HOST_RESET)
    # resets refused: the host could not back every balloon frame (a hugetlb pool run dry)
    RESET_REFUSED_UNBACKED = "reset_refused_unbacked"
    # huge-page RAM (the HostPages counters share the bag)
    DEFLATE_HELD = "deflate_held"  # deflate buffers held: no host memory to back their frames
    DEFLATE_HELD_DONE = "deflate_held_done"  # held deflate buffers finished by a retry


@dataclass(frozen=True, slots=True)
class _QueueCounters:
    """One queue's members of the per-queue families."""

    bad_buffer: VirtioDeviceCounter
    bad_descriptor: VirtioDeviceCounter
    broken_ring: VirtioDeviceCounter
    bad_head: VirtioDeviceCounter


@dataclass(frozen=True, slots=True)
class _PfnCounters:
    """One direction's members of the PFN-check families."""

    outside_guest: VirtioDeviceCounter
    duplicate: VirtioDeviceCounter


# FREE_PAGE_VQ is never served: FREE_PAGE_HINT is not in SUPPORTED_FEATURES, so no driver
# can negotiate it and it never gets a role.
_QUEUE_COUNTERS = {
    q: _QueueCounters(*(VirtioDeviceCounter(f"{q.name.lower()}_{kind}")
                        for kind in ("bad_buffer", "bad_descriptor", "broken_ring", "bad_head")))
    for q in (BalloonQueue.INFLATEQ, BalloonQueue.DEFLATEQ, BalloonQueue.STATSQ,
              BalloonQueue.REPORTING_VQ)
}
_INFLATE_PFN = _PfnCounters(VirtioDeviceCounter.INFLATE_PFN_OUTSIDE_GUEST,
                            VirtioDeviceCounter.INFLATE_PFN_DUPLICATE)
_DEFLATE_PFN = _PfnCounters(VirtioDeviceCounter.DEFLATE_PFN_OUTSIDE_GUEST,
                            VirtioDeviceCounter.DEFLATE_PFN_DUPLICATE)


def _frames(ranges: tuple[tuple[int, int], ...]) -> PfnArray:
    r = as_range_array(ranges)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in r.tolist()]) if len(
        r) else _EMPTY


_U32 = Annotated[int, Field(ge=0, le=PFN32_MAX)]
_U16 = Annotated[int, Field(ge=0, le=0xFFFF)]
_GPA = Annotated[int, Field(ge=0)]


class VirtioQueueSnapshot(SnapshotPart):
    """One set-up queue: where the driver put its rings and how far the device got."""

    index: Annotated[int, Field(ge=0)]
    size: Annotated[int, Field(gt=0, le=VIRTQ_MAX_SIZE)]
    desc_gpa: _GPA
    avail_gpa: _GPA
    used_gpa: _GPA
    last_avail: _U16  # the next available slot the device reads
    used_idx: _U16  # the device's used.idx (popped chains it has not returned lie in between)

    @property
    def layout(self) -> QueueLayout:
        return QueueLayout(self.size, self.desc_gpa, self.avail_gpa, self.used_gpa)


class HeldDeflateSnapshot(SnapshotPart):
    """A deflate buffer the device holds: frames it could not give back for want of memory."""

    head: Annotated[int, Field(ge=0)]
    frames: FrameRanges


class VirtioDeviceSnapshot(Snapshot):
    """``VirtioBalloonDevice`` bookkeeping that survives a host restart (version 1)."""

    version: Literal[1] = 1
    device: Literal["virtio"] = "virtio"
    guest_pages: Annotated[int, Field(gt=0)]  # the guest these frames belong to
    offered: Annotated[int, Field(ge=0)]  # device features (the driver negotiated from these)
    features: Annotated[int, Field(ge=0)]  # negotiated
    queue_size: Annotated[int, Field(gt=0, le=VIRTQ_MAX_SIZE)]  # largest size we offer
    num_pages: _U32  # the target
    actual: _U32  # the driver's
    poison_val: _U32
    reset_generation: _U32  # HOST_RESET: bumped by each request_reset
    reset_ack: _U32  # HOST_RESET: the generation the driver acknowledged
    inflated: FrameRanges  # the balloon
    pinned: FrameRanges  # frames refused with HOST_REFUSE (taken and counted without)
    queues: tuple[VirtioQueueSnapshot, ...]  # set up by the driver, by index
    broken_queues: tuple[Annotated[int, Field(ge=0)], ...]  # DEVICE_NEEDS_RESET, sorted
    stats_head: Annotated[int, Field(ge=0)] | None  # the stats buffer we hold, if any
    held_deflates: tuple[HeldDeflateSnapshot, ...] = ()  # deflates waiting for host memory

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.offered & ~SUPPORTED_FEATURES or not has(self.offered, VIRTIO_F_VERSION_1):
            raise ConfigError(f"offered features {self.offered:#x}: not what this device offers "
                              f"(a subset of {SUPPORTED_FEATURES:#x} with VERSION_1)")
        if self.features & ~self.offered:
            raise ConfigError(f"features {self.features:#x} were never offered")
        if self.queue_size & (self.queue_size - 1):
            raise ConfigError(f"queue_size {self.queue_size} is not a power of two")
        if self.num_pages > self.guest_pages:
            raise ConfigError(f"num_pages {self.num_pages} exceeds the guest's {self.guest_pages}")
        for name, ranges in (("inflated", self.inflated), ("pinned", self.pinned)):
            check_inside(name, ranges, self.guest_pages)
        roles = {i: q for q, i in queue_indices(self.features).items()}
        indices = [q.index for q in self.queues]
        if indices != sorted(set(indices)) or any(i not in roles for i in indices):
            raise ConfigError(f"queues {indices}: not sorted, unique queues of the features' "
                              f"{sorted(roles)}")
        if list(self.broken_queues) != sorted(set(self.broken_queues)) or any(
                i not in roles for i in self.broken_queues):
            raise ConfigError(f"broken_queues {list(self.broken_queues)}: not sorted, unique "
                              f"queues of the features' {sorted(roles)}")
        for q in self.queues:
            if q.size > self.queue_size:
                raise ConfigError(f"queue {q.index}: size {q.size} over {self.queue_size}")
            try:
                q.layout.check_shape()
            except DescriptorError as exc:
                raise ConfigError(f"queue {q.index}: {exc}") from exc
            if (q.last_avail - q.used_idx) & 0xFFFF > q.size:
                raise ConfigError(f"queue {q.index}: the device would hold more chains than "
                                  f"its {q.size} descriptors")
        if self.stats_head is not None:
            stats = [q for q in self.queues if roles[q.index] is BalloonQueue.STATSQ]
            if not stats or self.stats_head >= stats[0].size:
                raise ConfigError(f"stats_head {self.stats_head}: no stats queue holds it")
        if self.held_deflates:
            deflate = [q for q in self.queues if roles[q.index] is BalloonQueue.DEFLATEQ]
            inflated = mask_of(self.inflated, self.guest_pages)
            for h in self.held_deflates:
                if not deflate or h.head >= deflate[0].size:
                    raise ConfigError(f"held_deflates: head {h.head}: no deflate queue holds it")
                check_inside("held_deflates", h.frames, self.guest_pages)
                if bool((mask_of(h.frames, self.guest_pages) & ~inflated).any()):
                    raise ConfigError(f"held_deflates: head {h.head} holds frames not in the "
                                      "balloon")
        return self


class VirtioBalloonDevice:
    """A virtio-balloon device over ``ram`` (see the module docstring)."""

    def __init__(
        self,
        ram: RamBackend,
        view: GuestRamView,
        *,
        features: int,
        queue_size: int = 128,
    ) -> None:
        if features & ~SUPPORTED_FEATURES:
            raise UsageError(f"unsupported feature bits {features & ~SUPPORTED_FEATURES:#x}")
        if queue_size <= 0 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise UsageError(f"queue_size {queue_size} is not a power of two <= 32768")
        if view.guest_bytes != ram.guest_pages * PAGE_SIZE:
            raise UsageError("view and RAM backend disagree on the guest's size")
        self.ram = ram
        self._view = view
        self.queue_size = queue_size
        self.counters = Counters()
        self._offered = features | (1 << VIRTIO_F_VERSION_1)
        self.features = 0  # negotiated
        self._guest_pages = ram.guest_pages
        # the balloon bitmap, over a private anonymous mapping (the zero page until written, as
        # numpy's zeros; a shared one, mmap's default, is resident once read): whether a buffer
        # touches the balloon is one memchr (``mmap.find``), not a numpy call per buffer of
        # every chain
        self._inflated_bytes = mmap.mmap(-1, self._guest_pages,
                                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._inflated: npt.NDArray[np.bool_] = np.frombuffer(self._inflated_bytes,
                                                              dtype=np.bool_)
        self._to_release: list[RangeArray] = []  # accepted inflate frames, released per doorbell
        self._inflated_count = 0
        self._host = HostPages(ram, self.counters)
        # deflate buffers held for want of host memory: (deflateq index, head, frames left)
        self._held: list[tuple[int, int, PfnArray]] = []
        self._pinned = np.zeros(self._guest_pages, dtype=np.bool_)
        self._pinned_count = 0  # frames pinned: none (the usual) skips every pinned check
        # frames holding a set-up queue's rings: never taken into the balloon. Lazily backed
        # zeros, set and cleared by the spans marked (``_ring_spans``), never as a whole: a
        # whole-array write would make a byte per frame resident (1.2 GB over a 1,000-guest
        # fleet) for the few frames rings hold
        self._rings = np.zeros(self._guest_pages, dtype=np.bool_)
        self._ring_spans: list[tuple[int, int]] = []
        #: guest memory the queues made us read or write (descriptors, buffers), cumulative
        self.work_bytes = 0
        self._num_pages = 0
        self._actual = 0
        self._poison_val = 0
        self._reset_generation = 0
        self._reset_ack = 0
        self._roles: dict[int, BalloonQueue] = {}
        self._queues: dict[int, DeviceQueue] = {}
        self.broken_queues: set[int] = set()
        self._stats_head: int | None = None
        self.stats: dict[str, int] = {}
        self.stats_seq = 0  # bumps each time the driver delivers a stats buffer
        self.reported_pages_total = 0
        self._irq: InterruptSink | None = None

    # ------------------------------------------------------------------ transport side
    @property
    def view(self) -> GuestRamView:
        return self._view

    def attach(self, irq: InterruptSink) -> None:
        self._irq = irq

    def device_features(self) -> int:
        return self._offered

    def set_driver_features(self, features: int) -> None:
        if features & ~self._offered:
            self.counters.inc(VirtioDeviceCounter.DRIVER_FEATURES_NOT_OFFERED)
        self.features = features & self._offered
        self._roles = {i: q for q, i in queue_indices(self.features).items()}
        self._queues.clear()
        self._clear_rings()
        self.broken_queues.clear()
        self._stats_head = None
        self._held.clear()  # the rings are gone: their held buffers with them

    def queue_max_size(self, queue: int) -> int:
        return self.queue_size if queue in self._roles else 0

    def setup_queue(self, queue: int, layout: QueueLayout) -> bool:
        """Set ``queue`` up on ``layout``; whether it is usable (a refusal is counted and the
        transport answers it as failed)."""
        role = self._roles.get(queue)
        if role is None:
            self.counters.inc(VirtioDeviceCounter.SETUP_UNKNOWN_QUEUE)
            return False
        # a queue set up again is a new ring: buffers held from the old one are gone with it
        # (their heads pushed onto the new ring would name chains it never made available)
        if role is BalloonQueue.STATSQ:
            self._stats_head = None
        self._held = [h for h in self._held if h[0] != queue]
        self._queues.pop(queue, None)
        ok = False
        if layout.size > self.queue_size:
            self.counters.inc(VirtioDeviceCounter.SETUP_QUEUE_TOO_LARGE)
        elif self._layout_in_balloon(layout):  # checked before the layout check reads it
            self.counters.inc(VirtioDeviceCounter.SETUP_RING_IN_BALLOON)
        else:
            try:
                self._queues[queue] = self._device_queue(role, layout)
                ok = True
            except PeerError:
                self.counters.inc(VirtioDeviceCounter.SETUP_BAD_LAYOUT)
        if ok:
            self.broken_queues.discard(queue)
        else:
            self.broken_queues.add(queue)
        self._mark_rings()
        return ok

    @staticmethod
    def _areas(layout: QueueLayout) -> tuple[tuple[int, int], ...]:
        return ((layout.desc_gpa, desc_table_bytes(layout.size)),
                (layout.avail_gpa, avail_ring_bytes(layout.size)),
                (layout.used_gpa, used_ring_bytes(layout.size)))

    def _frames_of(self, gpa: int, length: int) -> tuple[int, int]:
        """The frames ``[lo, hi)`` that ``length`` bytes at ``gpa`` touch, clipped to the guest."""
        lo = max(gpa, 0) >> PAGE_SHIFT
        hi = min((gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT, self._guest_pages)
        return lo, hi

    def _layout_in_balloon(self, layout: QueueLayout) -> bool:
        if not self._inflated_count:
            return False
        for gpa, n in self._areas(layout):
            lo, hi = self._frames_of(gpa, n)
            if lo < hi and bool(self._inflated[lo:hi].any()):
                return True
        return False

    def _mark_rings(self) -> None:
        """Which frames hold the rings of the queues set up now (never ballooned)."""
        self._clear_rings()
        for dq in self._queues.values():
            for gpa, n in self._areas(dq.layout):
                lo, hi = self._frames_of(gpa, n)
                self._rings[lo:hi] = True
                self._ring_spans.append((lo, hi))

    def _clear_rings(self) -> None:
        for lo, hi in self._ring_spans:
            self._rings[lo:hi] = False
        self._ring_spans.clear()

    def _in_balloon(self, gpa: int, length: int) -> bool:
        """Whether a buffer (or indirect table) touches a ballooned frame: the queues' guard,
        called before anything there is read; counts each one found."""
        if not self._inflated_count or length <= 0:
            return False
        lo = max(gpa, 0) >> PAGE_SHIFT  # _frames_of, inlined: once per buffer of every chain
        hi = min((gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT, self._guest_pages)
        hit = lo < hi and self._inflated_bytes.find(_BALLOONED, lo, hi) >= 0
        if hit:
            self.counters.inc(VirtioDeviceCounter.BUFFER_IN_BALLOON)
        return hit

    def _device_queue(self, role: BalloonQueue, layout: QueueLayout, *,
                      start_index: int = 0) -> DeviceQueue:
        """Our end of ``role``'s queue (``PeerError`` if the layout is bad for our view)."""
        refuse = self._has(VIRTIO_BALLOON_X_F_HOST_REFUSE)
        return DeviceQueue(
            self._view,
            layout,
            readable=role is not BalloonQueue.REPORTING_VQ,
            writable=role is BalloonQueue.REPORTING_VQ or (
                role is BalloonQueue.INFLATEQ and refuse),
            indirect=self._has(VIRTIO_F_INDIRECT_DESC),
            start_index=start_index,
            guard=self._in_balloon,
        )

    def read_config(self) -> bytes:
        return encode_config(self._num_pages, self._actual, 0, self._poison_val,
                             self._reset_generation, self._reset_ack,
                             extended=has(self._offered, VIRTIO_BALLOON_X_F_HOST_RESET))

    def write_config(self, offset: int, data: bytes) -> None:
        size = CONFIG_X_BYTES if has(self._offered, VIRTIO_BALLOON_X_F_HOST_RESET) else (
            CONFIG_BYTES
        )
        if len(data) != 4 or offset % 4 or not 0 <= offset < size:
            self.counters.inc(VirtioDeviceCounter.CONFIG_WRITE_BAD)
            return
        value = int.from_bytes(data, "little")
        if offset == OFFSET_ACTUAL:
            self._actual = value
            if value > self._inflated_count:
                self.counters.inc(VirtioDeviceCounter.ACTUAL_BEYOND_HELD)
        elif offset == OFFSET_POISON_VAL:
            self._poison_val = value
        elif offset == OFFSET_X_RESET_ACK:
            self._reset_ack = value
        else:
            self.counters.inc(VirtioDeviceCounter.CONFIG_WRITE_READONLY)

    def notify(self, queue: int, *, max_chains: int | None = None) -> int:
        """The doorbell. Processes every available chain, or at most ``max_chains`` of them
        (the host's bound on one turn of work: it rings again for the rest); returns how many
        chains it popped. Never raises."""
        if self._held or self._host.owing:
            self.retry_held()
        dq = self._queues.get(queue)
        if dq is None or queue in self.broken_queues:
            self.counters.inc(VirtioDeviceCounter.NOTIFY_DEAD_QUEUE)
            return 0
        role = self._roles[queue]
        used = 0
        popped = 0
        descs_before = dq.descriptors_read
        done: list[tuple[int, int]] = []
        batch: list[tuple[int, Chain, PfnArray]] = []  # inflate chains: (slot in done, ...)
        # at most a ring's worth without a bound: a used ring laid over the avail ring would
        # otherwise refill it with every bad chain returned, for ever
        limit = 2 * dq.size if max_chains is None else max_chains
        while popped < limit:
            try:
                chain = dq.pop()
            except PeerError:
                popped += 1
                used += self._bad_chain(queue, dq)
                if queue in self.broken_queues:
                    break
                continue
            if chain is None:
                break
            popped += 1
            if role is not BalloonQueue.REPORTING_VQ:  # reported ranges are not read
                self.work_bytes += chain.readable_bytes + chain.writable_bytes
            if role is BalloonQueue.INFLATEQ:
                # inflate buffers are checked one by one, then validated and taken together
                try:
                    batch.append((len(done), chain, self._inflate_read(chain)))
                    done.append((chain.head, 0))
                except PeerError:
                    self.counters.inc(VirtioDeviceCounter.INFLATEQ_BAD_BUFFER)
                    done.append((chain.head, 0))
                continue
            try:
                length = self._process(role, chain)
            except PeerError:
                self.counters.inc(_QUEUE_COUNTERS[role].bad_buffer)
                length = 0
            if length is None:  # held (the stats buffer)
                continue
            done.append((chain.head, length))
        if batch:
            for (slot, chain, _), length in zip(batch, self._inflate_batch(batch), strict=True):
                done[slot] = (chain.head, length)
        # One release for every inflate buffer this doorbell drained: the guest's buffers are
        # usually contiguous, so their runs merge into fewer, larger punches. A buffer is used
        # only once the memory behind it is released.
        self._flush_release()
        for head, length in done:
            dq.push_used(head, length)
        used += len(done)
        if used:
            self._interrupt_used(queue)
        self.work_bytes += VIRTQ_DESC_BYTES * (dq.descriptors_read - descs_before)
        return popped

    # ------------------------------------------------------------------ rounds in bulk
    def can_take_rounds(self, queue: int) -> bool:
        """Whether the next rounds of inflate or deflate buffers on ``queue`` will have every
        frame taken or given back (``BulkRounds``): a healthy queue, nothing held or waiting
        to be released or owed (a doorbell retries failed releases first), no reset pending
        (its buffers are refused, or name frames given back), no frame pinned (a refusal goes
        buffer by buffer), 4 KiB host pages for a deflate (a huge page the host cannot back
        again holds its buffer)."""
        role = self._roles.get(queue)
        if role not in (BalloonQueue.INFLATEQ, BalloonQueue.DEFLATEQ) or queue not in self._queues:
            return False
        if (queue in self.broken_queues or self._held or self._to_release or self._host.owing
                or self.reset_pending):
            return False
        if role is BalloonQueue.DEFLATEQ:
            return self._host.frames == 1
        return not self._pinned_count

    def take_rounds(self, queue: int, driver: DriverQueue,
                    chains: Sequence[Sequence[tuple[int, int, bool]]], lengths: Sequence[int],
                    rounds: int, frames: PfnArray, *, ranges: RangeArray | None = None) -> None:
        """Take (inflateq) or give back (deflateq) ``frames`` as ``rounds`` doorbells of
        ``chains`` would, every frame going through, every buffer returned used with its
        status bytes written (``BulkRounds``; only after ``can_take_rounds``): the bitmap,
        counters, host memory and both ends of the queue as that many doorbells leave them.
        ``ranges``: ``coalesce(frames)``, if the caller has it (a deflate of the balloon's
        runs: no pass over every frame to find them again)."""
        n = int(frames.size)
        inflate = self._roles[queue] is BalloonQueue.INFLATEQ
        runs = coalesce(frames) if ranges is None else ranges
        few = len(runs) <= _FEW_RUNS and (inflate or not n or int(runs[0, 0]) >= 0)
        if n and few:
            # the usual rounds: a few runs of frames, checked (and marked) a slice each
            if int(runs[-1, 1]) > self._guest_pages:
                raise UsageError("take_rounds: a frame outside the guest")
            spans = runs.tolist()
            if inflate:
                if any(self._inflated_bytes.find(_BALLOONED, a, b) >= 0 for a, b in spans):
                    raise UsageError("take_rounds: the driver's balloon and ours disagree")
                for a, b in spans:
                    self._inflated[a:b] = True
            elif any(self._inflated_bytes.find(_NOT_BALLOONED, a, b) >= 0 for a, b in spans):
                raise UsageError("take_rounds: the driver's balloon and ours disagree")
        elif n:
            if int(frames.max()) >= self._guest_pages:
                raise UsageError("take_rounds: a frame outside the guest")
            held = self._inflated[frames]
            if bool(held.any()) if inflate else not bool(held.all()):
                raise UsageError("take_rounds: the driver's balloon and ours disagree")
            if inflate:
                self._inflated[frames] = True
        if inflate:
            self._inflated_count += n
            self._to_release.append(runs)
            self._flush_release()
            self.counters.inc(VirtioDeviceCounter.INFLATE_BUFFERS, rounds * len(chains))
            self.counters.inc(VirtioDeviceCounter.INFLATED_PAGES, n)
            if self._has(VIRTIO_BALLOON_X_F_HOST_REFUSE):
                view = self._view
                for bufs, length in zip(chains, lengths, strict=True):
                    for gpa, _, writable in bufs:
                        if writable:  # the status bytes: every frame taken
                            if length <= len(_ALL_TAKEN):
                                view.write(gpa, _ALL_TAKEN[:length])
                            else:
                                view.fill(gpa, length, VIRTIO_BALLOON_X_STATUS_TAKEN)
                            break
        else:
            self.counters.inc(VirtioDeviceCounter.DEFLATE_BUFFERS, rounds * len(chains))
            # 4 KiB host pages: the host backs every one again
            self._give(frames, runs)
        dq = self._queues[queue]
        descs_before = dq.descriptors_read
        complete_rounds(driver, dq, chains, lengths, rounds)
        self.work_bytes += rounds * sum(n for bufs in chains for _, n, _ in bufs) + (
            VIRTQ_DESC_BYTES * (dq.descriptors_read - descs_before))

    def report_blocks(self, queue: int, head: int, blocks: npt.NDArray[np.int64],
                      block_pages: int) -> bool:
        """A free page report in one call (``BulkRounds``): the chain ``head`` just made
        available on the reporting queue holds one device-writable buffer per aligned block
        of ``blocks`` (``block_pages`` frames each). The doorbell, its walk and ``_report``
        end where this ends (the same release, counters and used entry); False, having done
        nothing, where the doorbell could end otherwise (a held deflate or owed release to
        retry first, a block outside the guest or on a ballooned frame, another chain)."""
        dq = self._queues.get(queue)
        k = int(blocks.size)
        if (dq is None or self._roles.get(queue) is not BalloonQueue.REPORTING_VQ
                or queue in self.broken_queues or self._held or self._host.owing or k == 0):
            return False
        ranges = coalesce(blocks) * block_pages  # merge_ranges of the buffers' frames
        spans = ranges.tolist()
        guest = self._view.guest_bytes
        if (spans[0][0] < 0 or spans[-1][1] * PAGE_SIZE > guest
                or k * block_pages * PAGE_SIZE > guest):
            return False  # the walk or _report would refuse the chain
        if self._inflated_count and any(  # the guard (_in_balloon) would refuse it
                self._inflated_bytes.find(_BALLOONED, lo, hi) >= 0 for lo, hi in spans):
            return False
        if not dq.take_known(head, k):
            return False
        released = self._host.release_free(ranges)
        self.counters.inc(VirtioDeviceCounter.REPORT_BUFFERS)
        self.counters.inc(VirtioDeviceCounter.REPORTED_PAGES, released)
        self.reported_pages_total += released
        self._flush_release()
        dq.push_used(head, 0)
        self._interrupt_used(queue)
        self.work_bytes += VIRTQ_DESC_BYTES * k
        return True

    def _flush_release(self) -> None:
        if not self._to_release:
            return
        ranges = merge_range_lists(self._to_release)
        self._to_release.clear()
        self._host.take(ranges)

    @property
    def release_owed_pages(self) -> int:
        """Balloon frames whose host memory a failed release still holds (retried)."""
        return self._host.release_owed_pages

    def retry_held(self) -> int:
        """Try again the deflates held for want of host memory, and the releases the host
        failed (``HostPages.retry_releases``); returns how many deflates finished."""
        self._host.retry_releases()
        done = 0
        still: list[tuple[int, int, PfnArray]] = []
        for q, head, pfns in self._held:
            dq = self._queues.get(q)
            if dq is None or q in self.broken_queues:
                continue  # the queue was set up again or broke: the buffer is gone with it
            # a held buffer naming frames an earlier one already gave back (the guest sent
            # the same frames twice while both waited): those are out of the balloon now
            live = pfns[self._inflated[pfns]]
            left = self._give(live) if live.size else live
            if left.size:
                still.append((q, head, left))
                continue
            dq.push_used(head, 0)
            self._interrupt_used(q)
            self.counters.inc(VirtioDeviceCounter.DEFLATE_HELD_DONE)
            done += 1
        self._held = still
        return done

    @property
    def partial_huge_pages(self) -> int:
        """Host huge pages partly ballooned: held, not released (0 with 4 KiB host pages)."""
        return self._host.partial_huge_pages

    @property
    def host_pages(self) -> HostPages:
        return self._host

    @property
    def held_deflates(self) -> int:
        return len(self._held)

    @property
    def settled(self) -> bool:
        """No reset pending and no deflate held: nothing the device waits to finish (asked
        every period of a busy guest, in one call)."""
        return not self._held and self._reset_ack == self._reset_generation

    # ------------------------------------------------------------------ host side
    def _has(self, feature: int) -> bool:
        return has(self.features, feature)

    def set_target(self, pages: int) -> None:
        if not 0 <= pages <= min(self._guest_pages, PFN32_MAX):
            raise UsageError(f"target {pages} pages outside [0, {self._guest_pages}]")
        self._num_pages = pages
        if self._held:
            self.retry_held()
        self._config_interrupt()

    @property
    def target_pages(self) -> int:
        return self._num_pages

    @property
    def actual_pages(self) -> int:
        """The driver's ``actual``, never more than the pages the device holds released: a
        guest that claims a bigger balloon (``0xFFFFFFFF``) must not make the manager think
        the host has that memory back."""
        actual, held = self._actual, self._inflated_count
        return actual if actual < held else held  # (asked every period: no call of ``min``)

    @property
    def inflated_pages(self) -> int:
        return self._inflated_count

    @property
    def reset_pending(self) -> bool:
        return self._reset_ack != self._reset_generation

    def balloon_pfns(self) -> PfnArray:
        return np.flatnonzero(self._inflated).astype(np.int64, copy=False)

    def pin(self, pfns: npt.ArrayLike) -> None:
        """Frames the host will not take (refused when HOST_REFUSE is negotiated)."""
        p = np.asarray(pfns, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self._guest_pages):
            raise UsageError("pin: PFN outside the guest")
        self._pinned[p] = True
        self._pinned_count = int(np.count_nonzero(self._pinned))

    def unpin(self, pfns: npt.ArrayLike) -> None:
        self._pinned[np.asarray(pfns, dtype=np.int64)] = False
        self._pinned_count = int(np.count_nonzero(self._pinned))

    def request_stats(self) -> bool:
        """Hand the stats buffer back so the driver refills it; False if we do not hold one."""
        head = self._stats_head
        q = self._index_of(BalloonQueue.STATSQ)
        if head is None or q is None or q in self.broken_queues:
            return False
        self._stats_head = None
        self._queues[q].push_used(head, 0)
        self._interrupt_used(q)
        return True

    def request_reset(self) -> bool:
        """Reset the balloon (seed 001): take every balloon frame back, tell the driver.

        The driver drops its whole balloon and uses the frames at once, so every one must be
        backed first: where the host cannot (a hugetlb pool run dry) the reset is refused,
        nothing changes (the frames it could back are released again, held deflates stay
        held), ``reset_refused_unbacked`` counts it and ``host_pages.last_error`` says why;
        False. The caller tries again once memory is back."""
        if not self._has(VIRTIO_BALLOON_X_F_HOST_RESET):
            raise UsageError("request_reset: HOST_RESET was not negotiated")
        for role in (BalloonQueue.INFLATEQ, BalloonQueue.DEFLATEQ):
            q = self._index_of(role)
            if q is not None and q in self._queues:
                self.notify(q)  # drain: what is already queued belongs to the old balloon
        pfns = self.balloon_pfns()
        if pfns.size and not self._host.give_all(pfns):
            self.counters.inc(VirtioDeviceCounter.RESET_REFUSED_UNBACKED)
            return False
        for q, head, _ in self._held:  # held deflates belong to the old balloon too
            if q in self._queues and q not in self.broken_queues:
                self._queues[q].push_used(head, 0)
                self._interrupt_used(q)
        self._held.clear()
        self._inflated[:] = False
        self._inflated_count = 0
        self._reset_generation = (self._reset_generation + 1) & PFN32_MAX
        self.counters.inc(VirtioDeviceCounter.RESETS)
        self._config_interrupt()
        return True

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> VirtioDeviceSnapshot:
        """The bookkeeping a restarted host needs (see the module docstring)."""
        self._flush_release()  # empty outside notify: every balloon frame is released
        return VirtioDeviceSnapshot(
            guest_pages=self._guest_pages,
            offered=self._offered,
            features=self.features,
            queue_size=self.queue_size,
            num_pages=self._num_pages,
            actual=self._actual,
            poison_val=self._poison_val,
            reset_generation=self._reset_generation,
            reset_ack=self._reset_ack,
            inflated=ranges_of(self._inflated),
            pinned=ranges_of(self._pinned),
            queues=tuple(
                VirtioQueueSnapshot(index=i, size=dq.size, desc_gpa=dq.layout.desc_gpa,
                                    avail_gpa=dq.layout.avail_gpa, used_gpa=dq.layout.used_gpa,
                                    last_avail=dq.last_avail, used_idx=dq.used_idx)
                for i, dq in sorted(self._queues.items())
            ),
            broken_queues=tuple(sorted(self.broken_queues)),
            stats_head=self._stats_head,
            held_deflates=tuple(HeldDeflateSnapshot(head=head, frames=tuple(
                (int(a), int(b)) for a, b in coalesce(pfns).tolist())) for _, head, pfns in
                self._held),
        )

    @classmethod
    def restore(cls, snap: VirtioDeviceSnapshot, ram: RamBackend,
                view: GuestRamView) -> VirtioBalloonDevice:
        """A device over ``ram`` and ``view`` (the same guest's) that takes up ``snap``; nothing
        is released or readmitted and the rings are left as they are. ``ConfigError`` if
        ``ram`` is another size or a queue's rings lie outside ``view``."""
        if snap.guest_pages != ram.guest_pages:
            raise ConfigError(f"VirtioDeviceSnapshot: for a guest of {snap.guest_pages} pages, "
                              f"the RAM has {ram.guest_pages}")
        dev = cls(ram, view, features=snap.offered, queue_size=snap.queue_size)
        dev.set_driver_features(snap.features)
        for q in snap.queues:
            try:
                dq = dev._device_queue(dev._roles[q.index], q.layout, start_index=q.last_avail)
            except PeerError as exc:
                raise ConfigError(f"VirtioDeviceSnapshot: queue {q.index}: {exc}") from exc
            dq.used_idx = q.used_idx
            dev._queues[q.index] = dq
        dev._mark_rings()
        dev.broken_queues.update(snap.broken_queues)
        dev._stats_head = snap.stats_head
        dev._num_pages = snap.num_pages
        dev._actual = snap.actual
        dev._poison_val = snap.poison_val
        dev._reset_generation = snap.reset_generation
        dev._reset_ack = snap.reset_ack
        dev._inflated[:] = mask_of(snap.inflated, dev._guest_pages)
        dev._inflated_count = int(np.count_nonzero(dev._inflated))
        dev._pinned[:] = mask_of(snap.pinned, dev._guest_pages)
        dev._pinned_count = int(np.count_nonzero(dev._pinned))
        dev._host.rebuild(dev._inflated)
        deflateq = dev._index_of(BalloonQueue.DEFLATEQ)
        if snap.held_deflates and deflateq is not None:
            dev._held = [(deflateq, h.head, _frames(h.frames)) for h in snap.held_deflates]
        return dev

    # ------------------------------------------------------------------ queue processing
    def _index_of(self, role: BalloonQueue) -> int | None:
        for i, r in self._roles.items():
            if r is role:
                return i
        return None

    def _interrupt_used(self, queue: int) -> None:
        if self._irq is not None:
            self._irq.used_buffers(queue)

    def _config_interrupt(self) -> None:
        if self._irq is not None:
            self._irq.config_changed()

    def _bad_chain(self, queue: int, dq: DeviceQueue) -> int:
        """Count a chain ``pop`` rejected; return it used (len 0) if its head was valid."""
        names = _QUEUE_COUNTERS[self._roles[queue]]
        if dq.failed_head is not None:
            self.counters.inc(names.bad_descriptor)
            dq.push_used(dq.failed_head, 0)
            return 1
        if dq.broken:
            self.counters.inc(names.broken_ring)
            self.broken_queues.add(queue)  # DEVICE_NEEDS_RESET for this queue
        else:
            self.counters.inc(names.bad_head)
        return 0

    def _process(self, role: BalloonQueue, chain: Chain) -> int | None:
        """One chain of a queue other than the inflateq (``notify`` takes those together)."""
        match role:
            case BalloonQueue.DEFLATEQ:
                return self._deflate(chain)
            case BalloonQueue.STATSQ:
                return self._stats(chain)
            case BalloonQueue.REPORTING_VQ:
                return self._report(chain)
            case _:
                self.counters.inc(VirtioDeviceCounter.UNSUPPORTED_QUEUE)
                return 0

    def _read_pfns(self, chain: Chain, name: str) -> PfnArray:
        data = chain.read_all(self._view, MAX_PFN_BUFFER_BYTES)
        if len(data) % 4:
            raise DescriptorError(f"{name}: {len(data)} bytes is not a whole number of u32 PFNs")
        return np.frombuffer(data, dtype="<u4").astype(np.int64)

    def _valid_mask(self, pfns: PfnArray, names: _PfnCounters) -> npt.NDArray[np.bool_]:
        """PFNs inside the guest and first of their kind in this buffer."""
        ok = pfns < self._guest_pages  # u32 on the wire: always < 2**32 and >= 0
        bad = int(pfns.size - int(ok.sum()))
        if bad:
            self.counters.inc(names.outside_guest, bad)
        if pfns.size > 1 and not bool(((pfns[1:] - pfns[:-1]) > 0).all()):
            # not strictly ascending (drivers send sorted runs): look for duplicates
            _, first = np.unique(pfns, return_index=True)
            once = np.zeros(pfns.size, dtype=np.bool_)
            once[first] = True
            dup = int(pfns.size - first.size)
            if dup:
                self.counters.inc(names.duplicate, dup)
            ok &= once
        return ok

    def _inflate_read(self, chain: Chain) -> PfnArray:
        """One inflate buffer's PFNs, after the checks that concern that buffer alone."""
        pfns = self._read_pfns(chain, "inflate")
        n = int(pfns.size)
        refuse = self._has(VIRTIO_BALLOON_X_F_HOST_REFUSE)
        if refuse and chain.writable_bytes < n:
            raise DescriptorError(f"inflate: {chain.writable_bytes} status bytes for {n} PFNs")
        if not refuse and chain.writable:
            raise DescriptorError("inflate: device-writable buffer without HOST_REFUSE")
        return pfns

    def _inflate_batch(self, items: list[tuple[int, Chain, PfnArray]]) -> list[int]:
        """Take the frames of several inflate buffers at once; the used length of each.

        One validation, one bitmap update and (in ``notify``) one release for the lot: the
        per-buffer cost of numpy calls is what limits a Python device, not the pages.
        """
        parts = [p for _, _, p in items]
        pfns = parts[0] if len(parts) == 1 else np.concatenate(parts)
        refuse = self._has(VIRTIO_BALLOON_X_F_HOST_REFUSE)
        ok: npt.NDArray[np.bool_] | None = None  # None: all taken
        if self.reset_pending:
            # sent before the driver saw the reset: it drops these frames when it does, so
            # taking them would hold (and release) frames the guest has back (seed 001)
            self.counters.inc(VirtioDeviceCounter.INFLATE_WHILE_RESET_PENDING, int(pfns.size))
            ok = np.zeros(pfns.size, dtype=np.bool_)
        elif not self._take_run(pfns):
            ok = self._take_scattered(pfns, refuse)
        self.counters.inc(VirtioDeviceCounter.INFLATE_BUFFERS, len(items))
        self.counters.inc(VirtioDeviceCounter.INFLATED_PAGES,
                          int(pfns.size) if ok is None else int(ok.sum()))
        if not refuse:
            return [0] * len(items)
        status = (np.full(pfns.size, VIRTIO_BALLOON_X_STATUS_TAKEN, dtype=np.uint8) if ok is None
                  else np.where(ok, VIRTIO_BALLOON_X_STATUS_TAKEN,
                                VIRTIO_BALLOON_X_STATUS_REFUSED).astype(np.uint8))
        out: list[int] = []
        off = 0
        for _, chain, p in items:
            out.append(chain.write_all(self._view, status[off : off + p.size].tobytes()))
            off += p.size
        return out

    def _take_run(self, pfns: PfnArray) -> bool:
        """Take ``pfns`` if they are one ascending run of frames all free to take (the usual
        doorbell: a driver allocates runs); False, having taken nothing, otherwise."""
        if pfns.size == 0 or int(pfns[-1]) - int(pfns[0]) != pfns.size - 1:
            return False  # cannot be one ascending run: no need to look at every step
        if not bool(((pfns[1:] - pfns[:-1]) == 1).all()):
            return False
        lo, hi = int(pfns[0]), int(pfns[-1]) + 1
        if (hi > self._guest_pages or self._inflated_bytes.find(_BALLOONED, lo, hi) >= 0
                or (self._pinned_count and self._pinned[lo:hi].any())
                or self._rings[lo:hi].any()):
            return False
        self._inflated[lo:hi] = True
        self._inflated_count += hi - lo
        self._to_release.append(np.array([[lo, hi]], dtype=np.int64))
        return True

    def _take_scattered(self, pfns: PfnArray, refuse: bool) -> npt.NDArray[np.bool_]:
        """Take what may be taken of ``pfns``, checking each; the mask of frames taken."""
        ok = self._valid_mask(pfns, _INFLATE_PFN)
        safe = np.where(ok, pfns, 0)
        already = ok & self._inflated[safe]
        if already.any():
            self.counters.inc(VirtioDeviceCounter.INFLATE_PFN_ALREADY_IN_BALLOON,
                              int(already.sum()))
            ok &= ~already
        ring = ok & self._rings[safe]
        if ring.any():  # the host would read the ring from a frame it released
            self.counters.inc(VirtioDeviceCounter.INFLATE_PFN_RING, int(ring.sum()))
            ok &= ~ring
        pinned = ok & self._pinned[safe]
        if pinned.any():
            if refuse:
                self.counters.inc(VirtioDeviceCounter.INFLATE_REFUSED_PINNED, int(pinned.sum()))
                ok &= ~pinned
            else:
                self.counters.inc(VirtioDeviceCounter.INFLATE_PINNED_TAKEN, int(pinned.sum()))
        take = pfns[ok]
        if take.size:
            self._to_release.append(coalesce(take))  # released by notify before buffers are used
            self._inflated[take] = True
            self._inflated_count += int(take.size)
        return ok

    def _deflate(self, chain: Chain) -> int | None:
        pfns = self._read_pfns(chain, "deflate")
        ok = self._valid_mask(pfns, _DEFLATE_PFN)
        safe = np.where(ok, pfns, 0)
        absent = ok & ~self._inflated[safe]
        if absent.any():
            self.counters.inc(VirtioDeviceCounter.DEFLATE_PFN_NOT_IN_BALLOON, int(absent.sum()))
            ok &= ~absent
        give = pfns[ok]
        self.counters.inc(VirtioDeviceCounter.DEFLATE_BUFFERS)
        left = self._give(give) if give.size else give
        if left.size:
            # no host memory for some: hold the buffer, so the driver does not use them yet
            self.counters.inc(VirtioDeviceCounter.DEFLATE_HELD)
            self._held.append((self._index_of(BalloonQueue.DEFLATEQ) or 0, chain.head, left))
            return None
        return 0

    def _give(self, pfns: PfnArray, runs: RangeArray | None = None) -> PfnArray:
        """Give balloon frames back to the guest; returns those the host could not back.
        ``runs``: ``coalesce(pfns)`` if the caller has it (a few runs: the bitmap is cleared
        a slice each)."""
        if runs is None:
            runs = coalesce(pfns)
        stuck = self._host.give(runs)
        left = pfns[in_ranges(pfns, stuck)] if len(stuck) else pfns[:0]
        given = pfns[~in_ranges(pfns, stuck)] if len(stuck) else pfns
        if given.size:
            if not len(stuck) and len(runs) <= _FEW_RUNS and int(runs[0, 0]) >= 0:
                for a, b in runs.tolist():
                    self._inflated[a:b] = False
            else:
                self._inflated[given] = False
            self._inflated_count -= int(given.size)
            self.counters.inc(VirtioDeviceCounter.DEFLATED_PAGES, int(given.size))
        return left

    def _stats(self, chain: Chain) -> int | None:
        data = chain.read_all(self._view, MAX_STATS_BUFFER_BYTES)
        values = decode_stats(data, counters=self.counters)
        self.stats = {stat_name(tag): val for tag, val in sorted(values.items())}
        self.stats_seq += 1
        if self._stats_head is not None:
            # a second buffer while we hold one: give the old one back rather than leak it
            self.counters.inc(VirtioDeviceCounter.STATS_EXTRA_BUFFER)
            q = self._index_of(BalloonQueue.STATSQ)
            if q is not None:
                self._queues[q].push_used(self._stats_head, 0)
        self._stats_head = chain.head
        return None

    def _report(self, chain: Chain) -> int:
        if chain.writable_bytes > self._view.guest_bytes:
            raise DescriptorError("reported ranges larger than the guest")
        if not chain.writable:
            return 0
        ext = np.array(chain.writable, dtype=np.int64)  # (gpa, length) rows: < 2**64 each
        gpa, length = ext[:, 0], ext[:, 1]
        bad = ((gpa | length) % PAGE_SIZE != 0) | (length == 0)
        if bool(bad.any()):
            g, n = chain.writable[int(bad.argmax())]  # the first bad one, as a walk finds it
            raise DescriptorError(f"reported range [{g:#x}, +{n:#x}) not page-aligned")
        released = self._host.release_free(
            merge_ranges(gpa >> PAGE_SHIFT, (gpa + length) >> PAGE_SHIFT))
        self.counters.inc(VirtioDeviceCounter.REPORT_BUFFERS)
        self.counters.inc(VirtioDeviceCounter.REPORTED_PAGES, released)
        self.reported_pages_total += released
        return 0
