"""``memballoon guest``: one local guest process (edge code: real clock, socket, eventfds).

Theory of operation
-------------------
The host starts this process with inherited fds: one end of a socketpair, the guest's RAM
memfd and, for virtio, one doorbell and one interrupt eventfd per queue (their numbers are on
the command line). A root host has put it in its memory cgroup and under a private uid before
it started (local/confine.py: nothing is left to the guest); the first thing it does itself is
make itself not dumpable, so that no process of its uid can open its memfd through /proc.

It then says HELLO, maps the memfd (``MemfdRam.attach``: size, seals and page size checked
against ``--ram``), builds the guest model (``GuestMemory`` over that RAM, so the workload
writes real, stamped data; with huge-page RAM its balloon takes whole 2 MiB blocks first), the
workload and one balloon driver (``vmw``: the seed's version-2 driver, one backdoor round trip
per page; ``vmw-batched``: v4.20+ batches, 2 MiB pages first; ``virtio``), loads the driver and
loops on the real clock:

- every ``period_s``: the workload runs for the period (``GuestMemory.step``), the driver's
  work function runs (the legacy VMware driver polls this way), and a ``STATUS`` pressure
  report goes to the host (protocol/pressure.py);
- at once when the host pushes a virtio config change or a VMware ``WAKE``: the driver's work
  runs, as Linux's config-change interrupt queues ``update_balloon_size_func``; a virtio work
  call that leaves buffers in flight is followed, once they are used, by another one that
  collects them and writes ``actual``; "Out of puff" retries after the driver's own 200 ms;
- ``CONTROL`` requests from the host (``touch_free``: write every free page, as a guest that
  used and freed its memory; ``verify``: check every page in use still holds what was written
  to it; ``stats``) are answered in order with ``CONTROL_REPLY``;
- ``BYE`` or EOF ends the process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from memballoon.guest.driver import BalloonDriver
from memballoon.guest.memory import GuestMemory, StepReport
from memballoon.guest.report import guest_report
from memballoon.guest.workload import WORKLOADS, make_workload, parse_spec
from memballoon.host.memfd import MemfdRam
from memballoon.local.confine import set_dumpable
from memballoon.local.link import GuestLink, LinkClosedError
from memballoon.local.transport_virtio import LocalVirtioTransport
from memballoon.local.transport_vmw import SocketBackdoor
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import MemballoonError
from memballoon.model.units import MIB, PAGE_SIZE, PageState, RamKind
from memballoon.protocol.pressure import PressureReport
from memballoon.protocol.virtqueue import GuestRamView
from memballoon.protocol.wire import UNEXPECTED, Kind, Message

PROTOCOLS: Final = ("vmw", "vmw-batched", "virtio")
HELLO_VERSION: Final = 1
#: Work calls after a virtio work call that left buffers in flight (each collects, the last
#: writes ``actual``); bounds the loop if the host keeps changing the target.
MAX_TAIL_WORKS: Final = 16
#: How long the guest waits for the host to use a virtio buffer before it goes on. The host
#: answers in well under a millisecond, but it may hold a deflate for want of memory (a hugetlb
#: pool run dry): the guest must keep running meanwhile, not sit in a wait.
VIRTIO_WAIT_S: Final = 0.5
#: Exit statuses.
EXIT_OK: Final = 0
EXIT_HOST_GONE: Final = 3
#: ESX samples 100 random pages per 30 s period (Waldspurger, OSDI 2002, section 5.2).
ACTIVE_SAMPLE_PERIOD_S: Final = 30.0
ACTIVE_SAMPLE_PAGES: Final = 100


class GuestRuntimeCounter(CounterName):
    """What ``GuestRuntime`` counts in the guest process's bag (shared with its link, transport
    and RAM)."""

    CONTROL_UNKNOWN = "control_unknown"  # CONTROL requests of an unknown op (answered: error)
    WAKEUPS = "wakeups"  # WAKE messages from the host


@dataclass(frozen=True, slots=True)
class GuestConfig:
    name: str
    protocol: str
    pages: int
    workload: str
    seed: int
    period_s: float
    sock_fd: int
    mem_fd: int
    kick_fds: tuple[int, ...] = ()
    irq_fds: tuple[int, ...] = ()
    prefault: bool = False
    swap_pages: int = 0
    sample_period_s: float = ACTIVE_SAMPLE_PERIOD_S
    ram: RamKind = RamKind.SMALL
    array_pfns: int | None = None  # virtio: PFNs an array (None: Linux's, or 16 huge pages)


class GuestRuntime:
    """One guest: its memory model, workload and driver on a real clock (module docstring)."""

    def __init__(self, cfg: GuestConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        if cfg.protocol not in PROTOCOLS:
            raise MemballoonError(f"unknown protocol {cfg.protocol!r}")
        if cfg.period_s <= 0:
            raise MemballoonError(f"period must be positive, got {cfg.period_s}")
        self.cfg = cfg
        self.clock = clock
        self.counters = Counters()
        self.link = GuestLink(socket.socket(fileno=cfg.sock_fd), counters=self.counters)
        self.link.send(Kind.HELLO, json.dumps({
            "v": HELLO_VERSION, "guest": cfg.name, "protocol": cfg.protocol,
            "pages": cfg.pages, "pid": os.getpid(),
        }).encode())
        self.ram = MemfdRam.attach(cfg.mem_fd, cfg.pages, kind=cfg.ram, counters=self.counters)
        self.mem = GuestMemory(cfg.pages, swap_pages=cfg.swap_pages, store=self.ram,
                               host_page_frames=cfg.ram.host_page_frames)
        self.workload = make_workload(cfg.workload, cfg.pages * PAGE_SIZE / MIB, cfg.seed)
        self.transport: LocalVirtioTransport | None = None
        self.driver: BalloonDriver
        if cfg.protocol == "virtio":
            from memballoon.guest.virtio_driver import VirtioBalloonDriver

            view = GuestRamView(self.ram.mapping, base_gpa=0, guest_bytes=self.ram.size_bytes)
            self.transport = LocalVirtioTransport(self.link, view, cfg.kick_fds, cfg.irq_fds,
                                                  wait_timeout_s=VIRTIO_WAIT_S)
            from memballoon.guest.virtio_driver import HUGE_ARRAY_PFNS
            from memballoon.protocol.virtio_balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX

            array = cfg.array_pfns or (VIRTIO_BALLOON_ARRAY_PFNS_MAX if cfg.ram is RamKind.SMALL
                                       else HUGE_ARRAY_PFNS)
            self.driver = VirtioBalloonDriver(self.mem, self.transport, array_pfns=array)
        else:
            from memballoon.guest.vmw_driver import VmwBalloonDriver

            self.driver = VmwBalloonDriver(
                self.mem, SocketBackdoor(self.link), batched=cfg.protocol == "vmw-batched"
            )
        self.t0 = clock()
        self._held: tuple[int, int] | None = None  # virtio buffers in flight a drain gave up on
        self.last_step: StepReport | None = None
        self.running = True
        # the active-page sample rides in every report until the next one is taken
        self.sample_rng = random.Random(cfg.seed ^ 0x5A5A)
        self.active_touched = 0
        self.active_sampled = 0
        self.next_sample = 0.0

    # ------------------------------------------------------------------ pieces
    def now(self) -> float:
        return self.clock() - self.t0

    def work(self, now: float) -> float:
        """Run the driver's work; returns when it wants to run again at the latest."""
        d = self.driver
        d.work(now)
        t = self.transport
        if t is not None:
            for _ in range(MAX_TAIL_WORKS):
                flight = (t.in_flight(0), t.in_flight(1))
                if flight == (0, 0) and not t.config_pending:
                    break
                if flight == self._held and not t.config_pending:
                    break  # the host still holds what it held last time: do not wait again
                t.config_pending = False
                drained = t.drain()
                d.work(now)
                if not drained:
                    # the host holds buffers (no memory to back a deflate): run on, a later
                    # work collects them
                    self._held = (t.in_flight(0), t.in_flight(1))
                    break
                self._held = None
            if d.balloon_pages != d.target_pages or self._held is not None:
                # out of puff (Linux retries after 200 ms), or buffers the host still holds:
                # come back to collect them
                return now + d.period_s
        return float("inf")

    def report(self, now: float) -> PressureReport:
        if now >= self.next_sample and self.last_step is not None:
            self.active_touched = self.mem.sample_active(self.sample_rng, ACTIVE_SAMPLE_PAGES)
            self.active_sampled = ACTIVE_SAMPLE_PAGES
            self.next_sample = now + self.cfg.sample_period_s
        return guest_report(
            self.cfg.name, round(now, 6), self.mem, self.driver,
            stall_pct=round(self.last_step.stall_pct, 3) if self.last_step else 0.0,
            active_sampled=self.active_sampled, active_touched=self.active_touched,
        )

    def touch_free(self) -> int:
        """Write every free frame (a guest that used its memory and freed it again)."""
        pfns = np.flatnonzero(self.mem.state == PageState.FREE).astype(np.int64)
        self.ram.touch(pfns, self.mem.generation)
        return int(pfns.size)

    def control(self, payload: bytes) -> dict[str, Any]:
        try:
            req = json.loads(payload)
            op = req.get("op") if isinstance(req, dict) else None
        except ValueError:
            op = None
        t = time.perf_counter()
        match op:
            case "touch_free":
                out: dict[str, Any] = {"touched_pages": self.touch_free()}
            case "verify":
                used = len(self.mem.anon) + len(self.mem.cache)
                out = {"checked_pages": used, "lost_pages": self.mem.verify_contents(),
                       "invariant_errors": self.mem.check_invariants()}
            case "stats":
                out = {"driver": self.driver.stats(), "counters": self.counters.as_dict()}
            case _:
                self.counters.inc(GuestRuntimeCounter.CONTROL_UNKNOWN)
                return {"error": f"unknown op {op!r}"}
        out["seconds"] = time.perf_counter() - t
        return out

    def handle(self, m: Message, now: float) -> bool:
        """One host message from the inbox; returns whether the driver's work should run."""
        match m.kind:
            case Kind.WAKE:
                self.counters.inc(GuestRuntimeCounter.WAKEUPS)
                return self.cfg.protocol == "vmw-batched"  # the legacy driver polls
            case Kind.CONTROL:
                reply = self.control(m.payload)
                self.link.send(Kind.CONTROL_REPLY, json.dumps(reply).encode())
            case Kind.BYE:
                self.running = False
            case _:
                self.counters.inc(UNEXPECTED[m.kind])
        return False

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg = self.cfg
        self.driver.load(self.now())
        if cfg.prefault:
            self.touch_free()
        period = cfg.period_s
        next_step = self.now()
        next_work = float("inf")
        try:
            while self.running:
                now = self.now()
                run_work = stepped = False
                if now >= next_step:
                    self.last_step = self.mem.step(max(now, 1e-9), period,
                                                   self.workload.demand(now))
                    run_work = stepped = True
                    next_step = max(next_step + period, now)
                if self.transport is not None and self.transport.config_pending:
                    self.transport.config_pending = False
                    run_work = True
                if self._held is not None and self.link.inbox:
                    # a drain gave up on buffers the host held (a loaded host can take longer
                    # than VIRTIO_WAIT_S): collect what it used since before serving its
                    # requests, so touch_free finds the frames a finished deflate gave back
                    next_work = self.work(now)
                while self.link.inbox and self.running:
                    run_work |= self.handle(self.link.inbox.popleft(), now)
                if not self.running:
                    break
                if run_work or now >= next_work:
                    next_work = self.work(now)
                if stepped:
                    self.link.send(Kind.STATUS, self.report(self.now()).encode())
                wake = min(next_step, next_work) - self.now()
                if wake > 0 and not self.link.inbox and not (
                    self.transport is not None and self.transport.config_pending
                ):
                    self.link.pump(wake)
            self.link.send(Kind.BYE)
            return EXIT_OK
        except LinkClosedError:
            return EXIT_HOST_GONE


# ---------------------------------------------------------------------- command line
def _fds(text: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        fds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of fds: {text!r}") from None
    if any(fd < 0 for fd in fds):
        raise argparse.ArgumentTypeError(f"negative fd in {text!r}")
    return fds


def _workload(text: str) -> str:
    try:
        parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="guest name")
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--pages", type=int, required=True, help="guest RAM in 4 KiB pages")
    p.add_argument("--workload", type=_workload, default="idle",
                   help=f"{', '.join(WORKLOADS)}, optionally with parameters "
                   "('bursty:peak=0.8,period=40'; guest/workload.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--period", type=float, default=1.0, help="work period, seconds (default 1)")
    p.add_argument("--sock-fd", type=int, required=True, help="inherited socket to the host")
    p.add_argument("--mem-fd", type=int, required=True, help="inherited memfd of the guest's RAM")
    p.add_argument("--kick-fds", type=_fds, default=(), help="virtio doorbell eventfds, by queue")
    p.add_argument("--irq-fds", type=_fds, default=(), help="virtio interrupt eventfds, by queue")
    p.add_argument("--prefault", action="store_true", help="write every free page at start")
    p.add_argument("--swap-pages", type=int, default=0)
    p.add_argument("--sample-period", type=float, default=ACTIVE_SAMPLE_PERIOD_S,
                   help="seconds between ESX-style active-page samples (default 30)")
    p.add_argument("--ram", type=RamKind, choices=list(RamKind), default=RamKind.SMALL,
                   help="what backs the RAM on the host: 4k, thp or hugetlb (default 4k)")
    p.add_argument("--array-pfns", type=int, default=None,
                   help="virtio: PFNs an inflate/deflate array (default: Linux's 256 with 4k "
                        "RAM, 8192 (sixteen 2 MiB pages) with huge pages)")


def config_from_args(a: argparse.Namespace) -> GuestConfig:
    return GuestConfig(
        name=a.name, protocol=a.protocol, pages=a.pages, workload=a.workload, seed=a.seed,
        period_s=a.period, sock_fd=a.sock_fd, mem_fd=a.mem_fd, kick_fds=a.kick_fds,
        irq_fds=a.irq_fds, prefault=a.prefault,
        swap_pages=a.swap_pages, sample_period_s=a.sample_period, ram=a.ram,
        array_pfns=a.array_pfns,
    )


def _cmd_guest(a: argparse.Namespace) -> int:
    set_dumpable(False)  # first: our memfd is not to be opened through /proc/PID/fd
    return GuestRuntime(config_from_args(a)).run()


def register(sub: Any) -> None:
    """Add the ``guest`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("guest", help="run one local guest process (started by the host)",
                       description="One local guest: memfd RAM, a workload, a balloon driver.")
    add_arguments(p)
    p.set_defaults(func=_cmd_guest)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memballoon guest")
    add_arguments(p)
    try:
        return _cmd_guest(p.parse_args(argv))
    except (MemballoonError, OSError) as exc:
        print(f"memballoon guest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
