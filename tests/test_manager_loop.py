"""The manager loop against a fake backend: collect, decide, act, record; failures contained."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from memballoon.manager.backend import GuestState
from memballoon.manager.core import ManagerCore
from memballoon.manager.journal import Journal
from memballoon.manager.loop import Manager, run_manager
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Decision, GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

RAM = 4096


class FakeBackend:
    """Guests whose balloon follows the target at once; some misbehave on purpose."""

    name = "fake"

    def __init__(self, names: Sequence[str], *, raising: set[str] = frozenset(),  # type: ignore[assignment]
                 hanging: set[str] = frozenset(), refusing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.counters = Counters()
        self.target = dict.fromkeys(names, 0)
        self.raising, self.hanging, self.refusing = raising, hanging, refusing
        self.fail_guests = 0
        self.calls: list[tuple[str, int]] = []

    async def guests(self) -> Mapping[str, GuestState]:
        if self.fail_guests:
            self.fail_guests -= 1
            raise OSError("backend down")
        now = asyncio.get_running_loop().time()
        rep = {n: PressureReport(n, 1.0, RAM * PAGE_SIZE, 0, 1 << 30, 0, 0, 0, 0, 0, 0, 0, 0,
                                 0.0, 0, 0) for n in self.target}
        return {n: GuestState(n, True, RAM, t, t, rep[n], now, 0) for n, t in self.target.items()}

    async def set_target(self, guest: str, balloon_pages: int) -> bool:
        self.calls.append((guest, balloon_pages))
        if guest in self.raising:
            raise RuntimeError("guest exploded")
        if guest in self.hanging:
            await asyncio.sleep(3600)
        if guest in self.refusing:
            return False
        self.target[guest] = balloon_pages
        return True

    def host_resident_bytes(self) -> int:
        return sum(RAM - t for t in self.target.values()) * PAGE_SIZE


class Half:
    name = "half"

    def __init__(self) -> None:
        self.calls = 0

    def decide(self, host: HostSample, guests: Sequence[GuestSample],
               now: float) -> list[Decision]:
        self.calls += 1
        return [Decision(g.name, g.ram_pages // 2, "half") for g in guests]


def manager(b: FakeBackend, **kw: object) -> Manager:
    core = ManagerCore(Half(), {}, 10_000, counters=b.counters)
    return Manager(b, core, Journal(None), period_s=0.01, call_timeout_s=0.2, **kw)  # type: ignore[arg-type]


def test_one_round_applies_and_journals() -> None:
    b = FakeBackend(["a", "b"])
    m = manager(b)
    acts = asyncio.run(m.run_once())
    assert {(a.guest, a.new_pages) for a in acts} == {("a", 2048), ("b", 2048)}
    assert b.target == {"a": 2048, "b": 2048} and m.decisions == 2
    recs = m.journal.tail()
    assert {r["guest"] for r in recs} == {"a", "b"} and all(r["applied"] for r in recs)


def test_misbehaving_guests_never_stop_the_others() -> None:
    b = FakeBackend(["bad", "hang", "no", "ok"], raising={"bad"}, hanging={"hang"},
                    refusing={"no"})
    m = manager(b)
    asyncio.run(m.run_once())
    assert b.target["ok"] == 2048
    assert b.counters["set_target_error"] == 2  # the raise and the timeout
    assert b.counters["set_target_failed"] == 3
    applied = {r["guest"]: r["applied"] for r in m.journal.tail()}
    assert applied == {"bad": False, "hang": False, "no": False, "ok": True}


def test_backend_failure_skips_a_round_only() -> None:
    b = FakeBackend(["a"])
    b.fail_guests = 2
    m = manager(b)
    asyncio.run(m.run(seconds=0.2))
    assert b.counters["backend_error"] == 2 and b.target["a"] == 2048


def test_manual_set_and_unknown_guest() -> None:
    b = FakeBackend(["a"])
    m = manager(b)

    async def go() -> None:
        a, ok = await m.set_manual("a", 1000)
        assert ok and b.target["a"] == 1000 and a.kind == "manual"
        await m.run_once()  # the policy would say 2048: the pin holds
        assert b.target["a"] == 1000
        with pytest.raises(UsageError):
            await m.set_manual("zz", 1)

    asyncio.run(go())


def test_run_manager_deflates_at_the_end() -> None:
    b = FakeBackend(["a", "b"])
    ticks: list[int] = []
    m = asyncio.run(run_manager(b, Half(), {"a": GuestSettings()}, budget_bytes=1 << 30,
                                period_s=0.02, seconds=0.1,
                                on_tick=lambda m, s: ticks.append(len(s))))
    assert ticks and b.target == {"a": 0, "b": 0}
    kinds = [r["kind"] for r in m.journal.tail()]
    assert kinds.count("shutdown") == 2 and "policy" in kinds


def test_stop_ends_run() -> None:
    b = FakeBackend(["a"])
    m = manager(b)
    m.period_s = 60.0

    async def go() -> None:
        t = asyncio.create_task(m.run())
        await asyncio.sleep(0.05)
        m.stop()
        await asyncio.wait_for(t, 5.0)

    asyncio.run(go())
