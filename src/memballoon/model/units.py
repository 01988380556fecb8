"""Units: the core speaks 4 KiB pages; bytes, KiB and MiB are converted at the edge only."""

from __future__ import annotations

from enum import IntEnum, StrEnum

from memballoon.model.errors import UsageError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # bytes; both protocols use 4 KiB frames
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

#: A huge page of the host (x86-64 PMD, include/linux/huge_mm.h): 2 MiB, 512 frames.
HPAGE_PMD_ORDER = 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = HPAGE_PMD_NR * PAGE_SIZE

#: Largest frame number a 32-bit PFN field can carry (virtio u32 PFNs, VMware version-2 LOCK data).
PFN32_MAX = 0xFFFF_FFFF


class PageState(IntEnum):
    """State of one guest page frame, as the guest memory model keeps it (one byte per page)."""

    FREE = 0  # on the free lists; zero so that a fresh np.zeros array means "all free"
    ANON = 1  # anonymous memory of the workload (may be swapped out when the guest has swap)
    CACHE = 2  # page cache: clean file pages, reclaimable coldest first
    BALLOON = 3  # owned by the balloon driver (in the balloon, refused, or in flight)
    RESERVED = 4  # kernel, firmware and driver rings: never allocatable
    ISOLATED = 5  # free, but taken off the free lists while free page reporting hands it over


class RamKind(StrEnum):
    """What backs a guest's RAM on the host (``--ram``, a guest's ``ram`` in the config)."""

    SMALL = "4k"  # shmem in 4 KiB pages
    THP = "thp"  # shmem in transparent huge pages (shmem_enabled "advise", MADV_HUGEPAGE)
    HUGETLB = "hugetlb"  # hugetlbfs (MFD_HUGETLB | MFD_HUGE_2MB): 2 MiB pages from the pool

    @property
    def host_page_frames(self) -> int:
        """4 KiB frames in one host page: the smallest piece the host can give back."""
        return 1 if self is RamKind.SMALL else HPAGE_PMD_NR


def pages_to_bytes(pages: int) -> int:
    return pages << PAGE_SHIFT


def bytes_to_pages(size_bytes: int) -> int:
    """Whole pages in ``size_bytes`` (rounded down)."""
    if size_bytes < 0:
        raise UsageError(f"negative size: {size_bytes} bytes")
    return size_bytes >> PAGE_SHIFT


def mib_to_pages(mib: int | float) -> int:
    if mib < 0:
        raise UsageError(f"negative size: {mib} MiB")
    return int(mib * MIB) >> PAGE_SHIFT


def pages_to_mib(pages: int) -> float:
    return pages * PAGE_SIZE / MIB
