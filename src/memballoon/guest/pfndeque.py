"""A growable ring buffer of page frame numbers, oldest at the front.

The guest model keeps its anonymous and page-cache pages in LRU order with one of these: new
and refaulted pages join the back (hot), reclaim takes from the front (cold), a shrinking
workload frees from the back. Every operation costs what it moves, never the guest's size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_MIN_CAPACITY = 256


class PfnDeque:
    __slots__ = ("_buf", "_head", "_len")

    def __init__(self) -> None:
        self._buf: npt.NDArray[np.int32] = np.empty(_MIN_CAPACITY, dtype=np.int32)
        self._head = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _grow(self, need: int) -> None:
        cap = self._buf.size
        if need <= cap:
            return
        new_cap = max(cap * 2, need)
        new = np.empty(new_cap, dtype=np.int32)
        new[: self._len] = self._ordered()
        self._buf = new
        self._head = 0

    def _ordered(self) -> npt.NDArray[np.int32]:
        cap = self._buf.size
        end = self._head + self._len
        if end <= cap:
            return self._buf[self._head : end]
        return np.concatenate((self._buf[self._head :], self._buf[: end - cap]))

    def to_array(self) -> npt.NDArray[np.int64]:
        """All PFNs, oldest first (a copy)."""
        return self._ordered().astype(np.int64)

    def push_back(self, pfns: npt.NDArray[np.int64]) -> None:
        k = int(pfns.size)
        if k == 0:
            return
        self._grow(self._len + k)
        cap = self._buf.size
        start = (self._head + self._len) % cap
        first = min(k, cap - start)
        self._buf[start : start + first] = pfns[:first]
        if first < k:
            self._buf[: k - first] = pfns[first:]
        self._len += k

    def pop_front(self, k: int) -> npt.NDArray[np.int64]:
        """Remove and return up to ``k`` of the oldest PFNs, oldest first."""
        k = min(k, self._len)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        cap = self._buf.size
        end = self._head + k
        if end <= cap:
            out = self._buf[self._head : end].astype(np.int64)
        else:
            out = np.concatenate((self._buf[self._head :], self._buf[: end - cap])).astype(
                np.int64
            )
        self._head = end % cap
        self._len -= k
        return out

    def pop_back(self, k: int) -> npt.NDArray[np.int64]:
        """Remove and return up to ``k`` of the newest PFNs, oldest of them first."""
        k = min(k, self._len)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        cap = self._buf.size
        start = (self._head + self._len - k) % cap
        end = start + k
        if end <= cap:
            out = self._buf[start:end].astype(np.int64)
        else:
            out = np.concatenate((self._buf[start:], self._buf[: end - cap])).astype(np.int64)
        self._len -= k
        return out

    def tail(self, k: int) -> npt.NDArray[np.int64]:
        """The newest ``k`` PFNs (a copy), without removing them."""
        k = min(max(k, 0), self._len)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        cap = self._buf.size
        start = (self._head + self._len - k) % cap
        end = start + k
        if end <= cap:
            return self._buf[start:end].astype(np.int64)
        return np.concatenate((self._buf[start:], self._buf[: end - cap])).astype(np.int64)
