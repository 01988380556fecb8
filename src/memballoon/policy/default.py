"""``default``: memballoon's own policy, driven by what the guest says it feels.

Theory of operation
-------------------
MoM and Proxmox size guests from host free memory and guest MemFree alone; their users'
complaint is guests ballooned to death (seed 003: "administrators often over-shrink their
domains and kill them ... is there some way to get the vm subsystem to provide backpressure").
This policy reads the guest's backpressure from its ``PressureReport`` each call: PSI-like
``stall_pct``, the swap-in and major-fault rates, the oom-kill count, refused pages, and whether
its balloon reaches the target. Per guest, in order:

1. **blind**: no report, or one older than ``max_report_age_s``: never inflate; an inflation in
   progress stops where it is (target := actual).
2. **emergency**: MemAvailable under the small margin (``BUDGET_MARGIN_PAGES`` plus
   ``LOOKAHEAD_S`` of the working set's recent growth), or an OOM kill since last time: deflate
   at once by what restores the full margin (so a ramping guest gets ahead of its ramp).
3. **trouble**: stall above ``STALL_TROUBLE_PCT`` or swap-ins above ``SWAPIN_TROUBLE_PER_S``:
   back off at once (senpai): deflate by a back-off that grows with the pressure, halve the
   probe step, and remember the size that hurt (no probing below it for ``PRESSURE_MEMORY_S``).
4. **stalled inflation**: the target is above the balloon and the balloon did not grow since
   the last call, or the guest refused pages: lower the target to the actual balloon (give the
   guest back the rest), halve the probe step.
5. **under its floor**: the guest keeps less than its safety floor (the recent peak working set
   plus margin): grow it back to the floor.
6. **quiet**: stall under ``STALL_QUIET_PCT``, no swap-in, few major faults, and the balloon at
   its target: probe down by the step (by half the free memory beyond the margin when that
   is more than twice the margin: idle memory), never below the floor; the step grows by
   ``PROBE_STEP_INC`` each quiet probe up to ``PROBE_STEP_MAX`` and halves on trouble down to
   ``PROBE_STEP_MIN`` (the seed vmw_balloon's adaptive rates, VMW_BALLOON_RATE_ALLOC_MIN/MAX/INC,
   are the model: slow growth while things go well, halving on failure).
7. otherwise hold.

The safety floor is ``max(settings.min_pages, peak working set over WS_WINDOW_S + margin, the
size that last hurt)``; the working set is the guest's size minus MemAvailable (what it cannot
give without reclaiming). A policy decision never goes under ``settings.min_pages``.

Then the host: when the guests would together hold more than the budget (resident plus the
planned growth), the excess is reclaimed at once, first from the guests with the least pressure
and the most idle memory above their floors; if that is not enough, growth back to floors is
cut (emergency and back-off deflations stay: a guest's life comes first). When there is room,
guests under pressure get it first (their deflations are planned before anything else).

Pure: state between calls (probe steps, working-set history, last counters) lives in this
object; ``now`` is the manager's clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from memballoon.model.counters import Counters
from memballoon.model.units import mib_to_pages
from memballoon.policy.base import Decision, clamp_balloon
from memballoon.policy.observe import (
    available_pages,
    counter_delta,
    free_pages,
    fresh_report,
    working_set_pages,
)
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.protocol.pressure import PressureReport

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
# The working-set peak is taken over this window: memory a finished burst freed is reclaimed
# about this long after it (a longer window keeps burst-sized memory idle on the host; the next
# burst is met by the emergency deflation and, for virtio, deflate-on-OOM).
WS_WINDOW_S: Final = 5.0
PRESSURE_MEMORY_S: Final = 300.0  # no probing below a size that hurt for this long
MAX_REPORT_AGE_S: Final = 10.0  # an older report is no report (never inflate a blind guest)
MIN_CHANGE_PAGES: Final = mib_to_pages(1)  # smaller probes and growths are not worth a change


class Verdict(Enum):
    BLIND = "blind"
    EMERGENCY = "emergency"
    TROUBLE = "trouble"
    STALLED = "stalled"
    UNDER_FLOOR = "under_floor"
    PROBE = "probe"
    HOLD = "hold"


#: Verdicts whose deflation is never cut for the host budget.
URGENT: Final = frozenset({Verdict.EMERGENCY, Verdict.TROUBLE})


@dataclass
class GuestState:
    """What the policy remembers about one guest between calls."""

    step: float = PROBE_STEP_START  # probe step, share of RAM
    ws: deque[tuple[float, int]] = field(default_factory=deque)  # (now, working set pages)
    last: PressureReport | None = None
    last_now: float | None = None
    last_balloon: int | None = None
    hurt_size: int = 0  # the size at which the guest last hurt (plus the back-off)
    hurt_until: float = float("-inf")
    hurt_ws: int = 0  # its working set then
    oom_until: float = float("-inf")  # after an OOM kill the shrunk working set is the kill's
    quiet_calls: int = 0  # probes in a row without trouble (a new guest starts at 0)


@dataclass
class _Plan:
    g: GuestSample
    verdict: Verdict
    size: int  # planned size (pages the guest keeps)
    floor: int  # learned safety floor
    pressure: float  # 0 quiet .. larger worse (for ordering)
    why: str
    inputs: dict[str, float]
    balloon: int | None = None  # an explicit balloon (blind, stalled), else from ``size``
    soft_floor: int = 0  # the size that keeps the guest's page cache: reclaimed second
    budget_floor: int = 0  # how far the host budget may squeeze: working set + small margin
    budget_cut: bool = False  # reclaimed for the host budget (urgent: not held back)


class DefaultPolicy:
    """memballoon's pressure-driven policy (see the module docstring)."""

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
            raise ValueError("default: max_report_age_s must be > 0")
        if not 0.0 <= margin_fraction < 1.0:
            raise ValueError("default: margin_fraction must be within [0, 1)")
        if not 0.0 <= stall_quiet_pct <= stall_trouble_pct <= 100.0:
            raise ValueError("default: need 0 <= stall_quiet_pct <= stall_trouble_pct <= 100")
        self.max_report_age_s = max_report_age_s
        self.probe = probe
        self.margin_fraction = margin_fraction
        self.stall_trouble_pct = stall_trouble_pct
        self.stall_quiet_pct = stall_quiet_pct
        self.counters = Counters()
        self.state: dict[str, GuestState] = {}

    @property
    def name(self) -> str:
        return "default"

    # ------------------------------------------------------------------ per guest
    def _plan(self, g: GuestSample, now: float) -> _Plan | None:
        st = self.state.setdefault(g.name, GuestState())
        size = g.size_pages
        r = fresh_report(g, self.max_report_age_s, now)
        if r is None:
            st.last = None  # rates restart from the next report
            self.counters.inc("default_blind")
            if g.target_pages > g.balloon_pages:
                return _Plan(g, Verdict.BLIND, size, 0, 0.0,
                             "no fresh report: stop inflating a guest it cannot see",
                             {"report_age_s": float(g.report_age_s(now) or -1.0)},
                             balloon=g.balloon_pages)
            return None
        c = self.counters
        dt = 0.0
        if st.last is not None and st.last_now is not None:
            dt = r.time_s - st.last.time_s
            if dt <= 0:
                dt = now - st.last_now
        prev = st.last
        d_swapin = d_major = d_oom = d_refused = 0
        if prev is not None:
            d_swapin = counter_delta(r.swap_in_pages, prev.swap_in_pages, c, "swap_in")
            d_major = counter_delta(r.major_faults, prev.major_faults, c, "major_faults")
            d_oom = counter_delta(r.oom_kills, prev.oom_kills, c, "oom_kills")
            if r.refused_pages is not None:
                d_refused = counter_delta(r.refused_pages, prev.refused_pages, c, "refused")
        swapin_rate = d_swapin / dt if dt > 0 else 0.0
        fault_rate = d_major / dt if dt > 0 else 0.0
        stalled = (st.last_balloon is not None and g.target_pages > g.balloon_pages
                   and g.balloon_pages <= st.last_balloon)
        last_balloon = st.last_balloon
        st.last, st.last_now, st.last_balloon = r, now, g.balloon_pages

        ws = working_set_pages(g, r, c)
        avail = available_pages(g, r, c)
        growth = 0.0
        if st.ws and now > st.ws[-1][0]:
            growth = max(0.0, (ws - st.ws[-1][1]) / (now - st.ws[-1][0]))
        st.ws.append((now, ws))
        while st.ws and st.ws[0][0] < now - WS_WINDOW_S:
            st.ws.popleft()
        peak = max(w for _, w in st.ws)
        ram = g.ram_pages
        # the lookahead covers a ramp's next LOOKAHEAD_S, but never more than the guest's RAM
        ahead = min(int(growth * LOOKAHEAD_S), int(LOOKAHEAD_MAX_FRACTION * ram))
        margin = int(max(MARGIN_MIN_PAGES, self.margin_fraction * ram)) + ahead
        if now >= st.hurt_until or (now >= st.oom_until and ws + margin < st.hurt_ws):
            st.hurt_size = 0  # the pain is old, or the working set shrank well below it
        floor = max(g.settings.min_pages, peak + margin, st.hurt_size)
        floor = min(floor, g.ceiling_pages())
        budget_floor = min(floor, max(g.settings.min_pages, st.hurt_size,
                                      ws + BUDGET_MARGIN_PAGES + ahead))
        step = max(1, int(st.step * ram))
        severity = max(r.stall_pct / self.stall_trouble_pct if self.stall_trouble_pct else 0.0,
                       swapin_rate / SWAPIN_TROUBLE_PER_S)
        inputs = {
            "stall_pct": r.stall_pct, "swap_in_per_s": swapin_rate,
            "major_faults_per_s": fault_rate, "oom_kills_new": float(d_oom),
            "refused_new": float(d_refused), "available_pages": float(avail),
            "working_set_pages": float(ws), "peak_working_set_pages": float(peak),
            "margin_pages": float(margin), "floor_pages": float(floor),
            "size_pages": float(size), "balloon_pages": float(g.balloon_pages),
            "target_pages": float(g.target_pages), "step_pages": float(step),
            "budget_floor_pages": float(budget_floor),
        }

        if r.stall_pct > self.stall_quiet_pct or d_swapin or d_oom or avail < margin:
            st.quiet_calls = 0  # anything but quiet starts the count again

        def hurt(new_size: int) -> None:
            # no probing back below where it hurt (plus the margin) for a while; the deflation
            # itself may go further, to relieve the pressure now
            st.step = max(PROBE_STEP_MIN, st.step / 2)
            st.hurt_size = min(new_size, size + margin, g.ceiling_pages())
            st.hurt_until = now + PRESSURE_MEMORY_S
            st.hurt_ws = ws

        # emergency below the small margin (what the budget may squeeze a guest to); between
        # it and the full margin the guest is only tight: no probing (its floor holds it)
        emergency_margin = BUDGET_MARGIN_PAGES + ahead
        if d_oom > 0 or avail < emergency_margin:
            need = max(margin - avail, step)
            new = size + need
            hurt(new)
            if d_oom > 0:
                # the kill freed the workload's memory, so MemAvailable now says nothing of
                # what it needs: give the whole balloon back (probing starts over later)
                new = g.ceiling_pages()
                st.oom_until = now + PRESSURE_MEMORY_S
            why = (f"guest OOM-killed ({d_oom} new)" if d_oom > 0
                   else f"available {avail} pages under margin {margin}")
            return _Plan(g, Verdict.EMERGENCY, max(new, floor), floor, 100.0 + severity,
                         f"default: emergency deflate: {why}", inputs)
        if r.stall_pct > self.stall_trouble_pct or swapin_rate > SWAPIN_TROUBLE_PER_S:
            if g.balloon_pages == 0 and g.target_pages == 0:
                # the balloon took nothing: this pressure is the guest's own, not ours to
                # remember as a size that hurt (which would stop probing for minutes)
                c.inc("default_pressure_without_balloon")
                return _Plan(g, Verdict.HOLD, size, floor, severity,
                             f"default: stall {r.stall_pct:.2f}% with no balloon: hold", inputs)
            scale = min(BACKOFF_MAX_SCALE, max(1.0, severity))
            backoff = int(max(BACKOFF_MIN_FRACTION * ram, 2 * step) * scale)
            new = size + backoff
            hurt(new)
            return _Plan(g, Verdict.TROUBLE, new, max(floor, new), severity,
                         f"default: back off: stall {r.stall_pct:.2f}%, swap-in "
                         f"{swapin_rate:.0f} pages/s", inputs)
        if stalled or (d_refused > 0 and g.target_pages > g.balloon_pages):
            st.step = max(PROBE_STEP_MIN, st.step / 2)
            st.hurt_size, st.hurt_until, st.hurt_ws = size, now + PRESSURE_MEMORY_S, ws
            why = (f"refused {d_refused} pages" if d_refused > 0 else
                   f"balloon stuck at {g.balloon_pages} (was {last_balloon}) under target "
                   f"{g.target_pages}")
            return _Plan(g, Verdict.STALLED, size, floor, severity,
                         f"default: inflation stalled: {why}: target := actual", inputs,
                         balloon=g.balloon_pages)
        target_size = ram - g.target_pages
        if target_size < floor:
            return _Plan(g, Verdict.UNDER_FLOOR, floor, floor, severity,
                         f"default: size {target_size} under safety floor {floor}: grow",
                         inputs)
        quiet = (r.stall_pct <= self.stall_quiet_pct and d_swapin == 0
                 and fault_rate <= MAJOR_FAULTS_QUIET_PER_S)
        settled = abs(g.target_pages - g.balloon_pages) < MIN_CHANGE_PAGES
        if self.probe and quiet and settled and target_size > floor:
            st.quiet_calls += 1
            if avail > 2 * margin and st.quiet_calls > QUIET_CALLS_BEFORE_BIG_STEP:
                # idle free memory, seen quiet for a while: take half of it a call (at most
                # BIG_STEP_MAX_FRACTION of RAM), not just the probe step
                step = max(step, min((avail - margin) // 2, int(BIG_STEP_MAX_FRACTION * ram)))
            new = max(floor, target_size - step)
            st.step = min(PROBE_STEP_MAX, st.step + PROBE_STEP_INC)
            return _Plan(g, Verdict.PROBE, new, floor, severity,
                         f"default: quiet (stall {r.stall_pct:.2f}%): probe down "
                         f"{target_size - new} pages toward floor {floor}", inputs)
        return _Plan(g, Verdict.HOLD, target_size, floor, severity, "default: hold", inputs)

    def _with_soft_floor(self, p: _Plan | None) -> _Plan | None:
        """Note the size above which the guest's memory is MemFree beyond the margin."""
        if p is None or p.g.report is None:
            return p
        free = free_pages(p.g, p.g.report, self.counters)
        p.budget_floor = int(p.inputs.get("budget_floor_pages", float(p.floor)))
        p.soft_floor = max(p.budget_floor, p.g.size_pages - max(0, free - BUDGET_MARGIN_PAGES))
        return p

    # ------------------------------------------------------------------ the host
    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        for gone in set(self.state) - {g.name for g in guests}:
            del self.state[gone]
        plans: list[_Plan] = []
        for g in guests:
            if not g.alive:
                continue
            p = self._with_soft_floor(self._plan(g, now))
            if p is not None:
                plans.append(p)
        # the guests' growth if every plan is carried out, over what they hold now
        growth = sum(self._planned_size(p) - p.g.size_pages for p in plans)
        excess = host.resident_pages + growth - host.budget_pages
        if excess > 0:
            excess = self._reclaim(plans, excess)
        if excess > 0:
            self._cut_growth(plans, excess)
        out: list[Decision] = []
        for p in plans:
            g = p.g
            balloon = p.balloon if p.balloon is not None else g.ram_pages - p.size
            balloon = clamp_balloon(g, balloon)
            if balloon == g.target_pages:
                continue
            if (p.verdict in (Verdict.PROBE, Verdict.HOLD, Verdict.UNDER_FLOOR)
                    and abs(balloon - g.target_pages) < MIN_CHANGE_PAGES):
                continue
            p.inputs["host_resident_pages"] = float(host.resident_pages)
            p.inputs["host_budget_pages"] = float(host.budget_pages)
            urgent = p.verdict in URGENT or p.budget_cut
            out.append(Decision(g.name, balloon, p.why, p.inputs, urgent=urgent))
        return out

    @staticmethod
    def _planned_size(p: _Plan) -> int:
        return p.g.ram_pages - p.balloon if p.balloon is not None else p.size

    def _reclaim(self, plans: list[_Plan], excess: int) -> int:
        """Take ``excess`` pages from quiet guests above their floors; returns what is left.

        Two passes: first MemFree beyond the margin (memory nobody uses), then page cache down
        to the floor; in each, the guests with the least pressure and most idle memory first.
        """
        cands = [p for p in plans if p.verdict in (Verdict.PROBE, Verdict.HOLD)
                 and p.balloon is None]
        for soft in (True, False):
            def low(p: _Plan, soft: bool = soft) -> int:
                return p.soft_floor if soft else p.budget_floor

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
                p.why = (f"default: host over budget by {excess + take} pages: reclaim {take} "
                         f"{'free' if soft else 'cache'} pages (floor {low(p)})")
        return excess

    @staticmethod
    def _cut_growth(plans: list[_Plan], excess: int) -> None:
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
            p.why += f" (cut by {cut} pages: host over budget)"
