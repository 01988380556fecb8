import math

from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.report import guest_report, refused_pages, report_unchanged
from memballoon.guest.workload import Steady
from memballoon.harness.pair import make_pair, virtio_pair, vmw_pair
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.protocol.pressure import PressureReport


def test_a_report_carries_the_guest_and_its_balloon_and_round_trips() -> None:
    pair = make_pair("vmw", mib_to_pages(64), Steady(anon_mib=16, file_mib=4))
    pair.set_target(1000)
    pair.tick()
    r = guest_report("g", pair.now, pair.mem, pair.driver, stall_pct=250.0,
                     active_sampled=100, active_touched=7)
    mi = pair.mem.meminfo()
    assert r.total_bytes == mi.total_pages * PAGE_SIZE
    assert r.anon_bytes == mi.anon_pages * PAGE_SIZE
    assert r.free_bytes == mi.free_pages * PAGE_SIZE
    assert r.available_bytes == mi.available_pages * PAGE_SIZE > 0
    assert r.cache_bytes == mi.cache_pages * PAGE_SIZE > 0
    assert r.balloon_bytes == mi.balloon_pages * PAGE_SIZE
    ev = pair.mem.events
    assert (r.swap_in_pages, r.swap_out_pages, r.major_faults, r.oom_kills, r.stall_us) == (
        ev.swap_in, ev.swap_out, ev.major_faults, ev.oom_kills, ev.stall_us)
    assert r.balloon_target_pages == pair.driver.target_pages == 1000
    assert r.guest == "g" and r.time_s == pair.now
    assert r.balloon_actual_pages == pair.driver.balloon_pages == 1000
    assert r.stall_pct == 100.0  # clamped to what PSI can say
    assert r.refused_pages == 0  # the seed's errAlloc
    assert (r.active_sampled, r.active_touched) == (100, 7)
    assert PressureReport.decode(r.encode()) == r


def test_a_report_of_an_unchanged_guest_is_the_report_its_state_makes() -> None:
    for protocol in ("vmw", "virtio"):
        pair = make_pair(protocol, mib_to_pages(64), Steady(anon_mib=16, file_mib=4))
        pair.set_target(1000)
        for _ in range(10):
            pair.tick()
        prev = guest_report("g", pair.now, pair.mem, pair.driver, stall_pct=3.0)
        again = report_unchanged(prev, pair.now + 2.0, stall_pct=-1.0, active_sampled=100,
                                 active_touched=9)
        assert again == guest_report("g", pair.now + 2.0, pair.mem, pair.driver,
                                     stall_pct=-1.0, active_sampled=100, active_touched=9)
        assert again.time_s == pair.now + 2.0 and again.stall_pct == 0.0  # clamped
        assert again.balloon_actual_pages == 1000 and again != prev


def test_refused_pages_by_driver_kind() -> None:
    assert refused_pages(make_pair("virtio", mib_to_pages(64), Steady()).driver) == 0
    assert refused_pages(make_pair("vmw-batched", mib_to_pages(64), Steady()).driver) == 0


def test_refused_2m_pages_count_as_their_frames() -> None:
    import numpy as np

    from memballoon.host.vmw_device import VmwBalloonDevice

    pair = make_pair("vmw-batched", mib_to_pages(64), Steady(anon_mib=4, file_mib=0))
    dev = pair.device
    assert isinstance(dev, VmwBalloonDevice)
    pair.tick()  # the workload takes its memory first
    whole = np.flatnonzero(pair.mem.state.reshape(-1, 512).max(axis=1) == 0)  # all-free blocks
    dev.set_pinned([int(whole[0]) * 512 + 5])  # one pinned frame: that 2 MiB page is refused
    pair.set_target(mib_to_pages(16))
    pair.tick()
    st = pair.driver.stats()
    assert st["err2mAlloc"] >= 1
    assert refused_pages(pair.driver) == st["errAlloc"] + 512 * st["err2mAlloc"]


def test_refused_pages_read_directly_agree_with_the_drivers_statistics() -> None:
    vmw, batched, virtio = (vmw_pair(mib_to_pages(64)),
                            vmw_pair(mib_to_pages(64), batched=True),
                            virtio_pair(mib_to_pages(64)))
    vmw.device.set_pinned(range(4000, 4100))
    batched.device.set_pinned(range(8000, 8600))
    virtio.device.pin(range(4000, 4100))
    for pair in (vmw, batched, virtio):
        pair.set_target(mib_to_pages(40))
        pair.run_until(lambda p: False, 3)
        st = pair.driver.stats()
        want = (st["errAlloc"] + (st.get("err2mAlloc", 0) << 9) if "errAlloc" in st
                else st["refused_pages"])
        assert refused_pages(pair.driver) == want and want > 0


@settings(max_examples=300, deadline=None)
@given(stall=st.floats(allow_nan=True, allow_infinity=True)
       | st.sampled_from([0.0, -0.0, 100.0, 99.99999999999999, 1e-300, math.nan]))
def test_the_stall_share_is_clamped_exactly_as_min_max_clamps_it(stall: float) -> None:
    # the reports clamp without calling min and max: the same float, to the sign of a zero
    pair = make_pair("virtio", mib_to_pages(64), Steady(anon_mib=4, file_mib=0))
    want = min(100.0, max(0.0, stall))
    r = guest_report("g", 1.0, pair.mem, pair.driver, stall_pct=stall)
    again = report_unchanged(r, 2.0, stall_pct=stall)
    for got in (r.stall_pct, again.stall_pct):
        assert repr(got) == repr(want) and math.copysign(1.0, got) == math.copysign(1.0, want)
