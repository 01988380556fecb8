"""What every host-side balloon device offers the layers above it (harness, manager, backends)."""

from __future__ import annotations

from typing import Protocol

from memballoon.model.counters import Counters
from memballoon.model.pages import PfnArray


class BalloonDevice(Protocol):
    counters: Counters  # rejected guest input and other events, by name

    def set_target(self, pages: int) -> None:
        """Ask for a balloon of ``pages`` 4 KiB pages (the core speaks balloon pages)."""
        ...

    @property
    def target_pages(self) -> int: ...

    @property
    def actual_pages(self) -> int:
        """The balloon size as the device knows it (virtio ``actual``; VMware: locked pages)."""
        ...

    def balloon_pfns(self) -> PfnArray:
        """Frames the device holds released for the balloon, sorted."""
        ...
