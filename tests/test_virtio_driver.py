"""The virtio-balloon driver joined to the device by the pair harness (DirectTransport), rule by
rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memballoon.guest.driver import idle_each
from memballoon.guest.memory import BLOCK_PAGES
from memballoon.guest.virtio_driver import (
    DEFAULT_FEATURES,
    DRIVER_AREA_BYTES,
    FILL_BATCH,
    HUGE_ARRAY_PFNS,
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY_S,
    PFN_SLOTS,
    VIRTIO_BALLOON_RETRY_S,
    VIRTIO_BALLOON_X_MAX_REFUSED,
    VIRTIO_BALLOON_X_MAX_REFUSED_HELD,
    X_ARRAY_PFNS_MAX,
    VirtioBalloonDriver,
    driver_area_bytes,
)
from memballoon.guest.workload import Demand
from memballoon.harness.pair import VirtioPair, check_pair, virtio_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.host.virtio_device import SUPPORTED_FEATURES
from memballoon.model.errors import UsageError
from memballoon.model.units import MIB, PAGE_SIZE, PageState
from memballoon.protocol import virtio_balloon as vb
from memballoon.protocol.virtio_balloon import features_of

SMALL = 64 * MIB // PAGE_SIZE
MTH = features_of(vb.VIRTIO_BALLOON_F_MUST_TELL_HOST)
STATS = features_of(vb.VIRTIO_BALLOON_F_STATS_VQ)
DOO = features_of(vb.VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
REP = features_of(vb.VIRTIO_BALLOON_F_REPORTING)
REFUSE = features_of(vb.VIRTIO_BALLOON_X_F_HOST_REFUSE)
RESET = features_of(vb.VIRTIO_BALLOON_X_F_HOST_RESET)


def make_pair(features: int = SUPPORTED_FEATURES, pages: int = SMALL, *, deferred: bool = False,
              swap_pages: int = 0) -> VirtioPair:
    """The harness's pair; the device offers ``features``; ``deferred`` holds kicks until
    ``transport.run_device()``."""
    return virtio_pair(pages, features=features, deferred=deferred, swap_pages=swap_pages)


def test_linux_constants() -> None:
    assert VIRTIO_BALLOON_RETRY_S == 0.2  # msleep(200) after "Out of puff!"
    assert PAGE_REPORTING_DELAY_S == 2.0 and PAGE_REPORTING_CAPACITY == 32
    assert VirtioBalloonDriver.period_s == 0.2


def test_negotiates_the_intersection() -> None:
    r = make_pair(MTH | STATS)
    assert r.driver.features == MTH | STATS | features_of(vb.VIRTIO_F_VERSION_1)
    assert r.device.features == r.driver.features
    with pytest.raises(UsageError):
        r.driver.load(0.0)


def test_driver_area_must_sit_in_reserved_frames() -> None:
    r = virtio_pair(SMALL, features=0, load=False)
    with pytest.raises(UsageError):
        VirtioBalloonDriver(r.mem, r.transport, ring_gpa=r.mem.reserved_pages * PAGE_SIZE)
    with pytest.raises(UsageError):  # the view does not map it
        VirtioBalloonDriver(r.mem, r.transport, ring_gpa=2 * MIB)


def test_inflate_in_buffers_of_at_most_256_pfns() -> None:
    r = make_pair()
    r.device.set_target(1000)
    r.work()
    assert r.driver.balloon_pages == 1000
    assert r.device.counters["inflate_buffers"] == 4  # 256 + 256 + 256 + 232
    assert r.check() == []
    r.device.set_target(100)
    r.work()
    assert r.driver.balloon_pages == 100
    assert r.device.counters["deflate_buffers"] == 4  # 900 = 256 * 3 + 132
    assert r.check() == []


def test_several_arrays_go_with_one_doorbell() -> None:
    r = make_pair()
    r.device.set_target(3000)
    before = r.transport.notifies
    r.work()
    assert r.device.counters["inflate_buffers"] == 12  # 11 arrays of 256 and one of 184
    assert r.transport.notifies - before == -(-12 // FILL_BATCH)  # doorbells: two
    assert r.check() == []


def test_longer_arrays_when_asked_and_a_driver_area_to_hold_them() -> None:
    assert FILL_BATCH == 8 and HUGE_ARRAY_PFNS == 8192 and X_ARRAY_PFNS_MAX == 16384
    # rings, then PFN_SLOTS arrays and status bytes per inflate and deflate queue
    assert DRIVER_AREA_BYTES == driver_area_bytes() == 64 * 1024 + 2 * PFN_SLOTS * 5 * 256
    assert driver_area_bytes(HUGE_ARRAY_PFNS) > 2 * PFN_SLOTS * 5 * HUGE_ARRAY_PFNS
    r = virtio_pair(SMALL, array_pfns=HUGE_ARRAY_PFNS)
    r.device.set_target(10000)
    r.work()
    assert r.device.counters["inflate_buffers"] == 2 and r.check() == []
    r.device.set_target(0)
    r.work()
    assert r.device.counters["deflate_buffers"] == 2 and r.check() == []
    for bad in (0, X_ARRAY_PFNS_MAX + 1):
        with pytest.raises(UsageError):
            VirtioBalloonDriver(r.mem, r.transport, array_pfns=bad)


def test_a_device_that_holds_buffers_is_not_waited_on_buffer_by_buffer() -> None:
    r = make_pair(deferred=True)
    r.transport.wait = lambda queue: False  # type: ignore[method-assign]  # waits give up
    r.device.set_target(5000)
    r.work()
    sent = r.driver.counters["inflate_buffers"]
    assert sent == FILL_BATCH  # one batch, then the queue counts as stalled
    r.work()
    assert r.driver.counters["inflate_buffers"] == sent
    assert r.driver.counters["queue_stalled"] >= 1
    r.transport.run_device()  # the device uses them: the driver goes on
    r.work()
    assert r.driver.counters["inflate_buffers"] > sent


def test_must_tell_host_before_reuse() -> None:
    r = make_pair(deferred=True)
    r.device.set_target(300)
    r.work()  # sent, not used yet: frames transient, not in the balloon
    assert r.driver.balloon_pages == 0 and r.driver.transient_pfns().size == 300
    r.transport.run_device()
    r.work()
    assert r.driver.balloon_pages == 300 and r.driver.transient_pfns().size == 0
    victims = r.driver.balloon_pfns()
    r.device.set_target(0)
    r.work()
    # told, not acknowledged: the guest may not reuse them yet
    assert bool((r.mem.state[victims] == PageState.BALLOON).all())
    assert r.driver.transient_pfns().size == 300
    r.transport.run_device()
    assert bool((r.mem.state[victims] == PageState.BALLOON).all())  # until the driver sees it
    r.work()
    assert bool((r.mem.state[victims] == PageState.FREE).all())
    assert r.check() == []


def test_without_must_tell_host_deflate_is_advisory() -> None:
    r = make_pair(SUPPORTED_FEATURES & ~MTH, deferred=True)
    r.device.set_target(300)
    r.work()
    r.transport.run_device()
    r.work()
    victims = r.driver.balloon_pfns()
    r.device.set_target(0)
    r.work()
    assert bool((r.mem.state[victims] == PageState.FREE).all())  # reused before the device ran
    r.transport.run_device()
    r.work()
    assert r.check() == []


def test_memtotal_lowered_only_without_deflate_on_oom() -> None:
    for offered, drop in ((SUPPORTED_FEATURES, 0), (SUPPORTED_FEATURES & ~DOO, 2000)):
        r = make_pair(offered)
        total = r.mem.managed_pages
        r.device.set_target(2000)
        r.work()
        assert r.mem.managed_pages == total - drop
        stats_memtot = r.driver.stat_values()[vb.StatTag.MEMTOT]
        assert stats_memtot == (total - drop) * PAGE_SIZE
        r.device.set_target(0)
        r.work()
        assert r.mem.managed_pages == total


def _squeeze(r: VirtioPair) -> tuple[int, int]:
    """Balloon most of the guest, then ask for more anonymous memory than is left."""
    r.device.set_target(r.mem.free_pages - 2 * r.mem.watermarks.high)
    r.work()
    assert r.check() == []
    ballooned = r.driver.balloon_pages
    want = r.mem.free_pages + 600
    rep = r.mem.step(r.now + 1, 1.0, Demand(want, want, 0, 0))
    return ballooned, int(rep.oom_deflated_pages) if not rep.oom_killed else -1


def test_deflate_on_oom_instead_of_a_kill() -> None:
    r = make_pair()
    ballooned, deflated = _squeeze(r)
    assert deflated > 0 and deflated % vb.VIRTIO_BALLOON_OOM_NR_PAGES == 0
    assert r.mem.events.oom_kills == 0
    assert r.driver.balloon_pages == ballooned - deflated
    assert r.device.actual_pages == r.driver.balloon_pages
    assert r.check() == []


def test_after_deflate_on_oom_the_balloon_stays_deflated_until_the_host_asks() -> None:
    # Linux moves the balloon only when the config changes: the guest does not go back to
    # the old target by itself (seen with QEMU: ../shared/notes/qemu-guests.md)
    r = make_pair()
    ballooned, deflated = _squeeze(r)
    assert deflated > 0
    after = r.driver.balloon_pages
    for _ in range(3):
        r.work()
    assert r.driver.balloon_pages == after < ballooned
    r.device.set_target(r.device.target_pages)  # the host asks again (a config change)
    r.work()
    assert r.driver.balloon_pages > after
    assert r.check() == []


def test_without_deflate_on_oom_the_guest_oom_kills() -> None:
    r = make_pair(SUPPORTED_FEATURES & ~DOO)
    ballooned, deflated = _squeeze(r)
    assert deflated == -1 and r.mem.events.oom_kills == 1
    assert r.driver.balloon_pages == ballooned
    assert r.check() == []


def test_stats_tags_filled_when_the_device_asks() -> None:
    r = make_pair()
    r.mem.step(1.0, 1.0, Demand(2000, 1000, 500, 100))
    assert r.device.stats_seq == 1  # primed at load
    assert r.device.request_stats()
    r.work()
    assert r.device.stats_seq == 2
    mi = r.mem.meminfo()
    assert set(r.device.stats) == set(vb.VIRTIO_BALLOON_S_NAMES)
    assert r.device.stats["free-memory"] == mi.free_pages * PAGE_SIZE
    assert r.device.stats["total-memory"] == mi.managed_pages * PAGE_SIZE
    assert r.device.stats["disk-caches"] == mi.cache_pages * PAGE_SIZE
    assert r.device.stats["minor-faults"] == r.mem.events.minor_faults
    assert r.device.stats["oom-kills"] == 0
    r.work()
    assert r.device.stats_seq == 2  # not asked again: nothing new


def test_free_page_reporting_releases_2mib_blocks() -> None:
    pages = 256 * MIB // PAGE_SIZE
    r = make_pair(pages=pages)
    r.mem.step(1.0, 1.0, Demand(40000, 40000, 0, 0))  # touch ~156 MiB
    r.mem.step(2.0, 1.0, Demand(1000, 1000, 0, 0))  # and free it again
    resident = r.ram.resident_bytes()
    r.now = 2.0
    passes = 0
    while r.now < 30:
        r.work()
        passes += 1
    reported = r.device.reported_pages_total
    assert reported > 0 and reported % BLOCK_PAGES == 0
    assert r.ram.resident_bytes() < resident // 4
    blocks = np.flatnonzero(r.mem.reported)
    pfns = (blocks[:, None] * BLOCK_PAGES + np.arange(BLOCK_PAGES)).ravel()
    assert r.ram.resident_pages_of(pfns) == 0  # the host holds nothing behind them
    assert r.driver.counters["reported_blocks"] * BLOCK_PAGES == reported
    assert int(r.mem.reported.sum()) * BLOCK_PAGES == reported
    assert (r.mem.state == PageState.ISOLATED).sum() == 0
    # one pass per PAGE_REPORTING_DELAY, at most 1/16 of free memory and 32 blocks each
    assert r.device.counters["report_buffers"] <= 30 / PAGE_REPORTING_DELAY_S
    assert passes > r.device.counters["report_buffers"]
    assert r.check() == []


def test_refused_pages_are_replaced_then_freed() -> None:
    r = make_pair()
    # pin the frames the allocator will hand out first
    free = np.flatnonzero(r.mem.state == PageState.FREE)[:100]
    r.device.pin(free)
    r.device.set_target(500)
    r.work()
    assert r.driver.balloon_pages == 500
    assert not np.isin(r.driver.balloon_pfns(), free).any()
    assert r.driver.counters["refused_pages"] == 100
    assert r.driver.counters["refused_freed"] == 100
    assert r.driver.transient_pfns().size == 0
    assert bool((r.mem.state[free] == PageState.FREE).all())
    assert r.check() == []


def test_refusing_everything_ends_the_cycle() -> None:
    r = make_pair()
    r.device.pin(np.arange(SMALL))
    r.device.set_target(5000)
    r.work()
    assert r.driver.balloon_pages == 0 and r.driver.counters["refused_limit"] == 1
    # kept aside for the next cycle (so it gets other frames), within the bound
    assert 0 < r.driver.refused_pages <= VIRTIO_BALLOON_X_MAX_REFUSED_HELD
    assert r.check() == []
    for _ in range(20):  # the host never takes one: the guest never holds more than the bound
        r.work()
        assert r.driver.refused_pages <= VIRTIO_BALLOON_X_MAX_REFUSED_HELD
        assert r.check() == []
    r.device.set_target(0)  # the balloon is not growing: every refused frame goes back
    r.work()
    assert r.driver.refused_pages == 0 and r.driver.transient_pfns().size == 0
    assert r.check() == []


def test_more_refusals_than_one_cycle_takes_still_reach_the_target() -> None:
    # the host refuses the first 1.5 cycles' worth of frames the allocator hands out: held
    # aside across cycles, they make it hand out others; freed once the target is reached
    r = make_pair()
    free = np.flatnonzero(r.mem.state == PageState.FREE)
    r.device.pin(free[: 3 * VIRTIO_BALLOON_X_MAX_REFUSED // 2])
    r.device.set_target(5000)
    for _ in range(5):
        r.work()
    assert r.driver.balloon_pages == 5000 and r.driver.counters["refused_limit"] >= 1
    assert r.driver.refused_pages == 0 and r.driver.transient_pfns().size == 0
    assert r.check() == []


def test_after_the_refused_limit_the_driver_tries_again_next_period() -> None:
    r = make_pair()
    r.device.pin(np.arange(SMALL))
    r.device.set_target(5000)
    r.work()
    assert r.driver.balloon_pages == 0
    r.device.unpin(np.arange(SMALL))  # the host changes its mind, without a config change
    r.work()
    assert r.driver.balloon_pages == 5000
    assert r.check() == []


def test_host_reset_drops_every_page_without_telling() -> None:
    r = make_pair()
    r.device.set_target(1000)
    r.work()
    old = r.driver.balloon_pfns()
    deflates = r.device.counters["deflate_buffers"]
    r.device.request_reset()
    r.device.set_target(0)
    r.work()
    assert r.driver.balloon_pages == 0
    assert r.device.counters["deflate_buffers"] == deflates  # nothing sent on the deflateq
    assert bool((r.mem.state[old] == PageState.FREE).all())
    assert r.driver.counters["resets"] == 1 and not r.device.reset_pending
    assert r.check() == []
    r.device.set_target(700)
    r.work()
    assert r.check() == []


def test_reset_with_buffers_in_flight() -> None:
    r = make_pair(deferred=True)
    r.device.set_target(600)
    r.work()
    r.transport.run_device()
    r.work()
    r.device.set_target(100)
    r.work()  # deflates in flight (MUST_TELL_HOST)
    r.device.request_reset()  # drains them first
    r.device.set_target(0)
    r.work()
    r.transport.run_device()
    r.work()
    assert r.driver.balloon_pages == 0 and r.driver.transient_pfns().size == 0
    assert r.check() == []


def test_malformed_config_is_counted_and_survived() -> None:
    r = make_pair()
    r.device.set_target(300)
    real = r.device.read_config
    r.device.read_config = lambda: b"\x00" * 7  # type: ignore[method-assign]
    r.work()
    assert r.driver.counters["config_malformed"] >= 1 and r.driver.balloon_pages == 0
    r.device.read_config = real  # type: ignore[method-assign]
    r.work()
    assert r.driver.balloon_pages == 300


def test_corrupt_used_ring_is_counted_and_survived() -> None:
    r = make_pair(deferred=True)
    r.device.set_target(300)
    r.work()
    q = r.driver._queues[vb.BalloonQueue.INFLATEQ]
    r.driver.view.write_u16(q.layout.used_gpa + 2, 40)  # the device claims 40 used
    r.work()
    assert r.driver.counters["used_ring_broken"] == 1
    assert r.driver.balloon_pages == 0
    assert r.driver.transient_pfns().size > 0  # stuck in flight, still accounted
    assert r.mem.check_invariants() == []


def test_unload_deflates_everything() -> None:
    r = make_pair()
    r.device.set_target(900)
    r.work()
    r.driver.unload(r.now)
    assert r.driver.balloon_pages == 0 and r.device.balloon_pfns().size == 0
    assert r.device.actual_pages == 0 and r.mem.balloon_pages == 0
    with pytest.raises(UsageError):
        r.driver.work(r.now)


FEATURE_BITS = [MTH, STATS, DOO, REP, REFUSE, RESET]


@settings(max_examples=25, deadline=None)
@given(
    feats=st.lists(st.booleans(), min_size=6, max_size=6),
    steps=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, SMALL)),
            st.integers(0, 12000),
            st.integers(0, 6000),
            st.sampled_from(["none", "stats", "reset", "pin"]),
        ),
        min_size=1,
        max_size=10,
    ),
    swap=st.sampled_from([0, 4096]),
)
def test_pair_invariants_hold_over_random_targets_and_workloads(
    feats: list[bool], steps: list[tuple[int | None, int, int, str]], swap: int
) -> None:
    offered = features_of(vb.VIRTIO_F_VERSION_1)
    for on, f in zip(feats, FEATURE_BITS, strict=True):
        offered |= f if on else 0
    r = make_pair(offered, swap_pages=swap)
    assert r.driver.features == offered & DEFAULT_FEATURES
    for target, anon, file, event in steps:
        if target is not None:
            r.device.set_target(target)
        r.mem.step(r.now + 0.1, 0.1, Demand(anon, anon // 2, file, file // 2))
        if event == "stats":
            r.device.request_stats()
        elif event == "reset" and offered & RESET:
            r.device.request_reset()
        elif event == "pin":
            r.device.pin(np.arange(0, SMALL, 7))
        r.work()
        assert r.check() == []
        # synchronous device: nothing in flight (refused frames may wait aside)
        assert r.driver.transient_pfns().size == r.driver.refused_pages


# ------------------------------------------------------------------ the bulk path
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 0.95), st.floats(0.0, 0.8)),
             min_size=1, max_size=5),
    st.sampled_from([
        SUPPORTED_FEATURES,
        SUPPORTED_FEATURES & ~features_of(vb.VIRTIO_BALLOON_X_F_HOST_REFUSE),
        SUPPORTED_FEATURES & ~features_of(vb.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                          vb.VIRTIO_BALLOON_F_MUST_TELL_HOST),
    ]),
    st.sampled_from([1, BLOCK_PAGES]),
    st.booleans(),
)
def test_rounds_of_buffers_end_where_doorbell_by_doorbell_ends(
        plan: list[tuple[int, float, float]], features: int, host_frames: int,
        pin: bool) -> None:
    # the simulator's bulk inflate and deflate (whole rounds of arrays in one call) end in
    # exactly the guest, driver, device, queue and ring-memory state of one doorbell a round
    pages = SMALL * 4
    one, bulk = (virtio_pair(pages, features=features, host_page_frames=host_frames)
                 for _ in range(2))
    one.transport.bulk = False
    for pair in (one, bulk):
        if pin:
            pair.device.pin(np.arange(pages - 4096, pages - 4000))
    for periods, target, used in plan:
        demand = Demand(int(used * pages * 0.5), int(used * pages * 0.25), int(used * pages * 0.3),
                        int(used * pages * 0.1), 0.02)
        for pair in (one, bulk):
            pair.set_target(int(target * pages))
            for _ in range(periods):
                pair.now += pair.period_s
                pair.mem.step(pair.now, pair.period_s, demand)
                pair.driver.work(pair.now)
    one.transport.bulk = True
    diff = state_diff(state_of(one), state_of(bulk))
    assert diff == [], diff
    assert check_pair(bulk) == []
    # a bulk call's rounds reach the driver as that many used interrupts (at once)
    assert (bulk.driver.used_interrupts == one.driver.used_interrupts
            == bulk.transport.used_interrupts == one.transport.used_interrupts)


def test_a_bulk_calls_used_interrupts_reach_the_driver_at_once() -> None:
    pair = virtio_pair(SMALL * 4)
    heard: list[tuple[int, int]] = []
    pair.transport.set_used_many_handler(lambda q, n: heard.append((q, n)))
    pair.set_target(SMALL * 3)
    pair.tick()
    assert heard and all(q == 0 and n >= 1 for q, n in heard)
    assert max(n for _, n in heard) >= 2  # rounds in one call, one call to the handler
    assert pair.driver.used_interrupts == 0  # the handler above took them
    # a new pair of handlers drops the old one: each round calls the used handler
    singles: list[int] = []
    pair.transport.set_interrupt_handlers(lambda: None, singles.append)
    pair.set_target(0)
    pair.driver.work(pair.now + pair.period_s)  # reads the new target itself
    assert len(singles) == pair.transport.used_interrupts - sum(n for _, n in heard)
    assert len(singles) >= 2


def test_bulk_rounds_are_taken_only_where_every_frame_goes_through() -> None:
    pair = virtio_pair(SMALL * 4)
    pair.set_target(SMALL * 3)
    pair.tick()
    assert pair.driver.balloon_pages == SMALL * 3
    assert pair.transport.notifies >= 2  # rounds in bulk count their doorbells
    held = virtio_pair(SMALL * 4, deferred=True)
    assert not held.transport.can_take_rounds(0)  # a deferred device: buffer by buffer
    pinned = virtio_pair(SMALL * 4)
    pinned.device.pin([5000])
    assert not pinned.transport.can_take_rounds(0)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 0.9), st.floats(0.2, 3.0),
                       st.sampled_from(["none", "none", "stats", "reset", "pin", "dry", "wet",
                                        "spike"])),
             min_size=1, max_size=12),
    st.sampled_from([
        SUPPORTED_FEATURES,
        SUPPORTED_FEATURES & ~features_of(vb.VIRTIO_BALLOON_X_F_HOST_REFUSE),
        SUPPORTED_FEATURES & ~features_of(vb.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                          vb.VIRTIO_BALLOON_F_MUST_TELL_HOST),
    ]),
    st.sampled_from([1, BLOCK_PAGES]),
)
@example(  # a deflate the dry pool holds: the report after it is a doorbell (retry first)
    [(0.6, 0.1, 2.5, "none"), (0.1, 0.1, 2.5, "dry"), (0.05, 0.1, 2.5, "none"),
     (0.3, 0.1, 2.5, "wet"), (0.5, 0.1, 2.5, "reset"), (0.2, 0.1, 2.5, "stats")],
    SUPPORTED_FEATURES, BLOCK_PAGES)
def test_free_page_reports_in_bulk_end_where_their_doorbells_end(
        plan: list[tuple[float, float, float, str]], features: int, host_frames: int) -> None:
    # the simulator's bulk report (the doorbell, the device's walk, release and used entry in
    # one call) ends in exactly the guest, driver, device, host, queue and ring-memory state,
    # counters and statistics of the doorbell; also where it must fall back (a deflate the
    # host holds for want of memory, an owed release, a reset, refusals, deflate on OOM)
    pages = SMALL * 8
    one, bulk = (virtio_pair(pages, features=features, host_page_frames=host_frames)
                 for _ in range(2))
    one.transport.bulk = False
    for target, used, dt, event in plan:
        demand = Demand(int(used * pages * 0.5), int(used * pages * 0.25),
                        int(used * pages * 0.3), int(used * pages * 0.1), 0.02)
        for pair in (one, bulk):
            pair.set_target(int(target * pages))
            if event == "stats":
                pair.device.request_stats()
            elif event == "reset":
                pair.device.request_reset()
            elif event == "pin":
                pair.device.pin(np.arange(pages // 2, pages // 2 + 3000))
            elif event == "dry" and host_frames > 1:
                pair.ram.pool = 1  # deflates held, releases owed
            elif event == "wet":
                pair.ram.pool = None
            pair.now += dt  # a free page report is due every PAGE_REPORTING_DELAY_S
            pair.mem.step(pair.now, dt, demand)
            if event == "spike":  # the guest needs more than the balloon left it: OOM
                pair.mem.step(pair.now, dt, Demand(int(0.9 * pages), int(0.45 * pages), 0, 0,
                                                   0.02))
            pair.driver.work(pair.now)
    one.transport.bulk = True
    diff = state_diff(state_of(one), state_of(bulk))
    assert diff == [], diff
    assert check_pair(bulk) == check_pair(one)  # a dry pool holds deflates: not in sync


def test_a_free_page_report_goes_in_bulk_where_the_doorbell_would_release_it_all() -> None:
    pages = 256 * MIB // PAGE_SIZE
    one, bulk = make_pair(pages=pages), make_pair(pages=pages)
    one.transport.bulk = False
    walked = []
    for pair in (one, bulk):
        real = pair.device._report
        pair.device._report = lambda chain, real=real: walked.append(chain) or real(chain)
        pair.now = PAGE_REPORTING_DELAY_S
        pair.work()
        pair.device._report = real  # type: ignore[method-assign]
    assert len(walked) == 1  # the doorbell's chain, walked; none for the bulk report
    assert bulk.device.counters["report_buffers"] == 1
    assert bulk.driver.counters["reported_blocks"] > 0
    assert bulk.device.reported_pages_total == one.device.reported_pages_total > 0
    assert bulk.transport.notifies == one.transport.notifies
    one.transport.bulk = True
    assert state_diff(state_of(one), state_of(bulk)) == []
    # a block on a ballooned frame (a driver bug): the doorbell, whose walk refuses it
    qi = bulk.driver._qidx[vb.BalloonQueue.REPORTING_VQ]
    bulk.device._inflated[5 * BLOCK_PAGES] = True
    bulk.device._inflated_count += 1
    assert not bulk.device.report_blocks(qi, 0, np.array([5]), BLOCK_PAGES)
    assert not bulk.device.report_blocks(qi, 0, np.array([pages]), BLOCK_PAGES)  # outside
    assert not bulk.device.report_blocks(qi, 0, np.array([7]), BLOCK_PAGES)  # not available


def _reset_after_config_read(r: VirtioPair, nth: int) -> None:
    """The host resets the balloon just after the driver's ``nth`` config read, which saw the
    old generation: the driver goes on to its next inflate buffer (seed 001 over virtio: a
    device in another process can reset at any moment)."""
    real, seen = r.transport.read_config, [0]

    def read_config() -> bytes:
        cfg = real()
        seen[0] += 1
        if seen[0] == nth:
            r.device.request_reset()
        return cfg

    r.transport.read_config = read_config  # type: ignore[method-assign]


@pytest.mark.parametrize("features", [SUPPORTED_FEATURES, SUPPORTED_FEATURES & ~REFUSE])
def test_a_reset_between_two_inflate_buffers_leaves_no_frame_held(features: int) -> None:
    # the device takes nothing into the balloon while its reset is not acknowledged: the
    # driver drops what it sent before it saw the new generation, so both end empty
    r = make_pair(features)
    _reset_after_config_read(r, 2)
    r.device.set_target(3 * FILL_BATCH * vb.VIRTIO_BALLOON_ARRAY_PFNS_MAX // 2)
    r.work()
    assert r.device.reset_pending and r.device.counters["inflate_while_reset_pending"] > 0
    r.device.set_target(0)
    r.work()
    assert not r.device.reset_pending and r.driver.counters["resets"] == 1
    assert r.device.balloon_pfns().size == 0 and r.driver.balloon_pages == 0
    assert r.driver.transient_pfns().size == 0
    assert r.check() == []
    r.device.set_target(700)
    r.work()
    assert r.driver.balloon_pages == 700 and r.device.inflated_pages == 700
    assert r.check() == []


@pytest.mark.parametrize("features", [SUPPORTED_FEATURES, SUPPORTED_FEATURES & ~REFUSE])
def test_a_reset_with_an_inflate_buffer_still_out_is_acknowledged_once_it_is_back(
        features: int) -> None:
    # a pipelined transport: the buffer sent before the driver saw the reset comes back after;
    # the ack waits for it, the device takes nothing meanwhile, both end empty
    r = make_pair(features, deferred=True)
    r.device.set_target(600)
    r.work()
    r.transport.run_device()
    r.work()
    assert r.driver.balloon_pages == 600
    r.device.set_target(900)
    r.work()  # 300 more in flight, the doorbell held
    r.device.request_reset()  # drains them into the old balloon, takes all back
    r.device.set_target(1200)
    r.work()  # sees the reset: the buffers are back (drained), acks
    assert not r.device.reset_pending and r.driver.balloon_pages == 0
    r.work()  # inflates again: held in flight
    r.device.request_reset()  # a second reset, the new buffers already queued
    r.work()
    r.transport.run_device()
    r.work()
    r.transport.run_device()
    r.work()
    assert r.check() == []
    assert r.device.balloon_pfns().size == r.driver.balloon_pages
    assert set(r.device.balloon_pfns().tolist()) == set(r.driver.balloon_pfns().tolist())


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.sampled_from([1.0, 0.2, 0.3, 5.0]), st.floats(0.0, 60.0),
       st.floats(0.0, 10.0))
def test_idle_run_is_the_idle_work_of_each_period(
        reporting: bool, period: float, span: float, due: float) -> None:
    # the periods a quiet guest slept through, in one call: the same clock (float additions)
    # and reporting clock as one idle_work a period
    one, bulk = make_pair(), make_pair()
    for p in (one, bulk):
        p.driver._reporting = reporting
        p.driver._next_report = due
    limit = 1.0 + span
    now, n = idle_each(one.driver.idle_work, 1.0, period, limit)
    got = bulk.driver.idle_run(1.0, period, limit)
    assert got == (now, n) and n == round((now - 1.0) / period)
    assert state_diff(state_of(one.driver), state_of(bulk.driver)) == []
