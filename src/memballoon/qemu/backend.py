"""The manager's Backend (manager/port.py) for N QEMU guests, over QMP and the agent port.

The engine's port is synchronous; QMP is not. ``refresh`` (the async shell calls it before each
engine step) polls every guest at once and keeps the answers; ``guests`` returns them;
``set_target`` checks and queues a target; ``flush`` (after the step) sends the queued targets
(``apply_target``). A report's ``report_time`` is the backend's clock (the engine's) when the
agent's line was taken.

Per guest the backend holds a QmpClient (the truth about the balloon: ``query-balloon``), an
AgentChannel (pressure: the in-guest agent's latest line, converted to the manager's
PressureReport) and, for guests it launched, the QemuProcess. Units are converted here: the
manager speaks balloon pages, QMP the guest's logical size in bytes.

Failure handling, guest by guest (the others never notice):
- QEMU exits or its QMP socket drops: the guest is marked gone (``alive=False``); the
  backend retries the socket every ``RECONNECT_INTERVAL_S`` (at most
  ``RECONNECT_MAX_ATTEMPTS`` times) unless it launched that QEMU and saw it exit.
- A QMP reply that is malformed or late: counted; after ``MAX_POLL_FAILURES`` in a row
  the guest is treated as gone (and reconnected like one).
- ``DeviceNotActive`` (no balloon driver yet): counted; the target cannot be set.
- A balloon that has not moved toward its target for ``BALLOON_STUCK_S`` (XAPI squeezed's
  rule, ../shared/notes/peers.md): counted once per target as ``qemu_balloon_stuck`` and
  listed by ``stuck()``.
- ``BALLOON_CHANGE`` events only count as movement between polls; never as the size.
- Agent garbage or floods are absorbed by AgentChannel (counted, bounded).
- A guest to attach whose QMP socket is missing, or answers but is not QEMU (``adopt``): it
  shows as gone with the reason and what to do, and the backend tries again every
  ``ATTACH_RETRY_S`` (a VM started later joins); it is never launched or killed from here.

A report's balloon is the one the guest saw when it wrote it (the agent's vmstat balloon
counters); from an agent that does not say, the balloon polled last before the line arrived
(``qemu.history``), never the one polled after it: a deflate between the two would read as a
working-set jump.

Where we run as root with a memory cgroup, ``create`` puts every QEMU it launches into one
cgroup whose limit is the host budget: QEMU starts paused (``-S``), its pid joins the cgroup,
then QMP ``cont`` lets the guest run, so every page the guest touches is charged there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from memballoon.edge.clock import MonotonicClock
from memballoon.host.cgroup import Budget, make_budget
from memballoon.manager.port import Clock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import PAGE_SHIFT, PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport
from memballoon.qemu.agent import AgentChannel, AgentReport, to_pressure_report
from memballoon.qemu.errors import (
    DeviceNotActiveError,
    GuestGoneError,
    QmpCommandError,
    QmpError,
    QmpTimeoutError,
)
from memballoon.qemu.history import BalloonHistory
from memballoon.qemu.image import GuestImage, build_guest_image
from memballoon.qemu.launch import QemuGuest, QemuProcess, launch
from memballoon.qemu.qmp import QmpClient


class QemuBackendCounter(CounterName):
    """What ``QemuBackend`` counts in its bag (its QMP clients and agent channels count theirs
    there too)."""

    QEMU_ATTACHED = "qemu_attached"  # guests attached (launched or found running)
    QEMU_AGENT_UNREACHABLE = "qemu_agent_unreachable"  # attaches without the agent's socket
    QEMU_UNKNOWN_GUEST = "qemu_unknown_guest"  # targets for a guest the backend does not have
    QEMU_TARGET_OUT_OF_RANGE = "qemu_target_out_of_range"  # targets outside [0, RAM)
    QEMU_SET_TARGET = "qemu_set_target"  # targets sent over QMP
    QEMU_SET_TARGET_FAILED = "qemu_set_target_failed"  # targets QMP failed to send
    QEMU_DEVICE_NOT_ACTIVE = "qemu_device_not_active"  # sets and polls with no balloon driver yet
    QEMU_POLL_FAILED = "qemu_poll_failed"  # polls with a late or malformed QMP reply
    QEMU_GUEST_GONE = "qemu_guest_gone"  # guests marked gone (QEMU exited or its socket dropped)
    QEMU_BALLOON_STUCK = "qemu_balloon_stuck"  # balloons stalled short of a target (once each)
    QEMU_RECONNECT_ATTEMPT = "qemu_reconnect_attempt"  # tries to reopen a gone guest's QMP socket
    QEMU_RECONNECTED = "qemu_reconnected"  # gone guests back
    QEMU_AGENT_RECONNECTED = "qemu_agent_reconnected"  # agent sockets reopened
    QEMU_ATTACH_FAILED = "qemu_attach_failed"  # attaches that found no QEMU (retried later)


#: XAPI squeezed declares a balloon stuck when it has not moved for 5 s (notes/peers.md).
BALLOON_STUCK_S: Final = 5.0
#: A balloon within this many pages of its target has arrived (QEMU rounds to 4 KiB, and
#: Linux's virtio_balloon moves in 256-page batches).
ARRIVED_TOLERANCE_PAGES: Final = 256
RECONNECT_INTERVAL_S: Final = 1.0
RECONNECT_MAX_ATTEMPTS: Final = 30
#: Consecutive failed polls (late or malformed replies) before a guest counts as gone.
MAX_POLL_FAILURES: Final = 3
#: Per-call QMP timeout: one slow QEMU must not hold the whole snapshot for long.
QMP_TIMEOUT_S: Final = 2.0
BOOT_TIMEOUT_S: Final = 90.0
#: A guest to attach that is not there yet is tried again this often, without end.
ATTACH_RETRY_S: Final = 5.0

#: Where a guest's pressure comes from, as ``pressure_sources`` names it.
SOURCE_AGENT: Final = "memballoon-agent"
SOURCE_NONE: Final = "none"


def qemu_pid_of(qmp_path: str | Path) -> int | None:
    """The pid of the process listening on a unix socket (SO_PEERCRED), or None.

    The kernel records the listener's credentials at connect time, so this works even
    while QEMU's monitor is busy with another client (Linux net/unix/af_unix.c)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(qmp_path))
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid if pid > 0 else None


def rss_of(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass
class _Guest:
    name: str
    ram_bytes: int
    qmp: QmpClient
    agent: AgentChannel | None
    proc: QemuProcess | None = None
    pid: int | None = None
    alive: bool = True
    gone_reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    balloon_pages: int = 0
    target_pages: int = 0
    # memballoon set target_pages (a VM it attached to may still be moving to a target
    # someone else set, which QMP does not tell: until then the target follows the balloon)
    target_set: bool = False
    target_set_at: float = 0.0
    last_move_at: float = 0.0
    last_hint: int | None = None
    stuck: bool = False
    poll_failures: int = 0
    reconnect_attempts: int = 0
    next_reconnect_at: float = 0.0
    next_agent_retry_at: float = 0.0
    seen_agent: AgentReport | None = None
    prev_agent: AgentReport | None = None
    report: PressureReport | None = None
    report_time: float | None = None
    accel: str = "unknown"
    history: BalloonHistory = field(default_factory=BalloonHistory)

    @property
    def ram_pages(self) -> int:
        return self.ram_bytes >> PAGE_SHIFT


@dataclass
class _Waiting:
    """A guest to attach whose QEMU did not answer yet (``adopt``)."""

    name: str
    qmp_path: str
    agent_path: str | None
    ram_bytes: int | None
    reason: str
    next_try_at: float


class QemuBackend:
    """Backend for QEMU guests: launched by ``create`` or attached by ``attach``."""

    def __init__(
        self,
        *,
        run_dir: Path | None = None,
        budget: Budget | None = None,
        counters: Counters | None = None,
        image: GuestImage | None = None,
        qmp_timeout_s: float = QMP_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        self.counters = counters if counters is not None else Counters()
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._pending: dict[str, int] = {}  # targets set by the engine, sent by ``flush``
        self.run_dir = run_dir
        self.budget = budget
        self.image = image
        self.qmp_timeout_s = qmp_timeout_s
        self._guests: dict[str, _Guest] = {}
        self._waiting: dict[str, _Waiting] = {}
        #: Told each live guest's RAM in pages at every refresh (the daemon resolves its
        #: limits, a min of "25%" for one, once it knows the RAM).
        self.on_guest: Callable[[str, int], None] | None = None
        self._stuck: set[str] = set()

    @property
    def name(self) -> str:
        return "qemu"

    # --- construction ------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        guests: Sequence[QemuGuest],
        *,
        run_dir: Path,
        budget_bytes: int | None,
        counters: Counters | None = None,
        image: GuestImage | None = None,
        cgroup_name: str | None = None,
        wait_ready: bool = True,
        qmp_timeout_s: float = QMP_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> QemuBackend:
        """Launch ``guests`` (in parallel), each paused until it sits in the budget's cgroup.

        ``image`` defaults to the cached test image (built when missing). The budget is
        enforced by a memory cgroup where we are root and one exists, else only watched
        (``backend.budget.describe()`` says which); ``budget_bytes=None`` (an auto budget,
        held against the host's own memory by the manager) makes no cgroup."""
        names = [g.name for g in guests]
        if len(set(names)) != len(names):
            raise ConfigError(f"guest names must be unique: {names}")
        img = image if image is not None else await asyncio.to_thread(build_guest_image)
        budget = None if budget_bytes is None else make_budget(
            cgroup_name or f"memballoon-qemu-{os.getpid()}", budget_bytes)
        self = cls(run_dir=run_dir, budget=budget, counters=counters, image=img,
                   qmp_timeout_s=qmp_timeout_s, clock=clock)
        try:
            await asyncio.gather(*(self._launch_one(g, img, run_dir / g.name) for g in guests))
            if wait_ready:
                await asyncio.gather(*(
                    g.proc.wait_ready_async(BOOT_TIMEOUT_S)
                    for g in self._guests.values() if g.proc is not None
                ))
        except BaseException:
            await self.close()
            raise
        return self

    async def _launch_one(self, spec: QemuGuest, image: GuestImage, run_dir: Path) -> None:
        proc = await asyncio.to_thread(launch, spec, image, run_dir, paused=True)
        qmp = QmpClient(proc.qmp_path, ram_bytes=spec.ram_bytes, timeout_s=self.qmp_timeout_s,
                        counters=self.counters, name=spec.name)
        agent = AgentChannel(proc.agent_path, guest=spec.name, counters=self.counters,
                             clock=self.clock)
        g = _Guest(spec.name, spec.ram_bytes, qmp, agent, proc=proc, pid=proc.pid,
                   accel=proc.accel)
        self._guests[spec.name] = g
        await qmp.connect(wait_s=10.0)
        if self.budget is not None and self.budget.cgroup is not None:
            self.budget.cgroup.add(proc.pid)  # before the guest touches a page
        if spec.start_bytes < spec.ram_bytes:  # pre-inflated: applied once the driver loads
            await qmp.set_logical_size(spec.start_bytes)
            g.target_pages = (spec.ram_bytes - spec.start_bytes) >> PAGE_SHIFT
            g.target_set = True
            g.target_set_at = g.last_move_at = self.clock.now()
        await qmp.execute("cont")
        await agent.connect(wait_s=5.0)

    async def attach(
        self, name: str, qmp_path: str | Path, agent_path: str | Path | None,
        ram_bytes: int | None = None,
    ) -> None:
        """Adopt a running QEMU (e.g. from ``memballoon vm start``) by its sockets; it is
        never launched or killed from here. ``ram_bytes=None`` asks QEMU
        (``query-memory-size-summary``); a given size must be QEMU's.

        Raises ConfigError for a bad name or size, GuestGoneError when nothing listens on
        the QMP socket, another QmpError when what listens is not a QEMU monitor with a
        balloon. Without an agent socket the guest has no pressure reports."""
        if name in self._guests:
            raise ConfigError(f"guest {name!r} is already attached")
        if ram_bytes is not None and (ram_bytes <= 0 or ram_bytes % PAGE_SIZE):
            raise ConfigError(f"ram_bytes={ram_bytes}: must be a positive multiple of 4096")
        if not Path(qmp_path).exists():
            self.counters.inc(QemuBackendCounter.QEMU_ATTACH_FAILED)
            raise GuestGoneError(
                f"guest {name}: no QMP socket at {qmp_path}: start the VM with "
                f"-qmp unix:{qmp_path},server=on,wait=off (or fix the path)")
        pid = qemu_pid_of(qmp_path)
        qmp = QmpClient(qmp_path, ram_bytes=ram_bytes, timeout_s=self.qmp_timeout_s,
                        counters=self.counters, name=name)
        try:
            await qmp.connect(wait_s=2.0)
            ram = await self._check_ram(qmp, name, ram_bytes)
            balloon = await qmp.balloon_pages()
            accel = await self._accel_of(qmp)
        except (QmpError, ConfigError) as exc:
            await qmp.close()
            self.counters.inc(QemuBackendCounter.QEMU_ATTACH_FAILED)
            if isinstance(exc, DeviceNotActiveError):
                raise DeviceNotActiveError(
                    f"guest {name}: QEMU at {qmp_path} has no balloon device: start it with "
                    "-device virtio-balloon-pci,id=balloon0") from exc
            if isinstance(exc, QmpTimeoutError | GuestGoneError):
                raise type(exc)(f"guest {name}: {qmp_path} does not answer as a QEMU monitor "
                                f"({exc}): is it QEMU's -qmp socket?") from exc
            raise
        agent = None if agent_path is None else AgentChannel(
            agent_path, guest=name, counters=self.counters, clock=self.clock)
        g = _Guest(name, ram, qmp, agent, pid=pid, accel=accel)
        if pid is not None and self.budget is not None and self.budget.cgroup is not None:
            # Late, but its later faults are charged here at least (v1 does not move charges).
            with contextlib.suppress(MemballoonError):
                self.budget.cgroup.add(pid)
        g.balloon_pages = balloon
        g.history.add(self.clock.now(), balloon)
        g.target_pages = g.balloon_pages
        g.target_set_at = g.last_move_at = self.clock.now()
        if agent is not None:
            try:
                await agent.connect(wait_s=2.0)
            except GuestGoneError:
                self.counters.inc(QemuBackendCounter.QEMU_AGENT_UNREACHABLE)
        self._guests[name] = g
        self._waiting.pop(name, None)
        self.counters.inc(QemuBackendCounter.QEMU_ATTACHED)

    async def _check_ram(self, qmp: QmpClient, name: str, ram_bytes: int | None) -> int:
        """QEMU's RAM; ConfigError when the config says another size."""
        if ram_bytes is None:
            return await qmp.ram_bytes()
        reply = await qmp.execute("query-memory-size-summary")
        base = reply.get("base-memory") if isinstance(reply, Mapping) else None
        if isinstance(base, int) and not isinstance(base, bool) and base != ram_bytes:
            raise ConfigError(f"guest {name}: the config says {ram_bytes} bytes of RAM, QEMU "
                              f"has {base}: fix max_mib or leave it out")
        return ram_bytes

    async def _accel_of(self, qmp: QmpClient) -> str:
        """``kvm`` or ``tcg`` (x86 QEMU has no other accelerator we run on), from query-kvm."""
        try:
            reply = await qmp.execute("query-kvm")
        except QmpCommandError:
            return "unknown"
        enabled = reply.get("enabled") if isinstance(reply, Mapping) else None
        return "unknown" if not isinstance(enabled, bool) else ("kvm" if enabled else "tcg")

    async def adopt(
        self, name: str, qmp_path: str | Path, agent_path: str | Path | None,
        ram_bytes: int | None = None,
    ) -> str | None:
        """``attach``, or when QEMU is not there (yet): keep the guest as gone, with the
        reason (returned) and what to do, and try again every ``ATTACH_RETRY_S``.
        ConfigError (a bad name or size) is raised: retrying cannot fix it."""
        try:
            await self.attach(name, qmp_path, agent_path, ram_bytes)
        except QmpError as exc:
            self._waiting[name] = _Waiting(
                name, str(qmp_path), None if agent_path is None else str(agent_path),
                ram_bytes, str(exc), self.clock.now() + ATTACH_RETRY_S)
            return str(exc)
        return None

    async def _retry_waiting(self) -> None:
        now = self.clock.now()
        for w in list(self._waiting.values()):
            if now < w.next_try_at:
                continue
            try:
                await self.attach(w.name, w.qmp_path, w.agent_path, w.ram_bytes)
            except QmpError as exc:
                w.reason, w.next_try_at = str(exc), now + ATTACH_RETRY_S
            except ConfigError as exc:  # QEMU came up with another size: say so, try later
                w.reason, w.next_try_at = str(exc), now + ATTACH_RETRY_S

    async def detach(self, name: str) -> None:
        """Forget a guest (its QEMU keeps running unless the backend launched it)."""
        g = self._guests.pop(name, None)
        if g is not None:
            await self._close_guest(g)

    # --- Backend ------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Poll every guest at once (QMP ``query-balloon``, the agent's latest report)."""
        if self._waiting:
            await self._retry_waiting()
        await asyncio.gather(*(self._refresh(g) for g in list(self._guests.values())))
        if self.on_guest is not None:
            for g in self._guests.values():
                self.on_guest(g.name, g.ram_pages)

    def guests(self) -> Mapping[str, GuestSample]:
        """The guests as the last ``refresh`` saw them (those still to attach: gone)."""
        out = {g.name: self._sample(g) for g in self._guests.values()}
        for w in self._waiting.values():
            out.setdefault(w.name, GuestSample(w.name, 0, 0, 0, alive=False))
        return out

    def pressure_sources(self) -> dict[str, str]:
        """Per guest, where its pressure comes from: the memballoon agent, or none."""
        out = {g.name: SOURCE_AGENT if g.report is not None else SOURCE_NONE
               for g in self._guests.values()}
        out.update({w: SOURCE_NONE for w in self._waiting})
        return out

    def notes(self) -> dict[str, str]:
        """Per guest, why it is gone or not attached yet ("" for a live one)."""
        out = {g.name: "" if g.alive else g.gone_reason for g in self._guests.values()}
        out.update({w.name: "not attached: " + w.reason.removeprefix(f"guest {w.name}: ")
                    for w in self._waiting.values()})
        return out

    def accels(self) -> dict[str, str]:
        """Per guest, the accelerator its QEMU runs on (kvm, tcg, or unknown)."""
        return {g.name: g.accel for g in self._guests.values()}

    async def poll(self) -> Mapping[str, GuestSample]:
        """``refresh`` then ``guests``: the samples now (for benches and tools)."""
        await self.refresh()
        return self.guests()

    def _sample(self, g: _Guest) -> GuestSample:
        resident = rss_of(g.pid) if g.pid is not None and g.alive else None
        return GuestSample(
            name=g.name, ram_pages=g.ram_pages, balloon_pages=g.balloon_pages,
            target_pages=g.target_pages, report=g.report, report_time=g.report_time,
            alive=g.alive, resident_bytes=resident,
        )

    def _settable(self, guest: str, balloon_pages: int) -> _Guest | None:
        """``guest`` if it can be asked for this balloon: known (else counted), alive, and
        the balloon within its RAM (else counted)."""
        g = self._guests.get(guest)
        if g is None:
            self.counters.inc(QemuBackendCounter.QEMU_UNKNOWN_GUEST)
            return None
        if not g.alive:
            return None
        if balloon_pages < 0 or balloon_pages >= g.ram_pages:
            self.counters.inc(QemuBackendCounter.QEMU_TARGET_OUT_OF_RANGE)
            return None
        return g

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        """Check and queue a target; ``flush`` sends it. False for an unknown or dead guest
        or a target outside its RAM (counted)."""
        if self._settable(guest, balloon_pages) is None:
            return False
        self._pending[guest] = balloon_pages
        return True

    async def flush(self) -> None:
        """Send the targets ``set_target`` queued (each guest's failure is its own)."""
        pending, self._pending = self._pending, {}
        await asyncio.gather(*(self.apply_target(g, p) for g, p in pending.items()))

    async def apply_target(self, guest: str, balloon_pages: int) -> bool:
        """Set ``guest``'s balloon over QMP now; False (counted) when it cannot be set."""
        g = self._settable(guest, balloon_pages)
        if g is None:
            return False
        async with g.lock:
            try:
                await g.qmp.set_logical_size(g.ram_bytes - balloon_pages * PAGE_SIZE)
            except DeviceNotActiveError:
                self.counters.inc(QemuBackendCounter.QEMU_DEVICE_NOT_ACTIVE)
                return False
            except GuestGoneError as exc:
                self._mark_gone(g, str(exc))
                return False
            except QmpError:
                self.counters.inc(QemuBackendCounter.QEMU_SET_TARGET_FAILED)
                return False
        now = self.clock.now()
        if balloon_pages != g.target_pages:
            g.stuck = False
            self._stuck.discard(g.name)
        g.target_pages, g.target_set = balloon_pages, True
        g.target_set_at = g.last_move_at = now
        self.counters.inc(QemuBackendCounter.QEMU_SET_TARGET)
        return True

    def host_resident_bytes(self) -> int:
        """The sum of the live QEMUs' RSS (guest RAM they hold plus their own overhead)."""
        total = 0
        for g in self._guests.values():
            if g.pid is not None and g.alive:
                total += rss_of(g.pid) or 0
        return total

    # --- extras for the CLI, bench and tests -------------------------------------------

    def stuck(self) -> frozenset[str]:
        """Guests whose balloon has not moved toward its target for ``BALLOON_STUCK_S``."""
        return frozenset(self._stuck)

    def process(self, name: str) -> QemuProcess | None:
        g = self._guests.get(name)
        return None if g is None else g.proc

    def qmp(self, name: str) -> QmpClient:
        return self._guests[name].qmp

    def agent(self, name: str) -> AgentChannel | None:
        return self._guests[name].agent

    def gone_reason(self, name: str) -> str:
        w = self._waiting.get(name)
        return w.reason if w is not None else self._guests[name].gone_reason

    async def close(self) -> None:
        """Disconnect everything; stop the QEMUs we launched; remove our cgroup."""
        gs, self._guests = list(self._guests.values()), {}
        await asyncio.gather(*(self._close_guest(g) for g in gs), return_exceptions=True)
        if self.budget is not None and self.budget.cgroup is not None:
            with contextlib.suppress(MemballoonError):
                self.budget.cgroup.remove()

    async def _close_guest(self, g: _Guest) -> None:
        try:
            if g.agent is not None:
                await g.agent.close()
            await g.qmp.close()
        finally:  # a QEMU we launched is stopped whatever its sockets did
            if g.proc is not None:
                await asyncio.to_thread(g.proc.close)

    async def __aenter__(self) -> QemuBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one guest's poll ---------------------------------------------------------------

    def _mark_gone(self, g: _Guest, why: str) -> None:
        if g.alive:
            self.counters.inc(QemuBackendCounter.QEMU_GUEST_GONE)
            g.alive = False
            g.gone_reason = why
            g.next_reconnect_at = self.clock.now() + RECONNECT_INTERVAL_S
            self._stuck.discard(g.name)

    async def _refresh(self, g: _Guest) -> None:
        if g.proc is not None and not g.proc.alive():
            self._mark_gone(g, f"QEMU exited ({g.proc.popen.returncode})")
            return  # we launched it and saw it die: nothing to reconnect to
        if not g.alive and not await self._try_reconnect(g):
            return
        async with g.lock:
            try:
                pages = await g.qmp.balloon_pages()
            except GuestGoneError as exc:
                self._mark_gone(g, str(exc))
                return
            except DeviceNotActiveError:
                self.counters.inc(QemuBackendCounter.QEMU_DEVICE_NOT_ACTIVE)
                pages = g.balloon_pages
            except QmpError as exc:
                g.poll_failures += 1
                self.counters.inc(QemuBackendCounter.QEMU_POLL_FAILED)
                if g.poll_failures >= MAX_POLL_FAILURES:
                    self._mark_gone(g, f"{MAX_POLL_FAILURES} polls failed, last: {exc}")
                    await g.qmp.close()
                return
        g.poll_failures = 0
        now = self.clock.now()
        hint = g.qmp.last_change_bytes
        if pages != g.balloon_pages or hint != g.last_hint:
            g.last_move_at = now
        g.balloon_pages, g.last_hint = pages, hint
        g.history.add(now, pages)
        if not g.target_set:
            g.target_pages = pages
        self._check_stuck(g, now)
        await self._take_report(g, now)

    def _check_stuck(self, g: _Guest, now: float) -> None:
        if abs(g.balloon_pages - g.target_pages) <= ARRIVED_TOLERANCE_PAGES:
            g.stuck = False
            self._stuck.discard(g.name)
            return
        if not g.stuck and now - max(g.last_move_at, g.target_set_at) > BALLOON_STUCK_S:
            g.stuck = True
            self._stuck.add(g.name)
            self.counters.inc(QemuBackendCounter.QEMU_BALLOON_STUCK)

    async def _take_report(self, g: _Guest, now: float) -> None:
        agent = g.agent
        if agent is None:
            return
        if agent.gone and now >= g.next_agent_retry_at:
            g.next_agent_retry_at = now + RECONNECT_INTERVAL_S
            with contextlib.suppress(GuestGoneError):
                await agent.close()
                await agent.connect()
                self.counters.inc(QemuBackendCounter.QEMU_AGENT_RECONNECTED)
        latest, arrived = agent.latest, agent.latest_time
        if latest is None or latest is g.seen_agent:
            return
        arrived = now if arrived is None else arrived
        period = arrived - g.report_time if g.report_time is not None else 1.0
        g.prev_agent, g.seen_agent = g.seen_agent, latest
        # the balloon of the line's moment: the guest's own count, else the last polled
        # before the line arrived (not this poll's: it may be after a deflate)
        then = g.history.at(arrived)
        g.report = to_pressure_report(
            latest, ram_bytes=g.ram_bytes, balloon_target_pages=g.target_pages,
            balloon_actual_pages=g.balloon_pages if then is None else then,
            prev=g.prev_agent, period_s=period,
        )
        g.report_time = arrived  # when the agent's line came in, on the engine's clock

    async def _try_reconnect(self, g: _Guest) -> bool:
        now = self.clock.now()
        if g.reconnect_attempts >= RECONNECT_MAX_ATTEMPTS or now < g.next_reconnect_at:
            return False
        g.reconnect_attempts += 1
        g.next_reconnect_at = now + RECONNECT_INTERVAL_S
        self.counters.inc(QemuBackendCounter.QEMU_RECONNECT_ATTEMPT)
        pid = qemu_pid_of(g.qmp.socket_path) if g.proc is None else g.pid
        if pid is None:
            return False  # nobody listens on the socket
        try:
            async with g.lock:
                await g.qmp.connect()
        except QmpError:
            return False
        g.alive, g.gone_reason, g.poll_failures = True, "", 0
        g.pid = pid
        self.counters.inc(QemuBackendCounter.QEMU_RECONNECTED)
        return True


__all__ = ["BALLOON_STUCK_S", "SOURCE_AGENT", "SOURCE_NONE", "QemuBackend", "qemu_pid_of",
           "rss_of"]
