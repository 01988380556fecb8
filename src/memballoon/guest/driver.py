"""What every balloon driver offers the layers above it (harness, guest runtime, simulator).

A driver owns frames it allocated from its ``GuestMemory`` (state ``BALLOON``). Some of them are
in the balloon (the host has them); the rest are transient: refused by the host and waiting to
be freed at the end of the cycle, or sent and not yet acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from memballoon.model.pages import PfnArray


def idle_each(work: Callable[[float], None], now: float, period: float,
              limit: float) -> tuple[float, int]:
    """``work`` (a driver's idle work) for every period after ``now`` whose time falls at or
    before ``limit``, one call a period: the clock after them (``period`` added once a period,
    as the ticks add it) and how many. The reference a driver's one-call ``idle_run`` must
    match."""
    n = 0
    while now + period <= limit:
        now += period
        work(now)
        n += 1
    return now, n


class BalloonDriver(Protocol):
    #: Work period in seconds (the seeds: 1 s).
    period_s: float

    def load(self, now: float) -> None:
        """Start talking to the host (VMware: START then GUEST_ID; virtio: feature negotiation)."""
        ...

    def work(self, now: float) -> None:
        """One work period: read the target, then inflate or deflate by at most one cycle."""
        ...

    def unload(self, now: float) -> None:
        """Give every frame back to the guest the way the protocol says for unload."""
        ...

    @property
    def balloon_pages(self) -> int:
        """Frames in the balloon (acknowledged by the host)."""
        ...

    @property
    def target_pages(self) -> int:
        """The last target the driver read from the host."""
        ...

    def balloon_pfns(self) -> PfnArray:
        """Frames in the balloon, sorted."""
        ...

    def transient_pfns(self) -> PfnArray:
        """Frames the driver holds outside the balloon (refused, in flight), sorted."""
        ...

    def stats(self) -> dict[str, int]:
        """The driver's statistics by their seed names."""
        ...
