"""The manager's pure heart: one step from what the backend saw to the balloon targets to set.

Theory of operation
-------------------
``ManagerCore.step(now, samples, host_resident_bytes, host)`` gives the backend's samples their
administrator's ``GuestSettings``, works out what the guests may hold (``budget``), asks the
policy, and then distrusts the answer:

1. the policy runs inside ``try``: an exception is counted (``policy_error``), recorded as an
   event, and every guest keeps its target; the next step asks again (oVirt MoM stops entirely
   on one policy error and its balloons never deflate; we never do);
2. a decision for an unknown guest, or with a target that is not a whole number, is dropped and
   counted; the target is clamped again to the guest's floor and ceiling (``clamp_balloon``);
3. a dead guest is never asked for anything; a guest without a recent pressure report is never
   inflated (it may be thrashing and unable to report; deflating it stays allowed);
4. hysteresis: a change smaller than ``min_change`` is ignored, and a change that reverses the
   guest's last direction within ``hold_s`` is refused unless it deflates a guest under
   pressure (ChromeOS concierge blocks opposite requests for 10 to 100 s; peers.md);
5. a guest whose current target breaks its floor/ceiling (settings changed, a manual target) is
   corrected even when the policy says nothing.

The budget: a fixed size (``budget_pages``), or ``None`` for "auto", what the guests hold plus
what the host has available beyond its reserve (``reserve_pages``), read each step by the
engine's ``HostProbe`` (``host``). With both, the smaller holds: memory taken by anything that
is not a guest (a backup job, page cache, a VM not managed here) shrinks what guests may hold,
in the same step. An auto budget without a host reading holds the guests where they are
(``host_memory_missing``).

Manual targets (``set_manual``, the control API's ``set``) pin a guest: the policy's decisions
for it are ignored until ``clear_manual``. The core keeps no clock and does no I/O; ``now`` is
the engine's clock, the same one backends stamp ``report_time`` with.

What must survive a daemon restart (manual targets, each guest's last change) is a versioned
``CoreSnapshot``, its times relative to the moment it was taken.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Final, Literal

from pydantic import Field

from memballoon.manager.port import HostMemory
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.snapshot import Snapshot
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Decision, Policy, clamp_balloon
from memballoon.policy.observe import working_set_pages
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

log = logging.getLogger(__name__)


class ManagerCounter(CounterName):
    """What the manager counts: ``ManagerCore`` and the ``Engine`` around it share one bag (the
    engine's defaults to the core's)."""

    STEPS = "steps"  # core: steps taken
    POLICY_ERROR = "policy_error"  # core: policy calls that raised (every guest held its target)
    POLICY_UNKNOWN_GUEST = "policy_unknown_guest"  # core: decisions for no known guest
    POLICY_BAD_TARGET = "policy_bad_target"  # core: decisions whose target is not a finite number
    POLICY_DUPLICATE = "policy_duplicate"  # core: second decisions for one guest (the last wins)
    CLAMPED = "clamped"  # core: policy targets clamped to the guest's floor and ceiling
    SKIP_INFLATE_NO_REPORT = "skip_inflate_no_report"  # core: inflates refused: no recent report
    SKIP_SMALL_CHANGE = "skip_small_change"  # core: changes under the hysteresis' minimum
    SKIP_REVERSAL = "skip_reversal"  # core: reversals within hold_s (refused)
    CORRECTIONS = "corrections"  # core: targets moved back inside the guest's min/max
    ACTIONS = "actions"  # core: actions decided (policy, correction, manual)
    BACKEND_ERROR = "backend_error"  # engine, AsyncEngine: rounds lost to a failed backend
    SET_TARGET_ERROR = "set_target_error"  # engine: set_target calls that raised
    SET_TARGET_FAILED = "set_target_failed"  # engine: targets not applied (refused or raised)
    DECISIONS_POLICY = "decisions_policy"  # engine: policy targets applied
    DECISIONS_MANUAL = "decisions_manual"  # engine: manual targets applied
    DECISIONS_CORRECTION = "decisions_correction"  # engine: corrections applied
    DECISIONS_SHUTDOWN = "decisions_shutdown"  # engine: shutdown deflations applied
    # engine: balloons not deflated in time at shutdown
    SHUTDOWN_DEFLATE_INCOMPLETE = "shutdown_deflate_incomplete"
    HOST_MEMORY_ERROR = "host_memory_error"  # engine: host memory reads that failed
    HOST_MEMORY_MISSING = "host_memory_missing"  # core: auto-budget steps with no host reading
    # core: samples whose balloon or target lay outside the guest's RAM (a lying guest or a
    # broken backend), clamped into it so only that guest's figures are wrong
    SAMPLE_OUT_OF_RANGE = "sample_out_of_range"
    MANUAL_REFUSED = "manual_refused"  # core: manual sizes under the guest's safety floor


#: Where an ``Action`` comes from.
ActionKind = Literal["policy", "manual", "correction", "shutdown"]
#: The ``decisions_<kind>`` counter of an applied action of each kind.
DECISIONS: Final[Mapping[ActionKind, ManagerCounter]] = {
    "policy": ManagerCounter.DECISIONS_POLICY,
    "manual": ManagerCounter.DECISIONS_MANUAL,
    "correction": ManagerCounter.DECISIONS_CORRECTION,
    "shutdown": ManagerCounter.DECISIONS_SHUTDOWN,
}

#: A manual size keeps at least the guest's working set plus this (``safety_floor``).
MANUAL_MARGIN_PAGES: Final = 64 * 256  # 64 MiB
#: ... and without a report to read its working set from, at least this.
MANUAL_MIN_PAGES: Final = 64 * 256  # 64 MiB

#: The settings of a guest the administrator said nothing about.
NO_SETTINGS: Final = GuestSettings()

#: Defaults of the hysteresis (see ``Hysteresis``).
MIN_CHANGE_PAGES: Final = 256  # 1 MiB: below this a change is noise
MIN_CHANGE_FRACTION: Final = 0.0025  # MoM ignores changes under 0.25% of the guest (peers.md)
HOLD_S: Final = 10.0  # ChromeOS blocks opposite requests for 10 to 100 s; we take the low end
REPORT_MAX_AGE_S: Final = 10.0  # no report for this long: never inflate the guest
PRESSURE_STALL_PCT: Final = 5.0  # PSI "some" above this over a period: the guest is pressed
PRESSURE_AVAILABLE_FRACTION: Final = 0.05  # or MemAvailable under 5% of its RAM


@dataclass(frozen=True, slots=True)
class Hysteresis:
    min_change_pages: int = MIN_CHANGE_PAGES
    min_change_fraction: float = MIN_CHANGE_FRACTION
    hold_s: float = HOLD_S
    report_max_age_s: float = REPORT_MAX_AGE_S
    pressure_stall_pct: float = PRESSURE_STALL_PCT
    pressure_available_fraction: float = PRESSURE_AVAILABLE_FRACTION

    def __post_init__(self) -> None:
        if self.min_change_pages < 0 or not 0.0 <= self.min_change_fraction < 1.0:
            raise UsageError("min_change must be >= 0 (fraction below 1)")
        if self.hold_s < 0 or self.report_max_age_s <= 0:
            raise UsageError("hold_s must be >= 0 and report_max_age_s > 0")


@dataclass(frozen=True, slots=True)
class Action:
    """One balloon target to set, with everything the journal records about why."""

    guest: str
    old_pages: int
    new_pages: int
    reason: str
    inputs: Mapping[str, float] = field(default_factory=dict)
    kind: ActionKind = "policy"

    @property
    def delta_pages(self) -> int:
        return self.new_pages - self.old_pages

    def record(self) -> dict[str, object]:
        return {
            "kind": self.kind, "guest": self.guest,
            "old_pages": self.old_pages, "new_pages": self.new_pages,
            "old_bytes": self.old_pages * PAGE_SIZE, "new_bytes": self.new_pages * PAGE_SIZE,
            "reason": self.reason, "inputs": dict(self.inputs),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """Something the journal should keep that is not a target change (a policy error)."""

    kind: str
    detail: str
    guest: str | None = None


def under_pressure(s: GuestSample, h: Hysteresis, prev: PressureReport | None = None) -> bool:
    """Stall (PSI) over the threshold, MemAvailable nearly gone, or, since ``prev``, new major
    faults, swap-ins, refused balloon pages or OOM kills: any of them means the guest is short."""
    r = s.report
    if r is None:
        return False
    low_avail = r.available_bytes < h.pressure_available_fraction * s.ram_pages * PAGE_SIZE
    if r.stall_pct >= h.pressure_stall_pct or low_avail:
        return True
    if prev is None or prev is r:
        return False
    return (r.major_faults > prev.major_faults or r.swap_in_pages > prev.swap_in_pages
            or r.oom_kills > prev.oom_kills
            or (r.refused_pages or 0) > (prev.refused_pages or 0))


class ManagerCore:
    """Policy in, safe actions out (module docstring)."""

    def __init__(
        self,
        policy: Policy,
        settings: Mapping[str, GuestSettings],
        budget_pages: int | None,
        *,
        reserve_pages: int = 0,
        hysteresis: Hysteresis | None = None,
        enforced: bool = False,
        counters: Counters | None = None,
    ) -> None:
        if budget_pages is not None and budget_pages <= 0:
            raise UsageError(f"budget_pages must be positive, got {budget_pages}")
        if reserve_pages < 0:
            raise UsageError(f"reserve_pages must be >= 0, got {reserve_pages}")
        self.reserve_pages = reserve_pages
        self.policy = policy
        self.settings: dict[str, GuestSettings] = dict(settings)
        self.budget_pages = budget_pages
        self.hysteresis = hysteresis or Hysteresis()
        self.enforced = enforced
        self.counters = counters if counters is not None else Counters()
        self.manual: dict[str, int] = {}
        self.events: list[Event] = []
        self._last_dir: dict[str, Literal[-1, 1]] = {}
        self._last_change: dict[str, float] = {}
        self.last_samples: dict[str, GuestSample] = {}
        self.last_host: HostSample | None = None  # the policy's view of the host, last step
        self._prev_report: dict[str, PressureReport] = {}  # the report before the latest
        self._cur_report: dict[str, PressureReport] = {}
        # the guests whose target is outside their floor/ceiling, last step (corrected when
        # the policy says nothing)
        self._out_of_limits: set[str] = set()
        # each guest's sample as the backend gave it last step, as ``_samples`` made it, the
        # settings it was made under and whether it was outside its limits
        self._last_seen: dict[str, tuple[GuestSample, GuestSample, GuestSettings, bool]] = {}

    # ------------------------------------------------------------------ views
    def sample(self, s: GuestSample) -> GuestSample:
        """``s`` with its administrator's settings (the backend does not know them), its
        balloon and target clamped into its RAM (counted): a guest that reports a balloon
        of 0xFFFFFFFF pages must not make the host look over budget by as much."""
        want = self.settings.get(s.name, NO_SETTINGS)
        ram, bal, tgt = s.ram_pages, s.balloon_pages, s.target_pages
        if not (0 <= bal <= ram and 0 <= tgt <= ram):  # else all in range: nothing to clamp
            ram = max(0, ram)
            bal = min(max(0, bal), ram)
            tgt = min(max(0, tgt), ram)
            if (bal, tgt, ram) != (s.balloon_pages, s.target_pages, s.ram_pages):
                self.counters.inc(ManagerCounter.SAMPLE_OUT_OF_RANGE)
                return replace(s, ram_pages=ram, balloon_pages=bal, target_pages=tgt,
                                  settings=want)
        return s if s.settings is want or s.settings == want else replace(s, settings=want)

    def drain_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev

    # ------------------------------------------------------------------ the step
    def host_sample(self, host_resident_bytes: int, host: HostMemory | None) -> HostSample:
        """The policy's view of the host: the guests' memory, the budget in force, and the
        host's own figures where they were read (module docstring)."""
        resident = max(0, host_resident_bytes) // PAGE_SIZE
        if host is None:
            if self.budget_pages is None:
                self.counters.inc(ManagerCounter.HOST_MEMORY_MISSING)
            budget = self.budget_pages if self.budget_pages is not None else resident
            return HostSample(budget_pages=max(1, budget), resident_pages=resident,
                              enforced=self.enforced)
        avail = max(0, host.available_bytes) // PAGE_SIZE
        room = resident + avail - self.reserve_pages
        budget = room if self.budget_pages is None else min(self.budget_pages, room)
        psi = host.psi
        return HostSample(
            budget_pages=max(1, budget), resident_pages=resident, enforced=self.enforced,
            total_pages=max(0, host.total_bytes) // PAGE_SIZE, available_pages=avail,
            reserve_pages=self.reserve_pages,
            psi_some_avg10=None if psi is None else psi.some_avg10,
            psi_full_avg10=None if psi is None else psi.full_avg10,
        )

    def step(
        self, now: float, guests: Mapping[str, GuestSample], host_resident_bytes: int,
        host: HostMemory | None = None,
    ) -> list[Action]:
        self.counters.inc(ManagerCounter.STEPS)
        samples = self._samples(guests)
        self.last_samples = samples
        self.last_host = self.host_sample(host_resident_bytes, host)
        decisions = self._decide(self.last_host, samples, now)
        actions: list[Action] = []
        manual, out_of_limits = self.manual, self._out_of_limits
        # a guest neither decided for, pinned, nor outside its limits gets no action: only
        # those are looked at (in the guests' order, the order of the actions)
        look = out_of_limits.union(decisions, manual)
        if not look:
            return actions
        for name, s in samples.items():
            if name not in look or not s.alive:
                continue
            if name in manual:
                want = clamp_balloon(s, self.manual[name])
                if want != s.target_pages:  # the backend lost it (restart): ask again
                    actions.append(Action(name, s.target_pages, want, "manual target", {},
                                          "manual"))
                continue
            d = decisions.get(name)
            a = self._vet(now, s, d) if d is not None else None
            if a is None and name in out_of_limits:
                fixed = clamp_balloon(s, s.target_pages)
                a = Action(name, s.target_pages, fixed, "target outside the guest's min/max",
                           {"floor_pages": s.floor_pages(), "ceiling_pages": s.ceiling_pages()},
                           "correction")
                self.counters.inc(ManagerCounter.CORRECTIONS)
            if a is not None:
                self._note(now, a)
                actions.append(a)
        return actions

    def _samples(self, guests: Mapping[str, GuestSample]) -> dict[str, GuestSample]:
        """``sample`` of each of ``guests``, their reports noted (the latest and the one
        before), and ``_out_of_limits`` set to the guests whose target is outside their
        floor/ceiling (one loop over the fleet, its common case written out)."""
        settings_get = self.settings.get
        cur, prev = self._cur_report, self._prev_report
        out_of_limits: set[str] = set()
        samples: dict[str, GuestSample] = {}
        # a backend that keeps a guest's sample object while nothing of it changed (the
        # simulator's) hands most of them over again: the same object under the same settings
        # gives the same sample, limits and reports as last step
        last_get = self._last_seen.get
        seen: dict[str, tuple[GuestSample, GuestSample, GuestSettings, bool]] = {}
        for name, s in guests.items():
            want = settings_get(s.name, NO_SETTINGS)
            last = last_get(name)
            if last is not None and last[0] is s and last[2] is want:
                samples[name] = last[1]
                seen[name] = last
                if last[3]:
                    out_of_limits.add(name)
                continue
            given = s
            ram, tgt = s.ram_pages, s.target_pages
            in_range = 0 <= s.balloon_pages <= ram and 0 <= tgt <= ram
            if s.settings is not want or not in_range:
                s = self.sample(s)  # settings to give, or figures to clamp: the general case
                ram, tgt = s.ram_pages, s.target_pages
            samples[name] = s
            # ``clamp_balloon(s, tgt) != tgt`` written out, with ``want`` (equal to s.settings);
            # without a min or max the target, in the RAM now, is within them
            mx, mn = want.max_pages, want.min_pages
            if mx is not None or mn:
                lo = 0 if mx is None or mx >= ram else ram - mx
                hi = ram - (mn if mn < ram else ram)
                b = hi if tgt > hi else tgt
                if (lo if b < lo else b) != tgt:
                    out_of_limits.add(name)
            if in_range:  # (figures clamped are counted each time they come)
                seen[name] = (given, s, want, name in out_of_limits)
            r = s.report
            if r is not None:
                old = cur.get(name)  # never None once there
                if old is not r:
                    if old is not None:
                        prev[name] = old
                    cur[name] = r
        self._out_of_limits = out_of_limits
        self._last_seen = seen
        return samples

    def _decide(
        self, host: HostSample, samples: Mapping[str, GuestSample], now: float
    ) -> dict[str, Decision]:
        try:
            raw = self.policy.decide(host, list(samples.values()), now)
            decisions = list(raw)
        except Exception as exc:  # any bug in a policy: count it, hold every target, go on
            self.counters.inc(ManagerCounter.POLICY_ERROR)
            detail = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("policy %s failed, every guest holds its target: %s",
                        self.policy.name, detail)
            self.events.append(Event("policy_error", detail))
            return {}
        out: dict[str, Decision] = {}
        for d in decisions:
            if not isinstance(d, Decision) or d.guest not in samples:
                self.counters.inc(ManagerCounter.POLICY_UNKNOWN_GUEST)
                continue
            bp = d.balloon_pages
            if isinstance(bp, bool) or not isinstance(bp, int):
                if isinstance(bp, float) and math.isfinite(bp):
                    bp = int(bp)
                else:
                    self.counters.inc(ManagerCounter.POLICY_BAD_TARGET)
                    continue
                d = Decision(d.guest, bp, d.reason, d.inputs)
            if d.guest in out:
                self.counters.inc(ManagerCounter.POLICY_DUPLICATE)
            out[d.guest] = d
        return out

    def _vet(self, now: float, s: GuestSample, d: Decision) -> Action | None:
        h = self.hysteresis
        want = clamp_balloon(s, d.balloon_pages)
        if want != d.balloon_pages:
            self.counters.inc(ManagerCounter.CLAMPED)
        cur = s.target_pages
        delta = want - cur
        if delta == 0:
            return None
        forced = clamp_balloon(s, cur) != cur  # the current target breaks a limit: must move
        if delta > 0 and not forced:
            age = s.report_age_s(now)
            if s.report is None or age is None or age > h.report_max_age_s:
                self.counters.inc(ManagerCounter.SKIP_INFLATE_NO_REPORT)
                return None
        if not forced:
            small = max(h.min_change_pages, int(h.min_change_fraction * s.ram_pages))
            if abs(delta) < small:
                self.counters.inc(ManagerCounter.SKIP_SMALL_CHANGE)
                return None
            last = self._last_dir.get(s.name, 0)
            recent = now - self._last_change.get(s.name, -math.inf) < h.hold_s
            direction = 1 if delta > 0 else -1
            if last and direction != last and recent and not d.urgent and not (
                direction < 0 and under_pressure(s, h, self._prev_report.get(s.name))
            ):
                self.counters.inc(ManagerCounter.SKIP_REVERSAL)
                return None
        inputs: dict[str, float] = {k: float(v) for k, v in d.inputs.items()}
        if want != d.balloon_pages:
            inputs["policy_pages"] = float(d.balloon_pages)
        return Action(s.name, cur, want, d.reason, inputs, "correction" if forced else "policy")

    def _note(self, now: float, a: Action) -> None:
        if a.delta_pages:
            self._last_dir[a.guest] = 1 if a.delta_pages > 0 else -1
            self._last_change[a.guest] = now
        self.counters.inc(ManagerCounter.ACTIONS)

    # ------------------------------------------------------------------ manual targets
    def safety_floor(self, s: GuestSample) -> tuple[int, str]:
        """The least a guest may be set to by hand, and why: its min, and its working set in
        its last report plus ``MANUAL_MARGIN_PAGES`` (without a report, at least
        ``MANUAL_MIN_PAGES``). Seed 003: administrators over-shrink their guests and kill them,
        "sometimes due to bad UI - entering the wrong units"."""
        floor, why = s.floor_pages(), f"its min of {s.floor_pages()} pages"
        r = s.report
        if r is None:
            least = min(s.ram_pages, MANUAL_MIN_PAGES)
            if least > floor:
                floor, why = least, (f"no pressure report from it yet: at least {least} pages")
        else:
            ws = working_set_pages(s, r, self.counters)
            if ws + MANUAL_MARGIN_PAGES > floor:
                floor = ws + MANUAL_MARGIN_PAGES
                why = (f"its working set of {ws} pages (its size less MemAvailable in its last "
                       f"report) plus a margin of {MANUAL_MARGIN_PAGES} pages")
        return min(floor, s.ram_pages), why

    def set_manual(self, now: float, st: GuestSample, balloon_pages: int, *,
                   force: bool = False) -> Action:
        """Pin ``st``'s balloon (clamped to its limits); the policy leaves it alone. A size
        under the guest's safety floor is refused (ConfigError saying the floor and why)
        unless ``force``."""
        s = self.sample(st)
        floor, why = self.safety_floor(s)
        size = s.ram_pages - balloon_pages
        if size < floor and not force:
            self.counters.inc(ManagerCounter.MANUAL_REFUSED)
            raise ConfigError(f"guest {s.name}: a size of {size} pages ({size * PAGE_SIZE} "
                              f"bytes) is under its safety floor of {floor} pages "
                              f"({floor * PAGE_SIZE} bytes): {why}; --force sets it anyway")
        want = clamp_balloon(s, balloon_pages)
        self.manual[st.name] = want
        reason = "manual target" if want == balloon_pages else (
            f"manual target {balloon_pages} pages clamped to the guest's min/max")
        a = Action(st.name, st.target_pages, want, reason,
                   {"requested_pages": float(balloon_pages)}, "manual")
        self._note(now, a)
        return a

    def clear_manual(self, guest: str) -> bool:
        return self.manual.pop(guest, None) is not None

    def shutdown_actions(self, guests: Mapping[str, GuestSample]) -> list[Action]:
        """Deflate every live guest to its ceiling (its max size): the safe state to leave."""
        out = []
        for name, st in guests.items():
            if not st.alive:
                continue
            s = self.sample(st)
            want = s.ram_pages - s.ceiling_pages()
            if want != st.target_pages or st.balloon_pages != want:
                out.append(Action(name, st.target_pages, want,
                                  "shutdown: deflate to the guest's max size", {}, "shutdown"))
        return out


    # ------------------------------------------------------------------ snapshot
    def snapshot(self, now: float) -> CoreSnapshot:
        """What a restarted daemon needs to go on where this core stopped."""
        return CoreSnapshot(
            manual=dict(self.manual),
            last_direction=dict(self._last_dir),
            last_change_age_s={g: max(0.0, now - t) for g, t in self._last_change.items()},
        )

    def restore(self, snap: CoreSnapshot, now: float) -> None:
        """Take up ``snap`` (taken by ``snapshot``) on this core's clock at ``now``."""
        self.manual = dict(snap.manual)
        self._last_dir = dict(snap.last_direction)
        self._last_change = {g: now - age for g, age in snap.last_change_age_s.items()}


class CoreSnapshot(Snapshot):
    """``ManagerCore`` state that survives a restart (version 1). Times are ages in seconds
    at the moment the snapshot was taken, never readings of a monotonic clock (a new process,
    or a rebooted host, has another origin)."""

    version: Literal[1] = 1
    manual: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    last_direction: dict[str, Literal[-1, 1]] = Field(default_factory=dict)
    last_change_age_s: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict)


__all__ = ["Action", "CoreSnapshot", "Event", "Hysteresis", "ManagerCore", "under_pressure"]
