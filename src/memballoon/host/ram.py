"""Host RAM backends: what a balloon device does with the memory behind a guest's pages.

A device that receives page frame numbers from a guest turns them into ranges (contiguous PFNs
coalesced, so the host makes one call per range, not per page) and asks the backend to
``release`` them (give the memory back to the host) or ``readmit`` them (let the guest use them
again; the host repopulates a page only when the guest touches it, as QEMU does).

The guest's side of the same memory is ``model.pages.PageStore``: the guest model calls
``touch`` when a page gets content, so a backend that stands for real memory can write real data
(the memfd backend) and a simulated one can count resident pages (``NullRam``).

Backends are the last line of defence: every range is checked against the guest's size, and a
range outside it raises ``GuestAddressError`` before anything is released. A backend whose host
pages are larger than the guest's (``host_page_frames`` > 1: 2 MiB pages) releases and readmits
whole host pages only; ``host/hostpages.py`` turns the guest's 4 KiB frames into those.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from memballoon.model.errors import HostResourceError, UsageError
from memballoon.model.pages import PfnArray, RangeArray, check_ranges, range_pages
from memballoon.model.units import PAGE_SIZE


class RamBackend(Protocol):
    """The host's side of one guest's RAM."""

    @property
    def guest_pages(self) -> int: ...

    @property
    def host_page_frames(self) -> int:
        """4 KiB frames in one host page: 1, or 512 when the host backs the RAM in 2 MiB."""
        ...

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
    With ``host_page_frames`` it stands for huge-page RAM: it takes whole host pages only, and
    with ``pool`` (host pages free to back a readmit; None: no limit) for a hugetlb pool that
    others draw on too: a release puts pages in, a readmit takes them out, and a readmit the
    pool cannot cover raises ``HostResourceError`` naming the pages it left unbacked.
    """

    __slots__ = ("_guest_pages", "_host_frames", "_resident", "_resident_pages", "pool",
                 "released_pages_total")

    def __init__(self, guest_pages: int, *, host_page_frames: int = 1) -> None:
        if guest_pages <= 0:
            raise UsageError(f"guest_pages must be positive, got {guest_pages}")
        if host_page_frames < 1 or guest_pages % host_page_frames:
            raise UsageError(f"{guest_pages} pages are not whole host pages of "
                             f"{host_page_frames} frames")
        self._guest_pages = guest_pages
        self._host_frames = host_page_frames
        self.pool: int | None = None
        self._resident = np.zeros(guest_pages, dtype=np.uint8)
        self._resident_pages = 0
        self.released_pages_total = 0

    @property
    def guest_pages(self) -> int:
        return self._guest_pages

    @property
    def host_page_frames(self) -> int:
        return self._host_frames

    def _check(self, ranges: RangeArray) -> None:
        check_ranges(ranges, self._guest_pages)
        if self._host_frames > 1 and len(ranges) and bool((ranges % self._host_frames).any()):
            raise UsageError("huge-page RAM: only whole host pages can be released or readmitted")

    def release(self, ranges: RangeArray) -> int:
        self._check(ranges)
        freed = n = 0
        resident = self._resident
        for start, end in ranges.tolist():
            n += end - start
            seg = resident[start:end]
            held = int(np.count_nonzero(seg))
            if held:  # zeros written over pages never touched would make this table resident
                freed += held
                seg.fill(0)
        self._resident_pages -= freed
        self.released_pages_total += n
        if self.pool is not None:
            self.pool += n // self._host_frames
        return n

    def readmit(self, ranges: RangeArray) -> int:
        self._check(ranges)
        n = range_pages(ranges)  # residency returns on touch, as with QEMU
        if self.pool is None:
            return n
        hp = self._host_frames
        need = n // hp
        if need <= self.pool:
            self.pool -= need
            return n
        # back the first pages the pool has, name the rest
        starts = np.concatenate([np.arange(a, b, hp) for a, b in ranges.tolist()])
        left = starts[self.pool:]
        self.pool = 0
        raise HostResourceError(f"the pool cannot back {left.size} host pages",
                                tuple((int(a), int(a) + hp) for a in left.tolist()))

    def resident_bytes(self) -> int:
        return self._resident_pages * PAGE_SIZE

    def resident_pages_of(self, pfns: PfnArray) -> int:
        return int(np.count_nonzero(self._resident[pfns]))  # 0/1 bytes: no widening sum

    def touch(self, pfns: PfnArray, generation: int) -> None:
        if pfns.size == 0:
            return
        new = int(pfns.size) - int(np.count_nonzero(self._resident[pfns]))  # 0/1 bytes
        if new:  # (pages touched again are resident already: nothing to write)
            self._resident_pages += new
            self._resident[pfns] = 1

    def touch_run(self, first: int, k: int, generation: int) -> None:
        """``touch`` of the frames ``first, ..., first + k - 1``: slices, no frame list (a
        subclass's own ``touch`` is honoured)."""
        if type(self).touch is not NullRam.touch:
            self.touch(np.arange(first, first + k, dtype=np.int64), generation)
            return
        if k <= 0:
            return
        seg = self._resident[first : first + k]
        new = k - int(np.count_nonzero(seg))
        if new:
            self._resident_pages += new
            seg.fill(1)

    def verify(self, pfns: PfnArray) -> int:
        return 0  # no content to lose

    def forget(self, ranges: RangeArray) -> None:
        pass  # no mapping to drop

    @property
    def forget_is_noop(self) -> bool:
        """``forget`` does nothing (unless a subclass says otherwise): the guest model need
        not build the ranges it would be told."""
        return type(self).forget is NullRam.forget
