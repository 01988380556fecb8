"""MemfdRam: real memory, really released (st_blocks is the truth), stamps that catch loss."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.host.hugepages import read_hugetlb_pool, shmem_huge_bytes
from memballoon.host.memfd import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    STAMP_COLUMNS,
    MemfdRam,
    punch_hole,
)
from memballoon.host.ram import RamBackend
from memballoon.model.counters import Counters
from memballoon.model.errors import (
    ConfigError,
    GuestAddressError,
    HostResourceError,
    PeerError,
    UsageError,
)
from memballoon.model.pages import PageStore, coalesce
from memballoon.model.units import HPAGE_PMD_NR, HPAGE_PMD_SIZE, MIB, PAGE_SIZE, RamKind

PAGES = 4096  # 16 MiB
HugeHost = Callable[[RamKind, int], None]  # the huge_host fixture (conftest.py)


@pytest.fixture
def ram() -> Iterator[MemfdRam]:
    with MemfdRam(PAGES, name="test-memfd") as r:
        yield r


def rng(*pairs: tuple[int, int]) -> np.ndarray:
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def test_constants_are_the_kernel_values() -> None:
    # include/uapi/linux/falloc.h
    assert FALLOC_FL_KEEP_SIZE == 0x01
    assert FALLOC_FL_PUNCH_HOLE == 0x02
    assert STAMP_COLUMNS.tolist() == [0, 1, 2, 509, 510, 511]


def test_it_is_both_a_ram_backend_and_a_page_store(ram: MemfdRam) -> None:
    backend: RamBackend = ram
    store: PageStore = ram
    assert backend.guest_pages == PAGES
    assert store.verify(np.arange(PAGES, dtype=np.int64)) == 0


def test_fresh_ram_holds_nothing_and_has_the_guest_size(ram: MemfdRam) -> None:
    assert ram.resident_bytes() == 0
    assert os.fstat(ram.fd).st_size == PAGES * PAGE_SIZE == ram.size_bytes
    assert len(ram.mapping) == PAGES * PAGE_SIZE


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        MemfdRam(0)


def test_touched_pages_are_resident(ram: MemfdRam) -> None:
    ram.touch(np.arange(100, 356, dtype=np.int64), 1)
    assert ram.resident_bytes() == 256 * PAGE_SIZE
    ram.touch(np.arange(100, 356, dtype=np.int64), 2)  # touching again costs nothing more
    assert ram.resident_bytes() == 256 * PAGE_SIZE


def test_release_lowers_st_blocks_by_the_released_amount(ram: MemfdRam) -> None:
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    assert ram.resident_bytes() == PAGES * PAGE_SIZE
    ranges = rng((0, 256), (1000, 1001), (2048, 4096))
    assert ram.release(ranges) == 256 + 1 + 2048
    assert ram.resident_bytes() == (PAGES - 256 - 1 - 2048) * PAGE_SIZE
    assert ram.released_pages_total == 2305
    assert ram.release_calls_total == 3  # one fallocate per range
    assert os.fstat(ram.fd).st_size == PAGES * PAGE_SIZE  # KEEP_SIZE


def test_released_pages_read_back_zeros_and_verify_catches_them(ram: MemfdRam) -> None:
    used = np.arange(1000, dtype=np.int64)
    ram.touch(used, 7)
    assert ram.verify(used) == 0
    ram.release(rng((500, 510)))  # punched while the guest still uses them
    off = 500 * PAGE_SIZE
    assert bytes(ram.mapping[off : off + 10 * PAGE_SIZE]) == bytes(10 * PAGE_SIZE)
    assert ram.verify(used) == 10
    assert ram.stamped_generations(np.arange(498, 512)).tolist() == [7, 7] + [-1] * 10 + [7, 7]


def test_release_of_untouched_pages_is_harmless(ram: MemfdRam) -> None:
    assert ram.release(rng((0, PAGES))) == PAGES
    assert ram.resident_bytes() == 0


def test_readmit_does_not_repopulate(ram: MemfdRam) -> None:
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    ram.release(rng((0, 2048)))
    before = ram.resident_bytes()
    assert ram.readmit(rng((0, 2048))) == 2048
    assert ram.resident_bytes() == before == 2048 * PAGE_SIZE
    # The page comes back when the guest touches it, with fresh content.
    ram.touch(np.arange(0, 16, dtype=np.int64), 2)
    assert ram.resident_bytes() == before + 16 * PAGE_SIZE
    assert ram.verify(np.arange(0, 16, dtype=np.int64)) == 0


@pytest.mark.parametrize(
    "bad",
    [
        rng((10, 20), (4000, PAGES + 1)),  # one good range, one past the end
        rng((-1, 5)),
        rng((30, 30)),  # empty
        rng((40, 35)),  # inverted
        np.array([10, 20], dtype=np.int64),  # not (k, 2)
        np.array([[10.0, 20.0]]),  # not integers
        rng((0, 2**40)),
    ],
)
def test_ranges_outside_the_guest_raise_and_release_nothing(ram: MemfdRam, bad: np.ndarray) -> None:
    ram.touch(np.arange(PAGES, dtype=np.int64), 3)
    with pytest.raises(GuestAddressError):
        ram.release(bad)
    with pytest.raises(GuestAddressError):
        ram.readmit(bad)
    assert ram.resident_bytes() == PAGES * PAGE_SIZE
    assert ram.released_pages_total == 0
    assert ram.verify(np.arange(PAGES, dtype=np.int64)) == 0


@pytest.mark.parametrize("pfns", [[-1], [PAGES], [0, 5, PAGES + 10]])
def test_touch_and_verify_refuse_pfns_outside_the_guest(ram: MemfdRam, pfns: list[int]) -> None:
    with pytest.raises(GuestAddressError):
        ram.touch(np.array(pfns, dtype=np.int64), 1)
    assert ram.resident_bytes() == 0  # nothing written, not even the valid PFNs
    with pytest.raises(GuestAddressError):
        ram.verify(np.array(pfns, dtype=np.int64))


def test_stamp_sits_at_both_ends_and_a_torn_page_is_caught(ram: MemfdRam) -> None:
    ram.touch(np.array([3, 4], dtype=np.int64), 9)
    words = np.frombuffer(ram.mapping, dtype=np.uint64).reshape(PAGES, 512)
    assert words[3, 0] == 3 and words[3, 1] == 9
    assert words[3, 509] == 3 and words[3, 510] == 9
    assert words[3, 2] == words[3, 511] != 0
    words[4, 511] ^= np.uint64(1)  # only the tail changed
    del words
    assert ram.verify(np.array([3, 4], dtype=np.int64)) == 1


def test_pages_never_stamped_are_not_counted_lost(ram: MemfdRam) -> None:
    ram.touch(np.array([1], dtype=np.int64), 0)
    assert ram.expected_generation(1) == 0
    assert ram.expected_generation(2) is None
    assert ram.verify(np.arange(10, dtype=np.int64)) == 0


def test_an_old_generation_counts_as_lost(ram: MemfdRam) -> None:
    ram.touch(np.array([5], dtype=np.int64), 1)
    words = np.frombuffer(ram.mapping, dtype=np.uint64).reshape(PAGES, 512)
    saved = words[5].copy()
    ram.touch(np.array([5], dtype=np.int64), 2)
    words[5] = saved  # stale content: a valid stamp, of the wrong generation
    del words
    assert ram.stamped_generations([5]).tolist() == [1]
    assert ram.verify(np.array([5], dtype=np.int64)) == 1


def test_writes_through_the_mapping_are_the_same_memory(ram: MemfdRam) -> None:
    ram.mapping[PAGE_SIZE * 7 : PAGE_SIZE * 7 + 4] = b"abcd"
    assert os.pread(ram.fd, 4, PAGE_SIZE * 7) == b"abcd"
    assert ram.resident_bytes() == PAGE_SIZE


def test_the_size_is_sealed_so_a_guest_cannot_shrink_it_under_the_host(ram: MemfdRam) -> None:
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    with pytest.raises(PermissionError):
        os.ftruncate(ram.fd, PAGE_SIZE)
    with pytest.raises(PermissionError):
        os.ftruncate(ram.fd, 2 * PAGES * PAGE_SIZE)
    assert ram.verify(np.arange(PAGES, dtype=np.int64)) == 0  # and no SIGBUS here


def test_punch_hole_reports_errno() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            punch_hole(r, 0, PAGE_SIZE)
    finally:
        os.close(r)
        os.close(w)


def test_close_is_idempotent_and_then_everything_is_refused() -> None:
    r = MemfdRam(16)
    fd = r.fd
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    for call in (
        lambda: r.fd,
        lambda: r.mapping,
        r.resident_bytes,
        lambda: r.release(rng((0, 1))),
        lambda: r.touch(np.array([0], dtype=np.int64), 1),
        lambda: r.verify(np.array([0], dtype=np.int64)),
    ):
        with pytest.raises(UsageError):
            call()


def test_close_with_a_live_view_is_refused_and_keeps_the_ram_usable() -> None:
    with MemfdRam(16) as r:
        view = r.mapping[0:PAGE_SIZE]
        with pytest.raises(UsageError):
            r.close()
        r.touch(np.array([0], dtype=np.int64), 4)
        assert r.verify(np.array([0], dtype=np.int64)) == 0
        view.release()


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from memballoon.host.memfd import MemfdRam

    fd, pages = int(sys.argv[1]), int(sys.argv[2])
    with MemfdRam.attach(fd, pages) as ram:
        seen = ram.stamped_generations(np.arange(0, 100))
        ram.touch(np.arange(100, 300, dtype=np.int64), 9)
        print(int((seen == 5).sum()), ram.resident_bytes())
    """
)


def test_attach_from_another_process_shares_the_same_memory(ram: MemfdRam) -> None:
    ram.touch(np.arange(0, 100, dtype=np.int64), 5)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ram.fd), str(PAGES)],
        pass_fds=(ram.fd,),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["100", str(300 * PAGE_SIZE)]  # the guest saw the host's data
    # The guest's touches are visible to the host: in st_blocks and in the memory itself.
    assert ram.resident_bytes() == 300 * PAGE_SIZE
    assert (ram.stamped_generations(np.arange(100, 300)) == 9).all()
    # The host releases what the guest touched, and the guest's data is gone.
    ram.release(rng((100, 300)))
    assert ram.resident_bytes() == 100 * PAGE_SIZE
    assert (ram.stamped_generations(np.arange(100, 300)) == -1).all()


def test_attach_in_process_sees_the_same_pages(ram: MemfdRam) -> None:
    with MemfdRam.attach(os.dup(ram.fd), PAGES) as guest:
        guest.touch(np.arange(10, dtype=np.int64), 3)
        assert ram.resident_bytes() == 10 * PAGE_SIZE
        ram.release(rng((0, 5)))
        assert guest.verify(np.arange(10, dtype=np.int64)) == 5


def test_attach_refuses_a_file_of_the_wrong_size_or_unsealed() -> None:
    counters = Counters()
    with MemfdRam(16) as r, pytest.raises(PeerError):
        MemfdRam.attach(r.fd, 32, counters=counters)
    unsealed = os.memfd_create("unsealed")
    try:
        os.ftruncate(unsealed, 16 * PAGE_SIZE)
        with pytest.raises(PeerError):
            MemfdRam.attach(unsealed, 16, counters=counters)
    finally:
        os.close(unsealed)
    rd, wr = os.pipe()
    try:
        with pytest.raises(PeerError):
            MemfdRam.attach(rd, 16, counters=counters)
    finally:
        os.close(rd)
        os.close(wr)
    assert counters["memfd_attach_rejected"] == 3


def test_a_mebibyte_range_is_one_call_and_frees_a_mebibyte() -> None:
    pages = 4 * MIB // PAGE_SIZE
    with MemfdRam(pages) as r:
        r.touch(np.arange(pages, dtype=np.int64), 1)
        starts = np.arange(0, pages, 256, dtype=np.int64)
        r.release(np.stack((starts, starts + 256), axis=1))
        assert r.release_calls_total == 4
        assert r.resident_bytes() == 0


@settings(max_examples=40, deadline=None)
@given(
    touched=st.sets(st.integers(0, 511), max_size=200),
    released=st.sets(st.integers(0, 511), max_size=200),
)
def test_loss_and_residency_follow_exactly_what_was_released(
    touched: set[int], released: set[int]
) -> None:
    with MemfdRam(512) as r:
        t = np.array(sorted(touched), dtype=np.int64)
        r.touch(t, 1)
        r.release(coalesce(sorted(released)))
        assert r.verify(t) == len(touched & released)
        assert r.resident_bytes() == len(touched - released) * PAGE_SIZE


def test_resident_mask_follows_touch_and_release(ram: MemfdRam) -> None:
    ram.touch(np.arange(0, 64, dtype=np.int64), 1)
    ram.release(rng((10, 20)))
    mask = ram.resident_mask(np.arange(0, 70))
    assert mask.tolist() == [True] * 10 + [False] * 10 + [True] * 44 + [False] * 6
    assert ram.resident_mask([]).size == 0


def test_verify_does_not_fault_released_pages_back_in(ram: MemfdRam) -> None:
    used = np.arange(0, 512, dtype=np.int64)
    ram.touch(used, 2)
    ram.release(rng((0, 256)))
    assert ram.verify(used) == 256
    assert ram.resident_bytes() == 256 * PAGE_SIZE


def test_a_ram_that_stamps_nothing_allocates_nothing_per_page() -> None:
    # the host maps every guest's RAM but never stamps it: no 8-bytes-a-page table there
    import tracemalloc

    tracemalloc.start()
    try:
        with MemfdRam(262144) as r:  # 1 GiB
            r.release(rng((0, 1024)))
            assert r.verify(np.arange(10, dtype=np.int64)) == 0
            assert r.expected_generation(5) is None
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 256 * 1024
            r.touch(np.array([3], dtype=np.int64), 7)  # the first stamp makes the table
            assert r.expected_generation(3) == 7
            assert tracemalloc.get_traced_memory()[1] >= 262144 * 8
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- forget
def test_forget_drops_only_our_mapping_and_keeps_the_content(ram: MemfdRam) -> None:
    pfns = np.arange(0, 512, dtype=np.int64)
    ram.touch(pfns, 4)
    ram.forget(rng((0, 256), (300, 301)))
    assert ram.resident_bytes() == 512 * PAGE_SIZE  # still in the memfd
    assert ram.verify(pfns) == 0  # and read back intact through a fresh fault
    ram.forget(rng())
    with pytest.raises(GuestAddressError):
        ram.forget(rng((PAGES - 1, PAGES + 1)))


# ---------------------------------------------------------------------- huge pages
HP = HPAGE_PMD_NR


def test_huge_ram_must_be_whole_2mib_pages() -> None:
    for kind in (RamKind.THP, RamKind.HUGETLB):
        with pytest.raises(ConfigError, match="whole 2 MiB pages"):
            MemfdRam(HP + 1, kind=kind)
    assert RamKind.SMALL.host_page_frames == 1 and RamKind.THP.host_page_frames == HP


def test_thp_ram_comes_in_huge_pages_and_goes_in_whole_ones(huge_host: HugeHost) -> None:
    huge_host(RamKind.THP, 8)
    with MemfdRam(8 * HP, kind=RamKind.THP) as r:
        assert r.host_page_frames == HP and r.kind is RamKind.THP
        before = shmem_huge_bytes()
        r.touch(np.arange(8 * HP, dtype=np.int64), 1)
        assert r.resident_bytes() == 8 * HPAGE_PMD_SIZE
        assert shmem_huge_bytes() - before >= 4 * HPAGE_PMD_SIZE  # huge folios, not 4 KiB
        with pytest.raises(UsageError, match="whole 2 MiB"):
            r.release(rng((0, HP // 2)))  # would split the huge page
        assert r.resident_bytes() == 8 * HPAGE_PMD_SIZE  # refused before any punch
        assert r.release(rng((HP, 3 * HP))) == 2 * HP
        assert r.resident_bytes() == 6 * HPAGE_PMD_SIZE
        assert r.verify(np.arange(8 * HP, dtype=np.int64)) == 2 * HP
        r.forget(rng((3 * HP + 5, 5 * HP)))  # drops page 4 only
        assert r.verify(np.arange(3 * HP, 5 * HP, dtype=np.int64)) == 0


def test_hugetlb_ram_readmits_from_the_pool_at_once(huge_host: HugeHost) -> None:
    huge_host(RamKind.HUGETLB, 4)
    with MemfdRam(4 * HP, kind=RamKind.HUGETLB) as r:
        assert os.fstat(r.fd).st_blksize == HPAGE_PMD_SIZE
        r.touch(np.arange(4 * HP, dtype=np.int64), 1)
        assert r.resident_bytes() == 4 * HPAGE_PMD_SIZE
        r.release(rng((0, 2 * HP)))
        assert r.resident_bytes() == 2 * HPAGE_PMD_SIZE
        r.readmit(rng((0, HP)))  # taken from the pool now, not on the guest's next touch
        assert r.resident_bytes() == 3 * HPAGE_PMD_SIZE
        with pytest.raises(UsageError):
            r.readmit(rng((HP, HP + 1)))
        with MemfdRam.attach(os.dup(r.fd), 4 * HP, kind=RamKind.HUGETLB) as guest:
            guest.touch(np.arange(HP, dtype=np.int64), 2)
            assert r.verify(np.arange(HP, dtype=np.int64)) == HP  # host expected gen 1
            assert guest.verify(np.arange(HP, dtype=np.int64)) == 0


def test_a_dry_hugetlb_pool_is_a_host_error_naming_the_unbacked_pages(
        huge_host: HugeHost) -> None:
    huge_host(RamKind.HUGETLB, 4)
    pool = read_hugetlb_pool()
    with MemfdRam(4 * HP, kind=RamKind.HUGETLB) as r:
        r.touch(np.arange(4 * HP, dtype=np.int64), 1)
        r.release(rng((0, 4 * HP)))
        # someone else takes the pages we gave back: shrink the pool by them
        nr = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        keep = read_hugetlb_pool().total - read_hugetlb_pool().available + 1
        with open(nr, "w") as f:
            f.write(str(keep))
        try:
            with pytest.raises(HostResourceError, match="hugetlb") as exc:
                r.readmit(rng((0, 4 * HP)))
            assert len(exc.value.unbacked) >= 1
            unbacked = sum(e - s for s, e in exc.value.unbacked)
            assert unbacked == 3 * HP  # the one page left was taken, the rest named
            assert r.resident_bytes() == HPAGE_PMD_SIZE
        finally:
            with open(nr, "w") as f:
                f.write(str(pool.total))
        r.readmit(rng((0, 4 * HP)))  # memory is back
        assert r.resident_bytes() == 4 * HPAGE_PMD_SIZE


def test_a_hugetlb_guest_larger_than_the_pool_is_refused_with_what_to_set(
        huge_host: HugeHost) -> None:
    huge_host(RamKind.HUGETLB, 2)
    need = read_hugetlb_pool().available + 8
    with pytest.raises(HostResourceError, match="nr_hugepages"):
        MemfdRam(need * HP, kind=RamKind.HUGETLB)


def test_attach_refuses_ram_of_another_page_size(huge_host: HugeHost) -> None:
    huge_host(RamKind.HUGETLB, 1)
    counters = Counters()
    for ram, told in ((MemfdRam(HP, kind=RamKind.HUGETLB), RamKind.SMALL),
                      (MemfdRam(HP), RamKind.HUGETLB)):
        fd = os.dup(ram.fd)
        try:
            with pytest.raises(PeerError):
                MemfdRam.attach(fd, HP, kind=told, counters=counters)
        finally:
            os.close(fd)  # refused: still ours (a hugetlbfs file kept open keeps its pages)
            ram.close()
    assert counters["memfd_attach_rejected"] == 2
