"""``proxmox``: Proxmox VE's auto-ballooning, as Proxmox decides it.

Source: pve-manager ``PVE/AutoBalloon.pm`` (``compute_alg1``) as ``PVE/Service/pvestatd.pm``
calls it every 10 s. ``tests/data/peer-cases/proxmox-alg1.jsonl`` records what Proxmox's own
code decided; ``tests/test_peer_cases.py`` replays every case here. Proxmox, like MoM, speaks
of each VM's memory (its ``balloon`` is the size the VM keeps, ``maxmem`` its RAM,
``balloon_min`` its configured minimum, ``freemem`` its MemFree); this module does the same,
in bytes as Proxmox counts (so a split rounds where Proxmox's does), and converts to a balloon
of pages at the end.

- goal = ``memtotal`` * ``target_percent`` - ``memused`` (pvestatd: 80% of the host's memory
  used), with ``memused`` = MemTotal - MemAvailable where the world reads the host
  (``HostSample.total_pages``/``available_pages``), else budget * ``target_percent`` -
  resident;
- |goal| <= 10 MiB: nothing to do;
- each VM moves at most ``max_change`` (100 MiB) a cycle from the size it has;
- the goal is split among VMs in proportion to their shares above each VM's minimum
  (``desired = balloon_min + (sum of (size - balloon_min) + rest) * shares / total shares``),
  bounded by [balloon_min, maxmem]; the split repeats while VMs hit a bound and memory is left
  to place;
- growing goes first to VMs under pressure (``freemem`` <= 25% of their minimum, or a size under
  it), shrinking first to VMs with ``freemem`` above 25% of their minimum; only when that moved
  nothing are all VMs considered (hence Proxmox shrinking VMs already under pressure).

A VM under its minimum is never shrunk and is raised at most 100 MiB a cycle, only while the
host goal is to grow: such a decision may leave it under its minimum still (Proxmox has no
floor beyond that; the manager core holds every policy's decisions to the guests' floors).
Proxmox leaves out a VM with no ``balloon`` minimum configured; so does this, for a guest whose
``min_pages`` is 0. A guest's ``max_pages`` stands for ``maxmem``; one set below the guest's
size (no Proxmox VM is ever above its maxmem) is met in the step that moves the guest.

Deliberate differences, each off by default (the peer as Proxmox runs it, as ``bench policy``
compares it):

- ``include_no_minimum``: a guest with no minimum takes part with a minimum of 0 (memballoon
  guests have none unless configured; Proxmox would leave them all alone);
- ``clamp_to_floor``: a decision that would leave a guest under its minimum raises it to the
  minimum at once (memballoon's floor, as the manager core applies it to every policy).

Proxmox skips VMs whose balloon driver does not answer; here, a guest with no fresh report.
Like ``AutoBalloon.pm`` it keeps nothing between calls: its snapshot is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.base import Decision, PolicySnapshot, own_snapshot
from memballoon.policy.observe import free_pages, fresh_report
from memballoon.policy.sample import GuestSample, HostSample

# PVE/Service/pvestatd.pm, PVE/AutoBalloon.pm
PVE_TARGET_PERCENT: Final = 0.80  # host memory in use that pvestatd aims at (its default)
PVE_MIN_GOAL_PAGES: Final = mib_to_pages(10)  # |goal| at most 10 MiB: do nothing
PVE_MAX_CHANGE_PAGES: Final = mib_to_pages(100)  # per VM per cycle
PVE_PRESSURE_FREE_FRACTION: Final = 0.25  # freemem <= 25% of the VM's minimum: under pressure
PVE_DEFAULT_SHARES: Final = 1000
PVE_MAX_REPORT_AGE_S: Final = 20.0  # two pvestatd cycles


class ProxmoxCounter(CounterName):
    """What the proxmox policy counts (besides the report inconsistencies of ``observe``)."""

    NO_REPORT = "proxmox_no_report"  # guests left out of a call: no fresh report
    NO_MINIMUM = "proxmox_no_minimum"  # guests left out of a call: no minimum configured


class ProxmoxSnapshot(PolicySnapshot):
    """``ProxmoxPolicy`` keeps no state: its snapshot only names it."""

    policy: Literal["proxmox"] = "proxmox"


@dataclass(frozen=True, slots=True)
class _Vm:
    """One VM as ``compute_alg1`` sees it, in bytes."""

    name: str
    balloon: int  # the memory it keeps now
    balloon_min: int
    maxmem: int
    shares: int


def pve_goal_bytes(host: HostSample, target_percent: float) -> int:
    """The change pvestatd asks of the guests: positive to grow them, negative to shrink."""
    if host.total_pages and host.available_pages is not None:  # 0: not read
        memtotal = host.total_pages * PAGE_SIZE
        memused = (host.total_pages - host.available_pages) * PAGE_SIZE
    else:  # a world that does not read the host: the guests' budget stands for it
        memtotal = host.budget_pages * PAGE_SIZE
        memused = host.resident_pages * PAGE_SIZE
    # pvestatd: int(memtotal * target / 100 - memused), target a whole percent
    return int(memtotal * (target_percent * 100) / 100 - memused)


class ProxmoxPolicy:
    """Proxmox VE's AutoBalloon (see the module docstring)."""

    def __init__(
        self,
        *,
        target_percent: float = PVE_TARGET_PERCENT,
        min_goal_pages: int = PVE_MIN_GOAL_PAGES,
        max_change_pages: int = PVE_MAX_CHANGE_PAGES,
        max_report_age_s: float = PVE_MAX_REPORT_AGE_S,
        include_no_minimum: bool = False,
        clamp_to_floor: bool = False,
    ) -> None:
        if not 0.0 < target_percent <= 1.0:
            raise ConfigError("proxmox: target_percent must be within (0, 1]")
        if min_goal_pages < 0 or max_change_pages <= 0:
            raise ConfigError("proxmox: min_goal_pages >= 0 and max_change_pages > 0")
        self.target_percent = target_percent
        self.min_goal_pages = min_goal_pages
        self.max_change_pages = max_change_pages
        self.max_report_age_s = max_report_age_s
        self.include_no_minimum = include_no_minimum
        self.clamp_to_floor = clamp_to_floor
        self.counters = Counters()

    @property
    def name(self) -> str:
        return "proxmox"

    def snapshot(self, now: float) -> ProxmoxSnapshot:
        return ProxmoxSnapshot()

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        own_snapshot(snap, ProxmoxSnapshot, self.name)

    def _change(self, vms: list[_Vm], res: dict[str, int], amount: int) -> int:
        """Move ``amount`` bytes (positive: grow) across ``vms`` by shares, recording new sizes
        in ``res``; returns what is left to move."""
        maxchange = self.max_change_pages * PAGE_SIZE
        rest = amount
        done: set[str] = set()
        repeat = progress = True
        while rest and repeat and progress:
            repeat = progress = False
            active = [v for v in vms if v.name not in done]
            shares_total = sum(v.shares for v in active)
            alloc_new = sum(res.get(v.name, v.balloon) - v.balloon_min for v in active) + rest
            changes = 0
            for v in active:
                desired = v.balloon_min + int(alloc_new / shares_total * v.shares)
                if desired > v.maxmem:
                    desired, repeat = v.maxmem, True
                elif desired < v.balloon_min:
                    desired, repeat = v.balloon_min, True
                # the step is from the size the VM has, whatever an earlier pass asked
                if amount > 0 and desired > v.balloon:
                    new = min(v.balloon + maxchange, desired)
                elif desired < v.balloon:
                    new = max(v.balloon - maxchange, desired)
                else:
                    done.add(v.name)
                    continue
                if new != v.balloon:
                    old = res.get(v.name, v.balloon)
                    res[v.name] = new
                    if new != old:
                        changes += new - old
                        progress = repeat = True
            rest -= changes
        return rest

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        goal = pve_goal_bytes(host, self.target_percent)
        vms: list[_Vm] = []
        pressured: list[_Vm] = []  # compute_alg1's idlist1
        roomy: list[_Vm] = []  # its idlist2
        freemem: dict[str, int] = {}
        for g in guests:
            r = fresh_report(g, self.max_report_age_s, now)
            if r is None:
                self.counters.inc(ProxmoxCounter.NO_REPORT)
                continue
            if g.settings.min_pages == 0 and not self.include_no_minimum:
                self.counters.inc(ProxmoxCounter.NO_MINIMUM)
                continue
            v = _Vm(g.name, g.size_pages * PAGE_SIZE, g.settings.min_pages * PAGE_SIZE,
                    g.ceiling_pages() * PAGE_SIZE, g.settings.shares)
            vms.append(v)
            free = freemem[g.name] = free_pages(g, r, self.counters) * PAGE_SIZE
            if free and free > v.balloon_min * PVE_PRESSURE_FREE_FRACTION \
                    and v.balloon >= v.balloon_min:
                roomy.append(v)
            else:
                pressured.append(v)
        res: dict[str, int] = {}
        min_goal = self.min_goal_pages * PAGE_SIZE
        if goal > min_goal:
            rest = self._change(pressured, res, goal)
            if rest >= goal:  # no progress: consider every VM
                self._change(vms, res, rest)
            rule = "grow"
        elif goal < -min_goal:
            rest = self._change(roomy, res, goal)
            if rest <= goal:
                self._change(vms, res, rest)
            rule = "shrink"
        else:
            return []
        by_name = {g.name: g for g in guests}
        out: list[Decision] = []
        for v in vms:
            new = res.get(v.name)
            if new is None:
                continue
            g = by_name[v.name]
            size = min(new // PAGE_SIZE, g.ceiling_pages())  # whole pages, at most the target
            if self.clamp_to_floor:
                size = max(size, g.floor_pages())
            balloon = g.ram_pages - size
            if balloon == g.target_pages or balloon == g.balloon_pages:
                continue
            out.append(Decision(
                g.name, balloon,
                f"proxmox: {rule} to host goal {goal // PAGE_SIZE:+d} pages: size "
                f"{g.size_pages} -> {g.ram_pages - balloon}",
                {"goal_pages": goal / PAGE_SIZE, "size_pages": float(g.size_pages),
                 "min_pages": float(g.settings.min_pages),
                 "free_pages": freemem[v.name] / PAGE_SIZE, "shares": float(v.shares)}))
        return out
