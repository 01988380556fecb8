"""What a simulation runs: the guests, the host, the manager's policy, for how long.

A ``Scenario`` is the typed, checked form of a scenario file (the TOML the ``memballoon sim``
commands read, parsed by ``app/scenario.py``): every guest resolved to its RAM, protocol,
workload and limits, the host to its memory and its own usage over time. ``build`` turns one
into a world: driver/device pairs (``harness.pair.make_pair``), a ``SimBackend`` over them, a
``ManagerCore`` with the policy and an ``Engine`` on the scenario's ``ManualClock``: the same
code every other world runs.

Host memory and budget: ``host_bytes`` is the memory the guests and the host's own usage share
(None: as much as they want); a guest past it is OOM-killed by the host. The manager holds the
guests to ``budget`` (a fixed number of pages; None: "auto", the host's available memory beyond
``reserve_pages``, read through the backend's host probe each step, as the daemon does).
A sweep (``sweep_shares``) runs the scenario once per host size, each a share of the guests'
summed RAM, the budget following the host.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from memballoon.edge.journal import Journal
from memballoon.guest.workload import Workload
from memballoon.harness.pair import PROTOCOLS, Pair, make_pair
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import Backend, ManualClock
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Policy
from memballoon.policy.registry import make_policy
from memballoon.policy.sample import GuestSettings
from memballoon.sim.backend import (
    ESX_SAMPLE_PAGES,
    HostUsage,
    ReportSink,
    SimBackend,
    SimGuests,
    SimHostProbe,
)

#: Invariant checks: after every period (slow), one guest in turn every ``SPOT_CHECK_S`` and
#: all at the end, or only the cheap per-period size check and all at the end.
CHECKS: Final = ("every", "spot", "end")
SPOT_CHECK_S: Final = 60.0


@dataclass(frozen=True)
class GuestSpec:
    """One simulated guest, resolved."""

    name: str
    ram_pages: int
    protocol: str
    workload: Workload
    settings: GuestSettings = field(default_factory=GuestSettings)
    swap_pages: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"guest {self.name}: unknown protocol {self.protocol!r}")
        if self.ram_pages <= 0 or self.swap_pages < 0:
            raise UsageError(f"guest {self.name}: RAM must be positive and swap >= 0")


@dataclass(frozen=True)
class HostUse:
    """The host's own memory use over time: spans of (start s, end s, bytes), which add up
    where they overlap."""

    spans: tuple[tuple[float, float, int], ...] = ()

    def __call__(self, now: float) -> int:
        return sum(size for start, end, size in self.spans if start <= now < end)


@dataclass(frozen=True)
class Scenario:
    """A checked scenario (module docstring); every size in pages, every time in seconds."""

    name: str
    seconds: float
    guests: tuple[GuestSpec, ...]
    host_bytes: int | None = None
    budget_pages: int | None = None  # None: "auto" (needs host_bytes)
    reserve_pages: int = 0
    reserve_share: float | None = None  # the reserve as a share of the host's memory
    host_use: HostUse = field(default_factory=HostUse)
    policy: str = "default"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    variants: tuple[Mapping[str, Any], ...] = ()  # runs with these params over policy_params
    sweep_shares: tuple[float, ...] = ()  # host memory as shares of the guests' summed RAM
    max_stall_pct: float = 5.0  # a run is safe with no OOM kill and p99 stall under this
    seed: int = 1
    period_s: float = 1.0  # the manager's period
    report_every_s: float = 1.0
    driver_period_s: float | None = None  # None: each driver's own (VMware 1 s, virtio 0.2 s)
    record_every_s: float = 0.0  # 0: no per-guest series
    check: str = "spot"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.guests:
            raise UsageError(f"scenario {self.name}: no guests")
        if len({g.name for g in self.guests}) != len(self.guests):
            raise UsageError(f"scenario {self.name}: guest names repeat")
        if self.budget_pages is None and self.host_bytes is None:
            raise UsageError(f"scenario {self.name}: an auto budget needs the host's memory")
        if self.check not in CHECKS:
            raise UsageError(f"scenario {self.name}: check must be one of {CHECKS}")
        if min(self.seconds, self.period_s, self.report_every_s) <= 0:
            raise UsageError(f"scenario {self.name}: times must be positive")

    @property
    def ram_pages(self) -> int:
        """The guests' summed RAM."""
        return sum(g.ram_pages for g in self.guests)

    def with_host_share(self, share: float) -> Scenario:
        """This scenario on a host of ``share`` times the guests' RAM, a fixed budget of the
        same (an auto budget stays auto): one point of a sweep."""
        host = int(share * self.ram_pages) * PAGE_SIZE
        reserve = self.reserve_pages
        if self.reserve_share is not None:
            reserve = int(self.reserve_share * host) // PAGE_SIZE
        budget = None if self.budget_pages is None else max(1, host // PAGE_SIZE - reserve)
        return replace(self, host_bytes=host, budget_pages=budget, reserve_pages=reserve,
                       sweep_shares=())

    def with_policy(self, policy: str, params: Mapping[str, Any] | None = None) -> Scenario:
        return replace(self, policy=policy, policy_params=dict(params or {}), variants=())


class SimEngineBackend(Backend, SimGuests, Protocol):
    """A backend a scenario's manager steps over (``SimBackend``, or a sharded one)."""


@dataclass
class World:
    """A scenario built: the backend, the engine over it, and its clock."""

    scenario: Scenario
    clock: ManualClock
    backend: SimBackend
    engine: Engine
    policy: Policy


def make_scenario_policy(sc: Scenario) -> Policy:
    return make_policy(sc.policy, **dict(sc.policy_params))


def build(sc: Scenario, *, on_report: ReportSink | None = None, sleep: bool = True,
          policy: Policy | None = None) -> World:
    """The world of ``sc`` at time 0 (module docstring)."""
    clock = ManualClock()
    pairs = make_pairs(sc, sc.guests)
    settings = {g.name: g.settings for g in sc.guests}
    pol = policy if policy is not None else make_scenario_policy(sc)
    # ESX samples active pages (Waldspurger 2002): only its policy reads them, and they cost
    rng = random.Random(sc.seed * 7919 + 17) if pol.name == "esx" else None
    backend = SimBackend(pairs, clock, report_every_s=sc.report_every_s, rng=rng,
                         active_samples=ESX_SAMPLE_PAGES, check=sc.check == "every",
                         settings=settings, host_bytes=sc.host_bytes,
                         host_usage=host_usage(sc), sleep=sleep, on_report=on_report)
    engine = make_engine(sc, backend, SimHostProbe(backend), pol)
    return World(sc, clock, backend, engine, pol)


def make_pairs(sc: Scenario, specs: Sequence[GuestSpec]) -> dict[str, Pair]:
    """The driver/device pairs of ``specs`` (guests of ``sc``): each pair depends on its own
    spec only (its workload carries its seed), so a subset builds exactly the pairs the whole
    fleet's build holds (a shard's)."""
    return {g.name: make_pair(g.protocol, g.ram_pages, g.workload, swap_pages=g.swap_pages,
                              period_s=sc.driver_period_s)
            for g in specs}


def host_usage(sc: Scenario) -> HostUsage | None:
    """What the host of ``sc`` takes for itself over time (None: nothing)."""
    return sc.host_use if sc.host_use.spans else None


def make_engine(sc: Scenario, backend: SimEngineBackend, probe: SimHostProbe,
                pol: Policy) -> Engine:
    """The manager of ``sc`` over ``backend``, sharing its counters (``probe`` read only with a
    host of known memory)."""
    settings = {g.name: g.settings for g in sc.guests}
    core = ManagerCore(pol, settings, sc.budget_pages, reserve_pages=sc.reserve_pages,
                       counters=backend.counters)
    return Engine(backend, core, Journal(None), backend.clock,
                  host_probe=probe if sc.host_bytes is not None else None)


def runs_of(sc: Scenario) -> Sequence[Scenario]:
    """The runs ``sim run`` makes of ``sc``: one per variant (or the scenario itself)."""
    if not sc.variants:
        return [sc]
    return [sc.with_policy(sc.policy, {**sc.policy_params, **v}) for v in sc.variants]


__all__ = ["CHECKS", "GuestSpec", "HostUse", "Scenario", "SimEngineBackend", "World", "build",
           "host_usage", "make_engine", "make_pairs", "runs_of"]
