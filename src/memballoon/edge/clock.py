"""The real clock: ``time.monotonic`` (the one asyncio's loop reads too)."""

from __future__ import annotations

import time


class MonotonicClock:
    """Seconds since an arbitrary origin; never goes back."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


__all__ = ["MonotonicClock"]
