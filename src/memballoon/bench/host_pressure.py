"""``memballoon bench host-pressure``: a host-side process squeezes the guests' share of the host.

The scenario (issue 13), once per policy, on real QEMU guests: two guests of ``GUEST_MIB`` run in
one memory cgroup that stands for the guests' share of the host (limit ``SHARE_MIB``); each
holds ``HELD_MIB`` in tmpfs and has touched and freed ``FREED_MIB`` more (memory its QEMU still
holds, free inside the guest). The manager runs with ``budget = "auto"`` and a host reserve of
``RESERVE_MIB`` against that cgroup (``edge.hostmem.CgroupProbe``), a 1 s period. After
``SETTLE_S`` (the sizes the policy holds when the host is idle), a host-side process joins the
cgroup and grows until the cgroup's available memory is ``OVERSHOOT_MIB`` under the reserve
(had the guests not moved), holds ``HOLD_S``, and exits. Measured from 0.1 s samples of the
probe and each manager step:

- ``first_shrink_s``: from the moment the available memory crossed the reserve to the first
  balloon growth;
- ``reversals_under_pressure``: guests grown back (a balloon target lowered) while the host
  was under its reserve;
- ``recovered_s``: from the process's exit until every guest's target is back within
  ``RECOVERED_TOLERANCE_MIB`` of its idle size (None: not within ``RECOVER_MAX_S``);
- ``guest_oom_kills`` (guest kernel log and pressure reports), ``host_min_available_bytes``,
  ``limit_hits`` (the cgroup's failure count: allocations that hit its limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memballoon.edge.aio import AsyncEngine
from memballoon.edge.hostmem import CgroupProbe
from memballoon.edge.journal import Journal
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import MIB, PAGE_SIZE, bytes_to_pages, mib_to_pages
from memballoon.policy.registry import make_policy
from memballoon.policy.sample import GuestSettings
from memballoon.qemu.backend import QemuBackend
from memballoon.qemu.image import build_guest_image
from memballoon.qemu.launch import QemuGuest

POLICIES: Final = ("default", "mom", "proxmox")
GUEST_MIB: Final = 1024
SHARE_MIB: Final = 2048
RESERVE_MIB: Final = 256
HELD_MIB: Final = 300
FREED_MIB: Final = 400
MIN_MIB: Final = 128
OVERSHOOT_MIB: Final = 160
HOG_STEP_MIB: Final = 32
HOG_STEP_S: Final = 0.1
SETTLE_S: Final = 30.0
HOLD_S: Final = 20.0
RECOVER_MAX_S: Final = 60.0
RECOVERED_TOLERANCE_MIB: Final = 48
SAMPLE_S: Final = 0.1
PERIOD_S: Final = 1.0
OOM_SIGNS: Final = ("Out of memory", "oom-kill", "Killed process", "Kernel panic")

#: The host-side process: joins nothing itself (the bench puts it in the cgroup before its
#: first allocation), grows by ``grow N`` MiB of touched anonymous memory, exits on EOF.
HOG_SCRIPT: Final = """
import mmap, sys
held = []
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "grow":
        m = mmap.mmap(-1, int(arg[0]) << 20)
        m.write(b"\\x01" * len(m))
        held.append(m)
    print("ok", flush=True)
"""


@dataclass
class _Trace:
    """What the bench saw, on the backend's clock."""

    avail: list[tuple[float, int]] = field(default_factory=list)  # 0.1 s probe samples
    steps: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)  # avail, targets


class _Hog:
    def __init__(self, cgroup_procs: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOG_SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        cgroup_procs.write_text(str(self.proc.pid))  # before its first allocation
        self.mib = 0

    def grow(self, mib: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"grow {mib}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise MemballoonError(f"the host-side process died growing to {self.mib + mib} MiB "
                                  f"(exit {self.proc.poll()}): killed at the cgroup's limit?")
        self.mib += mib

    def exit(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _failcnt(cgroup: Path) -> int:
    v1 = cgroup / "memory.failcnt"
    if v1.exists():
        return int(v1.read_text())
    for line in (cgroup / "memory.events").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "max":
            return int(v)
    return 0


def first_after(times: list[float], t0: float) -> float | None:
    later = [t for t in times if t >= t0]
    return min(later) - t0 if later else None


def measure(trace: _Trace, reserve: int, idle: dict[str, int], t_exit: float,
            tolerance_pages: int) -> dict[str, Any]:
    """The figures of one run from its trace (see the module docstring); pure."""
    cross = next((t for t, a in trace.avail if a < reserve), None)
    growths: list[float] = []
    reversals = 0
    prev: dict[str, int] | None = None
    recovered: float | None = None
    for t, avail, targets in trace.steps:
        if prev is not None:
            if any(targets[g] > prev.get(g, targets[g]) for g in targets):
                growths.append(t)
            if avail < reserve and any(targets[g] < prev.get(g, targets[g]) for g in targets):
                reversals += 1
        prev = targets
        if recovered is None and t >= t_exit and all(
                abs(targets[g] - idle[g]) <= tolerance_pages for g in idle):
            recovered = t - t_exit
    return {
        "crossed_reserve": cross is not None,
        "first_shrink_s": None if cross is None else first_after(growths, cross),
        "reversals_under_pressure": reversals,
        "recovered_s": recovered,
        "host_min_available_bytes": min((a for _, a in trace.avail), default=0) * PAGE_SIZE,
    }


async def run_one(policy_name: str, *, run_dir: Path) -> dict[str, Any]:
    image = await asyncio.to_thread(build_guest_image)
    cg_name = f"memballoon-hp-{os.getpid()}-{policy_name}"
    specs = [QemuGuest(n, max_mib=GUEST_MIB, accel="tcg") for n in ("g1", "g2")]
    b = await QemuBackend.create(specs, run_dir=run_dir / policy_name,
                                 budget_bytes=SHARE_MIB * MIB, image=image, cgroup_name=cg_name)
    async with b:
        if b.budget is None or b.budget.cgroup is None:
            raise ConfigError("bench host-pressure needs root and a memory cgroup")
        cgroup = b.budget.cgroup
        for name in ("g1", "g2"):  # touched and freed, then held: QEMU holds both
            agent, proc = b.agent(name), b.process(name)
            assert agent is not None and proc is not None
            for cmd, marker in ((f"hog {FREED_MIB}", "MEMBALLOON-HOG"),
                                ("unhog", "MEMBALLOON-UNHOG"),
                                (f"hog {HELD_MIB}", "MEMBALLOON-HOG")):
                start = len(proc.console_text())
                await agent.send_command(cmd)
                await proc.wait_for_console_async(marker, 120, after=start)
        probe = CgroupProbe(cgroup.path)
        reserve = mib_to_pages(RESERVE_MIB)
        settings = dict.fromkeys(("g1", "g2"), GuestSettings(min_pages=mib_to_pages(MIN_MIB)))
        core = ManagerCore(make_policy(policy_name), settings, None, reserve_pages=reserve,
                           counters=b.counters)
        engine = Engine(b, core, Journal(None), b.clock, host_probe=probe)
        trace = _Trace()

        def tick(e: Engine) -> None:
            if e.host is not None:
                trace.steps.append((e.now(), bytes_to_pages(max(0, e.host.available_bytes)),
                                    {g: s.target_pages for g, s in e.guests.items()}))

        shell = AsyncEngine(engine, period_s=PERIOD_S, on_tick=tick)
        task = asyncio.create_task(shell.run())
        fail0 = _failcnt(cgroup.path)
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                trace.avail.append((b.clock.now(),
                                    bytes_to_pages(max(0, probe.read().available_bytes))))
                await asyncio.sleep(SAMPLE_S)

        sampler = asyncio.create_task(sample())
        hog: _Hog | None = None
        try:
            await asyncio.sleep(SETTLE_S)
            idle = {g: s.target_pages for g, s in engine.guests.items()}
            want = max(0, probe.read().available_bytes - RESERVE_MIB * MIB) // MIB \
                + OVERSHOOT_MIB
            hog = _Hog(cgroup.path / "cgroup.procs")
            while hog.mib < want:
                await asyncio.to_thread(hog.grow, min(HOG_STEP_MIB, want - hog.mib))
                await asyncio.sleep(HOG_STEP_S)
            await asyncio.sleep(HOLD_S)
            hog.exit()
            t_exit = b.clock.now()
            tol = mib_to_pages(RECOVERED_TOLERANCE_MIB)
            deadline = t_exit + RECOVER_MAX_S
            while b.clock.now() < deadline and not all(
                    abs(engine.guests[g].target_pages - idle[g]) <= tol for g in idle):
                await asyncio.sleep(SAMPLE_S)
            await asyncio.sleep(2 * PERIOD_S)
        finally:
            if hog is not None:
                hog.exit()
            stop.set()
            await sampler
            shell.stop()
            await task
        out = measure(trace, reserve, idle, t_exit, mib_to_pages(RECOVERED_TOLERANCE_MIB))
        snap = await b.poll()
        oom = 0
        for name in ("g1", "g2"):
            proc = b.process(name)
            console = proc.console_text() if proc is not None else ""
            rep = snap[name].report
            oom += int(any(s in console for s in OOM_SIGNS)) + (rep.oom_kills if rep else 0)
        out.update({
            "hog_mib": hog.mib if hog is not None else 0,
            "guest_oom_kills": oom,
            "limit_hits": _failcnt(cgroup.path) - fail0,
            "idle_sizes_mib": {g: (GUEST_MIB * MIB - p * PAGE_SIZE) // MIB
                               for g, p in idle.items()},
            "decisions": engine.decisions,
        })
        return out


def run_bench(policies: list[str], *, progress: Any = None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mb-hp-", dir="/tmp") as tmp:
        for name in policies:
            if progress is not None:
                progress(f"bench host-pressure: {name} (about 2 minutes)")
            results[name] = asyncio.run(run_one(name, run_dir=Path(tmp)))
    return {"guest_mib": GUEST_MIB, "share_mib": SHARE_MIB, "reserve_mib": RESERVE_MIB,
            "period_s": PERIOD_S, "policies": results}


def register(bsub: Any) -> None:
    def cmd(a: argparse.Namespace) -> int:
        def progress(msg: str) -> None:
            print(f"memballoon: {msg}", file=sys.stderr, flush=True)

        names = [n.strip() for n in a.policies.split(",") if n.strip()]
        res = run_bench(names, progress=progress)
        if a.json:
            print(json.dumps(res))
        else:
            for name, r in res["policies"].items():
                print(name, json.dumps(r))
        return 0

    p = bsub.add_parser("host-pressure", help="real QEMU guests under a host-side process's "
                        "pressure, once per policy",
                        description="Two guests share a cgroup with a process that grows into "
                        "it past the host reserve, holds, and exits.")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated (default {','.join(POLICIES)})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


__all__ = ["measure", "register", "run_bench", "run_one"]
