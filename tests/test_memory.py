import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.memory import (
    BLOCK_ORDER,
    BLOCK_PAGES,
    MAJOR_FAULT_S,
    GuestMemory,
    _Tally,
    linux_watermarks,
)
from memballoon.guest.pfndeque import PfnDeque
from memballoon.guest.workload import Demand
from memballoon.harness.state import state_diff, state_of
from memballoon.host.ram import NullRam
from memballoon.model.errors import UsageError
from memballoon.model.pages import PfnArray, block_frames, coalesce, run_list_frames
from memballoon.model.units import PageState, mib_to_pages

G64 = mib_to_pages(64)


def demand(anon: int, file: int = 0, hot: float = 1.0, cold: float = 0.0) -> Demand:
    return Demand(anon, int(anon * hot), file, int(file * hot), cold)


def test_watermarks_follow_linux_min_free_kbytes() -> None:
    # 1 GiB of low memory: min_free_kbytes = sqrt(1048576 * 16) = 4096 KiB = 1024 pages
    wm = linux_watermarks(mib_to_pages(1024))
    assert (wm.min, wm.low, wm.high) == (1024, 1280, 1536)
    assert linux_watermarks(100).min == 32  # clamped up to 128 KiB
    assert linux_watermarks(mib_to_pages(16 * 1024 * 1024)).min == 65536  # clamped: 256 MiB


def test_a_new_guest_is_free_but_for_its_reserved_frames() -> None:
    m = GuestMemory(G64)
    info = m.meminfo()
    assert info.free_pages == G64 - m.reserved_pages
    assert bool((m.state[: m.reserved_pages] == PageState.RESERVED).all())
    assert m.check_invariants() == []


def test_nosleep_allocation_stops_at_the_min_watermark_and_never_reclaims() -> None:
    m = GuestMemory(G64)
    m.step(1.0, 1.0, demand(0, file=mib_to_pages(8)))
    cache = m.meminfo().cache_pages
    got = m.alloc_nosleep(G64)
    assert m.free_pages == m.watermarks.min
    assert got.size == G64 - m.reserved_pages - cache - m.watermarks.min
    assert m.meminfo().cache_pages == cache
    assert m.alloc_nosleep(1).size == 0
    assert m.events.direct_reclaim == 0
    assert m.check_invariants() == []


def test_sleeping_allocation_reclaims_the_coldest_cache_first() -> None:
    m = GuestMemory(G64)
    m.step(1.0, 1.0, demand(0, file=mib_to_pages(16)))
    oldest = m.cache.to_array()[:100]
    m.alloc_nosleep(G64)
    before = m.events.stall_us
    got = m.alloc_sleep(100)
    assert got.size == 100
    assert bool((m.state[oldest] != PageState.CACHE).all())
    assert m.events.direct_reclaim >= 100 and m.events.alloc_stalls == 1
    assert m.events.stall_us > before
    assert m.check_invariants() == []


def test_sleeping_allocation_swaps_anonymous_pages_only_with_swap() -> None:
    for swap, expect_swapped in ((0, False), (mib_to_pages(32), True)):
        m = GuestMemory(G64, swap_pages=swap)
        m.step(1.0, 1.0, demand(mib_to_pages(32), hot=0.1))
        m.alloc_nosleep(G64)
        got = m.alloc_sleep(1000)
        assert (m.swapped > 0) is expect_swapped
        assert (got.size == 1000) is expect_swapped
        assert m.check_invariants() == []


def test_swapped_hot_pages_refault_as_major_faults_and_stall() -> None:
    m = GuestMemory(G64, swap_pages=mib_to_pages(64))
    d = demand(mib_to_pages(32), hot=1.0)
    m.step(1.0, 1.0, d)
    balloon = m.alloc_nosleep(G64)
    m.alloc_sleep(mib_to_pages(8))  # pushes 8 MiB of the hot set out to swap
    assert m.swapped > 0
    m.free_balloon(balloon)  # room again: the hot pages come back at once
    r = m.step(2.0, 1.0, d)
    assert r.swap_in > 0 and r.major_faults == r.swap_in
    assert r.stall_s >= min(1.0, r.swap_in * MAJOR_FAULT_S) - 1e-9
    assert m.swapped == 0
    assert m.check_invariants() == []


def test_anonymous_demand_beyond_memory_ooms_unless_a_notifier_frees_pages() -> None:
    m = GuestMemory(G64)
    r = m.step(1.0, 1.0, demand(G64))
    assert r.oom_killed and m.events.oom_kills == 1
    assert len(m.anon) == 0  # the workload died with its memory
    assert m.check_invariants() == []

    m = GuestMemory(G64)
    balloon = m.alloc_nosleep(mib_to_pages(32))
    held = [balloon]

    def deflate() -> int:  # what virtio's deflate-on-OOM does: give 256 pages back
        if held[0].size == 0:
            return 0
        part, held[0] = held[0][:256], held[0][256:]
        m.free_balloon(part)
        return int(part.size)

    m.add_oom_notifier(deflate)
    r = m.step(1.0, 1.0, demand(mib_to_pages(40)))
    assert not r.oom_killed and r.oom_deflated_pages > 0
    assert m.check_invariants() == []


def test_an_unchanged_demand_takes_the_fast_path() -> None:
    m = GuestMemory(G64)
    d = demand(mib_to_pages(8), file=mib_to_pages(4), hot=0.5)
    assert not m.step(1.0, 1.0, d).idle
    r = m.step(2.0, 1.0, d)
    assert r.idle and r.stall_s == 0.0


def test_free_balloon_refuses_frames_the_balloon_does_not_own() -> None:
    m = GuestMemory(G64)
    p = m.alloc_nosleep(10)
    with pytest.raises(UsageError):
        m.free_balloon(np.array([0], dtype=np.int64))  # a reserved frame
    with pytest.raises(UsageError):
        m.free_balloon(np.concatenate((p[:1], p[:1])))
    m.free_balloon(p)
    assert m.balloon_pages == 0


def test_free_balloon_runs_is_free_balloon_of_their_frames() -> None:
    # runs across blocks, newest first as a deflate pops them, and one outside a block's start
    a, b = GuestMemory(G64), GuestMemory(G64)
    for m in (a, b):
        m.alloc_nosleep(300)  # a partly used first block
        m.alloc_sleep(3 * BLOCK_PAGES + 77)
    held = a.alloc_sleep(3 * BLOCK_PAGES)
    assert np.array_equal(held, b.alloc_sleep(3 * BLOCK_PAGES))
    runs = []  # each range of them in thirds, not in order (a deflate pops newest first)
    for lo, hi in coalesce(held).tolist():
        x, y = lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3
        runs += [(y, hi - y), (lo, x - lo), (x, y - x)]
    runs = [r for r in runs if r[1] > 0]
    assert len(runs) > 2 and sum(k for _, k in runs) == held.size
    frames = np.concatenate([np.arange(f, f + k, dtype=np.int64) for f, k in runs])
    a.free_balloon(frames)
    b.free_balloon_runs(runs)
    assert np.array_equal(a.state, b.state)
    assert np.array_equal(a._bfree, b._bfree)
    assert (a.free_pages, a.balloon_pages) == (b.free_pages, b.balloon_pages)
    assert b.check_invariants() == []


def test_free_balloon_runs_refuses_as_free_balloon_does_and_changes_nothing() -> None:
    m = GuestMemory(G64)
    p = m.alloc_sleep(100)
    first = int(p[0])
    before = (m.state.copy(), m._bfree.copy(), m.free_pages, m.balloon_pages)
    for bad in ([(0, 1)],  # a reserved frame
                [(first, 50), (first + 40, 20)]):  # a frame given twice
        with pytest.raises(UsageError):
            m.free_balloon_runs(bad)
        assert np.array_equal(m.state, before[0]) and np.array_equal(m._bfree, before[1])
        assert (m.free_pages, m.balloon_pages) == before[2:]
    m.free_balloon_runs([(first, 100)])
    assert m.balloon_pages == 0 and m.check_invariants() == []


def test_reporting_isolates_whole_free_blocks_and_reported_blocks_go_last() -> None:
    m = GuestMemory(G64)
    blocks = m.isolate_reportable(4, keep_free=m.watermarks.low)
    assert blocks.size == 4
    assert bool((m.state[blocks[0] * BLOCK_PAGES : (blocks[0] + 1) * BLOCK_PAGES]
                 == PageState.ISOLATED).all())
    assert m.check_invariants() == []
    m.return_isolated(blocks, reported=True)
    assert m.check_invariants() == []
    # allocations prefer unreported blocks
    got = m.alloc_nosleep(BLOCK_PAGES)
    assert not np.isin(got >> 9, blocks).any()
    # a reported block that gets allocated is no longer reported
    m.alloc_nosleep(m.free_pages)
    assert not m.reported.any()


def test_2m_allocation_takes_whole_free_blocks_only_without_reclaim() -> None:
    m = GuestMemory(G64)
    m.step(1.0, 1.0, demand(0, file=mib_to_pages(8)))
    whole = int((m._bfree == BLOCK_PAGES).sum())
    blocks = m.isolate_reportable(2, keep_free=m.watermarks.low)
    m.return_isolated(blocks, reported=True)
    first = m.alloc_huge(whole - 2)
    assert first.size == whole - 2 and bool((first % BLOCK_PAGES == 0).all())
    assert not np.isin(first >> 9, blocks).any()  # reported blocks last
    frames = (first[:, None] + np.arange(BLOCK_PAGES)).reshape(-1)
    assert bool((m.state[frames] == PageState.BALLOON).all())
    assert m.balloon_pages == frames.size
    then = m.alloc_huge(5)  # then the reported ones, as far as the min watermark allows
    assert then.size >= 1 and np.isin(then >> 9, blocks).all()
    assert not m.reported[then >> 9].any()  # the host refaults them on touch
    assert m.alloc_huge(1).size == 0  # nothing more; the cache stays
    assert m.meminfo().cache_pages == mib_to_pages(8) and m.events.direct_reclaim == 0
    assert m.check_invariants() == []
    m.free_balloon(frames)
    assert m.balloon_pages == then.size * BLOCK_PAGES and m.check_invariants() == []


def test_2m_allocation_leaves_the_min_watermark_free() -> None:
    m = GuestMemory(G64)
    m.alloc_nosleep(m.free_pages - m.watermarks.min - BLOCK_PAGES - 10)
    room = (m.free_pages - m.watermarks.min) // BLOCK_PAGES
    got = m.alloc_huge(100)
    assert got.size <= room and m.free_pages >= m.watermarks.min


def test_pages_get_content_through_the_store() -> None:
    ram = NullRam(G64)
    m = GuestMemory(G64, store=ram)
    m.step(1.0, 1.0, demand(mib_to_pages(8), file=mib_to_pages(2)))
    assert ram.resident_bytes() == (mib_to_pages(10)) * 4096
    assert m.verify_contents() == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("step"), st.integers(0, 60), st.integers(0, 30), st.floats(0, 1)),
            st.tuples(st.just("nosleep"), st.integers(0, 9000), st.just(0), st.just(0.0)),
            st.tuples(st.just("sleep"), st.integers(0, 9000), st.just(0), st.just(0.0)),
            st.tuples(st.just("huge"), st.integers(0, 20), st.just(0), st.just(0.0)),
            st.tuples(st.just("free"), st.integers(0, 9000), st.just(0), st.just(0.0)),
            st.tuples(st.just("report"), st.integers(0, 8), st.just(0), st.just(0.0)),
        ),
        max_size=25,
    ),
    st.sampled_from([0, mib_to_pages(16)]),
)
def test_invariants_hold_under_any_sequence(script: list[tuple[str, int, int, float]],
                                            swap: int) -> None:
    m = GuestMemory(G64, swap_pages=swap, store=NullRam(G64))
    held = np.empty(0, dtype=np.int64)
    now = 0.0
    for op, a, b, f in script:
        if op == "step":
            now += 1.0
            m.step(now, 1.0, demand(mib_to_pages(a), mib_to_pages(b), hot=f, cold=f / 2))
        elif op == "nosleep":
            held = np.concatenate((held, m.alloc_nosleep(a)))
        elif op == "sleep":
            held = np.concatenate((held, m.alloc_sleep(a)))
        elif op == "huge":
            heads = m.alloc_huge(a)
            frames = (heads[:, None] + np.arange(BLOCK_PAGES)).reshape(-1)
            held = np.concatenate((held, frames))
        elif op == "free":
            m.free_balloon(held[:a])
            held = held[a:]
        else:
            blocks = m.isolate_reportable(a, keep_free=m.watermarks.low)
            m.return_isolated(blocks, reported=True)
        assert m.check_invariants() == []
        assert m.free_pages >= 0 and m.balloon_pages == held.size


def test_active_sampling_counts_frames_in_the_hot_sets() -> None:
    import random

    m = GuestMemory(G64)
    assert m.sample_active(random.Random(1)) == 0  # no demand yet
    m.step(1.0, 1.0, demand(mib_to_pages(32), hot=1.0))  # half the guest is hot
    touched = m.sample_active(random.Random(1), 1000)
    assert 400 < touched < 600
    m2 = GuestMemory(G64)
    m2.step(1.0, 1.0, demand(mib_to_pages(32), hot=0.0))
    assert m2.sample_active(random.Random(1), 1000) == 0


def test_first_file_reads_are_io_but_refaults_of_evicted_pages_stall() -> None:
    m = GuestMemory(G64)
    r = m.step(1.0, 1.0, demand(0, file=mib_to_pages(8)))
    assert r.major_faults == mib_to_pages(8) and r.stall_s == 0.0  # cold reads: not pressure
    m.alloc_nosleep(G64)
    m.alloc_sleep(mib_to_pages(4))  # reclaim evicts 4 MiB of that cache
    r = m.step(2.0, 1.0, demand(0, file=mib_to_pages(8)))
    assert r.major_faults > 0 and r.stall_s > 0.0  # reading them back is thrashing


def test_invariants_catch_a_frame_listed_twice() -> None:
    m = GuestMemory(G64)
    m.step(1.0, 1.0, demand(100))
    assert m.check_invariants() == []
    m.anon.push_back(m.anon.to_array()[:1])  # the same frame on the anon list again
    assert "anon list holds a frame twice" in m.check_invariants()


class ForgetLog(NullRam):
    """A store that records what the balloon hands over (``forget``)."""

    def __init__(self, pages: int, host_page_frames: int = 1) -> None:
        super().__init__(pages, host_page_frames=host_page_frames)
        self.forgotten: list[int] = []

    def forget(self, ranges: np.ndarray) -> None:
        self.forgotten.extend(f for s, e in ranges.tolist() for f in range(s, e))


def test_with_huge_host_pages_the_balloon_fills_whole_blocks_first() -> None:
    m = GuestMemory(G64, host_page_frames=BLOCK_PAGES)
    m.step(1.0, 1.0, demand(3000))  # the workload scatters over the low blocks
    m.step(2.0, 1.0, demand(1000))  # and frees most of them again: partly used blocks
    first = m.alloc_sleep(256)
    second = m.alloc_nosleep(256)
    blocks = np.unique(np.concatenate((first, second)) // BLOCK_PAGES)
    assert blocks.size == 1  # two buffers, one whole block between them
    assert bool((m.state[blocks[0] * BLOCK_PAGES:(blocks[0] + 1) * BLOCK_PAGES]
                 == PageState.BALLOON).all())
    assert m.check_invariants() == []


def test_without_whole_blocks_the_balloon_falls_back_to_any_free_frame() -> None:
    m = GuestMemory(G64, host_page_frames=BLOCK_PAGES)
    everything = m.alloc_nosleep(G64)
    m.free_balloon(np.sort(everything)[::2])  # every other frame back: no block is whole
    got = m.alloc_nosleep(300)
    assert got.size == 300 and m.check_invariants() == []


def test_the_store_forgets_what_the_balloon_takes_whole_blocks_with_huge_pages() -> None:
    small = ForgetLog(G64)
    m = GuestMemory(G64, store=small)
    got = m.alloc_sleep(100)
    assert small.forgotten == got.tolist()
    huge = ForgetLog(G64, BLOCK_PAGES)
    m = GuestMemory(G64, store=huge, host_page_frames=BLOCK_PAGES)
    half = m.alloc_sleep(BLOCK_PAGES // 2)
    assert huge.forgotten == []  # half a block: its mapping stays
    rest = m.alloc_nosleep(BLOCK_PAGES // 2)
    assert sorted(huge.forgotten) == sorted(np.concatenate((half, rest)).tolist())
    heads = m.alloc_huge(2)
    assert len(huge.forgotten) == 3 * BLOCK_PAGES and heads.size == 2


def test_host_pages_must_be_4k_or_a_block() -> None:
    with pytest.raises(UsageError):
        GuestMemory(G64, host_page_frames=64)


# ------------------------------------------------------------------ single takes in bulk
def _single_takes(mem: GuestMemory, n: int) -> list[int]:
    """The frames of up to ``n`` calls of ``alloc_nosleep(1)``, until one finds none."""
    out = []
    for _ in range(n):
        f = mem.alloc_nosleep(1)
        if f.size == 0:
            break
        out.append(int(f[0]))
    return out


def _aged(seed: int) -> GuestMemory:
    """A guest that has lived a little: workload steps, balloon takes and gives (single and
    bulk), free page reporting, so the allocator's cursor and reported blocks are anywhere."""
    rng = np.random.default_rng(seed)
    m = GuestMemory(16384 * int(rng.integers(1, 4)), swap_pages=int(rng.choice([0, 2000])))
    for t in range(1, int(rng.integers(2, 6))):
        anon = int(rng.integers(0, m.total_pages // 2))
        f = int(rng.integers(0, m.total_pages // 4))
        m.step(float(t), 1.0, Demand(anon, anon // 2, f, f // 3, 0.01))
        b = m.alloc_nosleep(int(rng.integers(1, 3000)))
        if b.size:
            m.free_balloon(b[: int(rng.integers(0, b.size + 1))])
        for _ in range(int(rng.integers(0, 200))):
            m.alloc_nosleep(1)
        blocks = m.isolate_reportable(int(rng.integers(1, 8)), m.watermarks.low)
        m.return_isolated(blocks, reported=bool(rng.random() < 0.8))
    return m


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 20_000), st.one_of(st.none(), st.integers(0, 20_000)))
def test_single_takes_in_bulk_are_the_single_takes(seed: int, n: int, keep: int | None) -> None:
    # alloc_nosleep_each(n): the frames n calls of alloc_nosleep(1) take, in their order, and
    # the same state after (the cursor, reported blocks); a caller that keeps only the first
    # k leaves the state of k calls
    one, bulk = _aged(seed), _aged(seed)
    k = n if keep is None else min(n, keep)
    singles = _single_takes(one, k)
    got = bulk.alloc_nosleep_each(n, lambda frames: min(k, int(frames.size)))
    assert got.tolist() == singles
    assert state_diff(state_of(one), state_of(bulk)) == []
    assert bulk.check_invariants() == []


def test_single_takes_in_bulk_refuse_huge_host_pages_and_a_bad_keep() -> None:
    with pytest.raises(UsageError, match="4 KiB host pages only"):
        GuestMemory(16384, host_page_frames=512).alloc_nosleep_each(10, lambda f: 0)
    with pytest.raises(UsageError, match="keep answered"):
        GuestMemory(16384).alloc_nosleep_each(10, lambda f: 99)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 12), st.integers(513, 4096))
def test_one_large_take_is_the_takes_of_its_parts(seed: int, rounds: int, k: int) -> None:
    # virtio's bulk rounds take rounds * k frames in one alloc_sleep where the driver would
    # make rounds calls of k (k over a block, none reclaiming): the same frames, in the same
    # order, and the same state after (cursor, reported blocks, per-block free counts)
    parts, whole = _aged(seed), _aged(seed)
    rounds = min(rounds, (parts.free_pages - parts.watermarks.min) // k)
    got = [parts.alloc_sleep(k) for _ in range(rounds)]
    one = whole.alloc_sleep(rounds * k)
    assert one.tolist() == (np.concatenate(got).tolist() if got else [])
    assert state_diff(state_of(parts), state_of(whole)) == []
    assert whole.check_invariants() == []


def _first_free_frames(m: GuestMemory, n: int) -> list[int]:
    """What a take of ``n`` >= 2 frames must return: from the block of the last take alone if
    it has them all (not reported), else the free frames of the blocks with any, blocks not
    reported first, each ascending."""
    free = m.state == PageState.FREE
    nb = m._bfree.size
    b = m._hint
    per = [np.flatnonzero(free[i * BLOCK_PAGES : (i + 1) * BLOCK_PAGES]) + i * BLOCK_PAGES
           for i in range(nb)]
    if per[b].size >= n and not m.reported[b]:
        return per[b][:n].tolist()
    order = [i for i in range(nb) if per[i].size and not m.reported[i]] + [
        i for i in range(nb) if per[i].size and m.reported[i]]
    return [int(f) for i in order for f in per[i]][:n]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(0, 3)), max_size=25),
       st.integers(2, 9000), st.booleans(), st.integers(0, 300))
def test_a_bulk_take_is_the_free_frames_of_its_blocks_in_order(
        script: list[tuple[int, int]], n: int, report: bool, odd: int) -> None:
    # partly used blocks, wholly free ones, reported ones and a partial last block: a take
    # of many blocks (some known whole without a look) is the frames a look at each gives
    m = GuestMemory(12 * BLOCK_PAGES + odd, reserved_pages=300)
    for k, keep_every in script:
        got = m._take_free(k, 0, PageState.CACHE)
        if keep_every and got.size:
            m._give_free(got[::keep_every + 1].copy())  # holes in the blocks taken
    if report:
        blocks = m.isolate_reportable(3, 0)
        m.return_isolated(blocks, True)
    want = _first_free_frames(m, min(n, m.free_pages))
    before = m.state.copy()
    got = m._take_free(n, 0, PageState.BALLOON)
    assert got.tolist() == want
    after = before.copy()
    after[got] = PageState.BALLOON
    assert np.array_equal(m.state, after)
    counts = np.bincount(np.flatnonzero(m.state == PageState.FREE) // BLOCK_PAGES,
                         minlength=m._bfree.size)
    assert np.array_equal(counts, m._bfree)
    assert m.free_pages == int(np.count_nonzero(m.state == PageState.FREE))


def _odd_guest(script: list[tuple[int, int]], report: int, odd: int) -> GuestMemory:
    """A guest of 12 blocks and ``odd`` frames (a partial last block), partly used blocks
    with holes, and up to ``report`` blocks reported (so they come after the partial one)."""
    m = GuestMemory(12 * BLOCK_PAGES + odd, reserved_pages=300)
    for k, keep_every in script:
        got = m._take_free(k, 0, PageState.CACHE)
        hole = np.zeros(got.size, dtype=np.bool_)
        if keep_every:
            hole[:: keep_every + 1] = True  # holes in the blocks taken
            m._give_free(got[hole])
        m.cache.push_back(got[~hole])
    if report:
        m.return_isolated(m.isolate_reportable(report, 0), True)
    return m


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(0, 3)), max_size=12),
       st.integers(1, 7000), st.integers(0, 3), st.integers(1, 511))
def test_single_takes_in_bulk_reach_a_partial_last_block(
        script: list[tuple[int, int]], n: int, report: int, odd: int) -> None:
    # the legacy VMware driver's bulk single takes (_take_lowest) on a guest whose size is
    # not whole blocks: they reach its partial last block, ahead of reported blocks or as the
    # last block taken, as the single takes do (that raised IndexError before)
    one, bulk = _odd_guest(script, report, odd), _odd_guest(script, report, odd)
    singles = _single_takes(one, n)
    got = bulk.alloc_nosleep_each(n, lambda frames: int(frames.size))
    assert got.tolist() == singles
    assert state_diff(state_of(one), state_of(bulk)) == []
    assert bulk.check_invariants() == []


def test_single_takes_in_bulk_take_a_partial_last_block_before_reported_ones() -> None:
    # the case that raised IndexError: the partial last block (100 frames) comes before the
    # reported block 11 among the blocks a bulk take empties
    m = _odd_guest([(4900, 0)], 0, 100)  # blocks 0-9 used, block 10 partly
    m.return_isolated(m.isolate_reportable(1, 0), True)
    assert m.reported.nonzero()[0].tolist() == [11]
    got = m.alloc_nosleep_each(m.free_pages, lambda frames: int(frames.size))
    last = 12 * BLOCK_PAGES
    assert got.size == m.total_pages - 300 - 4900 - m.watermarks.min
    # block 10's rest, then the partial block's 100 frames, then the reported block
    assert got[432 : 432 + 100].tolist() == list(range(last, last + 100))
    assert m.check_invariants() == []


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.integers(0, 40), st.sampled_from(["ok", "twice", "not_ours"]))
def test_freeing_whole_blocks_is_freeing_their_frames(seed: int, k: int, case: str) -> None:
    # a VMware driver's 2 MiB pages go back a row each: the same state, counts and errors
    # as free_balloon of every frame of theirs
    rows, frames = _aged(seed), _aged(seed)
    n = int(np.random.default_rng(seed).integers(0, 64))
    heads = rows.alloc_huge(n)
    assert frames.alloc_huge(n).tolist() == heads.tolist()
    give = heads[np.random.default_rng(k).permutation(heads.size)][: k or None]
    if case == "twice" and give.size:
        give = np.append(give, give[0])
    elif case == "not_ours":
        give = np.append(give, 0)  # a block of reserved frames
    errors = []
    for free, arg in ((rows.free_balloon_blocks, give),
                      (frames.free_balloon, block_frames(give >> BLOCK_ORDER, BLOCK_ORDER))):
        try:
            free(arg)
            errors.append("")
        except UsageError as exc:
            errors.append(str(exc))
    assert errors[0] == errors[1]
    assert (errors[0] != "") == (case == "not_ours" or (case == "twice" and give.size > 0))
    assert state_diff(state_of(frames), state_of(rows)) == []
    assert rows.check_invariants() == []


@given(st.lists(st.integers(0, 4 * BLOCK_PAGES + 99), max_size=300), st.sampled_from([1, -1]))
def test_block_counts_follow_frames_in_any_order(frames: list[int], sign: int) -> None:
    # the per-block free counts move by the frames each block holds, however the frames come
    m = GuestMemory(4 * BLOCK_PAGES + 100, reserved_pages=16)
    before = m._bfree.copy()
    m._block_add(np.array(frames, dtype=np.int64), sign)
    want = before.astype(np.int64)
    np.add.at(want, np.array(frames, dtype=np.int64) >> BLOCK_ORDER, sign)
    assert m._bfree.tolist() == want.tolist()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 3000), st.booleans())
def test_giving_runs_is_giving_their_frames(seed: int, k: int, anon: bool) -> None:
    # _give_runs (a deque's oldest runs, by their bounds) ends where _give_free of their
    # frames does: states, per-block counts, free count
    a, b = _aged(seed), _aged(seed)
    runs = (a.anon if anon else a.cache).pop_front_runs(k)
    frames = (b.anon if anon else b.cache).pop_front(k)
    assert a._give_runs(runs) == frames.size
    b._give_free(frames)
    assert np.array_equal(a.state, b.state) and np.array_equal(a._bfree, b._bfree)
    assert a.free_pages == b.free_pages and a.check_invariants() == []


# ------------------------------------------------------------------ sleeping single takes in bulk
def _sleeping_takes(mem: GuestMemory, n: int, k: int) -> tuple[list[int], int, bool]:
    """``alloc_sleep_each(n, keep)`` one call at a time, ``keep`` declining the frame at
    ``k``: the frames of up to ``n`` calls of ``alloc_sleep(1)``; at ``k``, a call that would
    reclaim is made and its frame returned apart, one that would not is not made."""
    out: list[int] = []
    for j in range(n):
        if j == k and mem.free_pages > mem.watermarks.min:
            return out, -1, False
        f = mem.alloc_sleep(1)
        if f.size == 0:
            return out, -1, True
        if j == k:
            return out, int(f[0]), False
        out.append(int(f[0]))
    return out, -1, False


def _pressed_guest(seed: int) -> GuestMemory:
    """An aged guest brought near its min watermark, with page cache and swap to reclaim (or
    none: the sleeping takes then fail)."""
    rng = np.random.default_rng(seed)
    m = _aged(seed)
    above = int(rng.choice([0, int(rng.integers(0, 100))]))  # at the watermark: reclaim first
    m.alloc_nosleep(max(0, m.free_pages - m.watermarks.min - above))
    return m


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 3000),
       st.one_of(st.integers(0, 3000), st.integers(0, 8).map(lambda j: 32 * j)))
def test_sleeping_takes_in_bulk_are_the_single_sleeping_takes(seed: int, n: int, k: int) -> None:
    # alloc_sleep_each(n): the frames of n calls of alloc_sleep(1) (those that reclaim too:
    # their stalls, events, the cache and swap they free), the same state after; a frame the
    # caller declines is as if never taken, or returned apart once a reclaiming call took it
    one, bulk = _pressed_guest(seed), _pressed_guest(seed)
    singles, taken, failed = _sleeping_takes(one, n, k)
    offered: list[int] = []

    def keep(frames: PfnArray) -> int:
        offered.extend(frames.tolist())
        return max(0, min(int(frames.size), k - (len(offered) - int(frames.size))))

    got, b_taken, b_failed = bulk.alloc_sleep_each(n, keep)
    assert got.tolist() == singles
    assert (b_taken, b_failed) == (taken, failed)
    assert state_diff(state_of(one), state_of(bulk)) == []
    assert bulk.check_invariants() == []


def test_sleeping_takes_in_bulk_reclaim_and_refuse_huge_host_pages() -> None:
    m = _pressed_guest(3)
    before = m.events.alloc_stalls
    got, taken, failed = m.alloc_sleep_each(500, lambda f: int(f.size))
    assert got.size == 500 and taken == -1 and not failed
    assert m.events.alloc_stalls > before  # the run went past the watermark: it reclaimed
    with pytest.raises(UsageError, match="4 KiB host pages only"):
        GuestMemory(16384, host_page_frames=512).alloc_sleep_each(10, lambda f: 0)
    with pytest.raises(UsageError, match="keep answered"):
        GuestMemory(16384).alloc_sleep_each(10, lambda f: 99)


# ------------------------------------------------------------------ takes of a few runs
def _refilling(seed: int) -> GuestMemory:
    """An aged guest whose page cache then grew by takes of a few hundred frames (the
    cursor's block filled from its bottom), some blocks above reported, maybe all of them."""
    rng = np.random.default_rng(seed)
    m = _aged(seed)
    for _ in range(int(rng.integers(0, 12))):
        got = m._take_free(int(rng.integers(2, 700)), m.watermarks.low, PageState.CACHE)
        m.cache.push_back(got)
    if rng.random() < 0.7:
        m.return_isolated(m.isolate_reportable(int(rng.integers(1, 10_000)), 0), True)
    return m


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**20), st.integers(2, 2000), st.sampled_from(["any", "top", "spill"]))
def test_a_take_of_a_few_runs_is_the_search_s_take(seed: int, n: int, size: str) -> None:
    # _take_runs takes what the general search takes when that is a few runs (the same
    # frames, state, counts, cursor and reported blocks), and changes nothing when it declines
    run, search = _refilling(seed), _refilling(seed)
    have = int(run._bfree[run._hint])
    if size == "top":
        n = max(2, min(n, have))  # the cursor's block holds them all
    elif size == "spill":
        n = max(2, have + n % 1500)  # they reach into the blocks after it
    n = min(n, run.free_pages)
    if n < 2:
        return
    runs = run._take_runs(n, int(PageState.CACHE))
    if not runs:
        assert state_diff(state_of(run), state_of(search)) == []
        return
    want = search._take_search(n, int(PageState.CACHE))
    assert want.tolist() == [f for first, k in runs for f in range(first, first + k)]
    assert all(a + k != b for (a, k), (b, _) in itertools.pairwise(runs))  # merged
    assert state_diff(state_of(run), state_of(search)) == []
    assert run._free == int(np.count_nonzero(run.state == PageState.FREE))


def _bottom_filled(blocks: int, used: int, report: str) -> GuestMemory:
    """A guest whose first ``blocks`` blocks are used but for ``used`` frames of the last,
    the cursor there; ``report``: none, the blocks above ("above"), or those and one far one
    left unreported ("all_but_one")."""
    m = GuestMemory(16 * BLOCK_PAGES, reserved_pages=BLOCK_PAGES)
    m.cache.push_back(m._take_free((blocks - 1) * BLOCK_PAGES + used, 0, PageState.CACHE))
    if report != "none":
        m.return_isolated(m.isolate_reportable(16, 0), True)
        if report == "all_but_one":
            m.reported[14] = False
            m._reportable = m._count_reportable()  # (the count kept where the model writes)
    return m


@pytest.mark.parametrize(("n", "report", "runs"), [
    (100, "none", [(2248, 100)]),  # the cursor's block holds them, at its top
    (400, "none", [(2248, 400)]),  # its top and the bottom of the next block
    (1500, "none", [(2248, 1500)]),  # and wholly free blocks between
    (400, "above", [(2248, 400)]),  # the next blocks are reported, and no other block is not
    (400, "all_but_one", [(2248, 312), (14 * BLOCK_PAGES, 88)]),  # one not reported first
    (5000, "none", []),  # beyond the few blocks looked at: the search's bulk take
])
def test_a_take_of_a_few_runs_covers_the_refill_of_a_block_filled_from_its_bottom(
        n: int, report: str, runs: list[tuple[int, int]]) -> None:
    m = _bottom_filled(4, 200, report)
    twin = _bottom_filled(4, 200, report)
    assert m._take_runs(n, int(PageState.CACHE)) == runs
    want = twin._take_search(n, int(PageState.CACHE))
    if runs:
        assert want.tolist() == [f for first, k in runs for f in range(first, first + k)]
        assert state_diff(state_of(m), state_of(twin)) == []
        for first, k in runs:
            m.cache.push_run(first, k)
        assert m.check_invariants() == []


def test_reads_and_growth_of_one_run_touch_the_store_as_a_run() -> None:
    ram = NullRam(16 * BLOCK_PAGES)
    m = GuestMemory(16 * BLOCK_PAGES, reserved_pages=BLOCK_PAGES, store=ram)
    m.step(1.0, 1.0, demand(300, 700))
    assert m.anon.runs()[1].tolist() == [300] and m.cache.runs()[1].tolist() == [700]
    assert ram.resident_bytes() == 1000 * 4096
    assert ram.resident_pages_of(m.anon.to_array()) == 300
    assert m.check_invariants() == []


# ------------------------------------------------------------------ frames as runs and groups
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**20),
       st.lists(st.tuples(st.integers(0, 3 * 16384), st.integers(1, 3000)), min_size=1,
                max_size=40),
       st.integers(0, 2**16), st.booleans())
def test_frames_given_back_as_runs_end_as_their_scatter(
        seed: int, runs: list[tuple[int, int]], order: int, shuffle: bool) -> None:
    # _give_free hands a few long runs (a workload's whole LRU, a balloon's rounds) to slices:
    # the same state, block counts and free count as its scatter reference, whatever the runs
    # (in any order, overlapping, or outside the guest: the same error)
    one, ref = _aged(seed), _aged(seed)
    parts = [np.arange(f, f + k, dtype=np.int64) for f, k in runs]
    if shuffle:
        parts = [parts[i] for i in np.random.default_rng(order).permutation(len(parts))]
    pfns = np.concatenate(parts)
    errors = []
    for give in (one._give_free, ref._give_free_each):
        try:
            give(pfns)
            errors.append("")
        except IndexError:
            errors.append("IndexError")
    assert errors[0] == errors[1]
    assert state_diff(state_of(one), state_of(ref)) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**20))
def test_a_workload_killed_gives_back_its_frames_as_their_scatter(seed: int) -> None:
    # an OOM kill gives back the whole LRU at once: as runs, the state of the scatter
    one, ref = _aged(seed), _aged(seed)
    for m, give in ((one, one._give_free), (ref, ref._give_free_each)):
        victims = m.anon.pop_front(len(m.anon))
        if victims.size:
            give(victims)
    assert state_diff(state_of(one), state_of(ref)) == []
    assert one.check_invariants() == []


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(0, 3)), max_size=12),
       st.integers(0, 3), st.integers(1, 511), st.lists(st.integers(0, 12), min_size=1,
                                                        max_size=60))
def test_free_frames_of_groups_of_blocks_are_those_of_their_rows(
        script: list[tuple[int, int]], report: int, odd: int, blocks: list[int]) -> None:
    # _free_frames_in looks at a few groups of consecutive blocks with a slice of the state
    # each: the frames its pass over their rows (the reference) finds, in the same order (the
    # partial last block, block 12, included)
    m = _odd_guest(script, report, odd)
    b = np.array(blocks, dtype=np.intp)
    assert m._free_frames_in(b).tolist() == m._free_frames_in_rows(b).tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(0, 3)), max_size=12),
       st.integers(0, 3), st.integers(1, 511), st.integers(1, 13), st.integers(1, 512))
def test_a_bulk_take_made_as_one_range_is_its_parts_joined(
        script: list[tuple[int, int]], report: int, odd: int, k: int, m: int) -> None:
    # _take_blocks_free makes the output at its final size when the wholly free blocks are
    # consecutive: the frames, state and counts of the parts joined (the reference), for the
    # first k blocks in the search's order (partly used ones, reported ones after, the
    # partial last block), m frames of the last
    one, ref = _odd_guest(script, report, odd), _odd_guest(script, report, odd)
    cand = (one._bfree > 0).nonzero()[0]
    rep = one.reported[cand]
    blocks = np.concatenate((cand[~rep], cand[rep]))[:k]
    if blocks.size == 0:
        return
    m = min(m, int(one._bfree[blocks[-1]]))
    got = one._take_blocks_free(blocks, m, int(PageState.BALLOON))
    want = ref._take_blocks_free_parts(blocks, m, int(PageState.BALLOON))
    assert got.dtype == want.dtype and got.tolist() == want.tolist()
    assert state_diff(state_of(one), state_of(ref)) == []


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**20), st.booleans(), st.lists(st.tuples(
    st.sampled_from(["state", "nostate", "twice", "other", "outside", "bfree", "count",
                     "isolated"]),
    st.integers(0, 2**31)), max_size=3))
def test_invariants_checked_by_runs_are_those_of_the_scan(
        seed: int, odd: bool, breaks: list[tuple[str, int]]) -> None:
    # check_invariants (a count per state, page lists by their runs, block sums eight bytes
    # at a time) says what check_invariants_scan (the reference) says, of a consistent guest
    # (an aged one, or one with a partial last block) and of one broken in a few ways
    m = _odd_guest([(700, 2), (900, 0), (300, 3)], 1, 1 + seed % 511) if odd else _aged(seed)
    for how, r in breaks:
        tp = m.total_pages
        if how == "state":
            m.state[r % tp] = r % 6  # any state
        elif how == "nostate":
            m.state[r % tp] = 6 + r % 250  # a byte that is no state
        elif how == "twice" and len(m.cache):
            m.cache.push_back(m.cache.to_array()[r % len(m.cache) :][:3])
        elif how == "other":
            m.anon.push_run(r % tp, 1 + r % 40)  # frames of any state, maybe listed already
        elif how == "outside":
            m.cache.push_run(tp - r % 5, 1 + r % 9)  # running past the guest's end
        elif how == "bfree":
            m._bfree[r % m._bfree.size] -= 1
        elif how == "count":
            m._reportable += 1
        else:
            m._isolated += 1
    try:
        want = m.check_invariants_scan()
    except IndexError:  # a frame past the end, as the scan indexes the state with it
        with pytest.raises(IndexError):
            m.check_invariants()
        return
    assert m.check_invariants() == want
    if not breaks:
        assert want == []


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**20), st.lists(st.tuples(st.integers(1, 40), st.booleans(),
                                                  st.integers(0, 2**31)), max_size=6))
def test_reporting_by_slices_is_reporting_by_index(
        seed: int, rounds: list[tuple[int, bool, int]]) -> None:
    # isolate_reportable and return_isolated write consecutive blocks as slices: the blocks
    # the scan finds, isolated, and returned as the index of each (the reference) returns
    # them, in whole or in part, in any order
    m, ref = _aged(seed), _aged(seed)
    for k, reported, r in rounds:
        cand = ((m._bfree == BLOCK_PAGES) & ~m.reported).nonzero()[0]
        room = (m.free_pages - m.watermarks.low) // BLOCK_PAGES
        want = cand[: max(0, min(k, room))]
        got = m.isolate_reportable(k, m.watermarks.low)
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
        assert ref.isolate_reportable(k, ref.watermarks.low).tolist() == want.tolist()
        part = got[r % 3 :] if r % 2 else got[::-1]  # some, reversed: the general path
        m.return_isolated(part, reported)
        ref._return_isolated_each(part.copy(), reported)
        assert state_diff(state_of(m), state_of(ref)) == []
        assert m.check_invariants_scan() == []
    # a block not isolated, alone or next to an isolated one: refused, nothing changed
    blocks = m.isolate_reportable(1, 0)
    for bad in ([0], [int(b) for b in blocks] + [int(blocks[0]) + 1] if blocks.size else [1, 2]):
        before = state_of(m)
        with pytest.raises(UsageError, match="not isolated"):
            m.return_isolated(np.array(bad, dtype=np.int64), True)
        assert state_diff(state_of(m), before) == []


# ------------------------------------------------------------------ a squeezed page cache
def _squeezed(seed: int, file_frac: float, cold: float) -> tuple[GuestMemory, Demand]:
    """An aged guest over a ``NullRam`` whose workload wants more file data than fits: after
    a first step its page cache recycles its own coldest pages every step (a busy fleet
    guest under a balloon)."""
    m = _aged(seed)
    m.store = NullRam(m.total_pages)
    room = m.total_pages - m.reserved_pages
    anon = room // 3
    file = int(room * file_frac)
    d = Demand(anon, anon // 2, file, file // 4, cold)
    m.step(100.0, 1.0, d)
    return m, d


def _read_frames(m: GuestMemory, n: int, runs: list[tuple[int, int]], tally: _Tally) -> None:
    """``_read_runs`` as the general path of ``_read_file`` ends: a frame list pushed and
    touched (the reference of a read of one page)."""
    m.events.major_faults += n
    tally.major += n
    refaults = min(n, m._file_evicted)
    m._file_evicted -= refaults
    tally.stall_s += refaults * MAJOR_FAULT_S
    pfns = run_list_frames(runs)
    m.cache.push_back(pfns)
    m._touch(pfns)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.floats(0.5, 1.2),
       st.sampled_from([0.0001, 0.0003, 0.001, 0.01, 0.05, 0.3]),
       st.integers(1, 12))
def test_reads_of_a_squeezed_cache_as_runs_end_where_frame_lists_end(
        seed: int, file_frac: float, cold: float, steps: int) -> None:
    # _read_file's takes as runs (none evicted, or the cache's recycle of its coldest pages;
    # a read of one page a run of one: ``_read_runs``) end in exactly the state of the
    # general path, which takes frame lists from the search and pushes and touches them (the
    # reference: no take as runs, no run of one)
    fast, d = _squeezed(seed, file_frac, cold)
    ref, _ = _squeezed(seed, file_frac, cold)
    for i in range(steps):
        now = 101.0 + i
        got = fast.step(now, 1.0, d)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GuestMemory, "_take_runs", lambda self, n, v: [])
            mp.setattr(GuestMemory, "_read_runs", _read_frames)
            want = ref.step(now, 1.0, d)
        assert got == want
        assert state_diff(state_of(fast), state_of(ref)) == []
    assert fast.check_invariants() == []


def test_a_squeezed_cache_recycles_its_coldest_pages_as_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the steady state of a busy guest under a balloon: each step evicts the cache's
    # coldest pages and reads as many back, and takes, pushes and touches runs, no frame list
    m = GuestMemory(64 * BLOCK_PAGES, store=NullRam(64 * BLOCK_PAGES))
    d = Demand(20 * BLOCK_PAGES, 10 * BLOCK_PAGES, 60 * BLOCK_PAGES, 40 * BLOCK_PAGES, 0.05)
    m.step(1.0, 1.0, d)
    assert m.free_pages < m.watermarks.low + 100  # squeezed
    def no_list(*args: object) -> None:
        raise AssertionError("a frame list")

    monkeypatch.setattr(PfnDeque, "push_back", no_list)
    monkeypatch.setattr(GuestMemory, "_touch", no_list)
    evicted = m.events.direct_reclaim
    for t in range(2, 6):
        r = m.step(float(t), 1.0, d)
        assert r.major_faults > 1
    assert m.events.direct_reclaim > evicted
    monkeypatch.undo()
    assert m.check_invariants() == []


# ------------------------------------------------------------------ reportable blocks, counted
def _runs_of(pfns: PfnArray) -> list[tuple[int, int]]:
    """``pfns`` as ``(first, length)`` runs of consecutive frames, in their order."""
    runs: list[tuple[int, int]] = []
    for f in pfns.tolist():
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((f, 1))
    return runs


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["step", "nosleep", "sleep", "huge", "free", "free_runs",
                             "free_blocks", "report", "nosleep_each", "sleep_each"]),
            st.integers(0, 9000), st.integers(0, 60), st.floats(0, 1)),
        max_size=30,
    ),
    st.sampled_from([0, mib_to_pages(16)]),
    st.sampled_from([1, BLOCK_PAGES]),
)
def test_the_count_of_reportable_blocks_answers_as_the_pass_over_them(
        script: list[tuple[str, int, int, float]], swap: int, host: int) -> None:
    # has_reportable answers from a count of the wholly free, not reported blocks kept where
    # the blocks change (asked every period of a busy virtio guest): after any sequence of
    # takes, gives, workload steps and reports, it is what a pass over the blocks answers
    m = GuestMemory(G64, swap_pages=swap, store=NullRam(G64), host_page_frames=host)
    held = np.empty(0, dtype=np.int64)
    heads = np.empty(0, dtype=np.int64)  # alloc_huge's blocks, held whole
    now = 0.0
    for op, a, b, f in script:
        keep = lambda frames, a=a: min(a % 700, int(frames.size))  # noqa: E731
        if op == "step":
            now += 1.0
            m.step(now, 1.0, demand(mib_to_pages(a % 70), mib_to_pages(b % 30), hot=f,
                                    cold=f / 2))
        elif op == "nosleep":
            held = np.concatenate((held, m.alloc_nosleep(a)))
        elif op == "sleep":
            held = np.concatenate((held, m.alloc_sleep(a)))
        elif op == "huge":
            heads = np.concatenate((heads, m.alloc_huge(a % 20)))
        elif op == "free":
            m.free_balloon(held[:a])
            held = held[a:]
        elif op == "free_runs":
            m.free_balloon_runs(_runs_of(held[-a:] if a else held[:0]))
            held = held[: held.size - min(a, held.size)] if a else held
        elif op == "free_blocks":
            m.free_balloon_blocks(heads[: b % 8])
            heads = heads[b % 8 :]
        elif op == "report":
            blocks = m.isolate_reportable(b % 9, keep_free=a % 3 * m.watermarks.low)
            m.return_isolated(blocks, reported=f < 0.7)
        elif op in ("nosleep_each", "sleep_each") and host == 1:
            if op == "nosleep_each":
                got = m.alloc_nosleep_each(a, keep)
            else:
                got, taken, _ = m.alloc_sleep_each(a, keep)
                if taken >= 0:
                    got = np.concatenate((got, [taken]))
            held = np.concatenate((held, got))
        for keep_free in (0, m.watermarks.low, m.free_pages - BLOCK_PAGES, m.free_pages):
            assert m.has_reportable(keep_free) == m.has_reportable_scan(keep_free)
        assert m.check_invariants() == []
