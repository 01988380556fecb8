"""``memballoon run --config host.toml``: the host daemon (edge: one asyncio loop, signals).

Start-up: load and validate the config; start the world's backend (local guest processes,
``LocalHost``, or QEMU guests, ``QemuBackend``); say whether the host budget is enforced (a
memory cgroup) or only watched, and why; start the control socket, the metrics port and the
manager: the engine (``manager.engine.Engine``) in its asyncio shell (``edge.aio.AsyncEngine``),
one clock (``MonotonicClock``) for the engine and the backend's report times.
SIGTERM/SIGINT (or the control op ``shutdown``) stop the loop, then
deflate every guest to its max size and wait for the balloons to get there (journaled), and
only then stop the guests (local) or detach from QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from memballoon.app.config import HostConfig, parse_size, reserve_bytes
from memballoon.app.control import ControlServer
from memballoon.app.metrics import ManagerMetrics
from memballoon.edge.aio import AsyncEngine
from memballoon.edge.clock import MonotonicClock
from memballoon.edge.hostmem import make_probe
from memballoon.edge.journal import Journal
from memballoon.manager.core import Hysteresis, ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import Backend, HostProbe
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.units import MIB, PAGE_SIZE, bytes_to_pages
from memballoon.policy.base import Policy
from memballoon.policy.sample import GuestSettings


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

    def __init__(self, cfg: HostConfig, *, out: TextIO = sys.stdout,
                 policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.counters = Counters()
        self.policy = policy if policy is not None else make_policy(cfg.policy.name,
                                                                    cfg.policy.params)
        self.settings: dict[str, GuestSettings] = {g.name: g.settings() for g in cfg.guests}
        self.clock = MonotonicClock()
        self.backend: Backend | None = None
        self.manager: AsyncEngine | None = None
        self.metrics: ManagerMetrics | None = None
        self.control: ControlServer | None = None
        self.stopping = asyncio.Event()
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
                           swap_mib=g.swap // (1 << 20)) for g in self.cfg.guests]
        # the budget is for the guests' RAM; their cgroup also holds each guest process's own
        # interpreter, so it gets that on top (as the demo and bench policy do)
        from memballoon.local.host import PROCESS_OVERHEAD_BYTES

        fixed = self.fixed_budget
        host = LocalHost(specs, clock=self.clock, budget_bytes=None if fixed is None
                         else fixed + PROCESS_OVERHEAD_BYTES * len(specs))
        await host.start()
        self._closers.append(host.close)
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
                            cpus=g.cpus) for g in self.cfg.guests]
        backend = await QemuBackend.create(guests, run_dir=Path(run_dir),
                                           budget_bytes=self.fixed_budget,
                                           counters=self.counters, clock=self.clock)
        self._closers.append(backend.close)
        b = backend.budget
        if b is not None:
            self.budget_enforced, self.budget_reason = b.enforced, b.reason
        return backend

    @property
    def fixed_budget(self) -> int | None:
        """The budget in bytes, or None for ``budget = "auto"``."""
        b = self.cfg.budget
        return None if b == "auto" else b

    def _host_memory(self) -> tuple[HostProbe, int]:
        """The probe of the host's own memory and the reserve it keeps, said once."""
        probe, what = make_probe(self.cfg.host_cgroup)
        total = probe.read().total_bytes
        reserve = reserve_bytes(self.cfg.host_reserve, total)
        self.say(f"{what}; host reserve {reserve / MIB:.0f} MiB of {total / MIB:.0f} MiB")
        return probe, reserve

    async def start(self) -> None:
        cfg = self.cfg
        probe, reserve = self._host_memory()  # a bad host_cgroup fails before any guest starts
        backend = await (self._start_local() if cfg.world == "local" else self._start_qemu())
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
        self.journal = Journal(cfg.journal, max_bytes=max(1024, cfg.journal_max),
                               counters=self.counters)  # its failures show in status
        engine = Engine(backend, core, self.journal, self.clock, host_probe=probe,
                        counters=self.counters)
        self.manager = AsyncEngine(engine, period_s=cfg.period_s, on_tick=self._tick)
        if fixed is None:
            self.say("host budget auto: the guests may hold what the host has available "
                     "beyond its reserve")
        elif self.budget_enforced:
            self.say(f"host budget {fixed / MIB:.0f} MiB ENFORCED by {self.budget_reason}")
        else:
            self.say(f"host budget {fixed / MIB:.0f} MiB only WATCHED (not enforced): "
                     f"{self.budget_reason or 'no cgroup'}")
        self.say(f"world {cfg.world}, {len(cfg.guests)} guest(s), policy {self.policy.name}, "
                 f"period {cfg.period_s} s")
        self.control = ControlServer(self, cfg.socket_path, counters=self.counters)
        await self.control.start()
        self.say(f"control socket {cfg.socket_path}")
        if cfg.metrics_port is not None:
            self.metrics = ManagerMetrics(self.counters)
            port = self.metrics.serve(cfg.metrics_port)
            self.say(f"metrics http://127.0.0.1:{port}/metrics")
        self.say(f"journal {cfg.journal or '(memory only)'}")

    def _tick(self, e: Engine) -> None:
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
        if self.manager is not None:
            self.say("stopping: deflating every guest to its max size")
            ok = await self.manager.deflate_all()
            self.say("balloons deflated" if ok else "some balloons did not deflate in time "
                     "(see the journal)")
            self.manager = None
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            self.metrics.close()
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
        am = self._m()
        await am.refresh()
        m = am.engine
        now = m.now()
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
            })
        return {
            "world": self.cfg.world, "policy": self.policy.name,
            "budget_bytes": self._budget_bytes(m), "budget_mode": "auto" if self.fixed_budget
            is None else "fixed", "budget_enforced": self.budget_enforced,
            "budget_reason": self.budget_reason, "host": self._host_status(m),
            "host_resident_bytes": m.host_resident_bytes,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "period_s": self.cfg.period_s, "decisions": m.decisions,
            "guests": guests, "counters": self.counters.as_dict(),
        }

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

    async def op_set(self, guest: str, size: str | int) -> dict[str, Any]:
        am = self._m()
        m = am.engine
        if size == "auto":
            return {"guest": guest, "manual": False, "cleared": m.clear_manual(guest)}
        try:
            size_bytes = parse_size(size)
        except ConfigError as exc:
            raise ConfigError(f"size: {exc}") from None
        st = m.guests.get(guest)
        if st is None:
            await am.refresh()
            st = m.guests.get(guest)
        if st is None:
            raise UsageError(f"no guest named {guest!r}")
        ram = st.ram_pages * PAGE_SIZE
        if size_bytes > ram:
            raise ConfigError(f"size {size!r} = {size_bytes} bytes is above guest {guest}'s "
                              f"RAM ({ram} bytes)")
        balloon = st.ram_pages - bytes_to_pages(size_bytes)  # QMP-style: size kept, rounded
        a, ok = await am.set_manual(guest, balloon)
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
        self._m().engine.core.settings.setdefault(name, GuestSettings())
        return {"registered": name}

    async def op_shutdown(self) -> dict[str, Any]:
        self.stopping.set()
        return {"stopping": True}


async def serve(cfg: HostConfig, *, out: TextIO = sys.stdout) -> int:
    return await Daemon(cfg, out=out).run()


__all__ = ["Daemon", "make_policy", "serve"]
