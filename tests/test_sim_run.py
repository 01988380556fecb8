"""Runs, sweeps and comparisons: what they measure, and the papers' directions in short forms of
the built-in scenarios (the long forms are `memballoon sim run/compare`)."""

from __future__ import annotations

import gc
import itertools
from dataclasses import replace

import pytest

from memballoon.app.scenario import load_scenario
from memballoon.guest.workload import Idle, Ramp, Steady
from memballoon.model.units import MIB, PAGE_SIZE, mib_to_pages
from memballoon.policy.sample import GuestSettings
from memballoon.sim.run import RUN_GC_THRESHOLD, compare, run_scenario, step_response, sweep
from memballoon.sim.scenario import GuestSpec, Scenario, runs_of

RAM = mib_to_pages(128)


def small(**kw: object) -> Scenario:
    guests = (GuestSpec("idle", RAM, "virtio", Idle(anon_mib=8, file_mib=4),
                        GuestSettings(min_pages=RAM // 8)),
              GuestSpec("ramp", RAM, "vmw", Ramp(start_mib=8, peak_mib=96, mib_per_s=4,
                                                 file_mib=4, start_at_s=20),
                        GuestSettings(min_pages=RAM // 8)),
              GuestSpec("web", RAM, "vmw-batched", Steady(anon_mib=40, file_mib=16),
                        GuestSettings(min_pages=RAM // 8)))
    base: dict[str, object] = {"name": "small", "seconds": 90.0, "guests": guests,
                               "host_bytes": 3 * RAM * PAGE_SIZE, "budget_pages": 3 * RAM}
    base.update(kw)
    return Scenario(**base)  # type: ignore[arg-type]


def test_a_run_measures_the_host_the_guests_and_every_report() -> None:
    ticks = itertools.count()
    r = run_scenario(small(), stopwatch=lambda: float(next(ticks)))
    j = r.to_json()
    assert j["simulated_seconds"] == 90.0 and j["guests"] == 3
    assert j["reports"] == 3 * 90  # one a second a guest
    assert 0 < j["host_peak_resident_bytes"] <= 3 * RAM * PAGE_SIZE
    assert j["mean_released_bytes"] > 0 and j["decisions"] > 0  # the idle guest gave memory
    assert j["guest_oom_kills"] == 0 and j["safe"] and j["invariant_violations"] == 0
    assert j["engine_step_ms_p99"] == 1000.0  # the caller's stopwatch: one tick a step
    assert j["guest_ticks"] + j["guest_idle_periods"] > 0
    idle = next(g for g in r.guests if g.name == "idle")
    assert abs(idle.mean_size_bytes + idle.mean_balloon_bytes - idle.ram_bytes) <= 1
    assert idle.peak_resident_bytes < 32 * MIB and not idle.killed_by_host


def test_a_host_too_small_kills_a_guest_and_the_run_is_unsafe() -> None:
    r = run_scenario(small(host_bytes=96 * MIB, budget_pages=mib_to_pages(96),
                           policy="static"))
    assert r.host_oom_kills >= 1 and r.guest_oom_kills >= r.host_oom_kills and not r.safe
    assert any(g.killed_by_host for g in r.guests)


def test_a_sweep_stops_at_the_first_unsafe_host() -> None:
    res = sweep(small(policy="static", sweep_shares=(1.0, 0.6, 0.3, 0.2), seconds=40.0))
    shares = [p["share"] for p in res["sweep"]]
    assert shares == [1.0, 0.6, 0.3, 0.2]
    safe = [p["safe"] for p in res["sweep"]]
    assert safe[0] and not safe[-1]
    first_bad = safe.index(False)
    assert res["min_safe_budget_ratio"] == shares[first_bad - 1]


def test_compare_runs_every_policy_on_the_same_guests() -> None:
    res = compare(small(seconds=30.0), ["static", "default"])
    assert set(res["policies"]) == {"static", "default"}
    st, de = res["policies"]["static"], res["policies"]["default"]
    assert st["mean_released_bytes"] == 0 and de["mean_released_bytes"] > 0
    assert st["reports"] == de["reports"]
    swept = compare(small(seconds=20.0, sweep_shares=(1.0, 0.5)), ["static"])
    assert "min_safe_budget_ratio" in swept["policies"]["static"]


def test_step_response_reads_a_series() -> None:
    rows = [[t, 0.0, 0.0, 0.0, v] for t, v in
            [(0, 0.1), (5, 0.1), (10, 0.5), (15, 0.5), (20, 0.3), (25, 0.12), (30, 0.1)]]
    assert step_response(rows, 4, 5.0, 15.0) == 5.0  # up: at once
    assert step_response(rows, 4, 15.0, 30.0) == 10.0  # down: 90% of the way after 10 s
    assert step_response(rows, 4, 100.0) is None


def test_idle_tax_moves_memory_to_the_active_guest_only_with_a_tax() -> None:
    # Waldspurger 2002, figure 8, in a short form: tau 0 splits evenly, 0.75 favours activity
    sc = replace(load_scenario("idle-tax"), seconds=480.0)
    sizes = {}
    for run in runs_of(sc):
        r = run_scenario(run)
        sizes[run.policy_params["tau"]] = {g.name: g.mean_size_bytes / MIB for g in r.guests}
    even, taxed = sizes[0.0], sizes[0.75]
    assert abs(even["idle"] - even["active"]) < 4.0
    assert taxed["active"] - taxed["idle"] > 16.0
    assert taxed["active"] > even["active"]


def test_the_esx_estimate_rises_fast_and_decays_slowly() -> None:
    sc = replace(load_scenario("ws-estimator"), seconds=1500.0)
    r = run_scenario(sc)
    rows = r.series["toucher"]
    up = step_response(rows, 4, 600.0, 1200.0)
    down = step_response(rows, 4, 1200.0, 1500.0)
    assert up is not None and down is not None
    assert up <= 5.0 and down >= 4 * up and down >= 20.0


@pytest.mark.parametrize("protocol", ["vmw", "vmw-batched", "virtio"])
def test_every_protocol_runs_clean_under_the_engine(protocol: str) -> None:
    sc = small(seconds=45.0, check="every")
    sc = replace(sc, guests=tuple(replace(g, protocol=protocol) for g in sc.guests))
    r = run_scenario(sc)
    assert r.invariant_violations == 0, r.violations_sample


def test_overcommit_in_short_form() -> None:
    # the built-in overcommit scenario, two minutes on two hosts: every policy's sweep, the
    # figures the comparison reports, no invariant broken (the full one is the benchmark)
    sc = replace(load_scenario("overcommit"), seconds=120.0, sweep_shares=(1.0, 0.7))
    res = compare(sc, ["static", "default"])
    for name in ("static", "default"):
        r = res["policies"][name]
        assert [p["share"] for p in r["sweep"]] == [1.0, 0.7]
        assert all(p["invariant_violations"] == 0 and p["guest_oom_kills"] == 0
                   for p in r["sweep"])
    # static holds every guest at its RAM: a host of it all is safe, of 0.7 too this early;
    # the default policy's first probes into the cache of guests reading it stall them (p99
    # about 8% over these two minutes, 3.3% over the scenario's twenty)
    assert res["policies"]["static"]["min_safe_budget_ratio"] == 0.7
    assert (res["policies"]["default"]["mean_released_bytes"]
            > res["policies"]["static"]["mean_released_bytes"] == 0)


def test_a_run_gives_its_world_back_to_the_collector() -> None:
    # the run freezes its world out of the collector's scans; when it ends nothing it froze
    # stays frozen (else every run of a sweep would keep its world for good)
    assert gc.get_freeze_count() == 0
    frozen: list[int] = []
    r = run_scenario(small(seconds=5.0), stopwatch=lambda: frozen.append(
        gc.get_freeze_count()) or 0.0)
    assert r.seconds == 5.0 and min(frozen) > 0  # frozen while it ran
    assert gc.get_freeze_count() == 0
    # the young generation is collected less often while it runs (never more often than the
    # caller had it), as before after
    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    run_scenario(small(seconds=3.0), stopwatch=lambda: seen.append(gc.get_threshold()) or 0.0)
    assert set(seen) == {(max(RUN_GC_THRESHOLD, before[0]), *before[1:])}
    assert gc.get_threshold() == before
    gc.set_threshold(10 * RUN_GC_THRESHOLD, *before[1:])
    try:
        seen.clear()
        run_scenario(small(seconds=2.0), stopwatch=lambda: seen.append(gc.get_threshold()) or 0.0)
        assert set(seen) == {(10 * RUN_GC_THRESHOLD, *before[1:])}
    finally:
        gc.set_threshold(*before)
    # a caller's own frozen objects stay frozen, and the run does not unfreeze them
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        run_scenario(small(seconds=5.0))
        assert gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
