"""Observations for policies: a pair's state as a ``GuestSample``, and figures read off a report.

``sample_from_pair`` is the adapter the closed-loop tests and the simulator use to turn a
driver/device pair (``memballoon.harness.pair``) into what the manager would have seen: a
``PressureReport`` built the way the local guest builds it (``local/guest_main.py``), with
``stall_pct`` taken over the whole interval since the previous sample (the policy may run once
every few periods; the last step alone would miss the stalls in between).

The figure helpers treat a report as untrusted: a guest may claim more available memory than it
has, a balloon larger than its RAM, counters that go backwards. They clamp to what is possible,
and count each inconsistency in the caller's ``Counters`` bag (``policy_report_<what>``) rather
than raise: a policy must keep deciding for the other guests.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from memballoon.guest.report import guest_report
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import GuestSample, GuestSettings
from memballoon.protocol.pressure import PressureReport

if TYPE_CHECKING:
    from memballoon.harness.pair import Pair

#: Pages ESX samples per period (Waldspurger 2002, section 5.3: 100 random pages).
ESX_SAMPLE_PAGES = 100


def sample_from_pair(
    pair: Pair,
    settings: GuestSettings,
    prev: GuestSample | None,
    *,
    name: str | None = None,
    rng: random.Random | None = None,
    active_samples: int = ESX_SAMPLE_PAGES,
) -> GuestSample:
    """What a manager would know about ``pair`` now.

    ``prev`` is the sample taken last time (or None): ``stall_pct`` covers the time since it.
    With ``rng``, ``active_samples`` random frames are sampled ESX-style
    (``GuestMemory.sample_active``); without it the ESX fields stay 0 (not sampled).
    """
    mem = pair.mem
    gname = name if name is not None else (prev.name if prev is not None else pair.protocol)
    stall_pct = pair.last_step.stall_pct if pair.last_step is not None else 0.0
    if prev is not None and prev.report is not None and pair.now > prev.report.time_s:
        d_us = max(0, mem.events.stall_us - prev.report.stall_us)
        stall_pct = 100.0 * d_us / ((pair.now - prev.report.time_s) * 1e6)
    report = guest_report(gname, pair.now, mem, pair.driver, stall_pct=stall_pct)
    sampled = touched = 0
    if rng is not None and active_samples > 0:
        sampled = active_samples
        touched = mem.sample_active(rng, active_samples)
    return GuestSample(
        name=gname,
        ram_pages=mem.total_pages,
        balloon_pages=pair.device.actual_pages,
        target_pages=pair.device.target_pages,
        settings=settings,
        report=report,
        report_age_s=0.0,
        alive=True,
        active_sampled=sampled,
        active_touched=touched,
    )


def fresh_report(g: GuestSample, max_age_s: float) -> PressureReport | None:
    """``g``'s report if the guest is alive and the report is younger than ``max_age_s``."""
    if not g.alive or g.report is None:
        return None
    if g.report_age_s is None or not 0.0 <= g.report_age_s <= max_age_s:
        return None
    return g.report


def _pages(size_bytes: int) -> int:
    return max(0, size_bytes) // PAGE_SIZE


def free_pages(g: GuestSample, r: PressureReport, counters: Counters) -> int:
    """MemFree in pages, at most what the guest keeps."""
    free = _pages(r.free_bytes)
    if free > g.ram_pages:
        counters.inc("policy_report_free_above_ram")
        return max(0, g.size_pages)
    return free


def available_pages(g: GuestSample, r: PressureReport, counters: Counters) -> int:
    """MemAvailable in pages, at most what the guest keeps."""
    avail = _pages(r.available_bytes)
    if avail > g.size_pages:
        if avail > g.ram_pages:
            counters.inc("policy_report_available_above_ram")
        return max(0, g.size_pages)
    return avail


def working_set_pages(g: GuestSample, r: PressureReport, counters: Counters) -> int:
    """What the guest cannot give up without reclaiming: its size minus MemAvailable.

    Both from the moment of the report (the balloon it saw, its MemAvailable then): the
    device's balloon may have moved since the guest wrote the report, and mixing the two
    moments makes the working set jump by whatever the balloon moved. The balloon's frames
    are not available, and with DEFLATE_ON_OOM (or VMware) they stay in MemTotal, so the
    guest's own ``total - available`` would count them: subtract them.
    """
    # RAM minus the balloon the report saw: not the report's total, which is MemTotal in a
    # real Linux guest and already lacks the balloon there when deflate-on-OOM is off
    size_then = g.ram_pages - min(g.ram_pages, r.balloon_actual_pages)
    avail = _pages(r.available_bytes)
    if avail > size_then:
        counters.inc("policy_report_available_above_size")
        avail = size_then
    return max(0, size_then - avail)


def counter_delta(now: int, before: int | None, counters: Counters, what: str) -> int:
    """Growth of a cumulative guest counter since the last report (0 when it went back)."""
    if before is None:
        return 0
    if now < before:
        counters.inc(f"policy_report_{what}_backwards")  # guest restarted or lies
        return 0
    return now - before


__all__ = [
    "ESX_SAMPLE_PAGES",
    "available_pages",
    "counter_delta",
    "free_pages",
    "fresh_report",
    "sample_from_pair",
    "working_set_pages",
]
