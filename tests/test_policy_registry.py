"""The registry, and properties every policy holds: floors, ceilings, known guests only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import clamp_balloon
from memballoon.policy.default import DefaultPolicy
from memballoon.policy.registry import POLICIES, make_policy, policy_params
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
            assert size >= g.floor_pages()
            assert size <= g.ceiling_pages()
            assert d.reason and "\n" not in d.reason
            assert all(isinstance(v, float) for v in d.inputs.values())
            if name == "default" and (g.report is None or g.report_age_s(float(t)) is None):
                # never inflate a guest it cannot see
                assert d.balloon_pages <= max(g.balloon_pages, clamp_balloon(g, 0))
