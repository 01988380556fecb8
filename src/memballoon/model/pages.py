"""Page sets: frame numbers and frame ranges, the currency of both balloon sides.

A guest's balloon driver hands frame numbers (``PfnArray``) to the host; the host folds them
into half-open ``[start, end)`` ranges (``RangeArray``, one call per range, not per page). Both
sides and the guest model share these types and helpers, so they live here, below ``guest`` and
``host``. ``PageStore`` is the guest's side of its RAM: where page contents are written and
checked (the memfd backend writes real data, ``NullRam`` counts resident pages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from memballoon.model.errors import GuestAddressError

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
    k = p.size
    if k == 0:
        return np.empty((0, 2), dtype=np.int64)
    first, last = int(p[0]), int(p[-1])
    if k == 1:
        return np.array([[first, first + 1]], dtype=np.int64)
    if k <= _FEW_PFNS and last - first >= k - 1:
        runs = _ascending_runs(p.tolist())
        if runs is not None:
            return np.array(runs, dtype=np.int64)
    steps = p[1:] - p[:-1]
    # one run (the usual batch): its ends say whether to check its steps
    if last - first == k - 1 and bool((steps == 1).all()):
        return np.array([[first, last + 1]], dtype=np.int64)
    if first - last == k - 1 and bool((steps == -1).all()):
        # one descending run: a VMware driver's stack, newest first
        return np.array([[last, first + 1]], dtype=np.int64)
    starts, ends, ascending = _runs_and_order(p, steps)
    if ascending:
        return np.stack((starts, ends), axis=1)
    # ascending runs in any order (a balloon's newest rounds, frames from several blocks):
    # sort the runs, not the frames (a repeat is an overlap that the merge folds away)
    return merge_ranges(starts, ends)


def ascending_ranges(pfns: PfnArray) -> RangeArray | None:
    """``coalesce(pfns)`` if ``pfns`` strictly ascend (then its ranges are their runs, in
    order); None, having done no more than ``coalesce`` would, if they do not (its runs
    found, not merged).

    >>> ascending_ranges(np.array([3, 4, 5, 9])).tolist(), ascending_ranges(np.array([4, 3]))
    ([[3, 6], [9, 10]], None)
    """
    if pfns.size < 2:
        return coalesce(pfns)
    starts, ends, ascending = _runs_and_order(pfns, pfns[1:] - pfns[:-1])
    return np.stack((starts, ends), axis=1) if ascending else None


#: Up to this many PFNs, ``coalesce`` folds ascending ones in Python: cheaper than the numpy
#: calls (a free page report's blocks, a few dozen at most).
_FEW_PFNS = 32


def _ascending_runs(pfns: list[int]) -> list[list[int]] | None:
    """The ``[start, end)`` runs of strictly ascending ``pfns``; None if they do not ascend."""
    runs = [[pfns[0], pfns[0] + 1]]
    run = runs[0]
    for p in pfns[1:]:
        if p == run[1]:
            run[1] = p + 1
        elif p > run[1]:
            run = [p, p + 1]
            runs.append(run)
        else:
            return None
    return runs


def _runs_and_order(p: PfnArray, steps: npt.NDArray[np.int64]
                    ) -> tuple[PfnArray, PfnArray, bool]:
    """``_run_bounds`` of ``p``, and whether ``p`` strictly ascends: every step inside a run
    is 1, so the frames ascend if the steps between runs do (no pass over every frame again,
    as ``(steps > 0).all()`` would be)."""
    cuts = (steps != 1).nonzero()[0]
    starts, ends = _bounds_at(p, cuts)
    return starts, ends, bool((steps[cuts] > 0).all())


def _run_bounds(p: PfnArray, steps: npt.NDArray[np.int64]) -> tuple[PfnArray, PfnArray]:
    """The first frames and ends of ``p``'s runs of consecutive ascending frames."""
    return _bounds_at(p, (steps != 1).nonzero()[0])


def _bounds_at(p: PfnArray, cuts: npt.NDArray[np.intp]) -> tuple[PfnArray, PfnArray]:
    """``_run_bounds`` given the steps that are not 1 (a run ends at each)."""
    breaks = cuts + 1
    starts = p[np.concatenate(([0], breaks))]
    ends = p[np.concatenate((cuts, [p.size - 1]))] + 1
    return starts, ends


def has_repeats(pfns: npt.ArrayLike) -> bool:
    """Whether a frame occurs twice in ``pfns`` (costs its runs, not a sort of its frames).

    >>> has_repeats([5, 6, 1, 2]), has_repeats([5, 6, 1, 6])
    (False, True)
    """
    p = as_pfns(pfns)
    if p.size < 2:
        return False
    steps = p[1:] - p[:-1]
    if bool((steps > 0).all()):
        return False
    starts, ends = _run_bounds(p, steps)
    order = np.argsort(starts, kind="stable")
    return bool((starts[order][1:] < ends[order][:-1]).any())


def sorted_pfns(pfns: npt.ArrayLike) -> PfnArray:
    """``pfns`` ascending (a copy), sorted run by run: a few runs cost what they hold.

    >>> sorted_pfns([7, 8, 3, 4, 1]).tolist()
    [1, 3, 4, 7, 8]
    """
    p = as_pfns(pfns)
    if p.size < 2:
        return p.copy()
    steps = p[1:] - p[:-1]
    if bool((steps >= 0).all()):
        return p.copy()
    breaks = (steps != 1).nonzero()[0] + 1
    if breaks.size * 8 > p.size:  # short runs: a plain sort is cheaper
        return np.sort(p)
    first = np.concatenate(([0], breaks))
    return sorted_runs(p[first], np.diff(np.append(first, p.size)))


def expand_runs(starts: npt.NDArray[np.int64], lens: npt.NDArray[np.int64]
                ) -> npt.NDArray[np.int64]:
    """The frames of runs, in order."""
    if starts.size == 0:
        return np.empty(0, dtype=np.int64)
    if starts.size == 1:
        return np.arange(starts[0], starts[0] + lens[0], dtype=np.int64)
    total = int(lens.sum())
    offsets = np.cumsum(lens) - lens
    return np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)


def run_list_frames(runs: Sequence[tuple[int, int]]) -> npt.NDArray[np.int64]:
    """The frames of ``(first, length)`` runs, in order: ``expand_runs`` of a list of pairs
    (as ``PfnDeque.pop_back_runs`` and the guest model's run takes give them)."""
    if len(runs) == 1:  # the usual: no arrays of the runs
        first, k = runs[0]
        return np.arange(first, first + k, dtype=np.int64)
    starts, lens = np.array(runs, dtype=np.int64).reshape(-1, 2).T
    return expand_runs(starts, lens)


def run_list_ranges(runs: Sequence[tuple[int, int]]) -> RangeArray:
    """``coalesce(run_list_frames(runs))`` from the runs alone: their sorted, merged
    ``[start, end)`` ranges, at the cost of the runs, not of their frames."""
    if len(runs) == 1 and runs[0][1] > 0:  # the usual: one run
        first, k = runs[0]
        return np.array([[first, first + k]], dtype=np.int64)
    r = np.array(runs, dtype=np.int64).reshape(-1, 2)
    return merge_ranges(r[:, 0], r[:, 0] + r[:, 1])


def sorted_runs(starts: npt.NDArray[np.int64], lens: npt.NDArray[np.int64]
                ) -> npt.NDArray[np.int64]:
    """The frames of runs, ascending (``np.sort`` of their frames, repeats kept): the runs are
    ordered by their first frames, so the cost is the runs' and the frames' count, no sort of
    the frames unless runs overlap."""
    if starts.size > 1:
        order = np.argsort(starts, kind="stable")
        starts, lens = starts[order], lens[order]
    out = expand_runs(starts, lens)
    if starts.size > 1 and bool((starts[1:] < starts[:-1] + lens[:-1]).any()):
        out.sort()  # runs that overlap (a frame held twice): as np.sort leaves them
    return out


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
    first = new.nonzero()[0]
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


class PageStore(Protocol):
    """The guest's side of its RAM: where page contents are written and checked."""

    def touch(self, pfns: PfnArray, generation: int) -> None:
        """The guest writes content (stamped with ``generation``) into these pages."""
        ...

    def verify(self, pfns: PfnArray) -> int:
        """How many of these pages lost the content last written to them (0 when intact)."""
        ...

    def forget(self, ranges: RangeArray) -> None:
        """The guest hands these frames to its balloon: it will not read them before it writes
        them again, so a store may drop its own access to them (content stays until the host
        releases it). A store whose ``forget`` does nothing may say so with a class attribute
        ``forget_is_noop = True``: the guest model then skips building the ranges."""
        ...
