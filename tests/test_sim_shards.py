"""The sharded simulation (``app.sim_shards``): the same run as in process, exactly, on fleet
slices of every protocol (pressed hosts, so that the policy reclaims and the host OOM-kills);
a worker's failure is a ``ShardError`` naming it, with no process left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memballoon.app.sim_shards as shards_mod
from memballoon.app.sim_shards import (
    ShardCounter,
    ShardedBackend,
    ShardError,
    Shards,
    StallColumns,
    merge_stalls,
)
from memballoon.bench.sim import fleet
from memballoon.guest.report import guest_report
from memballoon.sim.backend import SimCounter
from memballoon.sim.run import run_scenario
from memballoon.sim.scenario import Scenario, build, make_pairs
from test_sim_decisions import Recorder

#: (protocol, guests, simulated seconds, host share): shares that press the host (the 0.15
#: vmw slice ends in host OOM kills)
SLICES = (("virtio", 30, 300.0, 0.2), ("vmw", 40, 300.0, 0.15),
          ("vmw-batched", 30, 400.0, 0.2))


def _slice(protocol: str, guests: int, seconds: float, share: float) -> Scenario:
    return fleet(protocol, guests, seconds).with_host_share(share)  # fresh workloads each time


def _journal(sc: Scenario, shards: int, *, local: bool = True) -> dict[str, Any]:
    """The slice's journal records and counters, stepped as ``test_sim_decisions`` does."""
    stalls = array("d")

    def sink(xs: Iterable[float]) -> None:
        stalls.extend(xs)

    with Shards(shards, local=local)(sc, sink, True) as w:
        rec = Recorder()
        w.engine.journal = rec
        for _ in range(round(sc.seconds / sc.period_s)):
            w.backend.advance(sc.period_s)
            w.engine.step()
        return {"records": rec.records, "counters": w.backend.counters.as_dict(),
                "policy_counters": w.policy.counters.as_dict(), "stalls": list(stalls)}


@pytest.mark.parametrize("spec", SLICES, ids=[s[0] for s in SLICES])
def test_a_sharded_slice_journals_exactly_the_in_process_records(
        spec: tuple[str, int, float, float]) -> None:
    want = _journal(_slice(*spec), 1)
    assert len(want["records"]) > 50
    for n, local in ((2, True), (3, True), (2, False)):
        got = _journal(_slice(*spec), n, local=local)
        assert len(got["records"]) == len(want["records"])
        for i, (g, w) in enumerate(zip(got["records"], want["records"], strict=True)):
            assert g == w, f"{n} shards: record {i} differs"
        assert got["counters"] == want["counters"]
        assert got["policy_counters"] == want["policy_counters"]
        assert got["stalls"] == want["stalls"]


@pytest.mark.parametrize("spec", SLICES, ids=[s[0] for s in SLICES])
def test_a_sharded_run_has_exactly_the_in_process_result(
        spec: tuple[str, int, float, float]) -> None:
    want = run_scenario(_slice(*spec)).to_json()
    assert want["decisions"] > 0
    if spec[0] == "vmw":
        assert want["host_oom_kills"] > 0  # the pressed host kills: the parent's enforcement
    for n in (2, 3):
        shards = Shards(n)
        got = run_scenario(_slice(*spec), build_world=shards)
        assert shards.used == n
        assert len(shards.worker_peak_rss_bytes) == n - 1  # shard 0 is this process
        assert all(rss > 0 for rss in shards.worker_peak_rss_bytes)
        assert got.to_json() == want


@pytest.mark.parametrize("local", [True, False])
def test_every_step_the_parent_samples_exactly_what_the_in_process_backend_does(
        local: bool) -> None:
    # the samples rebuilt from the rows (``SampleRow``s, and ``ReportRow``s repeating a
    # sleeping guest's report, as fields from a worker or as the report from the local
    # shard) against ``SimBackend.guests()``: equal, new objects for the same guests, the
    # same figures, step by step (with the host's kills)
    spec = ("virtio", 24, 150.0, 0.15)
    w = build(_slice(*spec))
    with Shards(2, local=local)(_slice(*spec), lambda xs: None, True) as sw:
        worlds = [(w.backend, w.engine), (sw.backend, sw.engine)]
        last: list[dict[str, object]] = [{}, {}]
        for _ in range(150):
            got = []
            for k, (b, e) in enumerate(worlds):
                b.advance(1.0)
                samples = b.guests()  # what the engine's step collects (targets come after)
                new = [n for n, s in samples.items() if last[k].get(n) is not s]
                last[k] = dict(samples)
                fig = b.sample_figures(samples)
                assert fig is not None
                decisions = [(a.guest, a.new_pages) for a in e.step()]
                got.append((decisions, samples, new, fig[0].tolist(), fig[1].tolist()))
            assert got[0] == got[1]
        assert sw.backend.host_oom_kills == w.backend.host_oom_kills


def test_a_subset_builds_each_guest_exactly_the_pair_the_full_build_gives() -> None:
    sc = fleet("virtio", 20, 60.0)
    full = make_pairs(sc, sc.guests)
    sc2 = fleet("virtio", 20, 60.0)  # fresh workloads, as a worker's fork has
    part = make_pairs(sc2, sc2.guests[1::3])
    assert list(part) == [g.name for g in sc.guests[1::3]]
    for name, p in part.items():
        q = full[name]
        for _ in range(20):
            p.tick(check=True)
            q.tick(check=True)
            assert guest_report(name, p.now, p.mem, p.driver, stall_pct=0.0) == \
                guest_report(name, q.now, q.mem, q.driver, stall_pct=0.0)
        assert not p.violations


def test_esx_and_single_guest_runs_stay_in_process() -> None:
    sc = fleet("vmw", 4, 30.0).with_policy("esx")
    shards = Shards(2)
    got = run_scenario(sc, build_world=shards).to_json()
    assert shards.used == 1 and shards.worker_peak_rss_bytes == []
    assert got == run_scenario(fleet("vmw", 4, 30.0).with_policy("esx")).to_json()
    one = fleet("vmw", 1, 10.0)
    shards = Shards(3)
    run_scenario(one, build_world=shards)
    assert shards.used == 1


def test_targets_are_checked_in_the_parent() -> None:
    sc = fleet("vmw-batched", 6, 10.0)
    b = ShardedBackend(sc, 2, stalls=lambda xs: None, local=False)
    try:
        samples = b.guests()
        assert list(samples) == [g.name for g in sc.guests]  # the in-process order
        name = sc.guests[0].name
        ram = samples[name].ram_pages
        assert not b.set_target("nobody", 0)
        assert not b.set_target(name, ram + 1)
        assert not b.set_target(name, -1)
        assert b.counters[SimCounter.SET_TARGET_REFUSED] == 3
        assert b.set_target(name, 1000)
        b.advance(1.0)
        assert b.guests()[name].target_pages == 1000
        assert b.counters[SimCounter.TICKS] > 0
        assert b.violations(full=True) == []
    finally:
        b.close()
    assert len(b.worker_peak_rss_bytes) == 2


def _no_shard_processes() -> bool:
    return not [p for p in multiprocessing.active_children()
                if p.name.startswith("memballoon-sim-shard")]


def test_a_killed_worker_is_a_shard_error_and_no_worker_is_left() -> None:
    sc = fleet("vmw", 6, 20.0)
    b = ShardedBackend(sc, 3, stalls=lambda xs: None)
    procs = list(b._procs)
    try:
        b.advance(1.0)
        p1 = procs[1]
        assert procs[0] is None and p1 is not None  # shard 0 runs in this process
        os.kill(p1.pid or 0, signal.SIGKILL)
        with pytest.raises(ShardError,
                           match=r"shard 1: (died|cannot be written to).*exit code -9") as err:
            b.advance(1.0)
        assert err.value.shard == 1
        assert b.counters[ShardCounter.ERRORS] == 1
    finally:
        b.close()
    assert not any(p.is_alive() for p in procs if p is not None)
    assert _no_shard_processes()


def _garbage(conn: Any, sc: Scenario, shard: int, shards: int, sleep: bool) -> None:
    conn.send(("ok", [], (0, 0, 0, 0, 0)) if shard == 0 else ("what", 1))
    conn.recv()


def _raises(conn: Any, sc: Scenario, shard: int, shards: int, sleep: bool) -> None:
    raise RuntimeError(f"no memory for shard {shard}")


def test_a_worker_answering_garbage_is_a_shard_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_mod, "_serve", _garbage)  # forked workers run the patched one
    with pytest.raises(ShardError, match=r"shard 1: answered garbage"):
        ShardedBackend(fleet("vmw", 4, 10.0), 2, stalls=lambda xs: None)
    assert _no_shard_processes()


def test_a_worker_that_fails_reports_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_mod, "_serve", _raises)
    with pytest.raises(ShardError, match=r"shard 1: failed: RuntimeError: no memory for shard 1"):
        run_scenario(fleet("vmw", 4, 10.0), build_world=Shards(2))
    assert _no_shard_processes()


def test_shards_must_fit_the_guests() -> None:
    from memballoon.model.errors import UsageError

    with pytest.raises(UsageError):
        ShardedBackend(fleet("vmw", 2, 10.0), 3, stalls=lambda xs: None)
    with pytest.raises(UsageError):
        Shards(0)


def test_the_in_process_world_is_still_the_default() -> None:
    sc = fleet("virtio", 4, 20.0)
    assert run_scenario(sc, build_world=Shards(1)).to_json() == \
        run_scenario(fleet("virtio", 4, 20.0)).to_json()
    assert build(fleet("virtio", 4, 20.0)).backend.name == "sim"


# reports of few times and guests (so that keys repeat), stalls of every sign of zero
_STALL = st.tuples(st.sampled_from([0.0, 5.0, 5.000000001, 10.0]), st.integers(0, 6),
                   st.sampled_from([0.0, -0.0, 1e-300, 0.5, 33.3, 100.0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_STALL, max_size=12), min_size=1, max_size=3))
def test_merged_stalls_are_the_sorted_tuples_stalls(
        parts: list[list[tuple[float, int, float]]]) -> None:
    """``merge_stalls`` of each shard's columns gives exactly (to the sign of a zero) the
    stalls of the reference: ``sorted`` of every shard's (time, index, stall) tuples."""
    want = [s for _, _, s in sorted(t for part in parts for t in part)]
    cols: list[StallColumns] = [
        (np.array([t for t, _, _ in p], dtype=np.float64),
         np.array([i for _, i, _ in p], dtype=np.int64),
         np.array([s for _, _, s in p], dtype=np.float64)) for p in parts]
    got = merge_stalls(cols)
    assert [(type(x), repr(x)) for x in got] == [(float, repr(x)) for x in want]


def test_a_shard_sends_its_stalls_as_columns_and_empties_them() -> None:
    sh = shards_mod._Shard(fleet("virtio", 4, 20.0), 1, 2, True)
    sh.handle(("advance", [], [], 20.0))
    sh.stalls[0].extend([5.0, 5.0])
    sh.stalls[1].extend([3, 1])
    sh.stalls[2].extend([1.5, 2.5])
    times, indices, pcts = sh.stall_columns()
    assert (times.tolist(), indices.tolist(), pcts.tolist()) == ([5.0, 5.0], [3, 1], [1.5, 2.5])
    assert sh.stall_columns()[0].size == 0
    assert merge_stalls([(times, indices, pcts)]) == [2.5, 1.5]
