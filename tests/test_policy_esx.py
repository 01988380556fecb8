"""EsxPolicy: shares per page with the idle memory tax, min-funding revocation, sampling."""

from __future__ import annotations

import pytest

from memballoon.model.errors import ConfigError, UsageError
from memballoon.policy.esx import (
    ESX_FAST_GAIN,
    ESX_FREE_HARD,
    ESX_FREE_HIGH,
    ESX_FREE_LOW,
    ESX_FREE_SOFT,
    ESX_IDLE_TAX,
    ESX_SLOW_GAIN,
    MEM_CTL_MAX_PERCENT,
    ActiveEstimate,
    EsxPolicy,
    EsxSnapshot,
    idle_cost,
    shares_per_page,
)
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample

RAM = 100_000


def vm(name: str, touched: int, *, balloon: int = 0, shares: int = 1000, sampled: int = 100,
       min_pages: int = 0) -> GuestSample:
    return GuestSample(name, RAM, balloon, balloon, GuestSettings(min_pages=min_pages,
                       shares=shares), active_sampled=sampled, active_touched=touched)


def test_constants() -> None:
    assert ESX_IDLE_TAX == 0.75
    assert MEM_CTL_MAX_PERCENT == 65
    assert (ESX_FREE_HIGH, ESX_FREE_SOFT, ESX_FREE_HARD, ESX_FREE_LOW) == (0.06, 0.04, 0.02, 0.01)
    assert (ESX_SLOW_GAIN, ESX_FAST_GAIN) == (1 / 16, 0.5)
    assert idle_cost(0.75) == 4.0
    assert idle_cost(0.0) == 1.0
    with pytest.raises(ValueError):
        idle_cost(1.0)


def test_papers_worked_case() -> None:
    s, p = 1000.0, 5000.0
    rho_a = shares_per_page(s, p, 0.1, 0.75)
    rho_b = shares_per_page(s, p, 0.9, 0.75)
    assert rho_a == pytest.approx(s / (3.7 * p))
    assert rho_b == pytest.approx(s / (1.3 * p))
    assert rho_a < rho_b  # reclaim from A
    assert shares_per_page(s, p, 0.1, 0.0) == pytest.approx(s / p)  # tau 0: pure shares


def test_min_funding_revocation_takes_from_the_idle_vm() -> None:
    host = HostSample(budget_pages=200_000, resident_pages=198_000)  # 1% free: under soft
    ds = EsxPolicy().decide(host, [vm("A", 10), vm("B", 90)], 0.0)
    got = {d.guest: d.balloon_pages for d in ds}
    # need = 6% of 200000 - 2000 = 10000 pages, all from A (its rho stays lowest)
    assert got == {"A": 10_000}
    assert ds[0].inputs["active_fraction"] == pytest.approx(0.1)


def test_revocation_equalises_rho_when_the_need_is_large() -> None:
    host = HostSample(budget_pages=200_000, resident_pages=200_000 + 60_000)
    ds = EsxPolicy().decide(host, [vm("A", 10), vm("B", 90)], 0.0)
    got = {d.guest: d.balloon_pages for d in ds}
    assert got["A"] > got.get("B", 0) > 0
    pa, pb = RAM - got["A"], RAM - got["B"]
    ra = shares_per_page(1000, pa, 0.1, 0.75)
    rb = shares_per_page(1000, pb, 0.9, 0.75)
    assert ra == pytest.approx(rb, rel=0.1)


def test_ctl_max_percent_caps_the_balloon() -> None:
    host = HostSample(budget_pages=200_000, resident_pages=400_000)
    ds = EsxPolicy().decide(host, [vm("A", 0), vm("B", 0)], 0.0)
    assert all(d.balloon_pages <= RAM * MEM_CTL_MAX_PERCENT // 100 for d in ds)
    assert {d.balloon_pages for d in ds} == {RAM * MEM_CTL_MAX_PERCENT // 100}


def test_states_are_the_hysteresis_and_surplus_goes_back() -> None:
    between = HostSample(budget_pages=200_000, resident_pages=200_000 - 10_000)  # 5% free
    assert EsxPolicy().decide(between, [vm("A", 10, balloon=20_000)], 0.0) == []
    roomy = HostSample(budget_pages=200_000, resident_pages=100_000)
    gs = [vm("A", 10, balloon=20_000), vm("B", 90, balloon=20_000)]
    ds = EsxPolicy().decide(roomy, gs, 0.0)
    assert {d.guest: d.balloon_pages for d in ds} == {"A": 0, "B": 0}


def test_give_back_goes_to_the_highest_rho_first() -> None:
    # 2000 pages of surplus: B (active) gets them
    host = HostSample(budget_pages=100_000, resident_pages=100_000 - 6000 - 2000)
    gs = [vm("A", 10, balloon=20_000), vm("B", 90, balloon=20_000)]
    ds = EsxPolicy().decide(host, gs, 0.0)
    assert {d.guest: d.balloon_pages for d in ds} == {"B": 18_000}


def test_active_estimate_rises_fast_and_decays_slowly() -> None:
    est = ActiveEstimate()
    assert est.update(0.1) == pytest.approx(0.1)
    assert est.update(0.9) == pytest.approx(0.9)  # rises at once
    after = [est.update(0.1) for _ in range(8)]
    assert after[0] == pytest.approx(0.1 + ESX_SLOW_GAIN * 0.8, abs=0.31)
    assert all(a > 0.1 for a in after)  # still remembered
    assert after == sorted(after, reverse=True)  # decays monotonically
    assert after[-1] == pytest.approx(0.1 + 0.8 * ESX_SLOW_GAIN * (1 - ESX_SLOW_GAIN) ** 8)


def test_unsampled_vm_counts_as_active_and_bad_samples_are_counted() -> None:
    p = EsxPolicy()
    assert p.active_fraction(vm("A", 0, sampled=0)) == 1.0
    assert p.active_fraction(vm("B", 150)) == 1.0
    assert p.counters["esx_bad_sample"] == 1


def test_floor_is_respected_and_dead_vms_skipped() -> None:
    host = HostSample(budget_pages=200_000, resident_pages=260_000)
    gs = [vm("A", 0, min_pages=90_000), GuestSample("D", RAM, 0, 0, alive=False)]
    ds = EsxPolicy().decide(host, gs, 0.0)
    assert [(d.guest, d.balloon_pages) for d in ds] == [("A", 10_000)]


def test_bad_parameters_are_config_errors_and_a_bad_tau_in_code_a_usage_error() -> None:
    with pytest.raises(ConfigError, match=r"tau must be within \[0, 1\), got 1.5"):
        EsxPolicy(tau=1.5)
    with pytest.raises(ConfigError, match="ctl_max_percent"):
        EsxPolicy(ctl_max_percent=101)
    with pytest.raises(UsageError, match="tau"):
        idle_cost(-0.1)


def test_snapshot_keeps_the_active_estimates() -> None:
    p = EsxPolicy()
    host = HostSample(budget_pages=200_000, resident_pages=199_000)  # below soft: reclaim
    for touched in (90, 10, 10, 10):
        p.decide(host, [vm("A", touched), vm("B", 50)], 0.0)
    snap = p.snapshot(0.0)
    assert snap.estimates["A"].samples == 4 and snap.estimates["A"].current == 0.1
    q = EsxPolicy()
    q.restore(EsxSnapshot.model_validate_json(snap.model_dump_json()), 1e6)
    assert q.estimates == p.estimates
    # A's past activity still shields it: a fresh policy would take from A at once
    [fresh] = EsxPolicy().decide(host, [vm("A", 5), vm("B", 50, sampled=0)], 1.0)
    assert fresh.guest == "A"
    for touched in (5, 80, 0):
        gs = [vm("A", touched), vm("B", 50, sampled=0)]
        ds = p.decide(host, gs, 1.0)
        assert q.decide(host, gs, 1.0) == ds and [d.guest for d in ds] == ["B"]
