"""The pressure report a guest pushes, built from its memory model and its balloon driver.

One place for the figures every world reports the same way: the local guest process sends
this as its STATUS message, the simulator (``sim/backend.py``) builds it for pairs on the
virtual clock. Pure: the caller passes ``now`` and the stall share it measured.
"""

from __future__ import annotations

from memballoon.guest.driver import BalloonDriver
from memballoon.guest.memory import GuestMemory
from memballoon.guest.virtio_driver import VirtioBalloonDriver, VirtioDriverCounter
from memballoon.guest.vmw_driver import VmwBalloonDriver
from memballoon.model.units import PAGE_SIZE
from memballoon.protocol.pressure import PressureReport
from memballoon.protocol.vmw import VMW_BALLOON_2M_ORDER


def refused_pages(driver: BalloonDriver) -> int | None:
    """The driver's cumulative count of frames the host refused (None: it has no refusals)."""
    # read where the two drivers keep it: stats() builds every name, once per report (the
    # simulator makes thousands a second)
    if isinstance(driver, VmwBalloonDriver):
        seed = driver.seed_stats
        return max(0, seed.refused_alloc + (seed.refused_alloc_2m << VMW_BALLOON_2M_ORDER))
    if isinstance(driver, VirtioBalloonDriver):
        return max(0, driver.counters[VirtioDriverCounter.REFUSED_PAGES])
    st = driver.stats()
    if "errAlloc" in st:
        # vmw: the seed's refused allocations, and refused 2 MiB pages in frames
        return max(0, st["errAlloc"] + (st.get("err2mAlloc", 0) << VMW_BALLOON_2M_ORDER))
    if "refused_pages" in st:
        return max(0, st["refused_pages"])
    return None


def guest_report(
    name: str,
    now: float,
    mem: GuestMemory,
    driver: BalloonDriver,
    *,
    stall_pct: float,
    active_sampled: int = 0,
    active_touched: int = 0,
) -> PressureReport:
    # the figures of ``mem.meminfo()`` read straight from the model, and the report's fields
    # passed in their order: the simulator builds one per guest per report round
    ev = mem.events
    balloon = driver.balloon_pages
    return PressureReport(
        name,  # guest
        now,  # time_s
        mem.total_pages * PAGE_SIZE,  # total_bytes
        mem.free_pages * PAGE_SIZE,  # free_bytes
        mem.available_pages() * PAGE_SIZE,  # available_bytes
        len(mem.anon) * PAGE_SIZE,  # anon_bytes
        len(mem.cache) * PAGE_SIZE,  # cache_bytes
        balloon * PAGE_SIZE,  # balloon_bytes
        ev.swap_in,  # swap_in_pages
        ev.swap_out,  # swap_out_pages
        ev.major_faults,  # major_faults
        ev.oom_kills,  # oom_kills
        ev.stall_us,  # stall_us
        # stall_pct: min(100.0, max(0.0, stall_pct)) (NaN and -0.0 as 0.0), without the calls
        stall_pct if 0.0 < stall_pct < 100.0 else 100.0 if stall_pct >= 100.0 else 0.0,
        driver.target_pages,  # balloon_target_pages
        balloon,  # balloon_actual_pages
        refused_pages(driver),  # refused_pages
        active_sampled,
        active_touched,
    )


def report_unchanged(
    prev: PressureReport,
    now: float,
    *,
    stall_pct: float,
    active_sampled: int = 0,
    active_touched: int = 0,
) -> PressureReport:
    """``guest_report`` of a guest whose memory model and driver have not changed since
    ``prev`` was built from them: the same figures at ``now``, with this interval's stall
    share and active sample (the caller vouches nothing ran on the guest in between; the
    simulator's sleeping guests, about two in three of a steady fleet)."""
    return PressureReport(
        prev.guest,
        now,
        prev.total_bytes,
        prev.free_bytes,
        prev.available_bytes,
        prev.anon_bytes,
        prev.cache_bytes,
        prev.balloon_bytes,
        prev.swap_in_pages,
        prev.swap_out_pages,
        prev.major_faults,
        prev.oom_kills,
        prev.stall_us,
        stall_pct if 0.0 < stall_pct < 100.0 else 100.0 if stall_pct >= 100.0 else 0.0,
        prev.balloon_target_pages,
        prev.balloon_actual_pages,
        prev.refused_pages,
        active_sampled,
        active_touched,
    )
