"""The asyncio shell around the engine: the daemon's and the demo's loop.

``AsyncEngine`` adds to ``manager.engine.Engine`` only what real time needs: a period between
steps, the backend's socket I/O before and after a step (``refresh``/``flush`` of a backend
that implements ``manager.port.AsyncIO``, each bounded by ``call_timeout_s``: a backend that
hangs costs that round, counted as ``backend_error``), one round at a time (the loop, a manual
target and the shutdown share a lock), a stop event, the shutdown's wait for balloons to
deflate, and a watch on the host between steps: with a host probe, the host's memory is read
every ``watch_s`` and a host fallen under its reserve gets the next step at once. Everything
else, collect, decide, act and journal, is the engine's step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from memballoon.manager.core import Action, ManagerCounter
from memballoon.manager.engine import Engine
from memballoon.manager.port import AsyncIO
from memballoon.model.counters import CounterName
from memballoon.model.errors import UsageError

log = logging.getLogger(__name__)


class AsyncEngineCounter(CounterName):
    """What ``AsyncEngine`` counts in its engine's bag besides the manager's own (a failed
    backend I/O call is the manager's ``backend_error``)."""

    TICK_HOOK_ERROR = "tick_hook_error"  # on_tick display hooks that raised (ignored)
    EARLY_STEPS = "early_steps"  # steps taken before the period was up: the host went short


CALL_TIMEOUT_S: Final = 10.0
SHUTDOWN_WAIT_S: Final = 20.0
SHUTDOWN_POLL_S: Final = 0.1
#: How often the host's memory is looked at between steps (a cheap read of /proc or a cgroup).
WATCH_S: Final = 0.2

TickHook = Callable[[Engine], None]


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        *,
        period_s: float = 1.0,
        call_timeout_s: float = CALL_TIMEOUT_S,
        on_tick: TickHook | None = None,
        watch_s: float = WATCH_S,
    ) -> None:
        if not period_s > 0:
            raise UsageError(f"period_s must be positive, got {period_s}")
        self.engine = engine
        self.period_s = period_s
        self.call_timeout_s = call_timeout_s
        self.on_tick = on_tick
        self.watch_s = watch_s if engine.host_probe is not None else period_s
        self._io = engine.backend if isinstance(engine.backend, AsyncIO) else None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one round at a time (the loop, a manual set, shutdown)

    async def _io_call(self, what: str) -> bool:
        if self._io is None:
            return True
        try:
            await asyncio.wait_for(getattr(self._io, what)(), self.call_timeout_s)
        except Exception as exc:  # the backend is an edge: one failed round, not the loop
            self.engine.counters.inc(ManagerCounter.BACKEND_ERROR)
            log.warning("backend %s: %s failed: %r", self.engine.backend.name, what, exc)
            return False
        return True

    async def refresh(self) -> None:
        """Bring the backend's samples up to date (status requests use it)."""
        await self._io_call("refresh")
        self.engine.collect()

    async def run_once(self) -> list[Action]:
        async with self._lock:
            if not await self._io_call("refresh"):
                return []
            actions = self.engine.step()
            await self._io_call("flush")
            if self.on_tick is not None:
                try:
                    self.on_tick(self.engine)
                except Exception:  # a display hook must not stop the manager
                    self.engine.counters.inc(AsyncEngineCounter.TICK_HOOK_ERROR)
            return actions

    async def set_manual(self, guest: str, balloon_pages: int, *,
                         force: bool = False) -> tuple[Action, bool]:
        async with self._lock:
            await self._io_call("refresh")
            a, ok = self.engine.set_manual(guest, balloon_pages, force=force)
            await self._io_call("flush")
            return a, ok

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
            await self._sleep(wait)

    async def _sleep(self, wait: float) -> None:
        """Wait ``wait`` seconds (or until stopped); with a host probe, look at the host every
        ``watch_s`` and cut the wait short when it falls under its reserve: a host-side burst
        is answered in a fraction of a period, not up to a whole one later."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while (left := end - loop.time()) > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(left, self.watch_s))
            if self.watch_s < self.period_s and self.engine.host_short():
                self.engine.counters.inc(AsyncEngineCounter.EARLY_STEPS)
                return

    def stop(self) -> None:
        self._stop.set()

    async def deflate_all(self, wait_s: float = SHUTDOWN_WAIT_S) -> bool:
        """Deflate every live guest to its max size (journaled); True once all balloons got
        there (or their guests died) within ``wait_s``."""
        e = self.engine
        async with self._lock:
            if not await self._io_call("refresh"):
                return False
            want = e.shutdown()
            await self._io_call("flush")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while want:
                await self._io_call("refresh")
                want = e.shutdown_pending(want)
                if not want or loop.time() >= deadline:
                    break
                await asyncio.sleep(SHUTDOWN_POLL_S)
            e.shutdown_incomplete(want, wait_s)
            return not want


__all__ = ["AsyncEngine"]
