"""``memballoon bench policy``: every policy on the same seeded local scenario, real memory.

Four local guests (256 MiB each by default: bursty, ramp, steady, idle; ``workload_specs``)
whose peak demands add up to 1.5 times the host budget (guest memory; the cgroup that enforces
it also gets each guest process's interpreter overhead on top). Each policy gets a fresh set
of guest processes, the same seeds and the same length of run, through the real manager (the
``Engine`` over ``LocalHost`` in its asyncio shell, as the daemon runs it). Sampled every
``SAMPLE_S`` by the bench (the edge):

- ``host_peak_resident_bytes``: the most the guests' memfds held at once (st_blocks);
- ``mean_released_bytes``: the mean of the live guests' balloons (memory given back);
- ``guest_oom_kills``: OOM kills inside guests, plus guests the budget's cgroup killed;
- ``mean_stall_pct``/``p99_stall_pct``: over every pressure report of every guest;
- ``decisions``: balloon targets the manager applied.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from memballoon.edge.aio import AsyncEngine
from memballoon.edge.journal import Journal
from memballoon.guest.workload import make_workload
from memballoon.local.host import PROCESS_OVERHEAD_BYTES, GuestSpec, LocalHost
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.model.units import MIB, PAGE_SIZE, mib_to_pages
from memballoon.policy.base import Policy
from memballoon.policy.sample import GuestSettings

DEFAULT_POLICIES: Final = ("default", "static", "mom", "proxmox", "esx")
WORKLOAD_MIX: Final = ("bursty", "ramp", "steady", "idle")
GUEST_MIB: Final = 256
OVERCOMMIT: Final = 1.5  # peaks / budget, as issue 4 asks
SECONDS: Final = 45.0
SAMPLE_S: Final = 0.5
FLOOR_FRACTION: Final = 0.125  # each guest's min: an eighth of its RAM


def workload_specs(seconds: float) -> dict[str, str]:
    """The four guests' workloads (guest/workload.py specs), timed as fractions of the run so
    a shorter run keeps the same shape: the bursty guest bursts early, the ramp (a batch job)
    grows after it and ends; steady and idle hold. The transients never peak together, so a
    policy that moves memory in time can fit them all; one that does not cannot."""
    t = seconds
    return {
        "bursty": (f"bursty:base=0.05,peak=0.9,file=0.02,period={2 * t:g},"
                   f"burst={0.25 * t:g},phase={2 * t - 0.1 * t:g}"),
        "ramp": (f"ramp:start=0.05,peak=0.9,file=0.02,rate={0.9 / (0.15 * t):.4f},"
                 f"at={0.45 * t:g},stop={0.8 * t:g}"),
        "steady": "steady:anon=0.3,file=0.1",
        "idle": "idle",
    }


def peak_bytes(kind: str, mib: int, seed: int, horizon_s: float) -> int:
    """The largest demand (anon + file) workload ``kind`` makes within ``horizon_s``."""
    w = make_workload(kind, mib, seed)
    peak = 0
    for t in np.arange(0.0, horizon_s + 1.0, 0.25):
        d = w.demand(float(t))
        peak = max(peak, d.anon_pages + d.file_pages)
    return peak * PAGE_SIZE


def scenario(seed: int, seconds: float, guest_mib: int = GUEST_MIB,
             protocol: str = "virtio") -> tuple[list[GuestSpec], int]:
    """The guests and the host budget (for guest memory): their peaks are 1.5 times it."""
    kinds = workload_specs(seconds)
    specs = [GuestSpec(name=f"{kind}{i}", mib=guest_mib, protocol=protocol,
                       workload=kinds[kind], seed=seed + i)
             for i, kind in enumerate(WORKLOAD_MIX)]
    peaks = sum(peak_bytes(s.workload, guest_mib, s.seed, seconds) for s in specs)
    budget = int(peaks / OVERCOMMIT) // PAGE_SIZE * PAGE_SIZE
    return specs, budget


async def run_one(policy: Policy, specs: Sequence[GuestSpec], budget_bytes: int,
                  seconds: float, *, period_s: float = 1.0) -> dict[str, Any]:
    settings = {s.name: GuestSettings(min_pages=int(mib_to_pages(s.mib) * FLOOR_FRACTION))
                for s in specs}
    # the cgroup also holds each guest process's own interpreter: give it that on top, so the
    # budget the policies are held to is guest memory only (as local/demo.py does)
    host = LocalHost(specs, budget_bytes=budget_bytes + PROCESS_OVERHEAD_BYTES * len(specs),
                     cgroup_name=f"memballoon-bench-{os.getpid()}-{policy.name}")
    async with host:
        b = host.budget
        enforced = b is not None and b.enforced
        core = ManagerCore(policy, settings, budget_bytes // PAGE_SIZE, enforced=enforced,
                           counters=host.counters)
        m = Engine(host, core, Journal(None), host.clock)
        task = asyncio.create_task(AsyncEngine(m, period_s=period_s).run(seconds))
        peak = 0
        released: list[int] = []
        stalls: list[float] = []
        seen: dict[str, object] = {}
        while True:
            peak = max(peak, host.resident_bytes())
            snap = host.guests()
            released.append(sum(v.balloon_pages for v in snap.values() if v.alive) * PAGE_SIZE)
            for name, v in snap.items():
                if v.report is not None and seen.get(name) is not v.report:
                    seen[name] = v.report
                    stalls.append(v.report.stall_pct)
            if task.done():
                break
            await asyncio.sleep(SAMPLE_S)
        await task
        snap = host.guests()
        oom = sum(v.report.oom_kills for v in snap.values() if v.report is not None)
        killed = sum(1 for v in snap.values()
                     if not v.alive and host.exit_code(v.name) not in (0, None))
        st = np.array(stalls or [0.0])
        return {
            "host_peak_resident_bytes": int(peak),
            "host_budget_bytes": budget_bytes,
            "budget_enforced": enforced,
            "mean_released_bytes": int(np.mean(released)) if released else 0,
            "guest_oom_kills": int(oom + killed),
            "mean_stall_pct": round(float(st.mean()), 3),
            "p99_stall_pct": round(float(np.percentile(st, 99)), 3),
            "decisions": m.decisions,
            "reports": len(stalls),
            "policy_errors": host.counters["policy_error"],
            "held_back": {k: v for k, v in host.counters.as_dict().items()
                          if k.startswith("skip_") or k == "clamped"},
        }


PolicyFactory = Callable[[], Policy]


def registry_factories(names: Sequence[str]) -> dict[str, PolicyFactory]:
    from memballoon.app.daemon import make_policy

    out: dict[str, PolicyFactory] = {}
    for n in names:
        make_policy(n, {})  # fail early, with the config error, for an unknown name
        out[n] = lambda n=n: make_policy(n, {})  # type: ignore[misc]
    return out


def run_bench(
    policies: Sequence[str] | Mapping[str, PolicyFactory] = DEFAULT_POLICIES,
    *,
    seconds: float = SECONDS,
    seed: int = 1,
    guest_mib: int = GUEST_MIB,
    period_s: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    factories = (dict(policies) if isinstance(policies, Mapping)
                 else registry_factories(list(policies)))
    specs, budget = scenario(seed, seconds, guest_mib)
    results: dict[str, Any] = {}
    for name, make in factories.items():
        if progress is not None:
            progress(f"bench policy: {name} for {seconds:g} s")
        results[name] = asyncio.run(run_one(make(), specs, budget, seconds, period_s=period_s))
    peaks = sum(peak_bytes(s.workload, guest_mib, s.seed, seconds) for s in specs)
    return {
        "seconds": seconds, "seed": seed, "guest_mib": guest_mib,
        "guests": [{"name": s.name, "workload": s.workload, "ram_bytes": s.mib * MIB,
                    "peak_demand_bytes": peak_bytes(s.workload, guest_mib, s.seed, seconds)}
                   for s in specs],
        "host_budget_bytes": budget, "peak_demand_bytes": peaks,
        "policies": results,
    }


def register(bsub: Any) -> None:
    """Add ``bench policy`` to the ``bench`` subparsers."""
    import argparse
    import json
    import sys

    def cmd(a: argparse.Namespace) -> int:
        def progress(msg: str) -> None:
            print(f"memballoon: {msg}", file=sys.stderr, flush=True)

        res = run_bench(a.policies.split(","), seconds=a.seconds, seed=a.seed,
                        guest_mib=a.guest_mib, progress=progress)
        if a.json:
            print(json.dumps(res))
        else:
            for name, r in res["policies"].items():
                print(name, json.dumps(r))
        return 0

    p = bsub.add_parser("policy", help="every policy on the same local scenario, real memory",
                        description="4 local guests whose peaks are 1.5x the host budget, "
                        "run once per policy.")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated (default {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--seconds", type=float, default=SECONDS,
                   help=f"run length per policy (default {SECONDS:g})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--guest-mib", type=int, default=GUEST_MIB)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


__all__ = ["DEFAULT_POLICIES", "peak_bytes", "register", "run_bench", "run_one", "scenario"]
