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

from memballoon.protocol.pressure import PressureReport


@dataclass(frozen=True, slots=True)
class GuestSettings:
    """Per-guest limits set by the administrator."""

    min_pages: int = 0  # the guest never keeps less than this (a floor the policy never breaks)
    max_pages: int | None = None  # the guest never keeps more (None: its whole RAM)
    shares: int = 1000  # relative weight (Proxmox/ESX "shares")

    def __post_init__(self) -> None:
        if self.min_pages < 0 or self.shares <= 0:
            raise ValueError("min_pages must be >= 0 and shares > 0")
        if self.max_pages is not None and self.max_pages < self.min_pages:
            raise ValueError("max_pages below min_pages")


@dataclass(frozen=True, slots=True)
class GuestSample:
    """What the manager knows about one guest at one moment."""

    name: str
    ram_pages: int  # the guest's RAM: the most it can ever keep
    balloon_pages: int  # the balloon now (device's view)
    target_pages: int  # the balloon target last set
    settings: GuestSettings = GuestSettings()
    report: PressureReport | None = None  # latest pressure report pushed by the guest
    report_age_s: float | None = None  # how old that report is
    alive: bool = True
    # ESX-style active-page sampling (Waldspurger 2002): of ``sampled`` random pages
    # invalidated at the start of the sampling period, ``touched`` were used again.
    active_sampled: int = 0
    active_touched: int = 0

    @property
    def size_pages(self) -> int:
        return self.ram_pages - self.balloon_pages

    def floor_pages(self) -> int:
        return min(self.settings.min_pages, self.ram_pages)

    def ceiling_pages(self) -> int:
        mx = self.settings.max_pages
        return self.ram_pages if mx is None else min(mx, self.ram_pages)


@dataclass(frozen=True, slots=True)
class HostSample:
    """What the manager knows about the host at one moment."""

    budget_pages: int  # memory all guests together may hold on the host
    resident_pages: int  # what they hold now (memfd st_blocks, QEMU RSS, simulated)
    enforced: bool = False  # a memory cgroup enforces the budget (else it is only watched)


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
