"""The registry, and properties every policy holds: floors, ceilings, known guests only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import clamp_balloon
from memballoon.policy.default import DefaultPolicy
from memballoon.policy.registry import (
    POLICIES,
    make_policy,
    policy_params,
    read_snapshot,
    restore_policy,
)
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport


def test_names() -> None:
    assert POLICIES == ("default", "static", "mom", "proxmox", "esx")
    for name in POLICIES:
        assert make_policy(name).name == name


def test_parameters_pass_through() -> None:
    p = make_policy("default", probe=False, max_report_age_s=3.0)
    assert isinstance(p, DefaultPolicy) and not p.probe and p.max_report_age_s == 3.0
    assert "tau" in policy_params("esx")
    assert make_policy("static", mode="hold").decide(HostSample(1, 0), [], 0.0) == []


def test_unknown_name_or_parameter_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'senpai'.*default, static"):
        make_policy("senpai")
    with pytest.raises(ValueError, match=r"no parameter 'tua'.*tau"):
        make_policy("esx", tua=0.5)
    with pytest.raises(ValueError, match="pressure_critical"):
        make_policy("mom", pressure_critical=0.5)
    with pytest.raises(ValueError, match="bad parameter value"):
        make_policy("esx", tau="high")


@st.composite
def guest_samples(draw: st.DrawFn, i: int) -> GuestSample:
    ram = draw(st.integers(2048, 1 << 20))
    lo = draw(st.integers(0, ram))
    hi = draw(st.one_of(st.none(), st.integers(lo, ram + 1000)))
    balloon = draw(st.integers(0, ram))
    target = draw(st.integers(0, ram))
    report = None
    if draw(st.booleans()):
        b = lambda hi_: draw(st.integers(0, hi_))  # noqa: E731
        report = PressureReport(
            guest=f"g{i}", time_s=draw(st.floats(0, 1e6)), total_bytes=ram * PAGE_SIZE,
            free_bytes=b(2 * ram) * PAGE_SIZE, available_bytes=b(2 * ram) * PAGE_SIZE,
            anon_bytes=b(ram) * PAGE_SIZE, cache_bytes=b(ram) * PAGE_SIZE,
            balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=b(1 << 30),
            swap_out_pages=b(1 << 30), major_faults=b(1 << 30), oom_kills=b(3),
            stall_us=b(1 << 40), stall_pct=draw(st.floats(0, 100)),
            balloon_target_pages=target, balloon_actual_pages=balloon,
            refused_pages=draw(st.one_of(st.none(), st.integers(0, 1 << 20))))
    sampled = draw(st.integers(0, 100))
    return GuestSample(
        f"g{i}", ram, balloon, target,
        GuestSettings(min_pages=lo, max_pages=hi, shares=draw(st.integers(1, 5000))),
        report, draw(st.one_of(st.none(), st.floats(0, 100))) if report else None,
        alive=draw(st.booleans()), active_sampled=sampled,
        active_touched=draw(st.integers(0, sampled + 5)))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[HostSample, list[GuestSample]]:
    n = draw(st.integers(0, 5))
    gs = [draw(guest_samples(i)) for i in range(n)]
    budget = draw(st.integers(1, 1 << 22))
    return HostSample(budget, draw(st.integers(0, 1 << 22))), gs


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(worlds(), min_size=1, max_size=4))
def test_decisions_respect_floors_and_ceilings(
    name: str, rounds: list[tuple[HostSample, list[GuestSample]]]
) -> None:
    pol = make_policy(name)
    for t, (host, guests) in enumerate(rounds):
        by_name = {g.name: g for g in guests}
        ds = pol.decide(host, guests, float(t))
        assert len({d.guest for d in ds}) == len(ds)
        for d in ds:
            g = by_name[d.guest]  # never an unknown guest
            assert g.alive
            size = g.ram_pages - d.balloon_pages
            assert 0 <= d.balloon_pages <= g.ram_pages
            # Proxmox raises a VM under its minimum 100 MiB a cycle (the manager core then
            # holds it to the floor): never lower, and never anywhere else under its floor
            raised = name == "proxmox" and size > g.size_pages
            assert size >= g.floor_pages() or raised
            assert size <= g.ceiling_pages()
            assert d.reason and "\n" not in d.reason
            assert all(isinstance(v, float) for v in d.inputs.values())
            if name == "default" and (g.report is None or g.report_age_s(float(t)) is None):
                # never inflate a guest it cannot see
                assert d.balloon_pages <= max(g.balloon_pages, clamp_balloon(g, 0))


def test_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("senpai")
    with pytest.raises(ConfigError, match="bad parameter value"):
        make_policy("esx", tau="high")
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_params("senpai")


# ---------------------------------------------------------------------- snapshots
@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=40, deadline=None)
@given(rounds=st.lists(worlds(), min_size=2, max_size=6), data=st.data())
def test_snapshot_round_trip_through_json_decides_alike(
    name: str, rounds: list[tuple[HostSample, list[GuestSample]]], data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, len(rounds) - 1))
    pol = make_policy(name)
    for t, (host, guests) in enumerate(rounds[:k]):
        pol.decide(host, guests, float(t))
    text = pol.snapshot(float(k)).model_dump_json()
    back = make_policy(name)
    restore_policy(back, text, float(k))
    assert back.snapshot(float(k)) == pol.snapshot(float(k))
    for t, (host, guests) in enumerate(rounds[k:], start=k):
        assert back.decide(host, guests, float(t)) == pol.decide(host, guests, float(t))


def default_snapshot_json() -> dict[str, Any]:
    p = DefaultPolicy()
    r = PressureReport(
        guest="g", time_s=1.0, total_bytes=1 << 30, free_bytes=1 << 29, available_bytes=1 << 29,
        anon_bytes=0, cache_bytes=0, balloon_bytes=0, swap_in_pages=0, swap_out_pages=0,
        major_faults=0, oom_kills=0, stall_us=0, stall_pct=0.0, balloon_target_pages=0,
        balloon_actual_pages=0, refused_pages=0)
    p.decide(HostSample(1 << 20, 0), [GuestSample("g", 1 << 18, 0, 0, report=r,
                                                  report_time=1.0)], 2.0)
    doc: dict[str, Any] = json.loads(p.snapshot(3.0).model_dump_json())
    return doc


def test_snapshot_json_is_versioned_and_named() -> None:
    doc = default_snapshot_json()
    assert doc["version"] == 1 and doc["policy"] == "default"
    g = doc["guests"]["g"]
    assert g["working_set"] == [[1.0, 1 << 17]] and g["last_report"]["age_s"] == 1.0
    assert g["hurt_age_s"] is None and g["oom_age_s"] is None  # never


def bad(doc: dict[str, Any], path: str, value: object) -> str:
    *keys, last = path.split(".")
    d = doc
    for key in keys:
        d = d[key]
    d[last] = value
    return json.dumps(doc)


@pytest.mark.parametrize(("path", "value", "match"), [
    ("version", 2, "version"),
    ("policy", "mom", "policy"),
    ("guests.g.hurt_size", -1, "hurt_size"),
    ("guests.g.last_balloon", -5, "last_balloon"),
    ("guests.g.working_set", [[1.0, -3]], "working_set"),
    ("guests.g.hurt_age_s", -1.0, "hurt_age_s"),
    ("guests.g.step", 0.5, "step"),
    ("guests.g.quiet_calls", -1, "quiet_calls"),
    ("guests.g.extra", 1, "extra"),
])
def test_malformed_snapshot_is_refused(path: str, value: object, match: str) -> None:
    p = DefaultPolicy()
    with pytest.raises(ConfigError, match=match):
        restore_policy(p, bad(default_snapshot_json(), path, value), 0.0)
    assert p.state == {}  # left as it was


@pytest.mark.parametrize("text", [
    "", "not json", "[]", "{}", '{"version": 1}', '{"policy": "mom"}',
    '{"version": 1, "policy": "default", "guests": {"g": {"step": NaN}}}',
])
def test_unreadable_snapshot_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="bad snapshot"):
        read_snapshot("mom", text)


def test_nan_and_infinite_times_are_refused() -> None:
    for value in ("NaN", "Infinity", "-Infinity"):
        text = bad(default_snapshot_json(), "guests.g.oom_age_s", 0.0).replace(
            '"oom_age_s": 0.0', f'"oom_age_s": {value}')
        assert value in text
        with pytest.raises(ConfigError, match="oom_age_s"):
            read_snapshot("default", text)
    with pytest.raises(ConfigError, match="slow"):
        read_snapshot("esx", '{"version": 1, "policy": "esx", "estimates": {"a": '
                             '{"slow": NaN, "fast": 1, "current": 1, "samples": 1}}}')


def test_foreign_snapshot_is_refused() -> None:
    mom = make_policy("mom").snapshot(0.0)
    for name in POLICIES:
        if name != "mom":
            with pytest.raises(ConfigError, match=f"policy {name!r}: bad snapshot"):
                restore_policy(make_policy(name), mom.model_dump_json(), 0.0)
            with pytest.raises(UsageError, match="cannot restore a MomSnapshot"):
                make_policy(name).restore(mom, 0.0)  # a programming error, not a config one
    with pytest.raises(UsageError, match="unknown policy"):
        read_snapshot("senpai", "{}")
