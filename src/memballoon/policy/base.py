"""The policy interface: pure functions of what the manager saw, to balloon targets with reasons.

A policy is an object (it may keep state between calls: moving averages, learned floors) whose
``decide(host, guests, now)`` returns one ``Decision`` per guest it wants to change. It does no
I/O, reads no clock (``now`` is passed in) and draws randomness only from a ``random.Random``
it was given. The manager calls it once a policy period; the simulator calls the same object.

Units: pages of 4 KiB. A guest's *size* is what it keeps (``ram_pages - balloon_pages``);
``GuestSettings.min_pages``/``max_pages`` bound the size, never the balloon: a policy never
returns a balloon that leaves a guest below ``min_pages`` or above ``max_pages``
(``clamp_balloon`` enforces it, and the manager enforces it again).

What a policy keeps between calls survives a daemon restart as its ``snapshot(now)``, a
versioned ``PolicySnapshot`` (each policy's own subclass, named by its ``policy`` field) that
``restore(snap, now)`` takes up, like the manager core's ``CoreSnapshot``: times are ages at the
moment of the snapshot, never readings of a clock a new process does not share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import Field, ValidationInfo, model_validator

from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.record import read_only_record
from memballoon.model.snapshot import Snapshot
from memballoon.policy.sample import GuestSample, HostSample


@read_only_record
class Decision:
    guest: str
    balloon_pages: int  # the new balloon target
    reason: str  # one line a person can read: why
    inputs: Mapping[str, float] = field(default_factory=dict)  # the figures that led to it
    # A decision the host budget or a guest's safety needs now: the manager applies it even
    # where its anti-flapping hold would refuse a reversal (never past floors or ceilings).
    urgent: bool = False


#: Pages a snapshot holds (a guest's size, a balloon, a working set): never negative.
Pages = Annotated[int, Field(ge=0)]
#: Seconds, finite and never negative: an age at the moment of the snapshot, or what is left
#: of a period (None where the snapshot needs "never").
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PolicySnapshot(Snapshot):
    """Base of every policy's snapshot (version 1); a subclass adds the policy's state and a
    ``policy`` field naming it (``Literal["default"]``, ...), which tells snapshots apart."""

    version: Literal[1] = 1

    @model_validator(mode="before")
    @classmethod
    def _says_what_it_is(cls, data: Any, info: ValidationInfo) -> Any:
        # both have defaults for the policy that builds one; a snapshot read from JSON must
        # name them (an empty object is another program's file, not an empty state)
        if info.mode == "json" and isinstance(data, dict):
            missing = [k for k in ("version", "policy") if k not in data]
            if missing:
                raise ConfigError(f"a snapshot names its {' and '.join(missing)}")
        return data


S = TypeVar("S", bound=PolicySnapshot)


def own_snapshot(snap: PolicySnapshot, kind: type[S], policy: str) -> S:
    """``snap`` as ``kind``; a UsageError when another policy's snapshot was handed over."""
    if not isinstance(snap, kind):
        raise UsageError(f"{policy}: cannot restore a {type(snap).__name__}")
    return snap


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        """Targets for the guests that should change (others keep theirs)."""
        ...

    def snapshot(self, now: float) -> PolicySnapshot:
        """What a restarted daemon needs to go on deciding where this policy stopped."""
        ...

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        """Take up ``snap`` (this policy's own, from ``snapshot``) on the clock at ``now``."""
        ...


def clamp_balloon(g: GuestSample, balloon_pages: int) -> int:
    """The balloon nearest ``balloon_pages`` that keeps ``g`` within its floor and ceiling."""
    # ``GuestSample.ceiling_pages``/``floor_pages`` and max(lo, min(hi, ...)) written out:
    # the policy and the manager clamp every guest every call
    ram, settings = g.ram_pages, g.settings
    mx = settings.max_pages
    lo = 0 if mx is None or mx >= ram else ram - mx  # smallest balloon: the guest at its ceiling
    mn = settings.min_pages
    hi = ram - (mn if mn < ram else ram)  # largest balloon: the guest at its floor
    if balloon_pages > hi:
        balloon_pages = hi
    return lo if balloon_pages < lo else balloon_pages
