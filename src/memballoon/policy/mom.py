"""``mom``: oVirt MoM's default auto-balloon rules.

Source: oVirt MoM ``doc/balloon.rules`` and vdsm ``mom.d/02-balloon.policy`` (the
"Auto-Balloon" section). MoM speaks of a guest's *memory* (``balloon_cur``: what the guest
keeps, our ``size_pages``; ``balloon_max``: our ceiling), not of the balloon; this module does
the same and converts to a balloon at the end.

Each call (MoM: policy every 10 s over stats collected every 5 s):

- ``host_free_percent`` = average host free / host memory, host free = budget - resident;
- under ``pressure_threshold`` every guest shrinks: its free-memory goal is
  ``min_guest_free_percent`` scaled by host free / ``pressure_threshold``, or, when host free is
  at most ``pressure_critical``, host free - 5% (negative: the guest is pushed to swap); the
  new size is ``used + goal * cur`` but never less than ``cur * (1 - max_balloon_change_percent)``
  and never more than ``cur``;
- otherwise every ballooned guest grows by ``max_balloon_change_percent`` of its size (at least
  to ``used + min_guest_free_percent * max``), capped at its max;
- a change no larger than ``min_balloon_change_percent`` of the current size is not made;
- used = average size - average MemFree (``StatAvg`` over the last ``stat_samples`` samples).

MoM's own comments admit it ignores over-ballooning symptoms (faults, swap): so does this.
A guest without a report is skipped (MoM has no stats for it). ``balloon_min`` is the guest's
``min_pages`` floor (``clamp_balloon``).

Between calls it keeps the ``StatAvg`` windows (host free, each guest's size and MemFree): its
``MomSnapshot`` holds them (samples, no times).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final, Literal

from pydantic import Field

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.policy.base import Decision, Pages, PolicySnapshot, clamp_balloon, own_snapshot
from memballoon.policy.observe import free_pages, fresh_report
from memballoon.policy.sample import GuestSample, HostSample

# doc/balloon.rules, vdsm mom.d/02-balloon.policy
MOM_PRESSURE_THRESHOLD: Final = 0.20  # host free below this share: pressure
MOM_PRESSURE_CRITICAL: Final = 0.05  # and below this: critical
MOM_MIN_GUEST_FREE_PERCENT: Final = 0.20  # free share an unconstrained guest keeps
MOM_MAX_BALLOON_CHANGE_PERCENT: Final = 0.05  # most a guest's memory changes per step
MOM_MIN_BALLOON_CHANGE_PERCENT: Final = 0.0025  # smaller changes are not worth making
MOM_CRITICAL_GUEST_FREE_OFFSET: Final = -0.05  # critical: guest free goal = host free - 5%
#: MoM's StatAvg window: the last 10 samples.
MOM_STAT_SAMPLES: Final = 10
#: A report older than this is no sample at all (MoM: 2 collection periods of 5 s).
MOM_MAX_REPORT_AGE_S: Final = 10.0


class MomCounter(CounterName):
    """What the mom policy counts (besides the report inconsistencies of ``observe``)."""

    NO_REPORT = "mom_no_report"  # guests skipped in a call: no fresh report (MoM: no stats)


class MomSnapshot(PolicySnapshot):
    """``MomPolicy`` state that survives a restart: its ``StatAvg`` windows, oldest first."""

    policy: Literal["mom"] = "mom"
    # budget - resident: negative while the guests hold more than the budget
    host_free: tuple[int, ...] = ()
    guests: dict[str, tuple[tuple[Pages, Pages], ...]] = Field(default_factory=dict)  # (size, free)


class MomPolicy:
    """oVirt MoM's balloon rules (see the module docstring)."""

    def __init__(
        self,
        *,
        pressure_threshold: float = MOM_PRESSURE_THRESHOLD,
        pressure_critical: float = MOM_PRESSURE_CRITICAL,
        min_guest_free_percent: float = MOM_MIN_GUEST_FREE_PERCENT,
        max_balloon_change_percent: float = MOM_MAX_BALLOON_CHANGE_PERCENT,
        min_balloon_change_percent: float = MOM_MIN_BALLOON_CHANGE_PERCENT,
        stat_samples: int = MOM_STAT_SAMPLES,
        max_report_age_s: float = MOM_MAX_REPORT_AGE_S,
    ) -> None:
        if not 0.0 <= pressure_critical <= pressure_threshold <= 1.0:
            raise ConfigError("mom: need 0 <= pressure_critical <= pressure_threshold <= 1")
        if pressure_threshold <= 0.0:
            raise ConfigError("mom: pressure_threshold must be > 0")
        if not 0.0 <= min_guest_free_percent <= 1.0:
            raise ConfigError("mom: min_guest_free_percent must be within [0, 1]")
        if not 0.0 < max_balloon_change_percent <= 1.0:
            raise ConfigError("mom: max_balloon_change_percent must be within (0, 1]")
        if not 0.0 <= min_balloon_change_percent < max_balloon_change_percent:
            raise ConfigError("mom: min_balloon_change_percent must be below the max change")
        if stat_samples < 1:
            raise ConfigError("mom: stat_samples must be >= 1")
        self.pressure_threshold = pressure_threshold
        self.pressure_critical = pressure_critical
        self.min_guest_free_percent = min_guest_free_percent
        self.max_balloon_change_percent = max_balloon_change_percent
        self.min_balloon_change_percent = min_balloon_change_percent
        self.stat_samples = stat_samples
        self.max_report_age_s = max_report_age_s
        self.counters = Counters()
        self._host_free: deque[int] = deque(maxlen=stat_samples)
        self._guest: dict[str, deque[tuple[int, int]]] = {}  # name -> (size, free) samples

    @property
    def name(self) -> str:
        return "mom"

    def snapshot(self, now: float) -> MomSnapshot:
        return MomSnapshot(host_free=tuple(self._host_free),
                           guests={n: tuple(h) for n, h in self._guest.items()})

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        """Take up ``snap``; a window longer than this policy's ``stat_samples`` keeps its
        newest samples."""
        own = own_snapshot(snap, MomSnapshot, self.name)
        self._host_free = deque(own.host_free, maxlen=self.stat_samples)
        self._guest = {n: deque(h, maxlen=self.stat_samples) for n, h in own.guests.items()}

    def _avg_used(self, g: GuestSample, free: int) -> float:
        hist = self._guest.setdefault(g.name, deque(maxlen=self.stat_samples))
        hist.append((g.size_pages, free))
        return sum(s for s, _ in hist) / len(hist) - sum(f for _, f in hist) / len(hist)

    def _big_enough(self, cur: int, new: float) -> bool:
        return abs(new - cur) > self.min_balloon_change_percent * cur

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        budget = max(1, host.budget_pages)
        self._host_free.append(host.budget_pages - host.resident_pages)
        host_free = sum(self._host_free) / len(self._host_free) / budget
        pressure = host_free < self.pressure_threshold
        seen = {g.name for g in guests}
        for gone in set(self._guest) - seen:
            del self._guest[gone]
        out: list[Decision] = []
        for g in guests:
            r = fresh_report(g, self.max_report_age_s, now)
            if r is None:
                self.counters.inc(MomCounter.NO_REPORT)
                continue
            used = self._avg_used(g, free_pages(g, r, self.counters))
            cur = g.size_pages
            mx = g.ceiling_pages()
            inputs = {"host_free_percent": host_free, "used_pages": used,
                      "cur_pages": float(cur), "max_pages": float(mx)}
            if pressure:
                if host_free <= self.pressure_critical:
                    free_goal = MOM_CRITICAL_GUEST_FREE_OFFSET + host_free
                    rule = "critical host pressure"
                else:
                    free_goal = self.min_guest_free_percent * host_free / self.pressure_threshold
                    rule = "host pressure"
                ideal = used + free_goal * cur
                size = max(cur * (1.0 - self.max_balloon_change_percent), ideal)
                if size > cur or not self._big_enough(cur, size):
                    continue
            else:
                if cur >= mx:
                    continue
                rule = "no host pressure: grow"
                free_goal = self.min_guest_free_percent
                ideal = used + free_goal * mx
                size = min(cur * (1.0 + self.max_balloon_change_percent), mx)
                size = max(size, ideal)
                if not self._big_enough(cur, size):
                    continue
            balloon = clamp_balloon(g, g.ram_pages - int(size))
            if balloon == g.target_pages:
                continue
            inputs["guest_free_goal"] = free_goal
            inputs["new_size_pages"] = float(g.ram_pages - balloon)
            out.append(Decision(
                g.name, balloon,
                f"mom: {rule} (host free {host_free:.1%}): guest size {cur} -> "
                f"{g.ram_pages - balloon} pages", inputs))
        return out
