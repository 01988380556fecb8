"""AsyncEngine: the asyncio shell runs the engine's step between the backend's async I/O; a
backend that fails or hangs costs a round, never the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from memballoon.edge.aio import AsyncEngine
from memballoon.edge.clock import MonotonicClock
from memballoon.edge.journal import Journal
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.manager.port import AsyncIO
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Decision
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.protocol.pressure import PressureReport

RAM = 4096


class SocketBackend:
    """A backend whose guests answer over 'sockets': refresh polls, flush sends."""

    name = "sockets"

    def __init__(self, clock: MonotonicClock) -> None:
        self.clock = clock
        self.counters = Counters()
        self.sent: dict[str, int] = {"a": 0}  # what the guest has been told
        self.queued: dict[str, int] = {}
        self.seen: dict[str, int] = {}  # what the last refresh saw
        self.refreshes = self.flushes = 0
        self.hang_refresh = self.fail_flush = False

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.hang_refresh:
            await asyncio.sleep(3600)
        self.seen = dict(self.sent)

    async def flush(self) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise OSError("socket gone")
        self.sent.update(self.queued)
        self.queued.clear()

    def guests(self) -> Mapping[str, GuestSample]:
        now = self.clock.now()
        rep = PressureReport("a", now, RAM * PAGE_SIZE, 0, 1 << 30, 0, 0, 0, 0, 0, 0, 0, 0,
                             0.0, 0, 0)
        return {n: GuestSample(n, RAM, p, p, report=rep, report_time=now)
                for n, p in self.seen.items()}

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        self.queued[guest] = balloon_pages
        return True

    def host_resident_bytes(self) -> int:
        return 0


class Half:
    name = "half"

    def decide(self, host: HostSample, guests: list[GuestSample],
               now: float) -> list[Decision]:
        return [Decision(g.name, g.ram_pages // 2, "half") for g in guests]


def shell(b: SocketBackend, **kw: float) -> AsyncEngine:
    core = ManagerCore(Half(), {}, 10_000, counters=b.counters)
    return AsyncEngine(Engine(b, core, Journal(None), b.clock), **kw)  # type: ignore[arg-type]


def test_a_round_is_refresh_step_flush() -> None:
    b = SocketBackend(MonotonicClock())
    assert isinstance(b, AsyncIO)
    s = shell(b, period_s=0.01)
    ticks: list[int] = []
    s.on_tick = lambda e: ticks.append(e.steps)
    acts = asyncio.run(s.run_once())
    assert [(a.guest, a.new_pages) for a in acts] == [("a", 2048)]
    assert (b.refreshes, b.flushes, b.sent, ticks) == (1, 1, {"a": 2048}, [1])


def test_a_hanging_refresh_costs_the_round_and_a_failed_flush_is_counted() -> None:
    b = SocketBackend(MonotonicClock())
    s = shell(b, period_s=0.01, call_timeout_s=0.05)
    b.hang_refresh = True
    assert asyncio.run(s.run_once()) == []
    assert b.counters["backend_error"] == 1 and s.engine.steps == 0
    b.hang_refresh, b.fail_flush = False, True
    asyncio.run(s.run_once())
    assert b.counters["backend_error"] == 2 and b.sent == {"a": 0}  # nothing got out
    b.fail_flush = False
    asyncio.run(s.run_once())
    assert b.sent == {"a": 2048}


def test_deflate_all_waits_for_the_balloons_and_names_the_stragglers() -> None:
    b = SocketBackend(MonotonicClock())
    s = shell(b, period_s=0.01)
    asyncio.run(s.run_once())
    assert asyncio.run(s.deflate_all(wait_s=1.0))
    assert b.sent == {"a": 0}
    asyncio.run(s.run_once())
    b.fail_flush = True  # the deflation never reaches the guest
    assert not asyncio.run(s.deflate_all(wait_s=0.2))
    assert b.counters["shutdown_deflate_incomplete"] == 1


def test_run_for_a_time_and_stop() -> None:
    b = SocketBackend(MonotonicClock())
    s = shell(b, period_s=0.01)
    asyncio.run(s.run(seconds=0.05))
    assert s.engine.steps >= 2

    async def go() -> None:
        s.period_s = 60.0
        t = asyncio.create_task(s.run())
        await asyncio.sleep(0)
        s.stop()
        await asyncio.wait_for(t, 5.0)

    asyncio.run(go())


def test_a_host_falling_under_its_reserve_gets_a_step_before_the_period_is_up() -> None:
    from memballoon.manager.port import HostMemory

    class Probe:
        avail = 1 << 30

        def read(self) -> HostMemory:
            return HostMemory(2 << 30, self.avail, None, "probe")

    b = SocketBackend(MonotonicClock())
    probe = Probe()
    core = ManagerCore(Half(), {}, None, reserve_pages=1000, counters=b.counters)
    s = AsyncEngine(Engine(b, core, Journal(None), b.clock, host_probe=probe), period_s=30.0,
                    watch_s=0.01)

    async def go() -> None:
        t = asyncio.create_task(s.run())
        while s.engine.steps < 1:
            await asyncio.sleep(0.005)
        probe.avail = 10 * PAGE_SIZE  # a host-side burst: far under the reserve
        while s.engine.steps < 2:  # the next step comes long before 30 s
            await asyncio.sleep(0.005)
        s.stop()
        await t

    asyncio.run(asyncio.wait_for(go(), 10.0))
    assert b.counters["early_steps"] >= 1
