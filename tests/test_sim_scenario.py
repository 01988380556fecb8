"""Scenario -> world: the same pairs, backend, core and engine every world runs, wired as the
scenario says (budget, host, policy, settings, driver periods)."""

from __future__ import annotations

import pytest

from memballoon.guest.workload import Idle, Steady
from memballoon.model.errors import UsageError
from memballoon.model.units import GIB, PAGE_SIZE, mib_to_pages
from memballoon.policy.sample import GuestSettings
from memballoon.sim.scenario import GuestSpec, HostUse, Scenario, build, runs_of

RAM = mib_to_pages(128)


def two(**kw: object) -> Scenario:
    guests = (GuestSpec("a", RAM, "virtio", Idle(anon_mib=8, file_mib=4),
                        GuestSettings(min_pages=RAM // 8)),
              GuestSpec("b", RAM, "vmw", Steady(anon_mib=32, file_mib=8)))
    base: dict[str, object] = {"name": "t", "seconds": 30.0, "guests": guests,
                               "host_bytes": 256 * 2**20, "budget_pages": RAM}
    base.update(kw)
    return Scenario(**base)  # type: ignore[arg-type]


def test_build_wires_the_scenario_into_one_engine() -> None:
    w = build(two(driver_period_s=1.0, report_every_s=2.0))
    assert set(w.backend.pairs) == {"a", "b"}
    assert all(p.period_s == 1.0 for p in w.backend.pairs.values())
    assert w.engine.core.budget_pages == RAM and w.engine.core.policy is w.policy
    assert w.engine.core.settings["a"].min_pages == RAM // 8
    assert w.engine.host_probe is not None and w.backend.report_every_s == 2.0
    assert w.backend.rng is None  # only ESX samples active pages
    assert build(two(policy="esx")).backend.rng is not None
    w.backend.advance(1.0)
    assert w.engine.step() is not None and w.engine.guests["a"].settings.min_pages == RAM // 8


def test_native_driver_periods_and_auto_budgets() -> None:
    w = build(two(budget_pages=None, reserve_pages=10))
    periods = {n: p.period_s for n, p in w.backend.pairs.items()}
    assert periods == {"a": 0.2, "b": 1.0}  # virtio's 200 ms retry, the seed's 1 s
    w.backend.advance(1.0)
    w.engine.step()
    host = w.engine.core.last_host
    assert host is not None and host.available_pages is not None
    assert host.budget_pages == host.resident_pages + host.available_pages - 10


def test_a_sweep_point_is_the_host_and_budget_at_a_share_of_the_guests_ram() -> None:
    sc = two(sweep_shares=(1.0, 0.5), reserve_pages=4)
    half = sc.with_host_share(0.5)
    assert half.host_bytes == RAM * PAGE_SIZE and half.budget_pages == RAM - 4
    assert half.sweep_shares == ()
    auto = two(budget_pages=None).with_host_share(0.75)
    assert auto.budget_pages is None and auto.host_bytes == int(1.5 * RAM) * PAGE_SIZE


def test_variants_make_one_run_each_with_their_params() -> None:
    sc = two(policy="esx", policy_params={"soft": 0.03}, variants=({"tau": 0.0}, {"tau": 0.5}))
    runs = runs_of(sc)
    assert [dict(r.policy_params) for r in runs] == [{"soft": 0.03, "tau": 0.0},
                                                      {"soft": 0.03, "tau": 0.5}]
    assert runs_of(two()) == [two()]


def test_host_use_adds_up_overlapping_spans() -> None:
    use = HostUse(((0.0, 10.0, GIB), (5.0, 20.0, 2 * GIB)))
    assert (use(1.0), use(7.0), use(15.0), use(25.0)) == (GIB, 3 * GIB, 2 * GIB, 0)


@pytest.mark.parametrize("change, needle", [
    ({"guests": ()}, "no guests"),
    ({"budget_pages": None, "host_bytes": None}, "auto budget needs"),
    ({"check": "often"}, "check must be"),
    ({"seconds": 0.0}, "times must be positive"),
])
def test_bad_scenarios_are_usage_errors(change: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        two(**change)
    with pytest.raises(UsageError, match="unknown protocol"):
        GuestSpec("x", RAM, "xen", Idle())
    g = GuestSpec("x", RAM, "vmw", Idle())
    with pytest.raises(UsageError, match="repeat"):
        two(guests=(g, g))
