"""The policy interface: pure functions of what the manager saw, to balloon targets with reasons.

A policy is an object (it may keep state between calls: moving averages, learned floors) whose
``decide(host, guests, now)`` returns one ``Decision`` per guest it wants to change. It does no
I/O, reads no clock (``now`` is passed in) and draws randomness only from a ``random.Random``
it was given. The manager calls it once a policy period; the simulator calls the same object.

Units: pages of 4 KiB. A guest's *size* is what it keeps (``ram_pages - balloon_pages``);
``GuestSettings.min_pages``/``max_pages`` bound the size, never the balloon: a policy never
returns a balloon that leaves a guest below ``min_pages`` or above ``max_pages``
(``clamp_balloon`` enforces it, and the manager enforces it again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memballoon.policy.sample import GuestSample, HostSample


@dataclass(frozen=True, slots=True)
class Decision:
    guest: str
    balloon_pages: int  # the new balloon target
    reason: str  # one line a person can read: why
    inputs: Mapping[str, float] = field(default_factory=dict)  # the figures that led to it
    # A decision the host budget or a guest's safety needs now: the manager applies it even
    # where its anti-flapping hold would refuse a reversal (never past floors or ceilings).
    urgent: bool = False


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        """Targets for the guests that should change (others keep theirs)."""
        ...


def clamp_balloon(g: GuestSample, balloon_pages: int) -> int:
    """The balloon nearest ``balloon_pages`` that keeps ``g`` within its floor and ceiling."""
    lo = g.ram_pages - g.ceiling_pages()  # smallest balloon: the guest at its ceiling
    hi = g.ram_pages - g.floor_pages()  # largest balloon: the guest at its floor
    return max(lo, min(hi, balloon_pages))
