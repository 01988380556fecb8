"""The peers decide as the real peers do: every recorded case replayed through ``mom``/``proxmox``.

``tests/data/peer-cases/`` holds situations and what the real peers' own code decided in one
step (oVirt MoM over ``doc/balloon.rules`` and over vdsm's policy; Proxmox's ``compute_alg1``
with ``pvestatd``'s goal); its README says what each field means. Each case goes to a fresh
policy (the peers ran fresh: one statistics sample, no history) and every guest's size after
the step must agree with the peer's within one page (MoM's targets are whole KiB, Proxmox's
whole bytes; memballoon's are whole pages).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Policy
from memballoon.policy.mom import MomPolicy
from memballoon.policy.proxmox import PVE_TARGET_PERCENT, ProxmoxPolicy, pve_goal_bytes
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

CASES = Path(__file__).parent / "data" / "peer-cases"
NOW = 100.0


def cases(name: str) -> Iterator[dict[str, Any]]:
    with (CASES / name).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def host(case: dict[str, Any]) -> HostSample:
    total, used = case["host_total_pages"], case["host_used_pages"]
    return HostSample(budget_pages=total, resident_pages=used, total_pages=total,
                      available_pages=total - used)


def guest(g: dict[str, Any]) -> GuestSample:
    ram, size, free = g["ram_pages"], g["size_pages"], g["mem_free_pages"]
    balloon = ram - size
    r = PressureReport(
        guest=g["name"], time_s=NOW, total_bytes=size * PAGE_SIZE,
        free_bytes=free * PAGE_SIZE, available_bytes=free * PAGE_SIZE, anon_bytes=0,
        cache_bytes=0, balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=0, swap_out_pages=0,
        major_faults=0, oom_kills=0, stall_us=0, stall_pct=0.0,
        balloon_target_pages=balloon, balloon_actual_pages=balloon)
    return GuestSample(g["name"], ram, balloon, balloon,
                       GuestSettings(min_pages=g["min_pages"], shares=g["shares"]), r, NOW)


def replay(case: dict[str, Any], policy: Policy) -> dict[str, int]:
    """Each guest's size in bytes after ``policy``'s step over ``case``."""
    guests = [guest(g) for g in case["guests"]]
    sizes = {g.name: g.size_pages for g in guests}
    for d in policy.decide(host(case), guests, NOW):
        g = next(x for x in guests if x.name == d.guest)
        sizes[d.guest] = g.ram_pages - d.balloon_pages
    return {n: s * PAGE_SIZE for n, s in sizes.items()}


PEERS: dict[str, Callable[[], Policy]] = {
    "mom-balloon-rules.jsonl": MomPolicy,
    "mom-vdsm-policy.jsonl": lambda: MomPolicy(rules="vdsm"),
    "proxmox-alg1.jsonl": ProxmoxPolicy,
}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_every_case_agrees_with_the_peer_within_a_page(name: str) -> None:
    n = 0
    worst = 0
    wrong: list[str] = []
    for case in cases(name):
        n += 1
        got = replay(case, PEERS[name]())
        for guest_name, peer in case["peer_size_bytes"].items():
            off = abs(got[guest_name] - peer)
            worst = max(worst, off)
            if off > PAGE_SIZE:
                wrong.append(f"case {case['id']} {guest_name}: peer {peer}, "
                             f"memballoon {got[guest_name]} ({off / PAGE_SIZE:+.1f} pages)")
    assert n == 400
    summary = f"{len(wrong)} guests disagree, worst {worst} bytes"
    assert not wrong, "\n".join([summary, *wrong[:20]])


def test_the_proxmox_goal_is_pvestatds() -> None:
    for case in cases("proxmox-alg1.jsonl"):
        assert pve_goal_bytes(host(case), PVE_TARGET_PERCENT) == case["pve_goal_bytes"], \
            case["id"]
