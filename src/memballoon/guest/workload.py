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
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class Idle:
    """A guest with a small resident set that barely changes."""

    anon_mib: float = 64
    file_mib: float = 32
    name: str = "idle"

    def demand(self, now: float) -> Demand:
        return _demand(mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), 0.1, 0.0)


@dataclass(frozen=True)
class Steady:
    """A service with a large, steady working set and a busy file cache."""

    anon_mib: float = 256
    file_mib: float = 128
    hot: float = 0.5
    cold_access_per_s: float = 0.01
    name: str = "steady"

    def demand(self, now: float) -> Demand:
        return _demand(
            mib_to_pages(self.anon_mib), mib_to_pages(self.file_mib), self.hot,
            self.cold_access_per_s,
        )


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

    def demand(self, now: float) -> Demand:
        phase = self.phase_s if self.phase_s is not None else random.Random(self.seed).uniform(
            0.0, self.period_s)
        into = (now + phase) % self.period_s
        if into < self.burst_s:
            grown = 1.0 if self.ramp_s <= 0 else min(1.0, (into + 1.0) / self.ramp_s)
            anon = self.base_mib + (self.peak_mib - self.base_mib) * grown
        else:
            anon = self.base_mib
        return _demand(mib_to_pages(anon), mib_to_pages(self.file_mib), 0.8, 0.05)


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

    def demand(self, now: float) -> Demand:
        phase = random.Random(self.seed).uniform(0.0, 2 * math.pi)
        wave = 0.5 * (1 + math.sin(2 * math.pi * now / self.period_s + phase))
        anon = self.low_mib + (self.high_mib - self.low_mib) * wave
        anon = round(anon / self.step_mib) * self.step_mib
        return _demand(mib_to_pages(anon), mib_to_pages(self.file_mib), 0.3, 0.001)


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
