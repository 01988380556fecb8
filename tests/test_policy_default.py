"""DefaultPolicy: unit rules on synthetic samples, then closed loops over real guest models."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest

from memballoon.edge.journal import Journal
from memballoon.guest.workload import Idle, Ramp, Steady, Workload, make_workload
from memballoon.harness.pair import Pair, make_pair
from memballoon.manager.core import Action, ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy import default as default_module
from memballoon.policy.base import Decision, Policy
from memballoon.policy.default import (
    BACKOFF_MIN_FRACTION,
    BAND_FRACTION,
    BIG_STEP_MAX_FRACTION,
    BUDGET_MARGIN_PAGES,
    EMERGENCY_MARGIN_PAGES,
    HOST_PSI_RECLAIM_FRACTION,
    HOST_PSI_SOME_PCT,
    HURT_AGAIN_WITHIN_S,
    HURT_MEMORY_MAX_S,
    LOOKAHEAD_S,
    MAJOR_FAULTS_QUIET_PER_S,
    MARGIN_FRACTION,
    MARGIN_MIN_PAGES,
    MAX_REPORT_AGE_S,
    MIN_CHANGE_PAGES,
    PRESSURE_MEMORY_S,
    PROBE_STEP_INC,
    PROBE_STEP_MAX,
    PROBE_STEP_MIN,
    PROBE_STEP_START,
    QUIET_CALLS_BEFORE_BIG_STEP,
    REFAULT_MEMORY_S,
    REFAULTING_MEMORY_S,
    RULES,
    STALL_QUIET_PCT,
    STALL_TROUBLE_PCT,
    STUCK_AFTER_S,
    SWAPIN_TROUBLE_PER_S,
    DefaultCounter,
    DefaultPolicy,
    DefaultSnapshot,
    Figures,
    GuestMemo,
    Ruling,
    Verdict,
    judge,
)
from memballoon.policy.mom import MomPolicy
from memballoon.policy.proxmox import ProxmoxPolicy
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import SimBackend

RAM = mib_to_pages(1024)
HOST = HostSample(budget_pages=10 * RAM, resident_pages=RAM)  # plenty of room


def report(t: float, *, avail: int, balloon: int = 0, stall: float = 0.0, swap_in: int = 0,
           major: int = 0, oom: int = 0, refused: int | None = None,
           target: int | None = None, free: int | None = None) -> PressureReport:
    # MemFree is MemAvailable (no page cache) unless ``free`` says otherwise
    return PressureReport(
        guest="g", time_s=t, total_bytes=RAM * PAGE_SIZE,
        free_bytes=(avail if free is None else free) * PAGE_SIZE,
        available_bytes=avail * PAGE_SIZE, anon_bytes=0, cache_bytes=0,
        balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=swap_in, swap_out_pages=0,
        major_faults=major, oom_kills=oom, stall_us=0, stall_pct=stall,
        balloon_target_pages=balloon if target is None else target,
        balloon_actual_pages=balloon, refused_pages=refused)


def sample(r: PressureReport | None, *, balloon: int = 0, target: int | None = None,
           age: float | None = 0.0, min_pages: int = 0) -> GuestSample:
    # the report arrived ``age`` seconds before the time it carries (the tests' ``now``)
    return GuestSample("g", RAM, balloon, balloon if target is None else target,
                       GuestSettings(min_pages=min_pages), r,
                       r.time_s - age if r is not None and age is not None else None)


def one(p: DefaultPolicy, g: GuestSample, now: float, host: HostSample = HOST) -> Decision | None:
    ds = p.decide(host, [g], now)
    assert len(ds) <= 1
    return ds[0] if ds else None


# ---------------------------------------------------------------------- constants and rules
def test_constants() -> None:
    # the seed's adaptive-rate shape: start, grow by a small increment, halve, within bounds
    assert PROBE_STEP_MIN < PROBE_STEP_START < PROBE_STEP_MAX
    assert 0 < PROBE_STEP_INC < PROBE_STEP_START
    assert STALL_QUIET_PCT < STALL_TROUBLE_PCT
    assert mib_to_pages(32) == MARGIN_MIN_PAGES
    assert MAX_REPORT_AGE_S == 10.0


def test_quiet_guest_is_probed_with_a_growing_step() -> None:
    p = DefaultPolicy()
    avail = 2 * int(MARGIN_FRACTION * RAM) - 1  # not idle enough for the half-of-free rule
    d = one(p, sample(report(0, avail=avail)), 0.0)
    assert d is not None and d.balloon_pages == int(PROBE_STEP_START * RAM)
    assert "probe" in d.reason and d.inputs["stall_pct"] == 0.0
    b = d.balloon_pages
    d2 = one(p, sample(report(5, avail=avail - b, balloon=b), balloon=b), 5.0)
    assert d2 is not None
    assert d2.balloon_pages - b == int((PROBE_STEP_START + PROBE_STEP_INC) * RAM)


def test_idle_free_memory_is_taken_half_a_call_once_the_guest_is_known_quiet() -> None:
    p = DefaultPolicy()
    margin = int(MARGIN_FRACTION * RAM)
    ws = RAM // 10
    b = 0
    steps = []
    for t in range(6):
        avail = RAM - ws - b
        d = one(p, sample(report(5.0 * t, avail=avail, balloon=b), balloon=b), 5.0 * t)
        assert d is not None and d.balloon_pages <= RAM - ws - margin  # never past the floor
        steps.append(d.balloon_pages - b)
        b = d.balloon_pages
    # a new guest is probed by the ordinary step first; then by half its idle memory (capped)
    assert steps[0] == int(PROBE_STEP_START * RAM)
    assert max(steps[3:]) > int(PROBE_STEP_MAX * RAM)
    assert max(steps) <= RAM // 4


def test_a_big_step_takes_memfree_never_the_page_cache() -> None:
    # a guest whose MemAvailable is mostly page cache (a file server's, an idle VM's after a
    # nightly job): known quiet, it is still probed by the step alone, as the cache may be hot;
    # a big step into it evicted the hot part at once and the guest stalled refaulting it
    p = DefaultPolicy()
    margin = int(MARGIN_FRACTION * RAM)
    ws, free = RAM // 10, 2 * margin  # MemFree: not more than twice the margin
    b = 0
    for t in range(QUIET_CALLS_BEFORE_BIG_STEP + 3):
        step = p.state["g"].step if "g" in p.state else PROBE_STEP_START
        r = report(5.0 * t, avail=RAM - ws - b, free=free, balloon=b)
        d = one(p, sample(r, balloon=b), 5.0 * t)
        assert d is not None and "probe" in d.reason
        assert d.balloon_pages - b == int(step * RAM), t  # the step, not half of MemAvailable
        b = d.balloon_pages
    assert p.state["g"].quiet_calls > QUIET_CALLS_BEFORE_BIG_STEP


def test_a_report_already_read_is_probed_again_only_into_idle_memfree() -> None:
    # reports every 2 s, decisions every second: the second call reads the report the first
    # probed on, which shows nothing of that probe. A guest whose MemFree is used up by then
    # (a file server filling its cache) is not probed blind into its cache; one with MemFree
    # idle still beyond twice the margin, less what the balloon took since, is
    p = DefaultPolicy()
    margin = int(MARGIN_FRACTION * RAM)
    ws, b = RAM // 10, 0
    for t in range(QUIET_CALLS_BEFORE_BIG_STEP):  # known quiet, MemFree a little over the margin
        r = report(2.0 * t, avail=RAM - ws - b, free=margin + STEP + 1, balloon=b)
        d = one(p, sample(r, balloon=b), 2.0 * t)
        assert d is not None and "probe" in d.reason
        b = d.balloon_pages
    r = report(10.0, avail=RAM - ws - b, free=margin + STEP + 1, balloon=b)
    d = one(p, sample(r, balloon=b), 10.0)
    assert d is not None and d.balloon_pages > b
    b2 = d.balloon_pages
    assert one(p, sample(r, balloon=b2), 11.0) is None  # the same report: hold
    # a new report: a probe again
    r = report(12.0, avail=RAM - ws - b2, free=margin + STEP + 1, balloon=b2)
    d = one(p, sample(r, balloon=b2), 12.0)
    assert d is not None and d.balloon_pages > b2
    # idle MemFree: a second, big, step on the same report, of half what is idle still
    p = DefaultPolicy()
    b, big = 0, 0
    for t in range(QUIET_CALLS_BEFORE_BIG_STEP + 2):
        r = report(2.0 * t, avail=RAM - ws - b, balloon=b)
        d = one(p, sample(r, balloon=b), 2.0 * t)
        assert d is not None
        b2 = d.balloon_pages
        d = one(p, sample(r, balloon=b2), 2.0 * t + 1)
        free_now = RAM - ws - b2
        if free_now > 2 * margin and t + 1 >= QUIET_CALLS_BEFORE_BIG_STEP:
            assert d is not None
            assert d.balloon_pages - b2 == min((free_now - margin) // 2, RAM // 4), t
            b2, big = d.balloon_pages, big + 1
        else:
            assert d is None, t
        b = b2
    assert big >= 2


def test_a_stall_while_the_balloon_reclaims_unread_cache_holds() -> None:
    # the balloon grows and the guest stalls reclaiming cache for it, but refaults nothing: the
    # cache was not read (a paused file server's); the policy holds its target, remembers no
    # size that hurt and keeps its step. A stall with refaults is trouble: back off
    p = DefaultPolicy()
    ws = RAM // 4
    b = RAM // 4
    d = one(p, sample(report(0, avail=RAM - ws - b, balloon=b, major=100), balloon=b), 0.0)
    assert d is not None and "probe" in d.reason
    b2 = d.balloon_pages
    step = p.state["g"].step
    g = sample(report(1, avail=RAM - ws - b2, balloon=b2, stall=3.0, major=100), balloon=b2)
    assert one(p, g, 1.0) is None  # hold: the target stays where the balloon went
    m = p.state["g"]
    assert (m.hurt_size, m.step) == (0, step)
    rule, _ = judge(p.figures(g, GuestMemo(last_balloon=b), 1.0))
    assert rule.name == "reclaiming"
    # the same stall with refaults since the last report: the balloon took what is read
    b3 = b2 + STEP
    g = sample(report(2, avail=RAM - ws - b3, balloon=b3, stall=3.0, major=600), balloon=b3,
               target=b2)
    d = one(p, g, 2.0)
    assert d is not None and "back off" in d.reason and d.balloon_pages < b3
    assert p.state["g"].hurt_size > 0


def test_a_size_that_hurt_by_refaults_is_forgotten_once_they_stop() -> None:
    # a probe into a cache the guest reads: refaults, a back-off, a size that hurt. While the
    # guest still refaults (here a trickle too small to stop the probes) it is not probed
    # below that size; REFAULT_MEMORY_S after its last refault, it is: the reads have ended
    # (an idle guest's nightly job), so the cache is cold now
    p = DefaultPolicy()
    ws = RAM // 4
    b = RAM // 4
    major = 0
    d = one(p, sample(report(0, avail=RAM - ws - b, balloon=b), balloon=b), 0.0)
    assert d is not None
    b = d.balloon_pages
    major += 5000
    # (the probe took the free memory and evicted the cache: MemFree is low, no room)
    d = one(p, sample(report(5, avail=RAM - ws - b, balloon=b, stall=5.0, major=major,
                             free=RAM // 64), balloon=b), 5.0)
    assert d is not None and "back off" in d.reason
    hurt = p.state["g"].hurt_size
    assert hurt == RAM - b + int(MARGIN_FRACTION * RAM) and p.state["g"].hurt_refaulted
    b = d.balloon_pages
    last_fault = 60.0
    sizes: dict[float, int] = {}
    for t in range(10, 200, 5):
        if t <= last_fault:
            major += 100  # 20 a second: quiet enough to probe, but still reading back
        d = one(p, sample(report(t, avail=RAM - ws - b, balloon=b, major=major), balloon=b),
                float(t))
        b = d.balloon_pages if d is not None else b
        sizes[t] = RAM - b
    before = [s for t, s in sizes.items() if t < last_fault + REFAULT_MEMORY_S]
    after = [s for t, s in sizes.items() if t >= last_fault + REFAULT_MEMORY_S]
    assert min(before) == hurt  # probed down to the size that hurt, and held there
    assert min(after) < hurt and p.state["g"].hurt_size == 0
    assert PRESSURE_MEMORY_S > 200  # the old rule alone would have held it all along


def test_a_size_that_hurt_without_refaults_is_kept_for_the_whole_memory() -> None:
    # a stall with no refault and no balloon growing (the workload's own reclaim, squeezed):
    # its size is remembered for PRESSURE_MEMORY_S though the guest never faults
    p = DefaultPolicy()
    ws = RAM // 4
    b = RAM // 2
    one(p, sample(report(0, avail=RAM - ws - b, balloon=b), balloon=b), 0.0)
    d = one(p, sample(report(5, avail=RAM - ws - b, balloon=b, stall=5.0), balloon=b), 5.0)
    assert d is not None and "back off" in d.reason
    m = p.state["g"]
    hurt = m.hurt_size
    assert hurt == RAM - b + int(MARGIN_FRACTION * RAM) and not m.hurt_refaulted
    b = d.balloon_pages
    for t in range(10, 200, 5):
        d = one(p, sample(report(t, avail=RAM - ws - b, balloon=b), balloon=b), float(t))
        b = d.balloon_pages if d is not None else b
        assert RAM - b >= hurt, t
    assert p.state["g"].hurt_size == hurt and RAM - b == hurt


def test_probe_stops_at_the_learned_floor() -> None:
    p = DefaultPolicy()
    ws = RAM // 4
    avail = RAM - ws
    margin = int(MARGIN_FRACTION * RAM)
    b = RAM - ws - margin - 100  # 100 pages above the floor
    d = one(p, sample(report(0, avail=avail - b, balloon=b), balloon=b), 0.0)
    assert d is None or d.balloon_pages <= RAM - ws - margin
    d = one(p, sample(report(5, avail=avail - b, balloon=b), balloon=b), 5.0)
    assert d is None  # at the floor: hold


def test_pressure_backs_off_at_once_and_halves_the_step() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    step_before = p.state["g"].step
    d = one(p, sample(report(5, avail=RAM // 4, balloon=b, stall=5.0), balloon=b), 5.0)
    assert d is not None and "back off" in d.reason
    assert b - d.balloon_pages >= int(BACKOFF_MIN_FRACTION * RAM)
    assert p.state["g"].step == max(PROBE_STEP_MIN, step_before / 2)
    # and it does not probe back below the size that hurt (plus the margin) while the memory
    # lasts, though it may take back what the back-off gave beyond that
    hurt_size = (RAM - b) + int(MARGIN_FRACTION * RAM)
    b2 = d.balloon_pages
    avail = RAM // 4 + (b - b2)  # the same working set, more room
    d3 = one(p, sample(report(10, avail=avail, balloon=b2), balloon=b2), 10.0)
    assert d3 is None or RAM - d3.balloon_pages >= hurt_size


def test_swap_ins_are_trouble() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    d = one(p, sample(report(1, avail=RAM // 4, balloon=b, swap_in=10_000), balloon=b), 1.0)
    assert d is not None and d.balloon_pages < b and "swap-in" in d.reason


def test_low_available_deflates_enough_to_restore_the_margin() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    d = one(p, sample(report(0, avail=100, balloon=b), balloon=b), 0.0)
    assert d is not None and "emergency" in d.reason
    assert b - d.balloon_pages >= d.inputs["margin_pages"] - 100


def test_oom_kill_is_an_emergency() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    d = one(p, sample(report(1, avail=RAM // 4, balloon=b, oom=1), balloon=b), 1.0)
    assert d is not None and "OOM" in d.reason and d.balloon_pages < b


def test_stalled_inflation_gets_target_lowered_to_actual() -> None:
    p = DefaultPolicy()
    b, t = RAM // 4, RAM // 2
    g = sample(report(0, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
    assert one(p, g, 0.0) is None  # first look: it may still be moving
    g = sample(report(1, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
    d = one(p, g, 1.0)
    assert d is not None and d.balloon_pages == b and "stalled" in d.reason


def test_an_inflation_is_stuck_only_after_a_period_without_growth() -> None:
    # a short host's early steps call every 0.2 s: a balloon that did not move in 0.2 s (a
    # slow guest, libvirt's 2 s stats) is not stuck yet; after STUCK_AFTER_S it is
    p = DefaultPolicy()
    b, t = RAM // 4, RAM // 2
    for i in range(5):
        now = 0.2 * i
        g = sample(report(now, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
        assert one(p, g, now) is None, now
    g = sample(report(1.0, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
    d = one(p, g, 1.0)
    assert STUCK_AFTER_S == 1.0 and d is not None and "stalled" in d.reason
    # a new target gives the balloon its time again
    p = DefaultPolicy()
    t2 = t + RAM // 8
    for now, target in ((0.0, t), (0.8, t2), (1.2, t2), (1.6, t2)):
        g = sample(report(now, avail=RAM // 2, balloon=b, target=target), balloon=b,
                   target=target)
        assert one(p, g, now) is None, now
    g = sample(report(1.8, avail=RAM // 2, balloon=b, target=t2), balloon=b, target=t2)
    d = one(p, g, 1.8)
    assert d is not None and "stalled" in d.reason


def test_refused_pages_stop_inflation() -> None:
    p = DefaultPolicy()
    b, t = RAM // 4, RAM // 2
    one(p, sample(report(0, avail=RAM // 2, balloon=b - 10, target=t, refused=0),
                  balloon=b - 10, target=t), 0.0)
    d = one(p, sample(report(1, avail=RAM // 2, balloon=b, target=t, refused=50),
                      balloon=b, target=t), 1.0)
    assert d is not None and d.balloon_pages == b and "refused" in d.reason


def test_blind_guest_is_never_inflated() -> None:
    p = DefaultPolicy()
    assert one(p, sample(None), 0.0) is None
    stale = sample(report(0, avail=RAM), age=MAX_REPORT_AGE_S + 1)
    assert one(p, stale, 0.0) is None
    # an inflation in progress stops where it is
    d = one(p, sample(None, balloon=100, target=5000), 1.0)
    assert d is not None and d.balloon_pages == 100
    assert p.counters["default_blind"] == 3


def test_never_below_min_pages() -> None:
    p = DefaultPolicy()
    floor = RAM - 2 * int(BAND_FRACTION * RAM)  # (a probe needs two bands above the floor)
    assert 2 * int(BAND_FRACTION * RAM) <= int(PROBE_STEP_START * RAM)  # one step reaches it
    d = one(p, sample(report(0, avail=RAM * 9 // 10), min_pages=floor), 0.0)
    assert d is not None and d.balloon_pages == RAM - floor


def test_lying_report_is_counted_not_raised() -> None:
    p = DefaultPolicy()
    one(p, sample(report(0, avail=RAM * 4, major=50)), 0.0)
    one(p, sample(report(1, avail=RAM // 2, major=10)), 1.0)  # a counter going back
    assert p.counters["policy_report_available_above_ram"] >= 1
    assert p.counters["policy_report_major_faults_backwards"] == 1


def test_over_budget_reclaims_from_the_idlest_quiet_guest_first() -> None:
    p = DefaultPolicy(probe=False)
    idle = GuestSample("idle", RAM, 0, 0, report=report(0, avail=RAM * 9 // 10),
                       report_time=0.0)
    busy = GuestSample("busy", RAM, 0, 0, report=report(0, avail=RAM // 2),
                       report_time=0.0)
    host = HostSample(budget_pages=2 * RAM - RAM // 4, resident_pages=2 * RAM)
    ds = {d.guest: d for d in p.decide(host, [busy, idle], 0.0)}
    assert set(ds) == {"idle"} and ds["idle"].balloon_pages == RAM // 4
    assert "over budget" in ds["idle"].reason


def _pair_of_guests(under_floor: bool = False) -> list[GuestSample]:
    idle = GuestSample("idle", RAM, 0, 0, report=report(0, avail=RAM * 9 // 10),
                       report_time=0.0)
    # a guest squeezed below its safety floor: the policy wants to grow it back
    b = RAM * 3 // 4
    grow = GuestSample("grow", RAM, b, b, report=report(0, avail=RAM // 32, balloon=b),
                       report_time=0.0)
    return [idle, grow] if under_floor else [idle]


def test_a_host_short_of_its_reserve_is_paid_back_at_once_and_nobody_grows() -> None:
    p = DefaultPolicy(probe=False)
    reserve = RAM // 4
    host = HostSample(budget_pages=2 * RAM - reserve // 2, resident_pages=2 * RAM,
                      total_pages=8 * RAM, available_pages=reserve // 2, reserve_pages=reserve)
    assert host.short_pages == reserve // 2
    ds = {d.guest: d for d in p.decide(host, _pair_of_guests(under_floor=True), 0.0)}
    idle = ds["idle"]
    assert idle.balloon_pages >= reserve // 2 and idle.urgent
    assert f"host {reserve // 2} pages under its reserve" in idle.reason
    assert idle.inputs["host_available_pages"] == reserve // 2
    assert idle.inputs["host_reserve_pages"] == reserve
    assert "grow" not in ds  # its growth back to its floor waits for the host


def test_an_emergency_while_the_host_is_short_restores_only_the_small_margin() -> None:
    # seen on a real libvirt host: squeezed to its working set plus the budget's margin, a
    # guest's next report read a few pages less and the emergency deflated it back to its full
    # margin (100 MiB of a 1 GiB guest) while the host was still under its reserve
    reserve = RAM // 4
    short = HostSample(budget_pages=2 * RAM - reserve // 2, resident_pages=2 * RAM,
                       total_pages=8 * RAM, available_pages=reserve // 2, reserve_pages=reserve)
    balloon = RAM // 2
    squeezed = BUDGET_MARGIN_PAGES - 20  # a few pages under where the budget left it
    assert one(DefaultPolicy(probe=False),
               sample(report(10.0, avail=squeezed, balloon=balloon), balloon=balloon), 10.0,
               short) is None  # above the emergency line: held, not grown back
    ds = [d for d in DefaultPolicy(probe=False).decide(
        short, [sample(report(10.0, avail=100, balloon=balloon), balloon=balloon)], 10.0)]
    assert len(ds) == 1 and ds[0].urgent and "emergency deflate" in ds[0].reason
    # out of danger (the budget's margin back), no further
    assert ds[0].balloon_pages == balloon - (BUDGET_MARGIN_PAGES - 100)
    assert "host short: to the small margin" in ds[0].reason
    roomy = one(DefaultPolicy(probe=False),
                sample(report(10.0, avail=100, balloon=balloon), balloon=balloon), 10.0)
    assert roomy is not None and roomy.balloon_pages < ds[0].balloon_pages  # the full margin
    p = DefaultPolicy(probe=False)
    one(p, sample(report(9.0, avail=100, balloon=balloon), balloon=balloon), 9.0, short)
    oom = one(p, sample(report(10.0, avail=100, balloon=balloon, oom=1), balloon=balloon), 10.0,
              short)
    assert oom is not None and oom.balloon_pages == 0  # an OOM kill still gets it all back


def test_a_guest_just_under_its_floor_still_gives_to_a_short_host() -> None:
    # seen on a real libvirt host: a guest probed down to its floor, its working set a few
    # pages up since: under its floor by 100 pages, it was no candidate for reclaim and the
    # host, 160 MiB under its reserve, got nothing back for 20 s
    reserve = RAM // 4
    short = HostSample(budget_pages=2 * RAM - reserve // 2, resident_pages=2 * RAM,
                       total_pages=8 * RAM, available_pages=reserve // 2, reserve_pages=reserve)
    b = RAM // 2
    margin = int(MARGIN_FRACTION * RAM)
    g = sample(report(10.0, avail=margin - 100, balloon=b), balloon=b)
    calm = one(DefaultPolicy(probe=False), g, 10.0)
    assert calm is None  # 100 pages under its floor: not worth a change while the host has room
    ds = DefaultPolicy(probe=False).decide(short, [g], 10.0)
    assert len(ds) == 1 and ds[0].urgent and "under its reserve: reclaim" in ds[0].reason
    # down to its working set plus the budget's margin, no further
    assert ds[0].balloon_pages == b + (margin - 100) - BUDGET_MARGIN_PAGES


def test_the_lookahead_is_the_growth_over_the_reports_interval_not_the_calls() -> None:
    # a short host's early steps call the policy 0.2 s apart; a report written 2 s after the
    # last one, arriving just after a call, grew the working set by 600 pages over 2 s
    p = DefaultPolicy(probe=False)
    m = GuestMemo()
    p.figures(sample(report(10.0, avail=RAM // 2)), m, 10.0)
    p.figures(sample(report(10.0, avail=RAM // 2)), m, 11.8)  # the same report again
    f = p.figures(sample(report(12.0, avail=RAM // 2 - 600)), m, 12.0)
    assert f.ws - RAM // 2 == 600
    assert f.ahead == int(600 / 2.0 * LOOKAHEAD_S)  # not 600 / 0.2 s


def test_host_memory_pressure_reclaims_a_step_with_memory_available() -> None:
    p = DefaultPolicy(probe=False)
    host = HostSample(budget_pages=10 * RAM, resident_pages=RAM, total_pages=8 * RAM,
                      available_pages=4 * RAM, reserve_pages=RAM // 4,
                      psi_some_avg10=HOST_PSI_SOME_PCT + 5.0)
    (d,) = p.decide(host, _pair_of_guests(), 0.0)
    assert d.balloon_pages == int(HOST_PSI_RECLAIM_FRACTION * 8 * RAM)
    assert "host memory pressure 15.0%" in d.reason and d.urgent
    calm = HostSample(budget_pages=10 * RAM, resident_pages=RAM, total_pages=8 * RAM,
                      available_pages=4 * RAM, reserve_pages=RAM // 4, psi_some_avg10=0.5)
    assert DefaultPolicy(probe=False).decide(calm, _pair_of_guests(), 0.0) == []


def test_a_projected_excess_is_called_a_projection() -> None:
    # the guests hold less than the budget now; only the planned growth would pass it
    p = DefaultPolicy(probe=False)
    guests = _pair_of_guests(under_floor=True)
    resident = sum(g.size_pages for g in guests)
    host = HostSample(budget_pages=resident + 10, resident_pages=resident)
    ds = {d.guest: d for d in p.decide(host, guests, 0.0)}
    assert "planned growth would pass the budget" in ds["idle"].reason
    assert "over budget" not in ds["idle"].reason


# ---------------------------------------------------------------------- closed loops
@dataclass
class World:
    """Guests as driver/device pairs on a virtual clock, managed by the real engine (the core's
    floors, hysteresis and safety checks included) with a policy every ``every`` seconds."""

    pairs: dict[str, Pair]
    settings: GuestSettings
    budget_pages: int
    clock: ManualClock = field(default_factory=ManualClock)
    engine: Engine | None = None
    backend: SimBackend | None = None
    stalls: list[float] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    decisions: list[Action] = field(default_factory=list)
    min_size: dict[str, int] = field(default_factory=dict)
    peak_resident: int = 0
    t: int = 0

    @classmethod
    def build(cls, protocol: str, workloads: Sequence[Workload], guest_mib: int,
              budget_frac: float, min_mib: float = 0) -> World:
        pairs = {f"g{i}": make_pair(protocol, mib_to_pages(guest_mib), w)
                 for i, w in enumerate(workloads)}
        return cls(pairs, GuestSettings(min_pages=mib_to_pages(min_mib)),
                   int(len(pairs) * mib_to_pages(guest_mib) * budget_frac))

    def resident(self) -> int:
        return sum(p.ram.resident_bytes() // PAGE_SIZE for p in self.pairs.values())

    def _engine(self, policy: Policy, every: int) -> tuple[Engine, SimBackend]:
        if self.engine is None or self.backend is None:
            self.backend = SimBackend(self.pairs, self.clock, report_every_s=every,
                                      rng=random.Random(7))
            core = ManagerCore(policy, dict.fromkeys(self.pairs, self.settings),
                               self.budget_pages)
            self.engine = Engine(self.backend, core, Journal(None), self.clock)
        assert self.engine.core.policy is policy
        return self.engine, self.backend

    def run(self, policy: Policy, seconds: int, every: int = 2) -> None:
        engine, backend = self._engine(policy, every)
        for _ in range(seconds):
            self.t += 1
            backend.advance(1.0)
            for p in self.pairs.values():
                assert not p.violations, p.violations[:3]
            for n, p in self.pairs.items():
                size = p.mem.total_pages - p.device.actual_pages
                self.min_size[n] = min(self.min_size.get(n, size), size)
            self.peak_resident = max(self.peak_resident, self.resident())
            self.released.append(sum(p.device.actual_pages for p in self.pairs.values()))
            if self.t % every:
                continue
            seen = dict(engine.guests)
            self.decisions.extend(engine.step())
            for n, s in engine.guests.items():
                old = seen.get(n)
                if s.report is not None and old is not None and old.report is not None \
                        and s.report is not old.report:
                    self.stalls.append(s.report.stall_pct)

    def oom_kills(self) -> int:
        return sum(p.mem.events.oom_kills for p in self.pairs.values())

    def mean_released(self) -> float:
        return float(np.mean(self.released))

    def p99_stall(self) -> float:
        return float(np.percentile(self.stalls, 99)) if self.stalls else 0.0


@pytest.mark.parametrize("protocol", ["vmw", "virtio"])
def test_ramp_is_never_oom_killed_while_squeezed(protocol: str) -> None:
    w = World.build(protocol, [Ramp(start_mib=16, peak_mib=200, mib_per_s=8, file_mib=4,
                                    start_at_s=40)], guest_mib=256, budget_frac=0.5)
    p = DefaultPolicy()
    w.run(p, 120)
    assert w.oom_kills() == 0
    assert max(w.released) > mib_to_pages(100)  # it was squeezed before the ramp
    assert any("emergency" in d.reason or "back off" in d.reason for d in w.decisions)
    pair = w.pairs["g0"]
    assert pair.mem.meminfo().anon_pages >= mib_to_pages(200) - 1  # the ramp got its memory


def test_idle_guest_is_probed_down_to_its_working_set() -> None:
    w = World.build("virtio", [Idle(anon_mib=40, file_mib=8)], guest_mib=256, budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 200, every=4)
    mem = w.pairs["g0"].mem
    ws = mem.total_pages - mem.available_pages() - mem.balloon_pages
    keep = mem.total_pages - w.pairs["g0"].device.actual_pages
    margin = max(MARGIN_MIN_PAGES, int(MARGIN_FRACTION * mem.total_pages))
    assert keep <= ws + margin + int(PROBE_STEP_MAX * mem.total_pages)
    assert keep >= ws  # never into the working set
    assert w.oom_kills() == 0 and max(w.stalls) <= STALL_TROUBLE_PCT


def test_balloon_never_breaks_min_pages() -> None:
    w = World.build("virtio", [Idle(anon_mib=16, file_mib=8), Idle(anon_mib=16, file_mib=8)],
                    guest_mib=256, budget_frac=0.2, min_mib=160)
    w.run(DefaultPolicy(), 120)
    assert min(w.min_size.values()) >= mib_to_pages(160)
    assert all(d.new_pages <= mib_to_pages(256 - 160) for d in w.decisions)


def test_pressure_makes_it_deflate_at_once() -> None:
    # squeeze a cache-heavy guest by hand far below its hot file set: it stalls at once
    w = World.build("virtio", [Steady(anon_mib=64, file_mib=128, hot=0.9,
                                      cold_access_per_s=0.05)], guest_mib=256, budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 10)
    pair = w.pairs["g0"]
    pair.set_target(mib_to_pages(150))
    before = len(w.decisions)
    for _ in range(10):
        w.run(p, 2)
        if len(w.decisions) > before:
            break
    new = w.decisions[before:]
    assert new and ("back off" in new[0].reason or "emergency" in new[0].reason)
    assert new[0].new_pages < mib_to_pages(150)


def test_stalled_inflation_in_a_real_guest_is_given_back() -> None:
    # a guest whose anonymous memory fills it: an inflation by hand cannot go through
    w = World.build("vmw", [Steady(anon_mib=200, file_mib=8, hot=0.5)], guest_mib=256,
                    budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 6)
    pair = w.pairs["g0"]
    pair.set_target(mib_to_pages(200))
    w.run(p, 10)
    assert pair.device.target_pages <= pair.device.actual_pages
    assert w.oom_kills() == 0


SCENARIOS = [
    ("idle", "idle", "steady", "diurnal"),
    ("diurnal", "diurnal", "idle", "steady"),
    ("idle", "diurnal", "idle", "idle"),
]


@pytest.mark.parametrize("kinds", SCENARIOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_default_returns_as_much_as_mom_and_proxmox_without_more_stall(
    kinds: tuple[str, ...], seed: int
) -> None:
    results = {}
    for make in (DefaultPolicy, MomPolicy, ProxmoxPolicy):
        pol = make()
        w = World.build("virtio", [make_workload(k, 256, seed + i) for i, k in enumerate(kinds)],
                        guest_mib=256, budget_frac=0.45, min_mib=32)
        w.run(pol, 150, every=5)
        results[pol.name] = w
    d = results["default"]
    best = max(results["mom"].mean_released(), results["proxmox"].mean_released())
    assert d.oom_kills() == 0
    assert d.mean_released() >= best
    assert d.p99_stall() <= max(results["mom"].p99_stall(), results["proxmox"].p99_stall(),
                                STALL_TROUBLE_PCT)


# ---------------------------------------------------------------------- the rules one by one
RULE = {r.name: r for r in RULES}
MARGIN = int(MARGIN_FRACTION * RAM)
STEP = int(PROBE_STEP_START * RAM)


def figs(*, balloon: int = 0, target: int | None = None, max_pages: int | None = None,
         **kw: Any) -> Figures:
    """Figures of a quiet 1 GiB guest with a quarter of it as working set, but for ``kw``."""
    g = GuestSample("g", RAM, balloon, balloon if target is None else target,
                    GuestSettings(max_pages=max_pages))
    base: dict[str, Any] = {"ws": RAM // 4, "peak": RAM // 4, "margin": MARGIN,
                            "avail": RAM - balloon - RAM // 4,
                            "floor": RAM // 4 + MARGIN, "budget_floor": RAM // 4 + MARGIN,
                            "step": STEP, "report_balloon": balloon}
    base["free"] = kw.get("avail", base["avail"])  # no page cache unless ``free`` says so
    return Figures(g, 100.0, **(base | kw))


def test_rules_table_follows_the_module_docstring() -> None:
    names = [r.name for r in RULES]
    assert names == ["blind", "emergency", "own_pressure", "reclaiming", "room", "reread",
                     "trouble", "stalled", "under_floor", "probe", "hold"]
    doc = default_module.__doc__ or ""
    at = [doc.index(f"**{n}**") for n in names]
    assert at == sorted(at)  # documented in the same order
    # the first rule that applies decides: an OOM-killed guest in trouble is an emergency
    rule, ruling = judge(figs(d_oom=1, stall_pct=50.0, balloon=RAM // 2))
    assert rule.name == "emergency" and ruling is not None and ruling.oom


def test_rules_marked_troubled_apply_only_to_a_troubled_guest() -> None:
    # ``judge`` skips them for a quiet guest: each must ask for ``Figures.troubled`` itself
    flagged = [r for r in RULES if r.troubled]
    assert {r.name for r in flagged} == {"own_pressure", "reclaiming", "room", "reread",
                                         "trouble"}
    for balloon in (0, RAM // 4):
        for kw in ({}, {"stall_pct": STALL_TROUBLE_PCT}, {"swapin_rate": SWAPIN_TROUBLE_PER_S}):
            f = figs(balloon=balloon, last_balloon=0, **kw)
            assert not f.troubled and not any(r.when(f) for r in flagged)
            # the same guest troubled: the rule for it applies
            hurt = figs(balloon=balloon, last_balloon=0, **(kw | {"stall_pct": 5.0}))
            assert hurt.troubled
            assert RULE["own_pressure" if balloon == 0 else "reclaiming"].when(hurt)
            assert judge(hurt)[0].name == ("own_pressure" if balloon == 0 else "reclaiming")


def test_rule_blind() -> None:
    r = RULE["blind"]
    assert r.when(figs(fresh=False)) and not r.when(figs())
    assert r.verdict is Verdict.BLIND and r.counter is DefaultCounter.BLIND
    assert r.decide(figs(fresh=False, balloon=100)) is None  # not inflating: nothing to stop
    f = figs(fresh=False, balloon=100, target=5000)
    ruling = r.decide(f)
    assert ruling == Ruling(RAM - 100, 0, 0.0, balloon=100)  # target := actual
    assert r.why(f, ruling) == "no fresh report: stop inflating a guest it cannot see"
    assert f.inputs() == {"report_age_s": -1.0}  # no report at all


def test_rule_emergency() -> None:
    r = RULE["emergency"]
    b = RAM // 2
    # under the small margin (4 MiB plus the lookahead), not under the full one nor under the
    # budget's (8 MiB: where a short host squeezes a guest), is emergency
    assert EMERGENCY_MARGIN_PAGES == BUDGET_MARGIN_PAGES // 2 == mib_to_pages(4)
    assert not r.when(figs(balloon=b, avail=EMERGENCY_MARGIN_PAGES, ahead=0))
    assert not r.when(figs(balloon=b, avail=BUDGET_MARGIN_PAGES - 1, ahead=0))
    assert r.when(figs(balloon=b, avail=EMERGENCY_MARGIN_PAGES + 99, ahead=100))
    f = figs(balloon=b, avail=100, severity=0.5)
    ruling = r.decide(f)
    assert ruling == Ruling(RAM - b + MARGIN - 100, f.floor, 100.5,
                            hurt=RAM - b + MARGIN - 100)
    assert r.why(f, ruling) == f"default: emergency deflate: available 100 pages under margin " \
                               f"{MARGIN}"
    # an OOM kill gives the whole balloon back, up to the ceiling; the hurt stays at the size
    # plus the margin
    f = figs(balloon=b, d_oom=2, max_pages=RAM - 1000)
    ruling = r.decide(f)
    assert ruling is not None and ruling.size == RAM - 1000 and ruling.oom
    assert ruling.hurt == RAM - b + STEP
    assert r.why(f, ruling) == "default: emergency deflate: guest OOM-killed (2 new)"


def test_rule_own_pressure() -> None:
    r = RULE["own_pressure"]
    f = figs(stall_pct=5.0, severity=5.0)
    assert r.when(f) and r.verdict is Verdict.HOLD
    assert r.counter is DefaultCounter.PRESSURE_WITHOUT_BALLOON
    assert not r.when(figs(stall_pct=5.0, balloon=1))  # a balloon: trouble, not its own
    assert not r.when(figs(stall_pct=5.0, target=1))
    assert not r.when(figs(stall_pct=0.5))  # not troubled at all
    ruling = r.decide(f)
    assert ruling == Ruling(RAM, f.floor, 5.0) and ruling.hurt is None  # nothing remembered
    assert r.why(f, ruling) == "default: stall 5.00% with no balloon: hold"


def test_rule_trouble() -> None:
    r = RULE["trouble"]
    b = RAM // 2
    assert r.when(figs(balloon=b, stall_pct=STALL_TROUBLE_PCT + 0.01))
    assert not r.when(figs(balloon=b, stall_pct=STALL_TROUBLE_PCT))
    assert r.when(figs(balloon=b, swapin_rate=65.0)) and not r.when(figs(swapin_rate=64.0))
    # the back-off: the larger of 2% of RAM and two steps, times the pressure (1 to 4 times)
    f = figs(balloon=b, stall_pct=2.0, swapin_rate=10.4, severity=2.0)
    ruling = r.decide(f)
    backoff = int(max(BACKOFF_MIN_FRACTION * RAM, 2 * STEP) * 2.0)
    assert ruling == Ruling(RAM - b + backoff, RAM - b + backoff, 2.0,
                            hurt=RAM - b + min(backoff, MARGIN), probed=True)
    assert r.why(f, ruling) == "default: back off: stall 2.00%, swap-in 10 pages/s"
    huge = r.decide(figs(balloon=b, stall_pct=100.0, severity=100.0))
    assert huge is not None
    assert huge.size == RAM - b + int(max(BACKOFF_MIN_FRACTION * RAM, 2 * STEP) * 4.0)


def test_rule_stalled() -> None:
    r = RULE["stalled"]
    b, t = RAM // 4, RAM // 2
    f = figs(balloon=b, target=t, stuck=True, last_balloon=b)
    assert r.when(f) and not r.when(figs(balloon=b, target=t))
    assert not r.when(figs(balloon=b, d_refused=5))  # refusals matter only while inflating
    ruling = r.decide(f)
    assert ruling == Ruling(RAM - b, f.floor, 0.0, balloon=b, hurt=RAM - b)
    assert r.why(f, ruling) == (f"default: inflation stalled: balloon stuck at {b} (was {b}) "
                                f"under target {t}: target := actual")
    f = figs(balloon=b, target=t, d_refused=50)
    assert r.when(f)
    ruling = r.decide(f)
    assert ruling is not None
    assert r.why(f, ruling) == "default: inflation stalled: refused 50 pages: target := actual"


def test_rule_under_floor() -> None:
    r = RULE["under_floor"]
    floor = RAM // 4 + MARGIN
    assert r.when(figs(balloon=RAM - floor + 1)) and not r.when(figs(balloon=RAM - floor))
    # back to the floor and a band above it, to the ceiling at most
    band = int(BAND_FRACTION * RAM)
    f = figs(balloon=RAM - floor + 500, severity=0.1)
    ruling = r.decide(f)
    assert ruling == Ruling(floor + band, floor, 0.1)
    assert r.why(f, ruling) == f"default: size {floor - 500} under safety floor {floor}: grow"
    capped = r.decide(figs(balloon=RAM - floor + 500, max_pages=floor + 10))
    assert capped is not None and capped.size == floor + 10
    # a deficit under MIN_CHANGE_PAGES is noise: to the floor only (too small a change)
    noise = r.decide(figs(balloon=RAM - floor + MIN_CHANGE_PAGES - 1))
    assert noise is not None and noise.size == floor
    edge = r.decide(figs(balloon=RAM - floor + MIN_CHANGE_PAGES))
    assert edge is not None and edge.size == floor + band


def test_rule_probe() -> None:
    r = RULE["probe"]
    b = RAM // 2
    f = figs(balloon=b, avail=MARGIN)  # tight: not idle
    assert r.when(f)
    assert not r.when(figs(balloon=b, probe=False))
    assert not r.when(figs(balloon=b, stall_pct=STALL_QUIET_PCT + 0.01))
    assert not r.when(figs(balloon=b, d_swapin=1))
    assert not r.when(figs(balloon=b, fault_rate=MAJOR_FAULTS_QUIET_PER_S + 1))
    assert not r.when(figs(balloon=b, target=b + MIN_CHANGE_PAGES))  # not settled
    assert not r.when(figs(balloon=RAM - (RAM // 4 + MARGIN)))  # at its floor
    ruling = r.decide(f)
    assert ruling == Ruling(RAM - b - STEP, f.floor, 0.0, quiet=True)
    assert r.why(f, ruling) == (f"default: quiet (stall 0.00%): probe down {STEP} pages "
                                f"toward floor {f.floor}")
    # idle memory, quiet for long enough: half of it beyond the margin, capped
    idle = figs(avail=RAM - RAM // 4, quiet_calls=QUIET_CALLS_BEFORE_BIG_STEP)
    big = r.decide(idle)
    assert big is not None
    half = min((RAM - RAM // 4 - MARGIN) // 2, int(BIG_STEP_MAX_FRACTION * RAM))
    assert big.size == max(idle.floor, RAM - half)
    new = r.decide(figs(avail=RAM - RAM // 4, quiet_calls=QUIET_CALLS_BEFORE_BIG_STEP - 1))
    assert new is not None and new.size == RAM - STEP  # a guest not yet known quiet
    # the same MemAvailable, but page cache beyond twice the margin of MemFree: the step only
    # (the cache may be hot); with a little more MemFree, half of that MemFree beyond the margin
    cached = r.decide(figs(avail=RAM - RAM // 4, free=2 * MARGIN,
                           quiet_calls=QUIET_CALLS_BEFORE_BIG_STEP))
    assert cached is not None and cached.size == RAM - STEP
    some = r.decide(figs(avail=RAM - RAM // 4, free=2 * MARGIN + 2 * STEP,
                         quiet_calls=QUIET_CALLS_BEFORE_BIG_STEP))
    assert some is not None and some.size == RAM - (MARGIN + 2 * STEP) // 2
    near = r.decide(figs(balloon=RAM - (RAM // 4 + MARGIN) - 10))
    assert near is not None and near.size == RAM // 4 + MARGIN  # never below the floor


def test_rule_hold() -> None:
    r = RULE["hold"]
    f = figs(balloon=RAM // 2, severity=0.3)
    assert r.when(f) and r.verdict is Verdict.HOLD
    ruling = r.decide(f)
    assert ruling == Ruling(RAM // 2, f.floor, 0.3)
    assert r.why(f, ruling) == "default: hold"


def test_memo_remembers_what_a_ruling_asks() -> None:
    m = GuestMemo()
    f = figs(ws=1234)
    m.remember(f, Ruling(1, 1, 0.0, quiet=True))
    assert (m.quiet_calls, m.step) == (1, PROBE_STEP_START + PROBE_STEP_INC)
    m.remember(f, Ruling(1, 1, 0.0, hurt=5000, oom=True))
    assert (m.hurt_size, m.hurt_at, m.hurt_ws, m.oom_at) == (5000, 100.0, 1234, 100.0)
    assert m.step == (PROBE_STEP_START + PROBE_STEP_INC) / 2 and not m.hurt_refaulted
    m.remember(f, Ruling(1, 1, 0.0, hurt=6000, refaulted=True))
    assert (m.hurt_size, m.hurt_refaulted) == (6000, True)
    m.remember(f, Ruling(1, 1, 0.0, hurt=7000))  # the last hurt says how it hurt
    assert (m.hurt_size, m.hurt_refaulted) == (7000, False)


# ---------------------------------------------------------------------- snapshots
def script(p: DefaultPolicy, q: DefaultPolicy | None, t0: int, t1: int, b: int,
           shift: float = 0.0) -> tuple[int, list[Decision | None]]:
    """Feed ``p`` (and ``q``, its clock ``shift`` seconds on) a guest going through quiet,
    stalled, swapping and OOM-killed periods from ``t0`` to ``t1`` (5 s a call); the balloon
    follows ``p``. Returns the balloon and ``p``'s decisions (``q``'s must be the same)."""
    out = []
    for t in range(t0, t1, 5):
        ws = RAM // 5 + (min(t, 230) - 195) * RAM // 40 if t >= 200 else RAM // 5  # a ramp
        kw: dict[str, Any] = {"swap_in": 10_000 * sum(t >= e for e in (120, 320)),
                              "major": 10 * t, "oom": int(t >= 150),
                              "stall": 3.0 if t in (60, 260) else 0.0}
        g = sample(report(t, avail=max(0, RAM - ws - b), balloon=b, **kw), balloon=b)
        d = one(p, g, float(t))
        if q is not None:
            gq = GuestSample(g.name, g.ram_pages, g.balloon_pages, g.target_pages, g.settings,
                             g.report, None if g.report_time is None else g.report_time + shift)
            assert one(q, gq, t + shift) == d
        out.append(d)
        b = d.balloon_pages if d is not None else b
    return b, out


def test_snapshot_round_trip_through_json_decides_alike() -> None:
    p = DefaultPolicy()
    b, _ = script(p, None, 0, 100, 0)
    snap = p.snapshot(100.0)
    assert set(snap.guests) == {"g"} and snap.guests["g"].hurt_age_s is not None
    assert snap.guests["g"].hurt_refaulted and snap.guests["g"].faulted_age_s == 5.0
    data = snap.model_dump_json()
    q = DefaultPolicy()
    q.restore(DefaultSnapshot.model_validate_json(data), 100.0)
    assert q.snapshot(100.0) == snap
    _, ds = script(p, q, 100, 400, b)
    assert {d.reason.split(":")[1].strip().split(" ")[0] for d in ds if d} >= {
        "quiet", "back", "emergency"}  # the rest of the script still goes through the rules


def test_restore_on_another_clock_keeps_ages() -> None:
    p = DefaultPolicy()
    b, _ = script(p, None, 0, 130, 0)
    snap = p.snapshot(130.0)
    q = DefaultPolicy()
    q.restore(snap, 7.0)  # a new process whose clock started a while ago
    assert q.snapshot(7.0) == snap  # every age as it was
    mp, mq = p.state["g"], q.state["g"]
    assert mq.hurt_at == mp.hurt_at - 123.0 and mq.oom_at == mp.oom_at - 123.0
    assert mq.faulted_at == mp.faulted_at - 123.0 and mq.hurt_refaulted == mp.hurt_refaulted
    assert [t for t, _ in mq.ws] == [t - 123.0 for t, _ in mp.ws]
    assert mq.last_now == 7.0 - (130.0 - (mp.last_now or 0.0))
    # later, the restored policy decides as the original would have (its clock shifted)
    script(p, q, 130, 400, b, shift=-123.0)


def test_snapshot_of_a_new_guest_says_never() -> None:
    p = DefaultPolicy()
    one(p, sample(report(0, avail=RAM // 2)), 0.0)
    s = p.snapshot(3.0).guests["g"]
    assert (s.hurt_age_s, s.oom_age_s, s.quiet_calls) == (None, None, 1)
    assert s.working_set == ((3.0, RAM // 2),)
    assert s.last_report is not None and s.last_report.age_s == 3.0
    q = DefaultPolicy()
    q.restore(p.snapshot(3.0), 50.0)
    m = q.state["g"]
    assert m.hurt_at == m.oom_at == m.faulted_at == float("-inf") and m.last_now == 47.0
    assert s.faulted_age_s is None and not s.hurt_refaulted
    blind = DefaultPolicy()
    one(blind, sample(None), 0.0)
    assert blind.snapshot(0.0).guests["g"].last_report is None  # rates start over


# ---------------------------------------------------------------------- room, bands
def _roomy(**kw: Any) -> Figures:
    """A guest at half its RAM, stalling (refaults, no swap-in) with idle free memory of
    exactly its margin plus a back-off, its balloon at its target, but for ``kw``."""
    b = RAM // 2
    base: dict[str, Any] = {"stall_pct": 2.0, "severity": 2.0, "fault_rate": 50.0,
                            "avail": RAM // 4}
    f = figs(balloon=b, **(base | kw))
    if "free" not in kw:
        f.free = MARGIN + f.backoff
    return f


def test_rule_room_holds_a_troubled_guest_with_idle_free_memory() -> None:
    r = RULE["room"]
    f = _roomy()
    assert f.troubled and f.backoff == int(max(BACKOFF_MIN_FRACTION * RAM, 2 * STEP) * 2.0)
    assert f.room == f.margin + f.backoff
    assert r.when(f) and judge(f)[0].name == "room"
    ruling = r.decide(f)
    assert ruling == Ruling(f.target_size, f.floor, f.severity)  # hold, nothing remembered
    assert r.verdict is Verdict.ROOM and r.counter is DefaultCounter.TROUBLE_WITH_ROOM
    assert r.why(f, ruling) == (
        f"default: stall 2.00% with {f.room} pages free beyond what the balloon takes "
        f"(margin {MARGIN}, back-off {f.backoff}): hold (more memory cannot help)")


def test_rule_room_does_not_hold_on_each_edge() -> None:
    # the rule after it, trouble, backs off in each case
    just_under = _roomy()
    just_under.free -= 1  # one page short of margin plus back-off
    deflating = _roomy(target=RAM // 4)  # balloon above its target: the memory is not there
    swapin = _roomy(d_swapin=10, swapin_rate=5.0)  # anonymous memory came back from swap
    quiet = _roomy(stall_pct=STALL_TROUBLE_PCT, severity=1.0)  # not troubled: no rule of it
    for f in (just_under, deflating, swapin):
        assert not RULE["room"].when(f)
        assert judge(f)[0].name == "trouble", f
    assert not RULE["room"].when(quiet) and judge(quiet)[0].name != "trouble"
    # an emergency (MemAvailable under the small margin, or an OOM kill) comes first
    for f in (_roomy(avail=EMERGENCY_MARGIN_PAGES - 1), _roomy(d_oom=1)):
        assert RULE["room"].when(f) and judge(f)[0].name == "emergency"


def test_rule_room_counts_an_inflation_in_progress_against_the_free_memory() -> None:
    # the balloon still has pages to take: they come out of MemFree
    b = RAM // 2
    f = _roomy(target=b + 100)
    assert f.room == f.free - 100 and not RULE["room"].when(f)
    f.free += 100
    assert RULE["room"].when(f)
    # the balloon's growth since the report was taken from MemFree too
    grown = _roomy(report_balloon=b - 100)
    assert grown.room == grown.free - 100 and not RULE["room"].when(grown)


def test_a_refaulting_guest_with_free_memory_is_held_not_deflated_to_empty() -> None:
    # session 7's fleet: a steady web server's cache, evicted by a probe, refaults at the
    # workload's own pace; with MemFree well beyond its margin the stall stays over the
    # trouble line for a minute and each call backed off again, down to an empty balloon
    p = DefaultPolicy()
    b = RAM // 2
    ws = RAM // 4
    free = RAM // 4 - RAM // 32  # the rest of the guest is its (partly refilled) cache
    major = 0
    held = 0
    for t in range(0, 60, 2):
        major += 200
        d = one(p, sample(report(t, avail=RAM - b - ws, balloon=b, stall=1.5, major=major,
                                 free=free), balloon=b), float(t))
        assert d is None  # held: the target stays
        held += 1
    assert p.counters[DefaultCounter.TROUBLE_WITH_ROOM] == held
    # its free memory gone (the cache refilled it), the same stall backs off
    d = one(p, sample(report(60, avail=RAM - b - ws, balloon=b, stall=1.5, major=major + 200,
                             free=MARGIN), balloon=b), 60.0)
    assert d is not None and "back off" in d.reason and d.balloon_pages < b


def test_rule_probe_waits_for_two_bands_above_the_floor() -> None:
    # a working set that moves every second is followed in bands, not in MiB
    r = RULE["probe"]
    band = int(BAND_FRACTION * RAM)
    floor = RAM // 4 + MARGIN
    assert r.when(figs(balloon=RAM - floor - 2 * band))
    assert not r.when(figs(balloon=RAM - floor - 2 * band + 1))
    assert judge(figs(balloon=RAM - floor - 2 * band + 1))[0].name == "hold"


def test_rule_reread_holds_trouble_in_the_report_the_last_call_read() -> None:
    r = RULE["reread"]
    f = figs(balloon=RAM // 2, stall_pct=3.0, severity=3.0, repeated=True, avail=MARGIN,
             free=0)
    assert r.when(f) and judge(f)[0].name == "reread"
    ruling = r.decide(f)
    assert ruling == Ruling(f.target_size, f.floor, 3.0)  # hold, nothing remembered
    assert r.why(f, ruling) == ("default: stall 3.00% in the report the last call read: hold "
                                "(its back-off is not in it yet)")
    fresh = figs(balloon=RAM // 2, stall_pct=3.0, severity=3.0, avail=MARGIN, free=0)
    assert not r.when(fresh) and judge(fresh)[0].name == "trouble"
    # an emergency in it still deflates
    tight = figs(balloon=RAM // 2, stall_pct=3.0, repeated=True, avail=0, free=0)
    assert judge(tight)[0].name == "emergency"


def test_one_back_off_a_report() -> None:
    # calls every second, reports every 2 s: the second call reads the first's report again
    p = DefaultPolicy()
    b = RAM // 2
    ws = RAM // 2 - RAM // 16
    r0 = report(0, avail=RAM - b - ws, balloon=b, free=0)
    one(p, sample(r0, balloon=b), 0.0)
    r2 = report(2, avail=RAM - b - ws, balloon=b, stall=3.0, major=500, free=0)
    d = one(p, sample(r2, balloon=b), 2.0)
    assert d is not None and "back off" in d.reason
    m = p.state["g"]
    hurt, hurt_at = m.hurt_size, m.hurt_at
    assert m.hurt_refaulted
    # the balloon deflated at once (vmw-batched does); the report is the same
    again = one(p, GuestSample("g", RAM, d.balloon_pages, d.balloon_pages, GuestSettings(),
                               r2, 2.0), 3.0)
    assert again is None
    # the memory of it is the back-off's: a report's counters against themselves show no
    # refault, and it did not say the guest stopped refaulting
    m = p.state["g"]
    assert (m.hurt_size, m.hurt_at, m.hurt_refaulted) == (hurt, hurt_at, True)


def test_a_size_that_hurt_is_remembered_longer_while_the_guest_still_refaults() -> None:
    # a probe evicted a cache the guest reads: it refaults it back at its own pace, for many
    # minutes; probing again after PRESSURE_MEMORY_S would evict the same pages again
    assert REFAULTING_MEMORY_S > PRESSURE_MEMORY_S
    p = DefaultPolicy()
    ws = RAM // 4
    b = RAM // 4
    major = 0
    one(p, sample(report(0, avail=RAM - ws - b, balloon=b), balloon=b), 0.0)
    major += 5000
    d = one(p, sample(report(5, avail=RAM - ws - b, balloon=b, stall=5.0, major=major,
                             free=RAM // 64), balloon=b), 5.0)
    assert d is not None and "back off" in d.reason
    hurt = p.state["g"].hurt_size
    b = d.balloon_pages
    sizes: dict[float, int] = {}
    for t in range(10, int(5 + REFAULTING_MEMORY_S + 60), 10):
        major += 100  # 10 a second: quiet enough to probe, but still reading back
        d = one(p, sample(report(t, avail=RAM - ws - b, balloon=b, major=major), balloon=b),
                float(t))
        b = d.balloon_pages if d is not None else b
        sizes[t] = RAM - b
    within = [s for t, s in sizes.items() if t < 5 + REFAULTING_MEMORY_S]
    assert min(within) == hurt  # held at the size that hurt past PRESSURE_MEMORY_S
    assert min(sizes.values()) < hurt  # probed below it once the longer memory ends


# ---------------------------------------------------------------------- back-off of a repeat
def hurt_at(m: GuestMemo, now: float, hurt: int, *, probed: bool = True,
            refaulted: bool = True) -> None:
    """``m`` remembers a ruling that ``hurt`` at ``now`` (a probe's back-off, by default)."""
    m.remember(replace(figs(), now=now),
               Ruling(1, 1, 0.0, hurt=hurt, refaulted=refaulted, probed=probed))


def test_a_probe_that_hurts_again_at_the_same_size_is_remembered_twice_as_long() -> None:
    assert 2 * REFAULTING_MEMORY_S < HURT_MEMORY_MAX_S
    m = GuestMemo()
    hurt_at(m, 0.0, 5000)
    assert (m.hurt_hold_s, m.hurt_mark) == (0.0, 5000)  # a first: the base rules
    hurt_at(m, 10.0, 9000)  # a back-off while it is remembered: the same episode
    assert (m.hurt_size, m.hurt_hold_s, m.hurt_mark) == (9000, 0.0, 5000)
    holds = []
    t = 10.0
    for k in range(5):
        m.hurt_size = 0  # forgotten (``figures``), and the next probe hurts about there
        t += max(m.hurt_hold_s, REFAULT_MEMORY_S)
        hurt_at(m, t, 5000 + (k + 1) * MARGIN)  # each within a margin of the last
        holds.append(m.hurt_hold_s)
    assert holds == [2 * REFAULTING_MEMORY_S, 4 * REFAULTING_MEMORY_S, HURT_MEMORY_MAX_S,
                     HURT_MEMORY_MAX_S, HURT_MEMORY_MAX_S]
    # without refaults the base is PRESSURE_MEMORY_S
    m = GuestMemo()
    hurt_at(m, 0.0, 5000, refaulted=False)
    m.hurt_size = 0
    hurt_at(m, PRESSURE_MEMORY_S, 5000)
    assert m.hurt_hold_s == 2 * PRESSURE_MEMORY_S


def test_a_hurt_far_from_the_last_late_or_not_a_probes_starts_the_back_off_over() -> None:
    def again(now: float, hurt: int, **kw: bool) -> float:
        m = GuestMemo()
        hurt_at(m, 0.0, 5000)
        m.hurt_size = 0
        hurt_at(m, now, hurt, **kw)
        return m.hurt_hold_s

    doubled = 2 * REFAULTING_MEMORY_S
    assert again(100.0, 5000 + MARGIN) == again(100.0, 5000 - MARGIN) == doubled
    assert again(100.0, 5000 + MARGIN + 1) == again(100.0, 5000 - MARGIN - 1) == 0.0
    late = REFAULTING_MEMORY_S + HURT_AGAIN_WITHIN_S  # a quiet spell after its memory
    assert again(late, 5000) == doubled and again(late + 1.0, 5000) == 0.0
    # an emergency (a burst of the workload's) or a stalled inflation: no back-off, and the
    # next probe's hurt is a first again
    m = GuestMemo()
    hurt_at(m, 0.0, 5000)
    m.hurt_size = 0
    hurt_at(m, 100.0, 5000, probed=False)
    assert (m.hurt_hold_s, m.hurt_mark) == (0.0, 0)
    m.hurt_size = 0
    hurt_at(m, 200.0, 5000)
    assert (m.hurt_hold_s, m.hurt_mark) == (0.0, 5000)


def test_a_size_backed_off_is_kept_its_whole_hold_refaults_or_not() -> None:
    p = DefaultPolicy()
    ws = RAM // 4
    hold = 2 * REFAULTING_MEMORY_S

    def memo() -> GuestMemo:
        return GuestMemo(hurt_size=RAM // 2, hurt_at=0.0, hurt_ws=ws, hurt_refaulted=True,
                         faulted_at=0.0, hurt_hold_s=hold, hurt_mark=RAM // 2)

    m = memo()
    # no refault for far more than REFAULT_MEMORY_S: the back-off still holds the size
    f = p.figures(sample(report(100, avail=RAM - ws)), m, 100.0)
    assert m.hurt_size == RAM // 2 and f.floor == RAM // 2
    p.figures(sample(report(hold - 1, avail=RAM - ws)), m, hold - 1.0)
    assert m.hurt_size == RAM // 2
    p.figures(sample(report(hold, avail=RAM - ws)), m, hold)
    assert (m.hurt_size, m.hurt_hold_s, m.hurt_mark) == (0, hold, RAM // 2)  # the back-off
    # stays for the next hurt to double; the working set shrinking a margin below the one
    # it hurt with forgets the size and its back-off at once
    m = memo()
    m.hurt_ws = ws + MARGIN + 1
    p.figures(sample(report(100, avail=RAM - ws)), m, 100.0)
    assert (m.hurt_size, m.hurt_hold_s, m.hurt_mark) == (0, 0.0, 0)


def test_a_cache_evicted_again_at_the_same_size_is_not_probed_again_for_twice_as_long() -> None:
    # the fleet's web servers: a probe evicts the cache, the guest refaults it back for a
    # while and stops; the size is forgotten and the next probe evicts it again. The second
    # time, the refaults stopping no longer forgets it: it is held 2 * REFAULTING_MEMORY_S
    p = DefaultPolicy()
    ws = RAM // 4
    b = RAM // 4
    major = 0
    one(p, sample(report(0, avail=RAM - ws - b, balloon=b), balloon=b), 0.0)
    hurts: list[float] = []
    hurt_sizes: list[int] = []
    sizes: dict[int, int] = {}
    t = 5
    while t < 3 * REFAULTING_MEMORY_S:
        m = p.state["g"]
        if len(hurts) < 2 and m.hurt_size == 0 and m.hurt_mark and RAM - b < m.hurt_mark:
            pass  # probed below the size forgotten: this call hurts
        elif hurts:
            if t <= hurts[-1] + 50:
                major += 100  # reading back what the probe took, then no more
            # (its page cache is MemAvailable, not MemFree: probed by the step alone)
            d = one(p, sample(report(t, avail=RAM - ws - b, balloon=b, major=major,
                                     free=RAM // 64), balloon=b), float(t))
            b = d.balloon_pages if d is not None else b
            sizes[t] = RAM - b
            t += 5
            continue
        major += 5000
        d = one(p, sample(report(t, avail=RAM - ws - b, balloon=b, stall=5.0, major=major,
                                 free=RAM // 64), balloon=b), float(t))
        assert d is not None and "back off" in d.reason
        hurts.append(float(t))
        hurt_sizes.append(p.state["g"].hurt_size)
        b = d.balloon_pages
        t += 5
    m = p.state["g"]
    assert len(hurts) == 2 and m.hurt_hold_s == 2 * REFAULTING_MEMORY_S
    # the first: forgotten REFAULT_MEMORY_S after the refaults stopped, probed below
    assert hurts[1] == hurts[0] + 50 + REFAULT_MEMORY_S + 5
    # the second: held at the size through the doubled memory though the refaults stopped
    held = [s for at, s in sizes.items() if hurts[1] < at < hurts[1] + m.hurt_hold_s]
    after = [s for at, s in sizes.items() if at >= hurts[1] + m.hurt_hold_s]
    assert min(held) == hurt_sizes[1]
    assert after and min(after) < hurt_sizes[1]  # probed again once the memory ends


def test_snapshot_carries_the_back_off_and_an_old_one_has_none() -> None:
    p = DefaultPolicy()
    one(p, sample(report(0, avail=RAM // 2)), 0.0)
    m = p.state["g"]
    m.hurt_hold_s, m.hurt_mark = 2 * REFAULTING_MEMORY_S, RAM // 3
    snap = p.snapshot(1.0)
    q = DefaultPolicy()
    q.restore(DefaultSnapshot.model_validate_json(snap.model_dump_json()), 5.0)
    assert (q.state["g"].hurt_hold_s, q.state["g"].hurt_mark) == (2 * REFAULTING_MEMORY_S,
                                                                  RAM // 3)
    old = snap.model_dump(mode="json")
    for key in ("hurt_hold_s", "hurt_mark"):
        del old["guests"]["g"][key]
    q.restore(DefaultSnapshot.model_validate(old), 5.0)
    assert (q.state["g"].hurt_hold_s, q.state["g"].hurt_mark) == (0.0, 0)
