"""The engine against a fake backend on a manual clock: collect, decide, act, journal; failures
contained; an hour of managed guests in well under a second, with no sleep."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pytest

from memballoon.edge.journal import Journal
from memballoon.guest.workload import Idle, Ramp, Steady
from memballoon.harness.pair import make_pair
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE, mib_to_pages
from memballoon.policy.base import Decision
from memballoon.policy.default import DefaultPolicy
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import SimBackend, run

RAM = 4096


class FakeBackend:
    """Guests whose balloon follows the target at once; some misbehave on purpose."""

    name = "fake"

    def __init__(self, names: Sequence[str], clock: ManualClock, *,
                 raising: frozenset[str] = frozenset(),
                 refusing: frozenset[str] = frozenset()) -> None:
        self.counters = Counters()
        self.clock = clock
        self.target = dict.fromkeys(names, 0)
        self.raising, self.refusing = raising, refusing
        self.fail_guests = 0
        self.calls: list[tuple[str, int]] = []

    def guests(self) -> Mapping[str, GuestSample]:
        if self.fail_guests:
            self.fail_guests -= 1
            raise OSError("backend down")
        now = self.clock.now()
        return {n: GuestSample(n, RAM, t, t, report=PressureReport(
                    n, now, RAM * PAGE_SIZE, 0, 1 << 30, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0),
                    report_time=now) for n, t in self.target.items()}

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        self.calls.append((guest, balloon_pages))
        if guest in self.raising:
            raise RuntimeError("guest exploded")
        if guest in self.refusing:
            return False
        self.target[guest] = balloon_pages
        return True

    def host_resident_bytes(self) -> int:
        return sum(RAM - t for t in self.target.values()) * PAGE_SIZE


class Half:
    name = "half"

    def decide(self, host: HostSample, guests: Sequence[GuestSample],
               now: float) -> list[Decision]:
        return [Decision(g.name, g.ram_pages // 2, "half") for g in guests]


def engine(b: FakeBackend, settings: Mapping[str, GuestSettings] | None = None) -> Engine:
    core = ManagerCore(Half(), settings or {}, 10_000, counters=b.counters)
    return Engine(b, core, Journal(None), b.clock)


def test_one_step_applies_and_journals_on_the_engine_clock() -> None:
    clock = ManualClock(50.0)
    b = FakeBackend(["a", "b"], clock)
    e = engine(b)
    acts = e.step()
    assert {(a.guest, a.new_pages) for a in acts} == {("a", 2048), ("b", 2048)}
    assert b.target == {"a": 2048, "b": 2048} and e.decisions == 2 and e.steps == 1
    recs = e.journal.tail()  # type: ignore[attr-defined]
    assert {r["guest"] for r in recs} == {"a", "b"} and all(r["applied"] for r in recs)
    assert {r["mono"] for r in recs} == {50.0}
    assert e.guests["a"].balloon_pages == 0  # what was collected before acting


def test_misbehaving_guests_never_stop_the_others() -> None:
    b = FakeBackend(["bad", "no", "ok"], ManualClock(), raising=frozenset({"bad"}),
                    refusing=frozenset({"no"}))
    e = engine(b)
    e.step()
    assert b.target["ok"] == 2048
    assert b.counters["set_target_error"] == 1
    assert b.counters["set_target_failed"] == 2
    applied = {r["guest"]: r["applied"] for r in e.journal.tail()}  # type: ignore[attr-defined]
    assert applied == {"bad": False, "no": False, "ok": True}
    assert [a.guest for a in e.last_applied] == ["ok"]  # what the backend took, this step


def test_backend_failure_skips_a_round_only() -> None:
    clock = ManualClock()
    b = FakeBackend(["a"], clock)
    b.fail_guests = 2
    e = engine(b)
    assert e.step() == [] and e.step() == []
    assert b.counters["backend_error"] == 2 and b.target["a"] == 0
    e.step()
    assert b.target["a"] == 2048


def test_manual_set_pins_the_guest_and_unknown_guests_are_refused() -> None:
    clock = ManualClock()
    b = FakeBackend(["a"], clock)
    e = engine(b)
    a, ok = e.set_manual("a", 1000, force=True)  # a 16 MiB guest is under any floor
    assert ok and b.target["a"] == 1000 and a.kind == "manual"
    clock.advance(60.0)
    e.step()  # the policy would say 2048: the pin holds
    assert b.target["a"] == 1000
    with pytest.raises(UsageError):
        e.set_manual("zz", 1)
    assert e.clear_manual("a")
    clock.advance(60.0)
    e.step()
    assert b.target["a"] == 2048


def test_shutdown_deflates_to_each_guests_max_and_reports_the_stragglers() -> None:
    clock = ManualClock()
    b = FakeBackend(["a", "b"], clock)
    e = engine(b, {"b": GuestSettings(max_pages=RAM - 100)})
    e.step()
    want = e.shutdown()
    assert want == {"a": 0, "b": 100} and b.target == want
    assert e.shutdown_pending(want) == {}
    b.refusing = frozenset({"a"})
    b.target["a"] = 7
    e.shutdown_incomplete(e.shutdown_pending({"a": 0}), 1.0)
    kinds = [r["kind"] for r in e.journal.tail()]  # type: ignore[attr-defined]
    assert kinds.count("shutdown") == 2 and kinds[-1] == "shutdown_incomplete"
    assert b.counters["shutdown_deflate_incomplete"] == 1


class Followers(FakeBackend):
    """1 GiB guests with a 100 MiB working set whose balloons follow their targets at once and
    whose reports say so: what a policy sees of well-behaved idle guests."""

    RAM = mib_to_pages(1024)
    WS = mib_to_pages(100)

    def guests(self) -> Mapping[str, GuestSample]:
        now = self.clock.now()
        out = {}
        for n, t in self.target.items():
            avail = (self.RAM - t - self.WS) * PAGE_SIZE
            r = PressureReport(n, now, self.RAM * PAGE_SIZE, avail, avail, self.WS * PAGE_SIZE,
                               0, t * PAGE_SIZE, 0, 0, 0, 0, 0, 0.0, t, t)
            out[n] = GuestSample(n, self.RAM, t, t, report=r, report_time=now)
        return out

    def host_resident_bytes(self) -> int:
        return sum(self.RAM - t for t in self.target.values()) * PAGE_SIZE


def test_an_hour_of_the_engine_on_a_manual_clock_takes_no_sleep() -> None:
    # the engine, core and default policy over 4 guests: 3,600 steps of simulated time with no
    # sleep (a tenth of a second or so of wall time: printed, not gated)
    clock = ManualClock()
    b = Followers(["a", "b", "c", "d"], clock)
    core = ManagerCore(DefaultPolicy(), {}, 4 * Followers.RAM, counters=b.counters)
    e = Engine(b, core, Journal(None), clock)
    t0 = time.perf_counter()
    for _ in range(3600):
        clock.advance(1.0)
        e.step()
    wall = time.perf_counter() - t0
    assert e.steps == 3600 and clock.now() == 3600.0 and b.counters["policy_error"] == 0
    # each idle guest was probed down toward its working set and held there
    assert all(Followers.RAM - t < mib_to_pages(300) for t in b.target.values())
    print(f"an hour of the engine over 4 guests: {wall:.3f} s of wall time")


def test_an_hour_of_simulated_guest_models_under_the_engine() -> None:
    # the real engine, core and default policy over three guest models on the virtual clock:
    # 3,600 steps, no sleep; the ramp is squeezed first and never OOM-killed
    clock = ManualClock()
    pages = mib_to_pages(64)
    pairs = {"idle": make_pair("vmw-batched", pages, Idle(anon_mib=8, file_mib=4)),
             "steady": make_pair("vmw-batched", pages, Steady(anon_mib=16, file_mib=8)),
             "ramp": make_pair("vmw-batched", pages, Ramp(start_mib=4, peak_mib=40,
                                                            mib_per_s=1, start_at_s=600))}
    backend = SimBackend(pairs, clock)
    core = ManagerCore(DefaultPolicy(), {}, 3 * pages // 2)
    e = Engine(backend, core, Journal(None), clock)
    t0 = time.perf_counter()
    run(e, backend, 3600.0)
    wall = time.perf_counter() - t0
    assert clock.now() == 3600.0 and e.steps == 3600
    assert e.decisions > 0 and core.counters["policy_error"] == 0
    assert sum(p.mem.events.oom_kills for p in pairs.values()) == 0
    assert pairs["idle"].device.actual_pages > 0  # the idle guest gave memory back
    print(f"an hour of 3 guests: {wall:.3f} s of wall time")  # the figure, not a gate


def test_host_memory_is_read_each_step_and_journaled_behind_each_decision() -> None:
    from memballoon.manager.port import HostMemory
    from memballoon.protocol.procfs import HostMemoryError, Psi

    class Probe:
        def __init__(self) -> None:
            self.fail = False

        def read(self) -> HostMemory:
            if self.fail:
                raise HostMemoryError("cannot read /proc/meminfo: gone")
            return HostMemory(1 << 30, 512 << 20, Psi(2.0, 1.0, 5), "probe")

    clock = ManualClock()
    b = FakeBackend(["a"], clock)
    probe = Probe()
    core = ManagerCore(Half(), {}, None, reserve_pages=100, counters=b.counters)
    e = Engine(b, core, Journal(None), clock, host_probe=probe)
    e.step()
    (rec,) = e.journal.tail()  # type: ignore[attr-defined]
    assert rec["host"]["available_bytes"] == 512 << 20
    assert rec["host"]["reserve_bytes"] == 100 * PAGE_SIZE
    assert rec["host"]["psi_some_avg10"] == 2.0
    assert e.host is not None and core.last_host is not None
    probe.fail = True
    clock.advance(60.0)
    e.step()  # the round goes on without the host figures (an auto budget holds the guests)
    assert b.counters["host_memory_error"] == 1 and e.host is None
    assert b.counters["host_memory_missing"] == 1
