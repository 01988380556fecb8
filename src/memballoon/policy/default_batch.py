"""``DefaultPolicy.decide`` as columns, for big fleets: ``figures``, ``judge`` (the rule and
its ruling) and ``GuestMemo.remember`` for every guest at once, with numpy, over the guests'
memory kept as columns (one row a guest); then the host's part, from the columns when the
host is neither short nor over budget (objects only for the guests that get a decision), else
the scalar host part over every guest's plan. ``DefaultPolicy.decide`` calls ``decide_batch``
from ``BATCH_MIN_GUESTS`` live guests.

What it must reproduce exactly (see docs/design/vector-policy.md): float64 arithmetic is
IEEE-identical to Python's float; ``int()`` of a float truncates toward zero (``np.trunc``);
int / float is the int converted to float (exact under 2**53) then divided; the deque of
working sets is a ring of ``WS_RING`` slots whose live entries are those at or after
``now - WS_WINDOW_S`` (the deque drops its head only while it is older, and ``now`` never goes
back). The report inconsistencies the scalar helpers count one guest at a time are counted
here by mask (same totals). Where it cannot be exact (a clock gone back, a call rate the ring
cannot hold, non-finite figures, counts beyond 2**53), ``decide_batch`` declines and the
scalar path decides. ``memballoon.bench.vector_policy`` checks it against the scalar policy,
field by field, on the fleet's own inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Decision
from memballoon.policy.default import (
    BACKOFF_MAX_SCALE,
    BACKOFF_MIN_FRACTION,
    BAND_FRACTION,
    BIG_STEP_MAX_FRACTION,
    BUDGET_MARGIN_PAGES,
    EMERGENCY_MARGIN_PAGES,
    HOST_PSI_SOME_PCT,
    HURT_AGAIN_WITHIN_S,
    HURT_MEMORY_MAX_S,
    LOOKAHEAD_MAX_FRACTION,
    LOOKAHEAD_S,
    MAJOR_FAULTS_QUIET_PER_S,
    MARGIN_MIN_PAGES,
    MIN_CHANGE_PAGES,
    NEVER,
    PRESSURE_MEMORY_S,
    PROBE_STEP_INC,
    PROBE_STEP_MAX,
    PROBE_STEP_MIN,
    QUIET_CALLS_BEFORE_BIG_STEP,
    REFAULT_MEMORY_S,
    REFAULTING_MEMORY_S,
    RULES,
    SMALL_SKIPS,
    STUCK_AFTER_S,
    SWAPIN_TROUBLE_PER_S,
    URGENT,
    WS_WINDOW_S,
    DefaultPolicy,
    Figures,
    GuestMemo,
    ReportCounts,
    Ruling,
    Verdict,
    _Plan,
)
from memballoon.policy.observe import PolicyReportCounter
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.protocol.pressure import PressureReport

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

#: Slots of the working-set ring: the entries within WS_WINDOW_S plus the one to come (26 at
#: the short host's 0.2 s early steps)
WS_RING: Final = 32
#: ``RULES``' positions, the value of ``FigureColumns.rule``
RULE_INDEX: Final = {r.name: i for i, r in enumerate(RULES)}


def _f(xs: Sequence[float]) -> F64:
    return np.fromiter(xs, np.float64, len(xs))


def _i(xs: Sequence[int]) -> I64:
    return np.fromiter(xs, np.int64, len(xs))


@dataclass(slots=True)
class MemoColumns:
    """``GuestMemo`` as columns, row i for guest slot i (``NEVER``: never; ``has_*`` false:
    None)."""

    step: F64
    ws_t: F64  # (n, WS_RING) moments of the working sets; NEVER in an empty slot
    ws_v: I64  # (n, WS_RING) the working sets
    ws_pos: I64  # the slot the next working set goes to
    ws_any: B  # the deque is not empty
    ws_last: I64  # its newest working set
    # ``now - WS_WINDOW_S`` at the last append: the deque holds the ring's entries at or after
    # it (NEVER: no append yet, every entry the deque was loaded with)
    ws_cut: F64
    has_last: B  # ``last`` is not None
    last_id: I64  # id() of the last report (kept alive by ``last_ref``), 0 for ReportCounts
    last_ref: list[object]
    last_time: F64
    last_swapin: I64
    last_major: I64
    last_oom: I64
    last_has_refused: B
    last_refused: I64
    has_last_now: B
    last_now: F64
    has_last_balloon: B
    last_balloon: I64
    still_since: F64
    has_last_target: B
    last_target: I64
    hurt_size: I64
    hurt_at: F64
    hurt_ws: I64
    oom_at: F64
    hurt_refaulted: B
    faulted_at: F64
    quiet_calls: I64
    hurt_hold_s: F64
    hurt_mark: I64

    @classmethod
    def from_memos(cls, memos: Sequence[GuestMemo]) -> MemoColumns:
        n = len(memos)
        ws_t = np.full((n, WS_RING), NEVER)
        ws_v = np.zeros((n, WS_RING), np.int64)
        ws_pos = np.zeros(n, np.int64)
        for i, m in enumerate(memos):
            if len(m.ws) >= WS_RING:
                raise ValueError(f"a working-set deque of {len(m.ws)} > the ring's {WS_RING}")
            for j, (t, w) in enumerate(m.ws):
                ws_t[i, j], ws_v[i, j] = t, w
            ws_pos[i] = len(m.ws)
        lasts = [m.last for m in memos]
        counts = [ReportCounts(0.0, 0, 0, 0, None) if c is None else c for c in lasts]
        return cls(
            step=_f([m.step for m in memos]), ws_t=ws_t, ws_v=ws_v, ws_pos=ws_pos,
            ws_any=np.array([bool(m.ws) for m in memos], np.bool_),
            ws_last=_i([m.ws[-1][1] if m.ws else 0 for m in memos]),
            ws_cut=np.full(n, NEVER),
            has_last=np.array([c is not None for c in lasts], np.bool_),
            last_id=_i([id(c) if isinstance(c, PressureReport) else 0 for c in lasts]),
            last_ref=list(lasts),
            last_time=_f([c.time_s for c in counts]),
            last_swapin=_i([c.swap_in_pages for c in counts]),
            last_major=_i([c.major_faults for c in counts]),
            last_oom=_i([c.oom_kills for c in counts]),
            last_has_refused=np.array([c.refused_pages is not None for c in counts], np.bool_),
            last_refused=_i([c.refused_pages or 0 for c in counts]),
            has_last_now=np.array([m.last_now is not None for m in memos], np.bool_),
            last_now=_f([m.last_now if m.last_now is not None else 0.0 for m in memos]),
            has_last_balloon=np.array([m.last_balloon is not None for m in memos], np.bool_),
            last_balloon=_i([m.last_balloon or 0 for m in memos]),
            still_since=_f([m.still_since for m in memos]),
            has_last_target=np.array([m.last_target is not None for m in memos], np.bool_),
            last_target=_i([m.last_target or 0 for m in memos]),
            hurt_size=_i([m.hurt_size for m in memos]),
            hurt_at=_f([m.hurt_at for m in memos]),
            hurt_ws=_i([m.hurt_ws for m in memos]),
            oom_at=_f([m.oom_at for m in memos]),
            hurt_refaulted=np.array([m.hurt_refaulted for m in memos], np.bool_),
            faulted_at=_f([m.faulted_at for m in memos]),
            quiet_calls=_i([m.quiet_calls for m in memos]),
            hurt_hold_s=_f([m.hurt_hold_s for m in memos]),
            hurt_mark=_i([m.hurt_mark for m in memos]),
        )

    def memos(self) -> list[GuestMemo]:
        """Every row as the ``GuestMemo`` the scalar path would hold (its deque: the ring's
        entries the last append kept, oldest first)."""
        n = len(self.step)
        ws_t, ws_v = self.ws_t.tolist(), self.ws_v.tolist()
        pos, cut = self.ws_pos.tolist(), self.ws_cut.tolist()
        has_last, has_now = self.has_last.tolist(), self.has_last_now.tolist()
        last_now = self.last_now.tolist()
        has_b, last_b = self.has_last_balloon.tolist(), self.last_balloon.tolist()
        has_t, last_t = self.has_last_target.tolist(), self.last_target.tolist()
        out: list[GuestMemo] = []
        for (i, step, still, hurt, hurt_at, hurt_ws, oom_at, refaulted, faulted,
             quiet, hold, mark) in zip(range(n), self.step.tolist(), self.still_since.tolist(),
                                       self.hurt_size.tolist(), self.hurt_at.tolist(),
                                       self.hurt_ws.tolist(), self.oom_at.tolist(),
                                       self.hurt_refaulted.tolist(), self.faulted_at.tolist(),
                                       self.quiet_calls.tolist(), self.hurt_hold_s.tolist(),
                                       self.hurt_mark.tolist(), strict=True):
            ts, vs, p, c = ws_t[i], ws_v[i], pos[i], cut[i]
            ws: deque[tuple[float, int]] = deque()
            for j in range(p, p + WS_RING):  # insertion order: the slot ``ws_pos`` is oldest
                t = ts[j % WS_RING]
                if t != NEVER and t >= c:
                    ws.append((t, vs[j % WS_RING]))
            last = self.last_ref[i] if has_last[i] else None
            assert last is None or isinstance(last, PressureReport | ReportCounts)
            out.append(GuestMemo(
                step=step, ws=ws, last=last, last_now=last_now[i] if has_now[i] else None,
                last_balloon=last_b[i] if has_b[i] else None, still_since=still,
                last_target=last_t[i] if has_t[i] else None, hurt_size=hurt, hurt_at=hurt_at,
                hurt_ws=hurt_ws, oom_at=oom_at, hurt_refaulted=refaulted, faulted_at=faulted,
                quiet_calls=quiet, hurt_hold_s=hold, hurt_mark=mark))
        return out

    def concat(self, more: MemoColumns) -> MemoColumns:
        """These rows, then ``more``'s."""
        cols: dict[str, Any] = {
            k: (self.last_ref + more.last_ref if k == "last_ref"
                else np.concatenate([getattr(self, k), getattr(more, k)]))
            for k in self.__slots__}
        return MemoColumns(**cols)

    def take(self, rows: I64) -> MemoColumns:
        """The memory of the guests in slots ``rows`` (a copy, row i for ``rows[i]``)."""
        cols: dict[str, Any] = {
            k: ([self.last_ref[r] for r in rows.tolist()] if k == "last_ref"
                else getattr(self, k)[rows]) for k in self.__slots__}
        return MemoColumns(**cols)

    def put(self, rows: I64, part: MemoColumns) -> None:
        """Write ``part`` (from ``take(rows)``) back to slots ``rows``."""
        for k in self.__slots__:
            if k == "last_ref":
                for i, r in enumerate(rows.tolist()):
                    self.last_ref[r] = part.last_ref[i]
            else:
                getattr(self, k)[rows] = getattr(part, k)

    def ws_of(self, i: int) -> list[tuple[float, int]]:
        """Guest ``i``'s working sets, oldest first (the deque's entries not yet dropped are
        those in the window at its last append: compare with the deque after a call)."""
        live = self.ws_t[i] != NEVER
        order = np.argsort(self.ws_t[i][live], kind="stable")
        return [(float(t), int(w)) for t, w in zip(self.ws_t[i][live][order],
                                                  self.ws_v[i][live][order], strict=True)]


@dataclass(slots=True)
class FigureColumns:
    """``Figures``' fields for every guest (meaningful where ``fresh``), and the rule ``judge``
    picks (an index into ``RULES``)."""

    fresh: B
    stall_pct: F64
    d_swapin: I64
    d_oom: I64
    d_refused: I64
    swapin_rate: F64
    fault_rate: F64
    stuck: B
    has_last_balloon: B
    last_balloon: I64
    ws: I64
    avail: I64
    peak: I64
    ahead: I64
    margin: I64
    floor: I64
    budget_floor: I64
    step: I64
    severity: F64
    quiet_calls: I64
    free: I64
    repeated: B
    report_balloon: I64
    rule: I64
    # what the rulings read besides the fields above
    size: I64
    ram: I64
    ceiling: I64
    balloon: I64
    target_size: I64
    inflating: B
    free_now: I64
    idle: B
    backoff: I64
    band: I64


def backoff_of(severity: F64, ram: I64, step: I64) -> I64:
    """``Figures.backoff`` of every guest."""
    scale = np.minimum(BACKOFF_MAX_SCALE, np.maximum(1.0, severity))
    out: I64 = np.trunc(np.maximum(BACKOFF_MIN_FRACTION * ram, 2 * step) * scale
                        ).astype(np.int64)
    return out


@dataclass(slots=True)
class GuestInputs:
    """What ``figures`` reads of the guests' samples and reports, as columns (a columnar
    backend would hand these over; here ``gather`` reads them off the objects)."""

    guests: list[GuestSample]  # the samples read (held: while held, an id names one alone)
    g_id: I64  # id() of each sample
    reps: list[PressureReport]  # each guest's report (a placeholder where it has none)
    ram: I64
    balloon: I64
    target: I64
    min_pages: I64
    max_pages: I64  # -1: None
    has_report: B  # a report and its arrival time
    report_time: F64
    r_id: I64  # id() of the report: ``prev is r`` is the same id while the memory holds it
    r_time: F64
    r_swapin: I64
    r_major: I64
    r_oom: I64
    r_has_refused: B
    r_refused: I64
    r_avail_b: I64
    r_free_b: I64
    r_balloon: I64
    stall: F64


_NO_REPORT: Final = PressureReport("", 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
#: ``GuestInputs``' columns read off the reports alone (one report: the same figures)
_REPORT_COLUMNS: Final = ("r_time", "r_swapin", "r_major", "r_oom", "r_has_refused",
                          "r_refused", "r_avail_b", "r_free_b", "r_balloon", "stall")
#: the share of new samples (new reports) up to which ``gather`` re-reads only theirs
_REREAD_MAX: Final = 0.75
#: ``GuestInputs``' columns of one value a guest (``reps`` and the samples apart)
_ROW_COLUMNS: Final = ("ram", "balloon", "target", "min_pages", "max_pages", "has_report",
                       "report_time", "r_id", *_REPORT_COLUMNS)


def _report_columns(reps: Sequence[PressureReport]) -> tuple[Any, ...]:
    """The ``_REPORT_COLUMNS`` of ``reps``."""
    rf = [r.refused_pages for r in reps]
    n = len(rf)
    if None not in rf:  # (a C-level scan: the fleet's reports are all of one kind)
        has_refused, refused = np.ones(n, np.bool_), _i(rf)  # type: ignore[arg-type]
    elif rf.count(None) == n:
        has_refused, refused = np.zeros(n, np.bool_), np.zeros(n, np.int64)
    else:
        has_refused = np.array([x is not None for x in rf], np.bool_)
        refused = _i([0 if x is None else x for x in rf])
    return (_f([r.time_s for r in reps]), _i([r.swap_in_pages for r in reps]),
            _i([r.major_faults for r in reps]), _i([r.oom_kills for r in reps]),
            has_refused, refused, _i([r.available_bytes for r in reps]),
            _i([r.free_bytes for r in reps]), _i([r.balloon_actual_pages for r in reps]),
            _f([r.stall_pct for r in reps]))


def gather(guests: Sequence[GuestSample], prev: GuestInputs | None = None) -> GuestInputs:
    """``guests``' columns: the one per-guest Python loop left. With ``prev`` (the columns
    of as many guests, say the last call's), a row whose sample is the same object as in
    ``prev`` keeps ``prev``'s row, and a row whose report is the same object keeps ``prev``'s
    report figures (samples and reports are immutable; ``prev`` holds them, so an equal id is
    the same object): only the new samples, and their new reports, are read."""
    n = len(guests)
    if prev is not None and len(prev.guests) == n and n:
        g_id = np.fromiter(map(id, guests), np.int64, n)
        rows = np.flatnonzero(g_id != prev.g_id)
        if len(rows) <= _REREAD_MAX * n:
            return _gather_rows(guests, prev, g_id, rows)
    reps = [g.report if g.report is not None else _NO_REPORT for g in guests]
    r_id = _i([id(r) for r in reps])
    report_cols: tuple[Any, ...] | None = None
    if prev is not None and len(prev.reps) == n and n:
        fresh = np.flatnonzero(r_id != prev.r_id)
        if len(fresh) <= _REREAD_MAX * n:
            report_cols = tuple(getattr(prev, k).copy() for k in _REPORT_COLUMNS)
            if len(fresh):
                for col, part in zip(report_cols,
                                     _report_columns([reps[i] for i in fresh.tolist()]),
                                     strict=True):
                    col[fresh] = part
    if report_cols is None:
        report_cols = _report_columns(reps)
    mx = [g.settings.max_pages for g in guests]
    rt = [g.report_time for g in guests]
    has_report = r_id != id(_NO_REPORT)  # a report and its arrival time
    if None in rt:
        has_report &= np.array([t is not None for t in rt], np.bool_)
        rt = [0.0 if t is None else t for t in rt]
    g = list(guests)
    return GuestInputs(
        guests=g, g_id=np.fromiter(map(id, g), np.int64, n), reps=reps,
        ram=_i([g.ram_pages for g in guests]),
        balloon=_i([g.balloon_pages for g in guests]),
        target=_i([g.target_pages for g in guests]),
        min_pages=_i([g.settings.min_pages for g in guests]),
        max_pages=_i([-1 if x is None else x for x in mx]), has_report=has_report,
        report_time=_f(rt),  # type: ignore[arg-type]
        r_id=r_id, **dict(zip(_REPORT_COLUMNS, report_cols, strict=True)))


def _gather_rows(guests: Sequence[GuestSample], prev: GuestInputs, g_id: I64,
                 rows: I64) -> GuestInputs:
    """``gather(guests)`` from ``prev``, the rows ``rows`` (those whose sample is new) read
    again: ``gather`` of them alone, with ``prev``'s figures of the reports they share."""
    new = rows.tolist()
    part = [guests[i] for i in new]
    sub: GuestInputs | None = None
    if new:
        # the part's own ``prev``: its rows of ``prev`` (their reports, to keep the ones
        # that stand; samples all new, so no row is kept whole)
        sub = gather(part, _rows_of(prev, rows))
    out = GuestInputs(
        guests=list(guests), g_id=g_id, reps=list(prev.reps),
        **{k: getattr(prev, k).copy() for k in _ROW_COLUMNS})
    if sub is not None:
        for i, r in zip(new, sub.reps, strict=True):
            out.reps[i] = r
        for k in _ROW_COLUMNS:
            getattr(out, k)[rows] = getattr(sub, k)
    return out


def _rows_of(inp: GuestInputs, rows: I64) -> GuestInputs:
    """The rows ``rows`` of ``inp`` (for ``gather``'s ``prev``: its samples' ids set apart,
    so that no sample of it is taken for another's)."""
    k = len(rows)
    return GuestInputs(
        guests=[], g_id=np.full(k, -1, np.int64), reps=[inp.reps[i] for i in rows.tolist()],
        **{c: getattr(inp, c)[rows] for c in _ROW_COLUMNS})


def figures_batch(policy: DefaultPolicy, inp: GuestInputs, memo: MemoColumns,
                  now: float, counters: Counters) -> FigureColumns:
    """``policy.figures`` and ``judge``'s rule for the guests of ``inp`` (alive, row i in
    slot i of ``memo``, which takes in this call's reports as ``figures`` does its
    ``GuestMemo``s)."""
    n = len(inp.ram)
    reps, ram, balloon, target = inp.reps, inp.ram, inp.balloon, inp.target
    min_pages, max_pages, has_report, report_time = (
        inp.min_pages, inp.max_pages, inp.has_report, inp.report_time)
    r_id, r_time, r_swapin, r_major, r_oom = (
        inp.r_id, inp.r_time, inp.r_swapin, inp.r_major, inp.r_oom)
    r_has_refused, r_refused, r_avail_b, r_free_b, r_balloon, stall = (
        inp.r_has_refused, inp.r_refused, inp.r_avail_b, inp.r_free_b, inp.r_balloon,
        inp.stall)

    # ---- fresh_report
    fresh = has_report & (np.maximum(0.0, now - report_time) <= policy.max_report_age_s)
    blind = ~fresh
    m = memo
    m.has_last[blind] = False  # rates restart from the next report

    # ---- rates against the last report
    prev = m.has_last & fresh
    repeated = prev & (m.last_id == r_id)
    dt = np.zeros(n)
    timed = prev & m.has_last_now
    dt_r = r_time - m.last_time
    dt_now = now - m.last_now
    dt[timed] = np.where(dt_r <= 0, dt_now, dt_r)[timed]
    new = prev & ~repeated
    d_swapin, d_major, d_oom = (np.where(new, r - before, 0) for r, before in (
        (r_swapin, m.last_swapin), (r_major, m.last_major), (r_oom, m.last_oom)))
    back = d_swapin < 0, d_major < 0, d_oom < 0
    for mask, counter in zip(back, (PolicyReportCounter.SWAP_IN_BACKWARDS,
                                    PolicyReportCounter.MAJOR_FAULTS_BACKWARDS,
                                    PolicyReportCounter.OOM_KILLS_BACKWARDS), strict=True):
        k = int(np.count_nonzero(mask))
        if k:
            counters.inc(counter, k)
    d_swapin, d_major, d_oom = (np.maximum(d, 0) for d in (d_swapin, d_major, d_oom))
    ref = new & r_has_refused & m.last_has_refused
    d_refused = np.where(ref, r_refused - m.last_refused, 0)
    k = int(np.count_nonzero(d_refused < 0))
    if k:
        counters.inc(PolicyReportCounter.REFUSED_BACKWARDS, k)
    d_refused = np.maximum(d_refused, 0)
    pos_dt = dt > 0
    safe_dt = np.where(pos_dt, dt, 1.0)
    swapin_rate = np.where(pos_dt, d_swapin / safe_dt, 0.0)
    fault_rate = np.where(pos_dt, d_major / safe_dt, 0.0)

    # ---- the balloon's progress
    grown = ~m.has_last_balloon | (balloon > m.last_balloon)
    moved = fresh & (grown | ~m.has_last_target | (target != m.last_target))
    m.still_since[moved] = now
    stuck = ~grown & (target > balloon) & (now - m.still_since >= STUCK_AFTER_S)
    has_last_balloon = m.has_last_balloon.copy()
    last_balloon = m.last_balloon.copy()

    # ---- observe's page figures (their inconsistencies counted by mask, fresh guests only)
    size = ram - balloon
    size_then = ram - np.minimum(ram, r_balloon)
    avail_raw = np.maximum(0, r_avail_b) // PAGE_SIZE
    over_then = fresh & (avail_raw > size_then)
    ws = np.maximum(0, size_then - np.minimum(avail_raw, size_then))
    over_size = avail_raw > size
    over_ram = fresh & over_size & (avail_raw > ram)
    avail = np.where(over_size, np.maximum(0, size), avail_raw)
    free_raw = np.maximum(0, r_free_b) // PAGE_SIZE
    free_over = fresh & (free_raw > ram)
    free = np.where(free_raw > ram, np.maximum(0, size), free_raw)
    for mask, counter in ((over_then, PolicyReportCounter.AVAILABLE_ABOVE_SIZE),
                          (over_ram, PolicyReportCounter.AVAILABLE_ABOVE_RAM),
                          (free_over, PolicyReportCounter.FREE_ABOVE_RAM)):
        k = int(np.count_nonzero(mask))
        if k:
            counters.inc(counter, k)

    # ---- the working set's growth and peak (GuestMemo.see_working_set)
    growth = np.zeros(n)
    grow = fresh & m.ws_any & pos_dt
    growth[grow] = np.maximum((ws - m.ws_last)[grow] / dt[grow], 0.0)
    rows = np.flatnonzero(fresh)
    # the fresh rows: every row as a slice where all are (the fleet: no index arrays)
    sel: slice | I64 = slice(None) if len(rows) == n else rows
    slot = m.ws_pos[sel]
    oldest = now - WS_WINDOW_S
    if np.any(m.ws_t[rows, slot] >= oldest):
        raise ValueError("working-set ring too small for this call rate")
    m.ws_t[rows, slot] = now
    m.ws_v[rows, slot] = ws[sel]
    m.ws_pos[sel] = (slot + 1) % WS_RING
    m.ws_any[sel] = True
    m.ws_last[sel] = ws[sel]
    m.ws_cut[sel] = oldest
    # the deque's peak: the max of the ring's entries in the window (a masked reduction, no
    # (n, WS_RING) temporary; a guest with none, a blind one, gets int64's least as before)
    peak = np.max(m.ws_v, axis=1, where=m.ws_t >= oldest, initial=np.iinfo(np.int64).min)

    # ---- margin, floor
    ahead = np.minimum(np.trunc(growth * LOOKAHEAD_S),
                       np.trunc(LOOKAHEAD_MAX_FRACTION * ram)).astype(np.int64)
    margin = np.trunc(np.maximum(float(MARGIN_MIN_PAGES), policy.margin_fraction * ram)
                      ).astype(np.int64) + ahead
    m.faulted_at[fresh & ((d_major != 0) | (d_swapin != 0))] = now
    hurting = fresh & (m.hurt_size != 0)
    moved = hurting & (now >= m.oom_at + PRESSURE_MEMORY_S) & (ws + margin < m.hurt_ws)
    held = m.hurt_hold_s != 0.0
    forget = moved | (hurting & np.where(
        held, now >= m.hurt_at + m.hurt_hold_s,
        (now >= m.hurt_at + np.where(m.hurt_refaulted, REFAULTING_MEMORY_S, PRESSURE_MEMORY_S))
        | (m.hurt_refaulted & (now >= np.maximum(m.hurt_at, m.faulted_at) + REFAULT_MEMORY_S))))
    m.hurt_size[forget] = 0
    m.hurt_hold_s[moved] = 0.0  # the working set moved away: the back-off goes too
    m.hurt_mark[moved] = 0
    hurt_size = m.hurt_size
    ceiling = np.where((max_pages < 0) | (max_pages > ram), ram, max_pages)
    floor = np.minimum(np.maximum(np.maximum(min_pages, peak + margin), hurt_size), ceiling)
    unquiet = fresh & ((stall > policy.stall_quiet_pct) | (d_swapin != 0) | (d_oom != 0)
                       | (avail < margin))
    m.quiet_calls[unquiet] = 0
    budget_floor = np.minimum(floor, np.maximum(np.maximum(min_pages, hurt_size),
                                                ws + BUDGET_MARGIN_PAGES + ahead))
    step = np.maximum(1, np.trunc(m.step * ram).astype(np.int64))
    tp = policy.stall_trouble_pct
    severity = np.maximum(stall / tp if tp else np.zeros(n), swapin_rate / SWAPIN_TROUBLE_PER_S)

    # ---- the memory's last report (fresh guests)
    m.has_last[sel] = True
    m.last_id[sel] = r_id[sel]
    if isinstance(sel, slice):
        m.last_ref[:] = reps
    else:
        for i in rows.tolist():
            m.last_ref[i] = reps[i]
    for col, val in ((m.last_time, r_time), (m.last_swapin, r_swapin),
                     (m.last_major, r_major), (m.last_oom, r_oom),
                     (m.last_refused, r_refused), (m.last_balloon, balloon),
                     (m.last_target, target)):
        col[sel] = val[sel]
    m.last_now[sel] = now
    m.last_has_refused[sel] = r_has_refused[sel]
    for flag in (m.has_last_now, m.has_last_balloon, m.has_last_target):
        flag[sel] = True

    # ---- judge: the first rule whose ``when`` holds, in RULES' order
    troubled = (stall > tp) | (swapin_rate > SWAPIN_TROUBLE_PER_S)
    inflating = target > balloon
    target_size = ram - target
    quiet = ((stall <= policy.stall_quiet_pct) & (d_swapin == 0)
             & (fault_rate <= MAJOR_FAULTS_QUIET_PER_S))
    settled = np.abs(target - balloon) < MIN_CHANGE_PAGES
    free_now = np.maximum(0, free - np.maximum(0, balloon - r_balloon))
    idle = (free_now > 2 * margin) & (m.quiet_calls + 1 > QUIET_CALLS_BEFORE_BIG_STEP)
    backoff = backoff_of(severity, ram, step)
    band = np.trunc(BAND_FRACTION * ram).astype(np.int64)
    whens: dict[str, B] = {
        "blind": blind,
        "emergency": (d_oom > 0) | (avail < EMERGENCY_MARGIN_PAGES + ahead),
        "own_pressure": troubled & (balloon == 0) & (target == 0),
        "reclaiming": (troubled & (d_swapin == 0) & (fault_rate == 0.0) & (avail >= margin)
                       & has_last_balloon & (balloon > last_balloon)),
        "room": (troubled & (d_swapin == 0) & (balloon <= target)
                 & (free_now - np.maximum(0, target - balloon) >= margin + backoff)),
        "reread": troubled & repeated,
        "trouble": troubled,
        "stalled": stuck | ((d_refused > 0) & inflating),
        "under_floor": target_size < floor,
        "probe": (policy.probe & quiet & settled & (target_size - floor >= 2 * band)
                  & (target_size > floor) & (~repeated | idle)),
        "hold": np.ones(n, np.bool_),
    }
    stack = np.stack([whens[r.name] for r in RULES])
    rule = np.argmax(stack, axis=0).astype(np.int64)  # the first True (hold: always)

    return FigureColumns(
        fresh=fresh, stall_pct=stall, d_swapin=d_swapin, d_oom=d_oom, d_refused=d_refused,
        swapin_rate=swapin_rate, fault_rate=fault_rate, stuck=stuck,
        has_last_balloon=has_last_balloon, last_balloon=last_balloon, ws=ws, avail=avail,
        peak=peak, ahead=ahead, margin=margin, floor=floor, budget_floor=budget_floor,
        step=step, severity=severity, quiet_calls=m.quiet_calls.copy(), free=free,
        repeated=repeated, report_balloon=r_balloon, rule=rule, size=size, ram=ram, ceiling=ceiling,
        balloon=balloon, target_size=target_size, inflating=inflating, free_now=free_now,
        idle=idle, backoff=backoff, band=band)


@dataclass(slots=True)
class RulingColumns:
    """``Ruling``'s fields for every guest (``none``: the rule decided None, blind and not
    inflating; ``has_*`` false: None)."""

    none: B
    size: I64
    floor: I64
    pressure: F64
    has_balloon: B
    balloon: I64
    has_hurt: B
    hurt: I64
    oom: B
    refaulted: B
    quiet: B
    probed: B


def rulings_batch(f: FigureColumns) -> RulingColumns:
    """What the rule ``f.rule`` picked decides, for every guest (each rule's ``decide``)."""
    rule = f.rule
    is_ = {name: rule == i for name, i in RULE_INDEX.items()}
    size, margin, ceiling, floor, ram, step = f.size, f.margin, f.ceiling, f.floor, f.ram, f.step
    cap = np.minimum(size + margin, ceiling)  # a size that hurt is remembered no higher
    # _emergency: the full margin back (an OOM kill: the whole balloon)
    e_new = size + np.maximum(margin - f.avail, step)
    e_hurt = np.minimum(e_new, cap)
    e_size = np.maximum(np.where(f.d_oom > 0, ceiling, e_new), floor)
    # _trouble: a back-off growing with the pressure
    t_new = size + f.backoff
    # _under_floor: the floor and a band (a deficit under MIN_CHANGE_PAGES: the floor only)
    u_size = np.where(floor - f.target_size >= MIN_CHANGE_PAGES,
                      np.minimum(floor + f.band, ceiling), floor)
    # _probe: the step (none on a repeated report), or half the idle MemFree
    p_step = np.where(f.repeated, 0, step)
    big = np.minimum((f.free_now - margin) // 2,
                     np.trunc(BIG_STEP_MAX_FRACTION * ram).astype(np.int64))
    p_step = np.where(f.idle, np.maximum(p_step, big), p_step)
    p_size = np.maximum(floor, f.target_size - p_step)
    r_size = np.select(
        [is_["blind"], is_["emergency"], is_["own_pressure"], is_["trouble"], is_["stalled"],
         is_["under_floor"], is_["probe"]],
        [size, e_size, size, t_new, size, u_size, p_size],
        f.target_size)  # reclaiming, room,
    # hold
    r_floor = np.select([is_["blind"], is_["trouble"]], [np.zeros_like(floor),
                                                         np.maximum(floor, t_new)], floor)
    pressure = np.select([is_["blind"], is_["emergency"]],
                         [np.zeros_like(f.severity), 100.0 + f.severity], f.severity)
    has_hurt = is_["emergency"] | is_["trouble"] | is_["stalled"]
    hurt = np.select([is_["emergency"], is_["trouble"]], [e_hurt, np.minimum(t_new, cap)],
                     size)
    return RulingColumns(
        none=is_["blind"] & ~f.inflating, size=r_size, floor=r_floor, pressure=pressure,
        has_balloon=is_["blind"] | is_["stalled"], balloon=f.balloon, has_hurt=has_hurt,
        hurt=hurt, oom=is_["emergency"] & (f.d_oom > 0),
        refaulted=is_["trouble"] & ((f.fault_rate > 0) | (f.d_swapin > 0)),
        quiet=is_["probe"], probed=is_["trouble"])


def ruling_of(r: RulingColumns, i: int) -> Ruling | None:
    """Guest ``i``'s ``Ruling`` (None where its rule decided none), with Python numbers: what
    the scalar rule's ``decide`` returns, to compare or to build a plan from."""
    if r.none[i]:
        return None
    return Ruling(int(r.size[i]), int(r.floor[i]), float(r.pressure[i]),
                  balloon=int(r.balloon[i]) if r.has_balloon[i] else None,
                  hurt=int(r.hurt[i]) if r.has_hurt[i] else None, oom=bool(r.oom[i]),
                  refaulted=bool(r.refaulted[i]), quiet=bool(r.quiet[i]),
                  probed=bool(r.probed[i]))


def remember_batch(memo: MemoColumns, f: FigureColumns, r: RulingColumns, now: float) -> None:
    """``GuestMemo.remember`` of every guest's ruling: the size that hurt (its step halves),
    an OOM kill, a quiet probe (its step grows)."""
    rows = r.has_hurt & ~r.none
    # a hurt while nothing is remembered: its memory (``GuestMemo.hold_after``; only a
    # probe's backs off)
    first = rows & (memo.hurt_size == 0)
    held = np.where(memo.hurt_hold_s != 0.0, memo.hurt_hold_s,
                    np.where(memo.hurt_refaulted, REFAULTING_MEMORY_S, PRESSURE_MEMORY_S))
    again = ((memo.hurt_mark != 0) & (np.abs(r.hurt - memo.hurt_mark) <= f.margin)
             & (now - memo.hurt_at <= held + HURT_AGAIN_WITHIN_S))
    memo.hurt_hold_s[first] = np.where(r.probed & again,
                                       np.minimum(HURT_MEMORY_MAX_S, 2.0 * held), 0.0)[first]
    memo.hurt_mark[first] = np.where(r.probed, r.hurt, 0)[first]
    memo.step[rows] = np.maximum(PROBE_STEP_MIN, memo.step[rows] / 2)
    memo.hurt_size[rows] = r.hurt[rows]
    memo.hurt_at[rows] = now
    memo.hurt_ws[rows] = f.ws[rows]
    memo.hurt_refaulted[rows] = r.refaulted[rows]
    memo.oom_at[r.oom] = now
    quiet = r.quiet
    memo.quiet_calls[quiet] += 1
    memo.step[quiet] = np.minimum(PROBE_STEP_MAX, memo.step[quiet] + PROBE_STEP_INC)


# ---------------------------------------------------------------------- the wired-in path
#: what the columns' int64 arithmetic and int -> float conversions keep exact (a decoded
#: report's counts are within it, ``protocol.pressure.MAX_VALUE``)
_EXACT: Final = 1 << 53


def _loadable(memos: Sequence[GuestMemo]) -> bool:
    """Whether ``MemoColumns.from_memos`` carries these memories exactly: each deque fits the
    ring, in time order (the scalar deque drops only its head), with finite moments and
    exact counts."""
    for m in memos:
        if len(m.ws) >= WS_RING:
            return False
        t0 = NEVER
        for t, w in m.ws:
            if not t0 <= t < float("inf") or not -_EXACT < w < _EXACT:
                return False
            t0 = t
    return True


@dataclass(slots=True)
class BatchMemo:
    """``DefaultPolicy``'s memory while it decides as columns: one row a guest, in the order
    the scalar ``state`` holds them (the order each guest first came alive, or the restored
    snapshot's); a gone guest's row is dropped, a new guest's appended."""

    cols: MemoColumns
    names: list[str]
    now: float = NEVER  # the last call's ``now``
    seen: list[str] | None = None  # the last call's guests' names, and which were alive
    seen_alive: list[bool] | None = None
    rows: I64 | None = None  # the rows of the last call's live guests, in its order
    whole: bool = False  # ``rows`` is every row in order (no take/put needed)
    inp: GuestInputs | None = None  # the last call's live guests' columns (``gather``'s prev)

    @classmethod
    def load(cls, memos: dict[str, GuestMemo]) -> BatchMemo | None:
        """``memos`` as columns (None: not exactly: the scalar path keeps them)."""
        ms = list(memos.values())
        if not _loadable(ms):
            return None
        try:
            cols = MemoColumns.from_memos(ms)
        except OverflowError:
            return None
        return cls(cols, list(memos))

    def to_memos(self) -> dict[str, GuestMemo]:
        return dict(zip(self.names, self.cols.memos(), strict=True))

    def follow(self, names: list[str], alive: list[bool]) -> I64:
        """The rows of the live guests among ``names`` (this call's guests, in order): the
        rows of guests no longer listed dropped, a row appended for each new live one (the
        scalar path: a memo for every guest it plans, none kept for a guest that went)."""
        if names == self.seen and alive == self.seen_alive and self.rows is not None:
            return self.rows
        listed = set(names)
        keep = [i for i, n in enumerate(self.names) if n in listed]
        kept = [self.names[i] for i in keep]
        known = set(kept)
        new = [n for n, a in zip(names, alive, strict=True) if a and n not in known]
        cols = self.cols
        if len(keep) < len(self.names):
            cols = cols.take(np.array(keep, np.int64))
        if new:
            cols = cols.concat(MemoColumns.from_memos([GuestMemo() for _ in new]))
        self.cols, self.names = cols, kept + new
        slot = {n: i for i, n in enumerate(self.names)}
        rows = np.array([slot[n] for n, a in zip(names, alive, strict=True) if a], np.int64)
        self.seen, self.seen_alive, self.rows = list(names), list(alive), rows
        self.whole = len(rows) == len(self.names) and bool(
            np.array_equal(rows, np.arange(len(rows))))
        return rows


def _exact(inp: GuestInputs, now: float) -> bool:
    """Whether the columns compute what Python's numbers would: finite moments and
    pressures, counts and sizes where int64 and float64 are exact (a decoded report's are;
    one built in-process is not checked)."""
    if not np.isfinite(now):
        return False
    if not len(inp.ram):
        return True
    # one reduction over all the columns, not one a column (numpy's cost is per call)
    if not np.isfinite(np.concatenate((inp.report_time, inp.r_time, inp.stall))).all():
        return False
    ints = np.concatenate((inp.ram, inp.balloon, inp.target, inp.min_pages, inp.max_pages,
                           inp.r_swapin, inp.r_major, inp.r_oom, inp.r_refused, inp.r_avail_b,
                           inp.r_free_b, inp.r_balloon))
    return int(ints.min()) > -_EXACT and int(ints.max()) < _EXACT


#: ``RULES``' verdicts by rule index, and which of them a too small change skips
_VERDICTS: Final = tuple(r.verdict for r in RULES)
_SMALL_SKIPS: Final = np.array([v in SMALL_SKIPS for v in _VERDICTS], np.bool_)
_BLIND: Final = RULE_INDEX["blind"]
_OWN_PRESSURE: Final = RULE_INDEX["own_pressure"]
_ROOM: Final = RULE_INDEX["room"]


def decide_batch(policy: DefaultPolicy, host: HostSample, guests: Sequence[GuestSample],
                 now: float) -> list[Decision] | None:
    """``policy.decide`` as columns: the same decisions, counters and memory. None (and
    nothing changed but the memory's form) where the columns cannot be exact: a clock gone
    back, a working set the ring cannot hold, figures beyond float64's exact range, two
    guests of one name."""
    bm = policy._batch
    if bm is None:
        bm = BatchMemo.load(policy._state)
        if bm is None:
            return None
        policy._batch, policy._state = bm, {}
    if now < bm.now:
        return None  # the ring keeps the deque only while ``now`` never goes back
    names = [g.name for g in guests]
    alive = [g.alive for g in guests]
    if names != bm.seen and len(set(names)) < len(names):
        return None
    rows = bm.follow(names, alive)
    live = guests if len(rows) == len(guests) else [
        g for g, a in zip(guests, alive, strict=True) if a]
    try:
        inp = gather(live, bm.inp)
    except OverflowError:
        return None
    bm.inp = inp
    if not _exact(inp, now):
        return None
    memo = bm.cols if bm.whole else bm.cols.take(rows)
    n = len(live)
    if n and bool(np.any(memo.ws_t[np.arange(n), memo.ws_pos] >= now - WS_WINDOW_S)):
        return None  # a call rate the ring cannot hold (figures_batch would raise)
    counters = policy.counters
    fc = figures_batch(policy, inp, memo, now, counters)
    rc = rulings_batch(fc)
    remember_batch(memo, fc, rc, now)
    if not bm.whole:
        bm.cols.put(rows, memo)
    bm.now = now
    rule = fc.rule
    for index in (_BLIND, _OWN_PRESSURE, _ROOM):  # the rules that count (in RULES' order)
        counter = RULES[index].counter
        k = int(np.count_nonzero(rule == index))
        if k and counter is not None:
            counters.inc(counter, k)
    planned = ~rc.none
    # ``_plan`` reads a blind guest's stale report too (for ``soft_floor``): its MemFree
    # beyond RAM counts all the same
    free_raw = np.maximum(0, inp.r_free_b) // PAGE_SIZE
    k = int(np.count_nonzero(~fc.fresh & planned & (free_raw > inp.ram)))
    if k:
        counters.inc(PolicyReportCounter.FREE_ABOVE_RAM, k)

    psi_pressed = (host.psi_some_avg10 is not None
                   and host.psi_some_avg10 >= HOST_PSI_SOME_PCT)
    pressed = host.short_pages > 0 or psi_pressed
    excess = 0
    if not pressed:
        # the guests' growth if every plan is carried out (``_carry_out``'s sum)
        ram, balloon = inp.ram, inp.balloon
        planned_size = np.where(rc.has_balloon, ram - rc.balloon, rc.size)
        growth = int(np.sum(np.where(planned, planned_size - (ram - balloon), 0)))
        excess = host.resident_pages + growth - host.budget_pages
    if pressed or excess > 0:
        # the host needs memory back (rarer): the scalar host part over every plan
        return policy._carry_out(host, _plans(policy, live, fc, rc, inp,
                                              np.flatnonzero(planned), now))
    # nobody's plan changes: decisions only where the plan moves the target enough
    target = inp.target
    wanted = np.where(rc.has_balloon, rc.balloon, inp.ram - rc.size)
    ceiling_at = (inp.max_pages < 0) | (inp.max_pages >= inp.ram)
    lo = np.where(ceiling_at, 0, inp.ram - inp.max_pages)
    hi = inp.ram - np.where(inp.min_pages < inp.ram, inp.min_pages, inp.ram)
    clamped = np.minimum(wanted, hi)
    clamped = np.where(clamped < lo, lo, clamped)
    emits = planned & (clamped != target) & ~(
        _SMALL_SKIPS[rule] & (np.abs(clamped - target) < MIN_CHANGE_PAGES))
    return _emit(policy, host, live, fc, rc, inp, np.flatnonzero(emits), clamped, now)


#: the keys of a fresh guest's ``Figures.inputs``, in its order, and the columns they are
#: read from (``stall_pct``: the report's own number, as ``Figures`` holds it)
INPUT_KEYS: Final = (
    "stall_pct", "swap_in_per_s", "major_faults_per_s", "oom_kills_new", "refused_new",
    "available_pages", "working_set_pages", "peak_working_set_pages", "margin_pages",
    "floor_pages", "size_pages", "balloon_pages", "target_pages", "step_pages",
    "budget_floor_pages")
_URGENT: Final = np.array([v in URGENT for v in _VERDICTS], np.bool_)
_EMERGENCY: Final = RULE_INDEX["emergency"]
_TROUBLE: Final = RULE_INDEX["trouble"]
_UNDER_FLOOR: Final = RULE_INDEX["under_floor"]
_PROBE: Final = RULE_INDEX["probe"]
_HOLD: Final = RULE_INDEX["hold"]
#: the rules whose reason ``_emit`` writes from the columns (``why_of``); the others' (rare:
#: blind, own_pressure, reclaiming, room, stalled) come from their ``Rule.why`` over a ``_Plan``
_COLUMN_WHY: Final = np.array([i in (_EMERGENCY, _TROUBLE, _UNDER_FLOOR, _PROBE, _HOLD)
                               for i in range(len(RULES))], np.bool_)


def why_of(rule: int, stall_pct: float, d_oom: int, avail: int, margin: int,
           swapin_rate: float, target_size: int, floor: int, size: int) -> str:
    """The reason ``RULES[rule].why`` gives a fresh guest with these figures and a ruling of
    ``size`` (one of the ``_COLUMN_WHY`` rules)."""
    if rule == _HOLD:
        return "default: hold"
    if rule == _PROBE:
        return (f"default: quiet (stall {stall_pct:.2f}%): probe down "
                f"{target_size - size} pages toward floor {floor}")
    if rule == _UNDER_FLOOR:
        return f"default: size {target_size} under safety floor {floor}: grow"
    if rule == _EMERGENCY:
        why = (f"guest OOM-killed ({d_oom} new)" if d_oom > 0
               else f"available {avail} pages under margin {margin}")
        return f"default: emergency deflate: {why}"
    if rule == _TROUBLE:
        return (f"default: back off: stall {stall_pct:.2f}%, swap-in "
                f"{swapin_rate:.0f} pages/s")
    raise ValueError(f"no column reason for rule {RULES[rule].name}")


def _emit(policy: DefaultPolicy, host: HostSample, live: Sequence[GuestSample],
          fc: FigureColumns, rc: RulingColumns, inp: GuestInputs, rows: I64, clamped: I64,
          now: float) -> list[Decision]:
    """``DefaultPolicy._decisions`` of the guests in ``rows`` (each gets one: ``clamped``,
    the clamped target, moves enough), when the host part changed no plan: the reason and
    the inputs from the columns, read once a column; a ``_Plan`` only where the rule's reason
    is not written here."""
    if not len(rows):
        return []
    rule = fc.rule[rows]
    by_column = _COLUMN_WHY[rule]
    plans = {} if by_column.all() else {
        p.g.name: p for p in _plans(policy, live, fc, rc, inp, rows[~by_column], now)}
    # every figure an input journals, as floats (the ints are below 2**53: exact)
    figs = np.column_stack([c[rows] for c in (
        fc.stall_pct, fc.swapin_rate, fc.fault_rate, fc.d_oom, fc.d_refused, fc.avail, fc.ws,
        fc.peak, fc.margin, fc.floor, fc.size, inp.balloon, inp.target, fc.step,
        fc.budget_floor)]).astype(np.float64).tolist()
    # the host's figures follow the guest's: one dict of both a decision
    host_inputs = DefaultPolicy.host_inputs(host)
    keys = INPUT_KEYS + tuple(host_inputs)
    host_values = list(host_inputs.values())
    out: list[Decision] = []
    for (i, k, col, target, urgent, d_oom, avail, margin, target_size, floor, size,
         fig) in zip(rows.tolist(), rule.tolist(), by_column.tolist(), clamped[rows].tolist(),
                     _URGENT[rule].tolist(), fc.d_oom[rows].tolist(), fc.avail[rows].tolist(),
                     fc.margin[rows].tolist(), fc.target_size[rows].tolist(),
                     fc.floor[rows].tolist(), rc.size[rows].tolist(), figs, strict=True):
        g = live[i]
        if col:
            r = g.report  # (fresh: every column-reason rule follows blind)
            assert r is not None
            fig[0] = r.stall_pct  # the report's number, as ``Figures`` holds it
            reason = why_of(k, r.stall_pct, d_oom, avail, margin, fig[1], target_size, floor,
                            size)  # (fig[1]: the swap-in rate)
            fig += host_values
            inputs = dict(zip(keys, fig, strict=True))
        else:
            p = plans[g.name]
            inputs, reason = p.f.inputs(), p.why()
            inputs.update(host_inputs)
        out.append(Decision(g.name, target, reason, inputs, urgent=urgent))
    return out


def _plans(policy: DefaultPolicy, live: Sequence[GuestSample], fc: FigureColumns,
           rc: RulingColumns, inp: GuestInputs, rows: I64, now: float) -> list[_Plan]:
    """The ``_Plan`` of each of ``rows`` (of guests that have one, in order), as ``_plan``
    builds it, with Python numbers."""
    sel = rows
    cols = {k: getattr(fc, k)[sel].tolist() for k in (
        "fresh", "d_swapin", "d_oom", "d_refused", "swapin_rate", "fault_rate", "stuck",
        "has_last_balloon", "last_balloon", "ws", "avail", "peak", "ahead", "margin", "floor",
        "budget_floor", "step", "severity", "quiet_calls", "free", "repeated", "rule")}
    r_none = rc.none[sel].tolist()
    r_size, r_floor, r_pressure = (rc.size[sel].tolist(), rc.floor[sel].tolist(),
                                   rc.pressure[sel].tolist())
    r_has_b, r_b = rc.has_balloon[sel].tolist(), rc.balloon[sel].tolist()
    r_has_h, r_h = rc.has_hurt[sel].tolist(), rc.hurt[sel].tolist()
    r_oom, r_ref, r_quiet, r_probed = (rc.oom[sel].tolist(), rc.refaulted[sel].tolist(),
                                       rc.quiet[sel].tolist(), rc.probed[sel].tolist())
    probe, quiet_pct, trouble_pct = (policy.probe, policy.stall_quiet_pct,
                                     policy.stall_trouble_pct)
    out: list[_Plan] = []
    for j, i in enumerate(sel.tolist()):
        assert not r_none[j]
        g = live[i]
        r = g.report
        if cols["fresh"][j]:
            assert r is not None
            f = Figures(
                g, now, True, r.stall_pct, cols["d_swapin"][j], cols["d_oom"][j],
                cols["d_refused"][j], cols["swapin_rate"][j], cols["fault_rate"][j],
                cols["stuck"][j],
                cols["last_balloon"][j] if cols["has_last_balloon"][j] else None,
                cols["ws"][j], cols["avail"][j], cols["peak"][j], cols["ahead"][j],
                cols["margin"][j], cols["floor"][j], cols["budget_floor"][j], cols["step"][j],
                cols["severity"][j], cols["quiet_calls"][j], probe, quiet_pct, trouble_pct,
                cols["free"][j], cols["repeated"][j], r.balloon_actual_pages)
        else:
            f = Figures(g, now, fresh=False)
        rule = RULES[cols["rule"][j]]
        ruling = Ruling(r_size[j], r_floor[j], r_pressure[j],
                        balloon=r_b[j] if r_has_b[j] else None,
                        hurt=r_h[j] if r_has_h[j] else None, oom=r_oom[j],
                        refaulted=r_ref[j], quiet=r_quiet[j], probed=r_probed[j])
        p = _Plan(g, rule.verdict, ruling.size, ruling.floor, ruling.pressure, f, rule, ruling,
                  ruling.balloon, budget_floor=f.budget_floor)
        if rule.verdict is Verdict.EMERGENCY and f.d_oom == 0:
            p.relief = min(ruling.size, f.size + f.squeeze_margin - f.avail)
        if r is not None:
            p.free = cols["free"][j]  # (counted above for a blind guest, by figures_batch
            # for a fresh one)
        out.append(p)
    return out


__all__ = [
    "INPUT_KEYS",
    "RULE_INDEX",
    "WS_RING",
    "BatchMemo",
    "FigureColumns",
    "GuestInputs",
    "MemoColumns",
    "RulingColumns",
    "decide_batch",
    "figures_batch",
    "gather",
    "remember_batch",
    "ruling_of",
    "rulings_batch",
    "why_of",
]
