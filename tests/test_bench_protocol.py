import pytest

from memballoon.bench.protocol import run_single
from memballoon.guest.vmw_driver import VMW_BALLOON_NOSLEEP_ALLOC_MAX


def test_seed_protocol_takes_exactly_eight_cycles_for_512_of_1024_mib() -> None:
    r = run_single("vmw", 1024, 512)
    assert r["cycles"] == 8  # 131072 pages at 16385 pages a cycle
    assert r["balloon_pages"] == r["target_pages"] == 131072
    assert r["invariant_violations"] == 0
    assert r["simulated_seconds"] == 8.0
    assert r["driver_stats"]["lock"] == 131072
    assert VMW_BALLOON_NOSLEEP_ALLOC_MAX == 16384


@pytest.mark.parametrize("protocol", ["vmw-batched", "virtio"])
def test_batched_protocols_reach_the_target_of_an_idle_guest_in_one_period(
        protocol: str) -> None:
    r = run_single(protocol, 512, 256)
    assert r["balloon_pages"] == r["target_pages"]
    assert r["cycles"] == 1
    assert r["invariant_violations"] == 0
    assert r["pages_per_wall_second"] > 0


def test_a_busy_guest_slows_the_vmware_driver_to_sleeping_allocations() -> None:
    # the seed: once non-sleeping allocation fails, the cycle goes on at rate_alloc
    r = run_single("vmw-batched", 512, 256, workload="busy")
    assert r["balloon_pages"] == r["target_pages"]
    assert r["cycles"] > 1
    assert r["driver_stats"]["primNoSleepAllocFailed"] > 0
    assert r["driver_stats"]["primCanSleepAlloc"] > 0
    assert r["invariant_violations"] == 0


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="balloon-mib"):
        run_single("virtio", 256, 256)
    with pytest.raises(ValueError, match="unknown protocol"):
        run_single("xen", 256, 10)
