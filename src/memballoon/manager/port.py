"""What the engine needs of the world around it: a backend, a clock and a journal.

A backend owns the guests of one world (local processes, QEMU over QMP, libvirt, the
simulator). The engine asks it for one ``GuestSample`` per guest and hands it balloon targets;
it never touches guests any other way. Every call is synchronous and quick: a world whose
guests answer over sockets (QEMU) keeps its latest answers and queues its targets, and the
shell that drives the engine does that I/O before and after a step (``AsyncIO``). A backend
must survive a misbehaving guest: a dead or broken guest shows ``alive=False`` and its
``set_target`` returns False; it never raises for one guest's fault.

A ``HostProbe`` reads the host's own memory (what is available to it, its pressure) each
step, so the policy sees memory taken by anything that is not a guest.

The clock is the one clock of a run: the engine steps by it and backends stamp
``report_time`` with it where reports arrive. Real worlds use ``edge.clock.MonotonicClock``;
the simulator and tests use ``ManualClock``, so an hour of a loop runs in well under a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.policy.sample import GuestSample
from memballoon.protocol.procfs import Psi


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a clock that never goes back (its origin means nothing)."""
        ...


class ManualClock:
    """A clock that moves only when told: the simulator's and the tests'."""

    __slots__ = ("_t",)

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> float:
        if not seconds >= 0:
            raise UsageError(f"a clock never goes back: advance({seconds})")
        self._t += seconds
        return self._t

    def set(self, t: float) -> None:
        if not t >= self._t:
            raise UsageError(f"a clock never goes back: {t} < {self._t}")
        self._t = float(t)


class Backend(Protocol):
    counters: Counters

    @property
    def name(self) -> str: ...

    def guests(self) -> Mapping[str, GuestSample]:
        """One sample per guest the backend knows (dead ones included, ``alive=False``)."""
        ...

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        """Ask ``guest`` for a balloon of ``balloon_pages``; False when it cannot be asked."""
        ...

    def host_resident_bytes(self) -> int:
        """Host memory all the backend's guests hold now."""
        ...


@runtime_checkable
class AsyncIO(Protocol):
    """A backend whose guests answer over sockets: the async shell calls ``refresh`` before a
    step (poll the guests, keep the answers) and ``flush`` after it (send queued targets)."""

    async def refresh(self) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HostMemory:
    """The host's own memory at one moment, as a ``HostProbe`` read it: the whole machine
    (``/proc/meminfo``) or the cgroup that stands for the guests' share of it."""

    total_bytes: int  # MemTotal, or the cgroup's limit
    available_bytes: int  # MemAvailable, or what the cgroup may still take
    psi: Psi | None  # memory pressure stall information (None: the kernel has none)
    source: str  # what was read, for the operator ("/proc/meminfo", "cgroup v2 /sys/...")


class HostProbe(Protocol):
    def read(self) -> HostMemory:
        """The host's memory now; raises HostMemoryError when it cannot be read."""
        ...


class JournalSink(Protocol):
    def write(self, rec: dict[str, Any], *, mono: float) -> dict[str, Any]:
        """Keep one record; ``mono`` is the engine's clock."""
        ...


__all__ = ["AsyncIO", "Backend", "Clock", "HostMemory", "HostProbe", "JournalSink",
           "ManualClock"]
