"""``default``: memballoon's own policy, driven by what the guest says it feels.

Theory of operation
-------------------
MoM and Proxmox size guests from host free memory and guest MemFree alone; their users'
complaint is guests ballooned to death (seed 003: "administrators often over-shrink their
domains and kill them ... is there some way to get the vm subsystem to provide backpressure").
This policy reads the guest's backpressure from its ``PressureReport`` each call: PSI-like
``stall_pct``, the swap-in and major-fault rates, the oom-kill count, refused pages, and whether
its balloon reaches the target. Per guest, the first of these rules that applies decides
(each a ``Rule`` in ``RULES``: when it applies, what it decides, the reason it journals; all
read one ``Figures`` record computed once a call):

1. **blind**: no report, or one older than ``max_report_age_s``: never inflate; an inflation in
   progress stops where it is (target := actual).
2. **emergency**: MemAvailable under the small margin (``EMERGENCY_MARGIN_PAGES``, half the
   budget's ``BUDGET_MARGIN_PAGES``, plus ``LOOKAHEAD_S`` of the working set's recent growth),
   or an OOM kill since last time: deflate at once by what restores the full margin (so a
   ramping guest gets ahead of its ramp); while the host is short itself, only to the budget's
   margin (an OOM kill still gets the whole balloon back).
3. **own_pressure**: the trouble of rule 7 in a guest with no balloon and no target: hold (the
   pressure is the guest's own; remembering it as a size that hurt would stop probing).
4. **reclaiming**: the trouble of rule 7 while the balloon grew since the last call, with no
   major fault and no swap-in since the last report and MemAvailable above the margin: hold.
   The stall is the guest reclaiming cache nobody reads to hand the balloon its pages (PSI
   counts that direct reclaim too); a workload that missed what the balloon took would refault
   it. Backing off would give a paused file server its cold cache back, and remember its size.
5. **room**: the trouble of rule 7 (no swap-in since the last report) in a guest that holds
   idle free memory (MemFree, not MemAvailable, less what an inflation in progress will still
   take) beyond its margin by at least the back-off rule 7 would give, its balloon not above
   its target: hold. More memory cannot relieve a stall the guest has room to absorb: its
   kernel reclaims nothing while MemFree is that high, so the stall is the guest refaulting,
   at its workload's own pace, page cache an earlier probe evicted (PSI counts those refaults
   as stall) or PSI's average still carrying an old stall; deflating does not speed that up
   (session 7's fleet: a steady web server backed off call after call to an empty balloon,
   and every probe after evicted its cache again). A swap-in (anonymous memory gone), an OOM
   kill or MemAvailable under the small margin (rule 2) and a balloon still deflating toward
   a lower target (the memory is not there yet) go to rule 7. Nothing is remembered as a size
   that hurt: probing waits for the guest to be quiet again, as after any trouble.
6. **reread**: the trouble of rule 7 in the report the last call read (reports every 2 s,
   calls every second): hold. That call ruled on the same evidence already, and its back-off
   is not in the report yet; a second back-off on it doubled every one (and, the report's
   counters against themselves showing no refault, forgot that the guest was refaulting).
7. **trouble**: stall above ``STALL_TROUBLE_PCT`` or swap-ins above ``SWAPIN_TROUBLE_PER_S``:
   back off at once (senpai): deflate by a back-off that grows with the pressure, halve the
   probe step, and remember the size that hurt (no probing below it for ``PRESSURE_MEMORY_S``;
   when the guest was refaulting, for ``REFAULTING_MEMORY_S`` while it still refaults (it is
   still reading back what the probe took: a probe would evict the same pages again) but only
   until it has gone ``REFAULT_MEMORY_S`` without a major fault or swap-in: it reads nothing
   back any more, so what it re-read then is cold now (an idle guest's nightly job, a file
   server's run, has ended); the back-offs while a probe's refaults tail off remember sizes up
   to the guest's whole RAM, which would otherwise stand for all that time). A probe that
   hurts again (this rule: not an emergency's burst), once the size was forgotten, at about
   the size the last probe hurt at (within the margin), shows it was forgotten too soon (a
   steady web server's cache refilled, its refaults stopped, and the next probe evicted it
   again): that size is remembered twice as long as the last, refaults or not, up to
   ``HURT_MEMORY_MAX_S`` (exponential back-off); a first hurt, a size far from the last, or
   one ``HURT_AGAIN_WITHIN_S`` after the last's memory ran out starts over, and the working
   set shrinking a margin below it forgets size and back-off.
8. **stalled** inflation: the target is above the balloon and the balloon has not grown for
   ``STUCK_AFTER_S`` under that target, or the guest refused pages: lower the target to the
   actual balloon (give the guest back the rest), halve the probe step.
9. **under_floor**: the guest keeps less than its safety floor (the recent peak working set
   plus margin): grow it back to the floor and a band (``BAND_FRACTION`` of its RAM) above it;
   a deficit under ``MIN_CHANGE_PAGES`` is the working set's noise: to the floor only.
10. **probe**: quiet (stall under ``STALL_QUIET_PCT``, no swap-in, few major faults), the
   balloon at its target and the guest two bands above its floor: probe down by the step (by
   half the MemFree beyond the margin when that is more than twice the margin: idle memory;
   not MemAvailable, whose page cache may be hot: a big step into it evicts what the guest
   reads), never below the floor. The band is hysteresis: a working set that moves every
   second (a diurnal demand) is followed in steps of a band, growth and probe no longer
   alternating by a few MiB every few seconds. Only on a new report (libvirt's come every
   2 s, the daemon decides every second): one the last call read shows nothing of that
   call's probe, so it allows only a big step into the MemFree idle still once the balloon's
   growth since the report is taken off. The step grows by ``PROBE_STEP_INC`` each quiet
   probe up to ``PROBE_STEP_MAX`` and halves on trouble down to ``PROBE_STEP_MIN`` (the seed
   vmw_balloon's adaptive rates, VMW_BALLOON_RATE_ALLOC_MIN/MAX/INC, are the model: slow
   growth while things go well, halving on failure).
11. **hold**: otherwise.

The safety floor is ``max(settings.min_pages, peak working set over WS_WINDOW_S + margin, the
size that last hurt)``; the working set is the guest's size minus MemAvailable (what it cannot
give without reclaiming). A policy decision never goes under ``settings.min_pages``.

Then the host: when the guests would together hold more than the budget (resident plus the
planned growth), the excess is reclaimed at once, first from the guests with the least pressure
and the most idle memory above their floors; if that is not enough, growth back to floors is
cut (emergency and back-off deflations stay: a guest's life comes first). When there is room,
guests under pressure get it first (their deflations are planned before anything else). While
the host itself is short (under its reserve, or its PSI high) no guest grows back: one under its
floor holds, and gives like the others down to its budget floor (working set plus
``BUDGET_MARGIN_PAGES``); an emergency deflates only to that margin.

Pure: state between calls (probe steps, working-set history, last counters) lives in this
object, one ``GuestMemo`` per guest; ``now`` is the manager's clock. What must survive a daemon
restart is its ``DefaultSnapshot``, moments stored as ages at the snapshot's ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import itemgetter
from typing import TYPE_CHECKING, Annotated, Final, Literal

from pydantic import Field

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.model.snapshot import SnapshotPart
from memballoon.model.units import mib_to_pages
from memballoon.policy.base import (
    Decision,
    Pages,
    PolicySnapshot,
    Seconds,
    clamp_balloon,
    own_snapshot,
)
from memballoon.policy.observe import (
    PolicyReportCounter,
    available_pages,
    counter_delta,
    free_pages,
    fresh_report,
    working_set_pages,
)
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.protocol.pressure import PressureReport

if TYPE_CHECKING:
    from memballoon.policy.default_batch import BatchMemo

# Probe step, as a share of the guest's RAM per decision (after vmw_balloon's adaptive rates).
PROBE_STEP_START: Final = 0.02
PROBE_STEP_MIN: Final = 0.005
PROBE_STEP_MAX: Final = 0.08
PROBE_STEP_INC: Final = 0.005
# Pressure (PSI "some" share of the last period). senpai's target is 10 ms per 6 s (0.17%).
STALL_QUIET_PCT: Final = 0.2  # probe only below this
STALL_TROUBLE_PCT: Final = 1.0  # back off above this
SWAPIN_TROUBLE_PER_S: Final = 64.0  # pages a second swapped back in: the balloon took too much
MAJOR_FAULTS_QUIET_PER_S: Final = 64.0  # more refaults than this a second: hold, do not probe
# Back-off: at least this share of RAM (or twice the probe step), times the pressure over the
# trouble threshold, capped at BACKOFF_MAX_SCALE times (senpai: back-off coefficient 20 vs 10).
BACKOFF_MIN_FRACTION: Final = 0.02
BACKOFF_MAX_SCALE: Final = 4.0
# Headroom the guest keeps available: a share of its RAM, at least MARGIN_MIN_PAGES, plus the
# working set's growth over LOOKAHEAD_S at its recent rate.
MARGIN_FRACTION: Final = 0.10
MARGIN_MIN_PAGES: Final = mib_to_pages(32)
LOOKAHEAD_S: Final = 10.0
LOOKAHEAD_MAX_FRACTION: Final = 0.25  # the lookahead never asks for more than this of RAM
# A guest seen quiet for more than this many calls in a row may be probed by half its idle free
# memory at once, at most BIG_STEP_MAX_FRACTION of its RAM a call (a new guest never is).
QUIET_CALLS_BEFORE_BIG_STEP: Final = 3
BIG_STEP_MAX_FRACTION: Final = 0.25
# When the host is over its budget, guests are held to their current working set plus this
# smaller margin (and the growth lookahead), not to their recent peak: memory a finished burst
# left free is the first the host takes back.
BUDGET_MARGIN_PAGES: Final = mib_to_pages(8)
# MemAvailable under this (plus the lookahead) is an emergency: half the budget's margin, so a
# guest the budget squeezed to its working set plus BUDGET_MARGIN_PAGES is not deflated again
# by the next report's noise (it was, on a real host: a reversal while the host was short).
EMERGENCY_MARGIN_PAGES: Final = BUDGET_MARGIN_PAGES // 2
# The working-set peak is taken over this window: memory a finished burst freed is reclaimed
# about this long after it (a longer window keeps burst-sized memory idle on the host; the next
# burst is met by the emergency deflation and, for virtio, deflate-on-OOM).
WS_WINDOW_S: Final = 5.0
PRESSURE_MEMORY_S: Final = 300.0  # no probing below a size that hurt for this long
# ... unless it hurt by refaults (major faults, swap-ins) and the guest has had none for this
# long since: it reads nothing back any more, so what it re-read then is cold now (an idle
# guest's nightly job or a file server's run has ended), and a probe may find it out
REFAULT_MEMORY_S: Final = 30.0
# ... and while it still refaults, for this long: it is still reading back what the probe took,
# and a probe after PRESSURE_MEMORY_S would evict the same pages again (the fleet's steady web
# servers refill an evicted cache at their cold-read rate for ~15 min: probed every 5 min, they
# never stopped refaulting); a guest that always reads is probed again after this
REFAULTING_MEMORY_S: Final = 4 * PRESSURE_MEMORY_S
# A size that hurts again, by a probe after it was forgotten, at about the size that hurt last
# (within the guest's margin), was forgotten too soon: it is remembered twice as long as the
# last time (at least twice PRESSURE_MEMORY_S, or REFAULTING_MEMORY_S when it hurt by refaults),
# whatever the refaults do, up to this (TCP's and senpai's exponential back-off; the seed's
# adaptive rates halve on failure). Two hours: a steady guest whose every probe evicts a cache
# it reads back for ~15 min is probed a few times a day, not four times an hour, and a guest
# whose workload changed is found out within a couple of hours (the fleet's hour: its web
# servers stop being re-probed after their second or third hurt)
HURT_MEMORY_MAX_S: Final = 7200.0
# ... and a hurt this long after the last one's memory ran out is a first again (a quiet spell:
# what hurt then says little now); the working set moving away (shrinking by more than a
# margin below the size that hurt's) forgets the size and its back-off at once
HURT_AGAIN_WITHIN_S: Final = HURT_MEMORY_MAX_S
MAX_REPORT_AGE_S: Final = 10.0  # an older report is no report (never inflate a blind guest)
MIN_CHANGE_PAGES: Final = mib_to_pages(1)  # smaller probes and growths are not worth a change
# A guest grown back to its floor gets this share of its RAM above it, and a probe waits for
# twice it above the floor: a working set that moves every second (a diurnal demand) is
# followed in steps of a band, not of MIN_CHANGE_PAGES (in the fleet a batch guest was moved
# every ~14 s by a few MiB). Measured on a fleet slice: a band of 0.5% of RAM halved the batch
# guests' target changes, 1% halved them again, each for 0.2-0.3% of the memory released
BAND_FRACTION: Final = 0.01
# An inflation is stalled once its balloon has not grown for this long under the same target:
# one period of the daemon's; a short host's early steps come every 0.2 s, and a balloon that
# did not move in 0.2 s (a slow guest, libvirt's 2 s stats) is not yet stuck.
STUCK_AFTER_S: Final = 1.0
# The host's own pressure (PSI "some" avg10 of host memory, in percent): at or above this the
# host is short even with memory available; each call then reclaims this share of the host's
# memory from the guests, and no guest grows (senpai's 10% is a workload's ceiling; a host
# whose tasks stall a tenth of the time on memory needs memory back).
HOST_PSI_SOME_PCT: Final = 10.0
HOST_PSI_RECLAIM_FRACTION: Final = 0.01
NEVER: Final = float("-inf")  # the moment of something that never happened


class Verdict(Enum):
    BLIND = "blind"
    EMERGENCY = "emergency"
    ROOM = "room"
    TROUBLE = "trouble"
    STALLED = "stalled"
    UNDER_FLOOR = "under_floor"
    PROBE = "probe"
    HOLD = "hold"


#: Verdicts whose deflation is never cut for the host budget.
URGENT: Final = frozenset({Verdict.EMERGENCY, Verdict.TROUBLE})
#: Verdicts whose change under ``MIN_CHANGE_PAGES`` is not made.
SMALL_SKIPS: Final = frozenset({Verdict.PROBE, Verdict.HOLD, Verdict.ROOM,
                                Verdict.UNDER_FLOOR})


class DefaultCounter(CounterName):
    """What the default policy counts (besides the report inconsistencies of ``observe``)."""

    BLIND = "default_blind"  # guests seen without a fresh report (one per guest per call)
    # guests under pressure with no balloon at all: held, the pressure not remembered
    PRESSURE_WITHOUT_BALLOON = "default_pressure_without_balloon"
    # guests under pressure with idle free memory beyond margin and back-off: held, not deflated
    TROUBLE_WITH_ROOM = "default_trouble_with_room"


# ---------------------------------------------------------------------- memory between calls
@dataclass(frozen=True, slots=True)
class ReportCounts:
    """The figures of a guest's last report that the next one's rates are computed from."""

    time_s: float  # the guest's clock (survives our restart: not an age)
    swap_in_pages: int
    major_faults: int
    oom_kills: int
    refused_pages: int | None


@dataclass(slots=True)
class GuestMemo:
    """What the policy remembers about one guest between calls (its times on the caller's
    clock; ``-inf``: never)."""

    step: float = PROBE_STEP_START  # probe step, share of RAM
    ws: deque[tuple[float, int]] = field(default_factory=deque)  # (now, working set pages)
    # the last fresh report, kept whole (its counts are what the next report's rates are
    # computed from; a report is immutable, and ``last is report`` tells a report the last call
    # read already), or a restored snapshot's counts; None: rates start over
    last: PressureReport | ReportCounts | None = None
    last_now: float | None = None  # when it was read
    last_balloon: int | None = None
    # since when the balloon has not grown under the same target; an inflation is stuck only
    # after STUCK_AFTER_S of that
    still_since: float = NEVER
    last_target: int | None = None  # the target at the last call
    hurt_size: int = 0  # the size at which the guest last hurt (plus the back-off)
    hurt_at: float = NEVER  # when (remembered for PRESSURE_MEMORY_S)
    hurt_ws: int = 0  # its working set then
    oom_at: float = NEVER  # the last OOM kill: for a while its shrunk working set is the kill's
    hurt_refaulted: bool = False  # the guest refaulted when it last hurt
    faulted_at: float = NEVER  # its last major fault or swap-in
    quiet_calls: int = 0  # probes in a row without trouble (a new guest starts at 0)
    # how long the size that hurt is remembered (0: PRESSURE_MEMORY_S, or REFAULTING_MEMORY_S
    # with REFAULT_MEMORY_S's early forgetting; else this, doubled each time it hurts again)
    hurt_hold_s: float = 0.0
    hurt_mark: int = 0  # the size the last probe hurt at (kept once forgotten; 0: none)

    def see_working_set(self, ws: int, now: float, dt: float) -> tuple[float, int]:
        """Record ``ws`` at ``now``: its growth rate (pages/s, never negative) since the last
        call's, over ``dt`` (the seconds the reports are apart: a report that arrives just
        after a call, as under the early steps of a short host, spans its own interval, not
        the calls') and its peak over ``WS_WINDOW_S``."""
        growth = 0.0
        hist = self.ws
        if hist and dt > 0:
            growth = (ws - hist[-1][1]) / dt
            if growth < 0.0:
                growth = 0.0
        hist.append((now, ws))
        oldest = now - WS_WINDOW_S
        while hist and hist[0][0] < oldest:
            hist.popleft()
        return growth, max(map(_second, hist))

    def remember(self, f: Figures, ruling: Ruling) -> None:
        """Carry out what ``ruling`` asks this memory to keep."""
        if ruling.hurt is not None:
            if not self.hurt_size:  # a first hurt since the last was forgotten
                # (an emergency or a stalled inflation starts the back-off over: the
                # workload's burst or a guest's refusal, not a probe going too far)
                probed = ruling.probed
                self.hurt_hold_s = self.hold_after(f, ruling.hurt) if probed else 0.0
                self.hurt_mark = ruling.hurt if probed else 0
            # no probing back below where it hurt for a while (the seed's adaptive rate: the
            # step halves on failure)
            self.step = max(PROBE_STEP_MIN, self.step / 2)
            self.hurt_size, self.hurt_at, self.hurt_ws = ruling.hurt, f.now, f.ws
            self.hurt_refaulted = ruling.refaulted
        if ruling.oom:
            self.oom_at = f.now
        if ruling.quiet:
            self.quiet_calls += 1
            self.step = min(PROBE_STEP_MAX, self.step + PROBE_STEP_INC)

    def hold_after(self, f: Figures, hurt: int) -> float:
        """How long ``hurt`` is remembered, a probe's hurting while nothing is (it went below
        a size forgotten): twice as long as the last size that hurt, if about that size
        (within the margin) and not long after its memory ran out, else the base rules'
        (0)."""
        held = self.hurt_hold_s or (REFAULTING_MEMORY_S if self.hurt_refaulted
                                    else PRESSURE_MEMORY_S)
        if (self.hurt_mark and abs(hurt - self.hurt_mark) <= f.margin
                and f.now - self.hurt_at <= held + HURT_AGAIN_WITHIN_S):
            return min(HURT_MEMORY_MAX_S, 2.0 * held)
        return 0.0

    def snapshot(self, now: float) -> DefaultGuestSnapshot:
        last = None
        if self.last is not None and self.last_now is not None:
            c = self.last
            last = LastReportSnapshot(
                time_s=c.time_s, age_s=_age(now, self.last_now), swap_in_pages=c.swap_in_pages,
                major_faults=c.major_faults, oom_kills=c.oom_kills,
                refused_pages=c.refused_pages)
        return DefaultGuestSnapshot(
            step=self.step, working_set=tuple((_age(now, t), w) for t, w in self.ws),
            last_report=last, last_balloon=self.last_balloon, hurt_size=self.hurt_size,
            hurt_age_s=_age_or_never(now, self.hurt_at), hurt_ws=self.hurt_ws,
            oom_age_s=_age_or_never(now, self.oom_at), quiet_calls=self.quiet_calls,
            still_age_s=_age_or_never(now, self.still_since), last_target=self.last_target,
            hurt_refaulted=self.hurt_refaulted,
            faulted_age_s=_age_or_never(now, self.faulted_at), hurt_hold_s=self.hurt_hold_s,
            hurt_mark=self.hurt_mark)

    @classmethod
    def restored(cls, snap: DefaultGuestSnapshot, now: float) -> GuestMemo:
        last = snap.last_report
        return cls(
            step=snap.step, ws=deque((now - age, w) for age, w in snap.working_set),
            last=None if last is None else ReportCounts(
                last.time_s, last.swap_in_pages, last.major_faults, last.oom_kills,
                last.refused_pages),
            last_now=None if last is None else now - last.age_s,
            last_balloon=snap.last_balloon, still_since=_time_or_never(now, snap.still_age_s),
            last_target=snap.last_target, hurt_size=snap.hurt_size,
            hurt_at=_time_or_never(now, snap.hurt_age_s), hurt_ws=snap.hurt_ws,
            oom_at=_time_or_never(now, snap.oom_age_s), quiet_calls=snap.quiet_calls,
            hurt_refaulted=snap.hurt_refaulted,
            faulted_at=_time_or_never(now, snap.faulted_age_s), hurt_hold_s=snap.hurt_hold_s,
            hurt_mark=snap.hurt_mark)


_second: Final = itemgetter(1)


def _age(now: float, t: float) -> float:
    return max(0.0, now - t)  # a moment after ``now`` (a clock gone back) counts as now


def _age_or_never(now: float, t: float) -> float | None:
    return None if t == NEVER else _age(now, t)


def _time_or_never(now: float, age: float | None) -> float:
    return NEVER if age is None else now - age


# ---------------------------------------------------------------------- the rules
@dataclass(slots=True)  # not frozen: a frozen init costs 6 us a guest a call; never changed
class Figures:
    """One guest's figures for one call, computed once; every rule reads them and nothing else
    (and none writes them). ``DefaultPolicy.figures`` builds it positionally: a new field
    goes last, or there too.

    For a guest without a fresh report (``fresh`` false) only ``g`` and ``now`` mean anything:
    the blind rule, first, takes it.
    """

    g: GuestSample
    now: float
    fresh: bool = True
    stall_pct: float = 0.0
    d_swapin: int = 0  # swap-ins since the last report
    d_oom: int = 0  # OOM kills since the last report
    d_refused: int = 0  # pages the guest refused since the last report
    swapin_rate: float = 0.0  # pages/s
    fault_rate: float = 0.0  # major faults/s
    stuck: bool = False  # the target is above the balloon, which did not grow since last call
    last_balloon: int | None = None  # the balloon at the last call
    ws: int = 0  # working set: size minus MemAvailable
    avail: int = 0  # MemAvailable
    peak: int = 0  # peak working set over WS_WINDOW_S
    ahead: int = 0  # the working set's growth over LOOKAHEAD_S
    margin: int = 0  # headroom the guest keeps available (with ``ahead``)
    floor: int = 0  # the learned safety floor
    budget_floor: int = 0  # how far the host budget may squeeze: working set + small margin
    step: int = 0  # the probe step, pages
    severity: float = 0.0  # the pressure over the trouble thresholds (1: at them)
    quiet_calls: int = 0  # quiet probes in a row before this call
    probe: bool = True  # the policy's settings
    stall_quiet_pct: float = STALL_QUIET_PCT
    stall_trouble_pct: float = STALL_TROUBLE_PCT
    free: int = 0  # MemFree: memory nobody uses (not even the page cache)
    repeated: bool = False  # the report is the one the last call read (reports every 2 s)
    report_balloon: int = 0  # the balloon the report saw

    @property
    def size(self) -> int:
        g = self.g  # GuestSample.size_pages, without a second property call (hot: per guest)
        return g.ram_pages - g.balloon_pages

    @property
    def ram(self) -> int:
        return self.g.ram_pages

    @property
    def target_size(self) -> int:
        """The size the current target leaves the guest."""
        g = self.g
        return g.ram_pages - g.target_pages

    @property
    def inflating(self) -> bool:
        g = self.g
        return g.target_pages > g.balloon_pages

    @property
    def emergency_margin(self) -> int:
        # under what the budget may squeeze a guest to (``squeeze_margin``); between it and
        # the full margin the guest is only tight: no probing (its floor holds it)
        return EMERGENCY_MARGIN_PAGES + self.ahead

    @property
    def squeeze_margin(self) -> int:
        """The MemAvailable a host short of memory leaves a guest: its budget margin."""
        return BUDGET_MARGIN_PAGES + self.ahead

    @property
    def backoff(self) -> int:
        """The deflation the trouble rule gives: at least ``BACKOFF_MIN_FRACTION`` of RAM or
        twice the step, times the pressure over the thresholds (senpai)."""
        scale = min(BACKOFF_MAX_SCALE, max(1.0, self.severity))
        return int(max(BACKOFF_MIN_FRACTION * self.ram, 2 * self.step) * scale)

    @property
    def room(self) -> int:
        """MemFree now, less what an inflation in progress will still take from it."""
        g = self.g
        return self.free_now - max(0, g.target_pages - g.balloon_pages)

    @property
    def band(self) -> int:
        """The hysteresis around the floor (``BAND_FRACTION`` of RAM)."""
        return int(BAND_FRACTION * self.g.ram_pages)

    @property
    def troubled(self) -> bool:
        return self.stall_pct > self.stall_trouble_pct or self.swapin_rate > SWAPIN_TROUBLE_PER_S

    @property
    def quiet(self) -> bool:
        return (self.stall_pct <= self.stall_quiet_pct and self.d_swapin == 0
                and self.fault_rate <= MAJOR_FAULTS_QUIET_PER_S)

    @property
    def free_now(self) -> int:
        """MemFree less what the balloon took since the report (it takes free pages first)."""
        return max(0, self.free - max(0, self.g.balloon_pages - self.report_balloon))

    @property
    def idle(self) -> bool:
        """Free memory beyond twice the margin, seen quiet for a while: a big probe step."""
        return (self.free_now > 2 * self.margin
                and self.quiet_calls + 1 > QUIET_CALLS_BEFORE_BIG_STEP)

    @property
    def settled(self) -> bool:
        g = self.g
        return abs(g.target_pages - g.balloon_pages) < MIN_CHANGE_PAGES

    def inputs(self) -> dict[str, float]:
        """The figures a decision journals."""
        if not self.fresh:
            return {"report_age_s": float(self.g.report_age_s(self.now) or -1.0)}
        g = self.g
        return {
            "stall_pct": self.stall_pct, "swap_in_per_s": self.swapin_rate,
            "major_faults_per_s": self.fault_rate, "oom_kills_new": float(self.d_oom),
            "refused_new": float(self.d_refused), "available_pages": float(self.avail),
            "working_set_pages": float(self.ws), "peak_working_set_pages": float(self.peak),
            "margin_pages": float(self.margin), "floor_pages": float(self.floor),
            "size_pages": float(self.size), "balloon_pages": float(g.balloon_pages),
            "target_pages": float(g.target_pages), "step_pages": float(self.step),
            "budget_floor_pages": float(self.budget_floor),
        }


@dataclass(slots=True)  # not frozen, as ``Figures``: one a guest a call; never changed
class Ruling:
    """What a rule decides for one guest, and what the policy remembers of it (read only)."""

    size: int  # planned size (pages the guest keeps)
    floor: int  # the safety floor the plan keeps
    pressure: float  # 0 quiet .. larger worse: the host serves the worst first
    balloon: int | None = None  # an explicit balloon (blind, stalled), else from ``size``
    hurt: int | None = None  # a size that hurt: no probing below it a while; the step halves
    oom: bool = False  # an OOM kill: the shrunk working set says nothing for a while
    refaulted: bool = False  # it hurt by refaults: forgotten once they stop (REFAULT_MEMORY_S)
    quiet: bool = False  # a quiet probe: one more in a row; the step grows
    probed: bool = False  # it hurt where a probe took it (rule 7): its memory may back off


@dataclass(frozen=True, slots=True)
class Rule:
    """One verdict of the policy: when it applies, what it decides, the reason it journals.

    ``decide`` may answer None: the guest keeps its target (and nothing is remembered).
    """

    name: str
    verdict: Verdict
    when: Callable[[Figures], bool]
    decide: Callable[[Figures], Ruling | None]
    why: Callable[[Figures, Ruling], str]
    counter: DefaultCounter | None = None  # counted each time the rule applies
    # the rule applies only to a troubled guest (its ``when`` requires ``Figures.troubled``):
    # ``judge`` tests that once for all such rules, not in each (most guests are quiet)
    troubled: bool = False


def _blind(f: Figures) -> Ruling | None:
    if not f.inflating:
        return None
    return Ruling(f.size, 0, 0.0, balloon=f.g.balloon_pages)


def _emergency(f: Figures) -> Ruling:
    # deflate by what restores the full margin, so a ramping guest gets ahead of its ramp;
    # the size that hurt is remembered no higher than the size plus the margin
    new = f.size + max(f.margin - f.avail, f.step)
    hurt = min(new, f.size + f.margin, f.g.ceiling_pages())
    if f.d_oom > 0:
        # the kill freed the workload's memory, so MemAvailable now says nothing of what it
        # needs: give the whole balloon back (probing starts over later)
        new = f.g.ceiling_pages()
    return Ruling(max(new, f.floor), f.floor, 100.0 + f.severity, hurt=hurt, oom=f.d_oom > 0)


def _why_emergency(f: Figures, _: Ruling) -> str:
    why = (f"guest OOM-killed ({f.d_oom} new)" if f.d_oom > 0
           else f"available {f.avail} pages under margin {f.margin}")
    return f"default: emergency deflate: {why}"


def _own_pressure(f: Figures) -> bool:
    # the balloon took nothing: this pressure is the guest's own, not ours to remember as a
    # size that hurt (which would stop probing for minutes)
    return f.troubled and f.g.balloon_pages == 0 and f.g.target_pages == 0


def _reclaiming(f: Figures) -> bool:
    # troubled while the balloon grew, with no refault and no swap-in since the last report
    # and MemAvailable still above the margin: the stall is the guest reclaiming, for the
    # balloon, page cache nobody reads (PSI counts the balloon's direct reclaim too), not its
    # workload missing memory; a workload that missed what the balloon took refaults it
    return (f.troubled and f.d_swapin == 0 and f.fault_rate == 0.0 and f.avail >= f.margin
            and f.last_balloon is not None and f.g.balloon_pages > f.last_balloon)


def _has_room(f: Figures) -> bool:
    # troubled, no swap-in, and idle free memory beyond the margin by a whole back-off, with
    # the balloon not above its target (a deflation in progress: the memory is not there yet)
    g = f.g
    return (f.troubled and f.d_swapin == 0 and g.balloon_pages <= g.target_pages
            and f.room >= f.margin + f.backoff)


def _trouble(f: Figures) -> Ruling:
    # senpai: a back-off that grows with the pressure; the deflation may go below the size
    # remembered as hurting (plus the margin), to relieve the pressure now
    new = f.size + f.backoff
    hurt = min(new, f.size + f.margin, f.g.ceiling_pages())
    return Ruling(new, max(f.floor, new), f.severity, hurt=hurt,
                  refaulted=f.fault_rate > 0 or f.d_swapin > 0, probed=True)


def _why_stalled(f: Figures, _: Ruling) -> str:
    why = (f"refused {f.d_refused} pages" if f.d_refused > 0 else
           f"balloon stuck at {f.g.balloon_pages} (was {f.last_balloon}) under target "
           f"{f.g.target_pages}")
    return f"default: inflation stalled: {why}: target := actual"


def _under_floor(f: Figures) -> Ruling:
    # back to the floor and a band above it (the next growth waits for the floor to pass the
    # band); a deficit under MIN_CHANGE_PAGES is the working set's noise: to the floor only
    # (a change too small to make, unless the host's budget needs it)
    size = f.floor
    if f.floor - f.target_size >= MIN_CHANGE_PAGES:
        size = min(f.floor + f.band, f.g.ceiling_pages())
    return Ruling(size, f.floor, f.severity)


def _probes(f: Figures) -> bool:
    # a report the last call read already shows nothing of that call's probe: probe again
    # only into free memory that is idle still (the balloon's growth since taken off)
    return (f.probe and f.quiet and f.settled and f.target_size - f.floor >= 2 * f.band
            and f.target_size > f.floor and (not f.repeated or f.idle))


def _probe(f: Figures) -> Ruling:
    step = 0 if f.repeated else f.step
    if f.idle:
        # idle free memory, seen quiet for a while: take half of it a call (at most
        # BIG_STEP_MAX_FRACTION of RAM), not just the probe step. MemFree, not MemAvailable:
        # the page cache counts as available, but a big step into a cache the guest reads
        # evicts its hot pages at once, and the guest stalls refaulting them for tens of
        # seconds after the balloon gave them back; cache is probed by the step alone
        step = max(step, min((f.free_now - f.margin) // 2, int(BIG_STEP_MAX_FRACTION * f.ram)))
    return Ruling(max(f.floor, f.target_size - step), f.floor, f.severity, quiet=True)


#: The per-guest rules in order (the module docstring's list): the first that applies decides.
RULES: Final[tuple[Rule, ...]] = (
    Rule("blind", Verdict.BLIND, lambda f: not f.fresh, _blind,
         lambda f, r: "no fresh report: stop inflating a guest it cannot see",
         DefaultCounter.BLIND),
    Rule("emergency", Verdict.EMERGENCY,
         lambda f: f.d_oom > 0 or f.avail < f.emergency_margin, _emergency, _why_emergency),
    Rule("own_pressure", Verdict.HOLD, _own_pressure,
         lambda f: Ruling(f.size, f.floor, f.severity),
         lambda f, r: f"default: stall {f.stall_pct:.2f}% with no balloon: hold",
         DefaultCounter.PRESSURE_WITHOUT_BALLOON, troubled=True),
    Rule("reclaiming", Verdict.HOLD, _reclaiming,
         lambda f: Ruling(f.target_size, f.floor, f.severity),
         lambda f, r: f"default: stall {f.stall_pct:.2f}% while the balloon grew by "
                      f"{f.g.balloon_pages - (f.last_balloon or 0)} pages, no refault: hold "
                      f"(the inflation's own reclaim)", troubled=True),
    Rule("room", Verdict.ROOM, _has_room,
         lambda f: Ruling(f.target_size, f.floor, f.severity),
         lambda f, r: f"default: stall {f.stall_pct:.2f}% with {f.room} pages free beyond "
                      f"what the balloon takes (margin {f.margin}, back-off {f.backoff}): "
                      f"hold (more memory cannot help)",
         DefaultCounter.TROUBLE_WITH_ROOM, troubled=True),
    Rule("reread", Verdict.HOLD, lambda f: f.troubled and f.repeated,
         lambda f: Ruling(f.target_size, f.floor, f.severity),
         lambda f, r: f"default: stall {f.stall_pct:.2f}% in the report the last call read: "
                      f"hold (its back-off is not in it yet)", troubled=True),
    Rule("trouble", Verdict.TROUBLE, lambda f: f.troubled, _trouble,
         lambda f, r: f"default: back off: stall {f.stall_pct:.2f}%, swap-in "
                      f"{f.swapin_rate:.0f} pages/s", troubled=True),
    Rule("stalled", Verdict.STALLED, lambda f: f.stuck or (f.d_refused > 0 and f.inflating),
         lambda f: Ruling(f.size, f.floor, f.severity, balloon=f.g.balloon_pages, hurt=f.size),
         _why_stalled),
    Rule("under_floor", Verdict.UNDER_FLOOR, lambda f: f.target_size < f.floor,
         _under_floor,
         lambda f, r: f"default: size {f.target_size} under safety floor {f.floor}: grow"),
    Rule("probe", Verdict.PROBE,
         _probes, _probe,
         lambda f, r: f"default: quiet (stall {f.stall_pct:.2f}%): probe down "
                      f"{f.target_size - r.size} pages toward floor {f.floor}"),
    Rule("hold", Verdict.HOLD, lambda f: True,
         lambda f: Ruling(f.target_size, f.floor, f.severity), lambda f, r: "default: hold"),
)


def judge(f: Figures) -> tuple[Rule, Ruling | None]:
    """The first rule that applies to ``f``, and what it decides."""
    troubled = f.troubled
    for rule in RULES:
        if (troubled or not rule.troubled) and rule.when(f):
            return rule, rule.decide(f)
    raise AssertionError("the hold rule always applies")


# ---------------------------------------------------------------------- snapshots
class LastReportSnapshot(SnapshotPart):
    """``ReportCounts`` and when they were read."""

    time_s: Annotated[float, Field(allow_inf_nan=False)]  # the guest's clock, as it said
    age_s: Seconds  # how long before the snapshot the policy read it
    swap_in_pages: Pages
    major_faults: Annotated[int, Field(ge=0)]
    oom_kills: Annotated[int, Field(ge=0)]
    refused_pages: Pages | None


class DefaultGuestSnapshot(SnapshotPart):
    """A ``GuestMemo`` with its moments as ages (None: never)."""

    step: Annotated[float, Field(ge=PROBE_STEP_MIN, le=PROBE_STEP_MAX, allow_inf_nan=False)]
    working_set: tuple[tuple[Seconds, Pages], ...]  # (age, working set), oldest first
    last_report: LastReportSnapshot | None
    last_balloon: Pages | None
    hurt_size: Pages
    hurt_age_s: Seconds | None
    hurt_ws: Pages
    oom_age_s: Seconds | None
    quiet_calls: Annotated[int, Field(ge=0)]
    # since when the balloon has not grown under the same target, and that target (a snapshot
    # from before they were kept has neither: the next call starts the wait afresh)
    still_age_s: Seconds | None = None
    last_target: Pages | None = None
    # whether the guest refaulted when it last hurt, and its last refault (older snapshots:
    # not refaulted, never)
    hurt_refaulted: bool = False
    faulted_age_s: Seconds | None = None
    # how long the size that hurt is remembered (0: the base rules), and the size the last
    # probe hurt at (older snapshots: no back-off, none)
    hurt_hold_s: Annotated[float, Field(ge=0.0, le=HURT_MEMORY_MAX_S, allow_inf_nan=False)] = 0.0
    hurt_mark: Pages = 0


class DefaultSnapshot(PolicySnapshot):
    """``DefaultPolicy`` state that survives a restart: each guest's memory."""

    policy: Literal["default"] = "default"
    guests: dict[str, DefaultGuestSnapshot] = Field(default_factory=dict)


# ---------------------------------------------------------------------- the policy
@dataclass(slots=True)
class _Plan:
    g: GuestSample
    verdict: Verdict
    size: int  # planned size (pages the guest keeps)
    floor: int  # learned safety floor
    pressure: float  # 0 quiet .. larger worse (for ordering)
    # what the reason and the journal's inputs are made of: written only for the few guests
    # that get a decision (``why``, ``f.inputs()``), never for the ones that hold
    f: Figures
    rule: Rule
    ruling: Ruling
    balloon: int | None = None  # an explicit balloon (blind, stalled), else from ``size``
    free: int | None = None  # MemFree in its report (None: no report), for ``soft_floor``
    budget_floor: int = 0  # how far the host budget may squeeze: working set + small margin
    budget_cut: bool = False  # reclaimed for the host budget (urgent: not held back)
    # an emergency (no OOM kill): the size that restores only the budget's margin, all the
    # host gives while it is short itself
    relief: int | None = None
    reason: str | None = None  # a reason replacing the rule's (the host's reclaim)
    more: str = ""  # said after the reason (the host's cuts)

    def why(self) -> str:
        base = self.reason if self.reason is not None else self.rule.why(self.f, self.ruling)
        return base + self.more

    def soft_floor(self) -> int:
        """The size above which the guest's memory is MemFree beyond the margin: the host's
        reclaim takes that first, the page cache second (asked only when the host reclaims)."""
        if self.free is None:
            return 0
        return max(self.budget_floor,
                   self.g.size_pages - max(0, self.free - BUDGET_MARGIN_PAGES))


class DefaultPolicy:
    """memballoon's pressure-driven policy (see the module docstring).

    From ``BATCH_MIN_GUESTS`` live guests up, ``decide`` runs as columns
    (``memballoon.policy.default_batch``: the same decisions, counters and memory, numpy's
    fixed cost paid back from a few hundred guests); the memory is then kept as columns and
    becomes ``GuestMemo``s again when ``state`` is read or a call runs the scalar path.
    """

    #: live guests from which ``decide`` runs as columns (a test sets it on an instance: 0
    #: forces the columns, a huge number the scalar path); measured on fleet slices, the
    #: columns are 0.7x the scalar path's speed at 40 guests, 0.9x at 60, 1.3x at 100, 2.1x
    #: at 200, 4x at 1,000
    BATCH_MIN_GUESTS: int = 100

    def __init__(
        self,
        *,
        max_report_age_s: float = MAX_REPORT_AGE_S,
        probe: bool = True,
        margin_fraction: float = MARGIN_FRACTION,
        stall_trouble_pct: float = STALL_TROUBLE_PCT,
        stall_quiet_pct: float = STALL_QUIET_PCT,
    ) -> None:
        if max_report_age_s <= 0:
            raise ConfigError("default: max_report_age_s must be > 0")
        if not 0.0 <= margin_fraction < 1.0:
            raise ConfigError("default: margin_fraction must be within [0, 1)")
        if not 0.0 <= stall_quiet_pct <= stall_trouble_pct <= 100.0:
            raise ConfigError("default: need 0 <= stall_quiet_pct <= stall_trouble_pct <= 100")
        self.max_report_age_s = max_report_age_s
        self.probe = probe
        self.margin_fraction = margin_fraction
        self.stall_trouble_pct = stall_trouble_pct
        self.stall_quiet_pct = stall_quiet_pct
        self.counters = Counters()
        self._state: dict[str, GuestMemo] = {}
        self._batch: BatchMemo | None = None  # the memory as columns, while batching

    @property
    def name(self) -> str:
        return "default"

    @property
    def state(self) -> dict[str, GuestMemo]:
        """Each guest's memory, in the order the guests first came (the columns', if the
        last call batched, become ``GuestMemo``s again: reading or changing them is safe)."""
        if self._batch is not None:
            self._state = self._batch.to_memos()
            self._batch = None
        return self._state

    @state.setter
    def state(self, memos: dict[str, GuestMemo]) -> None:
        self._state, self._batch = memos, None

    # ------------------------------------------------------------------ per guest
    def figures(self, g: GuestSample, m: GuestMemo, now: float) -> Figures:
        """``g``'s figures at ``now``; ``m`` takes in this call's report and working set."""
        # called for every guest every call: attributes read once into locals
        r = fresh_report(g, self.max_report_age_s, now)
        if r is None:
            m.last = None  # rates restart from the next report
            return Figures(g, now, fresh=False)
        c = self.counters
        prev = m.last
        balloon, target, ram = g.balloon_pages, g.target_pages, g.ram_pages
        repeated = prev is r  # the report the last call read (reports every 2 s, calls 1 s)
        dt = 0.0
        d_swapin = d_major = d_oom = d_refused = 0
        if prev is not None:
            if m.last_now is not None:
                dt = r.time_s - prev.time_s
                if dt <= 0:
                    dt = now - m.last_now  # the guest's clock did not move: ours did
            if not repeated:  # (a report's counters against themselves: every delta is 0)
                # the plain differences; ``counter_delta`` (0, counted) for one gone back
                d_swapin = r.swap_in_pages - prev.swap_in_pages
                if d_swapin < 0:
                    d_swapin = counter_delta(r.swap_in_pages, prev.swap_in_pages, c,
                                             PolicyReportCounter.SWAP_IN_BACKWARDS)
                d_major = r.major_faults - prev.major_faults
                if d_major < 0:
                    d_major = counter_delta(r.major_faults, prev.major_faults, c,
                                            PolicyReportCounter.MAJOR_FAULTS_BACKWARDS)
                d_oom = r.oom_kills - prev.oom_kills
                if d_oom < 0:
                    d_oom = counter_delta(r.oom_kills, prev.oom_kills, c,
                                          PolicyReportCounter.OOM_KILLS_BACKWARDS)
                if r.refused_pages is not None:
                    d_refused = counter_delta(r.refused_pages, prev.refused_pages, c,
                                              PolicyReportCounter.REFUSED_BACKWARDS)
        swapin_rate = d_swapin / dt if dt > 0 else 0.0
        last_balloon = m.last_balloon
        grown = last_balloon is None or balloon > last_balloon
        if grown or target != m.last_target:
            m.still_since = now  # moving, or asked for something new: give it time
        stuck = not grown and target > balloon and now - m.still_since >= STUCK_AFTER_S
        m.last, m.last_now, m.last_balloon, m.last_target = r, now, balloon, target

        ws = working_set_pages(g, r, c)
        avail = available_pages(g, r, c)
        growth, peak = m.see_working_set(ws, now, dt)
        # the lookahead covers a ramp's next LOOKAHEAD_S, but never more than the guest's RAM
        ahead = min(int(growth * LOOKAHEAD_S), int(LOOKAHEAD_MAX_FRACTION * ram))
        margin = int(max(MARGIN_MIN_PAGES, self.margin_fraction * ram)) + ahead
        if d_major or d_swapin:
            m.faulted_at = now
        if m.hurt_size:
            hold = m.hurt_hold_s
            if now >= m.oom_at + PRESSURE_MEMORY_S and ws + margin < m.hurt_ws:
                # the working set shrank well below it: the size and its back-off go
                m.hurt_size, m.hurt_hold_s, m.hurt_mark = 0, 0.0, 0
            elif (now >= m.hurt_at + hold if hold else (
                    now >= m.hurt_at + (REFAULTING_MEMORY_S if m.hurt_refaulted
                                        else PRESSURE_MEMORY_S)
                    or (m.hurt_refaulted
                        and now >= max(m.hurt_at, m.faulted_at) + REFAULT_MEMORY_S))):
                # the pain is old, or it was refaults and they stopped (a size that hurt again
                # is kept its whole back-off: the refaults stopping did not mean it was cold)
                m.hurt_size = 0
        settings = g.settings
        min_pages, hurt_size, ceiling = settings.min_pages, m.hurt_size, settings.max_pages
        if ceiling is None or ceiling > ram:  # ``g.ceiling_pages()``, without the call
            ceiling = ram
        floor = min(max(min_pages, peak + margin, hurt_size), ceiling)
        stall_pct, trouble_pct = r.stall_pct, self.stall_trouble_pct
        if stall_pct > self.stall_quiet_pct or d_swapin or d_oom or avail < margin:
            m.quiet_calls = 0  # anything but quiet starts the count again
        # positional, in the order of the fields: a third of the cost of keywords
        return Figures(
            g, now, True, stall_pct, d_swapin, d_oom, d_refused, swapin_rate,
            d_major / dt if dt > 0 else 0.0,  # fault_rate
            stuck, last_balloon, ws, avail, peak, ahead, margin, floor,
            min(floor, max(min_pages, hurt_size, ws + BUDGET_MARGIN_PAGES + ahead)),  # budget_floor
            max(1, int(m.step * ram)),  # step
            max(stall_pct / trouble_pct if trouble_pct else 0.0,
                swapin_rate / SWAPIN_TROUBLE_PER_S),  # severity
            m.quiet_calls, self.probe, self.stall_quiet_pct, trouble_pct,
            free_pages(g, r, c), repeated, r.balloon_actual_pages)

    def _plan(self, g: GuestSample, now: float) -> _Plan | None:
        m = self._state.get(g.name)  # (``decide`` made sure the memory is ``GuestMemo``s)
        if m is None:
            m = self._state[g.name] = GuestMemo()
        f = self.figures(g, m, now)
        rule, ruling = judge(f)
        if rule.counter is not None:
            self.counters.inc(rule.counter)
        if ruling is None:
            return None
        m.remember(f, ruling)
        p = _Plan(g, rule.verdict, ruling.size, ruling.floor, ruling.pressure, f, rule, ruling,
                  ruling.balloon, budget_floor=f.budget_floor)
        if rule.verdict is Verdict.EMERGENCY and f.d_oom == 0:
            p.relief = min(ruling.size, f.size + f.squeeze_margin - f.avail)
        if g.report is not None:
            # for ``soft_floor`` (a blind guest's stale report is read too: its
            # inconsistencies are counted all the same)
            p.free = f.free if f.fresh else free_pages(g, g.report, self.counters)
        return p

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, now: float) -> DefaultSnapshot:
        """Each guest's memory, its moments as ages at ``now``."""
        # (the columns' memory is read as ``GuestMemo``s, not turned back into them)
        memos = self._batch.to_memos() if self._batch is not None else self._state
        return DefaultSnapshot(guests={n: m.snapshot(now) for n, m in memos.items()})

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        """Take up ``snap`` (a ``DefaultSnapshot``) on the caller's clock at ``now``."""
        own = own_snapshot(snap, DefaultSnapshot, self.name)
        self.state = {n: GuestMemo.restored(s, now) for n, s in own.guests.items()}

    # ------------------------------------------------------------------ the host
    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        least = self.BATCH_MIN_GUESTS
        if len(guests) >= least and (least <= 0 or sum(g.alive for g in guests) >= least):
            from memballoon.policy.default_batch import decide_batch  # (it imports this)

            out = decide_batch(self, host, guests, now)
            if out is not None:  # (None: inputs the columns refuse; nothing was changed)
                return out
        state = self.state
        for gone in set(state) - {g.name for g in guests}:
            del state[gone]
        plans: list[_Plan] = []
        for g in guests:
            if not g.alive:
                continue
            p = self._plan(g, now)
            if p is not None:
                plans.append(p)
        return self._carry_out(host, plans)

    def _carry_out(self, host: HostSample, plans: list[_Plan]) -> list[Decision]:
        """The host's part of ``decide`` over the guests' ``plans``: the budget, the host's
        shortness, and the decisions."""
        psi_pressed = (host.psi_some_avg10 is not None
                       and host.psi_some_avg10 >= HOST_PSI_SOME_PCT)
        pressed = host.short_pages > 0 or psi_pressed
        if pressed:
            for p in plans:
                if p.verdict is Verdict.UNDER_FLOOR:
                    # its growth back to its floor waits for the host, and meanwhile it may
                    # give, as a held guest does, down to its budget floor: a guest a few
                    # pages under a floor that moved with its working set's noise was no
                    # candidate at all, and a short host got nothing back
                    p.size = min(p.size, p.g.ram_pages - p.g.target_pages)
                    p.verdict = Verdict.HOLD
        # the guests' growth if every plan is carried out, over what they hold now
        growth = 0
        for p in plans:  # the planned size (an explicit balloon's, or ``size``) less the size
            g = p.g
            ram = g.ram_pages
            growth += (ram - p.balloon if p.balloon is not None else p.size) - (
                ram - g.balloon_pages)
        excess = host.resident_pages + growth - host.budget_pages
        if psi_pressed and host.total_pages is not None:
            excess = max(excess, growth + int(HOST_PSI_RECLAIM_FRACTION * host.total_pages))
        cause = self._cause(host, excess, psi_pressed)
        if excess > 0:
            excess = self._reclaim(plans, excess, cause)
        if pressed:  # no guest grows back while the host itself is short (emergencies do)
            for p in plans:
                if p.relief is not None and p.relief < p.size:
                    p.size = p.relief  # just out of danger, not back to the full margin
                    p.more += f" (host short: to the small margin, size {p.relief})"
            excess = max(excess, sum(max(0, p.size - p.g.size_pages) for p in plans))
        if excess > 0:
            self._cut_growth(plans, excess, cause)
        return self._decisions(host, plans)

    @staticmethod
    def _decisions(host: HostSample, plans: list[_Plan]) -> list[Decision]:
        """The decisions ``plans`` come to (a plan that changes too little makes none)."""
        out: list[Decision] = []
        host_inputs = DefaultPolicy.host_inputs(host)
        for p in plans:
            g = p.g
            balloon = p.balloon if p.balloon is not None else g.ram_pages - p.size
            balloon = clamp_balloon(g, balloon)
            if balloon == g.target_pages:
                continue
            if (p.verdict in SMALL_SKIPS
                    and abs(balloon - g.target_pages) < MIN_CHANGE_PAGES):
                continue
            inputs = p.f.inputs()
            inputs.update(host_inputs)
            urgent = p.verdict in URGENT or p.budget_cut
            out.append(Decision(g.name, balloon, p.why(), inputs, urgent=urgent))
        return out

    @staticmethod
    def host_inputs(host: HostSample) -> dict[str, float]:
        """The host's figures every decision journals after its guest's."""
        inputs = {"host_resident_pages": float(host.resident_pages),
                  "host_budget_pages": float(host.budget_pages)}
        if host.available_pages is not None:
            inputs["host_available_pages"] = float(host.available_pages)
            inputs["host_reserve_pages"] = float(host.reserve_pages)
        if host.psi_some_avg10 is not None:
            inputs["host_psi_some_avg10"] = host.psi_some_avg10
        return inputs

    @staticmethod
    def _cause(host: HostSample, excess: int, psi_pressed: bool) -> str:
        """Why the host needs memory back, as the journal should say it: a shortfall now, or
        only a projection of the planned growth."""
        if host.short_pages > 0:
            return f"host {host.short_pages} pages under its reserve"
        over = host.resident_pages - host.budget_pages
        if over > 0:
            return f"host over budget by {over} pages"
        if psi_pressed:
            return f"host memory pressure {host.psi_some_avg10:.1f}%"
        return f"planned growth would pass the budget by {excess} pages"

    def _reclaim(self, plans: list[_Plan], excess: int, cause: str) -> int:
        """Take ``excess`` pages from quiet guests above their floors; returns what is left.

        Two passes: first MemFree beyond the margin (memory nobody uses), then page cache down
        to the floor; in each, the guests with the least pressure and most idle memory first.
        """
        cands = [p for p in plans if p.verdict in (Verdict.PROBE, Verdict.HOLD, Verdict.ROOM)
                 and p.balloon is None]
        for soft in (True, False):
            def low(p: _Plan, soft: bool = soft) -> int:
                return p.soft_floor() if soft else p.budget_floor

            cands.sort(key=lambda p: (p.pressure, -(p.size - low(p)), p.g.name))
            for p in cands:
                if excess <= 0:
                    return 0
                take = min(excess, p.size - low(p))
                if take <= 0:
                    continue
                p.size -= take
                excess -= take
                p.verdict = Verdict.PROBE
                p.budget_cut = True
                p.reason = (f"default: {cause}: reclaim {take} "
                            f"{'free' if soft else 'cache'} pages (floor {low(p)})")
                p.more = ""
        return excess

    @staticmethod
    def _cut_growth(plans: list[_Plan], excess: int, cause: str) -> None:
        """Cut growth back to floors (never urgent deflations) to stay within the budget."""
        for p in sorted(plans, key=lambda p: (p.pressure, p.g.name)):
            if excess <= 0:
                return
            if p.verdict is not Verdict.UNDER_FLOOR:
                continue
            grow = p.size - (p.g.ram_pages - p.g.target_pages)
            cut = min(excess, max(0, grow))
            p.size -= cut
            excess -= cut
            p.more += f" (cut by {cut} pages: {cause})"
