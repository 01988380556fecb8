"""The guest memory model: one guest's page frames, allocation, reclaim, swap, faults and OOM.

Theory of operation
-------------------
A guest has ``total_pages`` frames of 4 KiB. Each frame is in one ``PageState`` (one byte per
page in ``state``). Reserved frames (kernel, firmware, driver rings) sit at the bottom.
Anonymous and page-cache frames are kept in LRU order (``PfnDeque``: cold at the front). Free
frames are found through per-block free counts over 2 MiB blocks (512 pages, the x86-64
``page_reporting_order``), so finding free pages costs the blocks visited, not the guest size;
blocks that free page reporting handed to the host are used last, as Linux puts reported pages
at the tail of its free lists. A block is filled from its bottom, so a small take (a page cache
refill, a growing heap) is usually a few runs: the top of the block the last take was in and
the bottom of the next blocks in that order; such takes are found with a look at those blocks,
and the page lists and the store are handed runs, not frame lists.

Watermarks follow Linux (mm/page_alloc.c, ``__setup_per_zone_wmarks`` before 5.x's scale
factor): ``min = sqrt(16 * lowmem_kbytes)`` KiB clamped to [128 KiB, 256 MiB], ``low = min *
5/4``, ``high = min * 3/2``.

When the host backs the guest's RAM with 2 MiB pages (``host_page_frames`` = 512), balloon
allocations fill whole blocks: the rest of the block the balloon is filling, then wholly free
blocks (not yet reported first), and only when none is left any free frame, so the host can
release whole host pages (host/hostpages.py) rather than hold partial ones. Linux's
virtio_balloon takes whatever order-0 pages the buddy allocator hands out; handing out the
pieces of one free 2 MiB block in a row is an allocation order that allocator may follow.
Every frame the balloon takes is ``forget``-ed in the store (its mapping dropped), with huge
pages once its whole block is in the balloon.

Allocations (what the balloon drivers call):
- ``alloc_nosleep(n)``: free frames above the min watermark only; never reclaims, never waits
  (the seed's ``__GFP_HIGHMEM|__GFP_NOWARN``).
- ``alloc_sleep(n)``: may reclaim (page cache coldest first, then anonymous pages to swap when
  the guest has swap), never from the reserves under the min watermark (``GFP_HIGHUSER``).
  Direct reclaim is stall time.

The workload (``step``) grows and shrinks the anonymous working set, reads files into the
page cache, and touches hot and cold pages: swapped-out or evicted pages that are touched
refault (major faults). When anonymous demand cannot be met even after reclaim and after the
OOM notifiers (virtio's deflate-on-OOM) had their say, the guest OOM-kills its workload.
kswapd reclaims in the background at the end of each step when free memory is under the low
watermark, up to the high watermark (not stall time, as in PSI).

Stall accounting in the spirit of PSI ``some``: time a task waited on direct reclaim, swap-out,
a swap-in or the refault of a file page the guest had evicted (a first read of file data is
I/O, not memory pressure), using the per-page costs below, capped at the step length.

Cost: a step with unchanged demand and nothing to refault returns at once; otherwise work is
proportional to the pages that change. A mostly idle 8 GiB guest costs about what a 1 GiB one
does.

This module does no I/O and reads no clock: ``now`` and ``dt`` are passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from memballoon.guest.pfndeque import PfnDeque
from memballoon.guest.workload import Demand
from memballoon.model.errors import UsageError
from memballoon.model.pages import (
    PageStore,
    PfnArray,
    block_frames,
    coalesce,
    has_repeats,
    merge_ranges,
    run_list_frames,
)
from memballoon.model.units import MIB, PAGE_SIZE, PageState

BLOCK_ORDER = 9  # 2 MiB blocks: Linux page_reporting_order on x86-64
BLOCK_PAGES = 1 << BLOCK_ORDER

# Per-page costs of the stall accounting (seconds). Chosen for a guest on SSD-backed swap:
# dropping a clean cache page ~2 us, writing a page to swap ~10 us, a 4 KiB random read
# (swap-in or file refault) ~100 us.
DIRECT_RECLAIM_S_PER_PAGE = 2e-6
SWAP_OUT_S_PER_PAGE = 10e-6
MAJOR_FAULT_S = 100e-6

# kswapd and direct reclaim work in batches of SWAP_CLUSTER_MAX pages (include/linux/swap.h).
SWAP_CLUSTER_MAX = 32

_EMPTY = np.empty(0, dtype=np.int64)
FEW_RUNS = 16  # up to this many runs, a slice of the state each beats a pass over their frames
# blocks a take of a few runs looks at (``GuestMemory._take_runs``): more is a bulk take
_FEW_BLOCKS = 8
# Plain ints for the hot paths: an IntEnum member lookup costs a metaclass __getattr__ call.
_FREE = int(PageState.FREE)
_ANON = int(PageState.ANON)
_CACHE = int(PageState.CACHE)
_BALLOON = int(PageState.BALLOON)
_ISOLATED = int(PageState.ISOLATED)


@dataclass(frozen=True, slots=True)
class Watermarks:
    min: int
    low: int
    high: int


def linux_watermarks(managed_pages: int) -> Watermarks:
    """Linux's zone watermarks for ``managed_pages`` of low memory (see module docstring)."""
    lowmem_kb = managed_pages * (PAGE_SIZE // 1024)
    min_kb = int(math.sqrt(lowmem_kb * 16))
    min_kb = max(128, min(min_kb, 262144))
    wmin = min_kb // (PAGE_SIZE // 1024)
    return Watermarks(min=wmin, low=wmin + wmin // 4, high=wmin + wmin // 2)


@dataclass(frozen=True, slots=True)
class MemInfo:
    """A snapshot of /proc/meminfo-like figures, in pages."""

    total_pages: int  # frames the guest has (its RAM)
    managed_pages: int  # MemTotal: total minus reserved minus what the balloon took out of it
    free_pages: int  # MemFree (isolated frames under reporting excluded)
    available_pages: int  # MemAvailable (si_mem_available)
    anon_pages: int
    cache_pages: int
    balloon_pages: int
    reserved_pages: int
    swap_total_pages: int
    swapped_pages: int


@dataclass(slots=True)
class VmEvents:
    """Cumulative /proc/vmstat-like counters (the virtio stat tags are read from these)."""

    swap_in: int = 0  # pages
    swap_out: int = 0  # pages
    major_faults: int = 0
    minor_faults: int = 0
    oom_kills: int = 0
    alloc_stalls: int = 0  # allocations that entered direct reclaim
    async_scan: int = 0  # pages scanned by kswapd
    direct_scan: int = 0
    async_reclaim: int = 0  # pages reclaimed by kswapd
    direct_reclaim: int = 0
    stall_us: int = 0  # PSI-like "some" stall, microseconds, cumulative


class StepReport(NamedTuple):
    """What one ``step`` did: enough for a pressure report and for the tests (a named tuple:
    a busy guest builds one a period, at a fraction of a frozen dataclass's cost)."""

    now: float
    dt: float
    stall_s: float
    major_faults: int
    swap_in: int
    swap_out: int
    oom_killed: bool
    oom_deflated_pages: int
    idle: bool  # nothing changed: the fast path

    @property
    def stall_pct(self) -> float:
        return 100.0 * self.stall_s / self.dt if self.dt > 0 else 0.0


OomNotifier = Callable[[], int]


@dataclass
class _Tally:
    stall_s: float = 0.0
    major: int = 0
    swap_in: int = 0
    swap_out: int = 0
    oom_deflated: int = 0


class GuestMemory:
    """One guest's physical memory (see the module docstring)."""

    def __init__(
        self,
        total_pages: int,
        *,
        reserved_pages: int | None = None,
        swap_pages: int = 0,
        store: PageStore | None = None,
        host_page_frames: int = 1,
    ) -> None:
        if total_pages < 4 * BLOCK_PAGES:
            raise UsageError(f"a guest needs at least {4 * BLOCK_PAGES} pages, got {total_pages}")
        if reserved_pages is None:
            # kernel image, page tables, struct pages (~1.6%): at least 16 MiB
            reserved_pages = max(16 * MIB // PAGE_SIZE, total_pages // 64)
        if not 0 < reserved_pages < total_pages // 2:
            raise UsageError(f"reserved_pages {reserved_pages} out of range")
        if swap_pages < 0:
            raise UsageError("swap_pages must be >= 0")
        if host_page_frames not in (1, BLOCK_PAGES):
            raise UsageError(f"host pages of {host_page_frames} frames: 1 or {BLOCK_PAGES}")
        self.total_pages = total_pages
        self.reserved_pages = reserved_pages
        self.swap_total_pages = swap_pages
        self.store = store
        self.state: npt.NDArray[np.uint8] = np.zeros(total_pages, dtype=np.uint8)
        self.state[:reserved_pages] = PageState.RESERVED
        nblocks = -(-total_pages // BLOCK_PAGES)
        self._bfree: npt.NDArray[np.int32] = np.full(nblocks, BLOCK_PAGES, dtype=np.int32)
        self._bfree[-1] = total_pages - (nblocks - 1) * BLOCK_PAGES
        self.reported: npt.NDArray[np.bool_] = np.zeros(nblocks, dtype=np.bool_)
        # blocks wholly free and not reported, kept where ``_bfree`` and ``reported`` change:
        # ``has_reportable`` (asked every period of a busy virtio guest) without a pass
        self._reportable = self._count_reportable()
        self._block_sub(np.arange(reserved_pages, dtype=np.int64))
        # the states a row per whole block (a view): whole-block takes write rows, no frame list
        whole = total_pages // BLOCK_PAGES
        self._state_rows = self.state[: whole * BLOCK_PAGES].reshape(whole, BLOCK_PAGES)
        self._free = total_pages - reserved_pages
        self._hint = 0  # block the last allocation took from
        self._hint_free: PfnArray = _EMPTY  # cached free frames of that block (single takes)
        self._hint_pos = 0
        self.host_page_frames = host_page_frames
        self._fill_block = -1  # huge host pages: the block the balloon is filling
        self._fill_pos = 0  # and the frame after the last it took there
        self._isolated = 0
        self._balloon = 0
        self._managed_adjust = 0  # pages the balloon took out of MemTotal
        self.anon = PfnDeque()
        self.cache = PfnDeque()
        self.swapped = 0
        self.events = VmEvents()
        self.watermarks = linux_watermarks(total_pages - reserved_pages)
        self._oom_notifiers: list[OomNotifier] = []
        self._last_demand: Demand | None = None
        self._carry_anon = 0.0  # fractional cold refaults carried to the next step
        self._carry_file = 0.0
        self._file_evicted = 0  # file working-set pages evicted from the cache, not read since
        self.generation = 0  # stamps page contents written by the workload

    # ------------------------------------------------------------------ figures
    @property
    def free_pages(self) -> int:
        return self._free

    @property
    def balloon_pages(self) -> int:
        """Frames owned by the balloon driver (in the balloon, refused, or in flight)."""
        return self._balloon

    @property
    def managed_pages(self) -> int:
        return self.total_pages - self.reserved_pages - self._managed_adjust

    def available_pages(self) -> int:
        # si_mem_available(): free minus reserves, plus the page cache that can go
        cache = len(self.cache)
        wm = self.watermarks
        avail = self._free - wm.high + cache - min(cache // 2, wm.low)
        return max(0, avail)

    def meminfo(self) -> MemInfo:
        return MemInfo(
            total_pages=self.total_pages,
            managed_pages=self.managed_pages,
            free_pages=self._free,
            available_pages=self.available_pages(),
            anon_pages=len(self.anon),
            cache_pages=len(self.cache),
            balloon_pages=self._balloon,
            reserved_pages=self.reserved_pages,
            swap_total_pages=self.swap_total_pages,
            swapped_pages=self.swapped,
        )

    # ------------------------------------------------------------------ block bookkeeping
    def _block_sub(self, pfns: PfnArray) -> None:
        self._block_add(pfns, -1)

    def _block_add(self, pfns: PfnArray, sign: int = 1) -> None:
        k = int(pfns.size)
        if k == 0:
            return
        if k == 1:
            self._block_count(int(pfns[0]) >> BLOCK_ORDER, sign)
            return
        blocks = pfns >> BLOCK_ORDER
        lo, hi = int(blocks.min()), int(blocks.max())
        if lo == hi:  # one block (the usual)
            self._block_count(lo, sign * k)
            return
        if lo < 0:  # negative frames index from the end, as the state array's do
            np.add.at(self._bfree, blocks, sign)
            self._reportable = self._count_reportable()
            return
        # frames in any order: a count per block of their span (no sort, no per-run arrays;
        # the span is at most the guest's blocks)
        counts = np.bincount(blocks - lo)
        seg = self._bfree[lo : hi + 1]
        before = self._count_reportable(lo, hi + 1)
        if sign > 0:
            seg += counts
        else:
            seg -= counts
        self._reportable += self._count_reportable(lo, hi + 1) - before

    def _block_count(self, b: int, delta: int) -> None:
        """``delta`` frames more free in block ``b`` (``_reportable`` kept)."""
        bfree = self._bfree
        c = int(bfree[b])
        bfree[b] = c + delta
        if not self.reported[b]:
            self._reportable += (c + delta == BLOCK_PAGES) - (c == BLOCK_PAGES)

    def _count_reportable(self, lo: int = 0, hi: int | None = None) -> int:
        """Blocks ``lo`` to ``hi`` (excluded; None: the last) wholly free and not reported."""
        # for booleans ``a & ~b`` is ``a > b`` (one call less)
        return int(np.count_nonzero((self._bfree[lo:hi] == BLOCK_PAGES) > self.reported[lo:hi]))

    def _count_reportable_of(self, blocks: npt.NDArray[np.intp]) -> int:
        """Of ``blocks`` (no repeats), those wholly free and not reported."""
        return int(np.count_nonzero((self._bfree[blocks] == BLOCK_PAGES) > self.reported[blocks]))

    # ------------------------------------------------------------------ raw allocation
    def _take_free(self, n: int, floor: int, new: PageState) -> PfnArray:
        """Take up to ``n`` free frames into state ``new``, leaving ``floor`` free (no reclaim).

        The state is set here, at once, so that a second take in the same allocation cannot
        find the same frames. They come back ascending within each block: runs coalesce well.
        """
        n = min(n, self._free - floor)
        if n <= 0:
            return _EMPTY
        v = int(new)  # numpy stores a plain int faster than an IntEnum member
        if n == 1:
            # fast path for the seed's page-at-a-time loop: walk a cached list of the free
            # frames of the current block, re-checking each (other paths may have taken it)
            hf = self._hint_free
            while self._hint_pos < hf.size:
                pfn = int(hf[self._hint_pos])
                self._hint_pos += 1
                if self.state[pfn] == _FREE and not self.reported[pfn >> BLOCK_ORDER]:
                    self.state[pfn] = v
                    self._block_count(pfn >> BLOCK_ORDER, -1)
                    self._free -= 1
                    return np.array([pfn], dtype=np.int64)
            b = self._hint
            if self._bfree[b] > 0 and not self.reported[b]:
                lo = b * BLOCK_PAGES
                self._hint_free = (
                    (self.state[lo : lo + BLOCK_PAGES] == _FREE).nonzero()[0] + lo
                )
                self._hint_pos = 0
                if self._hint_free.size:
                    return self._take_free(1, floor, new)
        else:
            runs = self._take_runs(n, v)
            if runs:
                return run_list_frames(runs)
        return self._take_search(n, v)

    def _take_runs(self, n: int, v: int) -> list[tuple[int, int]]:
        """When the ``n`` (> 1, at most the free frames) frames ``_take_free`` would take are
        a few runs found with a look at a few blocks: take them as it would (the same state,
        counts, cursor and reported blocks) and return them as ``(first, length)`` runs in
        its order; else nothing changed and no runs.

        The usual refill of a page cache or a heap: a block is filled from its bottom, so the
        free frames of the block the last allocation took from are one run at its top, and a
        take goes on at the bottom of the next block in the search's order (``_take_search``:
        blocks not reported first, each ascending). Each block's part must be one run, and
        at most ``_FEW_BLOCKS`` blocks are looked at; a bulk take is the search's.
        """
        if n < 2 or n > _FEW_BLOCKS * BLOCK_PAGES:  # a single take: its own cursor
            return []
        bfree, state, reported = self._bfree, self.state, self.reported
        b = self._hint
        have = int(bfree[b])
        if have >= n and not reported[b]:  # the search's first case: this block alone
            lo = b * BLOCK_PAGES
            first = lo if have == BLOCK_PAGES else lo + int(state[lo : lo + BLOCK_PAGES].argmin())
            # (argmin: the first free frame, FREE being 0; count_nonzero, not ``any``: a C
            # call, where ``any`` is a Python wrapper around a reduction.) A block filled from
            # its bottom (wholly free, too) has its free frames from the first to its top:
            # their count tells, without that look
            if first + have != lo + BLOCK_PAGES and (
                    first + n > lo + BLOCK_PAGES or np.count_nonzero(state[first : first + n])):
                return []
            state[first : first + n] = v
            bfree[b] = have - n
            if have == BLOCK_PAGES:
                self._reportable -= 1
            self._free -= n
            return [(first, n)]
        # the search's order: blocks with free frames not reported, then reported ones
        has = bfree > 0
        unreported = has > reported
        ucand = unreported.nonzero()[0]
        pieces: list[tuple[int, int, int]] = []  # (block, first frame, frames)
        got = self._pieces(ucand[:_FEW_BLOCKS].tolist(), n, pieces)
        if 0 <= got < n and ucand.size < _FEW_BLOCKS:  # every unreported one looked at
            more = (has & reported).nonzero()[0][: _FEW_BLOCKS - int(ucand.size)]
            got = self._pieces(more.tolist(), n, pieces, got)
        if got != n:
            return []  # a part not one run, or beyond the blocks looked at
        runs: list[tuple[int, int]] = []
        for y, f, t in pieces:
            state[f : f + t] = v
            c = int(bfree[y])
            bfree[y] = c - t
            if c == BLOCK_PAGES and not reported[y]:
                self._reportable -= 1
            reported[y] = False  # the host refaults these blocks' pages on touch
            if runs and runs[-1][0] + runs[-1][1] == f:
                runs[-1] = (runs[-1][0], runs[-1][1] + t)
            else:
                runs.append((f, t))
        self._hint = pieces[-1][0]
        self._free -= n
        return runs

    def _pieces(self, blocks: list[int], n: int, pieces: list[tuple[int, int, int]],
                got: int = 0) -> int:
        """``_take_runs``' parts of ``blocks`` in order, each block's first free frames up to
        ``n`` in all, appended to ``pieces`` (nothing taken yet); returns the frames they
        make, or -1 when a part is not one run."""
        bfree, state, tp = self._bfree, self.state, self.total_pages
        for y in blocks:
            if got >= n:
                break
            c = int(bfree[y])
            t = min(c, n - got)
            ylo = y * BLOCK_PAGES
            f = ylo
            if c != BLOCK_PAGES:
                yend = min(ylo + BLOCK_PAGES, tp)
                f += int(state[ylo:yend].argmin())
                # (free from the first free frame to its top: the count tells, no look)
                if f + c != ylo + BLOCK_PAGES and (
                        f + t > yend or np.count_nonzero(state[f : f + t])):
                    return -1
            pieces.append((y, f, t))
            got += t
        return got

    def _take_search(self, n: int, v: int) -> PfnArray:
        """``_take_free``'s take of ``n`` (at most the free frames) frames in general."""
        b = self._hint
        have = int(self._bfree[b])
        if have >= n and not self.reported[b]:
            # the block the last allocation took from still has enough: take from it alone
            # (its first n free frames: the first n frames when it is wholly free)
            lo = b * BLOCK_PAGES
            if have == BLOCK_PAGES:
                self.state[lo : lo + n] = v
                out = np.arange(lo, lo + n, dtype=np.int64)
            else:
                out = (self.state[lo : lo + BLOCK_PAGES] == _FREE).nonzero()[0][:n] + lo
                self.state[out] = v
            self._bfree[b] = have - n
            if have == BLOCK_PAGES:
                self._reportable -= 1
            self._free -= n
            return out
        bfree = self._bfree
        has = bfree > 0
        # the first candidate: the lowest block with free frames not reported, else (all
        # reported) the lowest with free frames; found without listing the candidates
        unreported = has > self.reported
        b = int(unreported.argmax())
        if not unreported[b]:
            b = int(has.argmax())
        have = int(bfree[b])
        if have >= n:  # the first block holds them all (the usual small take)
            out = self._free_frames_of(b, n)
            self.state[out] = v
            bfree[b] = have - n
            if have == BLOCK_PAGES and not self.reported[b]:
                self._reportable -= 1
            self.reported[b] = False  # the host refaults this block's pages on touch
            self._hint = b
            self._free -= n
            return out
        cand = has.nonzero()[0]
        if self.reported.any():
            rep = self.reported[cand]
            cand = np.concatenate((cand[~rep], cand[rep]))
        # the first free frames of each block in that order until n (one numpy pass, not a
        # loop over blocks: a balloon's bulk rounds take thousands of blocks at once); the
        # counts summed over a first few blocks, then over all if those hold too few
        cum = np.cumsum(bfree[cand[:16]], dtype=np.int64)
        if int(cum[-1]) < n:
            cum = np.cumsum(bfree[cand], dtype=np.int64)
        last = int(np.searchsorted(cum, n))  # the block the n-th frame is in (not the first)
        blocks = cand[: last + 1]
        out = self._take_blocks_free(blocks, n - int(cum[last - 1]), v)
        self._reportable -= self._count_reportable_of(blocks)
        bfree[blocks[:-1]] = 0
        bfree[blocks[-1]] -= n - int(cum[last - 1])
        self.reported[blocks] = False  # the host refaults these blocks' pages on touch
        self._hint = int(blocks[-1])
        self._free -= n
        return out

    def _take_blocks_free(self, blocks: npt.NDArray[np.intp], m: int, new: int) -> PfnArray:
        """Every free frame of ``blocks`` but the last, then the first ``m`` of the last,
        marked ``new``, block by block. A bulk take is mostly wholly free blocks after a few
        partly used ones: those are looked at frame by frame, the whole ones are known
        without a look and marked a row each (a partial last block of the guest is never
        wholly free, so they are rows).

        When the whole ones are consecutive (the usual), the frames are one range of the
        output with a few looked-at ones either side: the output is that range, made at its
        final size, the sides written over it (no list of parts joined: the join was a second
        pass over a balloon round's hundreds of thousands of frames); else the parts
        (``_take_blocks_free_parts``, the reference)."""
        whole = self._bfree[blocks[:-1]] == BLOCK_PAGES
        p = 0 if bool(whole.all()) else int((~whole).nonzero()[0][-1]) + 1
        mid = blocks[p:-1]
        if mid.size == 0:
            return self._take_blocks_free_parts(blocks, m, new)
        lo, hi = int(mid[0]), int(mid[-1]) + 1
        if hi - lo != mid.size or not bool((mid[1:] - mid[:-1] == 1).all()):
            return self._take_blocks_free_parts(blocks, m, new)
        head = self._free_frames_in(blocks[:p]) if p else _EMPTY
        tail = self._free_frames_of(int(blocks[-1]), m)
        h, t = int(head.size), int(tail.size)
        start = lo * BLOCK_PAGES
        out = np.arange(start - h, hi * BLOCK_PAGES + t, dtype=np.int64)
        if h:
            self.state[head] = new
            out[:h] = head
        self.state[start : hi * BLOCK_PAGES] = new
        if t:
            self.state[tail] = new
            out[-t:] = tail
        return out

    def _take_blocks_free_parts(self, blocks: npt.NDArray[np.intp], m: int, new: int
                                ) -> PfnArray:
        """``_take_blocks_free`` as a list of parts joined: the blocks up to the last partly
        used one (the last block aside) looked at, the whole ones after them a slice or rows,
        the last block looked at."""
        whole = self._bfree[blocks[:-1]] == BLOCK_PAGES
        p = 0 if bool(whole.all()) else int((~whole).nonzero()[0][-1]) + 1
        parts: list[PfnArray] = []
        if p:  # the partly used blocks up to the last of them
            head = self._free_frames_in(blocks[:p])
            self.state[head] = new
            parts.append(head)
        mid = blocks[p:-1]
        if mid.size:
            lo, hi = int(mid[0]), int(mid[-1]) + 1
            # consecutive blocks (the order may go back to reported ones, so the steps are
            # checked, not only the ends): a slice and a range, not an index
            if hi - lo == mid.size and bool((mid[1:] - mid[:-1] == 1).all()):
                self.state[lo * BLOCK_PAGES : hi * BLOCK_PAGES] = new
                parts.append(np.arange(lo * BLOCK_PAGES, hi * BLOCK_PAGES, dtype=np.int64))
            else:
                self._state_rows[mid] = new
                parts.append(block_frames(mid, BLOCK_ORDER))
        tail = self._free_frames_of(int(blocks[-1]), m)
        self.state[tail] = new
        parts.append(tail)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _free_frames_in(self, blocks: npt.NDArray[np.intp]) -> PfnArray:
        """Every free frame of ``blocks``, block by block in their order, ascending in each
        (the guest's partial last block may be anywhere among them: before reported ones)."""
        k = int(blocks.size)
        brk = ((blocks[1:] - blocks[:-1]) != 1).nonzero()[0] if k > 1 else _EMPTY
        if k > 0 and brk.size < 2 * FEW_RUNS:
            # a few groups of consecutive blocks (the usual): a slice of the state each, its
            # free frames found in place (no gather of rows, no arithmetic per frame; a slice
            # stops at the guest's end by itself)
            edges = [0, *(brk + 1).tolist(), k]
            state = self.state
            parts: list[PfnArray] = []
            for first, a, b in zip(blocks[edges[:-1]].tolist(), edges[:-1], edges[1:],
                                   strict=True):
                lo = first * BLOCK_PAGES
                parts.append((state[lo : lo + (b - a) * BLOCK_PAGES] == _FREE).nonzero()[0] + lo)
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._free_frames_in_rows(blocks)

    def _free_frames_in_rows(self, blocks: npt.NDArray[np.intp]) -> PfnArray:
        """``_free_frames_in`` of blocks in many groups, in one pass over their rows (the
        reference its slices keep)."""
        if int(blocks.max()) < len(self._state_rows):  # whole blocks: rows of the state
            # one flat nonzero over the rows (a 2-D one costs several times more)
            idx = (self._state_rows[blocks] == _FREE).reshape(-1).nonzero()[0]
            out: PfnArray = ((blocks[idx >> BLOCK_ORDER].astype(np.int64) << BLOCK_ORDER)
                             | (idx & (BLOCK_PAGES - 1)))
            return out
        frames = block_frames(blocks, BLOCK_ORDER)
        frames = frames[frames < self.total_pages]
        rest: PfnArray = frames[self.state[frames] == _FREE]
        return rest

    def _free_frames_of(self, b: int, k: int) -> PfnArray:
        """The first ``k`` free frames of block ``b`` (fewer if it has fewer), ascending."""
        lo = b * BLOCK_PAGES
        if self._bfree[b] == BLOCK_PAGES:
            return np.arange(lo, lo + min(k, BLOCK_PAGES), dtype=np.int64)
        out: PfnArray = (self.state[lo : lo + BLOCK_PAGES] == _FREE).nonzero()[0][:k] + lo
        return out

    def _give_free(self, pfns: PfnArray) -> None:
        runs = self._long_runs(pfns)
        if runs is not None:  # a slice of the state and block counts from its bounds a run
            self._give_slices(runs)
            return
        self._give_free_each(pfns)

    def _give_free_each(self, pfns: PfnArray) -> None:
        """``_give_free`` with a scatter and a count per frame (the reference of its runs)."""
        self.state[pfns] = _FREE
        self._block_add(pfns)
        self._free += int(pfns.size)

    def _long_runs(self, pfns: PfnArray) -> list[tuple[int, int]] | None:
        """``pfns`` as ``(first, length)`` runs of consecutive ascending frames when they are
        a few or long ones (a workload's whole LRU, a balloon's rounds) inside the guest: a
        slice each then costs less than a scatter and a count per frame; else None."""
        k = int(pfns.size)
        if k < 4 * FEW_RUNS:
            return None
        brk = ((pfns[1:] - pfns[:-1]) != 1).nonzero()[0]
        r = int(brk.size) + 1
        if r > FEW_RUNS and r * BLOCK_PAGES > k:  # short runs: a pass over the frames
            return None
        edges = np.empty(r + 1, dtype=np.int64)
        edges[0], edges[-1] = 0, k
        edges[1:-1] = brk + 1
        starts, lens = pfns[edges[:-1]], edges[1:] - edges[:-1]
        if int(starts.min()) < 0 or int((starts + lens).max()) > self.total_pages:
            return None  # (the state's negative indices, or an IndexError, as a scatter)
        return list(zip(starts.tolist(), lens.tolist(), strict=True))

    def _give_runs(self, runs: list[tuple[int, int]]) -> int:
        """``_give_free`` of the frames of ``(first, length)`` runs (a deque's oldest): a
        slice and block counts from their bounds a run; returns the frames given."""
        if len(runs) > FEW_RUNS:  # many short runs: one pass over their frames costs less
            pfns = run_list_frames(runs)
            self._give_free(pfns)
            return int(pfns.size)
        return self._give_slices(runs)

    def _give_slices(self, runs: list[tuple[int, int]]) -> int:
        """``_give_runs``, a slice of the state and block counts from its bounds a run."""
        state, bfree, n = self.state, self._bfree, 0
        for first, k in runs:
            end = first + k
            state[first:end] = _FREE
            b0, b1 = first >> BLOCK_ORDER, (end - 1) >> BLOCK_ORDER
            if b0 == b1:  # (``_block_count``, written out)
                c = int(bfree[b0])
                bfree[b0] = c + k
                if (c + k == BLOCK_PAGES or c == BLOCK_PAGES) and not self.reported[b0]:
                    self._reportable += (c + k == BLOCK_PAGES) - (c == BLOCK_PAGES)
            else:  # the run's part of its first and last block, whole blocks between
                self._block_count(b0, (b0 + 1) * BLOCK_PAGES - first)
                if b1 > b0 + 1:
                    before = self._count_reportable(b0 + 1, b1)
                    bfree[b0 + 1 : b1] += BLOCK_PAGES
                    self._reportable += self._count_reportable(b0 + 1, b1) - before
                self._block_count(b1, end - b1 * BLOCK_PAGES)
            n += k
        self._free += n
        return n

    # ------------------------------------------------------------------ reclaim
    def _reclaim(self, n: int, *, direct: bool, tally: _Tally) -> int:
        """Free up to ``n`` frames: coldest page cache first, then anonymous pages to swap."""
        freed = 0
        gone = self._give_runs(self.cache.pop_front_runs(n))
        if gone:
            freed += gone
            self._file_evicted += gone
        swap_room = self.swap_total_pages - self.swapped
        if freed < n and swap_room > 0:
            out = self._give_runs(self.anon.pop_front_runs(min(n - freed, swap_room)))
            if out:
                self.swapped += out
                self.events.swap_out += out
                tally.swap_out += out
                freed += out
                if direct:
                    tally.stall_s += out * SWAP_OUT_S_PER_PAGE
        ev = self.events
        if direct:
            ev.direct_scan += freed
            ev.direct_reclaim += freed
            tally.stall_s += freed * DIRECT_RECLAIM_S_PER_PAGE
        else:
            ev.async_scan += freed
            ev.async_reclaim += freed
        return freed

    def _take(self, n: int, floor: int, new: PageState) -> PfnArray:
        if new is PageState.BALLOON and self.host_page_frames > 1:
            return self._take_blocks(n, floor)
        return self._take_free(n, floor, new)

    def _take_blocks(self, n: int, floor: int) -> PfnArray:
        """Balloon frames in whole blocks (huge host pages): the block being filled, then
        wholly free ones; any free frame once no block is left (module docstring).

        A block is filled from its start, so a take is runs of frames: they are checked and
        marked with slices, and the whole blocks a large take needs are found in one pass."""
        n = min(n, self._free - floor)
        if n <= 0:
            return _EMPTY
        parts: list[PfnArray] = []
        got = 0
        while got < n:
            b = self._fill_block
            if b < 0 or self._bfree[b] == 0:
                if n - got >= BLOCK_PAGES:  # whole blocks, at once
                    blocks = self._whole_blocks((n - got) // BLOCK_PAGES)
                    if blocks.size:
                        self._take_whole(blocks)
                        parts.append(block_frames(blocks, BLOCK_ORDER))
                        got += int(blocks.size) * BLOCK_PAGES
                        continue
                b = self._whole_block()
                if b < 0:
                    break
                self._fill_block = b
                self._fill_pos = b * BLOCK_PAGES
            k = min(n - got, int(self._bfree[b]))
            lo = self._fill_pos
            if lo + k <= (b + 1) * BLOCK_PAGES and bool((self.state[lo : lo + k] == _FREE).all()):
                idx = np.arange(lo, lo + k, dtype=np.int64)  # the run after the last take
                self.state[lo : lo + k] = _BALLOON
            else:  # the workload took or freed frames of the block meanwhile
                idx = self._free_frames_of(b, k)
                self.state[idx] = _BALLOON
            self._fill_pos = int(idx[-1]) + 1
            self._block_count(b, -k)
            self.reported[b] = False  # the host refaults this block's pages on touch
            parts.append(idx)
            got += k
        out = _EMPTY if not parts else parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._free -= got
        if got < n:
            more = self._take_free(n - got, floor, PageState.BALLOON)
            out = np.concatenate((out, more)) if got else more
        return out

    def _whole_blocks(self, k: int) -> npt.NDArray[np.int64]:
        """Up to ``k`` wholly free blocks, not reported ones first, ascending."""
        whole = self._bfree == BLOCK_PAGES
        blocks: npt.NDArray[np.intp] = (whole & ~self.reported).nonzero()[0][:k]
        if blocks.size < k and self.reported.any():
            more = (whole & self.reported).nonzero()[0][: k - blocks.size]
            blocks = np.sort(np.concatenate((blocks, more)))
        return blocks.astype(np.int64)

    def _take_whole(self, blocks: npt.NDArray[np.int64]) -> None:
        """Mark wholly free ``blocks`` as the balloon's (the caller counts their frames off
        ``_free``)."""
        self._state_rows[blocks] = _BALLOON  # wholly free blocks are whole blocks
        self._reportable -= self._count_reportable_of(blocks)
        self._bfree[blocks] = 0
        self.reported[blocks] = False  # the host refaults these on touch

    def _whole_block(self) -> int:
        """A wholly free block, one not reported to the host first; -1 if there is none."""
        whole = self._bfree == BLOCK_PAGES
        free = whole & ~self.reported
        i = int(free.argmax())
        if free[i]:
            return i
        i = int(whole.argmax())
        return i if whole[i] else -1

    def _forget(self, pfns: PfnArray) -> None:
        """Tell the store the balloon took these frames (with huge host pages: the blocks
        among theirs that are now wholly in the balloon)."""
        if self.store is None or pfns.size == 0 or getattr(self.store, "forget_is_noop", False):
            return  # (a store whose forget does nothing: no ranges to build for it)
        if self.host_page_frames == 1:
            self.store.forget(coalesce(pfns))
            return
        lo, hi = int(pfns.min()) >> BLOCK_ORDER, int(pfns.max()) >> BLOCK_ORDER
        # the blocks these frames are in: all in [lo, hi] for the runs _take_blocks makes
        span = hi - lo + 1
        blocks = (np.arange(lo, hi + 1) if span <= 2 * (pfns.size // BLOCK_PAGES) + 8
                  else np.unique(pfns >> BLOCK_ORDER))
        cand = blocks[self._bfree[blocks] == 0]
        if cand.size == 0:
            return
        whole = cand[(self.state[block_frames(cand, BLOCK_ORDER)] == _BALLOON)
                     .reshape(-1, BLOCK_PAGES).all(axis=1)]
        if whole.size:
            starts = whole.astype(np.int64) * BLOCK_PAGES
            self.store.forget(merge_ranges(starts, starts + BLOCK_PAGES))

    def _alloc(
        self, n: int, floor: int, new: PageState, *, reclaim: bool, tally: _Tally
    ) -> PfnArray:
        got = self._take(n, floor, new)
        if got.size >= n or not reclaim:
            return got
        self.events.alloc_stalls += 1
        short = n - int(got.size)
        batch = max(short, SWAP_CLUSTER_MAX)
        self._reclaim(batch, direct=True, tally=tally)
        more = self._take(short, floor, new)
        return np.concatenate((got, more)) if got.size else more

    # ------------------------------------------------------------------ the balloon's API
    def alloc_nosleep(self, n: int) -> PfnArray:
        """Up to ``n`` frames for the balloon from free memory above the min watermark."""
        pfns = self._take(n, self.watermarks.min, PageState.BALLOON)
        self._balloon += int(pfns.size)
        self._forget(pfns)
        return pfns

    def alloc_nosleep_each(self, n: int, keep: Callable[[PfnArray], int]) -> PfnArray:
        """What ``n`` calls of ``alloc_nosleep(1)`` take, in one call: the same frames in the
        same order, and the same state after (the allocator's cursor included), so the seed's
        page-at-a-time loop can run in bulk in the simulator (a property test holds it to
        that). ``keep(frames)`` says how many of them, from the first, the caller keeps (a
        host that locks them in order until it would refuse one); the rest are as if never
        taken. Returns the frames kept. 4 KiB host pages only (huge ones fill blocks their
        own way, ``_take_blocks``)."""
        if self.host_page_frames != 1:
            raise UsageError("alloc_nosleep_each: 4 KiB host pages only")
        saved = (self._hint, self._hint_free, self._hint_pos, self.reported.copy(),
                 self._reportable)
        frames = self._take_singles(n, self.watermarks.min)
        kept = keep(frames) if frames.size else 0
        if not 0 <= kept <= frames.size:
            raise UsageError(f"keep answered {kept} of {frames.size} frames")
        if kept < frames.size:
            # undo, and take exactly what the first ``kept`` single calls would have
            self._give_free(frames)
            self._hint, self._hint_free, self._hint_pos = saved[:3]
            self.reported[:] = saved[3]
            self._reportable = saved[4]  # (the blocks as free as then, too)
            frames = self._take_singles(kept, self.watermarks.min)
        self._balloon += int(frames.size)
        self._forget(frames)
        return frames

    def alloc_sleep_each(
        self, n: int, keep: Callable[[PfnArray], int]
    ) -> tuple[PfnArray, int, bool]:
        """What up to ``n`` calls of ``alloc_sleep(1)`` take, each frame offered to ``keep``
        (``alloc_nosleep_each``'s) in order, in few calls: a call that finds a frame above the
        min watermark takes what ``alloc_nosleep_each`` would, and one that must reclaim
        stalls and reclaims as ``alloc_sleep(1)`` does (its events and stall), its frame the
        first of the single takes after it, offered with them. Stops at the first frame
        ``keep`` declines: one taken without reclaim is as if never taken; one a reclaiming
        call took stays taken and is returned apart (the caller goes on with it as after
        ``alloc_sleep(1)``), else -1. Returns the frames kept, that frame, and whether the
        last call found none (as ``alloc_sleep(1)`` does, its stall and reclaim done). The
        same state after as those calls (a property test holds it to that). 4 KiB host pages
        only."""
        if self.host_page_frames != 1:
            raise UsageError("alloc_sleep_each: 4 KiB host pages only")
        parts: list[PfnArray] = []
        got = 0
        floor = self.watermarks.min
        while got < n:
            room = self._free - floor
            reclaimed = room <= 0
            if reclaimed:
                # alloc_sleep(1): its take finds nothing above the watermark, so it stalls and
                # reclaims; the take after that is the first of the single takes below
                tally = _Tally()
                self.events.alloc_stalls += 1
                self._reclaim(max(1, SWAP_CLUSTER_MAX), direct=True, tally=tally)
                self._account_stall(tally.stall_s)
                room = self._free - floor
                if room <= 0:
                    return self._joined(parts), -1, True
            saved = (self._hint, self._hint_free, self._hint_pos, self.reported.copy(),
                     self._reportable)
            frames = self._take_singles(min(room, n - got), floor)
            kept = keep(frames)
            if not 0 <= kept <= frames.size:
                raise UsageError(f"keep answered {kept} of {frames.size} frames")
            declined = kept < frames.size
            if declined:
                # undo, and take what the first ``kept`` single takes would have; a frame
                # that a reclaiming call took stays taken, returned apart
                self._give_free(frames)
                self._hint, self._hint_free, self._hint_pos = saved[:3]
                self.reported[:] = saved[3]
                self._reportable = saved[4]  # (the blocks as free as then, too)
                if kept == 0 and reclaimed:
                    head = self._take_singles(1, floor)
                    self._balloon += 1
                    self._forget(head)
                    return self._joined(parts), int(head[0]), False
                frames = self._take_singles(kept, floor)
            self._balloon += int(frames.size)
            self._forget(frames)
            parts.append(frames)
            got += int(frames.size)
            if declined:
                break
        return self._joined(parts), -1, False

    @staticmethod
    def _joined(parts: list[PfnArray]) -> PfnArray:
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take_singles(self, n: int, floor: int) -> PfnArray:
        """``n`` calls of ``_take_free(1, floor, BALLOON)`` at once: the walk of the cached
        free frames of the current block vectorized, the rest by the single take itself."""
        n = min(n, self._free - floor)
        if n <= 0:
            return _EMPTY
        parts: list[PfnArray] = []
        got = 0
        while got < n:
            hf, pos = self._hint_free, self._hint_pos
            if pos < hf.size:
                rest = hf[pos:]
                # the cached frames are one block's (each cache is filled from one block)
                if self.reported[int(rest[0]) >> BLOCK_ORDER]:
                    self._hint_pos = hf.size
                    continue
                head = rest[: n - got]
                if not np.count_nonzero(self.state[head]):  # FREE is 0 (one C call)
                    # the next cached frames are all still free (the usual): they are the take
                    take = head.copy()
                    k = int(take.size)
                    self._hint_pos = pos + k
                    self.state[take] = _BALLOON
                    self._block_count(int(take[0]) >> BLOCK_ORDER, -k)
                    self._free -= k
                    parts.append(take)
                    got += k
                    continue
                ok = (self.state[rest] == _FREE).nonzero()[0]
                if ok.size >= n - got:
                    ok = ok[: n - got]
                    self._hint_pos = pos + int(ok[-1]) + 1
                else:
                    self._hint_pos = hf.size
                if ok.size:
                    take = rest[ok]
                    k = int(take.size)
                    self.state[take] = _BALLOON
                    self._block_count(int(take[0]) >> BLOCK_ORDER, -k)  # all of one block
                    self._free -= k
                    parts.append(take)
                    got += k
                continue
            b = self._hint
            if self._bfree[b] > 0 and not self.reported[b]:
                lo = b * BLOCK_PAGES
                self._hint_free = (self.state[lo : lo + BLOCK_PAGES] == _FREE).nonzero()[0] + lo
                self._hint_pos = 0
                if self._hint_free.size:
                    continue
            parts.append(self._take_lowest(n - got))
            break
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take_lowest(self, k: int) -> PfnArray:
        """``k`` single takes once the cursor's block is spent: each takes the first free frame
        of the lowest block with any (blocks not reported first) and moves the cursor there,
        and the takes after it walk that block's free frames (refreshed on the second take),
        so the blocks are emptied one after the other in that order."""
        cand = (self._bfree > 0).nonzero()[0]
        if self.reported.any():
            rep = self.reported[cand]
            cand = np.concatenate((cand[~rep], cand[rep]))
        counts = self._bfree[cand].astype(np.int64)
        cum = np.cumsum(counts)
        last = int(np.searchsorted(cum, k))  # the block the k-th take ends in
        blocks = cand[: last + 1]
        m_last = k - (int(cum[last - 1]) if last else 0)
        # the cache as the single takes leave it: the free frames of the last block they took
        # a second frame from, after its first, walked as far as they went (listed before
        # the take marks them)
        if m_last >= 2:
            j, walked = last, m_last
        else:
            twice = (counts[:last] >= 2).nonzero()[0]
            j = int(twice[-1]) if twice.size else -1
            walked = int(counts[j]) if j >= 0 else 0
        hint_free = self._free_frames_of(int(blocks[j]), BLOCK_PAGES) if j >= 0 else _EMPTY
        # every free frame of the blocks before the last, then the first m_last of it: the
        # partly used blocks looked at, the wholly free ones marked a slice or a row each
        take = self._take_blocks_free(blocks, m_last, _BALLOON)
        self._reportable -= self._count_reportable_of(blocks)
        self._bfree[blocks[:-1]] = 0
        self._bfree[blocks[-1]] -= m_last
        self.reported[blocks] = False
        self._free -= k
        self._hint = int(blocks[-1])
        if j >= 0:
            self._hint_free = hint_free[1:]
            self._hint_pos = walked - 1
        return take

    def alloc_sleep(self, n: int) -> PfnArray:
        """Up to ``n`` frames for the balloon; may reclaim, never below the min watermark."""
        tally = _Tally()
        pfns = self._alloc(n, self.watermarks.min, PageState.BALLOON, reclaim=True, tally=tally)
        self._account_stall(tally.stall_s)
        self._balloon += int(pfns.size)
        self._forget(pfns)
        return pfns

    def alloc_huge(self, n: int) -> PfnArray:
        """Up to ``n`` wholly free 2 MiB blocks for the balloon, without reclaim.

        Linux's 2 MiB balloon pages (``alloc_pages`` of order 9 without ``__GFP_RECLAIM``):
        only blocks free as a whole, blocks not yet reported to the host first, and never
        below the min watermark. Returns the blocks' first frames, ascending.
        """
        k = min(n, (self._free - self.watermarks.min) // BLOCK_PAGES)
        if k <= 0:
            return _EMPTY
        blocks = self._whole_blocks(k)
        if blocks.size == 0:
            return _EMPTY
        self._take_whole(blocks)
        taken = int(blocks.size) * BLOCK_PAGES
        self._free -= taken
        self._balloon += taken
        starts = blocks * BLOCK_PAGES
        if self.store is not None and not getattr(self.store, "forget_is_noop", False):
            self.store.forget(merge_ranges(starts, starts + BLOCK_PAGES))
        return starts

    def free_balloon(self, pfns: PfnArray) -> None:
        """Give frames the balloon driver owns back to the guest's free memory."""
        if pfns.size == 0:
            return
        if not bool((self.state[pfns] == _BALLOON).all()):
            raise UsageError("free_balloon: a frame that the balloon does not own")
        if has_repeats(pfns):
            raise UsageError("free_balloon: a frame given twice")
        self._give_free(pfns)
        self._balloon -= int(pfns.size)

    def free_balloon_runs(self, runs: list[tuple[int, int]]) -> None:
        """``free_balloon`` of the frames of ``(first, length)`` runs (a balloon deque's
        ``pop_back_runs``): a slice of the state a run, not a gather and a scatter of every
        frame (a deflate of whole rounds gives back a few long runs). The same state, counts
        and errors."""
        tp, state = self.total_pages, self.state
        if any(f < 0 or k <= 0 or f + k > tp for f, k in runs):
            self.free_balloon(run_list_frames(runs))  # frame by frame
            return
        for f, k in runs:
            if np.count_nonzero(state[f : f + k] != _BALLOON):
                raise UsageError("free_balloon: a frame that the balloon does not own")
        end = -1
        for f, k in sorted(runs):  # disjoint runs: no frame given twice
            if f < end:
                raise UsageError("free_balloon: a frame given twice")
            end = f + k
        self._balloon -= self._give_slices(runs)

    def free_balloon_blocks(self, heads: PfnArray) -> None:
        """``free_balloon`` of every frame of the 2 MiB blocks starting at ``heads`` (a
        VMware driver's 2 MiB pages), a row of the state each, not a list of their frames:
        the same state, counts and errors."""
        if heads.size == 0:
            return
        blocks = heads >> BLOCK_ORDER
        rows = self._state_rows
        if (bool((heads & (BLOCK_PAGES - 1)).any()) or int(blocks.min()) < 0
                or int(blocks.max()) >= len(rows)):  # not whole blocks: frame by frame
            self.free_balloon(block_frames(blocks, BLOCK_ORDER))
            return
        if not bool((rows[blocks] == _BALLOON).all()):
            raise UsageError("free_balloon: a frame that the balloon does not own")
        if has_repeats(blocks):
            raise UsageError("free_balloon: a frame given twice")
        rows[blocks] = _FREE
        self._bfree[blocks] += BLOCK_PAGES  # every frame was the balloon's: none was free
        self._reportable += int(blocks.size) - int(np.count_nonzero(self.reported[blocks]))
        n = int(blocks.size) * BLOCK_PAGES
        self._free += n
        self._balloon -= n

    def adjust_managed(self, delta_pages: int) -> None:
        """The balloon took (positive) or gave back (negative) pages of MemTotal."""
        self._managed_adjust += delta_pages

    def add_oom_notifier(self, fn: OomNotifier) -> None:
        """``fn()`` runs before an OOM kill and returns the frames it freed (deflate-on-OOM)."""
        self._oom_notifiers.append(fn)

    # ------------------------------------------------------------------ free page reporting
    def has_reportable(self, keep_free: int) -> bool:
        """Whether ``isolate_reportable(n, keep_free)`` would isolate a block (for any n > 0)."""
        # (the virtio driver asks every period of a busy guest: a count, not a pass)
        return self._reportable > 0 and (self._free - keep_free) // BLOCK_PAGES > 0

    def has_reportable_scan(self, keep_free: int) -> bool:
        """``has_reportable`` by a pass over the blocks (the reference of its count)."""
        if (self._free - keep_free) // BLOCK_PAGES <= 0:
            return False
        return bool(((self._bfree == BLOCK_PAGES) & ~self.reported).any())

    def isolate_reportable(self, max_blocks: int, keep_free: int) -> npt.NDArray[np.int64]:
        """Take up to ``max_blocks`` wholly free, not yet reported 2 MiB blocks off the free lists.

        Leaves at least ``keep_free`` frames free. Returns the block indices; their frames are
        ``ISOLATED`` until ``return_isolated``.
        """
        room = (self._free - keep_free) // BLOCK_PAGES
        k = min(max_blocks, room)
        if k <= 0 or self._reportable <= 0:  # (none to isolate: the count says, no pass)
            return _EMPTY
        # for booleans ``a & ~b`` is ``a > b`` (one pass less); ascending, no repeats
        blocks: npt.NDArray[np.intp] = ((self._bfree == BLOCK_PAGES)
                                        > self.reported).nonzero()[0][:k]
        n = int(blocks.size)
        if n and int(blocks[-1]) - int(blocks[0]) + 1 == n:  # consecutive (the usual): slices
            lo, hi = int(blocks[0]), int(blocks[-1]) + 1
            self._state_rows[lo:hi] = _ISOLATED
            self._bfree[lo:hi] = 0
        else:
            self._state_rows[blocks] = _ISOLATED  # wholly free blocks are whole blocks
            self._bfree[blocks] = 0
        self._reportable -= n  # (each wholly free and not reported)
        self._free -= n * BLOCK_PAGES
        self._isolated += n * BLOCK_PAGES
        return blocks.astype(np.int64)

    def return_isolated(self, blocks: npt.NDArray[np.int64], reported: bool) -> None:
        """Put isolated blocks back on the free lists, marked reported if the host took them."""
        n = int(blocks.size)
        if n:
            lo, hi = int(blocks[0]), int(blocks[-1]) + 1
            if (hi - lo == n and lo >= 0 and hi <= len(self._state_rows)
                    and (n == 1 or bool((blocks[1:] - blocks[:-1] == 1).all()))):
                # consecutive (as ``isolate_reportable`` mostly gives them): slices of the
                # rows and counts, no gather (``_return_isolated_each``, the reference)
                rows = self._state_rows[lo:hi]
                if np.count_nonzero(rows != _ISOLATED):
                    raise UsageError("return_isolated: a block that is not isolated")
                rows[:] = _FREE
                self._bfree[lo:hi] = BLOCK_PAGES
                self.reported[lo:hi] = reported
                if not reported:  # isolated blocks had no free frame: now whole
                    self._reportable += n
                self._free += n * BLOCK_PAGES
                self._isolated -= n * BLOCK_PAGES
                return
        self._return_isolated_each(blocks, reported)

    def _return_isolated_each(self, blocks: npt.NDArray[np.int64], reported: bool) -> None:
        """``return_isolated`` of any blocks, an index of the rows and counts."""
        # only whole blocks are ever isolated (a partial last block is never wholly free)
        rows = self._state_rows
        if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= rows.shape[0]
                            or not bool((rows[blocks] == _ISOLATED).all())):
            raise UsageError("return_isolated: a block that is not isolated")
        rows[blocks] = _FREE
        self._bfree[blocks] = BLOCK_PAGES
        self.reported[blocks] = reported
        if not reported and blocks.size:  # isolated blocks had no free frame: now whole
            self._reportable += int(np.unique(blocks).size)
        n = int(blocks.size) * BLOCK_PAGES
        self._free += n
        self._isolated -= n

    # ------------------------------------------------------------------ the workload
    def _account_stall(self, stall_s: float) -> None:
        self.events.stall_us += int(stall_s * 1e6)

    def _touch(self, pfns: PfnArray) -> None:
        if self.store is not None and pfns.size:
            self.store.touch(pfns, self.generation)

    def _touch_run(self, first: int, k: int) -> None:
        """``_touch`` of the frames ``first, ..., first + k - 1`` (a store that can take them
        as a run is not handed an array of them)."""
        store = self.store
        if store is None:
            return
        touch_run = getattr(store, "touch_run", None)
        if touch_run is not None:
            touch_run(first, k, self.generation)
        else:
            store.touch(np.arange(first, first + k, dtype=np.int64), self.generation)

    def _user_alloc(self, n: int, tally: _Tally) -> tuple[PfnArray, bool]:
        """Frames for the workload's anonymous memory: reclaim, then OOM notifiers, then OOM.

        Returns the frames (already ``ANON``) and whether the guest is out of memory.
        """
        pfns = self._alloc(n, self.watermarks.min, PageState.ANON, reclaim=True, tally=tally)
        got = int(pfns.size)
        if got >= n:
            return pfns, False
        # deflate-on-OOM frees a few hundred frames a call: a large growth goes round many
        # times, so the parts are joined once at the end (not the frames so far each round)
        parts = [pfns]
        oom = False
        while got < n:
            freed = 0
            for fn in self._oom_notifiers:
                freed += fn()
            tally.oom_deflated += freed
            if freed > 0:
                more = self._alloc(n - got, self.watermarks.min, PageState.ANON,
                                   reclaim=True, tally=tally)
                parts.append(more)
                got += int(more.size)
                continue
            oom = True
            break
        return np.concatenate(parts), oom

    def _oom_kill(self) -> None:
        """Kill the workload: its anonymous memory (resident and swapped) goes away."""
        victims = self.anon.pop_front(len(self.anon))
        if victims.size:
            self._give_free(victims)
        self.swapped = 0
        self.events.oom_kills += 1

    def _grow_anon(self, n: int, tally: _Tally) -> bool:
        if n <= self._free - self.watermarks.min:  # no reclaim: maybe a few runs, no arrays
            runs = self._take_runs(n, _ANON)
            if runs:
                for first, k in runs:
                    self.anon.push_run(first, k)
                    self._touch_run(first, k)
                self.events.minor_faults += n
                return False
        pfns, oom = self._user_alloc(n, tally)
        if pfns.size:
            self.anon.push_back(pfns)
            self._touch(pfns)
            self.events.minor_faults += int(pfns.size)
        return oom

    def _swap_in(self, n: int, tally: _Tally) -> bool:
        n = min(n, self.swapped)
        if n <= 0:
            return False
        pfns, oom = self._user_alloc(n, tally)
        if pfns.size:
            k = int(pfns.size)
            self.anon.push_back(pfns)
            self._touch(pfns)
            self.swapped -= k
            self.events.swap_in += k
            self.events.major_faults += k
            tally.swap_in += k
            tally.major += k
            tally.stall_s += k * MAJOR_FAULT_S
        return oom

    def _read_file(self, n: int, tally: _Tally) -> None:
        """Read ``n`` file pages into the page cache (major faults); evicts cold cache if full."""
        if n <= 0:
            return
        if n <= self._free - self.watermarks.low:  # no eviction: maybe a few runs, no arrays
            runs = self._take_runs(n, _CACHE)
            if runs:
                self._read_runs(n, runs, tally)
                return
        pfns = self._take_free(n, self.watermarks.low, PageState.CACHE)
        short = n - int(pfns.size)
        if short > 0:
            # the cache recycles its own coldest pages rather than push the guest to OOM
            gone = self._give_runs(self.cache.pop_front_runs(short))
            if gone:
                self._file_evicted += gone
                self.events.direct_reclaim += gone
                tally.stall_s += gone * DIRECT_RECLAIM_S_PER_PAGE
                if not pfns.size and gone > 1:
                    # the steady state of a squeezed cache (nothing free above the low
                    # watermark): what ``_take_free`` takes first, when a few runs, as runs
                    runs = self._take_runs(gone, _CACHE)
                    if runs:
                        self._read_runs(n, runs, tally)
                        return
                more = self._take_free(gone, 0, PageState.CACHE)
                pfns = np.concatenate((pfns, more)) if pfns.size else more
        k = int(pfns.size)
        if k == 1:  # a read of one page (a slow cold rate): a run of one, no frame list
            self._read_runs(n, [(int(pfns[0]), 1)], tally)
            return
        self.events.major_faults += n
        tally.major += n
        # PSI counts a refault of a page the guest evicted (thrashing) as a memory stall; a
        # first read of file data is I/O, not memory pressure (mm/workingset.c)
        refaults = min(n, self._file_evicted)
        self._file_evicted -= refaults
        tally.stall_s += refaults * MAJOR_FAULT_S
        if k:
            self.cache.push_back(pfns)
            self._touch(pfns)

    def _read_runs(self, n: int, runs: list[tuple[int, int]], tally: _Tally) -> None:
        """The end of ``_read_file(n)`` when the frames it took are ``runs`` (taken, in the
        take's order): the faults counted, the runs pushed to the cache and touched as
        ``push_back`` and ``_touch`` of their frames would."""
        self.events.major_faults += n
        tally.major += n
        refaults = min(n, self._file_evicted)
        self._file_evicted -= refaults
        tally.stall_s += refaults * MAJOR_FAULT_S
        cache, store = self.cache, self.store
        touch_run = getattr(store, "touch_run", None)  # (``_touch_run``, looked up once)
        for first, k in runs:
            cache.push_run(first, k)
            if touch_run is not None:
                touch_run(first, k, self.generation)
            else:
                self._touch_run(first, k)

    def _quiet(self, d: Demand) -> bool:
        """Nothing to do for ``d``: no growth or shrink, no refault, no read, kswapd asleep."""
        last = self._last_demand
        # workloads hand back the same Demand while it holds: identity first (a dataclass
        # comparison builds two tuples)
        if (d is not last and d != last) or self._free < self.watermarks.low:
            return False
        resident = self.anon.size
        if resident + self.swapped != d.anon_pages:
            return False
        if self.swapped and (resident < d.hot_anon_pages or d.cold_access_per_s > 0):
            return False
        cache = self.cache.size
        return cache >= d.file_pages or (cache >= d.hot_file_pages and d.cold_access_per_s == 0)

    #: ``steady(demand)``: a ``step`` with ``demand`` would change nothing (its fast path):
    #: the simulator lets a guest sleep while this holds (``_quiet`` itself: asked every
    #: period of a busy guest, one call less)
    steady = _quiet

    def step(self, now: float, dt: float, demand: Demand) -> StepReport:
        """Run the workload's demand for ``dt`` seconds ending at ``now``."""
        if dt <= 0:
            raise UsageError(f"step: dt must be positive, got {dt}")
        if self._quiet(demand):
            return StepReport(now, dt, 0.0, 0, 0, 0, False, 0, True)
        anon_have = self.anon.size + self.swapped
        wm = self.watermarks
        self._last_demand = demand
        self.generation += 1
        tally = _Tally()
        oom = False
        # 1. the anonymous working set grows or shrinks
        if demand.anon_pages > anon_have:
            oom = self._grow_anon(demand.anon_pages - anon_have, tally)
        elif demand.anon_pages < anon_have:
            drop = anon_have - demand.anon_pages
            # as runs: a large shrink gives back slices, not an array of every frame
            gone = self._give_runs(self.anon.pop_back_runs(drop))
            self.swapped -= min(self.swapped, drop - gone)
        # 2. touched swapped-out pages refault: the hot part at once, the cold part at a rate
        if not oom and self.swapped:
            resident = self.anon.size
            hot_missing = max(0, min(demand.hot_anon_pages, demand.anon_pages) - resident)
            cold_swapped = max(0, self.swapped - hot_missing)
            self._carry_anon += cold_swapped * demand.cold_access_per_s * dt
            cold = int(self._carry_anon)
            self._carry_anon -= cold
            oom = self._swap_in(min(self.swapped, hot_missing + cold), tally)
        if oom:
            self._oom_kill()
        # 3. file reads: hot file data not in the cache is read now, cold data at a rate
        cache = self.cache.size
        self._file_evicted = min(self._file_evicted, max(0, demand.file_pages - cache))
        if demand.file_pages > cache:
            hot_missing = max(0, demand.hot_file_pages - cache)
            cold_missing = demand.file_pages - cache - hot_missing
            self._carry_file += cold_missing * demand.cold_access_per_s * dt
            cold = int(self._carry_file)
            self._carry_file -= cold
            self._read_file(hot_missing + cold, tally)
        # 4. kswapd: background reclaim up to the high watermark
        if self._free < wm.low:
            self._reclaim(wm.high - self._free, direct=False, tally=tally)
        stall = min(tally.stall_s, dt)
        self.events.stall_us += int(stall * 1e6)  # (``_account_stall``, written out)
        return StepReport(
            now, dt, stall, tally.major, tally.swap_in, tally.swap_out, oom, tally.oom_deflated,
            False,
        )

    # ------------------------------------------------------------------ ESX-style sampling
    def sample_active(self, rng: random.Random, n: int = 100) -> int:
        """Of ``n`` random frames of the guest, how many its workload touches every second.

        Waldspurger (OSDI 2002) samples 100 random pages a period, invalidates them and counts
        those touched again. Here a frame counts as touched when it is in the hot part of the
        anonymous or page-cache LRU (their newest ``hot_*_pages`` frames) of the last demand.
        """
        d = self._last_demand
        if d is None or n <= 0:
            return 0
        frames = np.array([rng.randrange(self.total_pages) for _ in range(n)], dtype=np.int64)
        hot = np.concatenate((self.anon.tail(d.hot_anon_pages), self.cache.tail(d.hot_file_pages)))
        return int(np.isin(frames, hot).sum())

    # ------------------------------------------------------------------ checks
    def verify_contents(self) -> int:
        """Pages in use (anonymous and cache) whose content the store says was lost."""
        if self.store is None:
            return 0
        used = np.concatenate((self.anon.to_array(), self.cache.to_array()))
        return self.store.verify(used)

    def check_invariants(self) -> list[str]:
        """Every broken invariant, as a sentence (empty when the model is consistent).

        Run once per guest at the end of a simulation (a thousand guests of up to 8 GiB):
        a comparison per state, not ``bincount`` (which widens every byte to 8), the page
        lists checked by their runs, the free counts per block summed eight bytes at a time.
        ``check_invariants_scan`` is the reference (a property test holds the two equal)."""
        state = self.state
        counts = [int(np.count_nonzero(state == v)) for v in range(len(PageState))]
        errs = self._count_errs(counts)
        if sum(counts) != self.total_pages:  # a byte that is no state
            errs.append("page states do not partition the guest's frames")
        for name, dq, st in (("anon", self.anon, PageState.ANON),
                             ("cache", self.cache, PageState.CACHE)):
            errs.extend(self._list_errs(name, dq, st))
        free = state == _FREE
        whole = len(self._state_rows)
        per_block = np.empty(self._bfree.size, dtype=np.int64)
        # a row's 512 bools as 64 words of 8 bytes: each byte of their sum counts at most 64
        # (no carry into the next), so the 8 bytes of it sum to the row's free frames
        words = free[: whole * BLOCK_PAGES].view(np.uint64).reshape(whole, BLOCK_PAGES // 8)
        per_block[:whole] = words.sum(axis=1).view(np.uint8).reshape(whole, 8).sum(
            axis=1, dtype=np.int64)
        if whole < per_block.size:  # the guest's partial last block
            per_block[whole] = int(np.count_nonzero(free[whole * BLOCK_PAGES :]))
        errs.extend(self._block_errs(per_block))
        return errs

    def _list_errs(self, name: str, dq: PfnDeque, st: PageState) -> list[str]:
        """``check_invariants``' sentences on a page list: a frame twice, a frame in another
        state. Its runs, when disjoint and inside the guest (a consistent model): no frame is
        twice, and each run is all ``st``, an AND over it; else its frames, one by one."""
        starts, lens = dq.runs()
        errs: list[str] = []
        if starts.size > 1:
            order = np.argsort(starts, kind="stable")
            starts, lens = starts[order], lens[order]
        ends = starts + lens
        if starts.size and (int(lens.min()) <= 0 or int(starts[0]) < 0
                            or int(ends.max()) > self.total_pages
                            or bool((starts[1:] < ends[:-1]).any())):
            return self._list_errs_scan(name, dq, st)
        if starts.size:
            ok = np.empty(self.total_pages + 1, dtype=np.bool_)  # one past: a run's end
            np.equal(self.state, int(st), out=ok[:-1])
            ok[-1] = True
            bounds = np.empty(2 * starts.size, dtype=np.int64)
            bounds[0::2], bounds[1::2] = starts, ends
            # (the odd entries are the gaps between runs, ignored)
            if not bool(np.logical_and.reduceat(ok, bounds)[0::2].all()):
                errs.append(f"{name} list holds a frame in another state")
        return errs

    def _count_errs(self, counts: Sequence[int] | npt.NDArray[np.int64]) -> list[str]:
        """The invariants' sentences on ``counts``, the frames in each state."""
        want = {
            PageState.FREE: self._free,
            PageState.ANON: len(self.anon),
            PageState.CACHE: len(self.cache),
            PageState.BALLOON: self._balloon,
            PageState.RESERVED: self.reserved_pages,
            PageState.ISOLATED: self._isolated,
        }
        return [f"{st.name}: {counts[st]} frames in that state, {n} accounted"
                for st, n in want.items() if counts[st] != n]

    def _list_errs_scan(self, name: str, dq: PfnDeque, st: PageState) -> list[str]:
        """``_list_errs`` frame by frame."""
        errs: list[str] = []
        arr = dq.sorted_array()  # sorted by its runs: a frame twice is two neighbours
        if bool((arr[1:] == arr[:-1]).any()):
            errs.append(f"{name} list holds a frame twice")
        if arr.size and not bool((self.state[arr] == st).all()):
            errs.append(f"{name} list holds a frame in another state")
        return errs

    def _block_errs(self, per_block: npt.NDArray[np.int64]) -> list[str]:
        """The invariants' sentences on the blocks (``per_block``: the free frames of each,
        counted from the page states) and the swap."""
        errs: list[str] = []
        if not np.array_equal(per_block, self._bfree):
            errs.append("per-block free counts disagree with page states")
        if self._reportable != self._count_reportable():
            errs.append(f"{self._reportable} blocks counted wholly free and not reported, "
                        f"{self._count_reportable()} are")
        if not 0 <= self.swapped <= self.swap_total_pages:
            errs.append(f"swapped {self.swapped} outside [0, {self.swap_total_pages}]")
        return errs

    def check_invariants_scan(self) -> list[str]:
        """``check_invariants`` by a count per state, every listed frame and a sum per block
        row (the reference of its passes)."""
        counts = np.bincount(self.state, minlength=len(PageState))
        errs = self._count_errs(counts)
        if counts.sum() != self.total_pages or counts.size > len(PageState):
            errs.append("page states do not partition the guest's frames")
        for name, dq, st in (("anon", self.anon, PageState.ANON),
                             ("cache", self.cache, PageState.CACHE)):
            errs.extend(self._list_errs_scan(name, dq, st))
        free = self.state == _FREE
        whole = len(self._state_rows)
        per_block = np.empty(self._bfree.size, dtype=np.int64)  # rows of bools, summed
        per_block[:whole] = free[: whole * BLOCK_PAGES].reshape(whole, BLOCK_PAGES).sum(
            axis=1, dtype=np.int64)
        if whole < per_block.size:  # the guest's partial last block
            per_block[whole] = int(np.count_nonzero(free[whole * BLOCK_PAGES :]))
        errs.extend(self._block_errs(per_block))
        return errs
