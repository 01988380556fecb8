"""WorkMeter: a guest's share of the host's loop per turn and per period (no clock of its own)."""

from __future__ import annotations

import pytest

from memballoon.local.fairness import WorkLimits, WorkMeter
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB


def test_a_turn_ends_when_any_of_its_shares_is_spent() -> None:
    m = WorkMeter(WorkLimits(turn_chains=4, turn_messages=3, turn_bytes=100))
    m.start_turn(0.0)
    assert not m.turn_spent and m.chains_left() == 4
    m.charge(chains=3)
    assert m.chains_left() == 1 and not m.turn_spent
    m.charge(chains=1)
    assert m.turn_spent and m.chains_left() == 0
    for kw in ({"messages": 3}, {"nbytes": 100}):
        m.start_turn(0.1)
        assert not m.turn_spent
        m.charge(**kw)
        assert m.turn_spent
    assert (m.max_turn_chains, m.max_turn_messages, m.max_turn_bytes) == (4, 3, 100)
    assert m.turns == 3 and m.periods == 1


def test_a_period_spent_is_exhausted_until_the_period_ends() -> None:
    m = WorkMeter(WorkLimits(period_s=1.0, period_doorbells=10, period_chains=100))
    m.start_turn(5.0)
    m.charge(doorbells=10)
    assert m.exhausted and m.turn_spent and m.period_end == 6.0
    m.start_turn(5.9)  # the same period: still exhausted
    assert m.exhausted
    m.start_turn(6.0)  # a new one
    assert not m.exhausted and m.periods == 2 and m.period_end == 7.0
    m.charge(chains=99)
    m.start_turn(6.5)
    assert m.chains_left() == 1  # the period's share bounds a turn's too
    assert m.stats()["chains"] == 99 and m.stats()["doorbells"] == 10


def test_an_honest_guest_fits_its_share_and_limits_are_checked() -> None:
    pages = 4 * 1024 * MIB // 4096  # 4 GiB
    lim = WorkLimits.for_guest(pages)
    arrays = pages // 256
    assert lim.period_chains >= 2 * arrays  # all of it in and out in Linux's arrays
    assert lim.period_bytes >= 2 * 4 * pages  # and their PFNs
    small = WorkLimits.for_guest(4096)
    assert small.period_chains >= 1024 and small.period_bytes >= MIB
    with pytest.raises(ConfigError, match="turn_chains"):
        WorkLimits(turn_chains=0)
    with pytest.raises(ConfigError, match="period_s"):
        WorkLimits(period_s=float("inf"))
