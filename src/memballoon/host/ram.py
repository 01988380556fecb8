"""Host RAM backends: what a balloon device does with the memory behind a guest's pages.

A device that receives page frame numbers from a guest turns them into ranges (contiguous PFNs
coalesced, so the host makes one call per range, not per page) and asks the backend to
``release`` them (give the memory back to the host) or ``readmit`` them (let the guest use them
again; the host repopulates a page only when the guest touches it, as QEMU does).

The guest's side of the same memory is ``PageStore``: the guest model calls ``touch`` when a
page gets content, so a backend that stands for real memory can write real data (the memfd
backend) and a simulated one can count resident pages (``NullRam``).

Backends are the last line of defence: every range is checked against the guest's size, and a
range outside it raises ``GuestAddressError`` before anything is released.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from memballoon.model.errors import GuestAddressError
from memballoon.model.units import PAGE_SIZE

PfnArray = npt.NDArray[np.int64]
#: ``(k, 2)`` array of half-open ``[start, end)`` PFN ranges, sorted, non-overlapping.
RangeArray = npt.NDArray[np.int64]


def as_pfns(pfns: npt.ArrayLike) -> PfnArray:
    """PFNs as a flat int64 array (no copy when already one)."""
    return np.asarray(pfns, dtype=np.int64).reshape(-1)


def coalesce(pfns: npt.ArrayLike) -> RangeArray:
    """Sorted, de-duplicated PFNs folded into half-open ``[start, end)`` ranges.

    >>> coalesce([7, 3, 4, 5, 9]).tolist()
    [[3, 6], [7, 8], [9, 10]]
    """
    p = as_pfns(pfns)
    if p.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    steps = np.diff(p)
    if bool((steps == 1).all()):  # one ascending run, the usual batch: two numpy calls
        return np.array([[p[0], p[-1] + 1]], dtype=np.int64)
    if not bool((steps > 0).all()):  # drivers send sorted runs: sort only when needed
        p = np.unique(p)
        steps = np.diff(p)
    breaks = np.flatnonzero(steps != 1) + 1
    starts = p[np.concatenate(([0], breaks))]
    ends = p[np.concatenate((breaks - 1, [p.size - 1]))] + 1
    return np.stack((starts, ends), axis=1)


def merge_ranges(starts: npt.ArrayLike, ends: npt.ArrayLike) -> RangeArray:
    """Half-open ``[start, end)`` extents (any order, may overlap or touch) as sorted ranges.

    Costs the number of extents, not the pages they cover.

    >>> merge_ranges([8, 0, 2], [10, 2, 4]).tolist()
    [[0, 4], [8, 10]]
    """
    s = np.asarray(starts, dtype=np.int64).reshape(-1)
    e = np.asarray(ends, dtype=np.int64).reshape(-1)
    keep = e > s
    s, e = s[keep], e[keep]
    if s.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(s, kind="stable")
    s, e = s[order], np.maximum.accumulate(e[order])
    # a new range begins where a start lies beyond every end before it
    new = np.concatenate(([True], s[1:] > e[:-1]))
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [s.size - 1]))
    return np.stack((s[first], e[last]), axis=1)


def block_frames(blocks: npt.ArrayLike, order: int) -> PfnArray:
    """Every frame of the aligned blocks of ``2**order`` frames with these indices, block by
    block (a 2 MiB block is order 9).

    >>> block_frames([1], 1).tolist()
    [2, 3]
    """
    b = as_pfns(blocks)
    return ((b[:, None] << order) + np.arange(1 << order, dtype=np.int64)).reshape(-1)


def merge_range_lists(parts: list[RangeArray]) -> RangeArray:
    """Several range arrays as one sorted, merged array (one part is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    r = np.concatenate(parts)
    return merge_ranges(r[:, 0], r[:, 1])


def range_pages(ranges: RangeArray) -> int:
    if len(ranges) == 1:  # the common single-run case, without numpy reductions
        return int(ranges[0, 1]) - int(ranges[0, 0])
    return int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0


def check_ranges(ranges: RangeArray, guest_pages: int) -> None:
    """Raise ``GuestAddressError`` unless every range lies inside ``[0, guest_pages)``."""
    if len(ranges) == 0:
        return
    if ranges.ndim != 2 or ranges.shape[1] != 2:
        raise GuestAddressError(f"ranges must be (k, 2), got shape {ranges.shape}")
    if len(ranges) == 1:
        lo, hi = int(ranges[0, 0]), int(ranges[0, 1])
        empty = hi <= lo
    else:
        lo = int(ranges[:, 0].min())
        hi = int(ranges[:, 1].max())
        empty = bool((ranges[:, 1] <= ranges[:, 0]).any())
    if lo < 0 or hi > guest_pages or empty:
        raise GuestAddressError(
            f"PFN range [{lo}, {hi}) outside guest memory of {guest_pages} pages"
        )


class RamBackend(Protocol):
    """The host's side of one guest's RAM."""

    @property
    def guest_pages(self) -> int: ...

    def release(self, ranges: RangeArray) -> int:
        """Give the memory behind these PFN ranges back to the host; returns pages released."""
        ...

    def readmit(self, ranges: RangeArray) -> int:
        """Let the guest use these pages again; returns pages readmitted."""
        ...

    def resident_bytes(self) -> int:
        """Host memory the guest's RAM holds now, measured where the backend can measure."""
        ...


class PageStore(Protocol):
    """The guest's side of its RAM: where page contents are written and checked."""

    def touch(self, pfns: PfnArray, generation: int) -> None:
        """The guest writes content (stamped with ``generation``) into these pages."""
        ...

    def verify(self, pfns: PfnArray) -> int:
        """How many of these pages lost the content last written to them (0 when intact)."""
        ...


class NullRam:
    """A RAM backend and page store with no memory behind it, for the simulator and tests.

    It keeps one byte per page: 1 while the page is resident (touched since it was last
    released). ``np.zeros`` is lazily backed, so an idle 8 GiB guest costs next to nothing.
    """

    __slots__ = ("_guest_pages", "_resident", "_resident_pages", "released_pages_total")

    def __init__(self, guest_pages: int) -> None:
        if guest_pages <= 0:
            raise ValueError(f"guest_pages must be positive, got {guest_pages}")
        self._guest_pages = guest_pages
        self._resident = np.zeros(guest_pages, dtype=np.uint8)
        self._resident_pages = 0
        self.released_pages_total = 0

    @property
    def guest_pages(self) -> int:
        return self._guest_pages

    def release(self, ranges: RangeArray) -> int:
        check_ranges(ranges, self._guest_pages)
        freed = 0
        for start, end in ranges.tolist():
            seg = self._resident[start:end]
            freed += int(seg.sum())
            seg[:] = 0
        self._resident_pages -= freed
        n = range_pages(ranges)
        self.released_pages_total += n
        return n

    def readmit(self, ranges: RangeArray) -> int:
        check_ranges(ranges, self._guest_pages)
        return range_pages(ranges)  # residency returns on touch, as with QEMU

    def resident_bytes(self) -> int:
        return self._resident_pages * PAGE_SIZE

    def resident_pages_of(self, pfns: PfnArray) -> int:
        return int(self._resident[pfns].sum())

    def touch(self, pfns: PfnArray, generation: int) -> None:
        if pfns.size == 0:
            return
        seg = self._resident[pfns]
        self._resident_pages += int(pfns.size - seg.sum())
        self._resident[pfns] = 1

    def verify(self, pfns: PfnArray) -> int:
        return 0  # no content to lose
