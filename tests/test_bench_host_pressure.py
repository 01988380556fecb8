"""bench host-pressure: the figures from a trace, then the real scenario on QEMU guests."""

from __future__ import annotations

from pathlib import Path

import pytest

from memballoon.bench.host_pressure import _Trace, measure, run_one
from memballoon.host.cgroup import detect


def test_measure_reads_the_figures_off_a_trace() -> None:
    t = _Trace(avail=[(0.0, 500), (1.0, 90), (1.5, 80), (4.0, 300)],
               steps=[(0.5, 500, {"a": 0, "b": 0}),
                      (1.6, 80, {"a": 50, "b": 0}),  # the first shrink, 0.6 s after crossing
                      (2.6, 90, {"a": 40, "b": 10}),  # a reversal: a grew while short
                      (3.6, 300, {"a": 60, "b": 10}),
                      (5.6, 300, {"a": 2, "b": 1})])  # back within 5 pages: recovered
    m = measure(t, reserve=100, idle={"a": 0, "b": 0}, t_exit=4.0, tolerance_pages=5)
    assert m["crossed_reserve"] and m["first_shrink_s"] == pytest.approx(0.6)
    assert m["reversals_under_pressure"] == 1 and m["recovered_s"] == pytest.approx(1.6)
    assert m["host_min_available_bytes"] == 80 * 4096
    never = measure(_Trace(avail=[(0.0, 500)], steps=[]), reserve=100, idle={}, t_exit=0.0,
                    tolerance_pages=5)
    assert not never["crossed_reserve"] and never["first_shrink_s"] is None


@pytest.mark.qemu
@pytest.mark.skipif(not detect().usable, reason="needs root and a memory cgroup")
def test_guests_shrink_under_a_host_side_process_and_grow_back(tmp_path: Path) -> None:
    # two real guests and a process that grows into their cgroup past the reserve, holds and
    # exits: the guests give memory at once, nobody is OOM-killed, the limit is never hit,
    # and they are back at their idle sizes after the process is gone
    import asyncio

    r = asyncio.run(run_one("default", run_dir=tmp_path))
    assert r["crossed_reserve"] and r["first_shrink_s"] is not None
    assert r["reversals_under_pressure"] == 0
    assert r["guest_oom_kills"] == 0 and r["limit_hits"] == 0
    assert r["recovered_s"] is not None
