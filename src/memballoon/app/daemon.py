"""``memballoon run --config host.toml``: the host daemon (edge: one asyncio loop, signals).

Start-up: load and validate the config; start the world's backend (local guest processes,
``LocalHost``; QEMU guests it launches or attaches to, ``QemuBackend``, saying which
accelerator each runs on; the domains of a libvirt host, ``LibvirtBackend``); say whether the
host budget is enforced (a memory cgroup) or only watched, and why; start the control
socket, the metrics port and the
manager: the engine (``manager.engine.Engine``) in its asyncio shell (``edge.aio.AsyncEngine``),
one clock (``MonotonicClock``) for the engine and the backend's report times.
SIGTERM/SIGINT (or the control op ``shutdown``) stop the loop, then
deflate every guest to its max size and wait for the balloons to get there (journaled), and
only then stop the guests (local and launched QEMU) or detach (attached QEMU, libvirt).

Each guest's limits come from its ``[[guests]]`` entry, else ``[defaults]``; a share of RAM
("25%") is resolved once the guest's RAM is known (``_settle``: libvirt domains and attached
VMs tell it when first seen). ``status`` reads what the last period collected (it polls no
guest). What backends report happening to guests (a libvirt domain started, destroyed,
migrated away; a stats period turned on) is said and journaled (``kind`` ``domain``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from memballoon.app.config import HostConfig, reserve_bytes, resolve_settings, size_with_unit
from memballoon.app.control import ControlServer, check_socket_path
from memballoon.app.metrics import ManagerMetrics
from memballoon.edge.aio import AsyncEngine
from memballoon.edge.clock import MonotonicClock
from memballoon.edge.hostmem import make_probe
from memballoon.edge.journal import Journal
from memballoon.edge.statefile import (
    DaemonSnapshot,
    downtime_s,
    is_ours,
    read_state,
    set_aside,
    write_state,
)
from memballoon.manager.core import Hysteresis, ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import Backend, HostProbe
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.units import MIB, PAGE_SIZE, RamKind, bytes_to_pages
from memballoon.policy.base import Policy
from memballoon.policy.registry import read_snapshot
from memballoon.policy.sample import GuestSettings


class DaemonCounter(CounterName):
    """What the daemon itself counts (in the shared bag)."""

    STATE_WRITE_FAILED = "state_write_failed"  # periods whose state file could not be written


def make_policy(name: str, params: Mapping[str, Any]) -> Policy:
    """The policy ``name`` from the registry, with ``params``; ConfigError names what is wrong."""
    try:
        from memballoon.policy.registry import POLICIES
        from memballoon.policy.registry import make_policy as _make
    except ImportError as exc:
        raise ConfigError(f"policy.name = {name!r}: no policy registry ({exc})") from None
    if name not in POLICIES:
        raise ConfigError(f"policy.name = {name!r}: unknown policy; choose one of "
                          f"{', '.join(sorted(POLICIES))}")
    try:
        return _make(name, **dict(params))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"policy.params for {name!r}: {exc}") from None


class Daemon:
    """The running daemon: backend, manager, control server, metrics (module docstring)."""

    def __init__(self, cfg: HostConfig, *, out: TextIO | None = None,
                 policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.out = out if out is not None else sys.stdout  # read now: pytest swaps it
        self.counters = Counters()
        self.policy = policy if policy is not None else make_policy(cfg.policy.name,
                                                                    cfg.policy.params)
        self.settings: dict[str, GuestSettings] = {
            g.name: g.settings(defaults=cfg.defaults) for g in cfg.guests
            if g.ram_bytes is not None}
        self._settled: dict[str, int] = {}  # guest -> the RAM (pages) its settings are for
        self.accels: dict[str, str] = {}  # QEMU guests: the accelerator each runs on
        self._collected_at: float | None = None  # the engine's clock at the last period
        self.clock = MonotonicClock()
        self.backend: Backend | None = None
        self.manager: AsyncEngine | None = None
        self.metrics: ManagerMetrics | None = None
        self.control: ControlServer | None = None
        self.stopping = asyncio.Event()
        self._state_warned = False
        self.budget_enforced = False
        self.budget_reason = ""
        self.started = time.monotonic()
        self._closers: list[Callable[[], Any]] = []

    def say(self, msg: str) -> None:
        print(f"memballoon: {msg}", file=self.out, flush=True)

    # ------------------------------------------------------------------ start-up
    async def _start_local(self) -> Backend:
        from memballoon.local.host import GuestSpec, LocalHost

        specs = [GuestSpec(name=g.name, mib=g.mib or 0, protocol=g.protocol,
                           workload=g.workload, period_s=g.period_s, seed=g.seed,
                           swap_mib=g.swap // (1 << 20), ram=RamKind(g.ram))
                 for g in self.cfg.guests]
        # the budget is for the guests' RAM; their cgroup also holds each guest process's own
        # interpreter, so it gets that on top (as the demo and bench policy do)
        from memballoon.local.host import PROCESS_OVERHEAD_BYTES

        fixed = self.fixed_budget
        host = LocalHost(specs, clock=self.clock, budget_bytes=None if fixed is None
                         else fixed + PROCESS_OVERHEAD_BYTES * len(specs),
                         setup_hugepages=self.cfg.setup_hugepages,
                         guest_uid_base=self.cfg.guest_uid_base)
        self._closers.append(host.close)  # also puts back what setup_hugepages changed
        await host.start()
        for line in host.host_changes:
            self.say(f"set {line} for the run (put back at exit)")
        stale = host.stale_cgroups.describe()
        if stale:
            self.say(stale)
        self.say(host.confinement)
        dead = host.not_ready()
        if dead:  # never "ready" over guests that cannot run
            raise ConfigError("guest(s) did not start: " + "; ".join(
                f"{n}: {why}" for n, why in sorted(dead.items())) + " (see the guest's error "
                "above)")
        b = host.budget
        if b is not None:
            self.budget_enforced, self.budget_reason = b.enforced, b.reason
        host.counters = self.counters
        return host

    async def _start_qemu(self) -> Backend:
        from memballoon.qemu.backend import QemuBackend
        from memballoon.qemu.launch import QemuGuest

        run_dir = self.cfg.run_dir or self.cfg.socket_path.parent / "qemu"
        guests = [QemuGuest(name=g.name, max_mib=g.max_mib or 0, start_mib=g.start_mib,
                            cpus=g.cpus, accel=g.accel, deflate_on_oom=g.deflate_on_oom,
                            free_page_reporting=g.free_page_reporting)
                  for g in self.cfg.guests if g.qmp is None]
        backend = await QemuBackend.create(guests, run_dir=Path(run_dir),
                                           budget_bytes=self.fixed_budget,
                                           counters=self.counters, clock=self.clock)
        self._closers.append(backend.close)
        backend.on_guest = self._settle
        for g in self.cfg.guests:
            if g.qmp is None:
                continue
            why = await backend.adopt(g.name, g.qmp, g.agent, g.ram_bytes)
            if why is not None:
                why = why.removeprefix(f"guest {g.name}: ")
                self.say(f"guest {g.name}: not attached yet: {why}; trying again every "
                         "few seconds")
        self.accels = backend.accels()
        for name, accel in sorted(self.accels.items()):
            entry = self.cfg.guest(name)
            how = "attached" if entry is not None and entry.qmp is not None else "launched"
            why = "" if accel == "kvm" else (
                " (software emulation: KVM not usable for this guest here)" if accel == "tcg"
                else " (QEMU did not say)")
            self.say(f"guest {name}: {how}, QEMU on {accel}{why}")
        b = backend.budget
        if b is not None:
            self.budget_enforced, self.budget_reason = b.enforced, b.reason
        return backend

    async def _start_libvirt(self) -> Backend:
        from memballoon.qemu.libvirt_backend import LibvirtBackend

        cfg = self.cfg
        backend = LibvirtBackend(cfg.uri, domains=cfg.domains, counters=self.counters,
                                 stats_period_s=cfg.stats_period_s, clock=self.clock,
                                 on_guest=self._settle)
        self._closers.append(backend.aclose)
        which = "every running domain with a virtio balloon" if cfg.domains is None else (
            "the running domains matching " + ", ".join(cfg.domains))
        self.say(f"libvirt {cfg.uri}: managing {which}")
        self.say("following domains by libvirt lifecycle events" if backend.follows_events
                 else f"{backend.events_error}: following domains by polling each period")
        await backend.refresh()  # the domains running now, said before the first period
        self._say_backend_events(backend)
        return backend

    def _settle(self, name: str, ram_pages: int) -> None:
        """``name``'s limits for its RAM (a backend saw it first, or with another RAM)."""
        if self._settled.get(name) == ram_pages:
            return
        self._settled[name] = ram_pages
        s = resolve_settings(self.cfg.guest(name), self.cfg.defaults, ram_pages)
        self.settings[name] = s
        if self.manager is not None:
            self.manager.engine.core.settings[name] = s

    def _say_backend_events(self, backend: object) -> list[dict[str, Any]]:
        """Say what the backend reports happening to guests; the records to journal."""
        drain = getattr(backend, "drain_events", None)
        recs: list[dict[str, Any]] = []
        for ev in drain() if drain is not None else []:
            self.say(f"{ev.guest + ': ' if ev.guest else ''}{ev.kind}: {ev.detail}")
            recs.append({"kind": ev.kind, "guest": ev.guest or None, "reason": ev.detail})
        return recs

    @property
    def fixed_budget(self) -> int | None:
        """The budget in bytes, or None for ``budget = "auto"``."""
        b = self.cfg.budget
        return None if b == "auto" else b

    def _host_memory(self) -> tuple[HostProbe, int]:
        """The probe of the host's own memory and the reserve it keeps, said once; a budget,
        or a local guest, larger than the host's memory is refused (it could never be held:
        an "enforced" budget the host cannot back would be a lie)."""
        probe, what = make_probe(self.cfg.host_cgroup)
        total = probe.read().total_bytes
        reserve = reserve_bytes(self.cfg.host_reserve, total)
        self.say(f"{what}; host reserve {reserve / MIB:.0f} MiB of {total / MIB:.0f} MiB")
        fixed = self.fixed_budget
        if fixed is not None and fixed > total:
            raise ConfigError(f"budget = {fixed / MIB:.0f} MiB is more than the host's memory "
                              f"({total / MIB:.0f} MiB, {what}): it cannot be held; give at "
                              f"most {total / MIB:.0f} MiB, or \"auto\"")
        if self.cfg.world == "local":
            for g in self.cfg.guests:
                if g.ram_bytes is not None and g.ram_bytes > total:
                    raise ConfigError(f"guests: {g.name}: mib = {g.ram_bytes // MIB} is more "
                                      f"than the host's memory ({total / MIB:.0f} MiB): its "
                                      "RAM could never be backed")
        return probe, reserve

    def _preflight(self) -> Journal:
        """What can be checked before any guest starts: the control socket's path, the
        journal's (opened here); a failure leaves nothing behind."""
        cfg = self.cfg
        check_socket_path(cfg.socket_path)
        return Journal(cfg.journal, max_bytes=max(1024, cfg.journal_max),
                       counters=self.counters)  # its write failures show in status

    async def start(self) -> None:
        cfg = self.cfg
        probe, reserve = self._host_memory()  # a bad host_cgroup fails before any guest starts
        self.journal = self._preflight()
        start = {"local": self._start_local, "qemu": self._start_qemu,
                 "libvirt": self._start_libvirt}[cfg.world]
        backend = await start()
        self.backend = backend
        h = cfg.hysteresis
        fixed = self.fixed_budget
        core = ManagerCore(
            self.policy, self.settings, None if fixed is None else bytes_to_pages(fixed),
            reserve_pages=bytes_to_pages(reserve),
            hysteresis=Hysteresis(min_change_pages=bytes_to_pages(h.min_change),
                                  min_change_fraction=h.min_change_fraction, hold_s=h.hold_s,
                                  report_max_age_s=h.report_max_age_s),
            enforced=self.budget_enforced, counters=self.counters)
        engine = Engine(backend, core, self.journal, self.clock, host_probe=probe,
                        counters=self.counters)
        self.manager = AsyncEngine(engine, period_s=cfg.period_s, on_tick=self._tick)
        core.settings.update(self.settings)  # those a backend settled while it started
        self._restore(engine)
        if fixed is None:
            self.say("host budget auto: the guests may hold what the host has available "
                     "beyond its reserve")
        elif self.budget_enforced:
            self.say(f"host budget {fixed / MIB:.0f} MiB ENFORCED by {self.budget_reason}")
        else:
            self.say(f"host budget {fixed / MIB:.0f} MiB only WATCHED (not enforced): "
                     f"{self.budget_reason or 'no cgroup'}")
        count = len(cfg.guests) if cfg.world != "libvirt" else len(backend.guests())
        self.say(f"world {cfg.world}, {count} guest(s), policy {self.policy.name}, "
                 f"period {cfg.period_s} s")
        self.control = ControlServer(self, cfg.socket_path, counters=self.counters)
        await self.control.start()
        self.say(f"control socket {cfg.socket_path}")
        if cfg.metrics_port is not None:
            self.metrics = ManagerMetrics(self.counters)
            port = self.metrics.serve(cfg.metrics_port)
            self.say(f"metrics http://127.0.0.1:{port}/metrics")
        self.say(f"journal {cfg.journal or '(memory only)'}")

    def _restore(self, e: Engine) -> None:
        """Go on from the state a stopped or crashed daemon left (its manual targets, each
        guest's last change, the policy's memory), aged by the time it was down."""
        path = self.cfg.state_path
        snap = read_state(path)
        if snap is None:
            self.say(f"state {path} (none yet: starting afresh)")
            return
        if not is_ours(snap, world=self.cfg.world, policy=self.policy.name):
            kept = set_aside(path, snap)
            self.say(f"state {path} was left by a {snap.world} daemon with policy "
                     f"{snap.policy}: set aside as {kept.name}, starting afresh")
            return
        down = downtime_s(snap)
        at = e.now() - down  # restoring at an earlier moment ages every stored age by ``down``
        policy_snap = read_snapshot(self.policy.name, json.dumps(snap.policy_state))
        e.core.restore(snap.core, at)
        self.policy.restore(policy_snap, at)
        gone = sorted(set(snap.core.manual) - set(e.backend.guests()))
        self.say(f"state {path}: restored from {down:.0f} s ago, {len(snap.core.manual)} manual "
                 f"target(s)" + (f"; not running now: {', '.join(gone)}" if gone else ""))
        if self.cfg.world == "local":
            self.say("local guests do not outlive their daemon: they started afresh, their "
                     "balloons empty")

    def _save(self, e: Engine) -> None:
        now = e.now()
        snap = DaemonSnapshot(
            version=1, world=self.cfg.world, policy=self.policy.name, saved_at=time.time(),
            core=e.core.snapshot(now), policy_state=json.loads(
                self.policy.snapshot(now).model_dump_json()),
            targets={g: s.target_pages for g, s in e.guests.items() if s.alive})
        try:
            write_state(self.cfg.state_path, snap)
        except OSError as exc:
            self.counters.inc(DaemonCounter.STATE_WRITE_FAILED)
            if not self._state_warned:
                self._state_warned = True
                self.say(f"cannot write state {self.cfg.state_path}: {exc.strerror}; a restart "
                         "will start afresh")

    def _tick(self, e: Engine) -> None:
        self._save(e)
        self._collected_at = e.now()
        for rec in self._say_backend_events(e.backend):
            e.journal.write(rec, mono=e.now())
        if self.metrics is not None:
            self.metrics.update(e.guests, e.core.last_host, e.host, decisions=e.decisions)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
            assert self.manager is not None
            self.say("ready")
            task = asyncio.create_task(self.manager.run())
            await self.stopping.wait()
            self.manager.stop()
            await task
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    async def shutdown(self) -> None:
        try:
            if self.manager is not None:
                self.say("stopping: deflating every guest to its max size")
                ok = await self.manager.deflate_all()
                self.say("balloons deflated" if ok else "some balloons did not deflate in time "
                         "(see the journal)")
        finally:  # whatever failed above, the guests, their cgroups and the socket go
            self.manager = None
            await self._close_all()

    async def _close_all(self) -> None:
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.close()
            self.control = None
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.close()
            self.metrics = None
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        self._closers.clear()
        self.say("stopped")

    # ------------------------------------------------------------------ control ops
    def _m(self) -> AsyncEngine:
        if self.manager is None:
            raise UsageError("the daemon is not running")
        return self.manager

    async def op_status(self) -> dict[str, Any]:
        # what the last period collected: a status request polls no guest (it used to, at
        # about 0.45 s a call with two QEMU guests)
        m = self._m().engine
        now = m.now()
        b = m.backend
        sources: dict[str, str] = getattr(b, "pressure_sources", dict)()
        notes: dict[str, str] = getattr(b, "notes", dict)()
        accels: dict[str, str] = {**self.accels, **getattr(b, "accels", dict)()}
        guests = []
        for name, st in m.guests.items():
            s = m.core.settings.get(name, GuestSettings())
            r = st.report
            age = st.report_age_s(now)
            guests.append({
                "name": name, "alive": st.alive, "ram_bytes": st.ram_pages * PAGE_SIZE,
                "target_bytes": st.target_pages * PAGE_SIZE,
                "actual_bytes": st.balloon_pages * PAGE_SIZE,
                "size_bytes": (st.ram_pages - st.balloon_pages) * PAGE_SIZE,
                "min_bytes": s.min_pages * PAGE_SIZE,
                "max_bytes": None if s.max_pages is None else s.max_pages * PAGE_SIZE,
                "shares": s.shares, "manual": name in m.core.manual,
                "resident_bytes": st.resident_bytes,
                "free_bytes": r.free_bytes if r else None,
                "available_bytes": r.available_bytes if r else None,
                "stall_pct": r.stall_pct if r else None,
                "refused_pages": r.refused_pages if r else None,
                "oom_kills": r.oom_kills if r else None,
                "report_age_s": None if age is None else round(age, 2),
                "pressure_source": sources.get(name, "agent" if r is not None else "none"),
                "accel": accels.get(name),
                "note": notes.get(name) or None,
            })
        return {
            "world": self.cfg.world, "policy": self.policy.name,
            "budget_bytes": self._budget_bytes(m), "budget_mode": "auto" if self.fixed_budget
            is None else "fixed", "budget_enforced": self.budget_enforced,
            "budget_reason": self.budget_reason, "host": self._host_status(m),
            "host_resident_bytes": m.host_resident_bytes,
            "budget_held_against": self._budget_basis(), "cgroup": self._cgroup_status(),
            "collected_age_s": round(max(0.0, now - self._collected_at), 2)
            if self._collected_at is not None else None,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "period_s": self.cfg.period_s, "decisions": m.decisions,
            "guests": guests, "counters": self.counters.as_dict(),
        }

    def _budget_basis(self) -> str:
        """Which figure the budget is held against, for the operator."""
        what = {"local": "the guests' memfd RAM the host holds (st_blocks)",
                "qemu": "the sum of the guests' QEMU RSS (guest RAM they hold plus QEMU's own)",
                "libvirt": "the sum of the domains' QEMU RSS as libvirt reports it"}[
                    self.cfg.world]
        if self.fixed_budget is None:
            return (f"host_resident_bytes ({what}) plus what the host has available beyond "
                    "its reserve (budget auto)")
        return f"host_resident_bytes: {what}"

    def _cgroup_status(self) -> dict[str, Any] | None:
        """The enforcing cgroup's own figures: what the kernel limits (page cache and kernel
        memory charged to it included, so it differs from host_resident_bytes)."""
        budget = getattr(self.backend, "budget", None)
        cg = getattr(budget, "cgroup", None)
        if cg is None:
            return None
        out: dict[str, Any] = {"path": str(cg.path), "usage_bytes": None, "limit_bytes": None}
        with contextlib.suppress(Exception):
            out["usage_bytes"] = cg.usage_bytes()
        with contextlib.suppress(Exception):
            out["limit_bytes"] = cg.read_limit_bytes()
        return out

    def _budget_bytes(self, e: Engine) -> int | None:
        """The budget in force at the last step (auto: the host's room), else the fixed one."""
        h = e.core.last_host
        return h.budget_pages * PAGE_SIZE if h is not None else self.fixed_budget

    def _host_status(self, e: Engine) -> dict[str, Any] | None:
        hm, h = e.host, e.core.last_host
        if hm is None or h is None:
            return None
        return {"source": hm.source, "total_bytes": hm.total_bytes,
                "available_bytes": hm.available_bytes, "reserve_bytes": h.reserve_pages
                * PAGE_SIZE, "short_bytes": h.short_pages * PAGE_SIZE,
                "psi_some_avg10": h.psi_some_avg10, "psi_full_avg10": h.psi_full_avg10}

    async def op_set(self, guest: str, size: str | int, force: bool = False) -> dict[str, Any]:
        am = self._m()
        m = am.engine
        if size == "auto":
            return {"guest": guest, "manual": False, "cleared": m.clear_manual(guest)}
        try:
            size_bytes = size_with_unit(size)
        except ConfigError as exc:
            raise ConfigError(f"size: {exc}") from None
        st = m.guests.get(guest)
        if st is None:
            raise UsageError(f"no guest named {guest!r}")
        ram = st.ram_pages * PAGE_SIZE
        if size_bytes > ram:
            raise ConfigError(f"size {size!r} = {size_bytes} bytes is above guest {guest}'s "
                              f"RAM ({ram} bytes)")
        balloon = st.ram_pages - bytes_to_pages(size_bytes)  # QMP-style: size kept, rounded
        a, ok = await am.set_manual(guest, balloon, force=force)
        return {"guest": guest, "manual": True, "applied": ok, "reason": a.reason,
                "balloon_bytes": a.new_pages * PAGE_SIZE,
                "size_bytes": (st.ram_pages - a.new_pages) * PAGE_SIZE}

    async def op_journal(self, last: int | None, guest: str | None) -> list[dict[str, Any]]:
        self._m()
        return self.journal.tail(guest=guest, last=last if last is not None else 20)

    async def op_register_qemu(self, name: str, qmp: str, agent: str | None,
                               ram_bytes: int) -> dict[str, Any]:
        b = self.backend
        attach = getattr(b, "attach", None)
        if self.cfg.world != "qemu" or attach is None:
            raise UsageError("register_qemu needs a daemon with world = \"qemu\"")
        await attach(name, qmp, agent, ram_bytes)
        self._settle(name, ram_bytes // PAGE_SIZE)
        accels: dict[str, str] = getattr(b, "accels", dict)()
        self.accels[name] = accels.get(name, "unknown")
        return {"registered": name, "accel": self.accels[name]}

    async def op_shutdown(self) -> dict[str, Any]:
        self.stopping.set()
        return {"stopping": True}


async def serve(cfg: HostConfig, *, out: TextIO | None = None) -> int:
    return await Daemon(cfg, out=out).run()


__all__ = ["Daemon", "make_policy", "serve"]
