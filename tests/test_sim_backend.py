"""SimBackend: pairs on the virtual clock as a manager backend; reports as the guest makes them."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memballoon.sim.backend as sim_backend
from memballoon.edge.journal import Journal
from memballoon.guest.report import guest_report, report_unchanged
from memballoon.guest.workload import Bursts, Demand, Diurnal, Idle, Steady, Toucher
from memballoon.harness.pair import Pair, make_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import MIB, PAGE_SIZE, mib_to_pages
from memballoon.policy.default import DefaultPolicy
from memballoon.policy.observe import working_set_pages
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import ESX_SAMPLE_PAGES, SimBackend, host_oom_victim, usage_at


def test_samples_report_what_the_guest_model_holds() -> None:
    pair = make_pair("virtio", mib_to_pages(128), Steady(anon_mib=32, file_mib=16))
    clock = ManualClock()
    b = SimBackend({"web": pair}, clock, rng=random.Random(1))
    assert b.guests()["web"].report is None  # nothing reported yet
    b.advance(2.0)
    assert b.set_target("web", mib_to_pages(16))
    b.advance(2.0)
    s1 = b.guests()["web"]
    r = s1.report
    assert r is not None and s1.name == "web" and r.guest == "web"
    assert s1.report_time == 4.0 and r.time_s == pytest.approx(4.0)
    mi = pair.mem.meminfo()
    assert r.total_bytes == mi.total_pages * PAGE_SIZE
    assert r.anon_bytes == mi.anon_pages * PAGE_SIZE
    assert r.available_bytes == mi.available_pages * PAGE_SIZE
    assert s1.balloon_pages == r.balloon_actual_pages == mib_to_pages(16)
    assert s1.target_pages == mib_to_pages(16)
    assert r.stall_us == pair.mem.events.stall_us
    assert 0.0 <= r.stall_pct <= 100.0
    assert s1.active_sampled == ESX_SAMPLE_PAGES and 0 <= s1.active_touched <= ESX_SAMPLE_PAGES
    assert s1.resident_bytes == pair.ram.resident_bytes() == b.host_resident_bytes()
    # the report is a valid wire report
    assert PressureReport.decode(r.encode()) == r
    # the working set is the guest's size minus what it could still give
    ws = working_set_pages(s1, r, Counters())
    assert ws == s1.size_pages - mi.available_pages


def test_stall_pct_covers_the_interval_since_the_previous_report() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Steady(anon_mib=8, file_mib=8))
    clock = ManualClock()
    b = SimBackend({"g": pair}, clock, report_every_s=1.0)
    b.advance(1.0)
    assert b.guests()["g"].report is not None
    pair.mem.events.stall_us += 500_000  # half a second of stall
    b.advance(1.0)  # one second (virtio ticks are 200 ms)
    r = b.guests()["g"].report
    assert r is not None and r.stall_pct >= 50.0


def test_targets_outside_the_guest_are_refused_and_counted() -> None:
    b = SimBackend({"g": make_pair("vmw", mib_to_pages(64), Steady(anon_mib=2, file_mib=2))},
                   ManualClock())
    assert not b.set_target("g", mib_to_pages(64) + 1)
    assert not b.set_target("nobody", 1)
    assert b.counters["set_target_refused"] == 2
    with pytest.raises(UsageError):
        SimBackend({}, ManualClock(), report_every_s=0.0)
    with pytest.raises(UsageError):
        b.clock.advance(-1.0)


# ---------------------------------------------------------------------- sleeping guests
def _world(sleep: bool, protocol: str, seed: int) -> tuple[SimBackend, Engine]:
    rng = random.Random(seed)
    workloads = [Idle(anon_mib=8, file_mib=4), Toucher(low_mib=4, high_mib=40, period_s=45),
                 Bursts(base_mib=8, spike_mib=40, every_s=40, seed=seed),
                 Diurnal(low_mib=8, high_mib=48, period_s=300, seed=seed, step_mib=4)]
    pairs = {f"g{i}": make_pair(protocol, mib_to_pages(64 + 32 * rng.randrange(3)), w)
             for i, w in enumerate(workloads)}
    clock = ManualClock()
    b = SimBackend(pairs, clock, report_every_s=2.0, sleep=sleep)
    core = ManagerCore(DefaultPolicy(), {}, sum(p.mem.total_pages for p in pairs.values()) // 2)
    return b, Engine(b, core, Journal(None), clock)


@pytest.mark.parametrize("protocol", ["vmw", "vmw-batched", "virtio"])
def test_sleeping_guests_end_where_ticking_guests_end(protocol: str) -> None:
    # the same engine, policy and guests with and without sleeping: the same decisions and
    # exactly the same guests at the end, for a fraction of the ticks
    runs = []
    for sleep in (False, True):
        b, e = _world(sleep, protocol, seed=3)
        decisions = []
        for _ in range(240):
            b.advance(1.0)
            decisions.extend((a.guest, a.new_pages) for a in e.step())
        runs.append((b, decisions))
    (ticking, d1), (sleeping, d2) = runs
    assert d1 == d2 and d1
    sleeping.sync()
    for name, pair in ticking.pairs.items():
        assert state_diff(state_of(pair), state_of(sleeping.pair(name))) == [], name
    assert sleeping.counters["sim_idle_periods"] > 0
    assert sleeping.counters["sim_ticks"] < ticking.counters["sim_ticks"]
    assert sleeping.violations() == []


@settings(max_examples=6, deadline=None)
@given(protocol=st.sampled_from(["vmw", "vmw-batched", "virtio"]),
       seed=st.integers(0, 10_000), sample=st.booleans())
def test_a_sleeping_guest_repeats_the_report_its_state_makes(
        protocol: str, seed: int, sample: bool) -> None:
    # every report, repeated from the last one (nothing ran on the guest) or not, is the
    # report the guest's model and driver make at that moment; and reports were repeated
    b, e = _world(True, protocol, seed)
    b.rng = random.Random(seed) if sample else None
    pairs = b.pairs  # held from here on: asking the backend would mark them changed
    seen: list[PressureReport] = []

    def sink(name: str, r: PressureReport) -> None:
        p = pairs[name]
        assert r == guest_report(name, r.time_s, p.mem, p.driver, stall_pct=r.stall_pct,
                                 active_sampled=r.active_sampled,
                                 active_touched=r.active_touched)
        assert r.stall_pct == 0.0 or r.stall_us > 0
        seen.append(r)

    b.on_report = sink
    repeated = 0
    original = sim_backend.report_unchanged

    def counting(*args: object, **kw: object) -> PressureReport:
        nonlocal repeated
        repeated += 1
        return original(*args, **kw)  # type: ignore[arg-type]

    sim_backend.report_unchanged = counting  # type: ignore[assignment]
    try:
        for step in range(150):
            b.advance(1.0)
            e.step()
            if step == 100:
                b.kill("g2")
    finally:
        sim_backend.report_unchanged = original
    assert len(seen) == 4 * 50 + 3 * 25  # every live guest, every 2 s
    assert 0 < repeated < len(seen)


@settings(max_examples=6, deadline=None)
@given(protocol=st.sampled_from(["vmw", "vmw-batched", "virtio"]), seed=st.integers(0, 10_000))
def test_a_tick_handed_the_demand_its_quiet_check_asked_ends_where_asking_again_ends(
        protocol: str, seed: int) -> None:
    # ``_next_tick`` asks the workload's demand at the next tick and that tick is handed it
    # (a busy guest asks once a period, not twice): exactly the state of ticks that ask again
    ends, handed = [], 0
    real = Pair.tick

    def asking(self: Pair, *, check: bool = True, demand: Demand | None = None) -> None:
        real(self, check=check)

    def counting(self: Pair, *, check: bool = True, demand: Demand | None = None) -> None:
        nonlocal handed
        handed += demand is not None
        real(self, check=check, demand=demand)

    for tick in (counting, asking):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Pair, "tick", tick)
            b, e = _world(True, protocol, seed)
            busy = make_pair(protocol, mib_to_pages(64),
                             Steady(anon_mib=20, file_mib=40, cold_access_per_s=0.2))
            b = SimBackend({**b.pairs, "busy": busy}, b.clock, report_every_s=2.0)
            e = Engine(b, ManagerCore(DefaultPolicy(), {}, mib_to_pages(200)), Journal(None),
                       b.clock)
            for _ in range(90):
                b.advance(1.0)
                e.step()
            b.sync()
            ends.append({n: state_of(p) for n, p in b.pairs.items()})
    assert state_diff(ends[0], ends[1]) == []
    assert handed > 90  # the busy guest's ticks at least


def test_a_host_short_of_memory_kills_the_largest_guest() -> None:
    pairs = {"big": make_pair("vmw", mib_to_pages(64), Steady(anon_mib=40, file_mib=4)),
             "small": make_pair("vmw", mib_to_pages(64), Steady(anon_mib=8, file_mib=4))}
    clock = ManualClock()
    used = {"now": 0}
    b = SimBackend(pairs, clock, host_bytes=100 * MIB, host_usage=lambda t: used["now"])
    b.advance(2.0)
    probe = b.probe().read()
    assert probe.total_bytes == 100 * MIB
    assert probe.available_bytes == 100 * MIB - b.host_resident_bytes()
    assert b.alive("big") and b.alive("small")
    used["now"] = 60 * MIB  # a host job takes memory: the guests no longer fit
    b.advance(1.0)
    assert not b.alive("big") and b.alive("small") and b.host_oom_kills == 1
    assert b.counters["host_oom_kills"] == 1
    s = b.guests()["big"]
    assert not s.alive and s.resident_bytes == 0
    assert b.host_resident_bytes() == b.guests()["small"].resident_bytes
    assert not b.set_target("big", 10)  # the dead are not asked
    before = pairs["big"].cycles
    b.advance(5.0)
    assert pairs["big"].cycles == before  # and never run again
    with pytest.raises(UsageError):
        SimBackend({}, ManualClock()).probe()


@pytest.mark.parametrize("protocol, at_once", [("virtio", True), ("vmw-batched", True),
                                               ("vmw", False)])
def test_a_signalled_target_runs_the_driver_at_once(protocol: str, at_once: bool) -> None:
    # virtio's config interrupt and the batched VMware doorbell run the driver's work at the
    # moment of the target, before the workload's next period (as the local guest process
    # does); the legacy VMware driver finds the target at its next 1 s timer
    pair = make_pair(protocol, mib_to_pages(256), Steady(anon_mib=16, file_mib=8),
                     period_s=1.0)
    b = SimBackend({"g": pair}, ManualClock())
    b.advance(3.0)
    target = mib_to_pages(64)
    assert b.set_target("g", target)
    assert pair.driver.balloon_pages == 0  # nothing runs inside the manager's step
    steps: list[int] = []
    real_step = pair.mem.step

    def step(*args, **kw):  # type: ignore[no-untyped-def]
        steps.append(pair.driver.balloon_pages)
        return real_step(*args, **kw)

    pair.mem.step = step  # type: ignore[method-assign]
    b.advance(1.0)
    assert steps, "the workload ran a period"
    assert (steps[0] > 0) is at_once  # the balloon had moved before the workload's period
    assert b.counters["sim_signalled_work"] == (1 if at_once else 0)
    b.advance(10.0)
    assert pair.driver.balloon_pages == target and b.violations() == []


@pytest.mark.parametrize("protocol", ["vmw", "virtio"])
def test_samples_are_rebuilt_only_for_guests_that_changed(protocol: str) -> None:
    b, e = _world(True, protocol, seed=5)
    for step in range(60):
        b.advance(1.0)
        e.step()
        samples = b.guests()
        assert list(samples) == list(b.pairs)  # the guests' order
        assert e.guests is not samples  # every call hands out a mapping of its own
        balloons, resident = b.sample_figures(samples) or (None, None)
        assert balloons is not None and resident is not None
        assert balloons.tolist() == [s.balloon_pages if s.alive else 0 for s in samples.values()]
        assert resident.tolist() == [s.resident_bytes or 0 for s in samples.values()]
        assert b.sample_figures(e.guests) is None  # figures of the last samples only
        for name, s in samples.items():
            if not s.alive:
                continue
            g = b.pair(name)
            assert s.balloon_pages == g.device.actual_pages
            assert s.target_pages == g.device.target_pages
            assert s.resident_bytes == g.ram.resident_bytes()
        again = b.guests()
        assert all(again[n] is samples[n] for n in samples)  # nothing changed: the same samples
        if step == 30:
            b.kill("g1")
            dead = b.guests()["g1"]
            assert not dead.alive and dead.balloon_pages == 0 and dead.resident_bytes == 0


@settings(max_examples=8, deadline=None)
@given(protocol=st.sampled_from(["vmw", "vmw-batched", "virtio"]),
       seed=st.integers(0, 10_000), sample=st.booleans(), kill_at=st.integers(0, 120),
       every=st.sampled_from([1.0, 2.0, 3.0]))
def test_quick_reports_and_samples_are_exactly_those_read_from_the_pairs(
        protocol: str, seed: int, sample: bool, kill_at: int, every: float) -> None:
    # a sleeping guest's report and sample repeated from its last ones (``quick_reports``)
    # against the reference that builds every report and sample from the pair: the same
    # reports, samples (new objects for the same guests), decisions and guests at the end
    runs = []
    for quick in (True, False):
        b, e = _world(True, protocol, seed)
        b.quick_reports = quick
        b.report_every_s = every
        b.rng = random.Random(seed) if sample else None
        reports: list[tuple[str, PressureReport]] = []
        b.on_report = lambda name, r, seen=reports: seen.append((name, r))
        steps = []
        last: dict[str, object] = {}
        for step in range(120):
            b.advance(0.5 if step % 7 == 3 else 1.0)
            decisions = [(a.guest, a.new_pages) for a in e.step()]
            samples = b.guests()
            new = sorted(n for n, s in samples.items() if last.get(n) is not s)
            last = dict(samples)
            steps.append((decisions, dict(samples), new, b.sample_figures(samples)))
            if step == kill_at:
                b.kill("g3")
        runs.append((b, steps, reports))
    (qb, qsteps, qreports), (rb, rsteps, rreports) = runs
    assert any(g.base is not None for g in qb._guests)  # repeated (the idle guest's at least)
    assert not any(g.base is not None for g in rb._guests)
    assert qreports == rreports
    for (qd, qs, qn, qf), (rd, rs, rn, rf) in zip(qsteps, rsteps, strict=True):
        assert (qd, qs, qn) == (rd, rs, rn)
        assert qf is not None and rf is not None
        assert qf[0].tolist() == rf[0].tolist() and qf[1].tolist() == rf[1].tolist()
    assert qb.counters.as_dict() == rb.counters.as_dict()
    qb.sync()
    rb.sync()
    assert state_diff({n: state_of(p) for n, p in qb.pairs.items()},
                      {n: state_of(p) for n, p in rb.pairs.items()}) == []


def _twins() -> tuple[SimBackend, SimBackend]:
    def one() -> SimBackend:
        pairs = {"web": make_pair("vmw-batched", mib_to_pages(128),
                                  Steady(anon_mib=32, file_mib=16)),
                 "idle": make_pair("virtio", mib_to_pages(64), Idle(anon_mib=8, file_mib=4))}
        return SimBackend(pairs, ManualClock())
    return one(), one()


def test_changed_rows_carry_what_guests_builds_for_the_same_guests() -> None:
    # a ``ReportRow`` (only the report new) read with the guest's last ``SampleRow``
    a, b = _twins()
    names = list(a.guests())
    rows = b.changed_rows()
    assert [r[0] for r in rows] == [0, 1]  # every guest at first
    last = {r[0]: r for r in rows}
    reports: dict[int, PressureReport | None] = {}
    repeated = shipped = 0
    for step in range(24):  # half a report period a step: a row between two rounds too
        if step == 4:
            assert a.set_target("web", 1000) and b.set_target("web", 1000)
        a.advance(0.5)
        b.advance(0.5)
        stale = {g.index for g in a._stale}  # rebuilt at the next guests()
        samples = a.guests()
        rows = b.changed_rows(fields=step % 4 < 2)
        assert {r[0] for r in rows} == stale
        for row in rows:
            i = row[0]
            s = samples[names[i]]
            if len(row) == 8:
                _, ram, balloon, target, fields, report_time, alive, resident = row
                if fields == ():  # the report of the guest's last row
                    shipped += 1
                    rep = reports[i]
                else:
                    rep = fields if isinstance(fields, PressureReport) or fields is None \
                        else PressureReport(names[i], *fields)
                last[i] = row
            else:
                repeated += 1
                _, ram, balloon, target, _, _, alive, resident = last[i]
                report_time, prev = row[1], reports[i]  # the report of the rows before
                assert prev is not None
                rep = row[2] if len(row) == 3 else report_unchanged(
                    prev, row[2], stall_pct=row[3], active_sampled=row[4],
                    active_touched=row[5])
            reports[i] = rep
            assert (ram, balloon, target, report_time, alive, resident) == (
                s.ram_pages, s.balloon_pages, s.target_pages, s.report_time, s.alive,
                s.resident_bytes)
            assert rep == s.report
    assert repeated > 0  # the idle guest's reports, at least
    assert shipped > 0  # the busy guest's ticks between two report rounds
    assert b.changed_rows() == []  # nothing changed since


def test_the_run_reads_checks_and_oom_kills_by_guest() -> None:
    a, _ = _twins()
    a.advance(3.0)
    assert a.check_guest("web") == []
    assert a.guest_violations(full=True) == [[], []]
    assert a.violations() == []
    assert a.guest_oom_kills() == [0, 0]
    a.pair("idle").violations.append("made up")
    assert a.guest_violations(full=False) == [[], ["made up"]]
    assert a.violations(full=False) == ["idle: made up"]


def test_the_host_kills_the_guest_holding_the_most_the_name_breaking_ties() -> None:
    assert host_oom_victim([(5, "a"), (9, "b"), (9, "c"), (1, "d")]) == "c"
    assert host_oom_victim([(0, "a"), (0, "b")]) is None
    assert host_oom_victim([]) is None


def test_host_usage_at_a_moment_is_never_negative() -> None:
    assert usage_at(None, 3.0) == 0
    assert usage_at(lambda t: int(t * 10), 3.0) == 30
    assert usage_at(lambda t: -5, 3.0) == 0
