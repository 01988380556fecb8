"""The manager loop (asyncio edge): collect, decide, act, record, once a period.

``Manager.run_once`` asks the backend for its guests (``backend.guests()``), hands them to the
pure ``ManagerCore.step`` with the loop's monotonic clock, applies each action with
``backend.set_target`` and journals it with whether it was applied. Every call into the
backend is bounded by a timeout and wrapped: one guest whose ``set_target`` fails or hangs is
counted (``set_target_failed``/``set_target_error``) and the others still get theirs; a
backend whose snapshot fails skips that round (``backend_error``) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeVar

from memballoon.manager.backend import Backend, GuestState
from memballoon.manager.core import Action, Hysteresis, ManagerCore
from memballoon.manager.journal import Journal
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import bytes_to_pages
from memballoon.policy.base import GuestSettings, Policy

log = logging.getLogger(__name__)

CALL_TIMEOUT_S: Final = 10.0
SHUTDOWN_WAIT_S: Final = 20.0

T = TypeVar("T")
TickHook = Callable[["Manager", Mapping[str, GuestState]], None]


class Manager:
    def __init__(
        self,
        backend: Backend,
        core: ManagerCore,
        journal: Journal,
        *,
        period_s: float = 1.0,
        counters: Counters | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
        on_tick: TickHook | None = None,
    ) -> None:
        if not period_s > 0:
            raise UsageError(f"period_s must be positive, got {period_s}")
        self.backend = backend
        self.core = core
        self.journal = journal
        self.period_s = period_s
        self.counters = counters if counters is not None else core.counters
        self.call_timeout_s = call_timeout_s
        self.on_tick = on_tick
        self.states: Mapping[str, GuestState] = {}
        self.host_resident_bytes = 0
        self.decisions = 0
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one round at a time (the loop, a manual set, shutdown)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _call(self, aw: Awaitable[T]) -> T:
        return await asyncio.wait_for(aw, self.call_timeout_s)

    async def collect(self) -> Mapping[str, GuestState] | None:
        try:
            states = await self._call(self.backend.guests())
            self.host_resident_bytes = self.backend.host_resident_bytes()
        except Exception as exc:  # the backend is an edge: any failure costs one round only
            self.counters.inc("backend_error")
            log.warning("backend %s failed to report: %r", self.backend.name, exc)
            return None
        self.states = states
        return states

    async def apply(self, a: Action) -> bool:
        try:
            ok = await self._call(self.backend.set_target(a.guest, a.new_pages))
        except Exception as exc:
            self.counters.inc("set_target_error")
            log.warning("set_target(%s, %d) failed: %r", a.guest, a.new_pages, exc)
            ok = False
        if not ok:
            self.counters.inc("set_target_failed")
        else:
            self.decisions += 1
            self.counters.inc(f"decisions_{a.kind}")
        self.journal.action(a, mono=self.now(), applied=ok)
        return ok

    async def run_once(self) -> list[Action]:
        async with self._lock:
            states = await self.collect()
            if states is None:
                return []
            now = self.now()
            actions = self.core.step(now, states, self.host_resident_bytes)
            for e in self.core.drain_events():
                self.journal.event(e, mono=now)
            for a in actions:
                await self.apply(a)
            if self.on_tick is not None:
                try:
                    self.on_tick(self, states)
                except Exception:  # a display hook must not stop the manager
                    self.counters.inc("tick_hook_error")
            return actions

    async def set_manual(self, guest: str, balloon_pages: int) -> tuple[Action, bool]:
        async with self._lock:
            states = await self.collect()
            if states is None or guest not in states:
                raise UsageError(f"no guest named {guest!r}")
            st = states[guest]
            if not st.alive:
                raise UsageError(f"guest {guest!r} is not alive")
            a = self.core.set_manual(self.now(), st, balloon_pages)
            return a, await self.apply(a)

    async def run(self, seconds: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while not self._stop.is_set():
            t0 = loop.time()
            await self.run_once()
            if deadline is not None and loop.time() >= deadline:
                break
            wait = self.period_s - (loop.time() - t0)
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)

    def stop(self) -> None:
        self._stop.set()

    async def deflate_all(self, wait_s: float = SHUTDOWN_WAIT_S) -> bool:
        """Deflate every live guest to its max size (journaled); True once all balloons got
        there (or their guests died) within ``wait_s``."""
        async with self._lock:
            states = await self.collect()
            if states is None:
                return False
            actions = self.core.shutdown_actions(states)
            for a in actions:
                await self.apply(a)
            want = {a.guest: a.new_pages for a in actions}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while want:
                states = await self.collect() or {}
                want = {g: p for g, p in want.items()
                        if g in states and states[g].alive and states[g].balloon_pages != p}
                if not want or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.1)
            for g, p in want.items():
                self.counters.inc("shutdown_deflate_incomplete")
                self.journal.write({"kind": "shutdown_incomplete", "guest": g,
                                    "reason": f"balloon not at {p} pages after {wait_s} s"},
                                   mono=self.now())
            return not want


async def run_manager(
    backend: Backend,
    policy: Policy,
    settings: Mapping[str, GuestSettings],
    *,
    budget_bytes: int,
    period_s: float = 1.0,
    seconds: float | None = None,
    journal: Journal | None = None,
    hysteresis: Hysteresis | None = None,
    enforced: bool = False,
    on_tick: TickHook | None = None,
    deflate_at_end: bool = True,
) -> Manager:
    """Run the manager over ``backend`` for ``seconds`` (None: until ``stop``) and return it
    (its counters, core and journal hold what happened). The demo's entry point."""
    core = ManagerCore(policy, settings, bytes_to_pages(budget_bytes), hysteresis=hysteresis,
                       enforced=enforced, counters=backend.counters)
    m = Manager(backend, core, journal or Journal(None), period_s=period_s, on_tick=on_tick)
    try:
        await m.run(seconds)
    finally:
        if deflate_at_end:
            await m.deflate_all()
    return m


__all__ = ["Manager", "run_manager"]
