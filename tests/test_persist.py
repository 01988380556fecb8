"""Frame ranges in device snapshots: validation, and bitmaps to ranges and back."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from memballoon.host.persist import (
    FrameRanges,
    as_range_array,
    check_disjoint,
    check_inside,
    mask_of,
    ranges_of,
)
from memballoon.model.errors import ConfigError
from memballoon.model.pages import coalesce


class Holder(BaseModel):
    ranges: FrameRanges


def test_frame_ranges_are_sorted_disjoint_and_non_empty() -> None:
    assert Holder.model_validate_json('{"ranges": [[0, 2], [2, 5], [9, 10]]}').ranges == (
        (0, 2), (2, 5), (9, 10))  # touching ranges are still one set
    assert Holder(ranges=()).ranges == ()
    for bad in ([[0, 5], [4, 6]], [[4, 6], [0, 2]], [[3, 3]], [[5, 3]], [[-1, 2]], [[1, 2, 3]]):
        with pytest.raises(ValidationError):
            Holder.model_validate({"ranges": bad})


def test_check_inside_and_check_disjoint() -> None:
    check_inside("x", ((0, 10),), 10)
    check_inside("x", (), 0)
    with pytest.raises(ConfigError, match="x: frame range"):
        check_inside("x", ((0, 1), (5, 11)), 10)
    check_disjoint("a", ((0, 2), (8, 9)), "b", ((2, 8), (9, 12)))
    with pytest.raises(ConfigError, match="a and b share frames"):
        check_disjoint("a", ((0, 2), (8, 10)), "b", ((2, 8), (9, 12)))


@given(st.lists(st.booleans(), max_size=200))
def test_ranges_of_and_mask_of_invert_each_other(bits: list[bool]) -> None:
    mask = np.array(bits, dtype=np.bool_)
    ranges = ranges_of(mask)
    assert as_range_array(ranges).tolist() == coalesce(np.flatnonzero(mask)).tolist()
    assert np.array_equal(mask_of(ranges, mask.size), mask)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), max_size=20),
       st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), max_size=20))
def test_check_disjoint_agrees_with_sets(a: list[tuple[int, int]],
                                         b: list[tuple[int, int]]) -> None:
    def norm(extents: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        frames = {f for s, n in extents for f in range(s, s + n)}
        return ranges_of(mask_of(tuple(coalesce(sorted(frames)).tolist()), 64))

    ra, rb = norm(a), norm(b)
    fa = {f for s, e in ra for f in range(s, e)}
    fb = {f for s, e in rb for f in range(s, e)}
    if fa & fb:
        with pytest.raises(ConfigError):
            check_disjoint("a", ra, "b", rb)
    else:
        check_disjoint("a", ra, "b", rb)


def test_mask_of_touching_ranges() -> None:
    assert mask_of(((0, 2), (2, 3)), 4).tolist() == [True, True, True, False]
    assert mask_of((), 3).tolist() == [False] * 3


def test_doctests() -> None:
    import doctest

    import memballoon.host.persist as mod

    assert doctest.testmod(mod).failed == 0
