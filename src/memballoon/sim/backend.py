"""The simulated world as a manager backend: driver/device pairs on a ``ManualClock``.

Theory of operation
-------------------
``SimBackend`` holds named ``harness.pair.Pair`` objects, the same guest model, balloon drivers
and devices the other worlds run, joined in one process. ``advance(seconds)`` moves the clock
and runs every guest up to it; the engine steps over the backend exactly as it steps over
``LocalHost``, and ``run`` is the loop of the simulator and of the tests (no sleep, no wall
clock).

Event-driven: every guest has at most one pending tick in a heap (time, order of scheduling,
guest). A busy guest ticks every ``period_s`` (the workload runs, then the driver's work). After
a tick that leaves the pair ``quiet`` (the guest model steady under the demand of the next
period, the protocol with nothing to do) the guest sleeps: its next tick is when its workload's
demand next changes (``guest.workload.next_change``), or never; a new balloon target
(``set_target``) wakes it at its next period, and where the protocol signals a new target
(virtio's config interrupt, the batched VMware driver's doorbell: ``Pair.signalled``) the
driver's work also runs at once, at the moment of the target (when the next ``advance``
begins, so that a manager step's cost is the manager's alone), as the local guest process runs
it on a config interrupt or a ``WAKE``; the legacy VMware driver polls at its next period.
Waking, it first accounts the periods it slept
through in one call (``Pair.idle_until``: the timer and GET_TARGET counts a ticking guest
would have made, as many ``Pair.idle_period`` calls would),
so a sleeping guest ends in exactly the state of one ticked every period (a property test holds
it to that) and costs nothing in between. ``sleep=False`` ticks every guest every period.

Every ``report_every_s`` each live guest pushes a ``PressureReport`` as the local guest process
does: built by ``guest.report.guest_report``, its ``stall_pct`` taken over the time since the
guest's previous report, stamped ``report_time`` by the clock; a sleeping guest's report is
built from its state (which its idle periods do not change) at the report's time: where
nothing ran on the guest since its last report, that report's figures again
(``report_unchanged``; the pairs change only through the backend), and its sample the last
one's figures with the new report (``quick_reports``: neither reads the pair). With an
``rng``, each report carries an ESX-style active-page sample (Waldspurger 2002:
``ESX_SAMPLE_PAGES`` random frames).

The host: with ``host_bytes``, the guests live on a host of that much memory, of which
``host_usage(now)`` bytes are taken by the host itself (other processes, a backup job).
``probe()`` is a ``HostProbe`` of it (available = memory - what the guests hold - host usage),
so a manager with an "auto" budget reads it as the daemon reads /proc/meminfo. When the
guests and the host's own usage pass the host's memory at the end of an ``advance``, the host
OOM-kills the guest holding the most (as a memory cgroup kills the largest process): it is dead
from then on (``alive=False``) and its memory is the host's again (``host_oom_kills``).

Shards: no guest reads another between two ``advance`` calls (only the host's sum at the end
of one, and the ESX sample's shared ``rng``), so a fleet's guests can be split over several
backends, each a subset of the pairs without a host, in processes of their own
(``app.sim_shards``). Such a backend answers with ``changed_rows`` (the changed guests'
samples as plain tuples; a guest whose report alone is new, as its report's time, stall and
active sample) instead of ``guests()``, and a run reads either kind through
``SimGuests`` (``check_guest``, ``guest_violations``, ``guest_oom_kills`` instead of the
pairs).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from memballoon.guest.report import guest_report, report_unchanged
from memballoon.guest.workload import Demand, Workload, next_change
from memballoon.harness.pair import Pair, check_pair
from memballoon.manager.engine import Engine
from memballoon.manager.port import HostMemory, ManualClock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample, GuestSettings
from memballoon.protocol.pressure import PressureReport

#: Pages ESX samples per period (Waldspurger 2002, section 5.3: 100 random pages).
ESX_SAMPLE_PAGES: Final = 100
#: Slack when comparing virtual times (periods like 0.2 s do not add up exactly in floats).
TIME_EPS: Final = 1e-9

#: What the host takes for itself at a moment (bytes); None: nothing.
HostUsage = Callable[[float], int]
#: Told of every report a guest pushes (the runner keeps the stall samples).
ReportSink = Callable[[str, PressureReport], None]
#: A ``PressureReport``'s fields but the guest's name, in their order: the report as a tuple
#: (``SimBackend.changed_rows``), rebuilt with ``PressureReport(name, *fields)``.
REPORT_FIELDS: Final = tuple(f.name for f in fields(PressureReport))[1:]
_report_fields = attrgetter(*REPORT_FIELDS)
#: One changed guest as plain values (cheap to send to another process): index, RAM pages,
#: balloon pages (0 dead), target pages, report fields (() when the guest's last row carried
#: the same report; within one process, the report itself; None without one), report time,
#: alive, resident bytes.
SampleRow = tuple[int, int, int, int, "tuple[Any, ...] | PressureReport | None", "float | None",
                  bool, int]
#: A guest whose only change since its last row is its report, repeated by report rounds
#: while nothing ran on it (``report_unchanged``; most of a fleet): index, report time, and
#: the report's time, stall share and active sample (to another process; rebuilt with
#: ``report_unchanged`` of the report the last row made), or the report itself.
ReportRow = (tuple[int, "float | None", float, float, int, int]
             | tuple[int, "float | None", PressureReport])


#: ``changed_rows`` marks a guest's sample as sent with this (any non-None sample will do).
_SHIPPED: Final = GuestSample("", 0, 0, 0)


def guest_sample(name: str, ram_pages: int, balloon_pages: int, target_pages: int,
                 settings: GuestSettings, report: PressureReport | None,
                 report_time: float | None, alive: bool, resident: int) -> GuestSample:
    """A simulated guest's sample (the active-page sample its report's); positional, in the
    order of the fields: a fleet builds a thousand a report round, in one process or sharded."""
    return GuestSample(
        name, ram_pages, balloon_pages, target_pages, settings, report, report_time, alive,
        resident,
        report.active_sampled if report is not None else 0,  # active_sampled
        report.active_touched if report is not None else 0,  # active_touched
    )


def host_oom_victim(held: Iterable[tuple[int, str]]) -> str | None:
    """The live guest the host kills when the guests pass its memory, of ``(resident bytes,
    name)`` pairs: the one holding the most (the name breaks ties), as a memory cgroup kills
    its largest process; None when none holds anything."""
    return max(((r, n) for r, n in held if r > 0), default=(0, None))[1]


def usage_at(usage: HostUsage | None, now: float) -> int:
    """What the host takes for itself at ``now`` (bytes, never negative)."""
    return 0 if usage is None else max(0, int(usage(now)))


class SimCounter(CounterName):
    """What ``SimBackend`` counts."""

    SET_TARGET_REFUSED = "set_target_refused"  # targets for no live guest, or out of range
    TICKS = "sim_ticks"  # guest periods run (workload and driver)
    IDLE_PERIODS = "sim_idle_periods"  # guest periods slept through (accounted, not run)
    WAKES = "sim_wakes"  # sleeping guests woken (a target or a demand change)
    REPORTS = "sim_reports"  # pressure reports pushed
    HOST_OOM_KILLS = "host_oom_kills"  # guests the host killed: memory past the host's
    SIGNALLED = "sim_signalled_work"  # driver work run at once on a signalled target


@dataclass(eq=False)
class _SimGuest:
    name: str
    index: int
    pair: Pair
    settings: GuestSettings
    report: PressureReport | None = None
    report_time: float | None = None
    due: float = math.inf  # time of the pending tick (inf: asleep with nothing to wake for)
    version: int = 0  # bumps when ``due`` changes: older heap entries are stale
    alive: bool = True
    resident: int = 0  # host bytes behind the guest, as of its last tick
    # cached until it changes (then the guest is on the backend's list of stale samples)
    sample: GuestSample | None = field(default=None, repr=False)
    signalled: bool = False  # a signalled target waits for its driver's work
    # nothing ran on the pair since ``report`` was built from it (no tick, wake, catch-up,
    # target or kill, and nobody was handed the pair): the next report repeats its figures
    unchanged: bool = False
    # the workload's demand at the next tick as ``_next_tick`` asked it (that tick's time,
    # the workload, the demand): the tick hands it on rather than ask again
    pending: tuple[float, Workload, Demand] | None = field(default=None, repr=False)
    # the sample a report round of an ``unchanged`` guest made stale: while the guest stays
    # ``unchanged`` only its report is new (``guests()`` copies the rest, ``changed_rows``
    # sends a ``ReportRow``)
    base: GuestSample | None = field(default=None, repr=False)
    # the report the guest's last row carried (``changed_rows``): a row whose report it
    # still is sends () for its fields, which the reader has
    shipped: PressureReport | None = field(default=None, repr=False)


class SimGuests(Protocol):
    """What a run (``sim.run``) reads of the guests besides the manager's ``Backend`` port:
    ``SimBackend`` in process, or the sharded backend of ``app.sim_shards``."""

    clock: ManualClock
    counters: Counters
    host_oom_kills: int

    def advance(self, seconds: float) -> float: ...

    def host_resident_bytes(self) -> int: ...

    def sample_figures(
        self, samples: Mapping[str, GuestSample],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None: ...

    def alive(self, name: str) -> bool: ...

    def sync(self) -> None: ...

    def check_guest(self, name: str) -> list[str]: ...

    def violations(self, *, full: bool = True) -> list[str]: ...

    def guest_oom_kills(self) -> list[int]: ...


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
        settings: Mapping[str, GuestSettings] | None = None,
        host_bytes: int | None = None,
        host_usage: HostUsage | None = None,
        sleep: bool = True,
        on_report: ReportSink | None = None,
    ) -> None:
        if not report_every_s > 0:
            raise UsageError(f"report_every_s must be positive, got {report_every_s}")
        if host_bytes is not None and host_bytes <= 0:
            raise UsageError(f"host_bytes must be positive, got {host_bytes}")
        self.clock = clock
        self.report_every_s = report_every_s
        self.rng = rng
        self.active_samples = active_samples
        self.check = check
        self.counters = counters if counters is not None else Counters()
        self.host_bytes = host_bytes
        self.host_usage = host_usage
        self.sleep = sleep
        self.on_report = on_report
        # a sleeping guest's report and sample repeated from its last ones without reading
        # its pair (False: every report from the pair's state, every sample from the pair:
        # the reference the tests hold the repetition to)
        self.quick_reports = True
        self.host_oom_kills = 0
        now = clock.now()
        settings = settings or {}
        self._guests = [
            _SimGuest(n, i, p, settings.get(n, GuestSettings()))
            for i, (n, p) in enumerate(pairs.items())
        ]
        self._by_name = {g.name: g for g in self._guests}
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._next_report = now + report_every_s
        self._signalled: list[_SimGuest] = []
        self._resident = 0
        # ``guests()``: the samples as of its last call, in the guests' order, and the guests
        # whose sample changed since (rebuilt at the next call); each sample's balloon and
        # resident bytes in arrays by guest, for a runner's per-step sums over the fleet
        self._samples: dict[str, GuestSample] = {}
        self._stale: list[_SimGuest] = list(self._guests)
        self._returned: Mapping[str, GuestSample] | None = None
        self._balloon_arr: npt.NDArray[np.int64] = np.zeros(len(self._guests), dtype=np.int64)
        self._resident_arr: npt.NDArray[np.int64] = np.zeros(len(self._guests), dtype=np.int64)
        for g in self._guests:
            p = g.pair
            p.now = max(p.now, now)
            g.resident = p.ram.resident_bytes()
            self._resident += g.resident
            self._schedule(g, p.now + p.period_s)

    @property
    def name(self) -> str:
        return "sim"

    def pair(self, name: str) -> Pair:
        g = self._by_name[name]
        g.unchanged = False  # the caller may change it
        return g.pair

    @property
    def pairs(self) -> dict[str, Pair]:
        for g in self._guests:
            g.unchanged = False
        return {g.name: g.pair for g in self._guests}

    def alive(self, name: str) -> bool:
        return self._by_name[name].alive

    # ------------------------------------------------------------------ events
    def _schedule(self, g: _SimGuest, t: float) -> None:
        g.version += 1
        g.due = t
        if t < math.inf:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, g.index, g.version))

    def _catch_up(self, g: _SimGuest, until: float) -> None:
        """Account the periods ``g`` slept through whose ticks fall at or before ``until``."""
        g.unchanged = False
        n = g.pair.idle_until(until + TIME_EPS)
        if n:
            self.counters.inc(SimCounter.IDLE_PERIODS, n)

    def _tick(self, g: _SimGuest) -> None:
        """One period of ``g`` (``advance`` counts the ticks): a fleet runs hundreds a step,
        so ``_stale_sample`` and ``_schedule`` are written out."""
        p = g.pair
        period = p.period_s
        if p.now + period <= g.due - period + TIME_EPS:  # it slept (``_catch_up``)
            self._catch_up(g, g.due - period)
        g.unchanged = False
        pend = g.pending
        if pend is not None and pend[0] == p.now + period and pend[1] is p.workload:
            p.tick(check=self.check, demand=pend[2])
        else:
            p.tick(check=self.check)
        resident = p.ram.resident_bytes()
        self._resident += resident - g.resident
        g.resident = resident
        if g.sample is not None:
            g.sample = None
            self._stale.append(g)
        t = self._next_tick(g)
        g.version += 1
        g.due = t
        if t < math.inf:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, g.index, g.version))

    def _next_tick(self, g: _SimGuest) -> float:
        """When ``g`` ticks next: one period on, or, quiet, when its demand next changes."""
        p = g.pair
        nxt = p.now + p.period_s
        if not self.sleep:
            return nxt
        w = p.workload
        d = w.demand(nxt)
        g.pending = (nxt, w, d)
        if not p.quiet(d):
            return nxt
        change = next_change(w, nxt)
        if change <= nxt + TIME_EPS:
            return nxt
        if change == math.inf:
            return math.inf
        # the first tick of the period grid at or after the change
        k = math.ceil((change - p.now) / p.period_s - TIME_EPS)
        return p.now + k * p.period_s

    def _wake(self, g: _SimGuest) -> None:
        """``g`` has something to do at its next period (a new target)."""
        p = g.pair
        now = self.clock.now()
        if g.due <= now + p.period_s + TIME_EPS:
            return  # it ticks within a period anyway
        self._catch_up(g, now)
        self.counters.inc(SimCounter.WAKES)
        self._schedule(g, p.now + p.period_s)

    def _run_signalled(self) -> None:
        """The driver work of every guest signalled a new target since the last ``advance``,
        at the moment of the target (the clock has not moved since)."""
        now = self.clock.now()
        for g in self._signalled:
            g.signalled = False
            if not g.alive:
                continue
            p = g.pair
            self._catch_up(g, now)  # (no longer ``unchanged``)
            p.wake(now)
            self.counters.inc(SimCounter.SIGNALLED)
            resident = p.ram.resident_bytes()
            self._resident += resident - g.resident
            g.resident = resident
            self._stale_sample(g)
            if g.due > p.now + p.period_s + TIME_EPS:
                self._schedule(g, p.now + p.period_s)
        self._signalled.clear()

    def advance(self, seconds: float) -> float:
        """Move the clock by ``seconds`` and run every guest up to it (first the driver work
        of signalled targets, then ticks and the reports due at the same moment, in time
        order); then the host takes its memory back if it must."""
        if self._signalled:
            self._run_signalled()
        end = self.clock.now() + seconds
        limit = end + TIME_EPS
        heap, guests, pop, tick = self._heap, self._guests, heapq.heappop, self._tick
        ticks = 0
        t_rep = self._next_report  # (only a report round moves it)
        try:
            while True:
                # the ticks due up to the next report round (within TIME_EPS: a tick at the
                # round's time runs first), or up to the limit when that round is past it
                bound = t_rep + TIME_EPS if t_rep <= limit else limit
                while heap and heap[0][0] <= bound:
                    _, _, idx, version = pop(heap)
                    g = guests[idx]
                    if version == g.version and g.alive:
                        tick(g)
                        ticks += 1
                if t_rep > limit:
                    break
                self._report_round(t_rep)
                t_rep = self._next_report = t_rep + self.report_every_s
        finally:
            if ticks:
                self.counters.inc(SimCounter.TICKS, ticks)
        self.clock.set(max(self.clock.now(), end))
        self._enforce_host()
        return end

    def sync(self) -> None:
        """Account every sleeping guest's idle periods up to the clock: each pair then holds
        what a guest ticked every period would (for a look at the pairs, or the end of a
        run)."""
        now = self.clock.now()
        for g in self._guests:
            if g.alive:
                self._catch_up(g, now)

    def check_guest(self, name: str) -> list[str]:
        """``sync``, then a full ``check_pair`` of ``name``'s pair (a run's spot check)."""
        self.sync()
        return check_pair(self._by_name[name].pair)

    def guest_oom_kills(self) -> list[int]:
        """OOM kills inside each guest, in the guests' order."""
        return [g.pair.mem.events.oom_kills for g in self._guests]

    # ------------------------------------------------------------------ reports
    def _report_round(self, t: float) -> None:
        """Every live guest pushes its report of time ``t`` (one loop over the fleet: a
        round's cost is its reports')."""
        stamp = max(self.clock.now(), t)
        rng = self.rng if self.active_samples > 0 else None
        sampled = self.active_samples if rng is not None else 0
        sink, stale, quick = self.on_report, self._stale, self.quick_reports
        n = 0
        for g in self._guests:
            if not g.alive:
                continue
            prev = g.report
            if quick and g.unchanged and prev is not None and t > prev.time_s:
                # a sleeping guest (most of a fleet): nothing ran on it since ``prev``, so
                # no stall either (its model's ``stall_us`` is ``prev``'s), and its sample
                # stands but for the report (``base``): the pair is not read
                touched = g.pair.mem.sample_active(rng, sampled) if rng is not None else 0
                r = g.report = report_unchanged(prev, t, stall_pct=0.0,
                                                active_sampled=sampled, active_touched=touched)
                g.report_time = stamp
                s = g.sample
                if s is not None:
                    g.base = s
                    g.sample = None
                    stale.append(g)
                n += 1
                if sink is not None:
                    sink(g.name, r)
                continue
            # the reference: the report of the guest's state
            p = g.pair
            mem = p.mem
            if prev is not None and t > prev.time_s:
                d_us = max(0, mem.events.stall_us - prev.stall_us)
                stall_pct = 100.0 * d_us / ((t - prev.time_s) * 1e6)
            else:
                stall_pct = p.last_step.stall_pct if p.last_step is not None else 0.0
            touched = mem.sample_active(rng, sampled) if rng is not None else 0
            if g.unchanged and prev is not None:  # a sleeping guest: the same figures
                r = g.report = report_unchanged(prev, t, stall_pct=stall_pct,
                                                active_sampled=sampled, active_touched=touched)
            else:
                r = g.report = guest_report(g.name, t, mem, p.driver, stall_pct=stall_pct,
                                            active_sampled=sampled, active_touched=touched)
                g.unchanged = True
            g.report_time = stamp
            g.base = None
            if g.sample is not None:
                g.sample = None
                stale.append(g)
            n += 1
            if sink is not None:
                sink(g.name, r)
        if n:
            self.counters.inc(SimCounter.REPORTS, n)

    # ------------------------------------------------------------------ the host
    def usage_bytes(self) -> int:
        """What the host takes for itself now."""
        return usage_at(self.host_usage, self.clock.now())

    def probe(self) -> SimHostProbe:
        """A ``HostProbe`` of the simulated host (``host_bytes`` must be set)."""
        if self.host_bytes is None:
            raise UsageError("a host probe needs host_bytes")
        return SimHostProbe(self)

    def _enforce_host(self) -> None:
        if self.host_bytes is None:
            return
        while self._resident + self.usage_bytes() > self.host_bytes:
            victim = host_oom_victim((g.resident, g.name) for g in self._guests if g.alive)
            if victim is None:
                return
            self.kill(victim)
            self.host_oom_kills += 1
            self.counters.inc(SimCounter.HOST_OOM_KILLS)

    def kill(self, name: str) -> None:
        """The guest dies (the host killed it): it never runs again and holds nothing."""
        g = self._by_name[name]
        if not g.alive:
            return
        g.alive = False
        self._resident -= g.resident
        g.resident = 0
        self._stale_sample(g)
        self._schedule(g, math.inf)

    # ------------------------------------------------------------------ the Backend port
    def _stale_sample(self, g: _SimGuest) -> None:
        """``g`` changed: its sample is rebuilt at the next ``guests()``, its report from
        its state at the next report round."""
        g.unchanged = False
        if g.sample is not None:
            g.sample = None
            self._stale.append(g)

    def guests(self) -> dict[str, GuestSample]:
        # only the samples of guests that changed are built again: the rest stand
        out, balloons, residents = self._samples, self._balloon_arr, self._resident_arr
        for g in self._stale:
            b = g.base
            if b is not None and g.unchanged:  # only the report is new: the figures stand
                s = g.sample = guest_sample(
                    b.name, b.ram_pages, b.balloon_pages, b.target_pages, b.settings,
                    g.report, g.report_time, b.alive, g.resident)
                out[g.name] = s
                continue
            p = g.pair
            s = g.sample = guest_sample(
                g.name, p.mem.total_pages, p.device.actual_pages if g.alive else 0,
                p.device.target_pages, g.settings, g.report, g.report_time, g.alive, g.resident)
            out[g.name] = s
            balloons[g.index] = s.balloon_pages
            residents[g.index] = g.resident
        self._stale.clear()
        snap = self._returned = dict(out)  # the caller's own
        return snap

    def changed_rows(self, *, fields: bool = True) -> list[SampleRow | ReportRow]:
        """The guests whose sample changed since the last call, as ``SampleRow``s, or as
        ``ReportRow``s where only the report is new (a shard's answer; instead of
        ``guests()``, never mixed with it); the reports as their fields (to another
        process), or as they are."""
        out: list[SampleRow | ReportRow] = []
        for g in self._stale:
            rep = g.report
            if g.base is not None and g.unchanged and rep is not None:
                out.append((g.index, g.report_time, rep.time_s, rep.stall_pct,
                            rep.active_sampled, rep.active_touched) if fields
                           else (g.index, g.report_time, rep))
                g.sample = _SHIPPED
                g.shipped = rep
                continue
            p = g.pair
            if not fields or rep is None:
                sent: tuple[Any, ...] | PressureReport | None = rep
            elif rep is g.shipped:  # a guest ticked between two report rounds (half of them)
                sent = ()
            else:
                sent = _report_fields(rep)
            out.append((g.index, p.mem.total_pages, p.device.actual_pages if g.alive else 0,
                        p.device.target_pages, sent, g.report_time, g.alive, g.resident))
            g.sample = _SHIPPED  # sent: the next change puts it on the list again
            g.shipped = rep
        self._stale.clear()
        return out

    def sample_figures(
        self, samples: Mapping[str, GuestSample],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
        """The balloon pages (0 for the dead) and resident bytes of ``samples``, by guest in
        the backend's order, when ``samples`` is what ``guests()`` returned last (a runner's
        per-step sums without a walk over the fleet); else None. Read-only views."""
        if samples is not self._returned:
            return None
        return self._balloon_arr, self._resident_arr

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        g = self._by_name.get(guest)
        if g is None or not g.alive or not 0 <= balloon_pages <= g.pair.mem.total_pages:
            self.counters.inc(SimCounter.SET_TARGET_REFUSED)
            return False
        self._wake(g)
        g.pair.set_target(balloon_pages)
        self._stale_sample(g)
        if g.pair.signalled and not g.signalled:
            g.signalled = True
            self._signalled.append(g)
        return True

    def host_resident_bytes(self) -> int:
        return self._resident

    def resident_pages(self) -> int:
        return self._resident // PAGE_SIZE

    # ------------------------------------------------------------------ checks
    def violations(self, *, full: bool = True) -> list[str]:
        """Every broken invariant of every live pair: those seen while running, and with
        ``full`` a full ``check_pair`` of each now."""
        by_guest = self.guest_violations(full=full)
        return [f"{g.name}: {v}" for g, vs in zip(self._guests, by_guest, strict=True)
                for v in vs]

    def guest_violations(self, *, full: bool = True) -> list[list[str]]:
        """``violations`` by guest, in the guests' order, without the names."""
        out: list[list[str]] = []
        for g in self._guests:
            vs = list(g.pair.violations)
            if full and g.alive:
                vs.extend(check_pair(g.pair))
            out.append(vs)
        return out


class SimHost(Protocol):
    """What ``SimHostProbe`` reads of a backend."""

    host_bytes: int | None

    def host_resident_bytes(self) -> int: ...

    def usage_bytes(self) -> int: ...


class SimHostProbe:
    """The simulated host's memory, read as the daemon reads the real one's."""

    def __init__(self, backend: SimHost) -> None:
        self.backend = backend

    def read(self) -> HostMemory:
        b = self.backend
        total = b.host_bytes or 0
        avail = total - b.host_resident_bytes() - b.usage_bytes()
        return HostMemory(total_bytes=total, available_bytes=max(0, avail), psi=None,
                          source="simulated host")


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


__all__ = ["ESX_SAMPLE_PAGES", "REPORT_FIELDS", "ReportRow", "SampleRow", "SimBackend",
           "SimCounter", "SimGuests", "SimHost", "SimHostProbe", "guest_sample",
           "host_oom_victim", "run", "usage_at"]
