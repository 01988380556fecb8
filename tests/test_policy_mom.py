"""MomPolicy: oVirt MoM's balloon rules (doc/balloon.rules, vdsm's policy), constants pinned.

Every recorded decision of the real MoM is replayed in test_peer_cases.py.
"""

from __future__ import annotations

import pytest

from memballoon.model.errors import ConfigError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.mom import (
    MOM_MAX_BALLOON_CHANGE_PERCENT,
    MOM_MIN_BALLOON_CHANGE_PERCENT,
    MOM_MIN_GUEST_FREE_PERCENT,
    MOM_PRESSURE_CRITICAL,
    MOM_PRESSURE_THRESHOLD,
    MOM_STAT_SAMPLES,
    MomPolicy,
    MomSnapshot,
)
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

RAM = 100_000


def sample(name: str, balloon: int, free: int, *, target: int | None = None,
           min_pages: int = 0, report: bool = True) -> GuestSample:
    r = PressureReport(
        guest=name, time_s=0.0, total_bytes=RAM * PAGE_SIZE, free_bytes=free * PAGE_SIZE,
        available_bytes=free * PAGE_SIZE, anon_bytes=0, cache_bytes=0,
        balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=0, swap_out_pages=0, major_faults=0,
        oom_kills=0, stall_us=0, stall_pct=0.0, balloon_target_pages=balloon,
        balloon_actual_pages=balloon)
    return GuestSample(name, RAM, balloon, balloon if target is None else target,
                       GuestSettings(min_pages=min_pages), r if report else None,
                       0.0 if report else None)


def host(free_fraction: float) -> HostSample:
    budget = 1_000_000
    return HostSample(budget, int(budget * (1 - free_fraction)))


def test_constants_are_moms() -> None:
    assert MOM_PRESSURE_THRESHOLD == 0.20
    assert MOM_PRESSURE_CRITICAL == 0.05
    assert MOM_MIN_GUEST_FREE_PERCENT == 0.20
    assert MOM_MAX_BALLOON_CHANGE_PERCENT == 0.05
    assert MOM_MIN_BALLOON_CHANGE_PERCENT == 0.0025
    assert MOM_STAT_SAMPLES == 10


def test_pressure_shrinks_at_most_five_percent_a_step() -> None:
    # guest of 100000 pages, 80% free: the ideal is far below, the step caps it at -5%
    [d] = MomPolicy().decide(host(0.10), [sample("a", 0, 80_000)], 0.0)
    assert d.balloon_pages == 5000
    assert d.inputs["host_free_percent"] == pytest.approx(0.10)


def test_pressure_aims_at_scaled_guest_free() -> None:
    # host free 10%: guest free goal = 20% * 0.10 / 0.20 = 10% of its size
    # used = 100000 - 13000 = 87000; ideal = 87000 + 10000 = 97000 (a 3% shrink)
    [d] = MomPolicy().decide(host(0.10), [sample("a", 0, 13_000)], 0.0)
    assert d.balloon_pages == 3000
    assert d.inputs["guest_free_goal"] == pytest.approx(0.10)


def test_critical_pressure_pushes_guest_free_negative() -> None:
    [d] = MomPolicy().decide(host(0.02), [sample("a", 0, 2_000)], 0.0)
    # goal = 0.02 - 0.05 = -3%: ideal = 98000 - 3000 = 95000, the -5% step allows it
    assert d.inputs["guest_free_goal"] == pytest.approx(-0.03)
    assert d.balloon_pages == 5000


def test_never_grows_under_pressure_and_ignores_tiny_changes() -> None:
    p = MomPolicy()
    # a guest short of free memory under host pressure is left alone (MoM never grows then)
    assert p.decide(host(0.10), [sample("a", 20_000, 0)], 0.0) == []
    # ideal 0.2% below the current size: under min_balloon_change_percent
    q = MomPolicy()
    assert q.decide(host(0.10), [sample("b", 0, 10_200)], 0.0) == []


def test_no_pressure_grows_back_five_percent_towards_max() -> None:
    # size 50000 with plenty free: grow by 5% of the size -> 52500
    [d] = MomPolicy().decide(host(0.5), [sample("a", 50_000, 40_000)], 0.0)
    assert d.balloon_pages == RAM - 52_500
    assert "grow" in d.reason


def test_grow_restores_guest_free_goal_at_once() -> None:
    # size 50000, all used: used + 20% of the current size (MoM since 2013, not of the max)
    # = 60000 beats the 5% step
    [d] = MomPolicy().decide(host(0.5), [sample("a", 50_000, 0)], 0.0)
    assert d.balloon_pages == RAM - 60_000
    assert d.inputs["guest_free_goal"] == pytest.approx(0.20)


def test_vdsm_grows_toward_the_free_share_scaled_by_host_free() -> None:
    # vdsm's grow_guest scales the free goal as shrinking does: host free 50% -> 50% of the
    # size: used 50000 + 25000
    [d] = MomPolicy(rules="vdsm").decide(host(0.5), [sample("a", 50_000, 0)], 0.0)
    assert d.balloon_pages == RAM - 75_000
    assert d.inputs["guest_free_goal"] == pytest.approx(0.5)


def test_reads_the_hosts_own_free_share_when_it_has_one() -> None:
    # the guests' budget is nearly full, but MoM reads MemAvailable / MemTotal: 50% free
    h = HostSample(1_000_000, 990_000, total_pages=4_000_000, available_pages=2_000_000)
    [d] = MomPolicy().decide(h, [sample("a", 50_000, 40_000)], 0.0)
    assert d.inputs["host_free_percent"] == pytest.approx(0.5)
    assert "grow" in d.reason
    # and 10% free there is pressure, however roomy the budget
    h = HostSample(1_000_000, 0, total_pages=4_000_000, available_pages=400_000)
    [d] = MomPolicy().decide(h, [sample("a", 0, 80_000)], 0.0)
    assert d.inputs["host_free_percent"] == pytest.approx(0.1)
    assert d.balloon_pages == 5000


def test_averages_over_the_last_ten_samples() -> None:
    p = MomPolicy()
    # under steady host pressure, nine samples of a fully used guest, then one 80% free:
    # the average used (100000 - 8000) plus the 10% goal is above its size: no shrink
    for i in range(9):
        assert p.decide(host(0.10), [sample("a", 0, 0)], float(i)) == []
    assert p.decide(host(0.10), [sample("a", 0, 80_000)], 9.0) == []
    # a fresh MoM, seeing only the free sample, would shrink by 5%
    [d] = MomPolicy().decide(host(0.10), [sample("a", 0, 80_000)], 9.0)
    assert d.balloon_pages == 5000


def test_host_free_is_averaged() -> None:
    p = MomPolicy()
    for i in range(9):
        assert p.decide(host(0.5), [sample("a", 0, 80_000)], float(i)) == []
    # one low sample does not make the average host free fall under 20%
    assert p.decide(host(0.10), [sample("a", 0, 80_000)], 9.0) == []


def test_floor_and_missing_reports() -> None:
    p = MomPolicy()
    gs = [sample("a", 0, 90_000, min_pages=97_000), sample("b", 0, 90_000, report=False)]
    [d] = p.decide(host(0.10), gs, 0.0)
    assert (d.guest, d.balloon_pages) == ("a", 3000)  # the floor, not the 5% step
    assert p.counters["mom_no_report"] == 1


def test_a_guest_under_its_minimum_is_not_raised_under_pressure() -> None:
    # balloon_min is inside MoM's rule: the size it asks (the minimum) is above the current
    # one, and shrink_guest never grows: no target (memballoon clamped it up before)
    g = sample("a", 20_000, 40_000, min_pages=90_000)
    assert MomPolicy().decide(host(0.10), [g], 0.0) == []
    # vdsm's "minimum guaranteed memory" rule sets it to its minimum, stats or not
    [d] = MomPolicy(rules="vdsm").decide(host(0.10), [g], 0.0)
    assert d.balloon_pages == RAM - 90_000 and "minimum guaranteed" in d.reason
    blind = sample("b", 20_000, 0, min_pages=90_000, report=False)
    [d] = MomPolicy(rules="vdsm").decide(host(0.10), [blind], 0.0)
    assert d.balloon_pages == RAM - 90_000
    # without pressure both grow it to the minimum at once (the 5% step is less)
    [d] = MomPolicy().decide(host(0.5), [g], 0.0)
    assert d.balloon_pages == RAM - 90_000


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        MomPolicy(pressure_critical=0.3)
    with pytest.raises(ValueError):
        MomPolicy(stat_samples=0)


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="stat_samples"):
        MomPolicy(stat_samples=0)
    with pytest.raises(ConfigError, match="rules"):
        MomPolicy(rules="ksm.rules")


def test_snapshot_keeps_the_averaging_windows() -> None:
    p = MomPolicy()
    for i in range(9):
        p.decide(host(0.25), [sample("a", 20_000, 30_000 - 1000 * i)], float(i))
    snap = p.snapshot(9.0)
    assert len(snap.host_free) == 9 and len(snap.guests["a"]) == 9
    q = MomPolicy()
    q.restore(MomSnapshot.model_validate_json(snap.model_dump_json()), 0.0)
    assert q.snapshot(0.0) == snap
    # both go on alike, the new low samples averaged with the restored ones; a fresh MoM,
    # which sees only the new ones, would shrink the guest at once
    g = [sample("a", 20_000, 5_000)]
    assert MomPolicy().decide(host(0.0), g, 10.0)[0].reason.startswith("mom: critical")
    seen = []
    for i, f in enumerate((0.0, 0.0, 0.0, 0.0, 0.5)):
        ds = p.decide(host(f), g, 10.0 + i)
        assert q.decide(host(f), g, 10.0 + i) == ds
        seen += [d.reason.split(" (")[0] for d in ds]
    assert seen[0] == "mom: no host pressure: grow"
    # a policy with a shorter window keeps the newest samples
    short = MomPolicy(stat_samples=3)
    short.restore(snap, 0.0)
    assert short.snapshot(0.0).host_free == snap.host_free[-3:]
    assert short.snapshot(0.0).guests["a"] == snap.guests["a"][-3:]
