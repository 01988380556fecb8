"""DefaultPolicy: unit rules on synthetic samples, then closed loops over real guest models."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from memballoon.edge.journal import Journal
from memballoon.guest.workload import Idle, Ramp, Steady, Workload, make_workload
from memballoon.harness.pair import Pair, make_pair
from memballoon.manager.core import Action, ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.base import Decision, Policy
from memballoon.policy.default import (
    BACKOFF_MIN_FRACTION,
    MARGIN_FRACTION,
    MARGIN_MIN_PAGES,
    MAX_REPORT_AGE_S,
    PROBE_STEP_INC,
    PROBE_STEP_MAX,
    PROBE_STEP_MIN,
    PROBE_STEP_START,
    STALL_QUIET_PCT,
    STALL_TROUBLE_PCT,
    DefaultPolicy,
)
from memballoon.policy.mom import MomPolicy
from memballoon.policy.proxmox import ProxmoxPolicy
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import SimBackend

RAM = mib_to_pages(1024)
HOST = HostSample(budget_pages=10 * RAM, resident_pages=RAM)  # plenty of room


def report(t: float, *, avail: int, balloon: int = 0, stall: float = 0.0, swap_in: int = 0,
           major: int = 0, oom: int = 0, refused: int | None = None,
           target: int | None = None) -> PressureReport:
    return PressureReport(
        guest="g", time_s=t, total_bytes=RAM * PAGE_SIZE, free_bytes=avail * PAGE_SIZE,
        available_bytes=avail * PAGE_SIZE, anon_bytes=0, cache_bytes=0,
        balloon_bytes=balloon * PAGE_SIZE, swap_in_pages=swap_in, swap_out_pages=0,
        major_faults=major, oom_kills=oom, stall_us=0, stall_pct=stall,
        balloon_target_pages=balloon if target is None else target,
        balloon_actual_pages=balloon, refused_pages=refused)


def sample(r: PressureReport | None, *, balloon: int = 0, target: int | None = None,
           age: float | None = 0.0, min_pages: int = 0) -> GuestSample:
    # the report arrived ``age`` seconds before the time it carries (the tests' ``now``)
    return GuestSample("g", RAM, balloon, balloon if target is None else target,
                       GuestSettings(min_pages=min_pages), r,
                       r.time_s - age if r is not None and age is not None else None)


def one(p: DefaultPolicy, g: GuestSample, now: float, host: HostSample = HOST) -> Decision | None:
    ds = p.decide(host, [g], now)
    assert len(ds) <= 1
    return ds[0] if ds else None


# ---------------------------------------------------------------------- constants and rules
def test_constants() -> None:
    # the seed's adaptive-rate shape: start, grow by a small increment, halve, within bounds
    assert PROBE_STEP_MIN < PROBE_STEP_START < PROBE_STEP_MAX
    assert 0 < PROBE_STEP_INC < PROBE_STEP_START
    assert STALL_QUIET_PCT < STALL_TROUBLE_PCT
    assert mib_to_pages(32) == MARGIN_MIN_PAGES
    assert MAX_REPORT_AGE_S == 10.0


def test_quiet_guest_is_probed_with_a_growing_step() -> None:
    p = DefaultPolicy()
    avail = 2 * int(MARGIN_FRACTION * RAM) - 1  # not idle enough for the half-of-free rule
    d = one(p, sample(report(0, avail=avail)), 0.0)
    assert d is not None and d.balloon_pages == int(PROBE_STEP_START * RAM)
    assert "probe" in d.reason and d.inputs["stall_pct"] == 0.0
    b = d.balloon_pages
    d2 = one(p, sample(report(5, avail=avail - b, balloon=b), balloon=b), 5.0)
    assert d2 is not None
    assert d2.balloon_pages - b == int((PROBE_STEP_START + PROBE_STEP_INC) * RAM)


def test_idle_free_memory_is_taken_half_a_call_once_the_guest_is_known_quiet() -> None:
    p = DefaultPolicy()
    margin = int(MARGIN_FRACTION * RAM)
    ws = RAM // 10
    b = 0
    steps = []
    for t in range(6):
        avail = RAM - ws - b
        d = one(p, sample(report(5.0 * t, avail=avail, balloon=b), balloon=b), 5.0 * t)
        assert d is not None and d.balloon_pages <= RAM - ws - margin  # never past the floor
        steps.append(d.balloon_pages - b)
        b = d.balloon_pages
    # a new guest is probed by the ordinary step first; then by half its idle memory (capped)
    assert steps[0] == int(PROBE_STEP_START * RAM)
    assert max(steps[3:]) > int(PROBE_STEP_MAX * RAM)
    assert max(steps) <= RAM // 4


def test_probe_stops_at_the_learned_floor() -> None:
    p = DefaultPolicy()
    ws = RAM // 4
    avail = RAM - ws
    margin = int(MARGIN_FRACTION * RAM)
    b = RAM - ws - margin - 100  # 100 pages above the floor
    d = one(p, sample(report(0, avail=avail - b, balloon=b), balloon=b), 0.0)
    assert d is None or d.balloon_pages <= RAM - ws - margin
    d = one(p, sample(report(5, avail=avail - b, balloon=b), balloon=b), 5.0)
    assert d is None  # at the floor: hold


def test_pressure_backs_off_at_once_and_halves_the_step() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    step_before = p.state["g"].step
    d = one(p, sample(report(5, avail=RAM // 4, balloon=b, stall=5.0), balloon=b), 5.0)
    assert d is not None and "back off" in d.reason
    assert b - d.balloon_pages >= int(BACKOFF_MIN_FRACTION * RAM)
    assert p.state["g"].step == max(PROBE_STEP_MIN, step_before / 2)
    # and it does not probe back below the size that hurt (plus the margin) while the memory
    # lasts, though it may take back what the back-off gave beyond that
    hurt_size = (RAM - b) + int(MARGIN_FRACTION * RAM)
    b2 = d.balloon_pages
    avail = RAM // 4 + (b - b2)  # the same working set, more room
    d3 = one(p, sample(report(10, avail=avail, balloon=b2), balloon=b2), 10.0)
    assert d3 is None or RAM - d3.balloon_pages >= hurt_size


def test_swap_ins_are_trouble() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    d = one(p, sample(report(1, avail=RAM // 4, balloon=b, swap_in=10_000), balloon=b), 1.0)
    assert d is not None and d.balloon_pages < b and "swap-in" in d.reason


def test_low_available_deflates_enough_to_restore_the_margin() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    d = one(p, sample(report(0, avail=100, balloon=b), balloon=b), 0.0)
    assert d is not None and "emergency" in d.reason
    assert b - d.balloon_pages >= d.inputs["margin_pages"] - 100


def test_oom_kill_is_an_emergency() -> None:
    p = DefaultPolicy()
    b = RAM // 2
    one(p, sample(report(0, avail=RAM // 4, balloon=b), balloon=b), 0.0)
    d = one(p, sample(report(1, avail=RAM // 4, balloon=b, oom=1), balloon=b), 1.0)
    assert d is not None and "OOM" in d.reason and d.balloon_pages < b


def test_stalled_inflation_gets_target_lowered_to_actual() -> None:
    p = DefaultPolicy()
    b, t = RAM // 4, RAM // 2
    g = sample(report(0, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
    assert one(p, g, 0.0) is None  # first look: it may still be moving
    g = sample(report(1, avail=RAM // 2, balloon=b, target=t), balloon=b, target=t)
    d = one(p, g, 1.0)
    assert d is not None and d.balloon_pages == b and "stalled" in d.reason


def test_refused_pages_stop_inflation() -> None:
    p = DefaultPolicy()
    b, t = RAM // 4, RAM // 2
    one(p, sample(report(0, avail=RAM // 2, balloon=b - 10, target=t, refused=0),
                  balloon=b - 10, target=t), 0.0)
    d = one(p, sample(report(1, avail=RAM // 2, balloon=b, target=t, refused=50),
                      balloon=b, target=t), 1.0)
    assert d is not None and d.balloon_pages == b and "refused" in d.reason


def test_blind_guest_is_never_inflated() -> None:
    p = DefaultPolicy()
    assert one(p, sample(None), 0.0) is None
    stale = sample(report(0, avail=RAM), age=MAX_REPORT_AGE_S + 1)
    assert one(p, stale, 0.0) is None
    # an inflation in progress stops where it is
    d = one(p, sample(None, balloon=100, target=5000), 1.0)
    assert d is not None and d.balloon_pages == 100
    assert p.counters["default_blind"] == 3


def test_never_below_min_pages() -> None:
    p = DefaultPolicy()
    floor = RAM - 1000
    d = one(p, sample(report(0, avail=RAM * 9 // 10), min_pages=floor), 0.0)
    assert d is not None and d.balloon_pages == 1000


def test_lying_report_is_counted_not_raised() -> None:
    p = DefaultPolicy()
    one(p, sample(report(0, avail=RAM * 4, major=50)), 0.0)
    one(p, sample(report(1, avail=RAM // 2, major=10)), 1.0)  # a counter going back
    assert p.counters["policy_report_available_above_ram"] >= 1
    assert p.counters["policy_report_major_faults_backwards"] == 1


def test_over_budget_reclaims_from_the_idlest_quiet_guest_first() -> None:
    p = DefaultPolicy(probe=False)
    idle = GuestSample("idle", RAM, 0, 0, report=report(0, avail=RAM * 9 // 10),
                       report_time=0.0)
    busy = GuestSample("busy", RAM, 0, 0, report=report(0, avail=RAM // 2),
                       report_time=0.0)
    host = HostSample(budget_pages=2 * RAM - RAM // 4, resident_pages=2 * RAM)
    ds = {d.guest: d for d in p.decide(host, [busy, idle], 0.0)}
    assert set(ds) == {"idle"} and ds["idle"].balloon_pages == RAM // 4
    assert "over budget" in ds["idle"].reason


# ---------------------------------------------------------------------- closed loops
@dataclass
class World:
    """Guests as driver/device pairs on a virtual clock, managed by the real engine (the core's
    floors, hysteresis and safety checks included) with a policy every ``every`` seconds."""

    pairs: dict[str, Pair]
    settings: GuestSettings
    budget_pages: int
    clock: ManualClock = field(default_factory=ManualClock)
    engine: Engine | None = None
    backend: SimBackend | None = None
    stalls: list[float] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    decisions: list[Action] = field(default_factory=list)
    min_size: dict[str, int] = field(default_factory=dict)
    peak_resident: int = 0
    t: int = 0

    @classmethod
    def build(cls, protocol: str, workloads: Sequence[Workload], guest_mib: int,
              budget_frac: float, min_mib: float = 0) -> World:
        pairs = {f"g{i}": make_pair(protocol, mib_to_pages(guest_mib), w)
                 for i, w in enumerate(workloads)}
        return cls(pairs, GuestSettings(min_pages=mib_to_pages(min_mib)),
                   int(len(pairs) * mib_to_pages(guest_mib) * budget_frac))

    def resident(self) -> int:
        return sum(p.ram.resident_bytes() // PAGE_SIZE for p in self.pairs.values())

    def _engine(self, policy: Policy, every: int) -> tuple[Engine, SimBackend]:
        if self.engine is None or self.backend is None:
            self.backend = SimBackend(self.pairs, self.clock, report_every_s=every,
                                      rng=random.Random(7))
            core = ManagerCore(policy, dict.fromkeys(self.pairs, self.settings),
                               self.budget_pages)
            self.engine = Engine(self.backend, core, Journal(None), self.clock)
        assert self.engine.core.policy is policy
        return self.engine, self.backend

    def run(self, policy: Policy, seconds: int, every: int = 2) -> None:
        engine, backend = self._engine(policy, every)
        for _ in range(seconds):
            self.t += 1
            backend.advance(1.0)
            for p in self.pairs.values():
                assert not p.violations, p.violations[:3]
            for n, p in self.pairs.items():
                size = p.mem.total_pages - p.device.actual_pages
                self.min_size[n] = min(self.min_size.get(n, size), size)
            self.peak_resident = max(self.peak_resident, self.resident())
            self.released.append(sum(p.device.actual_pages for p in self.pairs.values()))
            if self.t % every:
                continue
            seen = dict(engine.guests)
            self.decisions.extend(engine.step())
            for n, s in engine.guests.items():
                old = seen.get(n)
                if s.report is not None and old is not None and old.report is not None \
                        and s.report is not old.report:
                    self.stalls.append(s.report.stall_pct)

    def oom_kills(self) -> int:
        return sum(p.mem.events.oom_kills for p in self.pairs.values())

    def mean_released(self) -> float:
        return float(np.mean(self.released))

    def p99_stall(self) -> float:
        return float(np.percentile(self.stalls, 99)) if self.stalls else 0.0


@pytest.mark.parametrize("protocol", ["vmw", "virtio"])
def test_ramp_is_never_oom_killed_while_squeezed(protocol: str) -> None:
    w = World.build(protocol, [Ramp(start_mib=16, peak_mib=200, mib_per_s=8, file_mib=4,
                                    start_at_s=40)], guest_mib=256, budget_frac=0.5)
    p = DefaultPolicy()
    w.run(p, 120)
    assert w.oom_kills() == 0
    assert max(w.released) > mib_to_pages(100)  # it was squeezed before the ramp
    assert any("emergency" in d.reason or "back off" in d.reason for d in w.decisions)
    pair = w.pairs["g0"]
    assert pair.mem.meminfo().anon_pages >= mib_to_pages(200) - 1  # the ramp got its memory


def test_idle_guest_is_probed_down_to_its_working_set() -> None:
    w = World.build("virtio", [Idle(anon_mib=40, file_mib=8)], guest_mib=256, budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 200, every=4)
    mem = w.pairs["g0"].mem
    ws = mem.total_pages - mem.available_pages() - mem.balloon_pages
    keep = mem.total_pages - w.pairs["g0"].device.actual_pages
    margin = max(MARGIN_MIN_PAGES, int(MARGIN_FRACTION * mem.total_pages))
    assert keep <= ws + margin + int(PROBE_STEP_MAX * mem.total_pages)
    assert keep >= ws  # never into the working set
    assert w.oom_kills() == 0 and max(w.stalls) <= STALL_TROUBLE_PCT


def test_balloon_never_breaks_min_pages() -> None:
    w = World.build("virtio", [Idle(anon_mib=16, file_mib=8), Idle(anon_mib=16, file_mib=8)],
                    guest_mib=256, budget_frac=0.2, min_mib=160)
    w.run(DefaultPolicy(), 120)
    assert min(w.min_size.values()) >= mib_to_pages(160)
    assert all(d.new_pages <= mib_to_pages(256 - 160) for d in w.decisions)


def test_pressure_makes_it_deflate_at_once() -> None:
    # squeeze a cache-heavy guest by hand far below its hot file set: it stalls at once
    w = World.build("virtio", [Steady(anon_mib=64, file_mib=128, hot=0.9,
                                      cold_access_per_s=0.05)], guest_mib=256, budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 10)
    pair = w.pairs["g0"]
    pair.set_target(mib_to_pages(150))
    before = len(w.decisions)
    for _ in range(10):
        w.run(p, 2)
        if len(w.decisions) > before:
            break
    new = w.decisions[before:]
    assert new and ("back off" in new[0].reason or "emergency" in new[0].reason)
    assert new[0].new_pages < mib_to_pages(150)


def test_stalled_inflation_in_a_real_guest_is_given_back() -> None:
    # a guest whose anonymous memory fills it: an inflation by hand cannot go through
    w = World.build("vmw", [Steady(anon_mib=200, file_mib=8, hot=0.5)], guest_mib=256,
                    budget_frac=1.0)
    p = DefaultPolicy()
    w.run(p, 6)
    pair = w.pairs["g0"]
    pair.set_target(mib_to_pages(200))
    w.run(p, 10)
    assert pair.device.target_pages <= pair.device.actual_pages
    assert w.oom_kills() == 0


SCENARIOS = [
    ("idle", "idle", "steady", "diurnal"),
    ("diurnal", "diurnal", "idle", "steady"),
    ("idle", "diurnal", "idle", "idle"),
]


@pytest.mark.parametrize("kinds", SCENARIOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_default_returns_as_much_as_mom_and_proxmox_without_more_stall(
    kinds: tuple[str, ...], seed: int
) -> None:
    results = {}
    for make in (DefaultPolicy, MomPolicy, ProxmoxPolicy):
        pol = make()
        w = World.build("virtio", [make_workload(k, 256, seed + i) for i, k in enumerate(kinds)],
                        guest_mib=256, budget_frac=0.45, min_mib=32)
        w.run(pol, 150, every=5)
        results[pol.name] = w
    d = results["default"]
    best = max(results["mom"].mean_released(), results["proxmox"].mean_released())
    assert d.oom_kills() == 0
    assert d.mean_released() >= best
    assert d.p99_stall() <= max(results["mom"].p99_stall(), results["proxmox"].p99_stall(),
                                STALL_TROUBLE_PCT)
