"""BalloonHistory: the balloon in force at a report's moment."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memballoon.model.errors import UsageError
from memballoon.qemu.history import BalloonHistory


def test_the_size_in_force_at_a_moment() -> None:
    h = BalloonHistory()
    assert h.at(5.0) is None
    h.add(1.0, 100)
    h.add(2.0, 100)  # no change: not kept
    h.add(3.0, 300)
    assert len(h) == 2
    assert [h.at(t) for t in (0.0, 1.0, 2.9, 3.0, 99.0)] == [100, 100, 100, 300, 300]
    with pytest.raises(UsageError):
        h.add(2.0, 5)
    with pytest.raises(UsageError):
        BalloonHistory(0)
    h.clear()
    assert h.at(1.0) is None


@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 3)), max_size=40),
       st.floats(-1, 12, allow_nan=False))
def test_at_is_the_last_change_at_or_before(steps: list[tuple[float, int]], t: float) -> None:
    h = BalloonHistory(maxlen=8)
    polls = sorted(steps)
    for when, pages in polls:
        h.add(when, pages)
    if not polls:
        assert h.at(t) is None
        return
    # the reference: keep the changes, as the history does, then bounded to the last 8
    changes: list[tuple[float, int]] = []
    for when, pages in polls:
        if not changes or changes[-1][1] != pages:
            changes.append((when, pages))
    changes = changes[-8:]
    before = [p for when, p in changes if when <= t]
    assert h.at(t) == (before[-1] if before else changes[0][1])
