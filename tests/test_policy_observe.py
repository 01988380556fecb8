"""observe: a pair's state as a GuestSample; figures read off untrusted reports."""

from __future__ import annotations

import random

from memballoon.guest.workload import Steady
from memballoon.harness.pair import make_pair
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.base import GuestSample, GuestSettings
from memballoon.policy.observe import (
    ESX_SAMPLE_PAGES,
    available_pages,
    counter_delta,
    fresh_report,
    sample_from_pair,
    working_set_pages,
)
from memballoon.protocol.pressure import PressureReport


def test_sample_from_pair_reports_what_the_guest_model_holds() -> None:
    pair = make_pair("virtio", mib_to_pages(128), Steady(anon_mib=32, file_mib=16))
    s0 = sample_from_pair(pair, GuestSettings(), None, name="web")
    for _ in range(10):
        pair.tick()
    pair.set_target(mib_to_pages(16))
    for _ in range(10):
        pair.tick()
    s1 = sample_from_pair(pair, GuestSettings(min_pages=5), s0, rng=random.Random(1))
    r = s1.report
    assert r is not None and s1.name == "web" and r.guest == "web"
    mi = pair.mem.meminfo()
    assert r.total_bytes == mi.total_pages * PAGE_SIZE
    assert r.anon_bytes == mi.anon_pages * PAGE_SIZE
    assert r.available_bytes == mi.available_pages * PAGE_SIZE
    assert s1.balloon_pages == r.balloon_actual_pages == mib_to_pages(16)
    assert s1.target_pages == mib_to_pages(16)
    assert r.stall_us == pair.mem.events.stall_us
    assert 0.0 <= r.stall_pct <= 100.0
    assert s1.active_sampled == ESX_SAMPLE_PAGES and 0 <= s1.active_touched <= ESX_SAMPLE_PAGES
    assert s1.settings.min_pages == 5
    # the report is a valid wire report
    assert PressureReport.decode(r.encode()) == r
    # the working set is the guest's size minus what it could still give
    ws = working_set_pages(s1, r, Counters())
    assert ws == s1.size_pages - mi.available_pages


def test_stall_pct_covers_the_interval_since_the_previous_sample() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Steady(anon_mib=8, file_mib=8))
    s0 = sample_from_pair(pair, GuestSettings(), None, name="g")
    assert s0.report is not None
    pair.mem.events.stall_us += 500_000  # half a second of stall
    for _ in range(5):  # one second (virtio ticks are 200 ms)
        pair.tick()
    s1 = sample_from_pair(pair, GuestSettings(), s0)
    assert s1.report is not None and s1.report.stall_pct >= 50.0


def test_fresh_report_and_untrusted_figures() -> None:
    r = PressureReport("g", 0.0, 4096, 10**9, 10**9, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
    g = GuestSample("g", 1000, 100, 100, report=r, report_age_s=1.0)
    assert fresh_report(g, 5.0) is r
    assert fresh_report(g, 0.5) is None
    assert fresh_report(GuestSample("g", 1000, 0, 0, report=r), 5.0) is None  # no age
    assert fresh_report(GuestSample("g", 1000, 0, 0, report=r, report_age_s=0.0,
                                    alive=False), 5.0) is None
    c = Counters()
    assert available_pages(g, r, c) == 900  # clamped to what it keeps
    assert c["policy_report_available_above_ram"] == 1
    assert counter_delta(5, 9, c, "x") == 0 and c["policy_report_x_backwards"] == 1
    assert counter_delta(9, 5, c, "x") == 4 and counter_delta(9, None, c, "x") == 0


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
