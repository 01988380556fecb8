"""A balloon driver joined to its device on a virtual clock, checked after every step.

Like h11's ``ConnectionPair``: both ends of a protocol in one process, no I/O, no real time.
A ``Pair`` holds a guest (``GuestMemory`` over a ``NullRam``), its workload, the guest's balloon
driver and the host's balloon device, wired directly (the VMware backdoor as a function call,
virtio through ``DirectTransport``). ``tick()`` advances the virtual clock by one period: the
workload runs, then the driver's work function. ``check_pair`` states the invariants the
tests, the benchmark and the simulator hold the pair to:

1. the guest's frames partition exactly into states (``GuestMemory.check_invariants``);
2. the device's balloon equals the driver's balloon (nothing stays in flight between periods
   with a synchronous device);
3. every frame the driver holds (balloon and transient) is in state ``BALLOON``: no frame is
   both in the balloon and in use, and the guest model counts them all;
4. the sizes both sides report agree;
5. the host holds no memory behind a ballooned frame (the backend released it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from memballoon.guest.driver import BalloonDriver
from memballoon.guest.memory import GuestMemory, StepReport
from memballoon.guest.workload import Workload
from memballoon.host.device import BalloonDevice
from memballoon.host.ram import NullRam
from memballoon.model.errors import UsageError
from memballoon.model.units import PageState

PROTOCOLS = ("vmw", "vmw-batched", "virtio")


@dataclass
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

    def tick(self, *, check: bool = True) -> None:
        """One period: the workload runs for ``period_s``, then the driver's work function."""
        self.now += self.period_s
        self.last_step = self.mem.step(self.now, self.period_s, self.workload.demand(self.now))
        self.driver.work(self.now)
        self.cycles += 1
        if check:
            self.violations.extend(f"t={self.now:g}: {v}" for v in check_pair(self))
        elif self.driver.balloon_pages != self.device.actual_pages:
            self.violations.append(
                f"t={self.now:g}: driver balloon {self.driver.balloon_pages} != device "
                f"{self.device.actual_pages}"
            )

    def run_until(self, done: Callable[[Pair], bool], max_cycles: int, *,
                  check: bool = True) -> bool:
        """Tick until ``done(pair)`` or ``max_cycles`` ticks; returns whether it got done."""
        for _ in range(max_cycles):
            if done(self):
                return True
            self.tick(check=check)
        return done(self)


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
    held = np.concatenate((drv, pair.driver.transient_pfns()))
    if held.size and not bool((pair.mem.state[held] == PageState.BALLOON).all()):
        errs.append("a frame the driver holds is not in state BALLOON (in use elsewhere)")
    if held.size != pair.mem.balloon_pages:
        errs.append(f"driver holds {held.size} frames, guest model counts "
                    f"{pair.mem.balloon_pages} in the balloon")
    if pair.driver.balloon_pages != drv.size:
        errs.append(f"driver says {pair.driver.balloon_pages} pages, lists {drv.size}")
    if pair.device.actual_pages != pair.driver.balloon_pages:
        errs.append(f"device actual {pair.device.actual_pages} != driver balloon "
                    f"{pair.driver.balloon_pages}")
    if drv.size and pair.ram.resident_pages_of(drv):
        errs.append(f"host still holds {pair.ram.resident_pages_of(drv)} ballooned frames")
    return errs


def make_pair(
    protocol: str,
    guest_pages: int,
    workload: Workload,
    *,
    swap_pages: int = 0,
    period_s: float | None = None,
) -> Pair:
    """A driver/device pair of ``protocol`` over a fresh guest of ``guest_pages``."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    ram = NullRam(guest_pages)
    mem = GuestMemory(guest_pages, swap_pages=swap_pages, store=ram)
    driver: BalloonDriver
    device: BalloonDevice
    match protocol:
        case "vmw" | "vmw-batched":
            from memballoon.guest.vmw_driver import VmwBalloonDriver
            from memballoon.host.vmw_device import VmwBalloonDevice

            vdev = VmwBalloonDevice(ram)
            device = vdev
            driver = VmwBalloonDriver(mem, _Port(vdev.handle), batched=protocol == "vmw-batched")
        case "virtio":
            from memballoon.harness.virtio_wiring import make_virtio

            driver, device = make_virtio(mem, ram)
        case _:
            raise AssertionError(protocol)
    driver.load(0.0)
    return Pair(protocol, mem, ram, driver, device, workload,
                period_s if period_s is not None else driver.period_s)


class _Port:
    """The VMware backdoor as a plain function call to the device."""

    __slots__ = ("call",)

    def __init__(self, handle: Callable[[bytes], bytes]) -> None:
        self.call = handle
