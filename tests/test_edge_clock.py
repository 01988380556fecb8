"""MonotonicClock: the real clock the daemon's engine and its backends share."""

from __future__ import annotations

import time

from memballoon.edge.clock import MonotonicClock


def test_reads_the_monotonic_clock() -> None:
    c = MonotonicClock()
    a = c.now()
    b = time.monotonic()
    assert a <= b <= c.now()
