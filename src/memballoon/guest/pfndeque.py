"""A deque of page frame numbers, oldest at the front, kept as runs of consecutive frames.

The guest model keeps its anonymous and page-cache pages in LRU order with one of these: new
and refaulted pages join the back (hot), reclaim takes from the front (cold), a shrinking
workload frees from the back; the virtio driver keeps its balloon in one. Frames come from the
allocator in ascending runs (a block's free frames, whole free blocks), so the deque stores
``(first frame, length)`` runs: a balloon of millions of pages is a few runs, not four bytes a
page (a thousand simulated guests of 8 GiB would need gigabytes), and every operation costs
what it moves plus the runs it touches, never the guest's size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from memballoon.model.pages import expand_runs, run_list_frames, sorted_runs

_MIN_RUNS = 16
_EMPTY = np.empty(0, dtype=np.int64)


def _runs(p: npt.NDArray[np.int64], brk: npt.NDArray[np.intp]
          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``p`` as runs of consecutive frames (their first frames and lengths), given the
    indices after which it breaks (at least one)."""
    k = p.size
    edges = np.empty(brk.size + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, k
    edges[1:-1] = brk + 1
    return p[edges[:-1]], edges[1:] - edges[:-1]


class PfnDeque:
    __slots__ = ("_head", "_lens", "_n", "_starts", "size")

    def __init__(self) -> None:
        self._starts: npt.NDArray[np.int64] = np.empty(_MIN_RUNS, dtype=np.int64)
        self._lens: npt.NDArray[np.int64] = np.empty(_MIN_RUNS, dtype=np.int64)
        self._head = 0  # the oldest run's slot
        self._n = 0  # runs held, from _head on
        self.size = 0  # frames held (``len``; an attribute read costs the hot paths less)

    def __len__(self) -> int:
        return self.size

    def _room(self, more: int) -> None:
        """Slots for ``more`` runs after the newest (slide to the start, or grow)."""
        cap = self._starts.size
        if self._head + self._n + more <= cap:
            return
        h, n = self._head, self._n
        new_cap = cap if n + more <= cap // 2 else max(2 * cap, n + more)
        starts = np.empty(new_cap, dtype=np.int64)
        lens = np.empty(new_cap, dtype=np.int64)
        starts[:n] = self._starts[h : h + n]
        lens[:n] = self._lens[h : h + n]
        self._starts, self._lens, self._head = starts, lens, 0

    def to_array(self) -> npt.NDArray[np.int64]:
        """All PFNs, oldest first (a copy)."""
        h, n = self._head, self._n
        return expand_runs(self._starts[h : h + n], self._lens[h : h + n])

    def runs(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The runs held, oldest first: their first frames and lengths (copies)."""
        h, n = self._head, self._n
        return self._starts[h : h + n].copy(), self._lens[h : h + n].copy()

    def sorted_array(self) -> npt.NDArray[np.int64]:
        """All PFNs, ascending (``np.sort(to_array())``, at the cost of the runs)."""
        return sorted_runs(*self.runs())

    def push_run(self, first: int, k: int) -> None:
        """``push_back`` of the ``k`` frames ``first, first + 1, ...`` (no array of them)."""
        if k <= 0:
            return
        last = self._head + self._n - 1
        if self._n and int(self._starts[last]) + int(self._lens[last]) == first:
            self._lens[last] += k  # it continues the newest run
        else:
            self._room(1)
            i = self._head + self._n
            self._starts[i] = first
            self._lens[i] = k
            self._n += 1
        self.size += k

    def push_back(self, pfns: npt.NDArray[np.int64]) -> None:
        k = int(pfns.size)
        if k == 0:
            return
        p = np.asarray(pfns, dtype=np.int64).reshape(-1)
        if k == 1:  # the page-at-a-time paths: extend the newest run when it continues it
            self.push_run(int(p[0]), 1)
            return
        brk = ((p[1:] - p[:-1]) != 1).nonzero()[0]
        if brk.size == 0:  # one run (the usual): no run arrays
            self.push_run(int(p[0]), k)
            return
        starts, lens = _runs(p, brk)
        last = self._head + self._n - 1
        if self._n and int(self._starts[last] + self._lens[last]) == int(starts[0]):
            self._lens[last] += lens[0]
            starts, lens = starts[1:], lens[1:]
        m = int(starts.size)
        if m:
            self._room(m)
            i = self._head + self._n
            self._starts[i : i + m] = starts
            self._lens[i : i + m] = lens
            self._n += m
        self.size += k

    def _front_runs(self, k: int) -> int:
        """How many runs from the oldest hold the oldest ``k`` frames (the last maybe partly)."""
        h, n, w = self._head, self._n, 8
        while True:
            w = min(w, n)
            cum = np.cumsum(self._lens[h : h + w])
            if cum[-1] >= k or w == n:
                return int(np.searchsorted(cum, k)) + 1
            w *= 4

    def _back_runs(self, k: int) -> int:
        """How many runs from the newest hold the newest ``k`` frames (the last maybe partly)."""
        end, n, w = self._head + self._n, self._n, 8
        while True:
            w = min(w, n)
            cum = np.cumsum(self._lens[end - w : end][::-1])
            if cum[-1] >= k or w == n:
                return int(np.searchsorted(cum, k)) + 1
            w *= 4

    def _pop_within_oldest(self, k: int) -> int | None:
        """When the oldest run holds at least ``k`` (> 0) frames: remove its first ``k``
        and return the first of them; else None, nothing changed."""
        h = self._head
        first, held = int(self._starts[h]), int(self._lens[h])
        if held < k:
            return None
        if held > k:
            self._starts[h] = first + k
            self._lens[h] = held - k
        else:
            self._head += 1
            self._n -= 1
            if self._n == 0:
                self._head = 0
        self.size -= k
        return first

    def pop_front(self, k: int) -> npt.NDArray[np.int64]:
        """Remove and return up to ``k`` of the oldest PFNs, oldest first."""
        k = min(k, self.size)
        if k <= 0:
            return _EMPTY.copy()
        first = self._pop_within_oldest(k)
        if first is not None:  # the usual: scalars, no run arrays
            return np.arange(first, first + k, dtype=np.int64)
        runs = np.array(self.pop_front_runs(k), dtype=np.int64)
        return expand_runs(runs[:, 0], runs[:, 1])

    def pop_front_runs(self, k: int) -> list[tuple[int, int]]:
        """``pop_front(k)`` as runs: ``(first frame, length)`` pairs, oldest first, whose
        frames in order are what ``pop_front`` returns (no array of the frames)."""
        k = min(k, self.size)
        if k <= 0:
            return []
        first = self._pop_within_oldest(k)
        if first is not None:  # the usual
            return [(first, k)]
        h = self._head
        r = self._front_runs(k)
        starts = self._starts[h : h + r].tolist()
        lens = self._lens[h : h + r].tolist()
        extra = sum(lens) - k  # what the last run keeps
        lens[-1] -= extra
        if extra:
            self._starts[h + r - 1] += lens[-1]
            self._lens[h + r - 1] = extra
            r -= 1
        self._head += r
        self._n -= r
        self.size -= k
        if self._n == 0:
            self._head = 0
        return list(zip(starts, lens, strict=True))

    def _newest(self, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """The runs holding the newest ``k`` frames (the first cut to fit), oldest first, and
        how many of the deque's runs they reach into."""
        end = self._head + self._n
        r = self._back_runs(k)
        starts = self._starts[end - r : end].copy()
        lens = self._lens[end - r : end].copy()
        extra = int(lens.sum()) - k
        starts[0] += extra
        lens[0] -= extra
        return starts, lens, r

    def pop_back(self, k: int) -> npt.NDArray[np.int64]:
        """Remove and return up to ``k`` of the newest PFNs, oldest of them first."""
        return run_list_frames(self.pop_back_runs(k))

    def pop_back_runs(self, k: int) -> list[tuple[int, int]]:
        """``pop_back(k)`` as runs: ``(first frame, length)`` pairs, oldest first, whose
        frames in order are what ``pop_back`` returns (no array of the frames)."""
        k = min(k, self.size)
        if k <= 0:
            return []
        end = self._head + self._n
        held = int(self._lens[end - 1])
        if held < k:
            starts, lens, r = self._newest(k)
            kept = int(self._lens[end - r]) - int(lens[0])  # what stays of the oldest touched
            if kept:
                self._lens[end - r] = kept
                r -= 1
            self._n -= r
            self.size -= k
            if self._n == 0:
                self._head = 0
            return list(zip(starts.tolist(), lens.tolist(), strict=True))
        first = int(self._starts[end - 1]) + held - k  # within the newest run (the usual)
        if held > k:
            self._lens[end - 1] = held - k
        else:
            self._n -= 1
            if self._n == 0:
                self._head = 0
        self.size -= k
        return [(first, k)]

    def newest(self) -> int:
        """The newest PFN (the deque must not be empty)."""
        last = self._head + self._n - 1
        return int(self._starts[last] + self._lens[last] - 1)

    def tail(self, k: int) -> npt.NDArray[np.int64]:
        """The newest ``k`` PFNs (a copy), without removing them."""
        k = min(max(k, 0), self.size)
        if k == 0:
            return _EMPTY.copy()
        last = self._head + self._n - 1
        if int(self._lens[last]) >= k:  # within the newest run
            end = int(self._starts[last]) + int(self._lens[last])
            return np.arange(end - k, end, dtype=np.int64)
        starts, lens, _ = self._newest(k)
        return expand_runs(starts, lens)
