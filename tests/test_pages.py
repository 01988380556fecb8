"""Page sets: PFN arrays folded into ranges, ranges merged, blocks expanded, ranges checked."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memballoon.model.errors import GuestAddressError
from memballoon.model.pages import (
    as_pfns,
    ascending_ranges,
    block_frames,
    check_ranges,
    coalesce,
    has_repeats,
    merge_range_lists,
    merge_ranges,
    range_pages,
    run_list_frames,
    run_list_ranges,
    sorted_pfns,
    sorted_runs,
)

#: PFN lists as drivers make them: ascending runs in any order, maybe a repeat or a stray.
_runs_in_any_order = st.lists(
    st.tuples(st.integers(0, 3000), st.integers(1, 40)), max_size=12
).flatmap(lambda runs: st.permutations(runs)).map(
    lambda runs: [p for start, n in runs for p in range(start, start + n)])


def test_coalesce_folds_runs() -> None:
    assert coalesce([7, 3, 4, 5, 9]).tolist() == [[3, 6], [7, 8], [9, 10]]
    assert coalesce([]).shape == (0, 2)
    assert coalesce([9, 8, 7, 6]).tolist() == [[6, 10]]  # one descending run (a VMware stack)
    assert coalesce([9, 8, 6, 5]).tolist() == [[5, 7], [8, 10]]
    # ends as a run's, frames not in one: runs folded all the same
    assert coalesce([5, 7, 6, 8]).tolist() == [[5, 9]]
    assert coalesce([8, 6, 7, 5]).tolist() == [[5, 9]]
    assert coalesce([4]).tolist() == [[4, 5]]


@given(st.sets(st.integers(0, 5000), max_size=300))
def test_coalesce_covers_exactly_the_pfns(pfns: set[int]) -> None:
    r = coalesce(sorted(pfns))
    covered = {p for s, e in r.tolist() for p in range(s, e)}
    assert covered == pfns
    assert range_pages(r) == len(pfns)
    if len(r) > 1:
        assert bool((r[1:, 0] > r[:-1, 1]).all())  # maximal: no two ranges touch


@given(_runs_in_any_order, st.booleans())
def test_coalesce_of_runs_in_any_order_is_the_ranges_of_their_sorted_frames(
        pfns: list[int], reverse: bool) -> None:
    # the reference: the sorted, de-duplicated frames, cut where a frame does not follow
    # the one before
    p = np.array(pfns[::-1] if reverse else pfns, dtype=np.int64)
    u = np.unique(p)
    cut = np.flatnonzero(np.diff(u) != 1) + 1
    want = [[int(r[0]), int(r[-1]) + 1] for r in np.split(u, cut)] if u.size else []
    got = coalesce(p)
    assert got.dtype == np.int64 and got.shape == (len(want), 2)
    assert got.tolist() == want


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 40)), max_size=12))
def test_run_list_ranges_are_the_ranges_of_the_runs_frames(runs: list[tuple[int, int]]) -> None:
    # what a bulk deflate hands the device with its frames: coalesce of them, from the runs
    got = run_list_ranges(runs)
    want = coalesce(run_list_frames(runs))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tolist() == want.tolist()


@given(_runs_in_any_order)
def test_ascending_ranges_are_coalesce_of_ascending_frames_and_none_otherwise(
        pfns: list[int]) -> None:
    p = np.array(pfns, dtype=np.int64)
    got = ascending_ranges(p)
    if p.size > 1 and not bool((np.diff(p) > 0).all()):
        assert got is None
    else:
        assert got is not None and got.dtype == np.int64
        assert got.tolist() == coalesce(p).tolist()
        # in order, as the frames run: their frames again
        assert run_list_frames([(a, b - a) for a, b in got.tolist()]).tolist() == pfns


def test_merge_ranges_folds_extents_without_expanding_them() -> None:
    assert merge_ranges([8, 0, 2], [10, 2, 4]).tolist() == [[0, 4], [8, 10]]
    assert merge_ranges([0, 1], [5, 3]).tolist() == [[0, 5]]  # overlap inside
    assert merge_ranges([3], [3]).shape == (0, 2)  # empty extents vanish


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=30))
def test_merge_ranges_covers_the_union(extents: list[tuple[int, int]]) -> None:
    starts = [s for s, _ in extents]
    ends = [s + n for s, n in extents]
    got = merge_ranges(starts, ends)
    covered = {p for s, e in got.tolist() for p in range(s, e)}
    assert covered == {p for s, e in zip(starts, ends, strict=True) for p in range(s, e)}
    if len(got) > 1:
        assert bool((got[1:, 0] > got[:-1, 1]).all())


def test_block_frames_lists_every_frame_block_by_block() -> None:
    assert block_frames([2, 0], 2).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    assert block_frames(np.array([1]), 9).tolist() == list(range(512, 1024))
    assert block_frames([], 9).size == 0


def test_merge_range_lists_joins_parts() -> None:
    one = np.array([[4, 9]], dtype=np.int64)
    assert merge_range_lists([one]) is one
    parts = [np.array([[8, 10]]), np.array([[0, 2], [2, 4]]), np.array([[9, 12]])]
    assert merge_range_lists(parts).tolist() == [[0, 4], [8, 12]]


def test_range_pages_and_as_pfns() -> None:
    assert range_pages(np.empty((0, 2), dtype=np.int64)) == 0
    assert range_pages(np.array([[2, 5]], dtype=np.int64)) == 3
    assert range_pages(np.array([[2, 5], [9, 10]], dtype=np.int64)) == 4
    a = np.arange(4, dtype=np.int64)
    assert np.shares_memory(as_pfns(a), a)  # no copy
    assert as_pfns([[1, 2]]).tolist() == [1, 2]


def test_check_ranges_refuses_what_lies_outside_the_guest() -> None:
    check_ranges(np.array([[0, 1024]], dtype=np.int64), 1024)
    check_ranges(np.empty((0, 2), dtype=np.int64), 1024)
    for bad in ([[-1, 3]], [[5, 5]], [[10, 20], [1000, 1025]], [[3, 9], [8, 8]]):
        with pytest.raises(GuestAddressError):
            check_ranges(np.array(bad, dtype=np.int64), 1024)
    with pytest.raises(GuestAddressError):
        check_ranges(np.array([1, 2, 3], dtype=np.int64), 1024)  # not (k, 2)


def test_doctests() -> None:
    import doctest

    import memballoon.model.pages as mod

    assert doctest.testmod(mod).failed == 0


@given(st.one_of(_runs_in_any_order, st.lists(st.integers(0, 300), max_size=200)))
def test_run_wise_helpers_agree_with_a_sort(pfns: list[int]) -> None:
    # coalesce, has_repeats and sorted_pfns work on runs, not a sort of the frames: the
    # same answers as np.unique and np.sort, for runs in any order and for any frames
    ranges = coalesce(pfns)
    assert {p for s, e in ranges.tolist() for p in range(s, e)} == set(pfns)
    if len(ranges) > 1:
        assert bool((ranges[1:, 0] > ranges[:-1, 1]).all())
    assert has_repeats(pfns) == (len(set(pfns)) != len(pfns))
    assert sorted_pfns(pfns).tolist() == sorted(pfns)


def test_run_wise_helpers_on_a_balloons_newest_rounds() -> None:
    p = np.concatenate([np.arange(5000, 6000), np.arange(0, 1000), np.arange(3000, 3500)])
    assert coalesce(p).tolist() == [[0, 1000], [3000, 3500], [5000, 6000]]
    assert not has_repeats(p)
    assert has_repeats(np.append(p, 3499))
    assert sorted_pfns(p).tolist() == sorted(p.tolist())


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=30))
def test_sorted_runs_is_a_sort_of_the_runs_frames(runs: list[tuple[int, int]]) -> None:
    # runs in any order, overlapping or empty: the same array as sorting every frame
    starts = np.array([s for s, _ in runs], dtype=np.int64)
    lens = np.array([n for _, n in runs], dtype=np.int64)
    frames = [f for s, n in runs for f in range(s, s + n)]
    assert sorted_runs(starts, lens).tolist() == sorted(frames)


@pytest.mark.parametrize("runs", [[], [(7, 1)], [(100, 5)], [(40, 3), (2, 2), (90, 4)]])
def test_run_list_frames_are_the_runs_frames_in_order(runs: list[tuple[int, int]]) -> None:
    want = [f + i for f, k in runs for i in range(k)]
    got = run_list_frames(runs)
    assert got.dtype == np.int64
    assert got.tolist() == want
