"""bench reclaim on a small guest: real memory, measured from st_blocks."""

from collections.abc import Callable

import pytest

from memballoon.bench.reclaim import run_reclaim
from memballoon.host.hugepages import SYSFS, THP_SHMEM, read_thp_shmem
from memballoon.model.errors import HostResourceError
from memballoon.model.units import MIB, RamKind


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
    assert r["virtio_array_pfns"] == (256 if protocol == "virtio" else None)  # Linux's arrays


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


HugeHost = Callable[[RamKind, int], None]  # the huge_host fixture (conftest.py)


@pytest.mark.parametrize("protocol", ["virtio", "vmw-batched"])
@pytest.mark.parametrize("ram", [RamKind.THP, RamKind.HUGETLB])
def test_huge_page_ram_releases_whole_pages_measured_from_st_blocks(
        huge_host: HugeHost, protocol: str, ram: RamKind) -> None:
    huge_host(ram, 128)
    r = run_reclaim(protocol, 256, ram=str(ram))
    assert r["ram"] == str(ram) and r["lost_pages"] == 0
    assert r["virtio_array_pfns"] == (8192 if protocol == "virtio" else None)
    assert r["host_released_bytes"] == 128 * MIB  # whole 2 MiB pages, all of them
    assert r["partial_huge_pages"] == 0  # the drivers ballooned whole blocks
    assert r["raw_punch_hole_gib_per_s"] > 0 and r["ratio"] > 0
    if ram is RamKind.THP:
        assert r["thp_backed_bytes"] >= 64 * MIB  # the RAM really came in huge pages


def test_a_host_not_set_up_is_told_what_to_set_or_set_up_for_the_run(
        huge_host: HugeHost) -> None:
    knob = SYSFS / THP_SHMEM
    before = read_thp_shmem().top
    knob.write_text("never")  # as on a fresh machine (the fixture's lock keeps others out)
    try:
        with pytest.raises(HostResourceError, match=f"echo advise > {knob}"):
            run_reclaim("vmw-batched", 128, ram="thp")
        r = run_reclaim("vmw-batched", 128, ram="thp", setup_hugepages=True)
        assert r["host_released_bytes"] == 64 * MIB and r["thp_backed_bytes"] > 0
        assert "[never]" in knob.read_text()  # put back
    finally:
        knob.write_text(before)


def test_huge_page_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="ram"):
        run_reclaim("virtio", 256, ram="1g")
    with pytest.raises(ValueError, match="multiple of 4"):
        run_reclaim("virtio", 258, ram="thp")
    with pytest.raises(ValueError, match="array-pfns"):
        run_reclaim("vmw-batched", 256, array_pfns=512)
    with pytest.raises(ValueError, match="array-pfns"):
        run_reclaim("virtio", 256, array_pfns=1 << 20)


def test_virtio_arrays_of_another_length_when_asked() -> None:
    r = run_reclaim("virtio", 128, array_pfns=1024)
    assert r["virtio_array_pfns"] == 1024 and r["host_released_bytes"] == 64 * MIB
    assert r["device_counters"]["inflate_buffers"] == 16 and r["lost_pages"] == 0
