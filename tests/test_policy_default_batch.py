"""The columnar figures equal ``DefaultPolicy.figures`` exactly on reports built to hit
the odd cases: counters going back, figures beyond RAM, a stale report, none, a repeated one,
refused pages, a stuck inflation, OOM kills, troubled and idle guests, a size that hurt; and its
columnar memory, carried on by ``figures_batch`` and ``remember_batch`` alone, stays the
scalar ``GuestMemo``s. Wired in (``decide`` on the columns from ``BATCH_MIN_GUESTS``): the
fleet slices of ``test_sim_decisions`` journal exactly their records with the columns forced,
and a policy on the columns decides, counts, remembers and snapshots exactly as one on the
scalar path, call after call, guests coming, going, dying, reordered, the host pressed."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy import default_batch
from memballoon.policy.base import Decision
from memballoon.policy.default import (
    NEVER,
    RULES,
    DefaultPolicy,
    DefaultSnapshot,
    Figures,
    GuestMemo,
    Ruling,
    judge,
)
from memballoon.policy.default_batch import (
    INPUT_KEYS,
    RULE_INDEX,
    MemoColumns,
    figures_batch,
    gather,
    remember_batch,
    ruling_of,
    rulings_batch,
    why_of,
)
from memballoon.policy.observe import PolicyReportCounter
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport
from test_sim_decisions import SLICES, fixture, run_slice

FIELDS = ("stall_pct", "d_swapin", "d_oom", "d_refused", "swapin_rate", "fault_rate", "stuck",
          "last_balloon", "ws", "avail", "peak", "ahead", "margin", "floor", "budget_floor",
          "step", "severity", "quiet_calls", "free", "repeated", "report_balloon")
REMEMBERED = ("step", "still_since", "faulted_at", "hurt_size", "hurt_at", "hurt_ws",
              "hurt_refaulted", "oom_at", "quiet_calls", "hurt_hold_s", "hurt_mark")
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
            m.hurt_hold_s = 2400.0 if i % 8 == 4 else 0.0  # held by a back-off
        elif i % 4 == 1:  # a size that hurt, forgotten: the next probe's hurt may double
            m.hurt_at, m.hurt_refaulted = -50.0 * (i % 3), i % 3 == 0
            m.hurt_mark = RAM - rng.choice([0, 1000, 50000, 200000]) + 3000
            m.hurt_hold_s = rng.choice([0.0, 600.0, 7200.0])
    last: dict[str, GuestSample] = {}
    # the columns carry the memory on alone (figures_batch, remember_batch) from the start
    cols = MemoColumns.from_memos(list(memos.values()))
    picked = set()
    seen = Counters()
    cases: set[tuple[str, bool, bool, bool]] = set()  # (rule, None, idle, OOM kill)
    bands: set[bool] = set()
    backoffs: set[bool] = set()
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
            if rule.name == "under_floor" and ruling is not None:
                bands.add(ruling.size > f.floor)  # a band above, or a deficit too small
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
                first = ruling.probed and m.hurt_size == 0
                m.remember(f, ruling)  # what the next call's memory starts from
                if first:
                    backoffs.add(m.hurt_hold_s > 0)  # hurt again (doubled), or a first
            last[g.name] = g
        remember_batch(cols, batch, rulings, now)
        assert counters.as_dict() == scalar.counters.as_dict()
        for k, v in counters.as_dict().items():
            seen.inc(PolicyReportCounter(k), v)
    assert {"blind", "emergency", "room", "reread", "trouble", "stalled", "under_floor",
            "probe", "hold"} <= picked
    assert bands == {True, False}
    assert backoffs == {True, False}
    assert all(seen[c] > 0 for c in PolicyReportCounter), seen.as_dict()
    # the rulings' branches: blind with and without a ruling, a big probe step into idle
    # memory, an emergency for an OOM kill and one for MemAvailable
    assert {("blind", True), ("blind", False)} <= {c[:2] for c in cases}
    assert ("probe", True) in {(c[0], c[2]) for c in cases}
    assert {("emergency", True), ("emergency", False)} <= {(c[0], c[3]) for c in cases}


# ---------------------------------------------------------------------- wired into decide
class BatchCalls:
    """Counts the calls ``decide`` ran on the columns (``decide_batch`` answered)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran = self.refused = 0
        real = default_batch.decide_batch

        def spy(policy: DefaultPolicy, host: HostSample, guests: Sequence[GuestSample],
                now: float) -> list[Decision] | None:
            out = real(policy, host, guests, now)
            if out is None:
                self.refused += 1
            else:
                self.ran += 1
            return out

        monkeypatch.setattr(default_batch, "decide_batch", spy)


@pytest.mark.parametrize("spec", SLICES, ids=[s[0] for s in SLICES])
def test_a_fleet_slice_on_the_columns_decides_exactly_as_recorded(
        spec: tuple[str, int, float, float | None], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DefaultPolicy, "BATCH_MIN_GUESTS", 0)  # 40 guests: force the columns
    calls = BatchCalls(monkeypatch)
    want = json.loads(gzip.decompress(fixture(spec[0]).read_bytes()))
    got = json.loads(json.dumps(run_slice(*spec)))
    assert calls.ran == round(spec[2]) and calls.refused == 0  # every call, on the columns
    assert len(want["records"]) > 100
    for i, (g, w) in enumerate(zip(got["records"], want["records"], strict=False)):
        assert g == w, f"record {i} differs"
    assert len(got["records"]) == len(want["records"])
    assert got["counters"] == want["counters"]
    assert got["policy_counters"] == want["policy_counters"]


def _typed(ds: list[Decision]) -> str:
    # the journal's view: JSON tells an int from a float (and refuses a numpy number)
    return json.dumps([dataclasses.asdict(d) for d in ds])


def _host(rng: random.Random, guests: Sequence[GuestSample]) -> HostSample:
    """A host with room, one whose guests' growth would pass the budget, one short of its
    reserve, one under memory pressure."""
    held = sum(g.ram_pages - g.balloon_pages for g in guests if g.alive)
    kind = rng.choice(["room", "room", "room", "over", "short", "psi"])
    if kind == "room":
        return HostSample(held * 4, held)
    if kind == "over":
        return HostSample(held - rng.randrange(0, RAM), held)
    if kind == "short":
        return HostSample(held, held, total_pages=held * 2, available_pages=1000,
                          reserve_pages=rng.choice([2000, 300000]))
    return HostSample(held * 2, held, total_pages=held * 2, psi_some_avg10=rng.choice(
        [5.0, 25.0]))


def _calls(seed: int, n: int, back: bool = True
           ) -> Iterator[tuple[HostSample, list[GuestSample], float]]:
    """``n`` calls of a fleet whose guests come, go, die, return and change order; the
    clock steps 0.2 or 1 s, stands still now and then, and (``back``) once goes back."""
    rng = random.Random(seed)
    last: dict[str, GuestSample] = {}
    now = 0.0
    for call in range(n):
        now += rng.choice([1.0, 1.0, 0.2, 0.0]) if call != n // 2 or not back else -3.0
        listed = [i for i in range(70) if rng.random() < 0.93]
        if rng.random() < 0.2:
            rng.shuffle(listed)
        guests = []
        for i in listed:
            g = _guest(rng, i, now, last.get(f"g{i}"))
            if rng.random() < 0.05:
                g = dataclasses.replace(g, alive=False)
            last[g.name] = g
            guests.append(g)
        yield _host(rng, guests), guests, now


def _memos_alike(a: dict[str, GuestMemo], b: dict[str, GuestMemo]) -> None:
    assert list(a) == list(b)
    for name, m in a.items():
        assert m == b[name], name


@pytest.mark.parametrize("seed", range(6))
def test_the_columns_decide_count_remember_and_snapshot_as_the_scalar_path(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = BatchCalls(monkeypatch)
    scalar, batch = DefaultPolicy(margin_fraction=0.05), DefaultPolicy(margin_fraction=0.05)
    scalar.BATCH_MIN_GUESTS, batch.BATCH_MIN_GUESTS = 1 << 62, 0
    decided = 0
    for k, (host, guests, now) in enumerate(_calls(seed, 120)):
        want = scalar.decide(host, guests, now)
        got = batch.decide(host, guests, now)
        assert _typed(got) == _typed(want), (k, now)
        assert batch.counters.as_dict() == scalar.counters.as_dict(), k
        decided += len(want)
        if k % 7 == 0:  # (json: the order of the guests too)
            assert (batch.snapshot(now).model_dump_json()
                    == scalar.snapshot(now).model_dump_json()), k
        if k % 29 == 28:  # the columns become GuestMemos, then columns again
            _memos_alike(batch.state, scalar.state)
    assert decided > 200
    # (the clock went back once: the scalar path until the deques are in order again)
    assert calls.ran > 80 and calls.refused >= 1
    _memos_alike(batch.state, scalar.state)


def test_a_snapshot_of_the_columns_restores_on_either_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = BatchCalls(monkeypatch)
    source = DefaultPolicy()
    source.BATCH_MIN_GUESTS = 0
    stream = list(_calls(11, 60, back=False))
    for host, guests, now in stream[:40]:
        source.decide(host, guests, now)
    assert source._batch is not None  # the memory is columns
    at = stream[39][2]
    snap = DefaultSnapshot.model_validate_json(source.snapshot(at).model_dump_json())
    assert source._batch is not None  # ... and a snapshot leaves it so
    assert snap.guests and any(s.hurt_age_s is not None for s in snap.guests.values())
    assert any(s.oom_age_s is None and s.working_set for s in snap.guests.values())
    later = 1000.0  # another clock: the moments are ages
    scalar, batch = DefaultPolicy(), DefaultPolicy()
    scalar.BATCH_MIN_GUESTS, batch.BATCH_MIN_GUESTS = 1 << 62, 0
    for p in (scalar, batch):
        p.restore(snap, later)
    ran = calls.ran
    for host, guests, now in stream[40:]:
        t = later + now - at
        assert _typed(batch.decide(host, guests, t)) == _typed(scalar.decide(host, guests, t))
        assert batch.counters.as_dict() == scalar.counters.as_dict()
        assert batch.snapshot(t) == scalar.snapshot(t)
    assert calls.ran > ran
    assert batch.snapshot(later + 100) == scalar.snapshot(later + 100)
    _memos_alike(batch.state, scalar.state)


def test_the_threshold_counts_live_guests() -> None:
    rng = random.Random(3)
    guests = [_quiet(i, 1.0) for i in range(10)]
    guests[:4] = [dataclasses.replace(g, alive=False) for g in guests[:4]]
    host = _host(rng, guests)
    p = DefaultPolicy()
    p.BATCH_MIN_GUESTS = 7  # 10 guests, 6 alive: the scalar path
    p.decide(host, guests, 1.0)
    assert p._batch is None and set(p.state) == {f"g{i}" for i in range(4, 10)}
    p.BATCH_MIN_GUESTS = 6
    p.decide(host, guests, 2.0)
    assert p._batch is not None and p._batch.names == [f"g{i}" for i in range(4, 10)]
    # read: GuestMemos again (one quiet probe: the second call saw the same report)
    assert p.state["g5"].quiet_calls == 1 and p._batch is None
    assert p.state["g5"].ws[-1][0] == 2.0 and p.state["g5"].oom_at == NEVER


@pytest.mark.parametrize("odd", ["stall", "count", "time"])
def test_figures_the_columns_cannot_keep_exact_go_the_scalar_way(
        odd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = BatchCalls(monkeypatch)
    scalar, batch = DefaultPolicy(), DefaultPolicy()
    scalar.BATCH_MIN_GUESTS, batch.BATCH_MIN_GUESTS = 1 << 62, 0
    host = HostSample(RAM * 100, RAM * 10)
    for now in (1.0, 2.0, 3.0):
        guests = [_quiet(i, now) for i in range(10)]
        if now == 2.0:  # a report built in-process: nothing checked its figures
            r = guests[3].report
            assert r is not None
            r = dataclasses.replace(r, **{"stall": {"stall_pct": float("inf")},
                                          "count": {"swap_in_pages": 1 << 60},
                                          "time": {"time_s": float("nan")}}[odd])
            guests[3] = dataclasses.replace(guests[3], report=r)
        assert _typed(batch.decide(host, guests, now)) == _typed(scalar.decide(host, guests, now))
        assert batch.counters.as_dict() == scalar.counters.as_dict()
    assert (calls.ran, calls.refused) == (2, 1)
    _memos_alike(batch.state, scalar.state)


def test_the_inputs_keys_are_the_figures_in_their_order() -> None:
    f = Figures(_quiet(0, 1.0), 1.0, True)
    assert tuple(f.inputs()) == INPUT_KEYS


@pytest.mark.parametrize(("rule", "d_oom", "stall", "rate"), [
    ("hold", 0, 0.1, 0.0), ("probe", 0, 0.123, 0.0), ("probe", 0, 0, 0.0),  # an int stall
    ("under_floor", 0, 0.0, 0.0), ("emergency", 2, 0.5, 3.0), ("emergency", 0, 0.5, 3.0),
    ("trouble", 0, 7.456, 1234.5), ("trouble", 0, 1.5, 0.0)])
def test_the_column_reasons_are_the_rules_own(rule: str, d_oom: int, stall: float,
                                              rate: float) -> None:
    g = GuestSample("g", RAM, 50000, 60000, GuestSettings(), _quiet(0, 1.0).report, 1.0)
    f = Figures(g, 1.0, True, stall, 3, d_oom, 0, rate, 0.0, False, 40000, 120000, 7000,
                130000, 0, 26214, 160000, 150000, 5000, 1.5, 2)
    ruling = Ruling(197000, f.floor, 1.5)
    k = RULE_INDEX[rule]
    want = RULES[k].why(f, ruling)
    assert why_of(k, stall, d_oom, f.avail, f.margin, rate, f.target_size, f.floor,
                  ruling.size) == want
    with pytest.raises(ValueError, match="stalled"):
        why_of(RULE_INDEX["stalled"], stall, d_oom, 0, 0, rate, 0, 0, 0)


def test_decisions_with_reasons_from_the_columns_and_from_plans_in_one_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the columns write the reasons of the common rules; a blind or stalled guest's comes
    # from its plan: both kinds in the same calls, in the guests' order
    planned: list[int] = []
    real = default_batch._plans

    def spy(*args: object) -> list[object]:
        out = real(*args)  # type: ignore[arg-type]
        planned.append(len(out))
        return out  # type: ignore[return-value]

    monkeypatch.setattr(default_batch, "_plans", spy)
    scalar, batch = DefaultPolicy(margin_fraction=0.05), DefaultPolicy(margin_fraction=0.05)
    scalar.BATCH_MIN_GUESTS, batch.BATCH_MIN_GUESTS = 1 << 62, 0
    mixed = 0
    for host, guests, now in _calls(5, 60, back=False):
        host = HostSample(host.budget_pages * 4, host.resident_pages)  # room: no host part
        planned.clear()
        want = scalar.decide(host, guests, now)
        got = batch.decide(host, guests, now)
        assert _typed(got) == _typed(want), now
        assert batch.counters.as_dict() == scalar.counters.as_dict()
        by_plan = sum(planned)
        mixed += 0 < by_plan < len(want)
    assert mixed >= 10


def _sample(g: GuestSample, report: PressureReport | None, report_time: float | None
            ) -> GuestSample:
    """``g`` with another report (by its constructor: not relying on how a sample is made)."""
    return GuestSample(g.name, g.ram_pages, g.balloon_pages, g.target_pages, g.settings,
                       report, report_time, g.alive)


def _inputs_alike(a: default_batch.GuestInputs, b: default_batch.GuestInputs) -> None:
    for k in a.__slots__:
        x, y = getattr(a, k), getattr(b, k)
        if k in ("reps", "guests"):
            assert len(x) == len(y) and all(p is q for p, q in zip(x, y, strict=True))
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y), k


@pytest.mark.parametrize("seed", range(4))
def test_gather_rereads_only_new_reports_and_gets_the_same_columns(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    real = default_batch._report_columns

    def spy(reps: Sequence[PressureReport]) -> tuple[object, ...]:
        read.append(len(reps))
        return real(reps)

    monkeypatch.setattr(default_batch, "_report_columns", spy)
    rng = random.Random(seed)
    last: dict[str, GuestSample] = {}
    prev = None
    partly = 0
    for t in range(40):
        n = rng.choice([30, 30, 30, 29])  # a call of another length reads every row
        guests = []
        for i in range(n):
            g = _guest(rng, i, float(t), last.get(f"g{i}"))
            if rng.random() < 0.3 and f"g{i}" in last:  # the very sample the last call had
                g = last[f"g{i}"]
            elif rng.random() < 0.4 and f"g{i}" in last:  # the report the last call had
                g = _sample(g, last[f"g{i}"].report, g.report_time)
            if rng.random() < 0.05:
                g = _sample(g, g.report, None)
            last[g.name] = g
            guests.append(g)
        if t % 10 == 3:  # every report refuses, or none says
            guests = [g if g.report is None else _sample(
                g, dataclasses.replace(g.report, refused_pages=rng.choice([None, 7])),
                g.report_time) for g in guests]
        read.clear()
        got = gather(guests, prev)
        partly += read[0] < n if read else 1  # (none read: every report as before)
        _inputs_alike(got, gather(guests))
        prev = got
    assert partly >= 12
