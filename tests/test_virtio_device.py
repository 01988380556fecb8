"""The host's virtio-balloon device, driven by hand-built queues (a driver we fully control)."""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.memory import GuestMemory
from memballoon.guest.virtio_driver import VirtioBalloonDriver
from memballoon.guest.workload import Demand
from memballoon.harness.pair import virtio_pair
from memballoon.host.memfd import MemfdRam
from memballoon.host.ram import NullRam
from memballoon.host.virtio_device import (
    SUPPORTED_FEATURES,
    VirtioBalloonDevice,
    VirtioDeviceSnapshot,
)
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError, MemballoonError, UsageError
from memballoon.model.pages import RangeArray
from memballoon.model.units import HPAGE_PMD_NR, MIB, PAGE_SIZE, PageState, RamKind, mib_to_pages
from memballoon.protocol import virtio_balloon as vb
from memballoon.protocol.virtio_balloon import BalloonConfig, StatTag, encode_stats, features_of
from memballoon.protocol.virtio_transport import DirectTransport
from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout

PAGES = 16384  # 64 MiB guest
AREA = 48 * MIB  # the rings and buffers: clear of the frames the tests balloon
F_REFUSE = features_of(vb.VIRTIO_BALLOON_X_F_HOST_REFUSE)
F_RESET = features_of(vb.VIRTIO_BALLOON_X_F_HOST_RESET)
F_STATS = features_of(vb.VIRTIO_BALLOON_F_STATS_VQ)
F_REPORT = features_of(vb.VIRTIO_BALLOON_F_REPORTING)


class CountingRam(NullRam):
    """NullRam that records every release/readmit call (to show one call per buffer)."""

    def __init__(self, pages: int, host_page_frames: int = 1) -> None:
        super().__init__(pages, host_page_frames=host_page_frames)
        self.release_calls: list[RangeArray] = []
        self.readmit_calls: list[RangeArray] = []

    def release(self, ranges: RangeArray) -> int:
        self.release_calls.append(ranges.copy())
        return super().release(ranges)

    def readmit(self, ranges: RangeArray) -> int:
        self.readmit_calls.append(ranges.copy())
        return super().readmit(ranges)


class Irq:
    def __init__(self) -> None:
        self.config = 0
        self.used: list[int] = []

    def config_changed(self) -> None:
        self.config += 1

    def used_buffers(self, queue: int) -> None:
        self.used.append(queue)


class Guest:
    """A hand-rolled driver: negotiates, lays queues out and sends raw buffers."""

    def __init__(self, features: int, *, offered: int | None = None, queue_size: int = 8,
                 host_page_frames: int = 1) -> None:
        self.ram = CountingRam(PAGES, host_page_frames)
        self.view = GuestRamView(bytearray(256 * 1024), base_gpa=AREA, guest_bytes=PAGES * 4096)
        self.dev = VirtioBalloonDevice(
            self.ram, self.view, features=features if offered is None else offered,
            queue_size=queue_size,
        )
        self.irq = Irq()
        self.dev.attach(self.irq)
        self.dev.set_driver_features(features | features_of(vb.VIRTIO_F_VERSION_1))
        self.q: dict[vb.BalloonQueue, tuple[int, DriverQueue]] = {}
        cursor = AREA
        for role, idx in vb.queue_indices(self.dev.features).items():
            lay = QueueLayout.packed(cursor, self.dev.queue_max_size(idx))
            cursor += 0x1000
            self.q[role] = (idx, DriverQueue(self.view, lay, Counters()))
            self.dev.setup_queue(idx, lay)
        self.buf = AREA + 0x10000  # PFN arrays and other payloads

    def send(self, role: vb.BalloonQueue, bufs: list[tuple[int, int, bool]]) -> int:
        idx, q = self.q[role]
        head = q.add(bufs)
        q.publish()
        self.dev.notify(idx)
        return head

    def send_pfns(self, role: vb.BalloonQueue, pfns: list[int], status: bool = False) -> int:
        data = np.asarray(pfns, dtype="<u4").tobytes()
        self.view.write(self.buf, data)
        bufs = [(self.buf, len(data), False)]
        if status:
            self.view.fill(self.buf + 0x2000, len(pfns), 0xFF)
            bufs.append((self.buf + 0x2000, len(pfns), True))
        return self.send(role, bufs)

    def used(self, role: vb.BalloonQueue) -> list[tuple[int, int]]:
        return [(u.head, u.length) for u in self.q[role][1].collect()]

    def status(self, n: int) -> list[int]:
        return list(self.view.read(self.buf + 0x2000, n))


INFL, DEFL = vb.BalloonQueue.INFLATEQ, vb.BalloonQueue.DEFLATEQ


def test_offers_features_and_rejects_unsupported() -> None:
    g = Guest(0, offered=SUPPORTED_FEATURES)
    assert g.dev.device_features() & SUPPORTED_FEATURES == SUPPORTED_FEATURES
    assert vb.has(g.dev.device_features(), vb.VIRTIO_F_VERSION_1)
    with pytest.raises(UsageError):
        VirtioBalloonDevice(NullRam(PAGES), g.view, features=features_of(
            vb.VIRTIO_BALLOON_F_FREE_PAGE_HINT))
    g.dev.set_driver_features(features_of(vb.VIRTIO_BALLOON_F_PAGE_POISON))
    assert g.dev.counters["driver_features_not_offered"] == 1


def test_set_target_writes_num_pages_and_raises_config_change() -> None:
    g = Guest(0)
    g.dev.set_target(1234)
    assert g.irq.config == 1 and g.dev.target_pages == 1234
    assert BalloonConfig.decode(g.dev.read_config()).num_pages == 1234
    with pytest.raises(UsageError):
        g.dev.set_target(PAGES + 1)
    with pytest.raises(UsageError):
        g.dev.set_target(-1)


def test_inflate_releases_valid_pfns_in_one_call_per_buffer() -> None:
    g = Guest(0)
    g.ram.touch(np.arange(4096, 8192, dtype=np.int64), 1)
    before = g.ram.resident_bytes()
    pfns = [5000, 5001, 5002, 7000, PAGES, 0xFFFF_FFFF, 5001]
    head = g.send_pfns(INFL, pfns)
    assert g.used(INFL) == [(head, 0)]
    assert g.irq.used == [0]
    assert len(g.ram.release_calls) == 1
    assert g.ram.release_calls[0].tolist() == [[5000, 5003], [7000, 7001]]
    assert g.dev.balloon_pfns().tolist() == [5000, 5001, 5002, 7000]
    assert g.ram.resident_bytes() == before - 4 * PAGE_SIZE
    assert g.dev.counters["inflate_pfn_outside_guest"] == 2
    assert g.dev.counters["inflate_pfn_duplicate"] == 1
    # the same frame again: counted, not released twice
    g.send_pfns(INFL, [5000])
    assert g.dev.counters["inflate_pfn_already_in_balloon"] == 1
    assert len(g.ram.release_calls) == 1
    assert g.dev.inflated_pages == 4


def test_a_run_of_frames_takes_the_fast_path_and_anything_else_the_checks() -> None:
    g = Guest(F_REFUSE)
    g.send_pfns(INFL, list(range(300, 556)), status=True)  # one ascending run: all taken
    assert g.used(INFL)[0][1] == 256 and set(g.status(256)) == {0}
    assert g.ram.release_calls[-1].tolist() == [[300, 556]]
    # runs that touch the balloon, a pinned frame or the guest's end go through every check
    g.dev.pin([601])
    for run, taken in (([554, 555, 556, 557], [0, 0, 1, 1]),
                       ([600, 601, 602], [1, 0, 1]),
                       ([PAGES - 1, PAGES, PAGES + 1], [1, 0, 0])):
        g.send_pfns(INFL, run, status=True)
        g.used(INFL)
        assert [s == 0 for s in g.status(len(run))] == [bool(t) for t in taken]
    assert g.dev.inflated_pages == 256 + 2 + 2 + 1
    assert g.dev.balloon_pfns().size == g.dev.inflated_pages
    assert g.dev.counters["inflate_pfn_already_in_balloon"] == 2
    assert g.dev.counters["inflate_refused_pinned"] == 1
    assert g.dev.counters["inflate_pfn_outside_guest"] == 2


def test_deflate_readmits_only_balloon_frames() -> None:
    g = Guest(0)
    g.send_pfns(INFL, [10, 11, 12])
    g.send_pfns(DEFL, [11, 12, 99, PAGES + 5])
    assert g.dev.balloon_pfns().tolist() == [10]
    assert g.ram.readmit_calls[-1].tolist() == [[11, 13]]
    assert g.dev.counters["deflate_pfn_not_in_balloon"] == 1
    assert g.dev.counters["deflate_pfn_outside_guest"] == 1


def test_actual_is_written_by_the_driver_and_readonly_fields_are_not() -> None:
    g = Guest(0)
    g.dev.write_config(vb.OFFSET_ACTUAL, vb.encode_u32(77))
    # the driver's word is kept in config space, but the balloon is what the device holds
    assert vb.BalloonConfig.decode(g.dev.read_config()).actual == 77
    assert g.dev.actual_pages == 0 and g.dev.counters["actual_beyond_held"] == 1
    g.dev.write_config(vb.OFFSET_NUM_PAGES, vb.encode_u32(5))
    g.dev.write_config(vb.OFFSET_ACTUAL, b"\x01")
    g.dev.write_config(3, vb.encode_u32(5))
    g.dev.write_config(64, vb.encode_u32(5))
    assert g.dev.target_pages == 0 and vb.BalloonConfig.decode(g.dev.read_config()).actual == 77
    assert g.dev.counters["config_write_readonly"] == 1
    assert g.dev.counters["config_write_bad"] == 3


def test_malformed_pfn_buffers_are_returned_used_with_length_zero() -> None:
    g = Guest(0)
    g.view.write(g.buf, b"\x01\x02\x03")
    head = g.send(INFL, [(g.buf, 3, False)])  # not a whole u32
    assert g.used(INFL) == [(head, 0)]
    assert g.dev.counters["inflateq_bad_buffer"] == 1
    head = g.send(INFL, [(g.buf, 4, False), (g.buf + 8, 4, True)])  # writable w/o REFUSE
    assert g.used(INFL) == [(head, 0)]
    assert g.dev.counters["inflateq_bad_descriptor"] == 1
    head = g.send(INFL, [(g.buf + (1 << 30), 4, False)])  # outside the guest
    assert g.used(INFL) == [(head, 0)]
    head = g.send(INFL, [(PAGES * 4096 - 2048, 1024, False)])  # in the guest, not mapped
    assert g.used(INFL) == [(head, 0)]
    assert g.ram.release_calls == [] and g.dev.inflated_pages == 0


def test_broken_avail_ring_marks_the_queue_needs_reset() -> None:
    g = Guest(0)
    idx, q = g.q[INFL]
    g.view.write_u16(q.layout.avail_gpa + 2, 100)  # runs far ahead
    g.dev.notify(idx)
    assert idx in g.dev.broken_queues and g.dev.counters["inflateq_broken_ring"] == 1
    g.dev.notify(idx)
    assert g.dev.counters["notify_dead_queue"] == 1
    g.send_pfns(DEFL, [1])  # the other queues keep working
    assert g.dev.counters["deflate_buffers"] == 1
    g.dev.notify(42)
    assert g.dev.counters["notify_dead_queue"] == 2


def test_bad_queue_layout_is_counted() -> None:
    g = Guest(0)
    g.dev.setup_queue(0, QueueLayout(8, AREA + 8, AREA + 0x200, AREA + 0x400))
    g.dev.setup_queue(1, QueueLayout.packed(0, 8))  # not mapped by the view
    g.dev.setup_queue(0, QueueLayout.packed(AREA, 64))  # larger than we offer
    g.dev.setup_queue(9, QueueLayout.packed(AREA, 8))
    assert g.dev.counters["setup_bad_layout"] == 2
    assert g.dev.counters["setup_queue_too_large"] == 1
    assert g.dev.counters["setup_unknown_queue"] == 1


def test_stats_kept_by_name_and_buffer_held_until_requested() -> None:
    g = Guest(F_STATS)
    assert not g.dev.request_stats()  # nothing held yet
    data = encode_stats([(StatTag.MEMFREE, 4096), (StatTag.OOM_KILL, 2), (40, 1)])
    g.view.write(g.buf, data)
    head = g.send(vb.BalloonQueue.STATSQ, [(g.buf, len(data), False)])
    assert g.used(vb.BalloonQueue.STATSQ) == []  # held
    assert g.dev.stats == {"free-memory": 4096, "oom-kills": 2}
    assert g.dev.stats_seq == 1 and g.dev.counters["stats_unknown_tag"] == 1
    assert g.dev.request_stats()
    assert g.used(vb.BalloonQueue.STATSQ) == [(head, 0)]
    assert not g.dev.request_stats()


def test_reporting_releases_page_aligned_ranges() -> None:
    g = Guest(F_REPORT)
    g.ram.touch(np.arange(8192, 9216, dtype=np.int64), 1)
    r0 = g.ram.resident_bytes()
    blk = 512 * PAGE_SIZE
    head = g.send(vb.BalloonQueue.REPORTING_VQ, [(16 * blk, blk, True), (17 * blk, blk, True)])
    assert g.used(vb.BalloonQueue.REPORTING_VQ) == [(head, 0)]
    assert g.ram.release_calls[-1].tolist() == [[8192, 9216]]
    assert g.ram.resident_bytes() == r0 - 1024 * PAGE_SIZE
    assert g.dev.reported_pages_total == 1024 and g.dev.balloon_pfns().size == 0
    # misaligned, or device-readable: rejected, nothing released
    g.send(vb.BalloonQueue.REPORTING_VQ, [(16 * blk + 1, blk, True)])
    g.send(vb.BalloonQueue.REPORTING_VQ, [(16 * blk, blk, False)])
    assert len(g.ram.release_calls) == 1
    assert g.dev.counters["reporting_vq_bad_buffer"] == 1
    assert g.dev.counters["reporting_vq_bad_descriptor"] == 1


def test_refusal_of_pinned_frames() -> None:
    g = Guest(F_REFUSE)
    g.dev.pin([101, 103])
    g.send_pfns(INFL, [100, 101, 102, 103, PAGES], status=True)
    [(_, length)] = g.used(INFL)
    assert length == 5
    assert g.status(5) == [0, 1, 0, 1, 1]
    assert g.dev.balloon_pfns().tolist() == [100, 102]
    assert g.dev.counters["inflate_refused_pinned"] == 2
    # no status room for every PFN: nothing taken
    g.send_pfns(INFL, [200, 201])
    assert g.dev.counters["inflateq_bad_buffer"] == 1
    assert g.dev.balloon_pfns().tolist() == [100, 102]


def test_pinned_frames_are_taken_without_the_refusal_bit() -> None:
    g = Guest(0)
    g.dev.pin([101])
    g.send_pfns(INFL, [101])
    assert g.dev.balloon_pfns().tolist() == [101]
    assert g.dev.counters["inflate_pinned_taken"] == 1


def test_reset_readmits_everything_and_bumps_the_generation() -> None:
    g = Guest(F_RESET)
    with pytest.raises(UsageError):
        Guest(0).dev.request_reset()
    g.send_pfns(INFL, [1, 2, 3, 9])
    cfg0 = BalloonConfig.decode(g.dev.read_config())
    g.dev.request_reset()
    cfg = BalloonConfig.decode(g.dev.read_config())
    assert cfg.x_reset_generation == cfg0.x_reset_generation + 1
    assert g.dev.balloon_pfns().size == 0 and g.dev.reset_pending
    assert g.ram.readmit_calls[-1].tolist() == [[1, 4], [9, 10]]
    assert g.irq.config == 1
    g.dev.write_config(vb.OFFSET_X_RESET_ACK, vb.encode_u32(cfg.x_reset_generation))
    assert not g.dev.reset_pending


def test_hostile_avail_rings_never_escape_notify() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        g = Guest(F_REFUSE | F_STATS | F_REPORT)
        for idx, q in g.q.values():
            lay = q.layout
            g.view.write(lay.desc_gpa, rng.integers(0, 256, 16 * lay.size, dtype=np.uint8)
                         .tobytes())
            ring = rng.integers(0, 256, 4 + 2 * lay.size, dtype=np.uint8).tobytes()
            g.view.write(lay.avail_gpa, ring)
            g.view.write(lay.avail_gpa + 2, struct.pack("<H", int(rng.integers(0, 12))))
            g.view.write(g.buf, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
            g.dev.notify(idx)  # must not raise
        for r in g.ram.release_calls:
            assert r.size == 0 or (r[:, 0].min() >= 0 and r[:, 1].max() <= PAGES)


# ------------------------------------------------------------------ snapshots
def _forbid_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def touched(self: NullRam, ranges: RangeArray) -> int:
        raise AssertionError("restore released or readmitted host memory")

    monkeypatch.setattr(NullRam, "release", touched)
    monkeypatch.setattr(NullRam, "readmit", touched)


def test_snapshot_through_json_restores_the_balloon_and_the_pair_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = virtio_pair(PAGES)
    free = np.flatnonzero(p.mem.state == PageState.FREE)[:50]
    p.device.pin(free)  # refused (HOST_REFUSE): the driver takes others
    p.device.set_target(3000)
    p.work()
    assert p.check() == [] and p.device.inflated_pages == 3000
    old = p.device
    snap = old.snapshot()
    assert snap.stats_head is not None  # the driver primed its stats buffer at load
    text = snap.to_json()
    with monkeypatch.context() as m:
        _forbid_host_memory(m)
        dev = VirtioBalloonDevice.restore(VirtioDeviceSnapshot.from_json(text), p.ram, old.view)
    assert np.array_equal(dev.balloon_pfns(), old.balloon_pfns())
    assert (dev.actual_pages, dev.target_pages, dev.inflated_pages) == (
        old.actual_pages, old.target_pages, old.inflated_pages)
    assert dev.features == old.features and dev.device_features() == old.device_features()
    assert dev.read_config() == old.read_config() and dev.snapshot() == snap
    # the driver goes on with the restored device: it hands the stats buffer back, refuses
    # the pinned frames, and deflating returns exactly the balloon's frames
    balloon = set(old.balloon_pfns().tolist())
    readmitted: set[int] = set()
    real = NullRam.readmit

    def readmit(self: NullRam, ranges: RangeArray) -> int:
        readmitted.update(f for lo, hi in ranges.tolist() for f in range(lo, hi))
        return real(self, ranges)

    monkeypatch.setattr(NullRam, "readmit", readmit)
    p.restart_device()
    assert p.device is not old and p.transport.device is p.device and p.check() == []
    assert p.device.request_stats()
    p.work()
    assert p.device.stats_seq == 1 and p.device.stats["total-memory"] > 0
    p.device.set_target(4000)
    p.work()
    assert p.device.inflated_pages == 4000 and p.check() == []
    assert not np.isin(p.device.balloon_pfns(), free).any()
    assert balloon <= set(p.device.balloon_pfns().tolist())
    balloon = set(p.device.balloon_pfns().tolist())
    p.device.set_target(0)
    p.work()
    assert readmitted == balloon and p.driver.balloon_pages == 0 and p.check() == []


def test_buffers_in_flight_at_the_restart_are_served_by_the_new_device() -> None:
    p = virtio_pair(PAGES, deferred=True)
    p.device.set_target(700)
    p.work()  # kicked, not run: the inflate buffers wait in the avail ring
    assert p.driver.transient_pfns().size == 700 and p.device.inflated_pages == 0
    assert 0 in p.transport.pending_kicks  # the inflateq's doorbell, not answered
    p.restart_device()
    p.transport.run_device()
    assert p.device.inflated_pages == 700
    p.work()
    assert p.driver.balloon_pages == 700 and p.check() == []


def test_restore_keeps_a_broken_queue_broken_and_the_reset_generation() -> None:
    g = Guest(F_RESET | F_STATS)
    g.send_pfns(INFL, [1, 2, 3])
    g.dev.request_reset()
    idx, q = g.q[DEFL]
    g.view.write_u16(q.layout.avail_gpa + 2, 100)  # runs far ahead: NEEDS_RESET
    g.dev.notify(idx)
    snap = VirtioDeviceSnapshot.from_json(g.dev.snapshot().to_json())
    assert snap.broken_queues == (idx,) and snap.reset_generation == 1 and snap.reset_ack == 0
    dev = VirtioBalloonDevice.restore(snap, g.ram, g.view)
    assert idx in dev.broken_queues and dev.reset_pending
    dev.notify(idx)
    assert dev.counters["notify_dead_queue"] == 1
    assert BalloonConfig.decode(dev.read_config()).x_reset_generation == 1


def _snapshot_data() -> dict[str, object]:
    g = Guest(F_REFUSE | F_STATS | F_REPORT)
    g.dev.pin([40])
    g.send_pfns(INFL, [10, 11, 12, 20], status=True)
    data = g.dev.snapshot().model_dump(mode="json")
    assert isinstance(data, dict)
    return data


def _queue(data: dict[str, object], k: int, **change: object) -> list[object]:
    queues = [dict(q) for q in data["queues"]]  # type: ignore[attr-defined]
    queues[k].update(change)
    return queues


@pytest.mark.parametrize("mutate", [
    lambda d: {"inflated": [[10, 13], [12, 21]]},  # overlapping
    lambda d: {"inflated": [[20, 21], [10, 13]]},  # not sorted
    lambda d: {"pinned": [[PAGES, PAGES + 1]]},  # past the guest
    lambda d: {"num_pages": PAGES + 1},
    lambda d: {"actual": 1 << 32},
    lambda d: {"features": d["features"] | features_of(vb.VIRTIO_BALLOON_F_DEFLATE_ON_OOM)},
    lambda d: {"offered": features_of(vb.VIRTIO_BALLOON_F_FREE_PAGE_HINT, vb.VIRTIO_F_VERSION_1)},
    lambda d: {"queue_size": 12},
    lambda d: {"queues": _queue(d, 0, index=7)},  # a queue the features do not have
    lambda d: {"queues": _queue(d, 0, size=64)},  # larger than the device offers
    lambda d: {"queues": _queue(d, 0, desc_gpa=AREA + 8)},  # misaligned
    lambda d: {"queues": _queue(d, 0, last_avail=40, used_idx=0)},  # holds more than it can
    lambda d: {"queues": list(reversed(d["queues"]))},  # type: ignore[call-overload]
    lambda d: {"broken_queues": [9]},
    lambda d: {"stats_head": 8},  # outside the stats queue
    lambda d: {"version": 2},
    lambda d: {"device": "vmw"},
    lambda d: {"stats": {}},  # an unknown key
])
def test_malformed_snapshots_are_refused(mutate: Callable[[dict[str, Any]], dict[str, Any]]
                                         ) -> None:
    data = _snapshot_data()
    VirtioDeviceSnapshot.from_json(json.dumps(data))  # the unchanged one is fine
    data.update(mutate(data))
    with pytest.raises(ConfigError):
        VirtioDeviceSnapshot.from_json(json.dumps(data))


def test_restore_checks_the_snapshot_against_the_ram_and_the_view() -> None:
    data = _snapshot_data()
    snap = VirtioDeviceSnapshot.from_json(json.dumps(data))
    with pytest.raises(ConfigError, match="16384 pages"):
        VirtioBalloonDevice.restore(snap, NullRam(2 * PAGES), Guest(0).view)
    small = GuestRamView(bytearray(4096), base_gpa=AREA, guest_bytes=PAGES * 4096)
    with pytest.raises(ConfigError, match="does not map"):  # the rings are not in this view
        VirtioBalloonDevice.restore(snap, NullRam(PAGES), small)


# ------------------------------------------------------------------ huge host pages
HP = HPAGE_PMD_NR


def huge_guest(features: int = 0) -> Guest:
    g = Guest(features, host_page_frames=HP)
    g.ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    return g


def test_half_a_huge_page_ballooned_is_kept_and_counted_never_released() -> None:
    g = huge_guest()
    before = g.ram.resident_bytes()
    g.send_pfns(INFL, list(range(4 * HP, 4 * HP + 256)))
    assert g.dev.inflated_pages == 256 and g.dev.partial_huge_pages == 1
    assert g.ram.release_calls == [] and g.ram.resident_bytes() == before
    # the guest never sends the rest: more doorbells, other pages, still nothing of it goes
    g.send_pfns(INFL, list(range(6 * HP, 7 * HP)))
    assert g.ram.release_calls[-1].tolist() == [[6 * HP, 7 * HP]]
    assert g.dev.partial_huge_pages == 1
    assert g.ram.resident_pages_of(np.arange(4 * HP, 5 * HP)) == HP
    g.send_pfns(INFL, list(range(4 * HP + 256, 5 * HP)))  # it completes: released at once
    assert g.ram.release_calls[-1].tolist() == [[4 * HP, 5 * HP]]
    assert g.dev.partial_huge_pages == 0 and g.dev.counters["huge_pages_released"] == 2


def test_pfns_straddling_a_huge_page_boundary_count_in_both() -> None:
    g = huge_guest()
    g.send_pfns(INFL, list(range(2 * HP - 100, 2 * HP + 100)))
    assert g.dev.partial_huge_pages == 2 and g.ram.release_calls == []
    g.send_pfns(INFL, list(range(HP, 2 * HP - 100)) + list(range(2 * HP + 100, 3 * HP)))
    assert g.ram.release_calls[-1].tolist() == [[HP, 3 * HP]]
    assert g.dev.partial_huge_pages == 0


def test_deflating_part_of_a_released_huge_page_readmits_it_whole() -> None:
    g = huge_guest()
    g.send_pfns(INFL, list(range(0, 2 * HP)))
    g.send_pfns(DEFL, list(range(HP, HP + 64)))
    assert g.ram.readmit_calls[-1].tolist() == [[HP, 2 * HP]]
    assert g.dev.partial_huge_pages == 1 and g.dev.inflated_pages == 2 * HP - 64
    assert g.dev.counters["huge_pages_readmitted"] == 1
    g.send_pfns(INFL, list(range(HP, HP + 64)))  # whole again: released again
    assert g.ram.release_calls[-1].tolist() == [[HP, 2 * HP]]


def test_a_dry_pool_holds_the_deflate_until_memory_is_back() -> None:
    g = huge_guest()
    g.ram.pool = 0  # released pages go to a pool others draw on too
    g.send_pfns(INFL, list(range(0, 2 * HP)))
    assert g.ram.pool == 2
    g.ram.pool = 1  # someone took one of them
    head = g.send_pfns(DEFL, list(range(HP - 8, HP + 8)))
    assert g.used(DEFL) == []  # held: the driver may not use these frames yet
    assert g.dev.counters["deflate_held"] == 1 and g.dev.held_deflates == 1
    assert g.dev.balloon_pfns().tolist() == list(range(0, HP - 8)) + list(range(HP, 2 * HP))
    assert "pool" in (g.dev.host_pages.last_error or "")
    assert g.dev.retry_held() == 0  # still dry
    g.ram.pool = 1  # memory is back: the next doorbell (any queue) finishes it
    g.send_pfns(INFL, [3 * HP])
    assert g.used(DEFL) == [(head, 0)]
    assert g.dev.counters["deflate_held_done"] == 1 and g.dev.held_deflates == 0
    assert g.dev.inflated_pages == 2 * HP - 16 + 1


def test_held_deflates_and_partial_pages_survive_a_snapshot() -> None:
    g = huge_guest()
    g.ram.pool = 0
    g.send_pfns(INFL, list(range(0, 2 * HP)) + list(range(5 * HP, 5 * HP + 10)))
    g.ram.pool = 1
    head = g.send_pfns(DEFL, list(range(0, 2 * HP)))  # one page back, the other held
    snap = VirtioDeviceSnapshot.from_json(g.dev.snapshot().to_json())
    assert [(h.head, h.frames) for h in snap.held_deflates] == [(head, ((HP, 2 * HP),))]
    dev = VirtioBalloonDevice.restore(snap, g.ram, g.view)
    assert dev.partial_huge_pages == 1 and dev.held_deflates == 1
    assert np.array_equal(dev.balloon_pfns(), g.dev.balloon_pfns())
    g.ram.pool = 5
    assert dev.retry_held() == 1 and dev.inflated_pages == 10
    data = snap.model_dump(mode="json")
    data["held_deflates"] = [{"head": head, "frames": [[3 * HP, 3 * HP + 1]]}]
    with pytest.raises(ConfigError, match="not in the balloon"):
        VirtioDeviceSnapshot.from_json(json.dumps(data))


def test_a_reset_never_gives_the_guest_a_frame_the_host_cannot_back() -> None:
    g = huge_guest(F_RESET)
    g.ram.pool = 0
    g.send_pfns(INFL, list(range(0, 2 * HP)))
    g.ram.pool = 1  # someone took one of the two pages it gave back
    head = g.send_pfns(DEFL, list(range(0, 4)))  # page 0 comes back: the deflate is done
    assert g.used(DEFL) == [(head, 0)]
    head = g.send_pfns(DEFL, list(range(HP, HP + 4)))  # the pool is dry: held
    gen = BalloonConfig.decode(g.dev.read_config()).x_reset_generation
    config, readmits = g.irq.config, len(g.ram.readmit_calls)
    # the driver would drop every frame of its balloon and touch page 1: refused, said
    assert g.dev.request_reset() is False
    assert g.dev.counters["reset_refused_unbacked"] == 1
    assert g.dev.counters["readmit_forced_unbacked"] == 0
    assert "pool" in (g.dev.host_pages.last_error or "")
    assert BalloonConfig.decode(g.dev.read_config()).x_reset_generation == gen
    assert g.irq.config == config and not g.dev.reset_pending
    assert g.used(DEFL) == [] and g.dev.held_deflates == 1  # still held
    assert g.dev.inflated_pages == 2 * HP - 4 and g.dev.partial_huge_pages == 1
    assert len(g.ram.readmit_calls) > readmits and g.ram.pool == 0  # tried, nothing kept
    g.ram.pool = 1  # memory is back: the reset goes through, the held deflate with it
    assert g.dev.request_reset() is True
    assert (head, 0) in g.used(DEFL) and g.dev.held_deflates == 0
    assert g.dev.inflated_pages == 0 and g.dev.partial_huge_pages == 0
    assert BalloonConfig.decode(g.dev.read_config()).x_reset_generation == gen + 1
    assert g.dev.counters["readmit_forced_unbacked"] == 0


@pytest.mark.parametrize("target", [3000, 6 * HP, 1])
def test_a_pair_over_huge_pages_keeps_at_most_one_partial_page(target: int) -> None:
    p = virtio_pair(PAGES, host_page_frames=HP)
    p.device.set_target(target)
    p.work(3)
    assert p.check() == [] and p.device.inflated_pages == target
    assert p.device.partial_huge_pages == (1 if target % HP else 0)
    p.device.set_target(target // 3)
    p.work(3)
    assert p.check() == [] and p.device.partial_huge_pages <= 1
    p.device.set_target(0)
    p.work(3)
    assert p.check() == [] and p.device.partial_huge_pages == 0


HugeHost = Callable[[RamKind, int], None]  # the huge_host fixture (conftest.py)


def test_over_real_thp_memory_a_partial_deflate_loses_no_content(huge_host: HugeHost) -> None:
    huge_host(RamKind.THP, PAGES // HP)
    ram = MemfdRam(PAGES, kind=RamKind.THP)
    _partial_deflate_over(ram)
    gc.collect()  # the device's and driver's views of the mapping go first
    ram.close()


def _partial_deflate_over(ram: MemfdRam) -> None:
    mem = GuestMemory(PAGES, store=ram, host_page_frames=HP)
    view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
    dev = VirtioBalloonDevice(ram, view, features=SUPPORTED_FEATURES)
    drv = VirtioBalloonDriver(mem, DirectTransport(dev))
    drv.load(0.0)
    mem.step(1.0, 1.0, Demand(3000, 3000, 1500, 1500, 0.0))  # stamped, real pages
    ram.touch(np.flatnonzero(mem.state == PageState.FREE), mem.generation)  # used, then freed
    held = ram.resident_bytes()
    dev.set_target(5000)  # 9 whole host pages and 392 frames of a tenth
    drv.work(2.0)
    assert dev.inflated_pages == 5000 and dev.partial_huge_pages == 1
    assert held - ram.resident_bytes() == 9 * HP * PAGE_SIZE  # exactly the whole pages
    dev.set_target(4000)  # newest first: the partial page's 392, one released page, 96 more
    drv.work(3.0)
    assert dev.inflated_pages == 4000 and dev.partial_huge_pages == 1
    assert dev.counters["huge_pages_readmitted"] == 2  # one whole, one in part
    mem.step(4.0, 1.0, Demand(6000, 6000, 1500, 1500, 0.0))  # the guest reuses them
    assert mem.verify_contents() == 0  # no page in use lost what was written to it
    used = np.concatenate((mem.anon.to_array(), mem.cache.to_array()))
    assert (ram.stamped_generations(used) >= 0).all()
    dev.set_target(0)
    drv.work(5.0)
    assert dev.partial_huge_pages == 0 and mem.verify_contents() == 0


# found by `memballoon bench fuzz` (target virtio_device): a queue set up again smaller while
# the device held a buffer of its old ring made ``push_used`` raise UsageError out of
# ``request_stats`` (the stats head) and out of ``notify`` (a held deflate, via retry_held)
@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["setup", "stats", "inflate", "deflate", "pool",
                                           "request"]),
                          st.sampled_from([INFL, DEFL, vb.BalloonQueue.STATSQ]),
                          st.integers(0, 7)), max_size=25))
def test_queues_set_up_again_at_any_size_never_make_the_device_raise(
        ops: list[tuple[str, vb.BalloonQueue, int]]) -> None:
    g = huge_guest(F_STATS)
    g.ram.pool = 0
    area = AREA + 0x8000
    for op, role, k in ops:
        idx, _ = g.q[role]
        if op == "setup":  # a new ring elsewhere, of any size up to the device's
            area += 0x1000
            lay = QueueLayout.packed(area, 1 << (k % 4))
            g.q[role] = (idx, DriverQueue(g.view, lay, Counters()))
            g.dev.setup_queue(idx, lay)
        elif op == "pool":
            g.ram.pool = k
        elif op == "request":
            g.dev.request_stats()
            g.dev.retry_held()
        else:  # a buffer on the op's own queue, if that ring has a descriptor free
            target = {"stats": vb.BalloonQueue.STATSQ, "inflate": INFL, "deflate": DEFL}[op]
            _, tq = g.q[target]
            if not tq.num_free or tq.broken:
                continue
            if op == "stats":
                g.view.write(g.buf, encode_stats({StatTag.MEMFREE: k}))
                g.send(target, [(g.buf, 10, False)])
            else:
                pfns = range(k * HP, k * HP + (HP if op == "inflate" else 4))
                g.send_pfns(target, list(pfns))
        ball = g.dev.balloon_pfns()
        assert g.dev.inflated_pages == ball.size
        whole = ball[np.bincount(ball // HP, minlength=PAGES // HP)[ball // HP] == HP]
        assert g.ram.resident_pages_of(whole) == 0  # a whole ballooned host page is released
    snap = VirtioDeviceSnapshot.from_json(g.dev.snapshot().to_json())
    assert VirtioBalloonDevice.restore(snap, g.ram, g.view).inflated_pages == g.dev.inflated_pages


# ------------------------------------------------------------------ rounds in bulk
def test_rounds_in_bulk_only_where_every_frame_goes_through() -> None:
    pair = virtio_pair(65536)
    dev, drv = pair.device, pair.driver
    inflateq, deflateq = 0, 1
    assert dev.can_take_rounds(inflateq) and dev.can_take_rounds(deflateq)
    assert not dev.can_take_rounds(2)  # the stats queue: never in bulk
    dev.pin([100])
    assert not dev.can_take_rounds(inflateq)  # a pinned frame is refused buffer by buffer
    dev.pin([100, 101])
    dev.unpin([100])
    assert not dev.can_take_rounds(inflateq)  # 101 is still pinned
    dev.unpin([101])
    assert dev.can_take_rounds(inflateq)
    dev.pin([100])
    huge = virtio_pair(65536, host_page_frames=512)
    assert not huge.device.can_take_rounds(deflateq)  # a huge page may have to hold a deflate
    q = drv._queues[drv_role(drv, inflateq)]
    with pytest.raises(UsageError, match="outside the guest"):
        dev.take_rounds(inflateq, q, [[(0x100000, 16, False)]], [0], 1,
                        np.array([70000], dtype=np.int64))
    with pytest.raises(UsageError, match="disagree"):  # a deflate of frames not in the balloon
        dev.take_rounds(deflateq, drv._queues[drv_role(drv, deflateq)],
                        [[(0x100000, 16, False)]], [0], 1, np.array([5], dtype=np.int64))


def drv_role(drv: VirtioBalloonDriver, index: int) -> Any:
    return next(role for role, i in drv._qidx.items() if i == index)


# ------------------------------------------------------------------ released memory
def test_buffers_and_rings_in_ballooned_frames_are_refused_never_read() -> None:
    # issue 11: a guest that points a buffer or a ring into its own ballooned frames made the
    # host read them, faulting released memory back in outside the budget
    ram = MemfdRam(8192)
    try:
        _buffers_and_rings_in_the_balloon(ram)
        gc.collect()
    finally:
        ram.close()


def _buffers_and_rings_in_the_balloon(ram: MemfdRam) -> None:
    view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
    dev = VirtioBalloonDevice(ram, view, features=features_of(vb.VIRTIO_BALLOON_F_MUST_TELL_HOST))
    dev.set_driver_features(dev.device_features())
    rings = {INFL: QueueLayout.packed(1000 * PAGE_SIZE, 8),
             DEFL: QueueLayout.packed(1001 * PAGE_SIZE, 8)}
    q = {role: DriverQueue(view, lay, Counters()) for role, lay in rings.items()}
    for i, role in enumerate((INFL, DEFL)):
        dev.setup_queue(i, rings[role])
    ram.touch(np.arange(2000, 2100), 0)

    def send(role: vb.BalloonQueue, buf_pfn: int, pfns: list[int]) -> None:
        data = np.asarray(pfns, dtype="<u4").tobytes()
        view.write(buf_pfn * PAGE_SIZE, data)
        q[role].add([(buf_pfn * PAGE_SIZE, len(data), False)])
        q[role].publish()
        dev.notify(0 if role is INFL else 1)

    send(INFL, 3000, list(range(2000, 2010)))
    assert dev.inflated_pages == 10
    assert not ram.resident_mask(np.arange(2000, 2010)).any()
    # the guest writes its PFN arrays through its own mapping before ballooning their frames:
    # here they are written first, then their frames are released under them
    view.write(2005 * PAGE_SIZE, np.asarray([2001, 2002], dtype="<u4").tobytes())
    view.write(2003 * PAGE_SIZE, np.asarray([2050], dtype="<u4").tobytes())
    ram.release(np.array([[2003, 2004], [2005, 2006]]))
    for role, buf, n in ((DEFL, 2005, 2), (INFL, 2003, 1)):  # PFN arrays in ballooned frames
        q[role].add([(buf * PAGE_SIZE, 4 * n, False)])
        q[role].publish()
        dev.notify(0 if role is INFL else 1)
    assert not ram.resident_mask(np.arange(2000, 2010)).any()  # not read: still released
    assert dev.counters["buffer_in_balloon"] == 2
    assert dev.counters["deflateq_bad_descriptor"] == 1
    assert dev.counters["inflateq_bad_descriptor"] == 1
    assert dev.inflated_pages == 10  # nothing done with either
    # a queue set up again with its rings in the balloon: refused, not read
    assert not dev.setup_queue(1, QueueLayout.packed(2006 * PAGE_SIZE, 8))
    assert dev.counters["setup_ring_in_balloon"] == 1 and 1 in dev.broken_queues
    assert not ram.resident_mask(np.arange(2000, 2010)).any()
    # the frames holding a live queue's rings never go into the balloon
    send(INFL, 3000, [1000, 2060])
    assert dev.counters["inflate_pfn_ring"] == 1
    assert dev.balloon_pfns().tolist() == [*range(2000, 2010), 2060]
    assert ram.resident_mask(np.array([1000])).all()


def test_releases_the_host_fails_are_owed_and_paid_at_the_next_doorbell() -> None:
    # issue 11 item 7: a host so full that its releases fall behind (fallocate refused):
    # the doorbell raises nothing, the balloon holds, the release is paid once the host can
    r = virtio_pair(mib_to_pages(64))

    class Failing:  # the device's RAM, refusing its next release
        fail = 1

        def __getattr__(self, name: str) -> Any:
            return getattr(r.ram, name)

        def release(self, ranges: RangeArray) -> int:
            if self.fail:
                self.fail -= 1
                raise MemballoonError("releasing PFNs: [Errno 5] Input/output error")
            return r.ram.release(ranges)

    r.device.host_pages.ram = Failing()  # type: ignore[assignment]
    r.ram.touch(np.arange(r.ram.guest_pages, dtype=np.int64), 1)  # all of it resident
    r.device.set_target(600)
    r.work()
    assert r.driver.balloon_pages == r.device.inflated_pages == 600
    assert r.device.counters["release_failed"] == 1
    assert r.device.release_owed_pages == 600
    assert r.ram.resident_pages_of(r.device.balloon_pfns()) == 600
    assert r.check() == []  # owed, not lost
    r.device.set_target(900)
    r.work()  # the next doorbell pays what was owed first
    assert r.device.release_owed_pages == 0 and r.device.counters["release_retried"] == 600
    assert r.ram.resident_pages_of(r.device.balloon_pfns()) == 0
    assert r.check() == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=20), st.integers(0, 300 * PAGE_SIZE),
       st.integers(0, 40 * PAGE_SIZE))
def test_the_buffer_guard_finds_exactly_the_buffers_touching_the_balloon(
        ballooned: list[int], gpa: int, length: int) -> None:
    # the guard reads the bitmap through its bytearray (one memchr a buffer): it must agree
    # with the bitmap's frames from the buffer's first to its last byte, inside the guest
    pages = 256
    dev = VirtioBalloonDevice(NullRam(pages), GuestRamView(bytearray(PAGE_SIZE), base_gpa=0,
                                                           guest_bytes=pages * PAGE_SIZE),
                              features=features_of(vb.VIRTIO_BALLOON_F_MUST_TELL_HOST))
    dev._inflated[np.asarray(ballooned, dtype=np.int64)] = True
    dev._inflated_count = int(dev._inflated.sum())
    lo, hi = gpa // PAGE_SIZE, min(-(-(gpa + length) // PAGE_SIZE), pages)
    want = length > 0 and bool(dev._inflated[lo:hi].any())
    assert dev._in_balloon(gpa, length) is want
    assert dev.counters["buffer_in_balloon"] == int(want)


def test_two_held_deflates_of_the_same_frames_give_them_back_once() -> None:
    # found by hypothesis (test_queues_set_up_again_...): with no host memory, two deflates
    # naming the same frames were both held; once memory was back each gave them back, and
    # the device counted them out of the balloon twice
    g = huge_guest(F_STATS)
    g.send_pfns(INFL, list(range(2 * HP, 3 * HP)))
    g.ram.pool = 0  # no host page to back them again
    for _ in range(2):
        g.send_pfns(DEFL, list(range(2 * HP, 2 * HP + 4)))
    assert g.dev.held_deflates == 2
    g.send_pfns(INFL, list(range(0, HP)))  # a host page released: memory for the retries
    g.dev.retry_held()
    assert g.dev.held_deflates == 0
    assert g.dev.inflated_pages == g.dev.balloon_pfns().size == HP + HP - 4


def test_ring_frames_are_marked_and_cleared_by_their_spans_only() -> None:
    """The ring mask is set and cleared span by span (a whole-array write would make a byte
    per guest frame resident: 1.2 GB over the simulator's fleet), and says exactly which
    frames hold the rings of the queues set up now."""
    pair = virtio_pair(mib_to_pages(64))
    dev = pair.device
    spans = list(dev._ring_spans)
    assert spans
    want = np.zeros(dev._guest_pages, dtype=np.bool_)
    for lo, hi in spans:
        want[lo:hi] = True
    assert np.array_equal(dev._rings, want)
    dev.set_driver_features(dev.features)  # a driver starting over: its queues are gone
    assert dev._ring_spans == [] and not dev._rings.any()
