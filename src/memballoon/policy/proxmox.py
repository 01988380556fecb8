"""``proxmox``: Proxmox VE's auto-ballooning.

Source: pve-manager ``PVE/AutoBalloon.pm`` (``compute_alg1``) as called from
``PVE/Service/pvestatd.pm`` every 10 s. Proxmox, like MoM, speaks of each VM's memory (its
"balloon" is the size the VM keeps); this module does the same and converts at the end.

- goal = budget * ``target_percent`` - resident (pvestatd: host total * 80% - host used);
- |goal| <= 10 MiB: nothing to do;
- each VM moves at most ``max_change`` (100 MiB) a cycle;
- the goal is split among VMs in proportion to their shares above each VM's minimum
  (``desired = min + (sum of (size - min) + rest) * shares / total shares``), clamped to
  [min, max]; the split repeats while VMs hit a bound and memory is left to place;
- growing goes first to VMs under pressure (MemFree <= 25% of their minimum, or below their
  minimum), shrinking first to VMs with MemFree above 25% of their minimum; only when that
  moved nothing are all VMs considered (hence Proxmox shrinking VMs already under pressure).

Proxmox skips VMs whose balloon driver does not answer (here: no fresh report) and, when no
``balloon`` minimum is configured, leaves the VM out; here ``min_pages`` is always a floor, so
0 is a real minimum of 0 and such guests take part.

Like ``AutoBalloon.pm`` it keeps nothing between calls: its snapshot is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import mib_to_pages
from memballoon.policy.base import Decision, PolicySnapshot, clamp_balloon, own_snapshot
from memballoon.policy.observe import free_pages, fresh_report
from memballoon.policy.sample import GuestSample, HostSample

# PVE/Service/pvestatd.pm, PVE/AutoBalloon.pm
PVE_TARGET_PERCENT: Final = 0.80  # host memory the guests may use (pvestatd default)
PVE_MIN_GOAL_PAGES: Final = mib_to_pages(10)  # |goal| at most 10 MiB: do nothing
PVE_MAX_CHANGE_PAGES: Final = mib_to_pages(100)  # per VM per cycle
PVE_PRESSURE_FREE_FRACTION: Final = 0.25  # free <= 25% of the VM's minimum: under pressure
PVE_DEFAULT_SHARES: Final = 1000
PVE_MAX_REPORT_AGE_S: Final = 20.0  # two pvestatd cycles


class ProxmoxCounter(CounterName):
    """What the proxmox policy counts (besides the report inconsistencies of ``observe``)."""

    NO_REPORT = "proxmox_no_report"  # guests left out of a call: no fresh report


class ProxmoxSnapshot(PolicySnapshot):
    """``ProxmoxPolicy`` keeps no state: its snapshot only names it."""

    policy: Literal["proxmox"] = "proxmox"


@dataclass(slots=True)
class _Vm:
    name: str
    size: int  # memory the VM keeps now (Proxmox "balloon")
    lo: int  # its minimum (Proxmox "balloon_min")
    hi: int  # its maximum (Proxmox "maxmem")
    shares: int


class ProxmoxPolicy:
    """Proxmox VE's AutoBalloon (see the module docstring)."""

    def __init__(
        self,
        *,
        target_percent: float = PVE_TARGET_PERCENT,
        min_goal_pages: int = PVE_MIN_GOAL_PAGES,
        max_change_pages: int = PVE_MAX_CHANGE_PAGES,
        max_report_age_s: float = PVE_MAX_REPORT_AGE_S,
    ) -> None:
        if not 0.0 < target_percent <= 1.0:
            raise ConfigError("proxmox: target_percent must be within (0, 1]")
        if min_goal_pages < 0 or max_change_pages <= 0:
            raise ConfigError("proxmox: min_goal_pages >= 0 and max_change_pages > 0")
        self.target_percent = target_percent
        self.min_goal_pages = min_goal_pages
        self.max_change_pages = max_change_pages
        self.max_report_age_s = max_report_age_s
        self.counters = Counters()

    @property
    def name(self) -> str:
        return "proxmox"

    def snapshot(self, now: float) -> ProxmoxSnapshot:
        return ProxmoxSnapshot()

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        own_snapshot(snap, ProxmoxSnapshot, self.name)

    def _spread(self, vms: list[_Vm], res: dict[str, int], amount: int) -> int:
        """Move ``amount`` pages (positive: grow) across ``vms`` by shares; returns the rest."""
        rest = amount
        done: set[str] = set()
        repeat = progress = True
        while rest and repeat and progress:
            repeat = progress = False
            active = [v for v in vms if v.name not in done]
            if not active:
                break
            shares_total = sum(v.shares for v in active)
            alloc_new = sum(res.get(v.name, v.size) - v.lo for v in active) + rest
            changes = 0
            for v in active:
                desired = v.lo + int(alloc_new / shares_total * v.shares)
                if desired > v.hi or desired < v.lo:
                    desired = min(v.hi, max(v.lo, desired))
                    repeat = True
                if amount > 0 and desired > v.size:
                    new = min(v.size + self.max_change_pages, desired)
                elif desired < v.size:
                    new = max(v.size - self.max_change_pages, desired)
                else:
                    done.add(v.name)
                    continue
                if new != v.size:
                    old = res.get(v.name, v.size)
                    res[v.name] = new
                    if new != old:
                        changes += new - old
                        progress = repeat = True
            rest -= changes
        return rest

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        goal = int(host.budget_pages * self.target_percent) - host.resident_pages
        vms: list[_Vm] = []
        pressured: list[_Vm] = []
        roomy: list[_Vm] = []
        free_of: dict[str, int] = {}
        for g in guests:
            r = fresh_report(g, self.max_report_age_s, now)
            if r is None:
                self.counters.inc(ProxmoxCounter.NO_REPORT)
                continue
            lo, hi = g.floor_pages(), g.ceiling_pages()
            v = _Vm(g.name, g.size_pages, lo, hi, g.settings.shares or PVE_DEFAULT_SHARES)
            vms.append(v)
            free = free_pages(g, r, self.counters)
            free_of[g.name] = free
            if free > lo * PVE_PRESSURE_FREE_FRACTION and v.size >= lo:
                roomy.append(v)
            else:
                pressured.append(v)
        res: dict[str, int] = {}
        if goal > self.min_goal_pages:
            rest = self._spread(pressured, res, goal)
            if rest >= goal:  # no progress: consider every VM
                self._spread(vms, res, rest)
            rule = "grow"
        elif goal < -self.min_goal_pages:
            rest = self._spread(roomy, res, goal)
            if rest <= goal:
                self._spread(vms, res, rest)
            rule = "shrink"
        else:
            return []
        by_name = {g.name: g for g in guests}
        out: list[Decision] = []
        for v in vms:
            new = res.get(v.name)
            if new is None or new == v.size:
                continue
            g = by_name[v.name]
            balloon = clamp_balloon(g, g.ram_pages - new)
            if balloon == g.target_pages:
                continue
            out.append(Decision(
                g.name, balloon,
                f"proxmox: {rule} to host goal {goal:+d} pages: size {v.size} -> "
                f"{g.ram_pages - balloon}",
                {"goal_pages": float(goal), "size_pages": float(v.size),
                 "min_pages": float(v.lo), "free_pages": float(free_of[v.name]),
                 "shares": float(v.shares)}))
        return out
