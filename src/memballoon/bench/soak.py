"""``memballoon bench soak``: local guests, one of them hostile, for minutes; all checked.

N well-behaved local guests (real processes over memfd RAM; protocols and workloads drawn at
random from a seed) and one hostile guest (``local/hostile.py`` ``storm``: a fresh round of
large chains behind every doorbell, doorbells and NOTIFY messages without end, a PFN array in
its own balloon, a lying ``actual``) share one ``LocalHost``. Every period (``--period``,
1 s) the soak:

- restarts the guests it killed the period before, and SIGKILLs a few others at random
  (``--kill-rate``: the chance a guest is killed in a period);
- gives a random half of the guests a random balloon target (up to ``MAX_TARGET_SHARE`` of
  their RAM), and times how long each well-behaved guest takes to reach it (polled every
  ``POLL_S``): ``good_guest_p99_latency_ms`` over the guests the host signals (virtio,
  vmw-batched; the seed's VMware driver polls once a second, its figure is apart);
- checks every invariant: no ballooned frame resident (the host never faulted released memory
  back in: ``refaulted_bytes``), balloons and targets within RAM, no handler error counted for
  any guest, no well-behaved guest throttled;
- has every live well-behaved guest verify every page it holds (the stamps written by its
  workload: PFN, generation, checksum): ``data_corruptions`` is the pages that lost their data.

At the end the host is closed and the process's open fds must be those it had before (a dead
guest's memfd, eventfds and socket all closed). ``hostile_guest_cpu_share`` is the loop
thread's CPU time spent serving the hostile guest over the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from memballoon.local.host import GuestSpec, LocalHost
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import PAGE_SIZE

PROTOCOLS: Final = ("virtio", "vmw-batched", "vmw")
SIGNALLED: Final = frozenset({"virtio", "vmw-batched"})
WORKLOADS: Final = (
    "idle",
    "steady:anon=0.2,file=0.1",
    "bursty:base=0.05,peak=0.35,file=0.02,period=20,burst=5",
    "ramp:start=0.05,peak=0.35,file=0.02,rate=0.02,at=5,stop=40",
)
GUEST_MIB: Final = 128
MAX_TARGET_SHARE: Final = 0.45
PERIOD_S: Final = 1.0
POLL_S: Final = 0.01
KILL_RATE: Final = 0.03
HOSTILE: Final = "hostile"
VERIFY_TIMEOUT_S: Final = 30.0
SAMPLE_LIMIT: Final = 10


@dataclass
class _Tally:
    periods: int = 0
    violations: int = 0
    samples: list[str] = field(default_factory=list)
    corruptions: int = 0
    pages_verified: int = 0
    released_pages: int = 0
    refaulted_pages: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"signalled": [],
                                                                        "vmw": []})
    not_reached: int = 0
    kills: int = 0
    restarts: int = 0
    hostile_cpu_s: float = 0.0
    good_cpu_s: float = 0.0
    hostile_counters: dict[str, int] = field(default_factory=dict)

    def violation(self, what: str) -> None:
        self.violations += 1
        if len(self.samples) < SAMPLE_LIMIT:
            self.samples.append(what)


def guest_specs(guests: int, seed: int, guest_mib: int = GUEST_MIB,
                hostile: bool = True) -> list[GuestSpec]:
    """The well-behaved guests (protocols and workloads drawn from ``seed``), then the hostile."""
    rng = random.Random(seed)
    specs = [GuestSpec(f"g{i}", guest_mib, PROTOCOLS[i % len(PROTOCOLS)],
                       rng.choice(WORKLOADS), seed=seed + i, period_s=0.5)
             for i in range(guests)]
    if hostile:
        specs.append(GuestSpec(HOSTILE, guest_mib, "virtio", "idle", program=(
            sys.executable, "-m", "memballoon.local.hostile", "storm")))
    return specs


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _percentile_ms(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(xs), q)) * 1000, 2) if xs else None


class _Soak:
    def __init__(self, host: LocalHost, specs: list[GuestSpec], rng: random.Random,
                 period_s: float, kill_rate: float) -> None:
        self.host, self.specs, self.rng = host, specs, rng
        self.period_s, self.kill_rate = period_s, kill_rate
        self.t = _Tally()
        self.good = [s for s in specs if s.name != HOSTILE]
        self.protocol = {s.name: s.protocol for s in specs}
        self.pending: dict[str, tuple[int, float]] = {}  # target set, and when
        self.released: dict[int, int] = {}  # id(MemfdRam) -> released pages seen
        self.errors_seen: dict[str, int] = {}

    async def period(self, loop: asyncio.AbstractEventLoop) -> None:
        host, rng, t = self.host, self.rng, self.t
        t.periods += 1
        start = loop.time()
        snap = host.guests()
        for s in self.specs:  # a guest killed last period boots again
            if not snap[s.name].alive:
                self._account_cpu(s.name)
                if await host.restart(s.name):
                    t.restarts += 1
        snap = host.guests()
        for s in self.good:
            pid = host.pid(s.name)
            if snap[s.name].alive and pid is not None and rng.random() < self.kill_rate:
                os.kill(pid, signal.SIGKILL)
                t.kills += 1
                self.pending.pop(s.name, None)
        for s in self.specs:
            if rng.random() < 0.5 and snap[s.name].alive:
                target = rng.randint(0, int(s.pages * MAX_TARGET_SHARE))
                if host.set_target(s.name, target) and s.name != HOSTILE:
                    if s.name in self.pending:
                        t.not_reached += 1
                    self.pending[s.name] = (target, loop.time())
        while loop.time() < start + self.period_s:
            snap = host.guests()
            now = loop.time()
            for name, (target, at) in list(self.pending.items()):
                if not snap[name].alive:
                    del self.pending[name]
                elif snap[name].balloon_pages == target:
                    kind = "signalled" if self.protocol[name] in SIGNALLED else "vmw"
                    t.latencies[kind].append(now - at)
                    del self.pending[name]
            await asyncio.sleep(POLL_S)
        await self.check()

    async def check(self) -> None:
        host, t = self.host, self.t
        snap = host.guests()
        for s in self.specs:
            v = snap[s.name]
            if not v.alive:
                continue
            ram = host.ram(s.name)
            try:
                ball = host.balloon_pfns(s.name)
                refaulted = int(ram.resident_mask(ball).sum()) if ball.size else 0
                released = ram.released_pages_total
            except MemballoonError:  # it died under us: its RAM is closed
                continue
            t.released_pages += released - self.released.get(id(ram), 0)
            self.released[id(ram)] = released
            if refaulted:
                t.refaulted_pages += refaulted
                t.violation(f"{s.name}: {refaulted} ballooned frames resident")
            if not 0 <= v.balloon_pages <= s.pages or not 0 <= v.target_pages <= s.pages:
                t.violation(f"{s.name}: balloon {v.balloon_pages} / target {v.target_pages} "
                            f"outside {s.pages} pages")
            counters = host.counters_of(s.name)
            for k, n in counters.items():
                key = f"{s.name}/{id(ram)}/{k}"
                if k.startswith("error_") and n > self.errors_seen.get(key, 0):
                    t.violation(f"{s.name}: {k} {n}")
                    self.errors_seen[key] = n
            if s.name != HOSTILE and counters.get("throttled", 0):
                t.violation(f"{s.name}: a well-behaved guest was throttled")
        await asyncio.gather(*(self._verify(s.name) for s in self.good if snap[s.name].alive))

    async def _verify(self, name: str) -> None:
        try:
            r = await self.host.control(name, "verify", VERIFY_TIMEOUT_S)
        except (MemballoonError, TimeoutError):
            return  # killed meanwhile
        self.t.corruptions += int(r.get("lost_pages", 0))
        self.t.pages_verified += int(r.get("checked_pages", 0))
        for e in r.get("invariant_errors", []) or []:
            self.t.violation(f"{name}: guest invariant: {e}")

    def _account_cpu(self, name: str) -> None:
        """A guest about to be replaced: keep what serving it cost."""
        w = self.host.work_of(name)
        if name == HOSTILE:
            self.t.hostile_cpu_s += w["cpu_s"]
            for k, n in self.host.counters_of(name).items():
                self.t.hostile_counters[k] = self.t.hostile_counters.get(k, 0) + n
        else:
            self.t.good_cpu_s += w["cpu_s"]


async def soak(guests: int, seconds: float, *, seed: int = 1, guest_mib: int = GUEST_MIB,
               period_s: float = PERIOD_S, kill_rate: float = KILL_RATE, hostile: bool = True,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the soak (see the module docstring); the figures as one dict."""
    if guests < 1:
        raise ConfigError("bench soak: --guests must be >= 1")
    if not seconds > 0 or not period_s > 0 or not 0 <= kill_rate <= 1:
        raise ConfigError("bench soak: --minutes and --period must be positive, "
                          "--kill-rate in [0, 1]")
    specs = guest_specs(guests, seed, guest_mib, hostile)
    loop = asyncio.get_running_loop()
    before = _fds()
    wall0, cpu0 = time.monotonic(), time.process_time()
    host = LocalHost(specs, budget_bytes=None)
    async with host:
        s = _Soak(host, specs, random.Random(seed), period_s, kill_rate)
        t0 = loop.time()
        next_note = t0 + 30
        while loop.time() - t0 < seconds:
            await s.period(loop)
            if progress is not None and loop.time() >= next_note:
                next_note += 30
                progress(f"bench soak: {loop.time() - t0:.0f} s, {s.t.periods} periods, "
                         f"{s.t.violations} violations, {s.t.corruptions} corruptions")
        for spec in specs:
            s._account_cpu(spec.name)
        wall = time.monotonic() - wall0
    await asyncio.sleep(0)
    t = s.t
    leaked = sorted(_fds() - before)
    if leaked:
        t.violation(f"fds left open: {leaked}")
    if host.counters["ram_close_deferred"]:
        t.violation("a dead guest's RAM was never closed")
    hc = t.hostile_counters
    return {
        "guests": guests, "hostile": hostile, "guest_mib": guest_mib, "seed": seed,
        "seconds": round(wall, 1), "period_s": period_s,
        "protocols": {p: sum(1 for x in specs[:guests] if x.protocol == p) for p in PROTOCOLS},
        "periods": t.periods,
        "invariant_violations": t.violations, "violations_sample": t.samples,
        "data_corruptions": t.corruptions, "pages_verified": t.pages_verified,
        "released_bytes": t.released_pages * PAGE_SIZE,
        "refaulted_bytes": t.refaulted_pages * PAGE_SIZE,
        "hostile_guest_cpu_share": round(t.hostile_cpu_s / wall, 4),
        "good_guests_cpu_share": round(t.good_cpu_s / wall, 4),
        "host_cpu_share": round((time.process_time() - cpu0) / wall, 4),
        "good_guest_p99_latency_ms": _percentile_ms(t.latencies["signalled"], 99),
        "good_guest_p50_latency_ms": _percentile_ms(t.latencies["signalled"], 50),
        "latency_samples": len(t.latencies["signalled"]),
        "legacy_vmw_p99_latency_ms": _percentile_ms(t.latencies["vmw"], 99),
        "targets_not_reached": t.not_reached,
        "guest_kills": t.kills, "guest_restarts": t.restarts,
        "hostile_throttled_periods": hc.get("throttled", 0),
        "hostile_refused": {k: hc.get(k, 0) for k in (
            "buffer_in_balloon", "actual_beyond_held", "inflate_pfn_already_in_balloon")},
    }


def register(bsub: Any) -> None:
    """Add ``bench soak`` to the ``bench`` subparsers."""

    def cmd(a: argparse.Namespace) -> int:
        def progress(msg: str) -> None:
            print(f"memballoon: {msg}", file=sys.stderr, flush=True)

        res = asyncio.run(soak(a.guests, a.minutes * 60, seed=a.seed, guest_mib=a.guest_mib,
                               period_s=a.period, kill_rate=a.kill_rate,
                               hostile=not a.no_hostile, progress=progress))
        if a.json:
            print(json.dumps(res))
        else:
            for k, v in res.items():
                print(f"{k:<28} {v}")
        bad = res["invariant_violations"] or res["data_corruptions"] or res["refaulted_bytes"]
        return 1 if bad else 0

    def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                v = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
            if not v > 0 or v != v or v == float("inf"):
                raise argparse.ArgumentTypeError(f"must be positive and finite: {text!r}")
            return v
        return parse

    p = bsub.add_parser(
        "soak", help="local guests (one hostile) for minutes: kills, restarts, every check",
        description="N local guests with random workloads and targets, guest kills and "
                    "restarts, one hostile guest; every invariant and every guest's data "
                    "checked every period. Exit status 1 on any violation or corruption.")
    p.add_argument("--guests", type=positive(int), default=4,
                   help="well-behaved guests (default 4)")
    p.add_argument("--minutes", type=positive(float), default=5.0, help="length (default 5)")
    p.add_argument("--guest-mib", type=positive(int), default=GUEST_MIB,
                   help=f"RAM of each guest (default {GUEST_MIB})")
    p.add_argument("--period", type=positive(float), default=PERIOD_S,
                   help=f"seconds between checks (default {PERIOD_S:g})")
    p.add_argument("--kill-rate", type=float, default=KILL_RATE,
                   help=f"chance a guest is killed in a period (default {KILL_RATE:g})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-hostile", action="store_true", help="leave the hostile guest out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


__all__ = ["GUEST_MIB", "HOSTILE", "guest_specs", "register", "soak"]
