"""GuestSample, GuestSettings, HostSample: the records from a world to its policy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memballoon.model.errors import UsageError
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample


def test_a_changed_copy_leaves_the_sample_as_it_was_and_samples_hash_by_their_fields() -> None:
    # read-only to the type checker (mypy --strict refuses an assignment to a field)
    s = GuestSample("g", 1000, 200, 300)
    t = replace(s, balloon_pages=5, settings=GuestSettings(min_pages=100))
    assert (s.balloon_pages, s.settings) == (200, GuestSettings())
    assert (t.balloon_pages, t.ram_pages, t.settings.min_pages) == (5, 1000, 100)
    assert s == GuestSample("g", 1000, 200, 300) and s != t
    assert hash(s) == hash(GuestSample("g", 1000, 200, 300))
    assert not hasattr(s, "__dict__")  # slots: a fleet keeps thousands


def test_a_guest_sample_by_position_is_the_same_as_by_name() -> None:
    st = GuestSettings(max_pages=800)
    by_pos = GuestSample("g", 1000, 200, 300, st, None, 2.5, True, 4096, 100, 7)
    by_name = GuestSample(name="g", ram_pages=1000, balloon_pages=200, target_pages=300,
                          settings=st, report_time=2.5, resident_bytes=4096,
                          active_sampled=100, active_touched=7)
    assert by_pos == by_name and by_pos.report is None and by_pos.alive


def test_size_floor_ceiling_and_report_age() -> None:
    s = GuestSample("g", 1000, 200, 300, GuestSettings(min_pages=100, max_pages=1500),
                    report_time=10.0)
    assert (s.size_pages, s.floor_pages(), s.ceiling_pages()) == (800, 100, 1000)
    assert s.report_age_s(12.5) == 2.5 and s.report_age_s(9.0) == 0.0
    assert GuestSample("h", 1000, 0, 0).report_age_s(5.0) is None


def test_settings_refuse_a_max_under_the_min_and_host_short_pages() -> None:
    with pytest.raises(UsageError):
        GuestSettings(min_pages=10, max_pages=5)
    assert HostSample(100, 50, available_pages=10, reserve_pages=30).short_pages == 20
    assert HostSample(100, 50).short_pages == 0
