"""``memballoon bench sim``: the simulator's speed and memory on the ``fleet`` scenario.

For each protocol, the built-in ``fleet`` scenario (1,000 guests of 1 to 8 GiB, mixed
workloads, a simulated hour, every driver working every second, the default policy deciding
every second) with every guest on that protocol, run in a process of its own so that its
peak memory is its own. Per protocol:

- ``guests``, ``simulated_seconds``, ``wall_seconds`` (the run, after the world is built;
  ``build_seconds`` and the invariant checks, ``check_seconds``, apart);
- ``guest_steps_per_second``: guest periods simulated per wall second (every guest's every
  driver period, slept through or run; ``guest_ticks`` of them were run);
- ``engine_step_ms_p50``/``_p99``: one manager step (collect, decide, act, journal) over all
  guests;
- ``shards``: the processes the guests ran in (``--shards``; 1: with the engine, in the run's
  process);
- ``peak_rss_bytes``: the run's peak resident memory (``ru_maxrss``): its process's, plus each
  shard worker's own peak (a sum: each holds its guests; what a worker shares with the
  process it was forked from is counted twice);
- ``invariant_violations``: every pair checked in full at the end (must be 0);
- what the run did: decisions, OOM kills, mean and p99 stall.

``--guests K`` takes every (1000/K)-th guest (the same mix), ``--duration`` another length,
``--repeat N`` runs each protocol N times and reports the run with the median wall time (every
run's wall time under ``runs``), ``--shards N`` runs the guests in N worker processes
(``app.sim_shards``: the same results exactly; default the CPUs the process may use, at most
4). The wall clock is read here, at the edge, never inside the simulation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any, Final

from memballoon.harness.pair import PROTOCOLS
from memballoon.model.errors import ConfigError
from memballoon.sim.scenario import Scenario

FLEET: Final = "fleet"


def fleet(protocol: str, guests: int | None = None, seconds: float | None = None) -> Scenario:
    """The fleet scenario with every guest on ``protocol`` (``guests``: an even subset)."""
    from memballoon.app.scenario import load_scenario

    sc = load_scenario(FLEET)
    specs = sc.guests
    if guests is not None:
        if not 0 < guests <= len(specs):
            raise ConfigError(f"--guests: {guests}; the fleet has 1 to {len(specs)}")
        step = len(specs) / guests
        specs = tuple(specs[int(i * step)] for i in range(guests))
    specs = tuple(replace(g, protocol=protocol) for g in specs)
    ram = sum(g.ram_pages for g in specs)
    host = None if sc.host_bytes is None else int(sc.host_bytes * ram / sc.ram_pages)
    budget = None if sc.budget_pages is None else int(sc.budget_pages * ram / sc.ram_pages)
    return replace(sc, guests=specs, seconds=seconds or sc.seconds, host_bytes=host,
                   budget_pages=budget)


def run_one(protocol: str, guests: int | None, seconds: float | None,
            progress: bool, shards: int = 1) -> dict[str, Any]:
    """One protocol's run, in this process and ``shards`` workers (the child's side)."""
    from memballoon.app.sim_cli import progress_bar
    from memballoon.app.sim_shards import Shards
    from memballoon.sim.run import run_scenario

    t0 = time.perf_counter()
    sc = fleet(protocol, guests, seconds)
    build = time.perf_counter() - t0
    world = Shards(shards)
    with progress_bar(progress) as prog:
        t1 = time.perf_counter()
        r = run_scenario(sc, stopwatch=time.perf_counter, build_world=world,
                         progress=lambda label, done, total: prog(
                             f"bench sim {protocol}", done, total))
        wall = time.perf_counter() - t1
    res = r.to_json(guests=False)
    check = res.get("check_seconds") or 0.0
    wall -= check  # the simulation alone; the invariant checks are reported apart
    period = sc.driver_period_s or 1.0
    steps = len(sc.guests) * sc.seconds / period
    return {
        "protocol": protocol, "guests": len(sc.guests), "simulated_seconds": sc.seconds,
        "wall_seconds": round(wall, 3), "build_seconds": round(build, 3),
        "check_seconds": round(check, 3),
        "guest_steps_per_second": round(steps / wall, 1),
        "engine_step_ms_p50": res.get("engine_step_ms_p50"),
        "engine_step_ms_p99": res.get("engine_step_ms_p99"),
        "shards": world.used,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        + sum(world.worker_peak_rss_bytes),
        "invariant_violations": res["invariant_violations"],
        "violations_sample": res["violations_sample"],
        "guest_ticks": res["guest_ticks"], "guest_idle_periods": res["guest_idle_periods"],
        "decisions": res["decisions"], "guest_oom_kills": res["guest_oom_kills"],
        "mean_stall_pct": res["mean_stall_pct"], "p99_stall_pct": res["p99_stall_pct"],
        "mean_released_bytes": res["mean_released_bytes"],
    }


def run_child(protocol: str, guests: int | None, seconds: float | None,
              progress: bool, shards: int = 1) -> dict[str, Any]:
    """One protocol's run in a fresh process (its peak memory its own)."""
    cmd = [sys.executable, "-m", "memballoon.bench.sim", "--child", protocol,
           "--shards", str(shards)]
    if guests is not None:
        cmd += ["--guests", str(guests)]
    if seconds is not None:
        cmd += ["--seconds", repr(seconds)]
    if progress:
        cmd.append("--progress")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=False, text=True)
    if out.returncode != 0:
        raise ConfigError(f"bench sim: the {protocol} run failed (exit {out.returncode})")
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def run_bench(protocols: list[str], *, guests: int | None = None, seconds: float | None = None,
              repeat: int = 1, progress: bool = True, shards: int = 1) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for p in protocols:
        runs = [run_child(p, guests, seconds, progress, shards) for _ in range(repeat)]
        walls = [r["wall_seconds"] for r in runs]
        med = statistics.median_low(walls)
        best = next(r for r in runs if r["wall_seconds"] == med)
        if repeat > 1:
            best = {**best, "repeat": repeat,
                    "runs": [{k: r[k] for k in ("wall_seconds", "guest_steps_per_second",
                                                 "engine_step_ms_p99", "peak_rss_bytes")}
                             for r in runs]}
        results[p] = best
    return {"scenario": FLEET, "protocols": results}


def _protocols(text: str) -> list[str]:
    ps = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in ps if p not in PROTOCOLS]
    if bad or not ps:
        raise argparse.ArgumentTypeError(
            f"unknown protocol {bad[0] if bad else '(none)'!r}; choose from {', '.join(PROTOCOLS)}")
    return ps


def register(bsub: Any) -> None:
    """Add ``bench sim`` to the ``bench`` subparsers."""
    from memballoon.app.scenario import duration
    from memballoon.app.sim_shards import MAX_DEFAULT_SHARDS, default_shards
    from memballoon.cliargs import positive_int

    def cmd(a: argparse.Namespace) -> int:
        secs = None if a.duration is None else duration(a.duration, "--duration")
        shards = a.shards if a.shards is not None else default_shards()
        res = run_bench(a.protocols, guests=a.guests, seconds=secs, repeat=a.repeat,
                        progress=not a.no_progress, shards=shards)
        if a.json:
            print(json.dumps(res))
        else:
            for p, r in res["protocols"].items():
                print(f"{p:<12} {r['guests']} guests, {r['simulated_seconds']:g} s simulated "
                      f"in {r['wall_seconds']:.1f} s ({r['guest_steps_per_second']:.0f} guest "
                      f"steps/s, {r['shards']} shard{'s' if r['shards'] != 1 else ''}), "
                      f"engine step p99 {r['engine_step_ms_p99']} ms, peak RSS "
                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                      f"{r['invariant_violations']} violations")
        bad = sum(r["invariant_violations"] for r in res["protocols"].values())
        return 0 if bad == 0 else 1

    p = bsub.add_parser("sim", help="the simulator's speed and memory on the fleet scenario",
                        description="The fleet scenario (1,000 guests, a simulated hour) once "
                                    "per protocol, each in a process of its own.")
    p.add_argument("--protocols", type=_protocols, default=list(PROTOCOLS),
                   help=f"comma-separated (default {','.join(PROTOCOLS)})")
    p.add_argument("--guests", type=positive_int, help="an even subset of the 1,000 guests")
    p.add_argument("--duration", help="simulated time (default the scenario's hour)")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="runs per protocol; report the median (default 1)")
    p.add_argument("--shards", type=positive_int,
                   help="worker processes for the guests (1: in the run's process; default the "
                        f"CPUs available, at most {MAX_DEFAULT_SHARDS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def main(argv: list[str] | None = None) -> int:
    """The child process: ``--child PROTOCOL [--guests K] [--seconds S] [--shards N]
    [--progress]``."""
    ap = argparse.ArgumentParser(prog="memballoon.bench.sim")
    ap.add_argument("--child", required=True, choices=PROTOCOLS)
    ap.add_argument("--guests", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(run_one(a.child, a.guests, a.seconds, a.progress, a.shards)))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["fleet", "register", "run_bench", "run_one"]
