"""Host RAM backends: what a balloon device does with the memory behind a guest's pages.

A device that receives page frame numbers from a guest turns them into ranges (contiguous PFNs
coalesced, so the host makes one call per range, not per page) and asks the backend to
``release`` them (give the memory back to the host) or ``readmit`` them (let the guest use them
again; the host repopulates a page only when the guest touches it, as QEMU does).

The guest's side of the same memory is ``model.pages.PageStore``: the guest model calls
``touch`` when a page gets content, so a backend that stands for real memory can write real data
(the memfd backend) and a simulated one can count resident pages (``NullRam``).

Backends are the last line of defence: every range is checked against the guest's size, and a
range outside it raises ``GuestAddressError`` before anything is released.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from memballoon.model.errors import UsageError
from memballoon.model.pages import PfnArray, RangeArray, check_ranges, range_pages
from memballoon.model.units import PAGE_SIZE


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


class NullRam:
    """A RAM backend and page store with no memory behind it, for the simulator and tests.

    It keeps one byte per page: 1 while the page is resident (touched since it was last
    released). ``np.zeros`` is lazily backed, so an idle 8 GiB guest costs next to nothing.
    """

    __slots__ = ("_guest_pages", "_resident", "_resident_pages", "released_pages_total")

    def __init__(self, guest_pages: int) -> None:
        if guest_pages <= 0:
            raise UsageError(f"guest_pages must be positive, got {guest_pages}")
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
