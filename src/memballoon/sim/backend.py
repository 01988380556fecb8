"""The simulated world as a manager backend: driver/device pairs on a ``ManualClock``.

``SimBackend`` holds named ``harness.pair.Pair`` objects, the same guest model, balloon drivers
and devices the other worlds run, joined in one process. ``advance(seconds)`` moves the clock
and runs every pair up to it, one work period at a time (the workload, then the driver), and
every ``report_every_s`` has each guest push a ``PressureReport`` as the local guest process
does: built by ``guest.report.guest_report``, its ``stall_pct`` taken over the time since the
guest's previous report, stamped ``report_time`` by the clock. With an ``rng``, each report
carries an ESX-style active-page sample (Waldspurger 2002: ``ESX_SAMPLE_PAGES`` random frames).

The engine steps over it exactly as it steps over ``LocalHost``; ``run`` is the loop of the
simulator and of the tests (no sleep, no wall clock).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from memballoon.guest.report import guest_report
from memballoon.harness.pair import Pair
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport

#: Pages ESX samples per period (Waldspurger 2002, section 5.3: 100 random pages).
ESX_SAMPLE_PAGES: Final = 100
#: Slack when comparing virtual times (periods like 0.1 s do not add up exactly in floats).
TIME_EPS: Final = 1e-9


class SimCounter(CounterName):
    """What ``SimBackend`` counts."""

    SET_TARGET_REFUSED = "set_target_refused"  # targets for an unknown guest or out of range


@dataclass
class _SimGuest:
    pair: Pair
    report: PressureReport | None = None
    report_time: float | None = None
    next_report: float = 0.0


class SimBackend:
    """Named pairs on one virtual clock (module docstring)."""

    def __init__(
        self,
        pairs: Mapping[str, Pair],
        clock: ManualClock,
        *,
        report_every_s: float = 1.0,
        rng: random.Random | None = None,
        active_samples: int = ESX_SAMPLE_PAGES,
        check: bool = False,
        counters: Counters | None = None,
    ) -> None:
        if not report_every_s > 0:
            raise UsageError(f"report_every_s must be positive, got {report_every_s}")
        self.clock = clock
        self.report_every_s = report_every_s
        self.rng = rng
        self.active_samples = active_samples
        self.check = check
        self.counters = counters if counters is not None else Counters()
        now = clock.now()
        for p in pairs.values():
            p.now = max(p.now, now)
        self._guests = {n: _SimGuest(p, next_report=now + report_every_s)
                        for n, p in pairs.items()}

    @property
    def name(self) -> str:
        return "sim"

    def pair(self, name: str) -> Pair:
        return self._guests[name].pair

    @property
    def pairs(self) -> dict[str, Pair]:
        return {n: g.pair for n, g in self._guests.items()}

    # ------------------------------------------------------------------ time
    def advance(self, seconds: float) -> float:
        """Move the clock by ``seconds`` and run every guest up to it."""
        end = self.clock.advance(seconds)
        for name, g in self._guests.items():
            p = g.pair
            while p.now + p.period_s <= end + TIME_EPS:
                p.tick(check=self.check)
                if p.now + TIME_EPS >= g.next_report:
                    self._report(name, g)
        return end

    def _report(self, name: str, g: _SimGuest) -> None:
        p, mem = g.pair, g.pair.mem
        prev = g.report
        if prev is not None and p.now > prev.time_s:
            d_us = max(0, mem.events.stall_us - prev.stall_us)
            stall_pct = 100.0 * d_us / ((p.now - prev.time_s) * 1e6)
        else:
            stall_pct = p.last_step.stall_pct if p.last_step is not None else 0.0
        sampled = touched = 0
        if self.rng is not None and self.active_samples > 0:
            sampled = self.active_samples
            touched = mem.sample_active(self.rng, sampled)
        g.report = guest_report(name, p.now, mem, p.driver, stall_pct=stall_pct,
                                active_sampled=sampled, active_touched=touched)
        g.report_time = self.clock.now()
        while g.next_report <= p.now + TIME_EPS:
            g.next_report += self.report_every_s

    # ------------------------------------------------------------------ the Backend port
    def guests(self) -> dict[str, GuestSample]:
        out = {}
        for name, g in self._guests.items():
            p, rep = g.pair, g.report
            out[name] = GuestSample(
                name=name, ram_pages=p.mem.total_pages, balloon_pages=p.device.actual_pages,
                target_pages=p.device.target_pages, report=rep, report_time=g.report_time,
                alive=True, resident_bytes=p.ram.resident_bytes(),
                active_sampled=rep.active_sampled if rep is not None else 0,
                active_touched=rep.active_touched if rep is not None else 0,
            )
        return out

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        g = self._guests.get(guest)
        if g is None or not 0 <= balloon_pages <= g.pair.mem.total_pages:
            self.counters.inc(SimCounter.SET_TARGET_REFUSED)
            return False
        g.pair.set_target(balloon_pages)
        return True

    def host_resident_bytes(self) -> int:
        return sum(g.pair.ram.resident_bytes() for g in self._guests.values())

    def resident_pages(self) -> int:
        return self.host_resident_bytes() // PAGE_SIZE


def run(
    engine: Engine,
    backend: SimBackend,
    seconds: float,
    *,
    period_s: float = 1.0,
    on_step: Callable[[Engine], None] | None = None,
) -> None:
    """Advance ``backend`` by ``period_s`` and step ``engine``, until ``seconds`` have passed:
    the simulator's loop (the daemon's, without the sleep)."""
    if not period_s > 0:
        raise UsageError(f"period_s must be positive, got {period_s}")
    end = backend.clock.now() + seconds
    while backend.clock.now() + TIME_EPS < end:
        backend.advance(min(period_s, end - backend.clock.now()))
        engine.step()
        if on_step is not None:
            on_step(engine)


__all__ = ["ESX_SAMPLE_PAGES", "SimBackend", "run"]
