"""``esx``: VMware ESX's shares with an idle memory tax and min-funding revocation.

Source: C. Waldspurger, "Memory Resource Management in VMware ESX Server", OSDI 2002, sections
5 (shares vs working sets) and 6 (allocation policies); vSphere's ``Mem.IdleTax`` (75) and
``Mem.CtlMaxPercent`` (65).

Shares per page with the idle memory tax (section 5.2)::

    rho = S / (P * (f + k * (1 - f))),  k = 1 / (1 - tau)

S shares, P pages the VM holds, f its active fraction, tau the tax rate (0 <= tau < 1; 0.75:
an idle page costs 4 active ones). Memory is revoked from the VM with the lowest rho first
(min-funding revocation): with equal S and P, f_A = 0.1 and f_B = 0.9, rho_A = S / (3.7 P) and
rho_B = S / (1.3 P), so A, the idler, gives first. Memory given back goes to the highest rho
first (the VM with the fewest pages for its shares and activity).

Active fraction (section 5.3): each period ``active_touched`` of ``active_sampled`` random
pages were touched again. The paper keeps a slow and a fast exponentially weighted moving
average plus a version of the fast one that already counts the current period, and takes the
largest: f rises at once with a burst and decays slowly after. The paper gives no gains; here
(per policy call, which the manager makes every few seconds, where ESX samples every 30 s):

- ``ESX_SLOW_GAIN`` = 1/16: the slow average forgets with a time constant of ~16 samples, so an
  idle VM keeps its recent activity for minutes (no reclaim right after a pause);
- ``ESX_FAST_GAIN`` = 1/2: the fast average follows within two samples;
- the in-period estimate: the manager hands over each period's sample whole, so the fast
  average "with the current period counted" is this period's own fraction; a VM whose pages
  are all touched this period counts as active at once.

A VM never sampled is assumed fully active (f = 1: reclaimed last) until it is.

Host states (section 6.3): free memory (budget - resident) high 6%, soft 4%, hard 2%, low 1%
of the budget. Below soft, ESX balloons until free is back at high; this policy balloons the
same way and, above high, gives the surplus back (so between soft and high nothing moves: the
states are the hysteresis). No VM ever has more than ``Mem.CtlMaxPercent`` = 65% of its RAM
in its balloon.

Between calls it keeps each VM's ``ActiveEstimate``; its ``EsxSnapshot`` holds them (no times).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from pydantic import Field

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.snapshot import SnapshotPart
from memballoon.policy.base import (
    Decision,
    PolicySnapshot,
    clamp_balloon,
    own_snapshot,
)
from memballoon.policy.sample import GuestSample, HostSample

ESX_IDLE_TAX: Final = 0.75  # Mem.IdleTax 75
MEM_CTL_MAX_PERCENT: Final = 65  # Mem.CtlMaxPercent: most of a VM's memory in its balloon
ESX_FREE_HIGH: Final = 0.06  # free-memory states, share of host memory (section 6.3)
ESX_FREE_SOFT: Final = 0.04
ESX_FREE_HARD: Final = 0.02
ESX_FREE_LOW: Final = 0.01
ESX_SLOW_GAIN: Final = 1.0 / 16.0  # see the module docstring
ESX_FAST_GAIN: Final = 0.5
#: Revocation moves memory in slices of 1/32 of what is needed (at least 1 MiB), each to the
#: VM whose rho is lowest at that moment, so the tax equalises across VMs as P shrinks.
ESX_SLICES: Final = 32
ESX_MIN_SLICE_PAGES: Final = 256


class EsxCounter(CounterName):
    """What the esx policy counts."""

    BAD_SAMPLE = "esx_bad_sample"  # active-page samples with touched outside [0, sampled]


def idle_cost(tau: float) -> float:
    """k = 1 / (1 - tau): what an idle page costs in active pages."""
    if not 0.0 <= tau < 1.0:  # the policy checks its configured tau first
        raise UsageError(f"tau must be within [0, 1), got {tau}")
    return 1.0 / (1.0 - tau)


def shares_per_page(shares: float, pages: float, active: float, tau: float) -> float:
    """rho = S / (P * (f + k * (1 - f))); infinite for a VM holding no pages."""
    f = min(1.0, max(0.0, active))
    denom = pages * (f + idle_cost(tau) * (1.0 - f))
    return float("inf") if denom <= 0 else shares / denom


@dataclass(slots=True)
class ActiveEstimate:
    """The slow, fast and in-period averages of the active fraction (module docstring)."""

    slow: float = 1.0
    fast: float = 1.0
    current: float = 1.0
    samples: int = 0

    def update(self, sample: float) -> float:
        s = min(1.0, max(0.0, sample))
        if self.samples == 0:
            self.slow = self.fast = s
        else:
            self.slow += ESX_SLOW_GAIN * (s - self.slow)
            self.fast += ESX_FAST_GAIN * (s - self.fast)
        self.current = s
        self.samples += 1
        return self.value

    @property
    def value(self) -> float:
        return max(self.slow, self.fast, self.current)


#: An active fraction, or an average of them.
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class EstimateSnapshot(SnapshotPart):
    """An ``ActiveEstimate``."""

    slow: Fraction
    fast: Fraction
    current: Fraction
    samples: Annotated[int, Field(ge=0)]


class EsxSnapshot(PolicySnapshot):
    """``EsxPolicy`` state that survives a restart: each VM's active-fraction estimate."""

    policy: Literal["esx"] = "esx"
    estimates: dict[str, EstimateSnapshot] = Field(default_factory=dict)


@dataclass(slots=True)
class _Vm:
    g: GuestSample
    pages: int  # P: what the VM will keep
    lo: int  # least it may keep (floor, CtlMaxPercent)
    hi: int  # most it may keep
    active: float

    def rho(self, tau: float) -> float:
        return shares_per_page(self.g.settings.shares, self.pages, self.active, tau)


class EsxPolicy:
    """Waldspurger's shares-per-page with idle memory tax (see the module docstring)."""

    def __init__(
        self,
        *,
        tau: float = ESX_IDLE_TAX,
        soft: float = ESX_FREE_SOFT,
        high: float = ESX_FREE_HIGH,
        ctl_max_percent: int = MEM_CTL_MAX_PERCENT,
    ) -> None:
        if not 0.0 <= tau < 1.0:
            raise ConfigError(f"tau must be within [0, 1), got {tau}")
        if not 0.0 <= soft <= high < 1.0:
            raise ConfigError("esx: need 0 <= soft <= high < 1")
        if not 0 <= ctl_max_percent <= 100:
            raise ConfigError("esx: ctl_max_percent must be within [0, 100]")
        self.tau = tau
        self.soft = soft
        self.high = high
        self.ctl_max_percent = ctl_max_percent
        self.counters = Counters()
        self.estimates: dict[str, ActiveEstimate] = {}

    @property
    def name(self) -> str:
        return "esx"

    def snapshot(self, now: float) -> EsxSnapshot:
        return EsxSnapshot(estimates={
            n: EstimateSnapshot(slow=e.slow, fast=e.fast, current=e.current, samples=e.samples)
            for n, e in self.estimates.items()})

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        own = own_snapshot(snap, EsxSnapshot, self.name)
        self.estimates = {n: ActiveEstimate(e.slow, e.fast, e.current, e.samples)
                          for n, e in own.estimates.items()}

    def active_fraction(self, g: GuestSample) -> float:
        """Update and return ``g``'s smoothed active fraction from its latest sampling."""
        est = self.estimates.setdefault(g.name, ActiveEstimate())
        if g.active_sampled > 0:
            if not 0 <= g.active_touched <= g.active_sampled:
                self.counters.inc(EsxCounter.BAD_SAMPLE)
                return est.value
            return est.update(g.active_touched / g.active_sampled)
        return est.value

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        for gone in set(self.estimates) - {g.name for g in guests}:
            del self.estimates[gone]
        vms: list[_Vm] = []
        for g in guests:
            f = self.active_fraction(g)
            if not g.alive:
                continue
            ctl_lo = g.ram_pages - g.ram_pages * self.ctl_max_percent // 100
            lo = max(g.floor_pages(), ctl_lo)
            hi = g.ceiling_pages()
            vms.append(_Vm(g, g.size_pages, min(lo, hi), hi, f))
        budget = host.budget_pages
        free = budget - host.resident_pages
        if free < self.soft * budget:
            need = int(self.high * budget) - free
            self._move(vms, -need)
            rule = "free below soft state: reclaim from lowest shares-per-page"
        elif free > self.high * budget:
            spare = free - int(self.high * budget)
            self._move(vms, spare)
            rule = "free above high state: give back to highest shares-per-page"
        else:
            return []
        out: list[Decision] = []
        for v in vms:
            g = v.g
            balloon = clamp_balloon(g, g.ram_pages - v.pages)
            if balloon == g.target_pages or v.pages == g.size_pages:
                continue
            out.append(Decision(g.name, balloon, f"esx: {rule}", {
                "host_free_pages": float(free), "budget_pages": float(budget),
                "active_fraction": v.active, "shares": float(g.settings.shares),
                "rho": v.rho(self.tau), "size_pages": float(g.size_pages),
            }))
        return out

    def _move(self, vms: list[_Vm], amount: int) -> None:
        """Take (negative) or give (positive) ``amount`` pages, a slice at a time."""
        left = abs(amount)
        step = max(ESX_MIN_SLICE_PAGES, left // ESX_SLICES)
        while left > 0:
            if amount < 0:
                cand = [v for v in vms if v.pages > v.lo]
                if not cand:
                    break
                v = min(cand, key=lambda v: (v.rho(self.tau), v.g.name))
                take = min(step, left, v.pages - v.lo)
                v.pages -= take
            else:
                cand = [v for v in vms if v.pages < v.hi]
                if not cand:
                    break
                v = max(cand, key=lambda v: (v.rho(self.tau), v.g.name))
                take = min(step, left, v.hi - v.pages)
                v.pages += take
            left -= take
