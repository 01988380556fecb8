"""SimBackend: pairs on the virtual clock as a manager backend; reports as the guest makes them."""

from __future__ import annotations

import random

import pytest

from memballoon.guest.workload import Steady
from memballoon.harness.pair import make_pair
from memballoon.manager.port import ManualClock
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.observe import working_set_pages
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import ESX_SAMPLE_PAGES, SimBackend


def test_samples_report_what_the_guest_model_holds() -> None:
    pair = make_pair("virtio", mib_to_pages(128), Steady(anon_mib=32, file_mib=16))
    clock = ManualClock()
    b = SimBackend({"web": pair}, clock, rng=random.Random(1))
    assert b.guests()["web"].report is None  # nothing reported yet
    b.advance(2.0)
    assert b.set_target("web", mib_to_pages(16))
    b.advance(2.0)
    s1 = b.guests()["web"]
    r = s1.report
    assert r is not None and s1.name == "web" and r.guest == "web"
    assert s1.report_time == 4.0 and r.time_s == pytest.approx(4.0)
    mi = pair.mem.meminfo()
    assert r.total_bytes == mi.total_pages * PAGE_SIZE
    assert r.anon_bytes == mi.anon_pages * PAGE_SIZE
    assert r.available_bytes == mi.available_pages * PAGE_SIZE
    assert s1.balloon_pages == r.balloon_actual_pages == mib_to_pages(16)
    assert s1.target_pages == mib_to_pages(16)
    assert r.stall_us == pair.mem.events.stall_us
    assert 0.0 <= r.stall_pct <= 100.0
    assert s1.active_sampled == ESX_SAMPLE_PAGES and 0 <= s1.active_touched <= ESX_SAMPLE_PAGES
    assert s1.resident_bytes == pair.ram.resident_bytes() == b.host_resident_bytes()
    # the report is a valid wire report
    assert PressureReport.decode(r.encode()) == r
    # the working set is the guest's size minus what it could still give
    ws = working_set_pages(s1, r, Counters())
    assert ws == s1.size_pages - mi.available_pages


def test_stall_pct_covers_the_interval_since_the_previous_report() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Steady(anon_mib=8, file_mib=8))
    clock = ManualClock()
    b = SimBackend({"g": pair}, clock, report_every_s=1.0)
    b.advance(1.0)
    assert b.guests()["g"].report is not None
    pair.mem.events.stall_us += 500_000  # half a second of stall
    b.advance(1.0)  # one second (virtio ticks are 200 ms)
    r = b.guests()["g"].report
    assert r is not None and r.stall_pct >= 50.0


def test_targets_outside_the_guest_are_refused_and_counted() -> None:
    b = SimBackend({"g": make_pair("vmw", mib_to_pages(64), Steady(anon_mib=2, file_mib=2))},
                   ManualClock())
    assert not b.set_target("g", mib_to_pages(64) + 1)
    assert not b.set_target("nobody", 1)
    assert b.counters["set_target_refused"] == 2
    with pytest.raises(UsageError):
        SimBackend({}, ManualClock(), report_every_s=0.0)
    with pytest.raises(UsageError):
        b.clock.advance(-1.0)
