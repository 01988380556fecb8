"""Observations for policies: figures read off a guest's ``PressureReport``.

The figure helpers treat a report as untrusted: a guest may claim more available memory than it
has, a balloon larger than its RAM, counters that go backwards. They clamp to what is possible,
and count each inconsistency in the caller's ``Counters`` bag (a ``PolicyReportCounter``) rather
than raise: a policy must keep deciding for the other guests.
"""

from __future__ import annotations

from memballoon.model.counters import CounterName, Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport


class PolicyReportCounter(CounterName):
    """The inconsistencies the figure helpers find in a report, one each (every policy)."""

    FREE_ABOVE_RAM = "policy_report_free_above_ram"  # MemFree claimed beyond the guest's RAM
    AVAILABLE_ABOVE_RAM = "policy_report_available_above_ram"  # MemAvailable beyond its RAM
    # MemAvailable beyond what the guest kept when it wrote the report
    AVAILABLE_ABOVE_SIZE = "policy_report_available_above_size"
    # cumulative counters that went back since the last report (a restarted or lying guest)
    SWAP_IN_BACKWARDS = "policy_report_swap_in_backwards"
    MAJOR_FAULTS_BACKWARDS = "policy_report_major_faults_backwards"
    OOM_KILLS_BACKWARDS = "policy_report_oom_kills_backwards"
    REFUSED_BACKWARDS = "policy_report_refused_backwards"


def fresh_report(g: GuestSample, max_age_s: float, now: float) -> PressureReport | None:
    """``g``'s report if the guest is alive and the report is no older than ``max_age_s`` at
    ``now`` (a report stamped in the future, a clock gone wrong, counts as fresh)."""
    r = g.report
    if r is None or not g.alive:
        return None
    t = g.report_time  # ``GuestSample.report_age_s`` inline: every guest every call
    if t is None or max(0.0, now - t) > max_age_s:
        return None
    return r


def free_pages(g: GuestSample, r: PressureReport, counters: Counters) -> int:
    """MemFree in pages, at most what the guest keeps."""
    free = max(0, r.free_bytes) // PAGE_SIZE  # (a negative figure: 0)
    if free > g.ram_pages:
        counters.inc(PolicyReportCounter.FREE_ABOVE_RAM)
        return max(0, g.size_pages)
    return free


def available_pages(g: GuestSample, r: PressureReport, counters: Counters) -> int:
    """MemAvailable in pages, at most what the guest keeps."""
    avail = max(0, r.available_bytes) // PAGE_SIZE
    size = g.ram_pages - g.balloon_pages  # ``size_pages``, without the property call
    if avail > size:
        if avail > g.ram_pages:
            counters.inc(PolicyReportCounter.AVAILABLE_ABOVE_RAM)
        return max(0, size)
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
    avail = max(0, r.available_bytes) // PAGE_SIZE
    if avail > size_then:
        counters.inc(PolicyReportCounter.AVAILABLE_ABOVE_SIZE)
        avail = size_then
    return max(0, size_then - avail)


def counter_delta(
    now: int, before: int | None, counters: Counters, backwards: PolicyReportCounter
) -> int:
    """Growth of a cumulative guest counter since the last report (0 when it went back, which
    counts ``backwards``: the guest restarted or lies)."""
    if before is None:
        return 0
    if now < before:
        counters.inc(backwards)
        return 0
    return now - before


__all__ = [
    "PolicyReportCounter",
    "available_pages",
    "counter_delta",
    "free_pages",
    "fresh_report",
    "working_set_pages",
]
