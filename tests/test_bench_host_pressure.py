"""bench host-pressure: the figures from a trace, then the real scenario on QEMU guests."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_host import Libvirtd, libvirtd  # noqa: F401 (the fixture)
from memballoon.bench.host_pressure import _Trace, measure, run_one


def test_measure_reads_the_figures_off_a_trace() -> None:
    t = _Trace(avail=[(0.0, 500), (1.0, 90), (1.5, 80), (4.0, 300)],
               steps=[(0.5, 500, {"a": 0, "b": 0}, {"a": 0, "b": 0}),
                      # the first shrink, 0.6 s after crossing
                      (1.6, 80, {"a": 50, "b": 0}, {"a": 0, "b": 0}),
                      # a's target brought down to the balloon it reached: no growth
                      (2.1, 85, {"a": 45, "b": 0}, {"a": 45, "b": 0}),
                      # a reversal: a grew while the host was short
                      (2.6, 90, {"a": 30, "b": 10}, {"a": 45, "b": 0}),
                      (3.6, 300, {"a": 60, "b": 10}, {"a": 30, "b": 10}),
                      # back within 5 pages: recovered
                      (5.6, 300, {"a": 2, "b": 1}, {"a": 2, "b": 1})],
               changes=[(1.6, 80, "a", 0, 50, 0),
                        (2.1, 85, "a", 50, 45, 45),  # brought down to its balloon: no growth
                        (2.6, 90, "a", 45, 30, 45),  # a reversal: a grew while the host was short
                        (2.6, 90, "b", 0, 10, 0),
                        (3.6, 300, "a", 30, 60, 30),
                        (5.6, 300, "a", 60, 2, 30)])  # the host has room again: no reversal
    m = measure(t, reserve=100, idle={"a": 0, "b": 0}, t_exit=4.0, tolerance_pages=5)
    assert m["crossed_reserve"] and m["first_shrink_s"] == pytest.approx(0.6)
    assert m["reversals_under_pressure"] == 1 and m["recovered_s"] == pytest.approx(1.6)
    assert m["host_min_available_bytes"] == 80 * 4096
    never = measure(_Trace(avail=[(0.0, 500)], steps=[]), reserve=100, idle={}, t_exit=0.0,
                    tolerance_pages=5)
    assert not never["crossed_reserve"] and never["first_shrink_s"] is None


@pytest.mark.qemu
def test_domains_shrink_under_a_host_side_process_and_grow_back(
        libvirtd: Libvirtd, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """Issue 13 item 5: two libvirt domains of 1 GiB and a host-side process in the cgroup that
    holds them (the host's share): the process grows until the available memory is under the
    reserve, holds, and exits. The domains shrink, no guest is OOM-killed (its kernel log and
    its reports), the cgroup's limit is never hit, and they grow back after it exits."""
    import asyncio

    r = asyncio.run(run_one("default", run_dir=tmp_path, world="libvirt", uri=libvirtd.uri))
    why = {k: r[k] for k in ("first_shrink_s", "reversals_under_pressure", "recovered_s",
                             "guest_oom_kills", "limit_hits", "held_back", "decisions")}
    assert r["world"] == "libvirt" and r["crossed_reserve"], why
    assert r["first_shrink_s"] is not None, why
    assert r["reversals_under_pressure"] == 0, why
    assert r["guest_oom_kills"] == 0 and r["limit_hits"] == 0, why
    assert r["recovered_s"] is not None, why
