"""The local world as a manager ``Backend``: an adapter over ``LocalHost`` (edge: asyncio clock).

``LocalHost`` keeps each guest's latest pressure report but not when it came; the adapter
notes the loop's monotonic time whenever a guest's report object changes, which is the
``report_time`` the manager core ages reports by.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from memballoon.local.host import GuestView, LocalHost
from memballoon.manager.backend import GuestState
from memballoon.model.counters import Counters
from memballoon.model.errors import MemballoonError
from memballoon.protocol.pressure import PressureReport


class LocalBackend:
    def __init__(self, host: LocalHost) -> None:
        self.host = host
        self.counters = host.counters
        self._seen: dict[str, tuple[PressureReport, float]] = {}
        self.views: dict[str, GuestView] = {}

    @property
    def name(self) -> str:
        return "local"

    def _state(self, v: GuestView, now: float) -> GuestState:
        rep, t = v.report, None
        if rep is not None:
            seen = self._seen.get(v.name)
            if seen is None or seen[0] is not rep:
                self._seen[v.name] = (rep, now)
                t = now
            else:
                t = seen[1]
        return GuestState(
            name=v.name, alive=v.alive, ram_pages=v.ram_pages, balloon_pages=v.actual_pages,
            target_pages=v.target_pages, report=rep, report_time=t,
            resident_bytes=v.resident_bytes,
            active_sampled=rep.active_sampled if rep is not None else 0,
            active_touched=rep.active_touched if rep is not None else 0,
        )

    async def guests(self) -> Mapping[str, GuestState]:
        now = asyncio.get_running_loop().time()
        self.views = self.host.snapshot()
        return {name: self._state(v, now) for name, v in self.views.items()}

    async def set_target(self, guest: str, balloon_pages: int) -> bool:
        try:
            return await self.host.set_target(guest, balloon_pages)
        except MemballoonError:
            self.counters.inc("set_target_refused")
            return False

    def host_resident_bytes(self) -> int:
        return self.host.resident_bytes()

    def guest_counters(self, guest: str) -> Mapping[str, int]:
        v = self.views.get(guest)
        return v.counters if v is not None else Counters().as_dict()


__all__ = ["LocalBackend"]
