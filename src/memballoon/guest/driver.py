"""What every balloon driver offers the layers above it (harness, guest runtime, simulator).

A driver owns frames it allocated from its ``GuestMemory`` (state ``BALLOON``). Some of them are
in the balloon (the host has them); the rest are transient: refused by the host and waiting to
be freed at the end of the cycle, or sent and not yet acknowledged.
"""

from __future__ import annotations

from typing import Protocol

from memballoon.model.pages import PfnArray


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
