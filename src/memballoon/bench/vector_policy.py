"""The columnar ``figures_batch``/``rulings_batch``/``remember_batch`` against
``DefaultPolicy.figures``/``judge``/``GuestMemo.remember`` on the fleet's own inputs, field by
field, and both paths timed (docs/design/vector-policy.md).

``capture`` runs a fleet slice through the simulator and keeps, for every call of the policy,
the guests it saw, a copy of each guest's memory before the call and the ``Figures`` the
scalar path computed. ``check`` replays every call through the columns, from that memory or
(``persistent``) from the columns the calls before left, and lists every difference (figures,
rule, ruling, the memory, the counters).
``timing`` replays calls through both paths from the same memory; ``wired`` carries one
policy through the calls as the engine does, on ``decide``'s scalar path and on its columns
(``BATCH_MIN_GUESTS``), and compares what they decide.

    PYTHONPATH=src .venv/bin/python -m memballoon.bench.vector_policy --guests 1000 --seconds 120
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memballoon.bench.sim import fleet
from memballoon.model.counters import Counters
from memballoon.policy.base import Decision
from memballoon.policy.default import (
    RULES,
    WS_WINDOW_S,
    DefaultPolicy,
    Figures,
    GuestMemo,
    _Plan,
    judge,
)
from memballoon.policy.default_batch import (
    FigureColumns,
    GuestInputs,
    MemoColumns,
    figures_batch,
    gather,
    remember_batch,
    ruling_of,
    rulings_batch,
)
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.sim.scenario import build

#: ``Figures`` fields compared (``g``, ``now`` and the settings copies are the inputs)
FIELDS = ("stall_pct", "d_swapin", "d_oom", "d_refused", "swapin_rate", "fault_rate", "stuck",
          "ws", "avail", "peak", "ahead", "margin", "floor", "budget_floor", "step",
          "severity", "quiet_calls", "free", "repeated", "report_balloon")
#: ``GuestMemo`` fields ``figures`` writes, compared after the call
MEMO_FIELDS = ("still_since", "faulted_at", "hurt_size", "quiet_calls", "last_balloon",
               "last_target")


#: ``GuestMemo`` fields compared before each call when the columns persist
REMEMBERED = ("step", "still_since", "faulted_at", "hurt_size", "hurt_at", "hurt_ws",
              "hurt_refaulted", "oom_at", "quiet_calls", "hurt_hold_s", "hurt_mark")


#: a ``BATCH_MIN_GUESTS`` no fleet reaches: the scalar path
SCALAR_ONLY = 1 << 62


def _copy_memo(m: GuestMemo) -> GuestMemo:
    c = copy.copy(m)
    c.ws = deque(m.ws)
    return c


@dataclass(slots=True)
class Call:
    """One call of the policy: its inputs and what the scalar path made of them."""

    now: float
    host: HostSample
    guests: list[GuestSample]  # the alive ones, in the order ``decide`` plans them
    before: list[GuestMemo]  # their memory before the call (a new guest: a new memo)
    figures: list[Figures] = field(default_factory=list)
    after: list[GuestMemo] = field(default_factory=list)  # right after ``figures``


def capture(protocol: str, guests: int, seconds: float, share: float | None,
            skip: float = 0.0) -> tuple[DefaultPolicy, list[Call]]:
    """Run the fleet slice; keep the policy's calls after ``skip`` simulated seconds."""
    sc = fleet(protocol, guests, seconds)
    if share is not None:
        sc = sc.with_host_share(share)
    w = build(sc)
    pol = w.policy
    assert isinstance(pol, DefaultPolicy)
    pol.BATCH_MIN_GUESTS = SCALAR_ONLY  # the spies watch the scalar path
    calls: list[Call] = []
    decide, figures = pol.decide, pol.figures

    def spy_decide(host: HostSample, gs: Sequence[GuestSample], now: float) -> list[Decision]:
        if now >= skip:
            alive = [g for g in gs if g.alive]
            calls.append(Call(now, host, alive, [_copy_memo(pol.state.get(g.name, GuestMemo()))
                                           for g in alive]))
        return decide(host, gs, now)

    def spy_figures(g: GuestSample, m: GuestMemo, now: float) -> Figures:
        f = figures(g, m, now)
        if calls and calls[-1].now == now:
            calls[-1].figures.append(f)
            calls[-1].after.append(_copy_memo(m))
        return f

    pol.decide = spy_decide  # type: ignore[method-assign,assignment]
    pol.figures = spy_figures  # type: ignore[method-assign]
    for _ in range(round(sc.seconds / sc.period_s)):
        w.backend.advance(sc.period_s)
        w.engine.step()
    pol.decide, pol.figures = decide, figures  # type: ignore[method-assign]
    return pol, calls


def _same(a: object, b: object) -> bool:
    # exact: the same type of number and the same value (a float 3.0 is not the int 3)
    return type(a) is type(b) and a == b


def _col(cols: FigureColumns, name: str, i: int) -> object:
    v = getattr(cols, name)[i]
    return bool(v) if isinstance(v, np.bool_) else v.item()


def _fresh_policy(pol: DefaultPolicy) -> DefaultPolicy:
    return DefaultPolicy(max_report_age_s=pol.max_report_age_s, probe=pol.probe,
                         margin_fraction=pol.margin_fraction,
                         stall_trouble_pct=pol.stall_trouble_pct,
                         stall_quiet_pct=pol.stall_quiet_pct)


def check(pol: DefaultPolicy, calls: Sequence[Call], persistent: bool = False
          ) -> tuple[int, list[str], dict[str, int]]:
    """Every call through ``figures_batch``: the guest-calls compared, the differences (at most
    50), and how often each rule was picked. Each call's memory is the scalar policy's before
    it, as columns; ``persistent``: the columns of the first call carried on by
    ``figures_batch`` and ``remember_batch`` alone, and compared with the scalar memory before
    every call."""
    diffs: list[str] = []
    compared = 0
    rules = dict.fromkeys((r.name for r in RULES), 0)
    slots = {g.name: i for i, g in enumerate(calls[0].guests)} if calls else {}
    whole = MemoColumns.from_memos(calls[0].before) if calls else None
    for c in calls:
        scalar = _fresh_policy(pol)
        for g, m in zip(c.guests, c.before, strict=True):
            scalar.figures(g, _copy_memo(m), c.now)  # the counters of the calls' figures
        counters = Counters()
        if persistent and whole is not None:
            rows = np.array([slots[g.name] for g in c.guests], np.int64)
            memo = whole.take(rows)
            for i, m in enumerate(c.before):
                for k in REMEMBERED:
                    v = getattr(memo, k)[i].item()
                    if not _same(v, getattr(m, k)):
                        diffs.append(f"t={c.now} {m}: memo before {k} {v!r} != "
                                     f"{getattr(m, k)!r}")
        else:
            memo = MemoColumns.from_memos(c.before)
        cols = figures_batch(pol, gather(c.guests), memo, c.now, counters)
        rul = rulings_batch(cols)
        if counters.as_dict() != scalar.counters.as_dict():
            diffs.append(f"t={c.now}: counters {counters.as_dict()} != "
                         f"{scalar.counters.as_dict()}")
        for i, (f, after) in enumerate(zip(c.figures, c.after, strict=True)):
            compared += 1
            name = f.g.name
            rule, ruling = judge(f)
            rules[rule.name] += 1
            got = RULES[int(cols.rule[i])].name
            if got != rule.name:
                diffs.append(f"t={c.now} {name}: rule {got} != {rule.name}")
            elif ruling_of(rul, i) != ruling:
                diffs.append(f"t={c.now} {name}: ruling {ruling_of(rul, i)} != {ruling}")
            if bool(cols.fresh[i]) != f.fresh:
                diffs.append(f"t={c.now} {name}: fresh {cols.fresh[i]} != {f.fresh}")
                continue
            if not f.fresh:
                continue
            for k in FIELDS:
                if not _same(_col(cols, k, i), getattr(f, k)):
                    diffs.append(f"t={c.now} {name}: {k} {_col(cols, k, i)!r} != "
                                 f"{getattr(f, k)!r}")
            lb = int(cols.last_balloon[i]) if cols.has_last_balloon[i] else None
            if lb != f.last_balloon:
                diffs.append(f"t={c.now} {name}: last_balloon {lb} != {f.last_balloon}")
            for k in MEMO_FIELDS:
                v = getattr(memo, k)[i].item()
                if not _same(v, getattr(after, k)):
                    diffs.append(f"t={c.now} {name}: memo {k} {v!r} != {getattr(after, k)!r}")
            oldest = c.now - WS_WINDOW_S
            if [w for w in memo.ws_of(i) if w[0] >= oldest] != list(after.ws):
                diffs.append(f"t={c.now} {name}: memo ws differs")
            if len(diffs) >= 50:
                return compared, diffs, rules
        if persistent and whole is not None:
            remember_batch(memo, cols, rul, c.now)  # after the comparison with ``figures``' memory
            whole.put(rows, memo)
    return compared, diffs, rules


def shape(calls: Sequence[Call]) -> dict[str, float]:
    """Means a call of what the rest of the design depends on: the live guests; the samples
    that are not the object the call before saw (what an incremental ``gather`` re-reads);
    the guests whose rule is not ``hold`` (the plans a columnar ``decide`` would build as
    objects; a hold emits nothing unless the clamp or the host moves it); of those, the
    probes on a repeated report without an idle step (a no-op: size = target size)."""
    seen: dict[str, GuestSample] = {}
    live = changed = acting = noop = 0
    for c in calls:
        for g, f in zip(c.guests, c.figures, strict=True):
            live += 1
            changed += seen.get(g.name) is not g
            seen[g.name] = g
            rule, ruling = judge(f)
            if rule.name != "hold":
                acting += 1
                noop += (rule.name == "probe" and ruling is not None
                         and ruling.size == f.target_size)
    n = max(1, len(calls))
    return {"live": live / n, "changed_samples": changed / n, "not_hold": acting / n,
            "noop_probes": noop / n}


def _median_s(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(pol: DefaultPolicy, calls: Sequence[Call], repeats: int = 5) -> dict[str, float]:
    """Milliseconds a call (the median of ``repeats`` runs over ``calls``) of: the scalar
    ``decide`` whole; its ``figures`` + ``judge`` per guest (what ``_plan`` spends before
    building a plan); the memos as columns (a cost a columnar policy would not have: its memory
    stays columns); ``gather`` (the samples as columns, each call's new reports read);
    ``figures_batch`` + ``rulings_batch`` on them (what ``judge`` decides included, as in
    the scalar figure)."""
    def scalar() -> None:
        for c in calls:
            p = _fresh_policy(pol)
            for g, m in zip(c.guests, memos[c.now], strict=True):
                judge(p.figures(g, m, c.now))

    def decide() -> None:
        for c in calls:
            p = _fresh_policy(pol)
            p.state = {g.name: m for g, m in zip(c.guests, memos[c.now], strict=True)}
            p.decide(c.host, c.guests, c.now)

    def load() -> None:
        for c in calls:
            cols[c.now] = MemoColumns.from_memos(c.before)

    def gathered() -> None:
        prev = None  # (each call's from the last's, as ``decide`` gathers)
        for c in calls:
            prev = inputs[c.now] = gather(c.guests, prev)

    def batch() -> None:
        for c in calls:
            rulings_batch(figures_batch(pol, inputs[c.now], cols[c.now], c.now, Counters()))

    out: dict[str, float] = {}
    scalar_t, decide_t, load_t, gather_t, batch_t = [], [], [], [], []
    for _ in range(repeats):
        # each repeat from the memory before the calls (both paths update it)
        memos = {c.now: [_copy_memo(m) for m in c.before] for c in calls}
        cols: dict[float, MemoColumns] = {}
        inputs: dict[float, GuestInputs] = {}
        scalar_t.append(_median_s(scalar, 1))
        memos = {c.now: [_copy_memo(m) for m in c.before] for c in calls}
        decide_t.append(_median_s(decide, 1))
        load_t.append(_median_s(load, 1))
        gather_t.append(_median_s(gathered, 1))
        batch_t.append(_median_s(batch, 1))
    n = len(calls)
    out["decide_ms_per_call"] = 1e3 * statistics.median(decide_t) / n
    out["scalar_ms_per_call"] = 1e3 * statistics.median(scalar_t) / n
    out["load_ms_per_call"] = 1e3 * statistics.median(load_t) / n
    out["gather_ms_per_call"] = 1e3 * statistics.median(gather_t) / n
    out["columns_ms_per_call"] = 1e3 * statistics.median(batch_t) / n
    out["batch_ms_per_call"] = out["gather_ms_per_call"] + out["columns_ms_per_call"]
    out["speedup"] = out["scalar_ms_per_call"] / out["batch_ms_per_call"]
    return out


def wired(pol: DefaultPolicy, calls: Sequence[Call], repeats: int = 5
          ) -> tuple[dict[str, float], int]:
    """``DefaultPolicy.decide`` as wired in, one policy carried through ``calls`` in order
    (as the engine calls it), on the scalar path and on the columns (``BATCH_MIN_GUESTS``
    0), each from the memory before the first call (which is not timed: the columns load
    there): milliseconds a call (median of ``repeats``), and how many calls' decisions,
    counters or snapshots differ between the paths."""
    host_part = [0]

    def run(least: int, out: list[object]) -> float:
        p = _fresh_policy(pol)
        p.BATCH_MIN_GUESTS = least
        carry_out = p._carry_out

        def counted(host: HostSample, plans: list[_Plan]) -> list[Decision]:
            host_part[0] += least == 0  # the columns' call fell back to the scalar host part
            return carry_out(host, plans)

        p._carry_out = counted  # type: ignore[method-assign]
        c0 = calls[0]
        p.state = {g.name: _copy_memo(m) for g, m in zip(c0.guests, c0.before, strict=True)}
        out.append(p.decide(c0.host, c0.guests, c0.now))
        t0 = time.perf_counter()
        for c in calls[1:]:
            out.append(p.decide(c.host, c.guests, c.now))
        t = time.perf_counter() - t0
        out.append(p.counters.as_dict())
        out.append(p.snapshot(calls[-1].now))
        return t

    scalar_t, batch_t = [], []
    differ = 0
    for _ in range(repeats):
        a: list[object] = []
        b: list[object] = []
        scalar_t.append(run(SCALAR_ONLY, a))
        batch_t.append(run(0, b))
        differ = max(differ, sum(x != y for x, y in zip(a, b, strict=True)))
    n = max(1, len(calls) - 1)
    out = {"scalar_decide_ms_per_call": 1e3 * statistics.median(scalar_t) / n,
           "batch_decide_ms_per_call": 1e3 * statistics.median(batch_t) / n}
    out["decide_speedup"] = out["scalar_decide_ms_per_call"] / out["batch_decide_ms_per_call"]
    out["host_part_calls"] = host_part[0] / repeats  # of the batched calls, on every plan
    return out, differ


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--protocol", default="virtio")
    ap.add_argument("--guests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--share", type=float, default=None, help="host share (presses the budget)")
    ap.add_argument("--skip", type=float, default=0.0, help="simulated seconds not captured")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-calls", type=int, default=60, help="the last N calls are timed")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    pol, calls = capture(a.protocol, a.guests, a.seconds, a.share, a.skip)
    print(f"captured {len(calls)} calls in {time.perf_counter() - t0:.1f} s")
    bad = 0
    for persistent in (False, True):
        compared, diffs, rules = check(pol, calls, persistent)
        what = "persistent columns" if persistent else "columns from each call's memos"
        print(f"{what}: compared {compared} guest-calls; rules picked: {rules}")
        print(f"differences: {len(diffs)}")
        for d in diffs:
            print("  " + d)
        bad += len(diffs)
    print("per call (mean): " + ", ".join(f"{k} {v:.1f}" for k, v in shape(calls).items()))
    # the captured calls (GBs of objects) out of the collector's sight: a full collection
    # would walk them all, and the path that allocates more would pay for it
    gc.collect()
    gc.freeze()
    t = timing(pol, calls[-a.timing_calls:], a.repeats)
    guests = statistics.mean(len(c.guests) for c in calls[-a.timing_calls:])
    print(f"timing over {min(len(calls), a.timing_calls)} calls of {guests:.0f} guests, "
          f"median of {a.repeats}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    w, differ = wired(pol, calls[-a.timing_calls:], a.repeats)
    print("wired decide (one policy through the calls), median of "
          f"{a.repeats}: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items())
          + f"; calls whose decisions/counters/snapshot differ: {differ}")
    return 1 if bad or differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
