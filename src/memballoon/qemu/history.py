"""The balloon's recent sizes, so a report can be paired with the balloon of its own moment.

A guest's pressure report and the balloon size the host polls are read at different moments:
the agent writes its line, the backend reads the balloon at its next poll. Between the two the
balloon may have moved (a deflate takes about 0.3 s), and a report paired with the later size
makes MemAvailable and the balloon disagree: the working set seems to jump by whatever the
balloon moved. Where the guest does not say which balloon it saw (an agent without the vmstat
balloon counters; libvirt's balloon stats), the backend keeps the sizes it polled, stamped
on its clock, and asks for the one in force when the report was written.

Pure: callers pass the times (the engine's clock, or the host's wall clock for libvirt's
``last-update``).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from memballoon.model.errors import UsageError

#: Enough for a report up to a minute late at one poll a second; older reports are stale
#: anyway (the core refuses to inflate on a report older than its ``report_max_age_s``).
HISTORY_LEN: Final = 64


class BalloonHistory:
    """(time, balloon pages) as polled, oldest first, at most ``maxlen`` of them.

    >>> h = BalloonHistory()
    >>> h.add(1.0, 100); h.add(2.0, 300); h.add(3.0, 300)
    >>> h.at(2.5), h.at(1.9), h.at(0.5), h.at(9.0)
    (300, 100, 100, 300)
    """

    __slots__ = ("_seen",)

    def __init__(self, maxlen: int = HISTORY_LEN) -> None:
        if maxlen < 1:
            raise UsageError(f"maxlen must be at least 1, got {maxlen}")
        self._seen: deque[tuple[float, int]] = deque(maxlen=maxlen)

    def add(self, t: float, pages: int) -> None:
        """Record the balloon polled at ``t`` (times never go back; a repeat is dropped)."""
        if self._seen:
            last_t, last_p = self._seen[-1]
            if t < last_t:
                raise UsageError(f"balloon history: time went back ({t} < {last_t})")
            if pages == last_p:
                return  # only changes matter: the size holds until the next entry
        self._seen.append((t, pages))

    def at(self, t: float) -> int | None:
        """The balloon in force at ``t``: the last size polled at or before it (the oldest
        known when ``t`` is before them all; None when nothing was polled)."""
        if not self._seen:
            return None
        best = self._seen[0][1]
        for when, pages in self._seen:
            if when > t:
                break
            best = pages
        return best

    def clear(self) -> None:
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._seen)


__all__ = ["HISTORY_LEN", "BalloonHistory"]
