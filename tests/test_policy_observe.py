"""observe: figures read off untrusted reports."""

from __future__ import annotations

from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.observe import (
    PolicyReportCounter,
    available_pages,
    counter_delta,
    fresh_report,
    working_set_pages,
)
from memballoon.policy.sample import GuestSample, GuestSettings
from memballoon.protocol.pressure import PressureReport


def test_fresh_report_and_untrusted_figures() -> None:
    r = PressureReport("g", 0.0, 4096, 10**9, 10**9, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
    g = GuestSample("g", 1000, 100, 100, report=r, report_time=9.0)
    assert fresh_report(g, 5.0, 10.0) is r
    assert fresh_report(g, 0.5, 10.0) is None
    assert fresh_report(g, 0.5, 8.0) is r  # stamped later than now: a clock glitch, not old
    assert fresh_report(GuestSample("g", 1000, 0, 0, report=r), 5.0, 10.0) is None  # no time
    assert fresh_report(GuestSample("g", 1000, 0, 0, report=r, report_time=10.0,
                                    alive=False), 5.0, 10.0) is None
    c = Counters()
    assert available_pages(g, r, c) == 900  # clamped to what it keeps
    assert c["policy_report_available_above_ram"] == 1
    back = PolicyReportCounter.SWAP_IN_BACKWARDS
    assert counter_delta(5, 9, c, back) == 0 and c["policy_report_swap_in_backwards"] == 1
    assert counter_delta(9, 5, c, back) == 4 and counter_delta(9, None, c, back) == 0
    assert c["policy_report_swap_in_backwards"] == 1


def test_report_counter_names() -> None:
    # the names metrics and journals already know: unchanged by the enum
    assert {str(m) for m in PolicyReportCounter} == {
        "policy_report_free_above_ram", "policy_report_available_above_ram",
        "policy_report_available_above_size", "policy_report_swap_in_backwards",
        "policy_report_major_faults_backwards", "policy_report_oom_kills_backwards",
        "policy_report_refused_backwards"}


def test_working_set_counts_the_balloon_once_whatever_memtotal_says() -> None:
    # a real Linux guest without deflate-on-OOM reports MemTotal without the balloon; a local
    # guest reports its RAM: either way the working set is RAM - balloon - MemAvailable
    ram, balloon, avail = mib_to_pages(768), mib_to_pages(384), mib_to_pages(200)
    for total in (ram, ram - balloon):
        r = PressureReport(
            guest="g", time_s=1.0, total_bytes=total * PAGE_SIZE, free_bytes=avail * PAGE_SIZE,
            available_bytes=avail * PAGE_SIZE, anon_bytes=0, cache_bytes=0,
            balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=0, swap_out_pages=0,
            major_faults=0, oom_kills=0, stall_us=0, stall_pct=0.0,
            balloon_target_pages=balloon, balloon_actual_pages=balloon)
        g = GuestSample("g", ram, balloon, balloon, GuestSettings(), r, 0.0)
        assert working_set_pages(g, r, Counters()) == ram - balloon - avail
