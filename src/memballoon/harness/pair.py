"""A balloon driver joined to its device on a virtual clock, checked after every step.

Like h11's ``ConnectionPair``: both ends of a protocol in one process, no I/O, no real time.
A ``Pair`` holds a guest (``GuestMemory`` over a ``NullRam``), its workload, the guest's balloon
driver and the host's balloon device, and the link between them: the VMware backdoor as a
function call (``BackdoorTap``), virtio through ``DirectTransport``. ``tick()`` advances the
virtual clock by one period: the workload runs, then the driver's work function (its idle
work when the protocol has nothing to do: the same state, a property test holds it to that);
``work()`` runs the driver alone, for tests that drive the guest's memory themselves;
``restart_device()`` restarts the host's side through a JSON snapshot, under the driver's feet.
``make_pair`` builds a pair by protocol name (benchmarks, simulator); ``vmw_pair`` and
``virtio_pair`` build one with every knob of its protocol (driver and device tests).
``check_pair`` states the invariants the tests, the benchmark and the simulator hold a pair to:

1. the guest's frames partition exactly into states (``GuestMemory.check_invariants``);
2. the device's balloon equals the driver's balloon (nothing stays in flight between periods
   with a synchronous device);
3. every frame the driver holds (balloon and transient) is in state ``BALLOON``, once: no frame
   is both in the balloon and in use, and the guest model counts them all;
4. the sizes both sides report agree;
5. the host holds no memory behind a ballooned frame (the backend released it); with huge host
   pages (``host_page_frames``), none behind a frame of a wholly ballooned host page, and the
   device's ``partial_huge_pages`` is the number of host pages the balloon holds in part;
6. what each protocol adds: VMware holds no refused page between work periods and, while a
   reset is pending, exactly its whole balloon as transient (the host forgot it); virtio's
   config space says the same ``actual``, and a synchronous device leaves nothing in flight.

``QueuePair`` is the same idea one level down: the two ends of one split virtqueue over one
guest-memory view, with the ring indices both ends must agree on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from memballoon.guest.driver import BalloonDriver, idle_each
from memballoon.guest.memory import GuestMemory, StepReport
from memballoon.guest.virtio_driver import (
    VIRTIO_BALLOON_X_MAX_REFUSED_HELD,
    VirtioBalloonDriver,
    driver_area_view,
)
from memballoon.guest.vmw_driver import VmwBalloonDriver
from memballoon.guest.workload import Demand, Idle, Workload
from memballoon.host.device import BalloonDevice
from memballoon.host.ram import NullRam
from memballoon.host.virtio_device import (
    SUPPORTED_FEATURES,
    VirtioBalloonDevice,
    VirtioDeviceSnapshot,
)
from memballoon.host.vmw_device import VmwBalloonDevice, VmwDeviceCounter, VmwDeviceSnapshot
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.pages import PfnArray
from memballoon.model.units import PageState
from memballoon.protocol.virtio_balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX, BalloonConfig
from memballoon.protocol.virtio_transport import DirectTransport
from memballoon.protocol.virtqueue import DeviceQueue, DriverQueue, GuestRamView, QueueLayout
from memballoon.protocol.vmw import (
    Command,
    Request,
    Response,
    Status,
    decode_request,
    decode_response,
)

PROTOCOLS = ("vmw", "vmw-batched", "virtio")

#: The workload of a pair whose test drives the guest's memory itself: nothing runs.
QUIET = Idle(anon_mib=0, file_mib=0, name="quiet")


@dataclass(eq=False)
class Pair:
    protocol: str
    mem: GuestMemory
    ram: NullRam
    driver: BalloonDriver
    device: BalloonDevice
    workload: Workload
    period_s: float
    now: float = 0.0
    cycles: int = 0
    violations: list[str] = field(default_factory=list)
    last_step: StepReport | None = None

    def set_target(self, pages: int) -> None:
        self.device.set_target(pages)

    @property
    def signalled(self) -> bool:
        """Whether a new target reaches the driver at once (virtio's config interrupt,
        VMware's doorbell), not at its next timer (the legacy VMware driver polls)."""
        return False

    def wake(self, now: float) -> None:
        """The host signalled a new target at ``now`` (not before this pair's clock): the
        driver's work runs at once, between two periods of the workload, as the local guest
        process runs it on a config interrupt or a ``WAKE``."""
        if now + 1e-9 < self.now:
            raise UsageError(f"wake at {now:g} s, before the pair's {self.now:g} s")
        self.driver.work(now)
        if self.driver.balloon_pages != self.device.actual_pages:
            self.violations.append(
                f"t={now:g}: driver balloon {self.driver.balloon_pages} != device "
                f"{self.device.actual_pages} after a wake"
            )

    def tick(self, *, check: bool = True, demand: Demand | None = None) -> None:
        """One period: the workload runs for ``period_s``, then the driver's work function.

        When the protocol has nothing to do (``_link_quiet_at``, asked after the workload ran:
        the balloon at its target, nothing in flight or to report now) the driver's work is what
        it does in an idle period, and that is what runs (``_link_idle_work``): a busy guest
        at its target costs its workload, not a round trip to the device per period.
        ``demand``: the workload's demand at this tick's time, when the caller has it already
        (it asked ``quiet`` with it): a workload answers the same for the same time."""
        now = self.now = self.now + self.period_s
        if demand is None:
            demand = self.workload.demand(now)
        self.last_step = self.mem.step(now, self.period_s, demand)
        if self._link_quiet_at(now):
            self._link_idle_tick(now)
        else:
            self.driver.work(now)
        self.cycles += 1
        if check:
            self.violations.extend(f"t={self.now:g}: {v}" for v in check_pair(self))
        elif self.driver.balloon_pages != self.device.actual_pages:
            self.violations.append(
                f"t={self.now:g}: driver balloon {self.driver.balloon_pages} != device "
                f"{self.device.actual_pages}"
            )

    def work(self, periods: int = 1) -> None:
        """``periods`` runs of the driver's work function alone, one period apart (the test
        drives the guest's memory itself; nothing is checked: call ``check``)."""
        for _ in range(periods):
            self.now += self.period_s
            self.driver.work(self.now)
            self.cycles += 1

    def run_until(self, done: Callable[[Pair], bool], max_cycles: int, *,
                  check: bool = True) -> bool:
        """Tick until ``done(pair)`` or ``max_cycles`` ticks; returns whether it got done."""
        for _ in range(max_cycles):
            if done(self):
                return True
            self.tick(check=check)
        return done(self)

    def check(self) -> list[str]:
        """Every broken invariant now (``check_pair``); empty when the pair is consistent."""
        return check_pair(self)

    def link_invariants(self) -> list[str]:
        """What the protocol adds to ``check_pair`` (item 6 of the module docstring)."""
        return []

    def restart_device(self) -> None:
        """The host restarts: the device's snapshot goes through JSON into a new device over
        the same RAM, and the link is joined to it; the driver goes on as if nothing happened."""
        raise UsageError(f"{type(self).__name__} has no device to restart")

    def quiet(self, demand: Demand | None = None) -> bool:
        """The next ``tick`` would change nothing but bookkeeping: the guest model is steady
        under the workload's demand then, and the protocol has nothing to do (each pair's own
        test, ``_link_quiet``). The simulator lets a quiet pair sleep. ``demand``: the
        workload's at the next tick's time, when the caller has it (it hands it to that tick)."""
        if demand is None:
            demand = self.workload.demand(self.now + self.period_s)
        return self.mem.steady(demand) and self._link_quiet()

    def idle_period(self) -> None:
        """One period of a quiet pair without running it: exactly what ``tick`` (unchecked)
        would do then, the idle step's report and the protocol's bookkeeping. Only while
        ``quiet()`` holds and nothing changed since (a target, the demand)."""
        self.idle_until(self.now + self.period_s)

    def idle_until(self, limit: float) -> int:
        """``idle_period`` for every period whose tick falls at or before ``limit``, in one
        call (the simulator's catch-up of a guest that slept); returns how many. The clock
        moves by the same additions, and the driver sees each period's time, so the pair ends
        exactly where as many ``idle_period`` calls end; only the per-period overhead goes."""
        p = self.period_s
        now = self.now
        if now + p > limit:
            return 0
        now, n = self._link_idle_run(now, limit)
        self.now = now
        self.last_step = StepReport(now, p, 0.0, 0, 0, 0, False, 0, True)
        self._link_idle_periods(n)
        self.cycles += n
        return n

    def _link_quiet(self) -> bool:
        return False

    def _link_quiet_at(self, now: float) -> bool:
        """``_link_quiet`` for the period at ``now`` alone (``tick``'s test, after the
        workload ran): whether the driver's work then is its idle work. A protocol whose
        quiet looks beyond this period (virtio's free page reporting) answers cheaper."""
        return self._link_quiet()

    def _link_idle_work(self) -> Callable[[float], None]:
        """What the driver does in each idle period, given that period's time."""
        raise UsageError(f"{type(self).__name__} cannot skip a period")

    def _link_idle_tick(self, now: float) -> None:
        """The driver's idle work of the period at ``now`` and the protocol's bookkeeping of
        it (``tick`` of a quiet link; a protocol may do both in one call)."""
        self._link_idle_work()(now)
        self._link_idle_periods(1)

    def _link_idle_run(self, now: float, limit: float) -> tuple[float, int]:
        """The driver's idle work of every period after ``now`` whose tick falls at or
        before ``limit``: the clock after them (the same float additions) and how many. A
        driver that can account them in one call does (``idle_run``)."""
        return idle_each(self._link_idle_work(), now, self.period_s, limit)

    def _link_idle_periods(self, n: int) -> None:
        """The protocol's bookkeeping of ``n`` idle periods beyond the driver's (counters)."""


def check_pair(pair: Pair) -> list[str]:
    """Every broken invariant of the pair (see the module docstring), as sentences."""
    errs = list(pair.mem.check_invariants())
    drv = pair.driver.balloon_pfns()
    dev = pair.device.balloon_pfns()
    if not np.array_equal(drv, dev):
        only_drv = np.setdiff1d(drv, dev).size
        only_dev = np.setdiff1d(dev, drv).size
        errs.append(f"balloons differ: {only_drv} frames only in the driver's, "
                    f"{only_dev} only in the device's")
    trans = pair.driver.transient_pfns()
    held = np.concatenate((drv, trans))
    if held.size and not bool((pair.mem.state[held] == PageState.BALLOON).all()):
        errs.append("a frame the driver holds is not in state BALLOON (in use elsewhere)")
    if _held_twice(drv, trans, pair.mem.total_pages):
        errs.append("a frame is held twice by the driver (in the balloon and transient)")
    if held.size != pair.mem.balloon_pages:
        errs.append(f"driver holds {held.size} frames, guest model counts "
                    f"{pair.mem.balloon_pages} in the balloon")
    if pair.driver.balloon_pages != drv.size:
        errs.append(f"driver says {pair.driver.balloon_pages} pages, lists {drv.size}")
    if pair.device.actual_pages != pair.driver.balloon_pages:
        errs.append(f"device actual {pair.device.actual_pages} != driver balloon "
                    f"{pair.driver.balloon_pages}")
    hp = pair.ram.host_page_frames
    whole = drv
    if hp > 1:
        per_page = np.bincount(drv // hp, minlength=pair.ram.guest_pages // hp)
        whole = drv[per_page[drv // hp] == hp]
        partial = int(np.count_nonzero((per_page > 0) & (per_page < hp)))
        if pair.device.partial_huge_pages != partial:
            errs.append(f"device counts {pair.device.partial_huge_pages} partial huge pages, "
                        f"the balloon has {partial}")
    # frames whose release the host failed are owed, not lost: held until it pays them
    held_back = pair.ram.resident_pages_of(whole) if whole.size else 0
    if held_back > pair.device.release_owed_pages:
        errs.append(f"host still holds {held_back} ballooned frames "
                    f"({pair.device.release_owed_pages} of them owed)")
    errs.extend(pair.link_invariants())
    return errs


def _held_twice(drv: PfnArray, trans: PfnArray, total_pages: int) -> bool:
    """Whether a frame is in ``drv`` twice, in ``trans`` twice, or in both. Both are sorted
    (``BalloonDriver``): neighbours and a search of the few transient frames tell, at the
    cost of the frames held, not of the guest; unsorted ones are marked in a bitmap."""
    if not (_ascending(drv) and _ascending(trans)):
        seen = np.zeros(total_pages, dtype=np.bool_)
        held = np.concatenate((drv, trans))
        seen[held] = True
        return int(np.count_nonzero(seen)) != held.size
    if bool((drv[1:] == drv[:-1]).any()) or bool((trans[1:] == trans[:-1]).any()):
        return True
    if drv.size == 0 or trans.size == 0:
        return False
    i = np.minimum(np.searchsorted(drv, trans), drv.size - 1)
    return bool((drv[i] == trans).any())


def _ascending(p: PfnArray) -> bool:
    return p.size < 2 or bool((p[1:] >= p[:-1]).all())


# ---------------------------------------------------------------------------- VMware
@dataclass(eq=False)
class BackdoorTap:
    """The VMware backdoor as a plain function call to the device, with a tap for tests.

    With ``log`` (a list), every command is recorded with the status the device answered.
    ``before`` runs ahead of each command with the decoded request: a test uses it to make the
    host change its mind mid-cycle (a new target, a reset, a busy spell), as a host may.
    ``reply`` may replace the device's answer (a host sending garbage). Untapped, a call costs
    one attribute test more than calling ``device.handle``.
    """

    device: VmwBalloonDevice
    log: list[tuple[Command, int, Status]] | None = None
    before: Callable[[Request], None] | None = None
    reply: Callable[[Request, bytes], bytes] | None = None

    def call(self, request: bytes) -> bytes:
        if self.log is None and self.before is None and self.reply is None:
            return self.device.handle(request)
        req = decode_request(request)
        if self.before is not None:
            self.before(req)
        answer = self.device.handle(request)
        if self.log is not None:
            self.log.append((req.command, req.data, decode_response(answer, req).status))
        return answer if self.reply is None else self.reply(req, answer)

    def commands(self) -> list[Command]:
        """The commands logged so far, in order."""
        return [c for c, _, _ in self.log or ()]

    @property
    def tapped(self) -> bool:
        return self.log is not None or self.before is not None or self.reply is not None

    def lock_run(self, pfns: PfnArray) -> int:
        """A run of version-2 LOCKs in one call (``VmwBalloonDevice.lock_run``); none through
        a tap, which must see every command."""
        return 0 if self.tapped else self.device.lock_run(pfns)

    def unlock_run(self, pfns: PfnArray) -> int:
        """A run of version-2 UNLOCKs in one call (``VmwBalloonDevice.unlock_run``)."""
        return 0 if self.tapped else self.device.unlock_run(pfns)

    def answer(self, request: Request) -> Response | None:
        """A command as a message (``VmwBalloonDevice.answer``: no frame encoded or parsed
        either way); none through a tap, which must see every frame."""
        return None if self.tapped else self.device.answer(request)


@dataclass(eq=False)
class VmwPair(Pair):
    driver: VmwBalloonDriver
    device: VmwBalloonDevice
    port: BackdoorTap = field(kw_only=True)
    yields: int = field(default=0, kw_only=True)  # the driver's cond_resched() calls

    def cond_resched(self) -> None:
        self.yields += 1

    @property
    def signalled(self) -> bool:
        # the batched driver's doorbell (SIGNALLED_WAKEUP_CMD), which the local world sends
        # as a WAKE message to every vmw-batched guest (local/host.py); the legacy one polls
        return self.protocol == "vmw-batched"

    def _link_quiet(self) -> bool:
        # the device answers GET_TARGET with the size; nothing taps the link (a tap sees
        # every command)
        dev, limit = self.device, self.mem.managed_pages
        return (self.driver.quiet() and dev.plain and dev.guest_limit == limit
                and min(dev.target_pages, limit) == self.driver.size and not self.port.tapped)

    def _link_idle_work(self) -> Callable[[float], None]:
        return self.driver.idle_work

    def _link_idle_run(self, now: float, limit: float) -> tuple[float, int]:
        return self.driver.idle_run(now, self.period_s, limit)

    def _link_idle_periods(self, n: int) -> None:
        self.device.counters.inc(VmwDeviceCounter.CMD_GET_TARGET, n)  # one per period

    def restart_device(self) -> None:
        old = self.device
        snap = VmwDeviceSnapshot.from_json(old.snapshot().to_json())
        self.device = self.port.device = VmwBalloonDevice.restore(
            snap, self.ram, supports_batched=old.supports_batched, supports_2m=old.supports_2m,
            defer_release=old.defer_release)

    def link_invariants(self) -> list[str]:
        errs: list[str] = []
        drv = self.driver
        transient = drv.transient_pfns().size
        if drv.reset_required and transient != drv.size:
            errs.append(f"reset pending: {transient} transient frames, balloon size {drv.size}")
        elif not drv.reset_required and transient:
            errs.append(f"{transient} transient frames between work periods")
        refused = sum(ps.n_refused_pages + len(ps.refused_pages) for ps in drv.page_sizes)
        if refused:
            errs.append(f"{refused} refused pages held between work periods")
        return errs


def vmw_pair(
    guest_pages: int,
    workload: Workload = QUIET,
    *,
    batched: bool = False,
    huge_pages: bool = True,
    supports_batched: bool = True,
    supports_2m: bool = True,
    record: bool = False,
    load: bool = True,
    swap_pages: int = 0,
    period_s: float | None = None,
    host_page_frames: int = 1,
) -> VmwPair:
    """A VMware pair: ``batched`` drivers offer batches (and 2 MiB pages with ``huge_pages``);
    ``supports_*`` is what the device grants; ``record`` logs every command on ``port``;
    ``host_page_frames`` 512 backs the guest with 2 MiB host pages."""
    ram = NullRam(guest_pages, host_page_frames=host_page_frames)
    mem = GuestMemory(guest_pages, swap_pages=swap_pages, store=ram,
                      host_page_frames=host_page_frames)
    dev = VmwBalloonDevice(ram, supports_batched=supports_batched, supports_2m=supports_2m)
    port = BackdoorTap(dev, [] if record else None)
    drv = VmwBalloonDriver(mem, port, batched=batched, huge_pages=huge_pages)
    pair = VmwPair("vmw-batched" if batched else "vmw", mem, ram, drv, dev, workload,
                   drv.period_s if period_s is None else period_s, port=port)
    drv.cond_resched = pair.cond_resched
    if load:
        drv.load(pair.now)
    return pair


# ---------------------------------------------------------------------------- virtio
@dataclass(eq=False)
class VirtioPair(Pair):
    driver: VirtioBalloonDriver
    device: VirtioBalloonDevice
    transport: DirectTransport = field(kw_only=True)

    def restart_device(self) -> None:
        snap = VirtioDeviceSnapshot.from_json(self.device.snapshot().to_json())
        new = VirtioBalloonDevice.restore(snap, self.ram, self.device.view)
        self.device = self.transport.device = new
        new.attach(self.transport)

    @property
    def signalled(self) -> bool:
        return True  # a config change interrupts the guest

    def _link_quiet(self) -> bool:
        return self._link_quiet_at(math.inf)  # (a reporting pass is always due then)

    def _link_quiet_at(self, now: float) -> bool:
        # a reporting pass not due at ``now`` cannot run: the driver skips the search for
        # free blocks (``quiet_at``)
        return self.driver.quiet_at(now) and self.device.settled and self.transport.idle

    def _link_idle_work(self) -> Callable[[float], None]:
        return self.driver.idle_work

    def _link_idle_tick(self, now: float) -> None:
        self.driver.idle_work(now)  # no bookkeeping beyond the driver's

    def _link_idle_run(self, now: float, limit: float) -> tuple[float, int]:
        return self.driver.idle_run(now, self.period_s, limit)

    def link_invariants(self) -> list[str]:
        errs: list[str] = []
        actual = BalloonConfig.decode(self.device.read_config()).actual
        if actual != self.driver.balloon_pages:
            errs.append(f"config actual {actual} != driver balloon {self.driver.balloon_pages}")
        # refused frames wait aside until the target is reached: not in flight
        transient = self.driver.transient_pfns().size - self.driver.refused_pages
        if not self.transport.deferred and transient:
            errs.append(f"{transient} frames in flight with a synchronous device")
        if self.driver.refused_pages > VIRTIO_BALLOON_X_MAX_REFUSED_HELD:
            errs.append(f"{self.driver.refused_pages} refused frames held, more than "
                        f"{VIRTIO_BALLOON_X_MAX_REFUSED_HELD}")
        return errs


def virtio_pair(
    guest_pages: int,
    workload: Workload = QUIET,
    *,
    features: int = SUPPORTED_FEATURES,
    deferred: bool = False,
    load: bool = True,
    swap_pages: int = 0,
    period_s: float | None = None,
    host_page_frames: int = 1,
    array_pfns: int = VIRTIO_BALLOON_ARRAY_PFNS_MAX,
) -> VirtioPair:
    """A virtio pair: the device offers ``features``; the driver and device share a 64 KiB view
    standing for the driver's area of guest RAM; with ``deferred`` the transport holds kicks
    until ``transport.run_device()`` (buffers stay in flight); ``host_page_frames`` 512 backs
    the guest with 2 MiB host pages; ``array_pfns`` is the driver's PFNs an array."""
    ram = NullRam(guest_pages, host_page_frames=host_page_frames)
    mem = GuestMemory(guest_pages, swap_pages=swap_pages, store=ram,
                      host_page_frames=host_page_frames)
    dev = VirtioBalloonDevice(ram, driver_area_view(guest_pages, array_pfns=array_pfns),
                              features=features)
    transport = DirectTransport(dev, deferred=deferred)
    drv = VirtioBalloonDriver(mem, transport, array_pfns=array_pfns)
    pair = VirtioPair("virtio", mem, ram, drv, dev, workload,
                      drv.period_s if period_s is None else period_s, transport=transport)
    if load:
        drv.load(pair.now)
    return pair


def make_pair(
    protocol: str,
    guest_pages: int,
    workload: Workload,
    *,
    swap_pages: int = 0,
    period_s: float | None = None,
    host_page_frames: int = 1,
) -> Pair:
    """A driver/device pair of ``protocol`` over a fresh guest of ``guest_pages``."""
    match protocol:
        case "vmw" | "vmw-batched":
            return vmw_pair(guest_pages, workload, batched=protocol == "vmw-batched",
                            swap_pages=swap_pages, period_s=period_s,
                            host_page_frames=host_page_frames)
        case "virtio":
            return virtio_pair(guest_pages, workload, swap_pages=swap_pages, period_s=period_s,
                               host_page_frames=host_page_frames)
        case _:
            raise UsageError(
                f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


# ---------------------------------------------------------------------------- one virtqueue
_U16 = 0xFFFF


@dataclass(frozen=True, eq=False)
class QueuePair:
    """Both ends of one split virtqueue over one view of guest memory."""

    view: GuestRamView
    driver: DriverQueue
    device: DeviceQueue

    def check(self) -> list[str]:
        """The ring indices both ends must agree on, between honest steps."""
        errs: list[str] = []
        lay, dev, drv = self.device.layout, self.device, self.driver
        if drv.broken or dev.broken:
            errs.append(f"broken: driver {drv.broken}, device {dev.broken}")
        avail = (self.view.read_u16(lay.avail_gpa + 2) - dev.last_avail) & _U16
        held = (dev.last_avail - dev.used_idx) & _U16
        if avail > lay.size:
            errs.append(f"{avail} heads available for a queue of {lay.size}")
        if held > lay.size:
            errs.append(f"the device holds {held} chains in a queue of {lay.size}")
        if self.view.read_u16(lay.used_gpa + 2) != dev.used_idx:
            errs.append("used.idx in the ring is not the device's")
        if drv.in_flight < avail + held:
            errs.append(f"driver counts {drv.in_flight} chains in flight, the device sees "
                        f"{avail} available and holds {held}")
        if drv.num_free + drv.in_flight > lay.size:
            errs.append(f"{drv.num_free} free descriptors and {drv.in_flight} chains in flight "
                        f"in a queue of {lay.size}")
        return errs


def queue_pair(
    view: GuestRamView, gpa: int, size: int, *, start_index: int = 0, indirect: bool = False,
    readable: bool = True, writable: bool = True,
) -> QueuePair:
    """A queue of ``size`` packed at ``gpa`` in ``view``, both ends starting at
    ``start_index``; the device takes indirect tables only with ``indirect``."""
    layout = QueueLayout.packed(gpa, size)
    driver = DriverQueue(view, layout, Counters(), start_index=start_index)
    device = DeviceQueue(view, layout, indirect=indirect, readable=readable, writable=writable,
                         start_index=start_index)
    return QueuePair(view, driver, device)
