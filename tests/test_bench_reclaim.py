"""bench reclaim on a small guest: real memory, measured from st_blocks."""

import pytest

from memballoon.bench.reclaim import run_reclaim
from memballoon.model.units import MIB


@pytest.mark.parametrize("protocol", ["virtio", "vmw-batched"])
def test_reclaim_releases_half_the_guest_and_loses_nothing(protocol: str) -> None:
    r = run_reclaim(protocol, 256)
    assert r["balloon_bytes"] == 128 * MIB
    assert r["host_released_bytes"] == 128 * MIB  # st_blocks went down by exactly that
    assert r["resident_after_refault_bytes"] >= r["resident_before_bytes"] - 16 * MIB
    assert r["lost_pages"] == 0
    for k in ("seconds", "gib_per_s", "deflate_gib_per_s", "refault_gib_per_s",
              "raw_punch_hole_gib_per_s", "ratio"):
        assert r[k] > 0
    assert r["ratio"] == pytest.approx(r["gib_per_s"] / r["raw_punch_hole_gib_per_s"], rel=0.01)


def test_legacy_vmware_moves_the_seed_cap_per_cycle() -> None:
    r = run_reclaim("vmw", 160)  # 20480 pages to move: one full cycle of 16385, then the rest
    assert r["host_released_bytes"] == 80 * MIB
    assert r["device_counters"]["cmd_lock"] == 20480
    assert r["lost_pages"] == 0


def test_repeat_reports_the_median_run_and_every_run() -> None:
    r = run_reclaim("vmw-batched", 128, repeat=3)
    assert r["repeat"] == 3 and len(r["runs"]) == 3
    ratios = sorted(x["ratio"] for x in r["runs"])
    assert r["ratio"] == ratios[1] and r["lost_pages"] == 0
    assert r["host_released_bytes"] == 64 * MIB


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="protocol"):
        run_reclaim("xen", 256)
    with pytest.raises(ValueError, match="guest-mib"):
        run_reclaim("virtio", 64)
    with pytest.raises(ValueError, match="repeat"):
        run_reclaim("virtio", 128, repeat=0)
