"""One record per guest, from the world that runs it to the policy that sizes it.

A backend (local processes, QEMU over QMP, libvirt, the simulator) builds one ``GuestSample``
per guest when the manager's engine collects; the engine fills in the administrator's
``GuestSettings`` and hands the same record to the policy. ``report_time`` is when the guest's
latest ``PressureReport`` arrived, read from the one clock the engine also steps by: set where
the report arrives (the local host's socket, the QEMU agent channel, libvirt's stats poll, the
simulator's tick), never inferred later.

Units: pages of 4 KiB. A guest's *size* is what it keeps (``ram_pages - balloon_pages``);
``GuestSettings.min_pages``/``max_pages`` bound the size, never the balloon.
"""

from __future__ import annotations

from dataclasses import dataclass

from memballoon.model.errors import UsageError
from memballoon.model.record import read_only_record
from memballoon.protocol.pressure import PressureReport


@dataclass(frozen=True, slots=True)
class GuestSettings:
    """Per-guest limits set by the administrator."""

    min_pages: int = 0  # the guest never keeps less than this (a floor the policy never breaks)
    max_pages: int | None = None  # the guest never keeps more (None: its whole RAM)
    shares: int = 1000  # relative weight (Proxmox/ESX "shares")

    def __post_init__(self) -> None:
        if self.min_pages < 0 or self.shares <= 0:
            raise UsageError("min_pages must be >= 0 and shares > 0")
        if self.max_pages is not None and self.max_pages < self.min_pages:
            raise UsageError("max_pages below min_pages")


@read_only_record
class GuestSample:
    """What the manager knows about one guest at one moment (read-only: changed copies come
    from ``dataclasses.replace``)."""

    name: str
    ram_pages: int  # the guest's RAM: the most it can ever keep
    balloon_pages: int  # the balloon now (the device's ``actual``; VMware: locked pages)
    target_pages: int  # the balloon target last set
    settings: GuestSettings = GuestSettings()
    report: PressureReport | None = None  # latest pressure report pushed by the guest
    report_time: float | None = None  # when it arrived, on the engine's clock
    alive: bool = True
    resident_bytes: int | None = None  # host memory behind this guest, where measurable
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

    def report_age_s(self, now: float) -> float | None:
        """How old the report is at ``now`` (None without one; never negative)."""
        return None if self.report_time is None else max(0.0, now - self.report_time)


@dataclass(frozen=True, slots=True)
class HostSample:
    """What the manager knows about the host at one moment.

    ``budget_pages`` is what the guests together may hold: a fixed budget, or with the host's
    own memory known, what they hold plus what the host has available beyond its reserve
    (the smaller of the two when both are set). The host figures are None where the world does
    not read them (the simulator without a host model, a test)."""

    budget_pages: int  # memory all guests together may hold on the host
    resident_pages: int  # what they hold now (memfd st_blocks, QEMU RSS, simulated)
    enforced: bool = False  # a memory cgroup enforces the budget (else it is only watched)
    total_pages: int | None = None  # the host's memory (MemTotal, or its cgroup's limit)
    available_pages: int | None = None  # what the host has available now (MemAvailable)
    reserve_pages: int = 0  # what the host keeps available for itself (``host_reserve``)
    psi_some_avg10: float | None = None  # host memory pressure: % of 10 s some task stalled
    psi_full_avg10: float | None = None  # ... all tasks stalled

    @property
    def short_pages(self) -> int:
        """How far the host's available memory is under its reserve (0 when it is not)."""
        if self.available_pages is None:
            return 0
        return max(0, self.reserve_pages - self.available_pages)


__all__ = ["GuestSample", "GuestSettings", "HostSample"]
