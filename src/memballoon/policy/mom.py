"""``mom``: oVirt MoM's auto-balloon rules, as MoM decides them.

Sources: oVirt MoM ``doc/balloon.rules`` (``rules="balloon.rules"``, the default) and vdsm
``static/etc/vdsm/mom.d/02-balloon.policy`` with ``balloonEnabled`` = 1, as vdsm sets it when a
cluster turns ballooning on (``rules="vdsm"``). ``tests/data/peer-cases/`` records what MoM's
own evaluator decided over both files; ``tests/test_peer_cases.py`` replays every case here.
MoM speaks of a guest's *memory* (``balloon_cur``: what the guest keeps, our ``size_pages``;
``balloon_max``: our ceiling; ``balloon_min``: our ``min_pages``), not of the balloon; this
module does the same and converts to a balloon at the end.

Each call (MoM: policy every 10 s over stats collected every 5 s):

- ``host_free_percent`` = average host free / host memory: MemAvailable / MemTotal where the
  world reads the host (``HostSample.available_pages``/``total_pages``; MoM's ``mem_free`` /
  ``mem_available``), else (budget - resident) / budget;
- ``guest_free_percent``: at most ``pressure_critical``, host free - 5% (negative: the guest is
  pushed to swap), else ``min_guest_free_percent`` scaled by host free / ``pressure_threshold``;
- used = average size - average MemFree (``StatAvg`` over the last ``stat_samples`` samples);
- under ``pressure_threshold`` every guest shrinks (``shrink_guest``): the new size is
  ``max(balloon_min, used + guest_free_percent * cur)``, but no less than
  ``cur * (1 - max_balloon_change_percent)``; it is set only when no larger than ``cur``;
- otherwise every ballooned guest grows (``grow_guest``): to ``cur * (1 +
  max_balloon_change_percent)``, at least ``max(balloon_min, used + min_guest_free_percent *
  cur)`` (vdsm: ``guest_free_percent`` in place of ``min_guest_free_percent``), at most its max;
- a change no larger than ``min_balloon_change_percent`` of ``cur`` is not made
  (``change_big_enough``);
- vdsm only, after the above: a guest under its ``balloon_min`` is set to it (its "minimum
  guaranteed memory" rule), with or without stats.

Both use the *current* size for the free share (MoM since 2013), not the guest's max, and the
minimum inside the rule: a guest under its minimum is not shrunk further, but not raised to it
either under pressure (``balloon.rules``); vdsm's rule raises it.

MoM's own comments admit it ignores over-ballooning symptoms (faults, swap): so does this.
A guest without a fresh report is skipped (MoM has no stats for it; vdsm's ``valid`` check).
No deliberate difference is kept in the decision: a guest's ``max_pages``, where set below its
RAM, stands for ``balloon_max``, and the manager core holds every policy's decisions to the
guests' floors and ceilings.

Between calls it keeps the ``StatAvg`` windows (host free, each guest's size and MemFree): its
``MomSnapshot`` holds them (samples, no times).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final, Literal, get_args

from pydantic import Field

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.policy.base import Decision, Pages, PolicySnapshot, clamp_balloon, own_snapshot
from memballoon.policy.observe import free_pages, fresh_report
from memballoon.policy.sample import GuestSample, HostSample

# doc/balloon.rules, vdsm mom.d/02-balloon.policy
MOM_PRESSURE_THRESHOLD: Final = 0.20  # host free below this share: pressure
MOM_PRESSURE_CRITICAL: Final = 0.05  # and at most this: critical
MOM_MIN_GUEST_FREE_PERCENT: Final = 0.20  # free share an unconstrained guest keeps
MOM_MAX_BALLOON_CHANGE_PERCENT: Final = 0.05  # most a guest's memory changes per step
MOM_MIN_BALLOON_CHANGE_PERCENT: Final = 0.0025  # smaller changes are not worth making
MOM_CRITICAL_GUEST_FREE_OFFSET: Final = -0.05  # critical: guest free goal = host free - 5%
#: MoM's StatAvg window: the last 10 samples.
MOM_STAT_SAMPLES: Final = 10
#: A report older than this is no sample at all (MoM: 2 collection periods of 5 s).
MOM_MAX_REPORT_AGE_S: Final = 10.0

#: The rule files: MoM's own, or vdsm's (growth aims at the scaled free share; a guest under
#: its minimum is set to it).
MomRules = Literal["balloon.rules", "vdsm"]
MOM_RULES: Final[tuple[str, ...]] = get_args(MomRules)


class MomCounter(CounterName):
    """What the mom policy counts (besides the report inconsistencies of ``observe``)."""

    NO_REPORT = "mom_no_report"  # guests skipped in a call: no fresh report (MoM: no stats)


class MomSnapshot(PolicySnapshot):
    """``MomPolicy`` state that survives a restart: its ``StatAvg`` windows, oldest first."""

    policy: Literal["mom"] = "mom"
    # host free samples: MemAvailable, or budget - resident (negative while the guests hold
    # more than the budget) where the host is not read
    host_free: tuple[int, ...] = ()
    guests: dict[str, tuple[tuple[Pages, Pages], ...]] = Field(default_factory=dict)  # (size, free)


class MomPolicy:
    """oVirt MoM's balloon rules (see the module docstring)."""

    def __init__(
        self,
        *,
        rules: str = "balloon.rules",
        pressure_threshold: float = MOM_PRESSURE_THRESHOLD,
        pressure_critical: float = MOM_PRESSURE_CRITICAL,
        min_guest_free_percent: float = MOM_MIN_GUEST_FREE_PERCENT,
        max_balloon_change_percent: float = MOM_MAX_BALLOON_CHANGE_PERCENT,
        min_balloon_change_percent: float = MOM_MIN_BALLOON_CHANGE_PERCENT,
        stat_samples: int = MOM_STAT_SAMPLES,
        max_report_age_s: float = MOM_MAX_REPORT_AGE_S,
    ) -> None:
        if rules not in MOM_RULES:
            raise ConfigError(f"mom: rules must be one of {', '.join(MOM_RULES)}, not {rules!r}")
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
        self.rules = rules
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

    def _host_free_percent(self, host: HostSample) -> float:
        """MoM's ``host_free_percent``: ``StatAvg("mem_free") / mem_available``."""
        if host.total_pages and host.available_pages is not None:  # 0: not read
            free, total = host.available_pages, host.total_pages
        else:  # a world that does not read the host: the guests' budget stands for it
            free, total = host.budget_pages - host.resident_pages, host.budget_pages
        self._host_free.append(free)
        return sum(self._host_free) / len(self._host_free) / max(1, total)

    def _guest_free_percent(self, host_free: float) -> float:
        if host_free <= self.pressure_critical:
            return MOM_CRITICAL_GUEST_FREE_OFFSET + host_free
        return self.min_guest_free_percent * (host_free / self.pressure_threshold)

    def _avg_used(self, g: GuestSample, free: int) -> float:
        hist = self._guest.setdefault(g.name, deque(maxlen=self.stat_samples))
        hist.append((g.size_pages, free))
        return sum(s for s, _ in hist) / len(hist) - sum(f for _, f in hist) / len(hist)

    def _big_enough(self, cur: int, new: float) -> bool:
        return abs(new - cur) > self.min_balloon_change_percent * cur

    def _rule(self, g: GuestSample, used: float, host_free: float, pressure: bool,
              inputs: dict[str, float]) -> tuple[str, float] | None:
        """(rule, new size) where MoM sets a target, else None; notes the free goal."""
        cur, lo, mx = g.size_pages, g.settings.min_pages, g.ceiling_pages()
        goal = self._guest_free_percent(host_free)
        if pressure:
            rule = ("critical host pressure" if host_free <= self.pressure_critical
                    else "host pressure")
            inputs["guest_free_goal"] = goal
            # balloon_min inside the rule: a guest under it is not shrunk, nor raised
            size = max(cur * (1.0 - self.max_balloon_change_percent),
                       max(float(lo), used + goal * cur))
            return (rule, size) if size <= cur and self._big_enough(cur, size) else None
        if cur >= mx:  # only a ballooned guest grows
            return None
        if self.rules == "balloon.rules":
            goal = self.min_guest_free_percent
        inputs["guest_free_goal"] = goal
        # the free share of the current size, not of the max (MoM since 2013)
        size = min(max(cur * (1.0 + self.max_balloon_change_percent),
                       max(float(lo), used + goal * cur)), float(mx))
        return ("no host pressure: grow", size) if self._big_enough(cur, size) else None

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        host_free = self._host_free_percent(host)
        pressure = host_free < self.pressure_threshold
        seen = {g.name for g in guests}
        for gone in set(self._guest) - seen:
            del self._guest[gone]
        out: list[Decision] = []
        for g in guests:
            cur, lo = g.size_pages, g.settings.min_pages
            inputs = {"host_free_percent": host_free, "cur_pages": float(cur),
                      "max_pages": float(g.ceiling_pages()), "min_pages": float(lo)}
            verdict: tuple[str, float] | None = None
            r = fresh_report(g, self.max_report_age_s, now)
            if r is None:
                self.counters.inc(MomCounter.NO_REPORT)
            else:
                used = self._avg_used(g, free_pages(g, r, self.counters))
                inputs["used_pages"] = used
                verdict = self._rule(g, used, host_free, pressure, inputs)
            # vdsm's "minimum guaranteed memory" rule runs after, stats or not, and wins
            if self.rules == "vdsm" and cur < lo:
                verdict = ("minimum guaranteed memory", float(lo))
            if verdict is None:
                continue
            rule, size = verdict
            balloon = clamp_balloon(g, g.ram_pages - int(size))  # MoM: whole KiB targets
            if balloon == g.target_pages:
                continue
            inputs["new_size_pages"] = float(g.ram_pages - balloon)
            out.append(Decision(
                g.name, balloon,
                f"mom: {rule} (host free {host_free:.1%}): guest size {cur} -> "
                f"{g.ram_pages - balloon} pages", inputs))
        return out
