"""The pair harness: invariants over random target sequences and workloads, all protocols; the
links, the knobs and the queue pair."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memballoon.guest.vmw_driver import VmwBalloonDriver
from memballoon.guest.workload import Bursty, Idle, Ramp, Steady, Toucher
from memballoon.harness.pair import (
    PROTOCOLS,
    Pair,
    VirtioPair,
    VmwPair,
    _held_twice,
    check_pair,
    make_pair,
    queue_pair,
    virtio_pair,
    vmw_pair,
)
from memballoon.harness.state import state_diff, state_of
from memballoon.host.vmw_device import VmwDeviceCounter
from memballoon.model.errors import UsageError
from memballoon.model.units import HPAGE_PMD_NR, PageState, mib_to_pages
from memballoon.protocol.virtio_balloon import VIRTIO_F_VERSION_1, features_of
from memballoon.protocol.virtqueue import GuestRamView
from memballoon.protocol.vmw import Capability, Command, Status

G = 64  # MiB: small guests keep the property tests quick
SMALL = mib_to_pages(G)
workloads = st.sampled_from([
    Idle(anon_mib=4, file_mib=2),
    Steady(anon_mib=20, file_mib=8),
    Bursty(base_mib=4, peak_mib=40, file_mib=2, period_s=6, burst_s=3, ramp_s=1),
    Ramp(start_mib=4, peak_mib=56, mib_per_s=8, file_mib=1),
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    workloads,
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, mib_to_pages(G) - 1)), max_size=8),
    st.sampled_from([0, mib_to_pages(16)]),
    st.sampled_from([1, HPAGE_PMD_NR]),
)
def test_invariants_hold_after_every_period(protocol: str, workload: object,
                                           targets: list[tuple[int, int]], swap: int,
                                           host_frames: int) -> None:
    pair = make_pair(protocol, mib_to_pages(G), workload, swap_pages=swap,  # type: ignore[arg-type]
                     host_page_frames=host_frames)
    for ticks, target in targets:
        pair.set_target(target)
        for _ in range(ticks):
            pair.tick()
    assert pair.violations == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    workloads,
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, mib_to_pages(G) - 1), st.booleans()),
             max_size=8),
    st.sampled_from([1, HPAGE_PMD_NR]),
)
def test_invariants_hold_across_device_restarts(protocol: str, workload: object,
                                               steps: list[tuple[int, int, bool]],
                                               host_frames: int) -> None:
    pair = make_pair(protocol, SMALL, workload,  # type: ignore[arg-type]
                     host_page_frames=host_frames)
    for ticks, target, restart in steps:
        pair.set_target(target)
        pair.tick()
        if restart:
            before = pair.device.balloon_pfns()
            pair.restart_device()  # the host restarts between two periods
            assert np.array_equal(pair.device.balloon_pfns(), before)
            assert pair.check() == []
        for _ in range(ticks):
            pair.tick()
    assert pair.violations == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    st.sampled_from([Idle(anon_mib=4, file_mib=2), Steady(anon_mib=20, file_mib=8),
                     Toucher(low_mib=4, high_mib=30, period_s=7),
                     Bursty(base_mib=4, peak_mib=30, period_s=9, burst_s=3, ramp_s=0)]),
    st.lists(st.tuples(st.integers(1, 40), st.integers(0, mib_to_pages(G) - 1)), max_size=6),
)
def test_idle_periods_of_a_quiet_pair_end_where_ticking_ends(
        protocol: str, workload: Idle, targets: list[tuple[int, int]]) -> None:
    # the simulator's sleep: a pair that skips every period in which it is quiet ends in
    # exactly the state (pages, lists, counters, statistics) of one ticked every period
    ticked = make_pair(protocol, SMALL, workload)
    skipping = make_pair(protocol, SMALL, workload)
    skipped = 0
    for periods, target in [*targets, (60, 0)]:
        ticked.set_target(target)
        skipping.set_target(target)
        for _ in range(periods):
            ticked.tick(check=False)
            if skipping.quiet():
                skipping.idle_period()
                skipped += 1
            else:
                skipping.tick(check=False)
    assert state_diff(state_of(ticked), state_of(skipping)) == []
    assert check_pair(skipping) == []
    if isinstance(workload, Idle):
        assert skipped > 0  # an idle guest at its target does sleep


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    st.sampled_from([None, 0.2, 0.3, 1.0]),
    st.integers(0, 15),
    st.lists(st.tuples(st.integers(0, 60), st.floats(-0.5, 0.5)), min_size=1, max_size=4),
)
def test_idle_until_ends_where_a_quiet_pair_ticked_every_period_ends(
        protocol: str, period_s: float | None, target: int,
        stretches: list[tuple[int, float]]) -> None:
    # the simulator's catch-up in one call: the same clock (float additions), driver clocks
    # and statistics, device counters and last step as a quiet pair ticked every period
    one = make_pair(protocol, SMALL, Idle(anon_mib=4, file_mib=2), period_s=period_s)
    bulk = make_pair(protocol, SMALL, Idle(anon_mib=4, file_mib=2), period_s=period_s)
    for p in (one, bulk):
        p.set_target(target * 100)
        p.run_until(lambda q: q.quiet(), 40, check=False)
    assert one.quiet() and bulk.quiet()
    for periods, slack in stretches:
        # a limit between two ticks, or on one (the backend's epsilon)
        limit = bulk.now + (periods + slack) * bulk.period_s
        n = 0
        while one.now + one.period_s <= limit:
            assert one.quiet()
            one.tick(check=False)
            n += 1
        assert bulk.idle_until(limit) == n
        assert state_diff(state_of(one), state_of(bulk)) == []
    assert bulk.idle_until(bulk.now) == 0
    assert check_pair(bulk) == []


def _tick_with_work(p: Pair) -> None:
    """``Pair.tick`` as it was before quiet periods skipped the driver: its work every time."""
    p.now += p.period_s
    p.last_step = p.mem.step(p.now, p.period_s, p.workload.demand(p.now))
    p.driver.work(p.now)
    p.cycles += 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROTOCOLS),
    workloads,
    st.lists(st.tuples(st.integers(1, 12), st.integers(0, mib_to_pages(G) - 1),
                       st.sampled_from(["", "busy", "restart"])), max_size=6),
    st.sampled_from([0, mib_to_pages(16)]),
    st.sampled_from([1, HPAGE_PMD_NR]),
)
def test_a_tick_that_skips_the_drivers_idle_work_ends_where_working_ends(
        protocol: str, workload: Steady, steps: list[tuple[int, int, str]], swap: int,
        host_page_frames: int) -> None:
    # a busy guest whose protocol has nothing to do: the idle work instead of the driver's
    # full work ends in exactly the same pages, lists, counters and statistics
    fast = make_pair(protocol, SMALL, workload, swap_pages=swap,
                     host_page_frames=host_page_frames)
    slow = make_pair(protocol, SMALL, workload, swap_pages=swap,
                     host_page_frames=host_page_frames)
    for periods, target, event in [*steps, (30, 0, "")]:
        for p in (fast, slow):
            p.set_target(target)
            if event == "busy" and isinstance(p, VmwPair):
                p.device.busy_next(3)
            elif event == "restart":
                p.restart_device()
        for _ in range(periods):
            fast.tick(check=False)
            _tick_with_work(slow)
        assert state_diff(state_of(slow), state_of(fast)) == []
    assert check_pair(fast) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([
        Bursty(base_mib=16, peak_mib=160, file_mib=8, period_s=5, burst_s=2, ramp_s=1),
        Toucher(low_mib=16, high_mib=150, period_s=3),
        Ramp(start_mib=8, peak_mib=200, mib_per_s=40, file_mib=4),
    ]),
    st.lists(st.tuples(st.integers(1, 25), st.integers(0, mib_to_pages(128))), max_size=5),
    st.sampled_from([1, HPAGE_PMD_NR]),
)
def test_a_virtio_tick_between_reporting_passes_ends_where_working_ends(
        workload: Steady, steps: list[tuple[int, int]], host_page_frames: int) -> None:
    # a guest large enough to report free blocks: between two reporting passes a tick
    # whose driver is settled runs the idle work even with free blocks waiting
    # (``quiet_at``), and ends in exactly the state of the driver's full work
    big = mib_to_pages(256)
    fast = virtio_pair(big, workload, host_page_frames=host_page_frames)
    slow = virtio_pair(big, workload, host_page_frames=host_page_frames)
    for periods, target in [*steps, (30, 0)]:
        for p in (fast, slow):
            p.set_target(target)
        for _ in range(periods):
            fast.tick(check=False)
            _tick_with_work(slow)
        assert state_diff(state_of(slow), state_of(fast)) == []
    assert check_pair(fast) == []


def test_a_virtio_tick_skips_the_search_for_free_blocks_until_a_pass_is_due() -> None:
    pair = virtio_pair(mib_to_pages(256), Idle(anon_mib=16, file_mib=8))
    pair.run_until(lambda p: False, 3, check=False)
    drv = pair.driver
    assert drv.quiet_at(pair.now + pair.period_s) and not drv.quiet()  # blocks to report
    assert not drv.quiet_at(drv._next_report)  # the pass is due: it finds them
    skipped = 0
    for _ in range(40):
        nxt = pair.now + pair.period_s
        skipped += drv.quiet_at(nxt) and not drv.quiet()
        pair.tick()
    assert skipped > 0 and pair.violations == []
    assert drv.counters["reported_blocks"] > 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROTOCOLS), workloads,
       st.lists(st.tuples(st.integers(1, 8), st.integers(0, mib_to_pages(G) - 1)), max_size=5))
def test_a_tick_handed_its_demand_ends_where_a_tick_that_asks_ends(
        protocol: str, workload: Steady, steps: list[tuple[int, int]]) -> None:
    # the simulator hands a tick the demand it asked for ``quiet`` (the same time): the same
    # answer, and exactly the state of ticks that ask the workload themselves
    handed, asking = make_pair(protocol, SMALL, workload), make_pair(protocol, SMALL, workload)
    for periods, target in [*steps, (10, 0)]:
        handed.set_target(target)
        asking.set_target(target)
        for _ in range(periods):
            d = handed.workload.demand(handed.now + handed.period_s)
            assert handed.quiet(d) == asking.quiet()
            handed.tick(check=False, demand=d)
            asking.tick(check=False)
        assert state_diff(state_of(asking), state_of(handed)) == []


def test_a_busy_guest_at_its_target_skips_the_drivers_round_trip(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pair = vmw_pair(SMALL, Steady(anon_mib=20, file_mib=30, cold_access_per_s=0.2))
    pair.set_target(1000)
    pair.run_until(lambda p: p.driver.balloon_pages == 1000, 10)
    works: list[float] = []
    real = VmwBalloonDriver.work

    def work(self: VmwBalloonDriver, now: float) -> None:
        works.append(now)
        real(self, now)

    monkeypatch.setattr(VmwBalloonDriver, "work", work)
    gets = pair.device.counters[VmwDeviceCounter.CMD_GET_TARGET]
    timer = pair.driver.seed_stats.timer
    for _ in range(5):
        pair.tick()
        assert pair.last_step is not None and not pair.last_step.idle  # the workload ran
    assert works == []  # the driver's work would have found nothing to do
    assert pair.device.counters[VmwDeviceCounter.CMD_GET_TARGET] == gets + 5
    assert pair.driver.seed_stats.timer == timer + 5
    pair.set_target(2000)
    pair.tick()
    assert works == [pair.now]  # a new target: the driver works
    assert pair.driver.balloon_pages > 1000


def test_a_pair_is_not_quiet_with_work_to_do_or_a_tapped_link() -> None:
    pair = vmw_pair(SMALL, Idle(anon_mib=4, file_mib=2))
    pair.run_until(lambda p: False, 3, check=False)
    assert pair.quiet()
    pair.set_target(100)
    assert not pair.quiet()  # the next GET_TARGET answers another target
    pair.run_until(lambda p: p.driver.balloon_pages == 100, 5)
    assert pair.quiet()
    pair.port.log = []
    assert not pair.quiet()  # a tap sees every command: nothing may be skipped
    v = virtio_pair(SMALL, Idle(anon_mib=4, file_mib=2), deferred=True)
    v.set_target(100)
    v.tick(check=False)
    assert not v.quiet()  # buffers in flight
    bare = Pair(pair.protocol, pair.mem, pair.ram, pair.driver, pair.device, pair.workload,
                pair.period_s)  # no protocol link: nothing it may skip
    assert not bare.quiet()
    with pytest.raises(UsageError):
        bare.idle_period()
    with pytest.raises(UsageError):
        bare.idle_until(bare.now + 10 * bare.period_s)
    assert bare.idle_until(bare.now) == 0  # no period to skip: nothing asked of the link


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_pair_reaches_its_target_and_the_host_holds_nothing_behind_it(protocol: str) -> None:
    pair = make_pair(protocol, mib_to_pages(256), Idle(anon_mib=16, file_mib=8))
    pair.tick()
    pair.set_target(mib_to_pages(128))
    assert pair.run_until(lambda p: p.driver.balloon_pages == mib_to_pages(128), 20)
    balloon = pair.driver.balloon_pfns()
    assert balloon.size == mib_to_pages(128)
    assert bool((pair.mem.state[balloon] == PageState.BALLOON).all())
    assert pair.ram.resident_pages_of(balloon) == 0
    assert check_pair(pair) == [] and pair.violations == []
    pair.set_target(0)
    assert pair.run_until(lambda p: p.driver.balloon_pages == 0, 20)
    assert pair.violations == []


def test_check_pair_notices_a_device_that_forgot_a_page() -> None:
    pair = make_pair("vmw-batched", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    pair.set_target(1000)
    pair.tick()
    assert check_pair(pair) == []
    pfn = int(pair.driver.balloon_pfns()[0])
    pair.device._locked[pfn] = False  # type: ignore[attr-defined]  # sabotage the host's view
    errs = check_pair(pair)
    assert any("balloons differ" in e for e in errs)


def test_check_pair_notices_a_wrong_count_of_partial_huge_pages() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Idle(anon_mib=4, file_mib=2),
                     host_page_frames=HPAGE_PMD_NR)
    pair.set_target(1000)
    pair.tick()
    assert check_pair(pair) == [] and pair.device.partial_huge_pages == 1
    pair.device.host_pages._partial = 0  # sabotage the host's count
    assert any("partial huge pages" in e for e in check_pair(pair))


def test_check_pair_notices_a_ballooned_frame_the_host_still_holds() -> None:
    pair = make_pair("virtio", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    pair.set_target(1000)
    pair.tick()
    pair.ram.touch(pair.driver.balloon_pfns()[:3], 9)  # as if the host never released them
    assert any("host still holds" in e for e in check_pair(pair))


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown protocol"):
        make_pair("xen", 65536, Idle())
    assert np.asarray(PROTOCOLS).size == 3


def test_make_pair_builds_each_protocol_with_its_link() -> None:
    vmw = make_pair("vmw", SMALL, Idle())
    batched = make_pair("vmw-batched", SMALL, Idle())
    virtio = make_pair("virtio", SMALL, Idle())
    assert isinstance(vmw, VmwPair) and not vmw.driver.batched and vmw.port.log is None
    assert isinstance(batched, VmwPair) and batched.driver.batched and batched.driver.huge_pages
    assert isinstance(virtio, VirtioPair) and not virtio.transport.deferred
    assert virtio.transport.device is virtio.device
    for p in (vmw, batched, virtio):
        assert p.period_s == p.driver.period_s and p.check() == []


def test_work_runs_the_driver_alone_and_tick_the_workload_too() -> None:
    p = vmw_pair(SMALL, Steady(anon_mib=4, file_mib=1))
    used = p.mem.meminfo().free_pages
    p.work(3)
    assert (p.now, p.cycles, p.mem.meminfo().free_pages) == (3.0, 3, used)  # the guest idle
    p.tick()
    assert p.now == 4.0 and p.mem.meminfo().free_pages < used and p.last_step is not None


def test_the_backdoor_tap_logs_intercepts_and_replaces() -> None:
    p = vmw_pair(SMALL, record=True)
    assert p.port.commands() == [Command.START, Command.GUEST_ID]
    seen: list[Command] = []
    p.port.before = lambda req: seen.append(req.command)
    p.device.set_target(3)
    p.work()
    assert seen == [Command.GET_TARGET] + [Command.LOCK] * 3
    assert p.port.log is not None and p.port.log[-1][2] is Status.SUCCESS
    p.port.reply = lambda req, reply: b""  # the host answers nothing at all
    p.device.set_target(0)
    p.work()
    assert p.driver.counters["reply_short_frame"] == 1 and p.driver.balloon_pages == 3
    # what the device said
    assert p.port.log[-1] == (Command.GET_TARGET, p.mem.managed_pages, Status.SUCCESS)
    assert p.check() == []


def test_vmw_knobs_reach_the_driver_and_the_device() -> None:
    p = vmw_pair(SMALL, batched=True, huge_pages=False, supports_2m=False, load=False)
    assert p.driver.batched and not p.driver.huge_pages and not p.device.supports_2m
    assert not p.driver.loaded and p.port.commands() == []
    p.driver.load(p.now)
    assert p.device.capabilities == Capability.BASIC_CMDS | Capability.BATCHED_CMDS
    q = vmw_pair(SMALL)
    q.device.set_target(2049)
    q.work()
    assert q.yields == 1  # the driver's cond_resched() reaches the pair


def test_vmw_link_invariants_notice_a_reset_and_refused_pages() -> None:
    p = vmw_pair(SMALL)
    p.device.set_target(100)
    p.work()
    p.device.request_reset()
    p.work()  # the host forgot the balloon: the driver holds it all as transient
    assert p.driver.reset_required and p.check() == []
    p.driver.page_sizes[0].n_refused_pages = 2  # as if a cycle had ended holding two
    assert any("refused pages held" in e for e in p.check())


def test_virtio_link_invariants_notice_frames_in_flight() -> None:
    p = virtio_pair(SMALL, deferred=True)
    p.device.set_target(100)
    p.work()  # kicked, the device has not run: the frames are in flight
    assert p.driver.transient_pfns().size == 100
    assert p.check() == []  # allowed with a deferred device
    p.transport.deferred = False  # a synchronous device would have used them by now
    assert any("in flight with a synchronous device" in e for e in p.check())


def test_virtio_knobs_reach_the_device_and_the_transport() -> None:
    p = virtio_pair(SMALL, features=0, deferred=True, load=False)
    assert p.device.device_features() == features_of(VIRTIO_F_VERSION_1)
    assert p.transport.deferred and p.driver.features == 0
    p.driver.load(p.now)
    assert p.driver.features == features_of(VIRTIO_F_VERSION_1)


# ------------------------------------------------------------------ one virtqueue
def _view() -> GuestRamView:
    return GuestRamView(bytearray(0x4000), base_gpa=0x10000, guest_bytes=1 << 24)


def test_queue_pair_check_follows_honest_steps() -> None:
    q = queue_pair(_view(), 0x10000, 4, start_index=0xFFFE)
    heads = [q.driver.add([(0x13000, 8, False)]) for _ in range(3)]
    assert q.check() == []
    q.driver.publish()
    chains = [q.device.pop() for _ in heads]
    assert q.check() == []
    for c in chains:
        assert c is not None
        q.device.push_used(c.head, 0)
    assert q.check() == [] and len(q.driver.collect()) == 3 and q.check() == []


def test_queue_pair_check_notices_a_scribbled_ring() -> None:
    q = queue_pair(_view(), 0x10000, 4)
    q.driver.add([(0x13000, 8, False)])
    q.driver.publish()
    q.view.write_u16(q.device.layout.used_gpa + 2, 1)  # a used.idx the device never wrote
    assert any("used.idx" in e for e in q.check())
    q.view.write_u16(q.device.layout.used_gpa + 2, 0)
    q.view.write_u16(q.device.layout.avail_gpa + 2, 3)  # heads the driver never sent
    assert any("the device sees 3 available" in e for e in q.check())


@pytest.mark.parametrize("protocol, signalled", [("vmw", False), ("vmw-batched", True),
                                                 ("virtio", True)])
def test_a_wake_runs_the_drivers_work_between_periods(protocol: str, signalled: bool) -> None:
    pair = make_pair(protocol, mib_to_pages(64), Idle(anon_mib=4, file_mib=2), period_s=1.0)
    pair.tick()
    assert pair.signalled is signalled  # as the local world signals (WAKE, config interrupt)
    pair.set_target(mib_to_pages(8))
    pair.wake(pair.now)
    assert pair.now == 1.0 and pair.cycles == 1  # no period passed
    assert pair.driver.balloon_pages == mib_to_pages(8) and pair.check() == []
    with pytest.raises(UsageError, match="before the pair's"):
        pair.wake(0.5)


@given(st.lists(st.integers(0, 60), max_size=40), st.lists(st.integers(0, 60), max_size=6),
       st.booleans())
def test_held_twice_is_a_repeat_among_the_frames_held(
        balloon: list[int], transient: list[int], ordered: bool) -> None:
    # sorted (the drivers' contract) or not, as a bitmap of every frame held says
    drv = np.array(sorted(balloon) if ordered else balloon, dtype=np.int64)
    trans = np.array(sorted(transient) if ordered else transient, dtype=np.int64)
    held = balloon + transient
    assert _held_twice(drv, trans, 61) == (len(set(held)) != len(held))
