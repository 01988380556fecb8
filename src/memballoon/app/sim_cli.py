"""The simulator's subcommands: ``sim list``, ``sim show``, ``sim run``, ``sim compare``.

A scenario is a built-in name (``sim list``) or a TOML file (``app/scenario.py`` documents the
format; ``sim show NAME`` prints a built-in one to start from). Results go to stdout (one JSON
object with ``--json``), a progress bar to stderr. ``--jobs N`` runs the runs of a comparison
or a sweep in N processes (they are independent; each is deterministic). ``sim run --shards N``
instead spreads each run's guests over N processes (``app.sim_shards``: the same results
exactly; a run whose policy samples active pages, ESX's, stays in one); the two do not nest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from memballoon.app.scenario import BUILTIN, builtin_text, duration, load_scenario
from memballoon.app.sim_shards import Shards
from memballoon.cliargs import positive_int
from memballoon.guest.workload import Toucher
from memballoon.model.errors import ConfigError
from memballoon.policy.registry import POLICIES
from memballoon.sim.run import MapRuns, Progress, compare, run_scenario, step_response, sweep
from memballoon.sim.scenario import Scenario, runs_of

MIB_F = float(1 << 20)
DEFAULT_COMPARE: tuple[str, ...] = ("static", "mom", "proxmox", "esx", "default")


@contextlib.contextmanager
def progress_bar(enabled: bool = True, console: Any = None) -> Iterator[Progress]:
    """A rich progress bar on stderr (or ``console``), one task per label; a no-op when not
    wanted."""
    if not enabled:
        yield lambda label, done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("memballoon: {task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                   console=console if console is not None else Console(stderr=True),
                   transient=True)
    tasks: dict[str, Any] = {}

    def update(label: str, done: float, total: float) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    with bar:
        yield update


def parallel_map(jobs: int) -> contextlib.AbstractContextManager[MapRuns]:
    """``map`` over runs in ``jobs`` processes (forked: the scenario is already in memory)."""

    @contextlib.contextmanager
    def pool() -> Iterator[MapRuns]:
        if jobs <= 1:
            yield map
            return
        with ProcessPoolExecutor(max_workers=jobs,
                                 mp_context=multiprocessing.get_context("fork")) as ex:
            def mapped(fn: Callable[[Scenario], dict[str, Any]],
                       items: Iterable[Scenario]) -> Iterator[dict[str, Any]]:
                return ex.map(fn, items)

            yield mapped

    return pool()


def _scenario(a: argparse.Namespace) -> Scenario:
    sc = load_scenario(a.scenario)
    if getattr(a, "duration", None) is not None:
        sc = replace(sc, seconds=duration(a.duration, "--duration") or sc.seconds)
    if getattr(a, "seed", None) is not None:
        sc = replace(sc, seed=a.seed)
    if getattr(a, "policy", None) is not None:
        sc = sc.with_policy(a.policy)
    return sc


def toucher_steps(sc: Scenario, run: dict[str, Any]) -> list[dict[str, Any]]:
    """For each toucher guest with an ESX estimate in its series: how long the estimate took
    to cover 90% of each step of the working set, up and down."""
    out = []
    for g in sc.guests:
        w = g.workload
        rows = run.get("series", {}).get(g.name)
        if not isinstance(w, Toucher) or not rows or len(rows[0]) < 5:
            continue
        t = w.period_s
        while t < sc.seconds:
            up = int(t // w.period_s) % 2 == 1
            out.append({"guest": g.name, "at_s": t, "step": "up" if up else "down",
                        "seconds_to_90pct": step_response(rows, 4, t, t + w.period_s)})
            t += w.period_s
    return out


def _summary_line(name: str, r: dict[str, Any]) -> str:
    share = r.get("min_safe_budget_ratio", "-")
    return (f"{name:<10} {r['host_peak_resident_bytes'] / MIB_F:>9.0f} "
            f"{r['mean_released_bytes'] / MIB_F:>9.0f} {r['guest_oom_kills']:>5} "
            f"{r['mean_stall_pct']:>7.2f} {r['p99_stall_pct']:>7.2f} {r['decisions']:>6} "
            f"{share!s:>9}")


_HEADER = (f"{'run':<10} {'peak MiB':>9} {'released':>9} {'OOM':>5} {'stall%':>7} "
           f"{'p99 %':>7} {'decis.':>6} {'safe at':>9}")


def _cmd_run(a: argparse.Namespace) -> int:
    sc = _scenario(a)
    if a.shards > 1 and a.jobs > 1:
        raise ConfigError("--shards and --jobs: one or the other (a run's guests in processes, "
                          "or runs in processes)")
    world = Shards(a.shards) if a.shards > 1 else None
    results = []
    with progress_bar(not a.no_progress) as prog, parallel_map(a.jobs) as map_runs:
        for one in runs_of(sc):
            if one.sweep_shares:
                res = sweep(one, map_runs=map_runs, progress=prog, build_world=world)
                best = next((r for r in res["sweep"]
                             if r["share"] == res["min_safe_budget_ratio"]), res["sweep"][0])
                results.append({**best, **res})
            else:
                r = run_scenario(one, progress=prog, build_world=world).to_json()
                steps = toucher_steps(one, r)
                if steps:
                    r["estimate_steps"] = steps
                results.append(r)
    out = {"scenario": sc.name, "description": sc.description, "runs": results}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{sc.name}: {sc.description}" if sc.description else sc.name)
    print(_HEADER)
    for r in results:
        label = ",".join(f"{k}={v}" for k, v in r["params"].items()) or r["policy"]
        print(_summary_line(label, r))
        for g in r.get("per_guest", []):
            print(f"  {g['name']:<16} RAM {g['ram_bytes'] / MIB_F:>6.0f} MiB  mean size "
                  f"{g['mean_size_bytes'] / MIB_F:>7.1f} MiB  peak resident "
                  f"{g['peak_resident_bytes'] / MIB_F:>7.1f} MiB  OOM {g['oom_kills']}"
                  f"{'  killed by the host' if g['killed_by_host'] else ''}")
        for s in r.get("estimate_steps", []):
            print(f"  {s['guest']}: step {s['step']} at {s['at_s']:g} s: estimate at 90% "
                  f"after {s['seconds_to_90pct']} s")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    sc = _scenario(a)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ConfigError(f"--policies: unknown policy {bad[0] if bad else '(none)'!r}; "
                          f"choose from {', '.join(POLICIES)}")
    with progress_bar(not a.no_progress) as prog, parallel_map(a.jobs) as map_runs:
        res = compare(sc, policies, map_runs=map_runs, progress=prog)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{sc.name}: {len(sc.guests)} guests, {sc.ram_pages * 4096 / MIB_F:.0f} MiB of RAM, "
          f"{sc.seconds:g} s")
    print(_HEADER.replace("run ", "policy"))
    for name, r in res["policies"].items():
        print(_summary_line(name, r))
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    for name in BUILTIN:
        sc = load_scenario(name)
        n = len(sc.guests)
        print(f"{name:<14} {n:>5} guest{'s' if n != 1 else ' '}  {sc.seconds:>6g} s  "
              f"{sc.description}")
    return 0


def _cmd_show(a: argparse.Namespace) -> int:
    if a.name not in BUILTIN or a.name == "bench-policy":
        raise ConfigError(f"sim show: {a.name!r} is not a built-in scenario file; choose from "
                          f"{', '.join(n for n in BUILTIN if n != 'bench-policy')}")
    sys.stdout.write(builtin_text(a.name))
    return 0


def _jobs(text: str) -> int:
    n = positive_int(text)
    return min(n, os.cpu_count() or 1)


def register(sub: Any) -> None:
    """Add ``sim`` and its subcommands."""
    sim = sub.add_parser("sim", help="simulate many guests on a virtual clock (scenarios)",
                         description="The same guest model, drivers, devices, manager and "
                                     "policies on a virtual clock, driven by a scenario.")
    ssub = sim.add_subparsers(dest="sim", required=True, metavar="SIM")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--duration", help="simulated time, overriding the scenario's "
                                          "(seconds, or with s, min, h)")
        p.add_argument("--seed", type=int, help="overrides the scenario's seed")
        p.add_argument("--jobs", type=_jobs, default=1,
                       help="processes for the runs of a sweep or comparison (default 1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    r = ssub.add_parser("run", help="run a scenario (each of its variants; its sweep)",
                        description="Run SCENARIO (a built-in name or a TOML file) with its "
                                    "policy, once per variant, or over its host sweep.")
    r.add_argument("scenario", metavar="SCENARIO")
    r.add_argument("--policy", choices=POLICIES, help="overrides the scenario's policy")
    r.add_argument("--shards", type=_jobs, default=1,
                   help="processes for each run's guests (default 1; not with --jobs)")
    common(r)
    r.set_defaults(func=_cmd_run)

    c = ssub.add_parser("compare", help="every policy on the same scenario",
                        description="Run SCENARIO once per policy on the same guests, "
                                    "workloads and seeds (or its host sweep per policy).")
    c.add_argument("--scenario", required=True, metavar="SCENARIO")
    c.add_argument("--policies", default=",".join(DEFAULT_COMPARE),
                   help=f"comma-separated (default {','.join(DEFAULT_COMPARE)})")
    common(c)
    c.set_defaults(func=_cmd_compare)

    ls = ssub.add_parser("list", help="the built-in scenarios")
    ls.set_defaults(func=_cmd_list)
    sh = ssub.add_parser("show", help="print a built-in scenario's TOML")
    sh.add_argument("name", metavar="NAME")
    sh.set_defaults(func=_cmd_show)


__all__ = ["register", "toucher_steps"]
