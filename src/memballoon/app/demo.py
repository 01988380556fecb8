"""``memballoon demo``: three local guests with real memory share a host budget smaller than
their sum, while their balloons move memory between them.

With no arguments: three guests of 512 MiB (one idle, one steady, one with bursts; each on a
different balloon protocol) on a 1 GiB host budget, for about 30 s, with a live table in the
terminal (a progress line every few seconds when stdout is not a terminal), then a summary.
``--json`` prints the summary as one JSON object.

The balloons are sized by the manager (the engine, ``manager/engine.py``, in its asyncio shell,
``edge/aio.py``) with memballoon's default policy,
from the pressure each guest pushes every second; every target change is journaled (``--journal
FILE`` keeps the journal as JSON lines). The budget is enforced for real where the machine has
a memory cgroup and we run as root (the kernel OOM-kills a guest that overshoots it); otherwise
it is only watched. The guest processes' own interpreter memory is charged to that cgroup too,
so the manager holds the guests' RAM to the budget minus ``PROCESS_OVERHEAD_BYTES`` a guest.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memballoon.local.host import PROCESS_OVERHEAD_BYTES, GuestSpec, LocalHost
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB, PAGE_SIZE, RamKind, bytes_to_pages
from memballoon.policy.sample import GuestSample

# The bursty guest gets virtio: its deflate-on-OOM is the guest's own push-back when a burst
# outruns the manager's period (VMware's protocol has none).
DEFAULT_GUESTS = (
    ("idle", "idle", "vmw"),
    ("steady", "steady", "vmw-batched"),
    ("bursty", "bursty", "virtio"),
)

@dataclass
class DemoConfig:
    seconds: float = 30.0
    guest_mib: int = 512
    budget_mib: int = 1024
    period_s: float = 1.0
    seed: int = 1
    guests: tuple[tuple[str, str, str], ...] = DEFAULT_GUESTS
    ram: str = "4k"  # what backs every guest's RAM (--ram): 4k, thp or hugetlb
    setup_hugepages: bool = False  # set the host up for --ram for the run, then put it back

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ConfigError(f"--seconds must be positive, got {self.seconds}")
        if self.guest_mib < 64:
            raise ConfigError(f"--guest-mib must be at least 64, got {self.guest_mib}")
        if self.ram not in tuple(RamKind):
            raise ConfigError(f"--ram must be one of {', '.join(RamKind)}, got {self.ram!r}")
        floor = len(self.guests) * (PROCESS_OVERHEAD_BYTES // MIB + 32)
        if self.budget_mib < floor:
            raise ConfigError(f"--budget-mib must be at least {floor} for "
                              f"{len(self.guests)} guests, got {self.budget_mib}")


@dataclass
class _Trace:
    peak_resident: int = 0
    stall: dict[str, list[float]] = field(default_factory=dict)


def _specs(cfg: DemoConfig) -> list[GuestSpec]:
    return [
        GuestSpec(name=name, mib=cfg.guest_mib, protocol=proto, workload=workload,
                  period_s=cfg.period_s, seed=cfg.seed + i, swap_mib=cfg.guest_mib // 4,
                  ram=RamKind(cfg.ram))
        for i, (name, workload, proto) in enumerate(cfg.guests)
    ]


def _table(views: Mapping[str, GuestSample], host: LocalHost, t: float, cfg: DemoConfig) -> Any:
    from rich.table import Table

    budget = host.budget
    mode = "enforced" if budget is not None and budget.enforced else "watched"
    tab = Table(title=f"memballoon demo  t={t:4.0f}/{cfg.seconds:.0f} s   host resident "
                      f"{host.resident_bytes() / MIB:6.0f} MiB of {cfg.budget_mib} MiB budget "
                      f"({mode})")
    for col in ("guest", "protocol", "RAM MiB", "target MiB", "actual MiB", "free MiB",
                "avail MiB", "stall %", "resident MiB", "state"):
        tab.add_column(col, justify="left" if col in ("guest", "protocol", "state") else "right")
    protocols = {s.name: s.protocol for s in host.specs}
    for v in views.values():
        r = v.report
        tab.add_row(
            v.name, protocols[v.name], f"{v.ram_pages * PAGE_SIZE / MIB:.0f}",
            f"{v.target_pages * PAGE_SIZE / MIB:.0f}", f"{v.balloon_pages * PAGE_SIZE / MIB:.0f}",
            f"{r.free_bytes / MIB:.0f}" if r else "-",
            f"{r.available_bytes / MIB:.0f}" if r else "-",
            f"{r.stall_pct:.1f}" if r else "-",
            f"{(v.resident_bytes or 0) / MIB:.0f}",
            "alive" if v.alive else f"dead ({host.exit_code(v.name)})",
        )
    return tab


def _progress_line(views: Mapping[str, GuestSample], host: LocalHost, t: float) -> str:
    parts = [f"t={t:.0f}s resident={host.resident_bytes() / MIB:.0f}MiB"]
    for v in views.values():
        parts.append(f"{v.name}: balloon {v.balloon_pages * PAGE_SIZE / MIB:.0f}/"
                     f"{v.target_pages * PAGE_SIZE / MIB:.0f} MiB"
                     + ("" if v.alive else " DEAD"))
    return "memballoon demo: " + ", ".join(parts)


async def run_demo(
    cfg: DemoConfig,
    *,
    live: bool,
    journal_path: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run the demo and return its summary (see the module docstring)."""
    from memballoon.edge.aio import AsyncEngine
    from memballoon.edge.journal import Journal
    from memballoon.manager.core import ManagerCore
    from memballoon.manager.engine import Engine
    from memballoon.policy.registry import make_policy
    from memballoon.policy.sample import GuestSettings

    specs = _specs(cfg)
    budget = cfg.budget_mib * MIB
    guest_budget = budget - PROCESS_OVERHEAD_BYTES * len(specs)
    trace = _Trace(stall={s.name: [] for s in specs})
    async with LocalHost(specs, budget_bytes=budget,
                         setup_hugepages=cfg.setup_hugepages) as host:
        for line in host.host_changes:
            log(f"set {line} for the run (put back afterwards)")
        b = host.budget
        log(f"budget {cfg.budget_mib} MiB: {b.describe() if b else 'none'}; "
            f"policy default, {guest_budget // MIB} MiB for guest memory")
        settings = {s.name: GuestSettings(min_pages=s.pages // 8) for s in specs}
        core = ManagerCore(make_policy("default"), settings, bytes_to_pages(guest_budget),
                           enforced=bool(b is not None and b.enforced), counters=host.counters)
        engine = Engine(host, core, Journal(journal_path), host.clock)
        manager = asyncio.create_task(
            AsyncEngine(engine, period_s=cfg.period_s).run(cfg.seconds))
        t0 = time.monotonic()
        last_log = -10.0
        live_ctx = None
        if live:
            from rich.live import Live

            live_ctx = Live(_table(host.guests(), host, 0.0, cfg), refresh_per_second=4,
                            transient=False)
            live_ctx.__enter__()
        try:
            while not manager.done():
                t = time.monotonic() - t0
                views = host.guests()
                trace.peak_resident = max(trace.peak_resident, host.resident_bytes())
                for v in views.values():
                    if v.report is not None:
                        trace.stall[v.name].append(v.report.stall_pct)
                if live_ctx is not None:
                    live_ctx.update(_table(views, host, t, cfg))
                elif t - last_log >= 5.0:
                    log(_progress_line(views, host, t))
                    last_log = t
                await asyncio.sleep(cfg.period_s / 2)
        finally:
            if live_ctx is not None:
                live_ctx.__exit__(None, None, None)
            if not manager.done():
                manager.cancel()
        await manager
        views = host.guests()
        corruptions = 0
        for v in views.values():
            if v.alive:
                corruptions += int((await host.control(v.name, "verify"))["lost_pages"])
        released = sum(host.ram(s.name).released_pages_total for s in specs
                       if not host.ram(s.name).closed) * PAGE_SIZE
        kernel_kills = b.cgroup.oom_kills() if b is not None and b.cgroup is not None else 0
        guests: list[dict[str, Any]] = []
        for s in specs:
            v = views[s.name]
            r = v.report
            st = trace.stall[s.name]
            guests.append({
                "name": s.name, "protocol": s.protocol, "workload": s.workload,
                "ram_bytes": s.pages * PAGE_SIZE, "alive": v.alive,
                "balloon_target_bytes": v.target_pages * PAGE_SIZE,
                "balloon_actual_bytes": v.balloon_pages * PAGE_SIZE,
                "resident_bytes": v.resident_bytes,
                "oom_kills": r.oom_kills if r else 0,
                "mean_stall_pct": round(statistics.fmean(st), 3) if st else 0.0,
                "max_stall_pct": round(max(st), 3) if st else 0.0,
            })
        return {
            "seconds": round(time.monotonic() - t0, 1),
            "host_budget_bytes": budget,
            "budget_enforced": bool(b is not None and b.enforced),
            "budget_reason": b.reason if b is not None else "no budget",
            "host_peak_resident_bytes": trace.peak_resident,
            "host_resident_bytes": host.resident_bytes(),
            "host_released_bytes": released,
            "guest_oom_kills": sum(g["oom_kills"] for g in guests) + kernel_kills,
            "kernel_oom_kills": kernel_kills,
            "data_corruptions": corruptions,
            "policy": "default",
            "decisions": engine.decisions,
            "guests": guests,
        }


def print_summary(s: Mapping[str, Any]) -> None:
    mode = "enforced" if s["budget_enforced"] else "watched only"
    print(f"memballoon demo: {s['seconds']} s, {len(s['guests'])} guests")
    print(f"  host budget        {s['host_budget_bytes'] / MIB:8.0f} MiB ({mode})")
    print(f"  peak resident      {s['host_peak_resident_bytes'] / MIB:8.0f} MiB")
    print(f"  returned to host   {s['host_released_bytes'] / MIB:8.0f} MiB (hole-punched)")
    print(f"  guest OOM kills    {s['guest_oom_kills']:8d}")
    print(f"  data corruptions   {s['data_corruptions']:8d}")
    print(f"  balloon decisions  {s['decisions']:8d} (policy {s['policy']})")
    for g in s["guests"]:
        print(f"  {g['name']:<8} {g['protocol']:<12} balloon {g['balloon_actual_bytes'] / MIB:5.0f}"
              f" MiB  resident {g['resident_bytes'] / MIB:5.0f} MiB  mean stall "
              f"{g['mean_stall_pct']:5.2f} %  {'alive' if g['alive'] else 'DEAD'}")
