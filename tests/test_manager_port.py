"""The port's ManualClock: moves only when told, never back; AsyncIO is recognised."""

from __future__ import annotations

import pytest

from memballoon.manager.port import AsyncIO, ManualClock
from memballoon.model.errors import UsageError


def test_manual_clock_moves_only_forward() -> None:
    c = ManualClock(5.0)
    assert c.now() == 5.0 and c.advance(2.5) == 7.5 and c.now() == 7.5
    c.set(10.0)
    assert c.now() == 10.0
    for bad in (lambda: c.advance(-1.0), lambda: c.advance(float("nan")), lambda: c.set(9.0)):
        with pytest.raises(UsageError):
            bad()
    assert c.now() == 10.0


def test_async_io_is_a_structural_check() -> None:
    class Sync:
        pass

    class Sockets:
        async def refresh(self) -> None: ...

        async def flush(self) -> None: ...

    assert isinstance(Sockets(), AsyncIO) and not isinstance(Sync(), AsyncIO)
