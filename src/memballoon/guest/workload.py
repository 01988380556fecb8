"""Workloads: what the programs in a guest ask of its memory, as a function of time.

A workload is pure: ``demand(now)`` answers the same for the same ``now`` and the seed it was
built with. The guest model turns demand into page allocations, reclaim, swap and faults.

``Demand`` fields, all in 4 KiB pages:
- ``anon_pages``: the anonymous working set (heap, stacks) the programs hold;
- ``hot_anon_pages``: the part of it touched every second (a swapped-out hot page refaults
  at once);
- ``file_pages``: the file data the programs read (what the page cache would like to hold);
- ``hot_file_pages``: the part of it read every second;
- ``cold_access_per_s``: the fraction of the cold (not hot) working set touched a second.

Every workload here also says when its demand next changes (``next_change(now)``: a time from
which on it may differ; until then it holds), so a simulator can let a guest whose workload
holds sleep until then instead of stepping it every period.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.units import mib_to_pages


@dataclass(frozen=True, slots=True)
class Demand:
    anon_pages: int
    hot_anon_pages: int
    file_pages: int
    hot_file_pages: int
    cold_access_per_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("anon_pages", "hot_anon_pages", "file_pages", "hot_file_pages"):
            if getattr(self, name) < 0:
                raise UsageError(f"Demand.{name} must be >= 0")
        if self.hot_anon_pages > self.anon_pages or self.hot_file_pages > self.file_pages:
            raise UsageError("hot part larger than the working set")
        if not 0.0 <= self.cold_access_per_s <= 1.0:
            raise UsageError("cold_access_per_s must be within [0, 1]")


class Workload(Protocol):
    @property
    def name(self) -> str: ...

    def demand(self, now: float) -> Demand: ...


#: ``next_change`` of a workload whose demand never changes again.
NEVER_CHANGES = math.inf


@runtime_checkable
class Timed(Protocol):
    """A workload that knows when its demand next changes."""

    def next_change(self, now: float) -> float:
        """A time ``t >= now`` such that ``demand`` is the same at every moment of ``[now, t)``
        (``now``: it may change at any moment; ``NEVER_CHANGES``: never)."""
        ...


def next_change(w: Workload, now: float) -> float:
    """When ``w``'s demand may next change: its own answer, or ``now`` (at any moment) for a
    workload that does not say."""
    # what ``isinstance(w, Timed)`` tests (a ``next_change`` that is not None), without the
    # runtime protocol check's cost
    fn = getattr(w, "next_change", None)
    if fn is None:
        return now
    t: float = fn(now)
    return t


@functools.lru_cache(maxsize=4096)
def _demand(anon: int, file: int, hot: float, cold: float) -> Demand:
    # cached: steady workloads hand back the same object, which the guest model's quiet
    # check compares first
    return Demand(
        anon_pages=anon,
        hot_anon_pages=int(anon * hot),
        file_pages=file,
        hot_file_pages=int(file * hot),
        cold_access_per_s=cold,
    )


@functools.lru_cache(maxsize=4096)
def _demand_mib(anon_mib: float, file_mib: float, hot: float, cold: float) -> Demand:
    """``_demand`` of sizes in MiB: one cached call for a workload asked every period."""
    return _demand(mib_to_pages(anon_mib), mib_to_pages(file_mib), hot, cold)


@dataclass(frozen=True)
class Idle:
    """A guest with a small resident set that barely changes."""

    anon_mib: float = 64
    file_mib: float = 32
    name: str = "idle"
    # its one demand, built once: a guest model asks for it twice a period
    _fixed: Demand = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fixed", _demand(
            mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), 0.1, 0.0))

    def demand(self, now: float) -> Demand:
        return self._fixed

    def next_change(self, now: float) -> float:
        return NEVER_CHANGES


@dataclass(frozen=True)
class Steady:
    """A service with a large, steady working set and a busy file cache."""

    anon_mib: float = 256
    file_mib: float = 128
    hot: float = 0.5
    cold_access_per_s: float = 0.01
    name: str = "steady"
    # its one demand, built once: a busy guest model asks for it twice a period
    _fixed: Demand = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fixed", _demand(
            mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), self.hot,
            self.cold_access_per_s))

    def demand(self, now: float) -> Demand:
        return self._fixed

    def next_change(self, now: float) -> float:
        return NEVER_CHANGES


@dataclass(frozen=True)
class Bursty:
    """A base working set with bursts to a peak every ``period_s`` for ``burst_s`` seconds.

    The phase is drawn from ``seed`` so that many bursty guests do not burst together.
    """

    base_mib: float = 64
    peak_mib: float = 384
    file_mib: float = 32
    period_s: float = 20.0
    burst_s: float = 8.0
    ramp_s: float = 3.0  # a burst grows to its peak over this long, as programs allocate
    seed: int = 0
    name: str = "bursty"
    phase_s: float | None = None  # None: drawn from ``seed``

    @functools.cached_property
    def _phase(self) -> float:
        # drawn once: a Random per demand() call cost more than the rest of it
        return self.phase_s if self.phase_s is not None else random.Random(self.seed).uniform(
            0.0, self.period_s)

    def demand(self, now: float) -> Demand:
        into = (now + self._phase) % self.period_s
        if into < self.burst_s:
            grown = 1.0 if self.ramp_s <= 0 else min(1.0, (into + 1.0) / self.ramp_s)
            anon = self.base_mib + (self.peak_mib - self.base_mib) * grown
        else:
            anon = self.base_mib
        return _demand(mib_to_pages(anon), mib_to_pages(self.file_mib), 0.8, 0.05)

    def next_change(self, now: float) -> float:
        into = (now + self._phase) % self.period_s
        if into < self.burst_s:
            if self.ramp_s > 0 and into + 1.0 < self.ramp_s:
                return now  # growing toward the peak
            return now + (self.burst_s - into)
        return now + (self.period_s - into)


@dataclass(frozen=True)
class Ramp:
    """A memory hog: grows from ``start_mib`` by ``mib_per_s`` up to ``peak_mib``, then holds."""

    start_mib: float = 64
    peak_mib: float = 768
    mib_per_s: float = 32
    file_mib: float = 16
    start_at_s: float = 0.0
    name: str = "ramp"
    stop_at_s: float | None = None  # a batch job: back to ``start_mib`` from then on

    def demand(self, now: float) -> Demand:
        if self.stop_at_s is not None and now >= self.stop_at_s:
            return _demand(mib_to_pages(self.start_mib), mib_to_pages(self.file_mib), 0.9, 0.05)
        grown = max(0.0, now - self.start_at_s) * self.mib_per_s
        anon = min(self.peak_mib, self.start_mib + grown)
        return _demand(mib_to_pages(anon), mib_to_pages(self.file_mib), 0.9, 0.05)

    def next_change(self, now: float) -> float:
        stop = NEVER_CHANGES if self.stop_at_s is None else self.stop_at_s
        if now >= stop:
            return NEVER_CHANGES
        if now < self.start_at_s:
            return min(self.start_at_s, stop)
        if self.start_mib + (now - self.start_at_s) * self.mib_per_s < self.peak_mib:
            return now  # growing
        return stop


@dataclass(frozen=True)
class Diurnal:
    """A working set that follows a smooth daily-like wave (period ``period_s``)."""

    low_mib: float = 64
    high_mib: float = 256
    file_mib: float = 64
    period_s: float = 3600.0
    seed: int = 0
    step_mib: float = 8.0  # demand moves in steps so an idle hour is not a change a second
    name: str = "diurnal"

    @functools.cached_property
    def _phase(self) -> float:
        return random.Random(self.seed).uniform(0.0, 2 * math.pi)

    def _level(self, now: float) -> int:
        """The wave at ``now`` in steps of ``step_mib``."""
        wave = 0.5 * (1 + math.sin(2 * math.pi * now / self.period_s + self._phase))
        return round((self.low_mib + (self.high_mib - self.low_mib) * wave) / self.step_mib)

    def demand(self, now: float) -> Demand:
        return _demand_mib(self._level(now) * self.step_mib, self.file_mib, 0.3, 0.001)

    def next_change(self, now: float) -> float:
        amp = self.high_mib - self.low_mib
        if amp <= 0:
            return NEVER_CHANGES
        level = self._level(now)
        omega = 2 * math.pi / self.period_s
        theta = omega * now + self._phase
        best = NEVER_CHANGES
        # the level changes where the wave crosses half a step below or above it
        for edge in ((level - 0.5) * self.step_mib, (level + 0.5) * self.step_mib):
            s = 2 * (edge - self.low_mib) / amp - 1
            if not -1.0 <= s <= 1.0:
                continue
            base = math.asin(s)
            for root in (base, math.pi - base):
                turns = math.floor((theta - root) / (2 * math.pi)) + 1
                best = min(best, now + (root + 2 * math.pi * turns - theta) / omega)
        # a hair early: waking a moment before the change costs a look, waking after misses it
        return max(now, best - 1e-6 * self.period_s)


#: Overdriver's finding (Williams et al., VEE 2011): most memory overloads of cloud VMs are
#: short, under two minutes. ``Bursts`` draws spike lengths from a log-normal distribution with
#: this median and shape: P(length < 120 s) = 86%.
BURST_MEDIAN_S = 40.0
BURST_SIGMA = 1.0


@dataclass(frozen=True)
class Bursts:
    """Short spikes of anonymous memory over a base, at random (the ``burst`` scenario).

    Spikes start as a Poisson process, ``every_s`` apart on average (counted from the end of
    the previous one); each lasts a log-normal time (``median_s``, ``sigma``: most under two
    minutes) and adds between a quarter of ``spike_mib`` and all of it, growing to that over
    its first ``ramp_s`` (programs allocate at a rate, not all at once). The schedule is drawn
    from ``seed`` as far as it has been asked for: the same seed, the same spikes.
    """

    base_mib: float = 128
    spike_mib: float = 512
    file_mib: float = 64
    every_s: float = 600.0
    median_s: float = BURST_MEDIAN_S
    sigma: float = BURST_SIGMA
    seed: int = 0
    ramp_s: float = 10.0
    name: str = "bursts"
    # the spikes drawn so far, (start, end, extra MiB); starts ascending, spikes apart
    _spikes: list[tuple[float, float, float]] = field(
        default_factory=list, init=False, repr=False, compare=False)
    _starts: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.every_s <= 0 or self.median_s <= 0 or self.sigma < 0 or self.ramp_s < 0:
            raise UsageError("Bursts: every_s and median_s must be > 0, sigma and ramp_s >= 0")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def _draw_until(self, now: float) -> None:
        rng = self._rng
        while not self._spikes or self._spikes[-1][0] <= now:
            after = self._spikes[-1][1] if self._spikes else 0.0
            start = after + rng.expovariate(1.0 / self.every_s)
            length = rng.lognormvariate(math.log(self.median_s), self.sigma)
            extra = self.spike_mib * rng.uniform(0.25, 1.0)
            self._spikes.append((start, start + length, extra))
            self._starts.append(start)

    def _at(self, now: float) -> tuple[int, tuple[float, float, float] | None]:
        """The index of the first spike starting after ``now``, and the spike ``now`` is in."""
        self._draw_until(now)
        i = bisect.bisect_right(self._starts, now)
        spike = self._spikes[i - 1] if i > 0 and now < self._spikes[i - 1][1] else None
        return i, spike

    def demand(self, now: float) -> Demand:
        _, spike = self._at(now)
        extra = 0.0
        if spike is not None:
            grown = 1.0 if self.ramp_s <= 0 else min(1.0, (now - spike[0] + 1.0) / self.ramp_s)
            extra = spike[2] * grown
        return _demand_mib(self.base_mib + extra, self.file_mib, 0.8, 0.05)

    def next_change(self, now: float) -> float:
        i, spike = self._at(now)
        if spike is None:
            return self._spikes[i][0]
        if self.ramp_s > 0 and now - spike[0] + 1.0 < self.ramp_s:
            return now  # growing toward its height
        return spike[1]


@dataclass(frozen=True)
class Dbench:
    """A file server under a dbench-like load: a small anonymous footprint and a large file
    set read and rewritten while clients run (``run_s``), left alone between runs
    (``pause_s``): the page cache is what it needs, and an idle cache is what a balloon can
    take until the next run reads it back."""

    anon_mib: float = 64
    file_mib: float = 512
    run_s: float = 300.0
    pause_s: float = 120.0
    hot: float = 0.6
    phase_s: float = 0.0
    name: str = "dbench"

    def __post_init__(self) -> None:
        if self.run_s <= 0 or self.pause_s < 0 or not 0.0 <= self.hot <= 1.0:
            raise UsageError("Dbench: run_s must be > 0, pause_s >= 0, hot within [0, 1]")

    def demand(self, now: float) -> Demand:
        into = (now + self.phase_s) % (self.run_s + self.pause_s)
        if into < self.run_s:
            return _demand(mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), self.hot,
                           0.05)
        return _demand(mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), 0.0, 0.0)

    def next_change(self, now: float) -> float:
        cycle = self.run_s + self.pause_s
        into = (now + self.phase_s) % cycle
        return now + (self.run_s - into if into < self.run_s else cycle - into)


@dataclass(frozen=True)
class Toucher:
    """Touches ``low_mib`` and then ``high_mib`` of anonymous memory in turn, ``period_s``
    each, every page of it every second: the working-set step of Waldspurger (OSDI 2002,
    section 5.3) that an active-memory estimate must follow up fast and down slowly."""

    low_mib: float = 50
    high_mib: float = 250
    period_s: float = 300.0
    file_mib: float = 8
    name: str = "toucher"

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise UsageError("Toucher: period_s must be > 0")

    def demand(self, now: float) -> Demand:
        anon = self.high_mib if int(now // self.period_s) % 2 else self.low_mib
        return _demand_mib(anon, self.file_mib, 1.0, 0.0)

    def next_change(self, now: float) -> float:
        return (math.floor(now / self.period_s) + 1) * self.period_s


@dataclass(frozen=True)
class Trace:
    """A recorded demand: ``rows`` of (seconds, anonymous MiB, page-cache MiB), each holding
    from its time until the next row's (the first row's also before it)."""

    rows: tuple[tuple[float, float, float], ...]
    hot: float = 0.5
    cold_access_per_s: float = 0.01
    name: str = "trace"
    _times: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise UsageError("Trace: no rows")
        times = tuple(r[0] for r in self.rows)
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise UsageError("Trace: times must increase from row to row")
        if any(v < 0 or not math.isfinite(v) for r in self.rows for v in r):
            raise UsageError("Trace: values must be finite and >= 0")
        object.__setattr__(self, "_times", times)

    def demand(self, now: float) -> Demand:
        i = max(0, bisect.bisect_right(self._times, now) - 1)
        _, anon, cache = self.rows[i]
        return _demand(mib_to_pages(anon), mib_to_pages(cache), self.hot, self.cold_access_per_s)

    def next_change(self, now: float) -> float:
        i = bisect.bisect_right(self._times, now)
        return self._times[i] if i < len(self._times) else NEVER_CHANGES


WORKLOADS = ("idle", "steady", "bursty", "ramp", "diurnal")


#: Parameters a workload spec may give (``"bursty:peak=0.8,period=40"``): sizes are fractions
#: of the guest's RAM, times are seconds, ``rate`` is a fraction of the RAM a second.
SPEC_PARAMS = {
    "idle": ("anon", "file"),
    "steady": ("anon", "file", "hot"),
    "bursty": ("base", "peak", "file", "period", "burst", "phase"),
    "ramp": ("start", "peak", "rate", "file", "at", "stop"),
    "diurnal": ("low", "high", "file", "period"),
}


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"kind"`` or ``"kind:key=value,..."`` -> (kind, params); ConfigError names what is wrong."""
    kind, _, rest = spec.partition(":")
    if kind not in WORKLOADS:
        raise ConfigError(f"unknown workload {kind!r}; choose one of {', '.join(WORKLOADS)}")
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or key not in SPEC_PARAMS[kind]:
            raise ConfigError(f"workload {kind}: unknown parameter {key!r} "
                              f"(use {', '.join(SPEC_PARAMS[kind])})")
        try:
            v = float(val)
        except ValueError:
            raise ConfigError(f"workload {kind}: {key}={val!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"workload {kind}: {key}={val!r} must be >= 0")
        params[key] = v
    return kind, params


def make_workload(kind: str, guest_mib: float, seed: int = 0) -> Workload:
    """A workload of ``kind`` scaled to a guest of ``guest_mib`` MiB; ``kind`` may carry
    parameters (``parse_spec``), each defaulting to the plain kind's value."""
    kind, p = parse_spec(kind)
    m = guest_mib
    match kind:
        case "idle":
            return Idle(anon_mib=m * p.get("anon", 0.08), file_mib=m * p.get("file", 0.04))
        case "steady":
            return Steady(anon_mib=m * p.get("anon", 0.45), file_mib=m * p.get("file", 0.2),
                          hot=p.get("hot", 0.5))
        case "bursty":
            return Bursty(
                base_mib=m * p.get("base", 0.1), peak_mib=m * p.get("peak", 0.7),
                file_mib=m * p.get("file", 0.05), period_s=p.get("period", 20.0),
                burst_s=p.get("burst", 6.0), seed=seed, phase_s=p.get("phase"),
            )
        case "ramp":
            return Ramp(start_mib=m * p.get("start", 0.1), peak_mib=m * p.get("peak", 0.85),
                        mib_per_s=m * p.get("rate", 1 / 32), file_mib=m * p.get("file", 0.02),
                        start_at_s=p.get("at", 0.0), stop_at_s=p.get("stop"))
        case _:
            return Diurnal(low_mib=m * p.get("low", 0.05), high_mib=m * p.get("high", 0.3),
                           file_mib=m * p.get("file", 0.05), period_s=p.get("period", 3600.0),
                           seed=seed)
