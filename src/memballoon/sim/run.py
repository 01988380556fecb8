"""Run scenarios and measure them: one run, every policy on the same guests, host-size sweeps.

A run builds the scenario's world (``scenario.build``) and loops the daemon's loop without the
sleep: advance the guests one manager period, step the engine. Measured, every period:

- ``host_peak_resident_bytes``: the most the guests held on the host at once;
- ``mean_released_bytes``: the mean of the live guests' balloons (memory given back);
- ``guest_oom_kills``: OOM kills inside guests plus guests the host killed
  (``host_oom_kills``);
- ``mean_stall_pct``/``p99_stall_pct``: over every pressure report of every guest (as
  ``bench policy`` measures the real ones);
- per guest: its mean size (RAM minus balloon: Waldspurger's allocation), balloon and peak
  resident memory; with ``record_every_s``, series of them (and the ESX policy's active-memory
  estimate when it runs).

A run is *safe* with no OOM kill and a p99 stall under the scenario's ``max_stall_pct``. A sweep
runs the scenario on hosts of decreasing size (shares of the guests' RAM, from the largest
down) and stops at the first unsafe one: ``min_safe_budget_ratio`` is the smallest share before
it (None: not even the largest was safe).

No wall clock is read here: a caller that wants the engine's step times passes its own
``stopwatch`` (the bench passes ``time.perf_counter``), and runs happen one after the other
unless the caller hands ``compare`` a parallel ``map``. Nor are processes started here: a
caller that wants a run's guests spread over processes passes a ``build_world`` (the sharded
world of ``app.sim_shards``); the run reads the guests only through ``SimGuests``, which both
backends implement, so the loop and its figures are the same either way.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from memballoon.manager.engine import Engine
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Policy
from memballoon.policy.esx import EsxSnapshot
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import SimCounter, SimGuests
from memballoon.sim.scenario import SPOT_CHECK_S, Scenario, build, runs_of

#: ``progress(label, done, total)``: a run's simulated seconds, or a comparison's runs.
Progress = Callable[[str, float, float], None]
#: Seconds on the caller's clock (never read by the simulation itself).
Stopwatch = Callable[[], float]
#: ``map`` over runs: the builtin one, or a process pool's.
MapRuns = Callable[[Callable[[Scenario], dict[str, Any]], Iterable[Scenario]],
                   Iterator[dict[str, Any]]]

VIOLATIONS_KEPT: Final = 5
#: The collector's young-generation threshold during a run (``collector_for_run``).
RUN_GC_THRESHOLD: Final = 20_000


class RunWorld(Protocol):
    """What a run reads of a built world (``scenario.World``, or a sharded one)."""

    @property
    def backend(self) -> SimGuests: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def policy(self) -> Policy: ...


#: Told every report's ``stall_pct``, in the order an in-process run's guests report them.
StallSink = Callable[[Iterable[float]], None]
#: ``build_world(scenario, stalls, sleep)``: a world of the scenario, alive while its context
#: lasts, in place of ``scenario.build``.
BuildWorld = Callable[[Scenario, StallSink, bool], AbstractContextManager[RunWorld]]


@dataclass
class GuestResult:
    name: str
    ram_bytes: int
    mean_size_bytes: int
    mean_balloon_bytes: int
    peak_resident_bytes: int
    oom_kills: int
    killed_by_host: bool

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class RunResult:
    """What one run measured (module docstring)."""

    scenario: str
    policy: str
    params: dict[str, Any]
    seconds: float
    guests_n: int
    host_bytes: int | None
    budget_bytes: int | None  # None: auto
    host_peak_resident_bytes: int
    mean_released_bytes: int
    guest_oom_kills: int
    host_oom_kills: int
    mean_stall_pct: float
    p99_stall_pct: float
    decisions: int
    reports: int
    safe: bool
    invariant_violations: int
    violations_sample: list[str]
    ticks: int
    idle_periods: int
    guests: list[GuestResult]
    engine_step_s: list[float] = field(default_factory=list)
    check_s: float | None = None  # time the invariant checks took, on the caller's stopwatch
    series: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_json(self, *, guests: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.scenario, "policy": self.policy, "params": self.params,
            "simulated_seconds": self.seconds, "guests": self.guests_n,
            "host_bytes": self.host_bytes, "budget_bytes": self.budget_bytes,
            "host_peak_resident_bytes": self.host_peak_resident_bytes,
            "mean_released_bytes": self.mean_released_bytes,
            "guest_oom_kills": self.guest_oom_kills, "host_oom_kills": self.host_oom_kills,
            "mean_stall_pct": self.mean_stall_pct, "p99_stall_pct": self.p99_stall_pct,
            "decisions": self.decisions, "reports": self.reports, "safe": self.safe,
            "invariant_violations": self.invariant_violations,
            "violations_sample": self.violations_sample,
            "guest_ticks": self.ticks, "guest_idle_periods": self.idle_periods,
        }
        if self.check_s is not None:
            out["check_seconds"] = round(self.check_s, 3)
        if self.engine_step_s:
            st = np.array(self.engine_step_s) * 1e3
            out["engine_step_ms_p50"] = round(float(np.percentile(st, 50)), 3)
            out["engine_step_ms_p99"] = round(float(np.percentile(st, 99)), 3)
        if guests:
            out["per_guest"] = [g.to_json() for g in self.guests]
        if self.series:
            out["series"] = self.series
        return out


def run_scenario(sc: Scenario, *, progress: Progress | None = None,
                 stopwatch: Stopwatch | None = None, sleep: bool = True,
                 build_world: BuildWorld | None = None) -> RunResult:
    """One run of ``sc`` (its policy and params as they are: see ``runs_of`` for variants), in
    a world of ``build_world`` (default: ``scenario.build``, in this process)."""
    stalls = array("d")
    world: AbstractContextManager[RunWorld]
    if build_world is None:
        def on_report(name: str, r: PressureReport) -> None:
            stalls.append(r.stall_pct)

        world = nullcontext(build(sc, on_report=on_report, sleep=sleep))
    else:
        world = build_world(sc, stalls.extend, sleep)
    with collector_for_run(), world as w:
        return _run_world(sc, w, stalls, progress, stopwatch)


@contextmanager
def collector_for_run() -> Iterator[None]:
    """Python's cyclic collector set for a run (a worker of ``app.sim_shards`` too). The
    guests' models live as long as the run and, outside the simulator, in processes of their
    own: kept out of the collector's scans (a full collection of a fleet's world, 85 thousand
    objects, stopped a manager step for tens of ms), back in when the run ends; a caller that
    froze objects itself is left as it is (``unfreeze`` takes all or nothing). A step makes
    thousands of short-lived objects (reports, samples, rows), none in a cycle: the young
    generation is collected every ``RUN_GC_THRESHOLD`` allocations (or as the caller set it,
    if rarer), not Python's 700 (which collected every few hundred guests and handed the live
    ones on to the older generations to scan again: 3% of the fleet's CPU). The thresholds are
    put back after."""
    freeze = gc.get_freeze_count() == 0
    old = gc.get_threshold()
    if freeze:
        gc.freeze()
    gc.set_threshold(max(RUN_GC_THRESHOLD, old[0]), *old[1:])  # (never more often)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if freeze:
            gc.unfreeze()


def _run_world(sc: Scenario, w: RunWorld, stalls: array[float], progress: Progress | None,
               stopwatch: Stopwatch | None) -> RunResult:
    b, e = w.backend, w.engine
    names = [g.name for g in sc.guests]
    ram = np.array([g.ram_pages for g in sc.guests], dtype=np.int64)
    balloon_sum = np.zeros(len(names), dtype=np.float64)
    peak_res = np.zeros(len(names), dtype=np.int64)
    steps = max(1, round(sc.seconds / sc.period_s))
    peak = 0
    released = 0.0
    step_s: list[float] = []
    series: dict[str, list[list[float]]] = {n: [] for n in names} if sc.record_every_s else {}
    next_record = 0.0
    spot_every = max(1, round(SPOT_CHECK_S / sc.period_s))
    violations: list[str] = []
    check_s = 0.0
    for k in range(steps):
        b.advance(sc.period_s)
        peak = max(peak, b.host_resident_bytes())
        t0 = stopwatch() if stopwatch is not None else 0.0
        e.step()
        if stopwatch is not None:
            step_s.append(stopwatch() - t0)
        figures = b.sample_figures(e.guests)  # kept by the backend as it builds samples
        if figures is not None:
            balloons, res = figures
        else:
            samples = list(e.guests.values())
            balloons = np.fromiter((s.balloon_pages if s.alive else 0 for s in samples),
                                   dtype=np.int64, count=len(samples))
            res = np.fromiter((s.resident_bytes or 0 for s in samples), dtype=np.int64,
                              count=len(samples))
        balloon_sum += balloons
        released += float(balloons.sum())
        np.maximum(peak_res, res, out=peak_res)
        now = b.clock.now()
        if series and now + 1e-9 >= next_record:
            _record(series, w, now)
            next_record = now + sc.record_every_s
        if sc.check == "spot" and k % spot_every == 0:
            i = (k // spot_every) % len(names)
            if b.alive(names[i]):
                c0 = stopwatch() if stopwatch is not None else 0.0
                violations.extend(f"{names[i]}: {v}" for v in b.check_guest(names[i]))
                check_s += stopwatch() - c0 if stopwatch is not None else 0.0
        if progress is not None:
            progress(sc.name, (k + 1) * sc.period_s, steps * sc.period_s)
    c0 = stopwatch() if stopwatch is not None else 0.0
    b.sync()
    violations.extend(b.violations(full=True))
    check_s += stopwatch() - c0 if stopwatch is not None else 0.0
    in_guest = b.guest_oom_kills()
    st = np.frombuffer(stalls, dtype=np.float64) if len(stalls) else np.zeros(1)
    p99 = float(np.percentile(st, 99))
    oom = sum(in_guest) + b.host_oom_kills
    guests = [
        GuestResult(
            name=n, ram_bytes=int(ram[i]) * PAGE_SIZE,
            mean_size_bytes=int((ram[i] - balloon_sum[i] / steps) * PAGE_SIZE),
            mean_balloon_bytes=int(balloon_sum[i] / steps * PAGE_SIZE),
            peak_resident_bytes=int(peak_res[i]), oom_kills=in_guest[i],
            killed_by_host=not b.alive(n))
        for i, n in enumerate(names)
    ]
    return RunResult(
        scenario=sc.name, policy=w.policy.name, params=dict(sc.policy_params),
        seconds=steps * sc.period_s, guests_n=len(names), host_bytes=sc.host_bytes,
        budget_bytes=None if sc.budget_pages is None else sc.budget_pages * PAGE_SIZE,
        host_peak_resident_bytes=int(peak),
        mean_released_bytes=int(released / steps * PAGE_SIZE),
        guest_oom_kills=oom, host_oom_kills=b.host_oom_kills,
        mean_stall_pct=round(float(st.mean()), 3), p99_stall_pct=round(p99, 3),
        decisions=e.decisions, reports=len(stalls),
        safe=oom == 0 and p99 < sc.max_stall_pct,
        invariant_violations=len(violations), violations_sample=violations[:VIOLATIONS_KEPT],
        ticks=b.counters[SimCounter.TICKS], idle_periods=b.counters[SimCounter.IDLE_PERIODS],
        guests=guests, engine_step_s=step_s, series=series,
        check_s=check_s if stopwatch is not None else None,
    )


def _record(series: dict[str, list[list[float]]], w: RunWorld, now: float) -> None:
    """One row per guest: time, size, balloon, resident (MiB), and the ESX estimate if any."""
    estimates: Mapping[str, Any] = {}
    if w.policy.name == "esx":
        snap = w.policy.snapshot(now)
        if isinstance(snap, EsxSnapshot):
            estimates = snap.estimates
    mib = 1 << 20
    for name, s in w.engine.guests.items():
        row = [round(now, 3), round(s.size_pages * PAGE_SIZE / mib, 2),
               round(s.balloon_pages * PAGE_SIZE / mib, 2),
               round((s.resident_bytes or 0) / mib, 2)]
        est = estimates.get(name)
        if est is not None:
            row.append(round(max(est.slow, est.fast, est.current), 4))
        series[name].append(row)


def _run_json(sc: Scenario) -> dict[str, Any]:
    return run_scenario(sc).to_json(guests=True)


def sweep(sc: Scenario, *, map_runs: MapRuns = map, progress: Progress | None = None,
          build_world: BuildWorld | None = None) -> dict[str, Any]:
    """``sc`` on hosts of each of its ``sweep_shares`` (module docstring); each run in a world
    of ``build_world`` (then one after the other: not with a parallel ``map_runs``)."""
    shares = sorted(sc.sweep_shares, reverse=True)
    points = [sc.with_host_share(s) for s in shares]
    results: list[dict[str, Any]] = []
    run_json = _run_json
    if build_world is not None:
        def run_json(sc: Scenario) -> dict[str, Any]:
            return run_scenario(sc, build_world=build_world).to_json(guests=True)

    for i, r in enumerate(map_runs(run_json, points)):
        results.append({"share": shares[i], **{k: v for k, v in r.items() if k != "per_guest"}})
        if progress is not None:
            progress(f"{sc.name} {sc.policy}", i + 1, len(points))
    safe = None
    for r in results:
        if not r["safe"]:
            break
        safe = r["share"]
    return {"min_safe_budget_ratio": safe, "sweep": results}


def compare(sc: Scenario, policies: Sequence[str], *, map_runs: MapRuns = map,
            progress: Progress | None = None) -> dict[str, Any]:
    """Every policy on the same guests, workloads and seeds: one run each, or a sweep each
    when the scenario has one. Per policy: the run's figures (for a sweep, those of its
    lowest safe host, or its largest if none was safe) and ``min_safe_budget_ratio``."""
    out: dict[str, Any] = {"scenario": sc.name, "seconds": sc.seconds,
                           "guests": len(sc.guests), "ram_bytes": sc.ram_pages * PAGE_SIZE,
                           "policies": {}}
    if sc.sweep_shares:
        for i, name in enumerate(policies):
            res = sweep(sc.with_policy(name), map_runs=map_runs, progress=progress)
            best = next((r for r in res["sweep"] if r["share"] == res["min_safe_budget_ratio"]),
                        res["sweep"][0])
            out["policies"][name] = {**best, **res}
            if progress is not None:
                progress("policies", i + 1, len(policies))
        return out
    runs = [sc.with_policy(name) for name in policies]
    for i, r in enumerate(map_runs(_run_json, runs)):
        out["policies"][policies[i]] = r
        if progress is not None:
            progress("policies", i + 1, len(policies))
    return out


def step_response(rows: Sequence[Sequence[float]], column: int, t_step: float,
                  until: float = float("inf"), fraction: float = 0.9) -> float | None:
    """Seconds after ``t_step`` until ``column`` of the series ``rows`` covered ``fraction`` of
    its way from its value at the step to its value at ``until`` (the window's end; None:
    never)."""
    before = [r for r in rows if r[0] <= t_step]
    after = [r for r in rows if t_step < r[0] <= until]
    if not before or not after:
        return None
    start, end = before[-1][column], after[-1][column]
    if start == end:
        return 0.0
    goal = start + fraction * (end - start)
    for r in after:
        if (end > start and r[column] >= goal) or (end < start and r[column] <= goal):
            return round(r[0] - t_step, 3)
    return None


__all__ = ["RUN_GC_THRESHOLD", "BuildWorld", "GuestResult", "Progress", "RunResult", "RunWorld",
           "StallSink", "collector_for_run", "compare", "run_scenario", "runs_of",
           "step_response", "sweep"]
