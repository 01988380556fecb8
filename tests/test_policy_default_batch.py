"""The spike's columnar figures equal ``DefaultPolicy.figures`` exactly on reports built to hit
the odd cases: counters going back, figures beyond RAM, a stale report, none, a repeated one,
refused pages, a stuck inflation, OOM kills, troubled and idle guests, a size that hurt; and its
columnar memory, carried on by ``figures_batch`` and ``remember_batch`` alone, stays the
scalar ``GuestMemo``s."""

from __future__ import annotations

import random

from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.default import RULES, DefaultPolicy, GuestMemo, judge
from memballoon.policy.default_batch import (
    MemoColumns,
    figures_batch,
    gather,
    remember_batch,
    ruling_of,
    rulings_batch,
)
from memballoon.policy.observe import PolicyReportCounter
from memballoon.policy.sample import GuestSample, GuestSettings
from memballoon.protocol.pressure import PressureReport

FIELDS = ("stall_pct", "d_swapin", "d_oom", "d_refused", "swapin_rate", "fault_rate", "stuck",
          "last_balloon", "ws", "avail", "peak", "ahead", "margin", "floor", "budget_floor",
          "step", "severity", "quiet_calls", "free", "repeated", "report_balloon")
REMEMBERED = ("step", "still_since", "faulted_at", "hurt_size", "hurt_at", "hurt_ws",
              "hurt_refaulted", "oom_at", "quiet_calls")
RAM = 262144  # 1 GiB


def _quiet(i: int, t: float) -> GuestSample:
    """A guest quiet call after call, mostly free: after a few probes, an idle one."""
    r = PressureReport(f"g{i}", t, RAM * PAGE_SIZE, 150000 * PAGE_SIZE, 200000 * PAGE_SIZE,
                       0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
    return GuestSample(f"g{i}", RAM, 0, 0, GuestSettings(), r, t)


def _guest(rng: random.Random, i: int, t: float, last: GuestSample | None) -> GuestSample:
    if i >= 56:
        return _quiet(i, t)
    balloon = rng.choice([0, 0, 1000, 50000, 200000])
    if last is not None and rng.random() < 0.5:
        balloon = last.balloon_pages  # a balloon that did not move (stuck, under a target)
    target = rng.choice([balloon, balloon, balloon + 5000, 0])
    if last is not None and rng.random() < 0.3 and last.report is not None:
        return GuestSample(f"g{i}", RAM, balloon, target, last.settings, last.report,
                           last.report_time)  # the report the last call read
    settings = rng.choice([GuestSettings(), GuestSettings(min_pages=100000),
                           GuestSettings(min_pages=1000, max_pages=200000)])
    base = last.report if last is not None and last.report is not None else None

    def count(before: int) -> int:  # cumulative, now and then going back (a restart)
        return rng.choice([before, before + rng.randrange(0, 3000), 0])

    r = PressureReport(
        f"g{i}", t - rng.choice([0.0, 0.0, 0.5]), RAM * PAGE_SIZE,
        rng.choice([0, 20000, 150000, 300000]) * PAGE_SIZE,  # free: beyond RAM too
        rng.choice([100, 3000, 60000, 150000, 300000]) * PAGE_SIZE,  # available: beyond too
        0, 0, balloon * PAGE_SIZE,
        count(base.swap_in_pages if base else 0), 0,
        count(base.major_faults if base else 0), count(base.oom_kills if base else 0),
        0, rng.choice([0.0, 0.1, 0.5, 3.0, 40.0]), target, rng.choice([balloon, 0, 2 * RAM]),
        rng.choice([None, 0, count((base.refused_pages or 0) if base else 0)]))
    arrived = rng.choice([t, t, t - 20.0, None])  # a stale report: blind
    if rng.random() < 0.1:
        return GuestSample(f"g{i}", RAM, balloon, target, settings)
    return GuestSample(f"g{i}", RAM, balloon, target, settings, r, arrived)


def test_columns_equal_the_scalar_figures_call_after_call() -> None:
    rng = random.Random(7)
    pol = DefaultPolicy(margin_fraction=0.05)
    memos = {f"g{i}": GuestMemo() for i in range(60)}
    # some memories with a size that hurt, refaulted, an OOM kill long ago
    for i, m in enumerate(memos.values()):
        if i % 4 == 0:
            m.hurt_size, m.hurt_at, m.hurt_ws = 150000, -100.0 * (i % 8), 90000
            m.hurt_refaulted, m.oom_at = i % 8 == 0, -400.0
    last: dict[str, GuestSample] = {}
    # the columns carry the memory on alone (figures_batch, remember_batch) from the start
    cols = MemoColumns.from_memos(list(memos.values()))
    picked = set()
    seen = Counters()
    cases: set[tuple[str, bool, bool, bool]] = set()  # (rule, None, idle, OOM kill)
    now = 0.0
    for call in range(40):
        now += rng.choice([1.0, 1.0, 0.2])
        guests = [_guest(rng, i, now, last.get(f"g{i}")) for i in range(60)]
        before = [memos[g.name] for g in guests]
        for i, m in enumerate(before):
            for k in REMEMBERED:
                assert getattr(cols, k)[i].item() == getattr(m, k), (call, m, k)
        counters = Counters()
        batch = figures_batch(pol, gather(guests), cols, now, counters)
        rulings = rulings_batch(batch)
        scalar = DefaultPolicy(margin_fraction=0.05)
        for i, (g, m) in enumerate(zip(guests, before, strict=True)):
            f = scalar.figures(g, m, now)
            rule, ruling = judge(f)
            picked.add(rule.name)
            assert RULES[int(batch.rule[i])] is rule, (call, g.name)
            assert ruling_of(rulings, i) == ruling, (call, g.name, rule.name)
            cases.add((rule.name, ruling is None, f.fresh and f.idle, f.fresh and f.d_oom > 0))
            assert bool(batch.fresh[i]) is f.fresh
            if f.fresh:
                for k in FIELDS:
                    got = (int(batch.last_balloon[i]) if batch.has_last_balloon[i] else None
                           ) if k == "last_balloon" else getattr(batch, k)[i].item()
                    want = getattr(f, k)
                    assert type(got) is type(want) and got == want, (call, g.name, k)
                assert cols.still_since[i].item() == m.still_since
                assert int(cols.hurt_size[i]) == m.hurt_size
                assert cols.quiet_calls[i].item() == m.quiet_calls
                assert [w for w in cols.ws_of(i) if w[0] >= now - 5.0] == list(m.ws)
            if ruling is not None:
                m.remember(f, ruling)  # what the next call's memory starts from
            last[g.name] = g
        remember_batch(cols, batch, rulings, now)
        assert counters.as_dict() == scalar.counters.as_dict()
        for k, v in counters.as_dict().items():
            seen.inc(PolicyReportCounter(k), v)
    assert {"blind", "emergency", "trouble", "stalled", "probe", "hold"} <= picked
    assert all(seen[c] > 0 for c in PolicyReportCounter), seen.as_dict()
    # the rulings' branches: blind with and without a ruling, a big probe step into idle
    # memory, an emergency for an OOM kill and one for MemAvailable
    assert {("blind", True), ("blind", False)} <= {c[:2] for c in cases}
    assert ("probe", True) in {(c[0], c[2]) for c in cases}
    assert {("emergency", True), ("emergency", False)} <= {(c[0], c[3]) for c in cases}
