"""The seed's VMware balloon driver, rule by rule, joined to the device by the pair harness."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.driver import BalloonDriver, idle_each
from memballoon.guest.memory import GuestMemory
from memballoon.guest.vmw_driver import (
    VMW_BALLOON_MAX_REFUSED,
    VMW_BALLOON_NOSLEEP_ALLOC_MAX,
    VMW_BALLOON_RATE_ALLOC_INC,
    VMW_BALLOON_RATE_ALLOC_MAX,
    VMW_BALLOON_RATE_ALLOC_MIN,
    VMW_BALLOON_RATE_FREE_INC,
    VMW_BALLOON_RATE_FREE_MAX,
    VMW_BALLOON_RATE_FREE_MIN,
    VMW_BALLOON_SLOW_CYCLES,
    VMW_BALLOON_YIELD_THRESHOLD,
    PfnStack,
)
from memballoon.guest.workload import Demand
from memballoon.harness.pair import VmwPair, check_pair, vmw_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.model.units import GIB, MIB, PAGE_SIZE, PageState
from memballoon.protocol.vmw import (
    Capability,
    Command,
    Request,
    Status,
)

SMALL = 16384  # 64 MiB


def make_pair(pages: int = SMALL, *, batched: bool = False, huge: bool = False,
              supports_batched: bool = True, supports_2m: bool = True,
              load: bool = True) -> VmwPair:
    """The harness's pair, every command logged; ``batched`` uses 4 KiB batches, ``huge``
    2 MiB pages too."""
    return vmw_pair(pages, batched=batched or huge, huge_pages=huge,
                    supports_batched=supports_batched, supports_2m=supports_2m, record=True,
                    load=load)


def fill(mem: GuestMemory, *, anon: int = 0, file: int = 0, leave_free: int | None = None) -> None:
    """Run a workload step so the guest holds ``anon`` + ``file`` pages (or leaves some free)."""
    if leave_free is not None:
        anon = mem.free_pages - leave_free
    mem.step(1.0, 1.0, Demand(anon, 0, file, file))  # all of the file data read now


# ------------------------------------------------------------------ constants and shape
def test_seed_constants() -> None:
    assert VMW_BALLOON_NOSLEEP_ALLOC_MAX == 16384
    assert (VMW_BALLOON_RATE_ALLOC_MIN, VMW_BALLOON_RATE_ALLOC_MAX,
            VMW_BALLOON_RATE_ALLOC_INC) == (512, 2048, 16)
    assert (VMW_BALLOON_RATE_FREE_MIN, VMW_BALLOON_RATE_FREE_MAX,
            VMW_BALLOON_RATE_FREE_INC) == (512, 16384, 16)
    assert VMW_BALLOON_SLOW_CYCLES == 4
    assert VMW_BALLOON_YIELD_THRESHOLD == 1024
    assert VMW_BALLOON_MAX_REFUSED == 16


def test_initial_state_and_protocol() -> None:
    p = make_pair(load=False)
    drv: BalloonDriver = p.driver  # it is a BalloonDriver
    assert drv.period_s == 1.0
    assert (p.driver.rate_alloc, p.driver.rate_free) == (2048, 16384)
    assert (p.driver.size, p.driver.target, p.driver.slow_allocation_cycles) == (0, 0, 0)
    assert not p.driver.reset_required


def test_pfn_stack_grows_and_pops_newest_first() -> None:
    s = PfnStack(16)
    s.extend(np.arange(10, dtype=np.int64))
    for pfn in range(10, 100):
        s.push(pfn)
    assert len(s) == 100 and s.top() == 99
    assert s.pop(3).tolist() == [99, 98, 97]
    assert s.peek(2).tolist() == [96, 95] and len(s) == 97
    assert s.to_array().tolist() == list(range(97))


# ------------------------------------------------------------------ load and the cycle count
def test_load_sends_start_then_guest_id() -> None:
    p = make_pair()
    assert p.port.log == [(Command.START, 2, Status.SUCCESS), (Command.GUEST_ID, 1, Status.SUCCESS)]
    assert p.driver.loaded and p.device.guest_id == 1


def test_load_fails_when_start_fails_and_then_does_nothing() -> None:
    p = make_pair(load=False)
    p.device.busy_next(1)
    p.driver.load(0.0)
    assert not p.driver.loaded and p.port.commands() == [Command.START]
    assert p.driver.stats()["startFailed"] == 1
    p.work()
    assert p.port.commands() == [Command.START]
    q = make_pair(load=False)
    q.port.before = lambda req: q.device.busy_next(1) if req.command is Command.GUEST_ID else None
    q.driver.load(0.0)
    assert not q.driver.loaded and q.driver.stats()["guestTypeFailed"] == 1


def test_idle_1gib_guest_balloons_512mib_in_exactly_8_cycles() -> None:
    pages = GIB // PAGE_SIZE
    p = make_pair(pages)
    p.device.set_target(512 * MIB // PAGE_SIZE)
    sizes = []
    for _ in range(8):
        p.work()
        sizes.append(p.driver.balloon_pages)
    # a full cycle takes rate + 1 pages: the seed's loop counts from 0
    assert sizes == [16385 * k for k in range(1, 8)] + [131072]
    assert p.device.actual_pages == 131072
    assert p.port.commands().count(Command.LOCK) == 131072
    assert p.driver.stats()["timer"] == 8
    assert p.check() == []


def test_batched_idle_1gib_guest_balloons_512mib_in_one_cycle() -> None:
    p = make_pair(GIB // PAGE_SIZE, batched=True)
    assert p.port.log[0] == (Command.START, 6, Status.SUCCESS_WITH_CAPABILITIES)
    p.device.set_target(131072)
    p.work()
    assert p.driver.balloon_pages == p.device.actual_pages == 131072
    assert p.port.commands().count(Command.BATCHED_LOCK) == 131072 // 512
    assert Command.LOCK not in p.port.commands()
    assert p.check() == []
    p.device.set_target(1000)
    p.work()
    assert p.driver.balloon_pages == 1000
    assert p.port.commands().count(Command.BATCHED_UNLOCK) == -(-130072 // 512)
    assert p.check() == []


def test_batched_driver_falls_back_to_version_2() -> None:
    p = make_pair(batched=True, supports_batched=False)
    assert p.port.log[0] == (Command.START, 6, Status.SUCCESS)
    p.device.set_target(3000)
    p.work()
    assert Command.BATCHED_LOCK not in p.port.commands()
    assert p.port.commands().count(Command.LOCK) == 3000
    assert p.driver.batch_max_pages == 1
    assert p.check() == []


# ------------------------------------------------------------------ 2 MiB pages (v4.20+)
def test_2m_pages_first_then_4k_to_the_exact_target() -> None:
    p = make_pair(GIB // PAGE_SIZE, huge=True)
    offer = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
    assert p.port.log[0] == (Command.START, int(offer), Status.SUCCESS_WITH_CAPABILITIES)
    assert p.driver.supported_page_sizes == 2
    p.device.set_target(131072 + 100)
    p.work()
    # 256 pages of 2 MiB in one command, then the last 100 frames as 4 KiB pages
    assert p.port.commands().count(Command.BATCHED_2M_LOCK) == 1
    assert p.port.commands().count(Command.BATCHED_LOCK) == 1
    assert p.driver.size == p.device.actual_pages == 131172
    s = p.driver.stats()
    assert (s["prim2mAlloc"], s["2m-lock"], s["primNoSleepAlloc"]) == (256, 1, 100)
    assert p.check() == []
    # deflate: 4 KiB pages first, then 2 MiB pages rounded up (the guest gets at least what
    # the target gives back); the next cycle refills the difference in 4 KiB pages
    p.device.set_target(1000)
    p.work()
    assert p.driver.size == 131072 - 255 * 512 == 512 and len(p.driver.pages) == 0
    assert p.driver.stats()["prim2mFree"] == 255 and p.driver.stats()["primFree"] == 100
    assert p.check() == []
    p.work()
    assert p.driver.size == 1000 and len(p.driver.page_sizes[1].pages) == 1
    assert len(p.driver.pages) == 488
    assert p.check() == []
    p.device.set_target(0)
    p.work()
    assert p.driver.size == 0 and p.mem.balloon_pages == 0
    assert p.check() == []


def test_2m_inflate_never_passes_the_target() -> None:
    p = make_pair(huge=True)
    for target in (511, 513, 1500):
        p.device.set_target(target)
        p.work()
        assert p.driver.size == target == p.device.actual_pages
        assert p.check() == []
    assert len(p.driver.page_sizes[1].pages) == 1  # (1500 - 513) // 512: the rest in 4 KiB pages


def test_failed_2m_allocation_falls_back_to_4k_without_slowing_down() -> None:
    p = make_pair(huge=True)
    # a fragmented guest: no 2 MiB block is wholly free
    p.mem.alloc_huge = lambda n: np.empty(0, dtype=np.int64)  # type: ignore[method-assign]
    p.device.set_target(2000)
    p.work()
    s = p.driver.stats()
    assert s["prim2mAlloc"] == 1 and s["prim2mAllocFailed"] == 1
    assert p.driver.size == 2000 and len(p.driver.page_sizes[1].pages) == 0
    assert p.driver.slow_allocation_cycles == 0
    assert p.driver.rate_alloc == VMW_BALLOON_RATE_ALLOC_MAX
    assert p.check() == []


def test_host_without_2m_pages_gets_4k_batches() -> None:
    p = make_pair(huge=True, supports_2m=False)
    assert p.driver.supported_page_sizes == 1
    p.device.set_target(3000)
    p.work()
    assert Command.BATCHED_2M_LOCK not in p.port.commands()
    assert p.driver.size == 3000
    assert p.check() == []


def test_refused_2m_pages_held_up_to_16_then_4k_pages() -> None:
    p = make_pair(8 * SMALL, huge=True)  # 256 MiB: plenty of whole 2 MiB blocks
    heads = np.flatnonzero(p.mem._bfree == 512)[:20] * 512
    p.device.set_pinned(heads + 3)  # one pinned frame in each of the first 20 free blocks
    p.device.set_target(40 * 512)
    p.work()
    s = p.driver.stats()
    # the first batch takes 40 blocks: 20 refused, 16 held then freed, 4 freed at once;
    # the cycle goes on in 4 KiB pages (where the pinned frames are refused again)
    assert s["err2mAlloc"] == 20 and s["err2mFree"] == 20 and s["2m-lock"] == 1
    assert len(p.driver.page_sizes[1].pages) == 20 and s["batchLock"] >= 1 and s["errAlloc"] > 0
    assert p.driver.size == p.device.actual_pages > 20 * 512
    assert p.check() == []


def test_reset_pops_2m_pages_too() -> None:
    p = make_pair(huge=True)
    p.device.set_target(3000)
    p.work()
    assert len(p.driver.page_sizes[1].pages) == 5
    p.device.request_reset()
    p.work()
    assert p.driver.reset_required and p.driver.balloon_pages == 0
    assert p.check() == []
    p.work()  # pop, START, then inflate again
    assert p.driver.size == 3000 and p.driver.stats()["prim2mFree"] == 5
    assert p.check() == []


def test_vmmemctl_shows_2m_rows_only_with_2m_pages() -> None:
    p = make_pair(huge=True)
    p.device.set_target(1024)
    p.work()
    text = p.driver.vmmemctl_text()
    assert "2m-lock:                   1 (   0 failed)\n" in text
    assert "prim2mAlloc:               2 (   0 failed)\n" in text
    assert "2m-lock" not in make_pair(batched=True).driver.vmmemctl_text()


# ------------------------------------------------------------------ allocation pressure
def test_failed_nosleep_allocation_slows_down_and_switches_to_sleeping() -> None:
    p = make_pair()
    fill(p.mem, file=SMALL)  # the page cache takes every free page down to the low watermark
    room = p.mem.free_pages - p.mem.watermarks.min  # what non-sleeping allocations can take
    assert 0 < room < 100
    p.device.set_target(5000)
    p.work()
    s = p.driver.stats()
    assert p.driver.slow_allocation_cycles == VMW_BALLOON_SLOW_CYCLES
    # `room` non-sleeping pages, one failure (which uses up an index), then sleeping
    # allocations until i >= rate_alloc (2048)
    assert (s["primNoSleepAlloc"], s["primNoSleepAllocFailed"]) == (room + 1, 1)
    assert (s["primCanSleepAlloc"], s["primCanSleepAllocFailed"]) == (2048 - room, 0)
    assert p.driver.size == 2048
    assert p.driver.rate_alloc == 2048  # no error, i // rate_alloc == 1: +16, capped
    assert p.check() == []
    # the next cycle runs at rate_alloc from the start; non-sleeping allocations fail again
    # at once (sleeping ones only reclaim what they need), so it takes rate_alloc pages again
    p.work()
    s = p.driver.stats()
    assert s["primNoSleepAllocFailed"] == 2
    assert p.driver.slow_allocation_cycles == VMW_BALLOON_SLOW_CYCLES
    assert p.driver.size == 2 * 2048
    assert p.check() == []


def test_nosleep_failure_after_rate_alloc_pages_pauses() -> None:
    p = make_pair()
    p.driver.rate_alloc = 512
    fill(p.mem, leave_free=p.mem.watermarks.min + 600)  # 600 pages above the min watermark
    p.device.set_target(5000)
    p.work()
    s = p.driver.stats()
    assert p.driver.size == 600 and s["primCanSleepAlloc"] == 0  # i=600 >= 512: stop, no sleep
    assert p.driver.slow_allocation_cycles == VMW_BALLOON_SLOW_CYCLES
    assert p.driver.rate_alloc == 512  # the cycle ended on an error: no growth
    assert p.check() == []


def test_failed_sleeping_allocation_halves_rate_alloc_never_below_512() -> None:
    p = make_pair()
    fill(p.mem, leave_free=p.mem.watermarks.min + 10)  # anonymous memory, no swap: nothing
    p.device.set_target(5000)
    rates = []
    for _ in range(4):
        p.work()
        rates.append(p.driver.rate_alloc)
        assert p.check() == []
    assert rates == [1024, 512, 512, 512]
    s = p.driver.stats()
    assert p.driver.size == 10
    assert s["primCanSleepAllocFailed"] == 4 and s["primNoSleepAllocFailed"] == 4


def test_rate_alloc_grows_by_i_over_rate_alloc_times_16_up_to_2048() -> None:
    p = make_pair(2 * SMALL)
    p.driver.rate_alloc = 512
    p.device.set_target(5000)
    p.work()  # i == goal == 5000: 5000 // 512 == 9
    assert p.driver.rate_alloc == 512 + 9 * 16
    p.device.set_target(8000)
    p.work()  # i == 3000: 3000 // 656 == 4
    assert p.driver.rate_alloc == 656 + 4 * 16
    p.driver.rate_alloc = 2040
    p.device.set_target(12100)
    p.work()  # i == 4100 // 2040 == 2: capped
    assert p.driver.rate_alloc == VMW_BALLOON_RATE_ALLOC_MAX
    p.device.set_target(12200)
    p.driver.rate_alloc = 1000
    p.work()  # i == 100 < rate_alloc: unchanged
    assert p.driver.rate_alloc == 1000
    assert p.check() == []


def test_slow_cycles_cap_a_cycle_at_rate_alloc_plus_one() -> None:
    p = make_pair()
    p.driver.slow_allocation_cycles = 3
    p.driver.rate_alloc = 600
    p.device.set_target(5000)
    p.work()
    assert p.driver.slow_allocation_cycles == 2
    assert p.driver.size == 601
    assert p.driver.rate_alloc == 616


def test_yields_after_more_than_1024_allocations() -> None:
    p = make_pair()
    p.device.set_target(2049)
    p.work()  # 2049 loop iterations: one yield at the 1025th
    assert p.yields == 1
    p.device.set_target(2049 + 2050)
    p.work()
    assert p.yields == 3


# ------------------------------------------------------------------ deflate
def test_deflate_unlocks_first_newest_first_then_frees() -> None:
    p = make_pair()
    p.device.set_target(100)
    p.work()
    newest = p.driver.pages.peek(40).tolist()
    seen: list[int] = []

    def before(req: Request) -> None:
        if req.command is Command.UNLOCK:
            assert p.mem.state[req.data] == PageState.BALLOON  # still ours when UNLOCK goes
            seen.append(req.data)

    p.port.before = before
    p.device.set_target(60)
    p.work()
    assert seen == newest
    assert p.driver.size == 60 and p.driver.stats()["primFree"] == 40
    assert p.driver.rate_free == VMW_BALLOON_RATE_FREE_MAX
    assert p.check() == []


def test_unlock_failure_halves_rate_free_success_adds_16() -> None:
    p = make_pair()
    p.device.set_target(4000)
    p.work()
    busy = {"on": True}

    def before(req: Request) -> None:
        if req.command is Command.UNLOCK and busy["on"]:
            p.device.busy_next(1)

    p.port.before = before
    p.device.set_target(1000)
    rates = []
    for _ in range(6):
        p.work()
        rates.append(p.driver.rate_free)
        assert p.check() == []
    assert rates == [8192, 4096, 2048, 1024, 512, 512]
    assert p.driver.size == 4000 and p.driver.stats()["unlockFailed"] == 6
    busy["on"] = False
    p.work()  # goal = min(3000, 512)
    assert p.driver.size == 4000 - 512 and p.driver.rate_free == 512 + 16
    p.work()
    assert p.driver.size == 4000 - 512 - 528 and p.driver.rate_free == 544
    assert p.check() == []


# ------------------------------------------------------------------ host refusals and RESET
def test_reset_pops_without_unlock_then_start_then_guest_id() -> None:
    p = make_pair()
    p.device.set_target(300)
    p.work()
    p.device.request_reset()
    p.work()  # GET_TARGET answers RESET
    assert p.port.log[-1] == (Command.GET_TARGET, p.mem.managed_pages, Status.ERROR_RESET)
    assert p.driver.reset_required and p.driver.balloon_pages == 0 and p.driver.size == 300
    assert p.check() == []
    mark = len(p.port.log)
    p.work()
    cmds = p.port.commands()[mark:]
    assert cmds[:3] == [Command.START, Command.GUEST_ID, Command.GET_TARGET]
    assert Command.UNLOCK not in cmds
    assert cmds.count(Command.LOCK) == 300  # back to the target from an empty balloon
    assert not p.driver.reset_required
    assert p.driver.stats()["primFree"] == 300
    assert p.check() == []


def test_reset_during_inflate_ends_the_cycle() -> None:
    p = make_pair()
    locks = {"n": 0}

    def before(req: Request) -> None:
        if req.command is Command.LOCK:
            locks["n"] += 1
            if locks["n"] == 51:
                p.device.request_reset()

    p.port.before = before
    p.device.set_target(1000)
    p.work()
    assert p.port.log[-1] == (Command.LOCK, p.port.log[-1][1], Status.ERROR_RESET)
    assert p.driver.size == 50 and p.driver.reset_required
    s = p.driver.stats()
    assert (s["lockFailed"], s["errAlloc"], s["errFree"]) == (1, 1, 0)  # freed, not refused
    assert p.check() == []
    p.work()
    assert p.driver.size == 1000 and not p.driver.reset_required
    assert p.check() == []


def test_ppn_notneeded_ends_the_cycle() -> None:
    p = make_pair()
    locks = {"n": 0}

    def before(req: Request) -> None:
        if req.command is Command.LOCK:
            locks["n"] += 1
            if locks["n"] == 11:
                p.device.set_target(10)  # the host changed its mind mid-cycle

    p.port.before = before
    p.device.set_target(500)
    p.work()
    assert p.port.log[-1][2] is Status.ERROR_PPN_NOTNEEDED
    assert p.driver.size == 10 and p.driver.target == 500 and locks["n"] == 11
    assert p.check() == []


def test_refused_pages_never_exceed_16_and_are_freed_at_cycle_end() -> None:
    p = make_pair()
    first_free = int(np.flatnonzero(p.mem.state == PageState.FREE)[0])
    p.device.set_pinned(np.arange(first_free, first_free + 100))
    peak = {"n": 0}

    def before(req: Request) -> None:
        peak["n"] = max(peak["n"], p.driver.n_refused_pages, len(p.driver.refused_pages))

    p.port.before = before
    p.device.set_target(500)
    p.work()
    s = p.driver.stats()
    assert peak["n"] == VMW_BALLOON_MAX_REFUSED - 1  # the 16th ends the cycle
    assert p.driver.size == 0
    assert (s["errAlloc"], s["errFree"]) == (16, 16)
    assert p.check() == []


def test_a_few_refused_pages_then_target_reached() -> None:
    p = make_pair()
    first_free = int(np.flatnonzero(p.mem.state == PageState.FREE)[0])
    p.device.set_pinned(np.arange(first_free, first_free + 5))
    p.device.set_target(500)
    p.work()
    s = p.driver.stats()
    assert p.driver.size == 500 and (s["errAlloc"], s["errFree"]) == (5, 5)
    assert p.port.commands().count(Command.LOCK) == 505
    assert p.check() == []


def test_batched_refusals_keep_at_most_16() -> None:
    p = make_pair(batched=True)
    first_free = int(np.flatnonzero(p.mem.state == PageState.FREE)[0])
    p.device.set_pinned(np.arange(first_free, first_free + 40))
    p.device.set_target(2000)
    p.work()  # first batch: 40 refused: 16 held, 24 freed at once, cycle ends
    s = p.driver.stats()
    assert p.driver.size == 512 - 40 and s["errAlloc"] == 40 and s["errFree"] == 40
    assert p.check() == []


def test_batched_reset_and_busy() -> None:
    p = make_pair(batched=True)
    p.device.set_target(3000)
    p.work()
    p.device.request_reset()
    p.work()
    assert p.driver.reset_required
    assert p.check() == []
    p.work()
    assert p.driver.size == 3000 and p.port.log[-1][0] is Command.BATCHED_LOCK
    assert p.check() == []
    p.device.set_target(100)
    p.port.before = lambda req: (
        p.device.busy_next(1) if req.command is Command.BATCHED_UNLOCK else None
    )
    p.work()
    assert p.driver.size == 3000 and p.driver.stats()["batchUnlockFailed"] == 1
    assert p.check() == []


# ------------------------------------------------------------------ GET_TARGET, unload, bad replies
def test_get_target_sends_totalram_the_managed_pages_not_every_frame() -> None:
    # seed 004 vmballoon_send_get_target: limit = si_meminfo().totalram (MemTotal: the frames
    # less what the kernel reserved at boot), also once the balloon holds pages
    p = make_pair()
    p.device.set_target(700)
    p.work()
    p.work()
    limits = [data for cmd, data, _ in p.port.log if cmd is Command.GET_TARGET]
    assert len(limits) >= 2 and p.driver.size == 700
    assert set(limits) == {p.mem.total_pages - p.mem.reserved_pages}
    assert p.mem.reserved_pages > 0 and p.device.guest_limit == limits[-1]


def test_get_target_fails_when_total_ram_does_not_fit_32_bits() -> None:
    p = make_pair()
    # a 16 TiB guest, as far as the driver's si_meminfo sees
    p.mem.total_pages = (1 << 32) + p.mem.reserved_pages
    p.device.set_target(100)
    mark = len(p.port.log)
    p.work()
    assert p.port.log[mark:] == []  # no GET_TARGET sent
    assert p.driver.size == 0 and p.driver.stats()["target"] == 0
    assert p.driver.counters["limit_over_32_bits"] == 1


def test_unload_sends_start_then_pops_without_unlock() -> None:
    p = make_pair()
    p.device.set_target(700)
    p.work()
    mark = len(p.port.log)
    p.driver.unload(p.now)
    assert p.port.commands()[mark:] == [Command.START]
    assert p.driver.size == 0 and p.device.actual_pages == 0 and p.mem.balloon_pages == 0
    assert p.mem.check_invariants() == []
    p.driver.rate_free = 512
    q = make_pair()
    q.driver.rate_free = 512
    q.device.set_target(1100)
    q.work()
    yields = q.yields
    q.driver.unload(q.now)
    assert q.yields - yields == 2  # the pop yields after every rate_free pages


def test_undecodable_replies_are_counted_and_read_as_failure() -> None:
    p = vmw_pair(SMALL)  # the harness's pair: its host answers garbage to the commands we pick

    def garbage(when: Command, junk: bytes) -> Callable[[Request, bytes], bytes]:
        return lambda req, reply: junk if req.command is when else reply

    p.port.reply = garbage(Command.GET_TARGET, b"\x07")
    p.device.set_target(50)
    p.work()
    drv = p.driver
    assert drv.size == 0 and drv.stats()["targetFailed"] == 1
    assert drv.counters["reply_short_frame"] == 1
    p.port.reply = garbage(Command.LOCK, bytes(17))  # a SUCCESS header and a stray byte
    p.work()  # every LOCK reply is junk: 16 refused pages end the cycle
    assert drv.size == 0 and drv.stats()["errFree"] == 16
    assert drv.counters["reply_long_frame"] == 16
    assert p.mem.check_invariants() == [] and p.mem.balloon_pages == 0
    # the device did lock those pages; the driver never learnt it. A RESET heals both sides.
    p.device.request_reset()
    p.port.reply = None
    p.work(2)
    assert drv.size == p.device.actual_pages == 50
    assert p.check() == []


# ------------------------------------------------------------------ statistics
def test_vmmemctl_text_in_the_seeds_format() -> None:
    p = make_pair()
    p.device.set_target(20)
    p.work()
    assert p.driver.vmmemctl_text() == (
        "target:                   20 pages\n"
        "current:                  20 pages\n"
        "rateNoSleepAlloc:      16384 pages/sec\n"
        "rateSleepAlloc:         2048 pages/sec\n"
        "rateFree:              16384 pages/sec\n"
        "\n"
        "timer:                     1\n"
        "start:                     1 (   0 failed)\n"
        "guestType:                 1 (   0 failed)\n"
        "lock:                     20 (   0 failed)\n"
        "unlock:                    0 (   0 failed)\n"
        "target:                    1 (   0 failed)\n"
        "primNoSleepAlloc:         20 (   0 failed)\n"
        "primCanSleepAlloc:         0 (   0 failed)\n"
        "primFree:                  0\n"
        "errAlloc:                  0\n"
        "errFree:                   0\n"
    )
    assert p.driver.stats()["lock"] == 20 and p.driver.stats()["current"] == 20


# ------------------------------------------------------------------ property
_event = st.one_of(
    st.tuples(st.just("target"), st.integers(0, 6000)),
    st.tuples(st.just("pin"), st.integers(0, 40)),
    st.tuples(st.just("busy"), st.integers(1, 3)),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("work"), st.just(0)),
    st.tuples(st.just("anon"), st.integers(0, 12000)),
)


_MODES = {"v2": {}, "batched": {"batched": True}, "2m": {"huge": True}}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(_MODES)), st.lists(_event, min_size=1, max_size=25))
def test_invariants_hold_after_every_work(mode: str, events: list[tuple[str, int]]) -> None:
    p = make_pair(**_MODES[mode])
    p.device.set_target(1000)
    p.work()
    assert p.check() == []
    for kind, arg in events:
        if kind == "target":
            p.device.set_target(arg)
        elif kind == "pin":
            free = np.flatnonzero(p.mem.state == PageState.FREE)
            p.device.set_pinned(free[:arg])
        elif kind == "busy":
            p.device.busy_next(arg)
        elif kind == "reset":
            p.device.request_reset()
        elif kind == "anon":
            p.mem.step(p.now, 1.0, Demand(arg, 0, 0, 0))
            assert p.mem.check_invariants() == []
        p.work()
        assert p.check() == []
    p.device.busy_next(0)  # a busy host would refuse unload's START and keep its view
    p.driver.unload(p.now)
    assert p.mem.balloon_pages == 0 and p.device.actual_pages == 0
    assert p.mem.check_invariants() == []


@pytest.mark.parametrize("mode", list(_MODES))
def test_long_random_run(mode: str) -> None:
    import random

    rng = random.Random(7)
    p = make_pair(**_MODES[mode])
    for _ in range(60):
        r = rng.random()
        if r < 0.4:
            p.device.set_target(rng.randrange(0, 9000))
        elif r < 0.5:
            p.device.request_reset()
        elif r < 0.6:
            p.device.busy_next(rng.randrange(1, 4))
        p.work()
        assert p.check() == []


# ------------------------------------------------------------------ the bulk path
def _bulk_state(pair: VmwPair) -> object:
    """Everything the pair holds but the link itself (a tapped one keeps its log)."""
    drv = {k: v for k, v in vars(pair.driver).items() if k not in ("port", "cond_resched")}
    return state_of((pair.mem, pair.ram, pair.device, drv, pair.yields, pair.cycles, pair.now))


def _both_run(one_by_one: VmwPair, bulk: VmwPair, periods: int, target: int, demand: Demand,
              trouble: str, pinned: npt.NDArray[np.int64], *, busy: int) -> None:
    """One step of a plan on a tapped pair (a command per page) and a bulk one, with the same
    trouble; then both hold exactly the same state."""
    for pair in (one_by_one, bulk):
        pair.set_target(target)
        match trouble:
            case "pinned":
                pair.device.set_pinned(pinned)
            case "busy":
                pair.device.busy_next(busy)
            case "reset":
                pair.device.request_reset()
            case "slow":
                pair.driver.slow_allocation_cycles = 3
        for _ in range(periods):
            pair.now += 1.0
            pair.mem.step(pair.now, 1.0, demand)
            pair.driver.work(pair.now)
            pair.cycles += 1
    diff = state_diff(_bulk_state(one_by_one), _bulk_state(bulk))
    assert diff == [], diff


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**16),
    st.lists(st.tuples(st.integers(1, 2), st.floats(0.0, 0.95), st.floats(0.0, 0.9)),
             min_size=1, max_size=4),
    st.sampled_from(["none", "pinned", "busy", "reset", "slow"]),
)
def test_runs_of_single_pages_end_where_page_by_page_ends(
        seed: int, plan: list[tuple[int, float, float]], trouble: str) -> None:
    # the seed's one LOCK/UNLOCK per page, taken in bulk by an in-process host, ends in exactly
    # the guest, driver, device and host state of one command per page (a tap forces those)
    pages = SMALL
    one_by_one, bulk = (vmw_pair(pages, record=tapped) for tapped in (True, False))
    rng = np.random.default_rng(seed)
    pinned = np.sort(rng.choice(pages, 20, replace=False))
    for periods, target, used in plan:
        demand = Demand(int(used * pages * 0.5), int(used * pages * 0.25), int(used * pages * 0.3),
                        int(used * pages * 0.1), 0.02)
        _both_run(one_by_one, bulk, periods, int(target * pages), demand,
                  trouble, pinned, busy=2)
    assert check_pair(bulk) == []


def test_the_bulk_path_sends_runs_and_a_tap_sees_every_command() -> None:
    plain = vmw_pair(SMALL * 4)
    plain.set_target(SMALL * 2)
    plain.tick()
    assert plain.driver.balloon_pages == VMW_BALLOON_NOSLEEP_ALLOC_MAX + 1
    assert plain.device.counters["cmd_lock"] == VMW_BALLOON_NOSLEEP_ALLOC_MAX + 1
    assert plain.yields == (VMW_BALLOON_NOSLEEP_ALLOC_MAX + 1) // (VMW_BALLOON_YIELD_THRESHOLD + 1)
    tapped = vmw_pair(SMALL * 4, record=True)
    tapped.set_target(SMALL * 2)
    tapped.tick()
    assert tapped.port.commands().count(Command.LOCK) == VMW_BALLOON_NOSLEEP_ALLOC_MAX + 1
    assert tapped.driver.balloon_pfns().tolist() == plain.driver.balloon_pfns().tolist()


def _pressed(tapped: bool, swap: int) -> VmwPair:
    """A guest whose page cache filled it to the low watermark: non-sleeping allocations
    fail soon, sleeping ones reclaim (a guest of the fleet under pressure)."""
    p = vmw_pair(SMALL, record=tapped, swap_pages=swap)
    p.mem.step(1.0, 1.0, Demand(SMALL // 8, SMALL // 16, SMALL, SMALL // 2, 0.0))
    return p


@settings(max_examples=20, deadline=None)
@given(
    st.integers(0, 2**16),
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 0.9), st.floats(0.0, 0.5)),
             min_size=1, max_size=5),
    st.sampled_from(["none", "pinned", "busy", "reset", "slow"]),
    st.sampled_from([0, 3000]),
)
def test_sleeping_runs_end_where_page_by_page_ends(
        seed: int, plan: list[tuple[int, float, float]], trouble: str, swap: int) -> None:
    # sleeping allocations (after a failed non-sleeping one) taken in runs between reclaims:
    # the same guest (reclaim, stall, events), driver (stats, rates, lists), device and host
    # state as one alloc_sleep(1) and one LOCK per page
    one_by_one, bulk = (_pressed(tapped, swap) for tapped in (True, False))
    rng = np.random.default_rng(seed)
    free = np.flatnonzero(bulk.mem.state == PageState.FREE)
    pinned = np.sort(rng.choice(free, min(40, free.size), replace=False))
    for periods, target, anon in plan:
        demand = Demand(int(anon * SMALL), int(anon * SMALL) // 2, SMALL, SMALL // 2, 0.01)
        _both_run(one_by_one, bulk, periods, int(target * SMALL), demand,
                  trouble, pinned, busy=1)
    assert check_pair(bulk) == []


def test_sleeping_runs_reclaim_as_page_by_page_and_a_tap_sees_every_lock() -> None:
    one_by_one, bulk = _pressed(True, 0), _pressed(False, 0)
    for pair in (one_by_one, bulk):
        pair.set_target(SMALL // 2)
        pair.driver.work(pair.now)
    st_ = bulk.driver.seed_stats
    assert st_.alloc_fail == 1 and st_.sleep_alloc > 200  # the cycle went on sleeping
    assert st_.alloc - st_.alloc_fail + st_.sleep_alloc == st_.lock
    # rate_alloc + 1 iterations, the failed allocation one of them
    assert st_.lock == VMW_BALLOON_RATE_ALLOC_MAX
    assert bulk.mem.events.direct_reclaim > 200 and bulk.mem.events.stall_us > 0
    assert one_by_one.port.commands().count(Command.LOCK) == st_.lock
    assert bulk.device.counters["cmd_lock"] == st_.lock
    assert state_diff(_bulk_state(one_by_one), _bulk_state(bulk)) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5), st.sampled_from([1.0, 0.2, 0.3]), st.floats(0.0, 40.0))
def test_idle_run_is_the_idle_work_of_each_period(slow: int, period: float, span: float) -> None:
    # the periods a quiet guest slept through, in one call: the same clock (float additions),
    # timer and GET_TARGET counts and slow cycles as one idle_work a period
    one, bulk = make_pair(), make_pair()
    for p in (one, bulk):
        p.driver.slow_allocation_cycles = slow
    limit = 3.0 + span
    now, n = idle_each(one.driver.idle_work, 3.0, period, limit)
    got = bulk.driver.idle_run(3.0, period, limit)
    assert got == (now, n) and n == round((now - 3.0) / period)
    assert state_diff(state_of(one.driver), state_of(bulk.driver)) == []
