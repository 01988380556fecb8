"""``guest.driver``: the reference of a quiet guest's idle periods, one call a period."""

from __future__ import annotations

from memballoon.guest.driver import idle_each


def test_idle_each_runs_the_work_once_a_period_up_to_the_limit() -> None:
    seen: list[float] = []
    now, n = idle_each(seen.append, 1.0, 0.5, 3.0)
    assert (now, n) == (3.0, 4)
    assert seen == [1.5, 2.0, 2.5, 3.0]


def test_idle_each_adds_the_period_once_a_period_as_the_ticks_do() -> None:
    seen: list[float] = []
    now, n = idle_each(seen.append, 0.0, 0.1, 0.35)
    want = 0.0
    for _ in range(3):
        want += 0.1
    assert (now, n) == (want, 3)
    assert len(seen) == 3


def test_idle_each_with_no_period_before_the_limit_runs_nothing() -> None:
    seen: list[float] = []
    assert idle_each(seen.append, 5.0, 1.0, 5.5) == (5.0, 0)
    assert seen == []
