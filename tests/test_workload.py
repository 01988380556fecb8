import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.workload import (
    NEVER_CHANGES,
    WORKLOADS,
    Bursts,
    Bursty,
    Dbench,
    Demand,
    Diurnal,
    Idle,
    Ramp,
    Steady,
    Toucher,
    Trace,
    Workload,
    make_workload,
    next_change,
)
from memballoon.model.errors import UsageError
from memballoon.model.units import mib_to_pages


def test_every_workload_is_a_pure_function_of_time() -> None:
    for kind in WORKLOADS:
        w = make_workload(kind, 1024, seed=3)
        assert [w.demand(t) for t in (0.0, 5.0, 77.0)] == [w.demand(t) for t in (0.0, 5.0, 77.0)]
        d = w.demand(10.0)
        assert d.hot_anon_pages <= d.anon_pages <= mib_to_pages(1024)


def test_ramp_grows_then_holds() -> None:
    w = Ramp(start_mib=64, peak_mib=128, mib_per_s=16)
    assert w.demand(0).anon_pages == mib_to_pages(64)
    assert w.demand(2).anon_pages == mib_to_pages(96)
    assert w.demand(100).anon_pages == mib_to_pages(128)


def test_bursts_come_and_go() -> None:
    w = Bursty(base_mib=64, peak_mib=256, period_s=10, burst_s=3, ramp_s=0, seed=1)
    sizes = {w.demand(float(t)).anon_pages for t in range(20)}
    assert sizes == {mib_to_pages(64), mib_to_pages(256)}
    ramped = Bursty(base_mib=64, peak_mib=256, period_s=10, burst_s=5, ramp_s=4, seed=1)
    seen = sorted({ramped.demand(t / 2).anon_pages for t in range(40)})
    assert seen[0] == mib_to_pages(64) and seen[-1] == mib_to_pages(256) and len(seen) > 3


def test_bad_demand_and_unknown_workload_are_refused() -> None:
    with pytest.raises(ValueError):
        Demand(anon_pages=1, hot_anon_pages=2, file_pages=0, hot_file_pages=0)
    with pytest.raises(ValueError):
        Demand(anon_pages=-1, hot_anon_pages=0, file_pages=0, hot_file_pages=0)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", 1024)


# ---------------------------------------------------------------------- next_change
TIMED: list[Workload] = [
    Idle(), Steady(), Bursty(seed=5), Bursty(ramp_s=0, seed=2),
    Ramp(start_mib=64, peak_mib=128, mib_per_s=8, start_at_s=30, stop_at_s=90),
    Diurnal(low_mib=64, high_mib=512, period_s=600, seed=4),
    Bursts(base_mib=64, spike_mib=256, every_s=120, seed=9),
    Dbench(run_s=50, pause_s=20, phase_s=7), Toucher(period_s=40),
    Trace(((0.0, 10.0, 5.0), (12.5, 40.0, 5.0), (30.0, 20.0, 0.0))),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(TIMED))), st.floats(0.0, 2000.0))
def test_demand_holds_until_its_next_change(which: int, now: float) -> None:
    # the promise a simulator relies on to let a guest sleep: nothing changes before it
    w = TIMED[which]
    t = next_change(w, now)
    assert t >= now
    d = w.demand(now)
    end = min(t, now + 3000.0)
    for k in range(1, 50):
        s = now + (end - now) * k / 50
        if s < t:
            assert w.demand(s) == d, (w.name, now, t, s)


def test_a_workload_that_does_not_say_may_change_any_moment() -> None:
    class Plain:
        name = "plain"

        def demand(self, now: float) -> Demand:
            return Demand(1, 1, 0, 0)

    assert next_change(Plain(), 7.0) == 7.0
    assert next_change(Idle(), 7.0) == NEVER_CHANGES


def test_bursts_are_short_and_repeatable() -> None:
    w = Bursts(base_mib=64, spike_mib=256, every_s=300, seed=1)
    w.demand(200_000.0)  # draws the schedule that far
    lengths = [end - start for start, end, _ in w._spikes]
    assert len(lengths) > 100
    assert sum(length < 120 for length in lengths) / len(lengths) > 0.75  # most under 2 min
    again = Bursts(base_mib=64, spike_mib=256, every_s=300, seed=1)
    assert [again.demand(t) for t in range(0, 5000, 7)] == [w.demand(t) for t in range(0, 5000, 7)]
    assert {w.demand(t).anon_pages for t in range(0, 5000, 7)} != {mib_to_pages(64)}


def test_toucher_dbench_and_trace_follow_their_schedules() -> None:
    t = Toucher(low_mib=50, high_mib=250, period_s=100)
    assert t.demand(10).anon_pages == t.demand(10).hot_anon_pages == mib_to_pages(50)
    assert t.demand(150).anon_pages == mib_to_pages(250)
    d = Dbench(anon_mib=32, file_mib=256, run_s=60, pause_s=30)
    assert d.demand(10).hot_file_pages > 0 and d.demand(70).hot_file_pages == 0
    tr = Trace(((5.0, 10.0, 1.0), (20.0, 30.0, 2.0)))
    assert tr.demand(0).anon_pages == tr.demand(19.9).anon_pages == mib_to_pages(10)
    assert tr.demand(20).file_pages == mib_to_pages(2)
    assert tr.next_change(3.0) == 5.0 and tr.next_change(20.0) == NEVER_CHANGES


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(UsageError, match="increase"):
        Trace(((0.0, 1.0, 1.0), (0.0, 2.0, 2.0)))
    with pytest.raises(UsageError, match="no rows"):
        Trace(())
    with pytest.raises(UsageError):
        Bursts(every_s=0)
    with pytest.raises(UsageError):
        Toucher(period_s=0)


def test_a_spike_grows_over_its_ramp() -> None:
    w = Bursts(base_mib=64, spike_mib=256, every_s=100, ramp_s=10, seed=3)
    w.demand(0.0)  # draws the first spike
    start, end, extra = w._spikes[0]
    assert end - start > 12  # this seed's first spike outlasts its ramp
    sizes = [w.demand(start + s).anon_pages for s in range(0, 12)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] == mib_to_pages(64 + extra)
    assert w.next_change(start + 1) == start + 1  # growing: any moment


def test_steady_workloads_hand_back_one_demand_built_from_their_sizes() -> None:
    w = Steady(anon_mib=100, file_mib=40, hot=0.5, cold_access_per_s=0.02)
    d = w.demand(0.0)
    assert d == Demand(25600, 12800, 10240, 5120, 0.02)
    assert w.demand(3600.0) is d  # the same object: the guest model's quiet check is `is`
    assert Idle(anon_mib=8, file_mib=4).demand(1.0) == Demand(2048, 204, 1024, 102, 0.0)
    assert Steady(anon_mib=100) == Steady(anon_mib=100)  # the built demand is no field


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 20_000), st.integers(0, 10_000))
def test_demands_sized_in_mib_are_built_from_their_pages(now: float, seed: int) -> None:
    # Diurnal, Bursts and Toucher ask one cached call of their sizes in MiB: the demand the
    # sizes in pages build (the reference: mib_to_pages of each, then the demand)
    def built(anon_mib: float, file_mib: float, hot: float, cold: float) -> Demand:
        anon, file = mib_to_pages(anon_mib), mib_to_pages(file_mib)
        return Demand(anon, int(anon * hot), file, int(file * hot), cold)

    d = Diurnal(low_mib=50, high_mib=333.3, file_mib=77.7, period_s=900, seed=seed)
    assert d.demand(now) == built(d._level(now) * d.step_mib, 77.7, 0.3, 0.001)
    b = Bursts(base_mib=100.5, spike_mib=300, file_mib=40, every_s=60, seed=seed)
    _, spike = b._at(now)
    extra = 0.0 if spike is None else spike[2] * min(1.0, (now - spike[0] + 1.0) / b.ramp_s)
    assert b.demand(now) == built(100.5 + extra, 40, 0.8, 0.05)
    t = Toucher(low_mib=51.2, high_mib=204.8, period_s=90)
    anon = 204.8 if int(now // 90) % 2 else 51.2
    assert t.demand(now) == built(anon, 8, 1.0, 0.0)
