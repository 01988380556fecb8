"""``static``: no ballooning, the baseline every other policy is measured against.

Two modes. ``deflate`` (the default) sets every guest's balloon to the smallest its limits allow
(0 unless ``max_pages`` caps the guest below its RAM): what QEMU, libvirt, Nova and KubeVirt do,
having no automatic policy. ``hold`` keeps whatever target each guest has, only pulling one that
breaks its floor or ceiling back inside them. It keeps nothing between calls: its snapshot is
empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

from memballoon.model.errors import ConfigError
from memballoon.policy.base import Decision, PolicySnapshot, clamp_balloon, own_snapshot
from memballoon.policy.sample import GuestSample, HostSample

STATIC_MODES: Final = ("deflate", "hold")


class StaticSnapshot(PolicySnapshot):
    """``StaticPolicy`` keeps no state: its snapshot only names it."""

    policy: Literal["static"] = "static"


class StaticPolicy:
    """No ballooning: targets at 0 (``mode="deflate"``) or held (``mode="hold"``)."""

    def __init__(self, mode: str = "deflate") -> None:
        if mode not in STATIC_MODES:
            raise ConfigError(f"static: unknown mode {mode!r}; choose one of {STATIC_MODES}")
        self.mode = mode

    @property
    def name(self) -> str:
        return "static"

    def decide(
        self, host: HostSample, guests: Sequence[GuestSample], now: float
    ) -> list[Decision]:
        out: list[Decision] = []
        for g in guests:
            if not g.alive:
                continue
            want = 0 if self.mode == "deflate" else g.target_pages
            new = clamp_balloon(g, want)
            if new == g.target_pages:
                continue
            why = "no ballooning" if self.mode == "deflate" else "held target outside limits"
            out.append(Decision(g.name, new, f"static {self.mode}: {why}", {
                "target_pages": float(g.target_pages),
                "floor_pages": float(g.floor_pages()),
                "ceiling_pages": float(g.ceiling_pages()),
            }))
        return out

    def snapshot(self, now: float) -> StaticSnapshot:
        return StaticSnapshot()

    def restore(self, snap: PolicySnapshot, now: float) -> None:
        own_snapshot(snap, StaticSnapshot, self.name)
