"""Release host pages only when whole: QEMU's partially-ballooned-page rule, for every page.

Theory of operation
-------------------
A guest balloons 4 KiB frames; a host that backs its RAM with 2 MiB pages (shmem THP,
hugetlbfs) can only give back whole host pages. Punching 4 KiB out of a hugetlbfs page zeroes
it and frees nothing; out of a shmem THP it splits the huge page. QEMU
(hw/virtio/virtio-balloon.c, ``balloon_inflate_page``) keeps one "partially ballooned page"
bitmap and discards a host page only once every 4 KiB piece of it is in the balloon; ballooning
a piece of another host page makes it forget the first. ``HostPages`` keeps the rule for every
host page at once: a count of the ballooned frames in each (``_count``) and whether the page
has been released (``_released``).

- ``take(ranges)``: frames enter the balloon. Host pages whose count reaches the page size are
  released, in one backend call; the others are partial (``partial_huge_pages``) and keep
  their memory until they complete.
- ``give(ranges)``: frames leave the balloon. A released host page the guest takes a piece of
  back is readmitted whole (hugetlb takes it from the pool again; shmem refaults it on touch)
  and is partial again, its other frames still ballooned. If the backend cannot back some
  pages (a hugetlb pool run dry), ``give`` returns the frames of those pages: they stay in the
  balloon, released, and the device refuses or defers them (``force`` gives them up anyway:
  a reset, where the guest takes its frames without asking).
- ``release_free(ranges)``: free page reporting; whole host pages inside the ranges are
  released, the rest is kept (counted), the balloon's counts untouched.
- A release the backend fails (``fallocate`` refused: a host in trouble) raises nothing: the
  frames are in the balloon all the same (the guest gave them up) and their release is owed
  (``release_owed_pages``, counted ``release_failed``); ``retry_releases`` pays it, and a
  frame that leaves the balloon first is struck off, never punched once the guest has it back.

Between calls ``count == frames`` holds exactly for released pages, so a device's balloon
bitmap is all a restored device needs to rebuild this state (``rebuild``).

With 4 KiB host pages every call passes straight through to the backend: the 4 KiB path pays
one attribute test. Ranges must be sorted and disjoint, as ``coalesce`` and ``merge_ranges``
make them. No I/O beyond the backend; no clock.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from memballoon.host.ram import RamBackend
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import HostResourceError, MemballoonError, UsageError
from memballoon.model.pages import PfnArray, RangeArray, coalesce, merge_ranges, range_pages

_NO_RANGES = np.empty((0, 2), dtype=np.int64)


class HostPageCounter(CounterName):
    """What ``HostPages`` counts in its device's bag (huge-page RAM only)."""

    HUGE_PAGES_RELEASED = "huge_pages_released"  # host pages released: every frame ballooned
    HUGE_PAGES_READMITTED = "huge_pages_readmitted"  # released host pages a deflate reopened
    READMIT_UNBACKED_PAGES = "readmit_unbacked_pages"  # frames the host had no memory for
    READMIT_FORCED_UNBACKED = "readmit_forced_unbacked"  # of those, given up anyway (a reset)
    REPORT_PARTIAL_FRAMES = "report_partial_frames"  # reported free frames not whole host pages
    RELEASE_FAILED = "release_failed"  # backend releases that failed (the frames' release owed)
    RELEASE_RETRIED = "release_retried"  # owed frames released later


class HostPages:
    """The host pages behind one guest's RAM and how much of each is ballooned."""

    __slots__ = ("_count", "_owed", "_partial", "_released", "counters", "frames", "last_error",
                 "owing", "ram")

    def __init__(self, ram: RamBackend, counters: Counters) -> None:
        self.ram = ram
        self.counters = counters
        self.frames = ram.host_page_frames
        if self.frames < 1 or ram.guest_pages % self.frames:
            raise UsageError(f"{ram.guest_pages} frames are not whole host pages of "
                             f"{self.frames}")
        n = ram.guest_pages // self.frames if self.frames > 1 else 0
        self._count: npt.NDArray[np.int32] = np.zeros(n, dtype=np.int32)
        self._released: npt.NDArray[np.bool_] = np.zeros(n, dtype=np.bool_)
        self._partial = 0
        #: the last HostResourceError's message (a readmit the host had no memory for)
        self.last_error: str | None = None
        #: 4 KiB host pages: frames in the balloon whose release failed (None: none ever did)
        self._owed: npt.NDArray[np.bool_] | None = None
        self.owing = False  # a release failed and is not paid yet: ``retry_releases`` has work

    @property
    def huge(self) -> bool:
        return self.frames > 1

    @property
    def partial_huge_pages(self) -> int:
        """Host pages with some frames ballooned and others not: held, not released."""
        return self._partial

    @property
    def released_huge_pages(self) -> int:
        return int(np.count_nonzero(self._released))

    # ------------------------------------------------------------------ the balloon
    @property
    def release_owed_pages(self) -> int:
        """Frames in the balloon whose host memory a failed release still holds."""
        if self.frames == 1:
            return 0 if self._owed is None else int(np.count_nonzero(self._owed))
        return int(np.count_nonzero((self._count == self.frames) & ~self._released)
                   ) * self.frames

    def _release(self, ranges: RangeArray) -> bool:
        """The backend's release of ``ranges``; False (counted) when it failed."""
        try:
            self.ram.release(ranges)
        except MemballoonError as exc:
            self.last_error = str(exc)
            self.counters.inc(HostPageCounter.RELEASE_FAILED)
            self.owing = True
            return False
        return True

    def retry_releases(self) -> int:
        """Release what failed before (see the module docstring); returns the frames freed."""
        if not self.owing:
            return 0
        self.owing = False  # set again if this release fails too
        if self.frames == 1:
            if self._owed is None or not self._owed.any():
                return 0
            edges = np.flatnonzero(np.diff(self._owed.astype(np.int8), prepend=0, append=0))
            ranges = edges.astype(np.int64).reshape(-1, 2)
            if not self._release(ranges):
                return 0
            self._owed[:] = False
            n = range_pages(ranges)
        else:
            pages = np.flatnonzero((self._count == self.frames) & ~self._released)
            if pages.size == 0 or not self._release(self._page_ranges(pages)):
                return 0
            self._released[pages] = True
            self.counters.inc(HostPageCounter.HUGE_PAGES_RELEASED, int(pages.size))
            n = int(pages.size) * self.frames
        self.counters.inc(HostPageCounter.RELEASE_RETRIED, n)
        return n

    def take(self, ranges: RangeArray) -> int:
        """Frames enter the balloon (none of them in it already); releases the host pages
        this completes. Returns the frames taken."""
        if self.frames == 1:
            if not self._release(ranges):
                if self._owed is None:
                    self._owed = np.zeros(self.ram.guest_pages, dtype=np.bool_)
                for a, b in np.asarray(ranges, dtype=np.int64).tolist():
                    self._owed[a:b] = True
            return range_pages(ranges)
        if len(ranges) == 0:
            return 0
        if len(ranges) == 1 and self._take_in_one_page(int(ranges[0, 0]), int(ranges[0, 1])):
            return int(ranges[0, 1] - ranges[0, 0])
        pages, delta = self._per_page(ranges)
        self._add(pages, delta)
        full = pages[(self._count[pages] == self.frames) & ~self._released[pages]]
        if full.size and self._release(self._page_ranges(full)):
            self._released[full] = True
            self.counters.inc(HostPageCounter.HUGE_PAGES_RELEASED, int(full.size))
        return range_pages(ranges)

    def _take_in_one_page(self, start: int, end: int) -> bool:
        """``take`` of one range inside one host page (a virtio buffer is half of one), in
        scalars: numpy calls on one-element arrays would cost ten times more."""
        p = self.frames
        page = start // p
        if (end - 1) // p != page:
            return False
        before = int(self._count[page])
        after = before + end - start
        if after > p:
            raise UsageError("host pages: frames taken twice")
        self._count[page] = after
        self._partial += (0 < after < p) - (0 < before < p)
        if after == p and not self._released[page] and self._release(
                np.array([[page * p, (page + 1) * p]], dtype=np.int64)):
            self._released[page] = True
            self.counters.inc(HostPageCounter.HUGE_PAGES_RELEASED)
        return True

    def give(self, ranges: RangeArray, *, force: bool = False) -> RangeArray:
        """Frames leave the balloon; released host pages among theirs are readmitted whole.

        Returns the frames that could not leave (empty unless the backend had no memory for
        their host pages: they stay ballooned and released). With ``force`` they leave all
        the same and the shortfall is only counted.
        """
        if self.frames == 1:
            if self._owed is not None:  # never released: nothing may punch them now
                for a, b in np.asarray(ranges, dtype=np.int64).tolist():
                    self._owed[a:b] = False
            self.ram.readmit(ranges)
            return _NO_RANGES
        if len(ranges) == 0:
            return _NO_RANGES
        pages, delta = self._per_page(ranges)
        back = pages[self._released[pages]]
        stuck = np.empty(0, dtype=np.int64)
        if back.size:
            try:
                self.ram.readmit(self._page_ranges(back))
            except HostResourceError as exc:
                self.last_error = str(exc)
                stuck = self._pages_of(exc.unbacked)
            reopened = np.setdiff1d(back, stuck, assume_unique=True) if stuck.size else back
            self._released[reopened] = False
            self.counters.inc(HostPageCounter.HUGE_PAGES_READMITTED, int(reopened.size))
        if stuck.size == 0:
            self._add(pages, -delta)
            return _NO_RANGES
        left = self._clip(ranges, stuck)
        self.counters.inc(HostPageCounter.READMIT_UNBACKED_PAGES, range_pages(left))
        if force:
            self.counters.inc(HostPageCounter.READMIT_FORCED_UNBACKED, range_pages(left))
            self._released[stuck] = False  # the guest faults them in, or fails to, itself
            self._add(pages, -delta)
            return _NO_RANGES
        keep = np.isin(pages, stuck, assume_unique=True)
        self._add(pages[~keep], -delta[~keep])
        return left

    def give_all(self, pfns: PfnArray) -> bool:
        """Every frame of ``pfns`` (sorted) leaves the balloon, or none does: where the backend
        cannot back some of their host pages (a hugetlb pool run dry), the frames it could back
        are taken again (released as before) and False. A reset uses it: it must never hand
        the guest a frame the host cannot back."""
        stuck = self.give(coalesce(pfns))
        if len(stuck) == 0:
            return True
        given = pfns[~in_ranges(pfns, stuck)]
        if given.size:
            self.take(coalesce(given))  # as it was: released again
        return False

    def release_free(self, ranges: RangeArray) -> int:
        """Free page reporting: release the whole host pages inside ``ranges``; returns the
        frames released (parts of host pages are kept and counted)."""
        if self.frames == 1:
            return self.ram.release(ranges)
        if len(ranges) == 0:
            return 0
        p = self.frames
        lo = -(-ranges[:, 0] // p) * p
        hi = ranges[:, 1] // p * p
        whole = np.stack((lo, hi), axis=1)[hi > lo]
        partial = range_pages(ranges) - range_pages(whole)
        if partial:
            self.counters.inc(HostPageCounter.REPORT_PARTIAL_FRAMES, partial)
        return self.ram.release(whole) if len(whole) else 0

    def rebuild(self, ballooned: npt.NDArray[np.bool_]) -> None:
        """State from a device's balloon bitmap (a restored device): whole pages are the
        released ones, as between any two calls."""
        if self.frames == 1:
            return
        self._count[:] = ballooned.reshape(-1, self.frames).sum(axis=1, dtype=np.int32)
        self._released[:] = self._count == self.frames
        self._partial = int(np.count_nonzero((self._count > 0) & ~self._released))

    def partial_pfns(self) -> PfnArray:
        """First frames of the partial host pages (for tests and checks)."""
        part = np.flatnonzero((self._count > 0) & (self._count < self.frames))
        return part.astype(np.int64) * self.frames

    # ------------------------------------------------------------------ helpers
    def _per_page(self, ranges: RangeArray) -> tuple[npt.NDArray[np.int64],
                                                     npt.NDArray[np.int32]]:
        """The host pages ``ranges`` touch and how many of their frames each covers."""
        r = np.asarray(ranges, dtype=np.int64)
        p = self.frames
        if len(r) == 1:  # one range: its first and last pages in part, whole ones between
            s0, e0 = int(r[0, 0]), int(r[0, 1])
            lo, hi = s0 // p, (e0 - 1) // p
            one = np.arange(lo, hi + 1, dtype=np.int64)
            d = np.full(one.size, p, dtype=np.int32)
            d[0] = min(e0, (lo + 1) * p) - s0
            if hi > lo:
                d[-1] = e0 - hi * p
            return one, d
        if bool((r[1:, 0] < r[:-1, 1]).any()):
            r = merge_ranges(r[:, 0], r[:, 1])  # overlapping frames would count twice
        s, e = r[:, 0], r[:, 1]
        first, last = s // p, (e - 1) // p
        span = last - first + 1
        pages = np.unique(np.repeat(first - np.cumsum(span) + span, span)
                          + np.arange(int(span.sum()), dtype=np.int64))
        # frames of the ranges below each page's start and end: covered(b) summed over ranges
        bounds = np.concatenate((pages * p, [int(pages[-1] + 1) * p]))
        below = np.clip(bounds[:, None] - s[None, :], 0, (e - s)[None, :]).sum(axis=1) \
            if len(r) <= 64 else self._covered_below(bounds, s, e)
        return pages, np.diff(below).astype(np.int32)

    @staticmethod
    def _covered_below(bounds: npt.NDArray[np.int64], s: npt.NDArray[np.int64],
                       e: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Frames of sorted disjoint ranges ``[s, e)`` below each bound (many ranges)."""
        done = np.concatenate(([0], np.cumsum(e - s)))
        j = np.searchsorted(e, bounds, side="right")  # ranges wholly below the bound
        inside = np.where(j < len(s), np.clip(bounds - s[np.minimum(j, len(s) - 1)], 0, None), 0)
        return np.asarray(done[j] + inside)

    def _add(self, pages: npt.NDArray[np.int64], delta: npt.NDArray[np.int32]) -> None:
        before = self._count[pages]
        after = before + delta
        if after.size and (int(after.min()) < 0 or int(after.max()) > self.frames):
            raise UsageError("host pages: frames taken twice or given back unballooned")
        p = self.frames
        self._partial += int(np.count_nonzero((after > 0) & (after < p))) - int(
            np.count_nonzero((before > 0) & (before < p)))
        self._count[pages] = after

    def _page_ranges(self, pages: npt.NDArray[np.int64]) -> RangeArray:
        starts = pages * self.frames
        return merge_ranges(starts, starts + self.frames)

    def _pages_of(self, ranges: tuple[tuple[int, int], ...]) -> npt.NDArray[np.int64]:
        if not ranges:
            return np.empty(0, dtype=np.int64)
        r = np.asarray(ranges, dtype=np.int64)
        return np.unique(np.concatenate([np.arange(a // self.frames, -(-b // self.frames))
                                         for a, b in r.tolist()]))

    def _clip(self, ranges: RangeArray, pages: npt.NDArray[np.int64]) -> RangeArray:
        """The frames of ``ranges`` inside the host pages ``pages``."""
        lo = pages[:, None] * self.frames
        s = np.maximum(ranges[None, :, 0], lo)
        e = np.minimum(ranges[None, :, 1], lo + self.frames)
        keep = e > s
        return merge_ranges(s[keep], e[keep])


def in_ranges(pfns: PfnArray, ranges: RangeArray) -> npt.NDArray[np.bool_]:
    """Which of ``pfns`` lie inside the sorted, disjoint ``ranges``."""
    if len(ranges) == 0:
        return np.zeros(pfns.size, dtype=np.bool_)
    i = np.searchsorted(ranges[:, 0], pfns, side="right") - 1
    ok = i >= 0
    ic = np.maximum(i, 0)
    return np.asarray(ok & (pfns < ranges[ic, 1]))


__all__ = ["HostPageCounter", "HostPages", "in_ranges"]
