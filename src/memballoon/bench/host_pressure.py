"""``memballoon bench host-pressure``: a host-side process squeezes the guests' share of the host.

The scenario (issue 13), once per policy, on real guests: libvirt domains (``--world libvirt``,
a running libvirtd; their QEMUs moved into the cgroup with their charges) or QEMU VMs the
backend launches (``--world qemu``). Two guests of ``GUEST_MIB`` run in
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
- ``reversals_under_pressure``: guests the manager grew back (a balloon target it set below
  the balloon the guest had) while the host was under its reserve;
- ``recovered_s``: from the process's exit until every guest's target is back within
  ``RECOVERED_TOLERANCE_MIB`` of its idle size (None: not within ``RECOVER_MAX_S``);
- ``guest_oom_kills`` (guest kernel log and pressure reports), ``host_min_available_bytes``,
  ``limit_hits`` (the cgroup's failure count: allocations that hit its limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from memballoon.host.cgroup import MemoryCgroup
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import MIB, PAGE_SIZE, bytes_to_pages, mib_to_pages
from memballoon.policy.registry import make_policy
from memballoon.policy.sample import GuestSettings
from memballoon.qemu.agent import AgentChannel
from memballoon.qemu.backend import QemuBackend
from memballoon.qemu.image import GuestImage, build_guest_image
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
    # each step: time, the host's available pages, each guest's target and actual balloon
    steps: list[tuple[float, int, dict[str, int], dict[str, int]]] = field(
        default_factory=list)
    # each target the manager set: time, the host's available pages, guest, old and new
    # target, the balloon it had
    changes: list[tuple[float, int, str, int, int, int]] = field(default_factory=list)
    # each step: each guest's report age and the policy's counters (to read a run back)
    ages: list[tuple[float, dict[str, float | None], dict[str, int]]] = field(
        default_factory=list)


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
    # a guest grown back by the manager while the host was short: a target it set below the
    # balloon the guest had (a target only brought down to the balloon it reached is no growth)
    reversals = sum(1 for _, avail, _, old, new, balloon in trace.changes
                    if avail < reserve and new < old and new < balloon - tolerance_pages)
    prev: dict[str, int] | None = None
    recovered: float | None = None
    for t, _, targets, _ in trace.steps:
        if prev is not None and any(targets[g] > prev.get(g, targets[g]) for g in targets):
            growths.append(t)
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


GUESTS: Final = ("g1", "g2")
#: virDomainCreateFlags VIR_DOMAIN_START_PAUSED (libvirt include/libvirt-domain.h).
VIR_DOMAIN_START_PAUSED: Final = 1
CONSOLE_TIMEOUT_S: Final = 120.0
BOOT_TIMEOUT_S: Final = 120.0


@dataclass
class _World:
    """The guests of one run, whichever world runs them."""

    backend: Any  # a Backend with AsyncIO (QemuBackend, LibvirtBackend)
    cgroup: MemoryCgroup
    consoles: dict[str, Path]
    agents: dict[str, AgentChannel]
    closers: list[Any] = field(default_factory=list)


async def _wait_console(path: Path, marker: str, after: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONSOLE_TIMEOUT_S
    while loop.time() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if any(line.startswith(marker) for line in text[after:].splitlines()):
            return
        await asyncio.sleep(0.1)
    raise MemballoonError(f"{marker} never came on {path}")


async def _qemu_world(image: GuestImage, run_dir: Path, cg_name: str) -> _World:
    specs = [QemuGuest(n, max_mib=GUEST_MIB, accel="tcg") for n in GUESTS]
    b = await QemuBackend.create(specs, run_dir=run_dir, budget_bytes=SHARE_MIB * MIB,
                                 image=image, cgroup_name=cg_name)
    if b.budget is None or b.budget.cgroup is None:
        await b.close()
        raise ConfigError("bench host-pressure needs root and a memory cgroup")
    consoles, agents = {}, {}
    for n in GUESTS:
        proc, agent = b.process(n), b.agent(n)
        assert proc is not None and agent is not None
        consoles[n], agents[n] = proc.console_path, agent
    return _World(b, b.budget.cgroup, consoles, agents, [b.close])


async def _libvirt_world(image: GuestImage, run_dir: Path, cg_name: str, uri: str) -> _World:
    from memballoon.qemu.libvirt_backend import LibvirtBackend, _import_libvirt, domain_xml

    lv = _import_libvirt()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise ConfigError(f"--uri {uri}: cannot connect to libvirt ({exc}); is libvirtd "
                          "running?") from None
    cgroup = MemoryCgroup.create(cg_name, SHARE_MIB * MIB)
    run_dir.mkdir(parents=True, exist_ok=True)
    doms: list[Any] = []
    consoles: dict[str, Path] = {}

    async def close() -> None:
        for d in doms:
            with contextlib.suppress(lv.libvirtError):
                d.destroy()
        conn.close()
        with contextlib.suppress(MemballoonError):
            cgroup.remove()

    try:
        for n in GUESTS:
            consoles[n] = run_dir / f"{n}.console"
            xml = domain_xml(f"mb-hp-{n}", image, max_mib=GUEST_MIB,
                             agent_path=str(run_dir / f"{n}.agent"))
            xml = xml.replace("<serial type='pty'><target port='0'/></serial>",
                              f"<serial type='file'><source path='{consoles[n]}'/>"
                              "<target port='0'/></serial>")
            # started paused, joined to the cgroup, then run: every page the guest touches is
            # charged there (the QemuBackend launches its VMs the same way)
            with contextlib.suppress(lv.libvirtError):  # the bench's own, left by a run
                conn.lookupByName(f"mb-hp-{n}").destroy()  # that was killed
            dom = conn.createXML(xml, VIR_DOMAIN_START_PAUSED)
            doms.append(dom)
            cgroup.add(int(Path(f"/run/libvirt/qemu/mb-hp-{n}.pid").read_text()))
            dom.resume()
        b = LibvirtBackend(uri, domains=[f"mb-hp-{n}" for n in GUESTS])
    except BaseException:
        await close()
        raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_TIMEOUT_S
    try:
        while True:  # booted: both report through the agent channel
            snap = await b.poll()
            if len(snap) == 2 and all(s.alive and s.report is not None for s in snap.values()):
                break
            if loop.time() > deadline:
                raise MemballoonError(f"libvirt domains did not boot and report: {dict(snap)}")
            await asyncio.sleep(0.5)
        agents: dict[str, AgentChannel] = {}
        for n in GUESTS:
            a = b.agent(f"mb-hp-{n}")
            if a is None:
                raise MemballoonError(f"domain mb-hp-{n} has no memballoon agent channel")
            agents[f"mb-hp-{n}"] = a
    except BaseException:
        b.close()
        await close()
        raise
    consoles = {f"mb-hp-{n}": consoles[n] for n in GUESTS}

    async def close_all() -> None:
        try:
            await b.aclose()
        finally:  # the domains go whatever the backend's sockets did
            await close()

    return _World(b, cgroup, consoles, agents, [close_all])


async def run_one(policy_name: str, *, run_dir: Path, world: str = "qemu",
                  uri: str = "qemu:///system") -> dict[str, Any]:
    image = await asyncio.to_thread(build_guest_image)
    cg_name = f"memballoon-hp-{os.getpid()}-{policy_name}"
    w = (await _libvirt_world(image, run_dir / policy_name, cg_name, uri) if world == "libvirt"
         else await _qemu_world(image, run_dir / policy_name, cg_name))
    try:
        return await _scenario(policy_name, w, run_dir / policy_name / "journal.jsonl")
    finally:
        for close in w.closers:
            await close()


async def _scenario(policy_name: str, w: _World, journal: Path) -> dict[str, Any]:
    b, cgroup = w.backend, w.cgroup
    names = list(w.agents)
    for name in names:  # touched and freed, then held: QEMU holds both
        for cmd, marker in ((f"hog {FREED_MIB}", "MEMBALLOON-HOG"),
                            ("unhog", "MEMBALLOON-UNHOG"),
                            (f"hog {HELD_MIB}", "MEMBALLOON-HOG")):
            console = w.consoles[name]
            start = len(console.read_text(errors="replace")) if console.exists() else 0
            await w.agents[name].send_command(cmd)
            await _wait_console(console, marker, start)
    probe = CgroupProbe(cgroup.path)
    reserve = mib_to_pages(RESERVE_MIB)
    settings = dict.fromkeys(names, GuestSettings(min_pages=mib_to_pages(MIN_MIB)))
    core = ManagerCore(make_policy(policy_name), settings, None, reserve_pages=reserve,
                       counters=b.counters)
    journal.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(b, core, Journal(journal), b.clock, host_probe=probe)
    trace = _Trace()

    def tick(e: Engine) -> None:
        if e.host is not None:
            now, avail = e.now(), bytes_to_pages(max(0, e.host.available_bytes))
            trace.steps.append((now, avail,
                                {g: s.target_pages for g, s in e.guests.items() if s.alive},
                                {g: s.balloon_pages for g, s in e.guests.items() if s.alive}))
            trace.ages.append((now, {g: s.report_age_s(now) for g, s in e.guests.items()},
                               {**getattr(e.core.policy, "counters", Counters()).as_dict(),
                                **e.counters.as_dict()}))
            for a in e.last_applied:
                s = e.guests.get(a.guest)
                trace.changes.append((now, avail, a.guest, a.old_pages, a.new_pages,
                                      s.balloon_pages if s is not None else 0))

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
    # beside the journal: what the figures were measured from
    (journal.parent / "trace.json").write_text(json.dumps(
        {"reserve_pages": reserve, "t_exit": t_exit, "idle": idle, "avail": trace.avail,
         "steps": trace.steps, "changes": trace.changes, "ages": trace.ages}))
    snap = await b.poll()
    oom = 0
    for name in names:
        log = w.consoles[name].read_text(errors="replace")
        rep = snap[name].report
        oom += int(any(s in log for s in OOM_SIGNS)) + (rep.oom_kills if rep else 0)
    out.update({
        "world": b.name,
        "hog_mib": hog.mib if hog is not None else 0,
        "guest_oom_kills": oom,
        "limit_hits": _failcnt(cgroup.path) - fail0,
        "idle_sizes_mib": {g: (GUEST_MIB * MIB - p * PAGE_SIZE) // MIB
                           for g, p in idle.items()},
        "decisions": engine.decisions,
        "held_back": {k: v for k, v in b.counters.as_dict().items()
                      if k.startswith("skip_") or k == "set_target_failed"},
    })
    return out


def run_bench(policies: list[str], *, world: str = "qemu", uri: str = "qemu:///system",
              progress: Any = None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mb-hp-", dir="/tmp") as tmp:
        for name in policies:
            if progress is not None:
                progress(f"bench host-pressure: {name} on {world} (about 2 minutes)")
            results[name] = asyncio.run(run_one(name, run_dir=Path(tmp), world=world,
                                                uri=uri))
    return {"world": world, "guest_mib": GUEST_MIB, "share_mib": SHARE_MIB,
            "reserve_mib": RESERVE_MIB, "period_s": PERIOD_S, "policies": results}


def register(bsub: Any) -> None:
    def cmd(a: argparse.Namespace) -> int:
        def progress(msg: str) -> None:
            print(f"memballoon: {msg}", file=sys.stderr, flush=True)

        names = [n.strip() for n in a.policies.split(",") if n.strip()]
        res = run_bench(names, world=a.world, uri=a.uri, progress=progress)
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
    p.add_argument("--world", choices=["qemu", "libvirt"], default="qemu",
                   help="QEMU VMs the backend launches, or libvirt domains (default qemu)")
    p.add_argument("--uri", default="qemu:///system", help="libvirt URI (--world libvirt)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


__all__ = ["measure", "register", "run_bench", "run_one"]
