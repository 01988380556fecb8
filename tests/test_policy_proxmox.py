"""ProxmoxPolicy: PVE AutoBalloon's goal, 10 MiB dead band, 100 MiB steps, shares, priorities.

Every recorded decision of the real compute_alg1 is replayed in test_peer_cases.py.
"""

from __future__ import annotations

import pytest

from memballoon.model.errors import ConfigError
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.proxmox import (
    PVE_DEFAULT_SHARES,
    PVE_MAX_CHANGE_PAGES,
    PVE_MIN_GOAL_PAGES,
    PVE_PRESSURE_FREE_FRACTION,
    PVE_TARGET_PERCENT,
    ProxmoxPolicy,
    ProxmoxSnapshot,
    pve_goal_bytes,
)
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

RAM = mib_to_pages(2048)
MIN = mib_to_pages(512)


def vm(name: str, size: int, free: int, *, shares: int = 1000, report: bool = True,
       min_pages: int = MIN) -> GuestSample:
    balloon = RAM - size
    r = PressureReport(
        guest=name, time_s=0.0, total_bytes=RAM * PAGE_SIZE, free_bytes=free * PAGE_SIZE,
        available_bytes=free * PAGE_SIZE, anon_bytes=0, cache_bytes=0,
        balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=0, swap_out_pages=0, major_faults=0,
        oom_kills=0, stall_us=0, stall_pct=0.0, balloon_target_pages=balloon,
        balloon_actual_pages=balloon)
    return GuestSample(name, RAM, balloon, balloon,
                       GuestSettings(min_pages=min_pages, shares=shares),
                       r if report else None, 0.0 if report else None)


def host_with_goal(goal_pages: int) -> HostSample:
    budget = 1_000_000
    return HostSample(budget, int(budget * PVE_TARGET_PERCENT) - goal_pages)


def sizes(ds: list, guests: list[GuestSample]) -> dict[str, int]:
    return {d.guest: RAM - d.balloon_pages for d in ds}


def test_constants_are_pves() -> None:
    assert PVE_TARGET_PERCENT == 0.80
    assert mib_to_pages(10) == PVE_MIN_GOAL_PAGES
    assert mib_to_pages(100) == PVE_MAX_CHANGE_PAGES
    assert PVE_PRESSURE_FREE_FRACTION == 0.25
    assert PVE_DEFAULT_SHARES == 1000


def test_small_goal_does_nothing() -> None:
    g = [vm("a", RAM, RAM // 2)]
    assert ProxmoxPolicy().decide(host_with_goal(mib_to_pages(10)), g, 0.0) == []
    assert ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(10)), g, 0.0) == []


def test_shrink_moves_at_most_100_mib_per_vm() -> None:
    g = [vm("a", RAM, RAM // 2), vm("b", RAM, RAM // 2)]
    ds = ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(1000)), g, 0.0)
    assert sizes(ds, g) == {"a": RAM - PVE_MAX_CHANGE_PAGES, "b": RAM - PVE_MAX_CHANGE_PAGES}


def test_shrink_splits_by_shares_above_minimum() -> None:
    # shares set each VM's part of the whole allocation above its minimum, not of the change:
    # with 2000:1000 shares and 3012 MiB to place above two 512 MiB minimums, a's part (2008)
    # would pass its max and b's is 1004: b alone shrinks (a first pass takes its 100 MiB
    # step, the second pass, a being done, hands back the 40 MiB overshoot)
    g = [vm("a", RAM, RAM // 2, shares=2000), vm("b", RAM, RAM // 2, shares=1000)]
    ds = ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(60)), g, 0.0)
    assert sizes(ds, g) == {"b": RAM - mib_to_pages(60)}
    # equal shares, one VM lower: the one above its share shrinks first
    g = [vm("a", RAM, RAM // 2), vm("b", RAM - mib_to_pages(400), RAM // 2)]
    ds = ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(60)), g, 0.0)
    assert sizes(ds, g) == {"a": RAM - mib_to_pages(60)}


def test_shrink_favours_vms_with_free_memory() -> None:
    # b has free <= 25% of its minimum: only a shrinks
    g = [vm("a", RAM, RAM // 2), vm("b", RAM, MIN // 8)]
    ds = ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(50)), g, 0.0)
    assert set(sizes(ds, g)) == {"a"}


def test_shrink_falls_back_to_every_vm() -> None:
    # nobody has free memory: Proxmox then shrinks the pressured VMs all the same
    g = [vm("a", RAM, 0), vm("b", RAM, 0)]
    ds = ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(50)), g, 0.0)
    assert set(sizes(ds, g)) == {"a", "b"}


def test_grow_favours_vms_under_pressure() -> None:
    half = RAM // 2
    g = [vm("a", half, half // 2), vm("b", half, 0)]  # b: free 0 <= 25% of its minimum
    ds = ProxmoxPolicy().decide(host_with_goal(mib_to_pages(50)), g, 0.0)
    got = sizes(ds, g)
    assert set(got) == {"b"} and got["b"] > half


def test_never_below_minimum_nor_above_max_and_skips_vms_without_a_report() -> None:
    p = ProxmoxPolicy()
    g = [vm("a", MIN + 10, MIN), vm("b", RAM, RAM // 2, report=False)]
    ds = p.decide(host_with_goal(-mib_to_pages(500)), g, 0.0)
    assert sizes(ds, g) == {"a": MIN}
    assert p.counters["proxmox_no_report"] == 1
    ds = ProxmoxPolicy().decide(host_with_goal(mib_to_pages(500)), [vm("c", RAM, 0)], 0.0)
    assert ds == []


def test_a_vm_under_its_minimum_climbs_100_mib_a_cycle_only_when_the_host_has_room() -> None:
    low = MIN - mib_to_pages(300)
    g = [vm("a", low, 0)]
    [d] = ProxmoxPolicy().decide(host_with_goal(mib_to_pages(500)), g, 0.0)
    assert sizes([d], g) == {"a": low + PVE_MAX_CHANGE_PAGES}  # no jump to the floor
    # a shrinking host leaves it where it is: never shrunk, never raised
    assert ProxmoxPolicy().decide(host_with_goal(-mib_to_pages(500)), g, 0.0) == []
    # memballoon's floor, asked for: the step that moves it takes it to its minimum
    [d] = ProxmoxPolicy(clamp_to_floor=True).decide(host_with_goal(mib_to_pages(500)), g, 0.0)
    assert sizes([d], g) == {"a": MIN}


def test_a_max_set_below_the_size_is_met_when_the_guest_moves() -> None:
    # no Proxmox VM is above its maxmem; a memballoon guest whose max_pages was lowered is
    # taken to it in the step that moves it, not 100 MiB at a time
    lowered = GuestSample("a", RAM, 0, 0, GuestSettings(min_pages=MIN, max_pages=MIN * 2),
                          vm("a", RAM, RAM // 2).report, 0.0)
    [d] = ProxmoxPolicy().decide(host_with_goal(mib_to_pages(500)), [lowered], 0.0)
    assert RAM - d.balloon_pages == MIN * 2


def test_vms_without_a_minimum_are_left_out_unless_asked() -> None:
    g = [vm("a", RAM, RAM // 2, min_pages=0)]
    p = ProxmoxPolicy()
    assert p.decide(host_with_goal(-mib_to_pages(500)), g, 0.0) == []
    assert p.counters["proxmox_no_minimum"] == 1
    ds = ProxmoxPolicy(include_no_minimum=True).decide(
        host_with_goal(-mib_to_pages(500)), g, 0.0)
    assert sizes(ds, g) == {"a": RAM - PVE_MAX_CHANGE_PAGES}


def test_the_goal_reads_the_hosts_own_memory_when_it_has_it() -> None:
    # 80% of MemTotal minus (MemTotal - MemAvailable), in bytes as pvestatd computes it
    h = HostSample(1_000_000, 0, total_pages=1_000_000, available_pages=100_000)
    assert pve_goal_bytes(h, PVE_TARGET_PERCENT) == -100_000 * PAGE_SIZE
    g = [vm("a", RAM, RAM // 2)]
    [d] = ProxmoxPolicy().decide(h, g, 0.0)  # the budget says grow, the host says shrink
    assert sizes([d], g) == {"a": RAM - PVE_MAX_CHANGE_PAGES}
    assert d.inputs["goal_pages"] == -100_000
    # without host figures the budget stands for the host
    assert pve_goal_bytes(host_with_goal(5000), PVE_TARGET_PERCENT) == 5000 * PAGE_SIZE


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        ProxmoxPolicy(target_percent=0)
    with pytest.raises(ValueError):
        ProxmoxPolicy(max_change_pages=0)


def test_bad_parameters_are_config_errors_and_the_snapshot_is_empty() -> None:
    with pytest.raises(ConfigError, match="target_percent"):
        ProxmoxPolicy(target_percent=0.0)
    p = ProxmoxPolicy()
    snap = p.snapshot(5.0)
    assert snap.model_dump() == {"version": 1, "policy": "proxmox"}
    p.restore(ProxmoxSnapshot.model_validate_json(snap.model_dump_json()), 0.0)
    # nothing carried: a restored policy decides as a fresh one
    g = [vm("a", RAM, RAM // 2), vm("b", RAM, MIN // 8)]
    h = host_with_goal(-mib_to_pages(150))
    assert p.decide(h, g, 1.0) == ProxmoxPolicy().decide(h, g, 1.0)
