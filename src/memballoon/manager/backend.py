"""What the manager needs of a world (local processes, QEMU over QMP, the simulator).

A backend owns the guests of one world. The manager asks it for a snapshot of every guest and
hands it balloon targets; it never touches guests any other way. Every method must survive a
misbehaving guest: a dead or broken guest shows ``alive=False`` and its ``set_target`` returns
False; it never raises for one guest's fault (a ``PeerError`` is counted by the backend).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from memballoon.model.counters import Counters
from memballoon.protocol.pressure import PressureReport


@dataclass(frozen=True, slots=True)
class GuestState:
    name: str
    alive: bool
    ram_pages: int
    balloon_pages: int  # actual, as the device/QEMU reports it
    target_pages: int
    report: PressureReport | None
    report_time: float | None  # backend clock (monotonic seconds) when the report arrived
    resident_bytes: int | None  # host memory behind this guest, where measurable
    active_sampled: int = 0
    active_touched: int = 0


class Backend(Protocol):
    counters: Counters

    @property
    def name(self) -> str: ...

    async def guests(self) -> Mapping[str, GuestState]:
        """A snapshot of every guest the backend knows (dead ones included, marked)."""
        ...

    async def set_target(self, guest: str, balloon_pages: int) -> bool:
        """Ask ``guest`` for a balloon of ``balloon_pages``; False when it cannot be asked."""
        ...

    def host_resident_bytes(self) -> int:
        """Host memory all the backend's guests hold now."""
        ...
