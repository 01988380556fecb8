"""The pair harness: invariants over random target sequences and workloads, all protocols."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memballoon.guest.workload import Bursty, Idle, Ramp, Steady
from memballoon.harness.pair import PROTOCOLS, check_pair, make_pair
from memballoon.model.units import PageState, mib_to_pages

G = 64  # MiB: small guests keep the property tests quick
workloads = st.sampled_from([
    Idle(anon_mib=4, file_mib=2),
    Steady(anon_mib=20, file_mib=8),
    Bursty(base_mib=4, peak_mib=40, file_mib=2, period_s=6, burst_s=3, ramp_s=1),
    Ramp(start_mib=4, peak_mib=56, mib_per_s=8, file_mib=1),
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    workloads,
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, mib_to_pages(G) - 1)), max_size=8),
    st.sampled_from([0, mib_to_pages(16)]),
)
def test_invariants_hold_after_every_period(protocol: str, workload: object,
                                           targets: list[tuple[int, int]], swap: int) -> None:
    pair = make_pair(protocol, mib_to_pages(G), workload, swap_pages=swap)  # type: ignore[arg-type]
    for ticks, target in targets:
        pair.set_target(target)
        for _ in range(ticks):
            pair.tick()
    assert pair.violations == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_pair_reaches_its_target_and_the_host_holds_nothing_behind_it(protocol: str) -> None:
    pair = make_pair(protocol, mib_to_pages(256), Idle(anon_mib=16, file_mib=8))
    pair.tick()
    pair.set_target(mib_to_pages(128))
    assert pair.run_until(lambda p: p.driver.balloon_pages == mib_to_pages(128), 20)
    balloon = pair.driver.balloon_pfns()
    assert balloon.size == mib_to_pages(128)
    assert bool((pair.mem.state[balloon] == PageState.BALLOON).all())
    assert pair.ram.resident_pages_of(balloon) == 0
    assert check_pair(pair) == [] and pair.violations == []
    pair.set_target(0)
    assert pair.run_until(lambda p: p.driver.balloon_pages == 0, 20)
    assert pair.violations == []


def test_check_pair_notices_a_device_that_forgot_a_page() -> None:
    pair = make_pair("vmw-batched", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    pair.set_target(1000)
    pair.tick()
    assert check_pair(pair) == []
    pfn = int(pair.driver.balloon_pfns()[0])
    pair.device._locked[pfn] = False  # type: ignore[attr-defined]  # sabotage the host's view
    errs = check_pair(pair)
    assert any("balloons differ" in e for e in errs)


def test_check_pair_notices_a_ballooned_frame_the_host_still_holds() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    pair.set_target(1000)
    pair.tick()
    pair.ram.touch(pair.driver.balloon_pfns()[:3], 9)  # as if the host never released them
    assert any("host still holds" in e for e in check_pair(pair))


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        make_pair("xen", 65536, Idle())
    assert np.asarray(PROTOCOLS).size == 3
