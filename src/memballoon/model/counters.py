"""Named event counters: every rejected input bumps one, so misbehaviour is visible."""

from __future__ import annotations

from collections import Counter


class Counters:
    """A bag of named monotonically increasing counters (cheap; no I/O)."""

    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self._c[name] += n

    def __getitem__(self, name: str) -> int:
        return self._c.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))

    def total(self) -> int:
        return sum(self._c.values())

    def __repr__(self) -> str:
        return f"Counters({self.as_dict()!r})"
