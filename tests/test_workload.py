import pytest

from memballoon.guest.workload import WORKLOADS, Bursty, Demand, Ramp, make_workload
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
