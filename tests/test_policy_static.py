"""StaticPolicy: no ballooning, or targets held inside the guests' limits."""

from __future__ import annotations

import pytest

from memballoon.model.errors import ConfigError
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.policy.static import STATIC_MODES, StaticPolicy, StaticSnapshot

HOST = HostSample(budget_pages=100_000, resident_pages=90_000)


def guest(name: str, balloon: int, target: int, **kw: int | None) -> GuestSample:
    return GuestSample(name, ram_pages=10_000, balloon_pages=balloon, target_pages=target,
                       settings=GuestSettings(**kw))  # type: ignore[arg-type]


def test_modes_and_name() -> None:
    assert STATIC_MODES == ("deflate", "hold")
    assert StaticPolicy().name == "static"
    with pytest.raises(ValueError, match="unknown mode"):
        StaticPolicy("squeeze")


def test_deflate_sets_every_balloon_to_zero() -> None:
    gs = [guest("a", 3000, 3000), guest("b", 0, 0), guest("c", 500, 800)]
    ds = StaticPolicy().decide(HOST, gs, 0.0)
    assert {d.guest: d.balloon_pages for d in ds} == {"a": 0, "c": 0}
    assert all(d.reason.startswith("static deflate") for d in ds)


def test_deflate_respects_a_ceiling_below_ram() -> None:
    # a guest capped at 6000 pages of its 10000 keeps a balloon of 4000
    ds = StaticPolicy().decide(HOST, [guest("a", 5000, 5000, max_pages=6000)], 0.0)
    assert [(d.guest, d.balloon_pages) for d in ds] == [("a", 4000)]


def test_hold_keeps_targets_and_pulls_broken_ones_inside() -> None:
    gs = [guest("a", 3000, 3000), guest("b", 9500, 9500, min_pages=2000)]
    ds = StaticPolicy("hold").decide(HOST, gs, 0.0)
    assert [(d.guest, d.balloon_pages) for d in ds] == [("b", 8000)]


def test_dead_guests_are_left_alone() -> None:
    g = GuestSample("a", 10_000, 3000, 3000, alive=False)
    assert StaticPolicy().decide(HOST, [g], 0.0) == []


def test_bad_mode_is_a_config_error_and_the_snapshot_is_empty() -> None:
    with pytest.raises(ConfigError, match="unknown mode"):
        StaticPolicy("squeeze")
    snap = StaticPolicy().snapshot(0.0)
    assert snap.model_dump() == {"version": 1, "policy": "static"}
    StaticPolicy("hold").restore(StaticSnapshot.model_validate_json(snap.model_dump_json()), 1.0)
