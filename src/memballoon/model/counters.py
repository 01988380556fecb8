"""Named event counters: every rejected input bumps one, so misbehaviour is visible.

Each component declares the names it counts in one place, as members of its own
``CounterName`` enum (Firecracker's ``metrics.rs`` keeps every counter as a declared field):

    class VmwDeviceCounter(CounterName):
        CMD_START = "cmd_start"  # START commands answered

and counts with ``counters.inc(VmwDeviceCounter.CMD_START)``. ``inc`` takes only such members,
so a typo is a type error (mypy --strict), never a new counter nobody reads; a family of names
(one per queue, per command, per reason) is a table of members built once, not an f-string.
Members are strings (``StrEnum``): a bag reads, prints and serializes by the plain name
(``counters["cmd_start"]``, ``as_dict()``), so several components can share one bag (the
daemon's), and metrics and JSON see the names unchanged.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum


class CounterName(StrEnum):
    """Base of every component's counter names (subclass it; it has no members itself)."""


class Counters:
    """A bag of named monotonically increasing counters (cheap; no I/O)."""

    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def inc(self, name: CounterName, n: int = 1) -> None:
        self._c[name] += n

    def __getitem__(self, name: str) -> int:
        return self._c.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self._c.items())}

    def total(self) -> int:
        return sum(self._c.values())

    def __repr__(self) -> str:
        return f"Counters({self.as_dict()!r})"


__all__ = ["CounterName", "Counters"]
