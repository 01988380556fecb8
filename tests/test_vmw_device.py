"""The VMware balloon device: sessions, PFN checks, refusals, RESET, BUSY, batches, RAM."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.harness.pair import vmw_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.host.ram import NullRam
from memballoon.host.vmw_device import VmwBalloonDevice, VmwDeviceSnapshot
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.pages import RangeArray
from memballoon.model.units import HPAGE_PMD_NR
from memballoon.protocol.vmw import (
    VMW_BALLOON_BATCH_MAX_PAGES,
    VMW_BALLOON_HV_MAGIC,
    Capability,
    Command,
    Request,
    Response,
    Status,
    batch_request,
    decode_response,
    encode_request,
)

PAGES = 4096


def send(dev: VmwBalloonDevice, req: Request) -> Response:
    return decode_response(dev.handle(encode_request(req)), req)


def started(*, batched: bool = False, target: int = 100,
            ram: NullRam | None = None) -> tuple[VmwBalloonDevice, NullRam]:
    ram = NullRam(PAGES) if ram is None else ram
    dev = VmwBalloonDevice(ram)
    offer = Capability.BASIC_CMDS | (
        Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS if batched else 0)
    send(dev, Request(Command.START, int(offer)))
    dev.set_target(target)
    return dev, ram


def test_version_2_peer_never_offered_batching() -> None:
    dev = VmwBalloonDevice(NullRam(PAGES), supports_batched=True)
    resp = send(dev, Request(Command.START, 2))
    assert resp.status is Status.SUCCESS and resp.result == 0
    assert dev.capabilities == Capability.BASIC_CMDS
    req = batch_request(Command.BATCHED_LOCK, [10])
    assert send(dev, req).status is Status.ERROR_CMD_INVALID
    assert dev.counters["batch_not_negotiated"] == 1


def test_batched_start_gets_capabilities() -> None:
    dev = VmwBalloonDevice(NullRam(PAGES))
    offer = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
    resp = send(dev, Request(Command.START, int(offer)))
    assert resp.status is Status.SUCCESS_WITH_CAPABILITIES
    assert resp.result == offer  # 2 MiB pages granted with batches
    no_2m = VmwBalloonDevice(NullRam(PAGES), supports_2m=False)
    assert send(no_2m, Request(Command.START, int(offer))).result == (
        Capability.BASIC_CMDS | Capability.BATCHED_CMDS)
    assert send(no_2m, batch_request(Command.BATCHED_2M_LOCK, [0])).status is (
        Status.ERROR_CMD_INVALID)
    assert no_2m.counters["batch_2m_not_negotiated"] == 1
    # 2 MiB pages only come with batches: an offer of 2 MiB pages alone is a version-2 peer
    alone = VmwBalloonDevice(NullRam(PAGES))
    offer_2m = Capability.BASIC_CMDS | Capability.BATCHED_2M_CMDS
    assert send(alone, Request(Command.START, int(offer_2m))).status is Status.SUCCESS
    assert alone.capabilities == Capability.BASIC_CMDS
    old = VmwBalloonDevice(NullRam(PAGES), supports_batched=False)
    assert send(old, Request(Command.START, int(offer))).status is Status.SUCCESS
    assert old.capabilities == Capability.BASIC_CMDS


def test_commands_before_start_answer_reset() -> None:
    dev = VmwBalloonDevice(NullRam(PAGES))
    for req in (Request(Command.GET_TARGET, PAGES), Request(Command.LOCK, 10),
                Request(Command.GUEST_ID, 1)):
        assert send(dev, req).status is Status.ERROR_RESET
    assert dev.counters["cmd_before_start"] == 3
    assert dev.actual_pages == 0


def test_get_target_is_capped_by_the_guest_limit() -> None:
    dev, _ = started(target=5000)
    assert send(dev, Request(Command.GET_TARGET, PAGES)).result == PAGES
    assert dev.guest_limit == PAGES
    dev.set_target(7)
    assert send(dev, Request(Command.GET_TARGET, PAGES)).result == 7
    assert send(dev, Request(Command.GUEST_ID, 1)).status is Status.SUCCESS
    assert dev.guest_id == 1
    with pytest.raises(UsageError):
        dev.set_target(-1)


def test_lock_and_unlock_checks() -> None:
    dev, ram = started(target=2)
    assert send(dev, Request(Command.LOCK, PAGES)).status is Status.ERROR_PPN_INVALID
    assert send(dev, Request(Command.UNLOCK, PAGES + 5)).status is Status.ERROR_PPN_INVALID
    ok = send(dev, Request(Command.LOCK, 10))
    assert ok.status is Status.SUCCESS and ok.result == 2  # the target rides along
    assert send(dev, Request(Command.LOCK, 10)).status is Status.ERROR_PPN_LOCKED
    dev.set_pinned([11])
    assert send(dev, Request(Command.LOCK, 11)).status is Status.ERROR_PPN_PINNED
    assert send(dev, Request(Command.LOCK, 12)).status is Status.SUCCESS
    # at target: the host does not need more
    assert send(dev, Request(Command.LOCK, 13)).status is Status.ERROR_PPN_NOTNEEDED
    assert dev.balloon_pfns().tolist() == [10, 12] and dev.actual_pages == 2
    assert ram.released_pages_total == 2
    assert send(dev, Request(Command.UNLOCK, 13)).status is Status.ERROR_PPN_UNLOCKED
    assert send(dev, Request(Command.UNLOCK, 10)).status is Status.SUCCESS
    assert dev.balloon_pfns().tolist() == [12]
    c = dev.counters
    assert (c["error_ppn_invalid"], c["error_ppn_locked"], c["error_ppn_pinned"],
            c["error_ppn_notneeded"], c["error_ppn_unlocked"]) == (2, 1, 1, 1, 1)


def test_lock_releases_host_memory_and_unlock_readmits() -> None:
    ram = NullRam(PAGES)
    dev = VmwBalloonDevice(ram)
    send(dev, Request(Command.START, 2))
    dev.set_target(10)
    ram.touch(np.arange(100, 110, dtype=np.int64), 1)
    assert ram.resident_bytes() == 10 * 4096
    for pfn in range(100, 105):
        send(dev, Request(Command.LOCK, pfn))
    assert ram.resident_bytes() == 5 * 4096


class RecordingRam(NullRam):
    """NullRam that remembers the ranges it was asked to release and readmit."""

    def __init__(self, guest_pages: int, host_page_frames: int = 1) -> None:
        super().__init__(guest_pages, host_page_frames=host_page_frames)
        self.calls: list[tuple[str, list[list[int]]]] = []

    def release(self, ranges: RangeArray) -> int:
        self.calls.append(("release", ranges.tolist()))
        return super().release(ranges)

    def readmit(self, ranges: RangeArray) -> int:
        self.calls.append(("readmit", ranges.tolist()))
        return super().readmit(ranges)


def test_reset_forgets_every_page_and_answers_next_command() -> None:
    ram = RecordingRam(PAGES)
    dev = VmwBalloonDevice(ram)
    send(dev, Request(Command.START, 2))
    dev.set_target(10)
    send(dev, Request(Command.LOCK, 20))
    send(dev, Request(Command.LOCK, 21))
    dev.request_reset()
    assert dev.actual_pages == 2  # until the guest is told
    assert send(dev, Request(Command.GET_TARGET, PAGES)).status is Status.ERROR_RESET
    assert ram.calls == [("release", [[20, 21]]), ("release", [[21, 22]]),
                         ("readmit", [[20, 22]])]
    assert dev.actual_pages == 0 and dev.balloon_pfns().size == 0
    # the session is gone until the guest starts a new one
    assert send(dev, Request(Command.LOCK, 22)).status is Status.ERROR_RESET
    assert send(dev, Request(Command.START, 2)).status is Status.SUCCESS
    assert send(dev, Request(Command.LOCK, 20)).status is Status.SUCCESS
    assert dev.counters["reset"] == 1 and dev.counters["pages_forgotten"] == 2


def test_start_resets_the_hosts_view() -> None:
    dev, _ = started(target=10)
    send(dev, Request(Command.LOCK, 30))
    dev.request_reset()
    send(dev, Request(Command.START, 2))  # a START is the reset the host asked for
    assert send(dev, Request(Command.GET_TARGET, PAGES)).status is Status.SUCCESS
    send(dev, Request(Command.LOCK, 31))
    send(dev, Request(Command.START, 2))
    assert dev.actual_pages == 0


def test_busy_next() -> None:
    dev, _ = started(target=10)
    dev.busy_next(2)
    assert send(dev, Request(Command.LOCK, 40)).status is Status.ERROR_BUSY
    assert send(dev, Request(Command.START, 2)).status is Status.ERROR_BUSY
    assert send(dev, Request(Command.LOCK, 40)).status is Status.SUCCESS
    assert dev.counters["busy"] == 2


def test_malformed_frames_are_answered_and_counted() -> None:
    dev, _ = started()
    replies = {
        b"": Status.FAILURE,
        b"\x00" * 16: Status.ERROR_CMD_INVALID,  # bad magic
        VMW_BALLOON_HV_MAGIC.to_bytes(4, "little") + (11).to_bytes(4, "little") + bytes(8):
            Status.ERROR_CMD_INVALID,
        VMW_BALLOON_HV_MAGIC.to_bytes(4, "little") + (2).to_bytes(4, "little")
        + (1 << 33).to_bytes(8, "little"): Status.ERROR_PPN_INVALID,
    }
    for frame, status in replies.items():
        resp = decode_response(dev.handle(frame), Request(Command.GET_TARGET, 0))
        assert resp.status is status
    assert dev.counters["frame_short_frame"] == 1
    assert dev.counters["frame_bad_magic"] == 1
    assert dev.counters["frame_unknown_command"] == 1
    assert dev.counters["frame_pfn_over_32_bits"] == 1
    assert dev.actual_pages == 0


def test_every_request_decoding_failure_has_its_counter() -> None:
    dev, _ = started(batched=True)

    def frame(cmd: Command, data: int, *tail: bytes) -> bytes:
        return struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, cmd, data) + b"".join(tail)

    lock = Command.BATCHED_LOCK
    frames = {
        "long_frame": frame(Command.GET_TARGET, 0, b"\0"),
        "count_over_max": frame(lock, 1, struct.pack("<I", VMW_BALLOON_BATCH_MAX_PAGES + 1)),
        "count_mismatch": frame(lock, 2, struct.pack("<IQ", 1, 4096)),
        "entry_low_bits": frame(lock, 1, struct.pack("<IQ", 1, 4096 | 1)),
    }
    for reason, f in frames.items():
        dev.handle(f)
        assert dev.counters[f"frame_{reason}"] == 1, reason
    assert dev.counters.total() == 1 + len(frames)  # START, then only these


def test_batched_lock_statuses_and_one_release() -> None:
    ram = RecordingRam(PAGES)
    dev = VmwBalloonDevice(ram)
    send(dev, Request(Command.START, int(Capability.BASIC_CMDS | Capability.BATCHED_CMDS)))
    dev.set_target(4)
    dev.set_pinned([7])
    send(dev, Request(Command.LOCK, 3))
    req = batch_request(Command.BATCHED_LOCK, [3, PAGES, 7, 4, 5, 5, 6, 8, 9])
    resp = send(dev, req)
    assert resp.status is Status.SUCCESS and resp.result == 4
    assert resp.statuses.tolist() == [
        Status.ERROR_PPN_LOCKED, Status.ERROR_PPN_INVALID, Status.ERROR_PPN_PINNED,
        Status.SUCCESS, Status.SUCCESS, Status.ERROR_PPN_LOCKED, Status.SUCCESS,
        Status.ERROR_PPN_NOTNEEDED, Status.ERROR_PPN_NOTNEEDED,
    ]
    assert dev.balloon_pfns().tolist() == [3, 4, 5, 6]
    assert ram.calls[-1] == ("release", [[4, 7]])  # the accepted pages, coalesced, one call


def test_batched_unlock() -> None:
    dev, _ = started(batched=True, target=10)
    send(dev, batch_request(Command.BATCHED_LOCK, [1, 2, 3]))
    resp = send(dev, batch_request(Command.BATCHED_UNLOCK, [2, 2, 9, PAGES + 1, 3]))
    assert resp.statuses.tolist() == [
        Status.SUCCESS, Status.ERROR_PPN_UNLOCKED, Status.ERROR_PPN_UNLOCKED,
        Status.ERROR_PPN_INVALID, Status.SUCCESS,
    ]
    assert dev.balloon_pfns().tolist() == [1] and dev.actual_pages == 1


def test_2m_lock_checks_whole_pages_and_never_passes_the_target() -> None:
    ram = RecordingRam(PAGES)  # 8 pages of 2 MiB
    dev, _ = started(batched=True, target=2 * 512 + 100, ram=ram)
    dev.set_pinned([5 * 512 + 7])
    send(dev, Request(Command.LOCK, 512 + 3))  # one 4 KiB frame of the second 2 MiB page
    heads = [512, 100, 7 * 512 + 512, 0, 0, 5 * 512, 2 * 512, 3 * 512, 4 * 512]
    resp = send(dev, batch_request(Command.BATCHED_2M_LOCK, heads))
    assert resp.status is Status.SUCCESS and resp.result == 2 * 512 + 100
    assert resp.statuses.tolist() == [
        Status.ERROR_PPN_LOCKED,  # a frame inside is locked
        Status.ERROR_PPN_INVALID,  # not aligned
        Status.ERROR_PPN_INVALID,  # past the guest
        Status.SUCCESS,
        Status.ERROR_PPN_LOCKED,  # given twice
        Status.ERROR_PPN_PINNED,
        Status.SUCCESS,
        Status.ERROR_PPN_NOTNEEDED,  # 1 + 1024 + 512 would pass the target of 1124
        Status.ERROR_PPN_NOTNEEDED,
    ]
    assert dev.actual_pages == 1 + 2 * 512
    # the two accepted pages, one range each (not adjacent), in one release
    assert ram.calls[-1] == ("release", [[0, 512], [1024, 1536]])
    assert dev.counters["cmd_batched_2m_lock"] == 1


def test_2m_pages_unlock_as_2m_only() -> None:
    ram = RecordingRam(PAGES)
    dev, _ = started(batched=True, target=PAGES, ram=ram)
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [0, 512]))
    send(dev, batch_request(Command.BATCHED_LOCK, [1024, 1025]))
    assert dev.actual_pages == 1026
    # a 4 KiB UNLOCK of a frame of a 2 MiB page, single or batched, is refused
    assert send(dev, Request(Command.UNLOCK, 3)).status is Status.ERROR_PPN_UNLOCKED
    resp = send(dev, batch_request(Command.BATCHED_UNLOCK, [513, 1024]))
    assert resp.statuses.tolist() == [Status.ERROR_PPN_UNLOCKED, Status.SUCCESS]
    # a 2 MiB UNLOCK of a page locked as 4 KiB frames, or not locked, is refused too
    resp = send(dev, batch_request(Command.BATCHED_2M_UNLOCK, [1024, 1536, 512, 512, 1]))
    assert resp.statuses.tolist() == [
        Status.ERROR_PPN_UNLOCKED, Status.ERROR_PPN_UNLOCKED, Status.SUCCESS,
        Status.ERROR_PPN_UNLOCKED, Status.ERROR_PPN_INVALID,
    ]
    assert ram.calls[-1] == ("readmit", [[512, 1024]])
    assert dev.balloon_pfns().tolist() == [*range(512), 1025]
    # RESET forgets 2 MiB pages too: the block can be locked again as 4 KiB frames
    dev.request_reset()
    assert send(dev, Request(Command.GET_TARGET, PAGES)).status is Status.ERROR_RESET
    send(dev, Request(Command.START, int(Capability.BASIC_CMDS | Capability.BATCHED_CMDS)))
    assert send(dev, Request(Command.LOCK, 3)).status is Status.SUCCESS
    assert send(dev, Request(Command.UNLOCK, 3)).status is Status.SUCCESS


def test_2m_release_is_deferred_like_4k() -> None:
    ram = RecordingRam(PAGES)
    dev = VmwBalloonDevice(ram, defer_release=True)
    offer = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
    send(dev, Request(Command.START, int(offer)))
    dev.set_target(PAGES)
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [1024, 512]))
    send(dev, batch_request(Command.BATCHED_LOCK, [0]))  # flushes the 2 MiB pages first
    assert ram.calls == [("release", [[512, 1536]])]  # adjacent pages merged
    dev.flush_release()
    assert ram.calls[-1] == ("release", [[0, 1]])


def test_set_pinned_checks_range() -> None:
    dev, _ = started()
    with pytest.raises(UsageError):
        dev.set_pinned([PAGES])


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_handle_never_raises(frame: bytes) -> None:
    dev, _ = started(batched=True, target=PAGES)
    reply = dev.handle(frame)
    assert decode_response(reply, Request(Command.START, 0)).status in set(Status)
    assert dev.actual_pages == int(dev.balloon_pfns().size)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["lock", "unlock", "blk", "bunlk", "2lk", "2unlk"]),
                          st.lists(st.integers(0, PAGES + 10), min_size=1, max_size=20)),
                max_size=20),
       st.integers(0, 64) | st.integers(0, PAGES))
def test_locked_set_matches_released_memory(ops: list[tuple[str, list[int]]], target: int) -> None:
    ram = RecordingRam(PAGES)
    dev, _ = started(batched=True, target=target, ram=ram)
    model: set[int] = set()
    for op, pfns in ops:
        if op in ("2lk", "2unlk"):
            # mostly whole 2 MiB pages, sometimes a misaligned or outside one
            heads = [p * 512 if p % 7 else p for p in pfns]
            cmd = Command.BATCHED_2M_LOCK if op == "2lk" else Command.BATCHED_2M_UNLOCK
            resp = send(dev, batch_request(cmd, heads))
            ok = {f for h, s in zip(heads, resp.statuses.tolist(), strict=True) if s == 0
                  for f in range(h, h + 512)}
            model = model | ok if op == "2lk" else model - ok
            assert dev.actual_pages == len(model) <= max(target, 0)
            continue
        if op == "lock":
            if send(dev, Request(Command.LOCK, pfns[0])).status is Status.SUCCESS:
                model.add(pfns[0])
        elif op == "unlock":
            if send(dev, Request(Command.UNLOCK, pfns[0])).status is Status.SUCCESS:
                model.discard(pfns[0])
        else:
            cmd = Command.BATCHED_LOCK if op == "blk" else Command.BATCHED_UNLOCK
            resp = send(dev, batch_request(cmd, pfns))
            ok = [p for p, s in zip(pfns, resp.statuses.tolist(), strict=True) if s == 0]
            model = model | set(ok) if op == "blk" else model - set(ok)
        assert dev.actual_pages == len(model) <= max(target, 0)
    assert dev.balloon_pfns().tolist() == sorted(model)
    # the host released exactly the balloon's frames: never a frame outside it, never twice
    held: set[int] = set()
    for kind, ranges in ram.calls:
        frames = {f for lo, hi in ranges for f in range(lo, hi)}
        if kind == "release":
            assert not frames & held
            held |= frames
        else:
            assert frames <= held
            held -= frames
    assert held == model


# ------------------------------------------------------------------ snapshots
def _forbid_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def touched(self: NullRam, ranges: RangeArray) -> int:
        raise AssertionError("restore released or readmitted host memory")

    monkeypatch.setattr(NullRam, "release", touched)
    monkeypatch.setattr(NullRam, "readmit", touched)


@pytest.mark.parametrize(("batched", "huge"), [(False, False), (True, False), (True, True)])
def test_snapshot_through_json_restores_the_balloon_and_the_pair_goes_on(
    batched: bool, huge: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = vmw_pair(16384, batched=batched, huge_pages=huge)
    p.device.set_pinned([9000, 9001])
    p.device.set_target(3000)
    p.work()
    assert p.check() == [] and p.device.actual_pages == 3000
    old = p.device
    snap = old.snapshot()
    assert len(snap.locked_2m) == (1 if huge else 0)  # five 2 MiB pages, one run
    assert snap.pinned == ((9000, 9002),)
    text = snap.to_json()
    with monkeypatch.context() as m:
        _forbid_host_memory(m)
        dev = VmwBalloonDevice.restore(VmwDeviceSnapshot.from_json(text), p.ram)
    assert np.array_equal(dev.balloon_pfns(), old.balloon_pfns())
    assert (dev.actual_pages, dev.target_pages) == (old.actual_pages, old.target_pages)
    assert (dev.started, dev.capabilities, dev.guest_id, dev.guest_limit) == (
        old.started, old.capabilities, old.guest_id, old.guest_limit)
    assert dev.snapshot() == snap
    # the driver goes on with the restored device: deflating returns exactly those frames
    balloon = set(old.balloon_pfns().tolist())
    readmitted: set[int] = set()
    real = NullRam.readmit

    def readmit(self: NullRam, ranges: RangeArray) -> int:
        readmitted.update(f for lo, hi in ranges.tolist() for f in range(lo, hi))
        return real(self, ranges)

    monkeypatch.setattr(NullRam, "readmit", readmit)
    p.restart_device()
    assert p.device is not old and p.port.device is p.device and p.check() == []
    p.device.set_target(0)
    p.work(2)
    assert readmitted == balloon and p.driver.balloon_pages == 0
    assert p.check() == []
    p.device.set_target(1000)  # and inflates again, never over a pinned frame
    p.work()
    assert p.device.actual_pages == 1000 and p.check() == []
    assert not set(p.device.balloon_pfns().tolist()) & {9000, 9001}


def test_restore_takes_up_the_session_where_it_stood() -> None:
    ram = RecordingRam(PAGES)
    dev, _ = started(batched=True, target=PAGES, ram=ram)
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [512]))
    send(dev, Request(Command.LOCK, 3))
    dev.busy_next(1)
    dev.request_reset()
    calls = len(ram.calls)
    new = VmwBalloonDevice.restore(VmwDeviceSnapshot.from_json(dev.snapshot().to_json()), ram)
    assert len(ram.calls) == calls  # bookkeeping only
    assert new.started and new.capabilities == dev.capabilities
    assert send(new, Request(Command.GET_TARGET, PAGES)).status is Status.ERROR_BUSY
    assert send(new, Request(Command.GET_TARGET, PAGES)).status is Status.ERROR_RESET
    assert ram.calls[-1] == ("readmit", [[3, 4], [512, 1024]])  # the reset forgets them now
    assert not new.started and new.actual_pages == 0


def test_a_restored_2m_page_still_unlocks_only_as_one() -> None:
    dev, ram = started(batched=True, target=PAGES)
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [1024]))
    new = VmwBalloonDevice.restore(dev.snapshot(), ram)
    assert send(new, Request(Command.UNLOCK, 1025)).status is Status.ERROR_PPN_UNLOCKED
    resp = send(new, batch_request(Command.BATCHED_2M_UNLOCK, [1024]))
    assert resp.statuses.tolist() == [Status.SUCCESS] and new.actual_pages == 0


def test_snapshot_releases_what_a_deferred_lock_accepted() -> None:
    ram = RecordingRam(PAGES)
    dev = VmwBalloonDevice(ram, defer_release=True)
    send(dev, Request(Command.START, int(Capability.BASIC_CMDS | Capability.BATCHED_CMDS)))
    dev.set_target(10)
    send(dev, batch_request(Command.BATCHED_LOCK, [5, 6]))
    assert ram.calls == []
    assert dev.snapshot().locked_4k == ((5, 7),)
    assert ram.calls == [("release", [[5, 7]])]  # released before it is in a snapshot


def _snapshot_json(**change: object) -> str:
    dev, _ = started(batched=True, target=PAGES)
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [0]))
    send(dev, batch_request(Command.BATCHED_LOCK, [600, 601]))
    data = json.loads(dev.snapshot().to_json())
    data.update(change)
    return json.dumps(data)


@pytest.mark.parametrize("change", [
    {"locked_4k": [[600, 700], [650, 800]]},  # overlapping
    {"locked_4k": [[900, 901], [600, 602]]},  # not sorted
    {"locked_4k": [[600, 600]]},  # empty
    {"locked_4k": [[PAGES - 1, PAGES + 1]]},  # past the guest
    {"pinned": [[-1, 3]]},
    {"locked_2m": [[512, 1000]]},  # not whole 2 MiB pages
    {"locked_2m": [[0, 1024]], "locked_4k": [[600, 602]]},  # a frame locked at both sizes
    {"capabilities": 1 << 30},
    {"target_pages": -1},
    {"version": 2},
    {"device": "virtio"},
    {"locked": [[0, 1]]},  # an unknown key
])
def test_malformed_snapshots_are_refused(change: dict[str, object]) -> None:
    VmwDeviceSnapshot.from_json(_snapshot_json())  # the unchanged one is fine
    with pytest.raises(ConfigError):
        VmwDeviceSnapshot.from_json(_snapshot_json(**change))


def test_a_snapshot_restores_only_onto_a_guest_of_its_size() -> None:
    snap = VmwDeviceSnapshot.from_json(_snapshot_json())
    with pytest.raises(ConfigError, match="4096 pages"):
        VmwBalloonDevice.restore(snap, NullRam(2 * PAGES))


# ------------------------------------------------------------------ huge host pages
HP = HPAGE_PMD_NR


def huge_started(target: int = PAGES) -> tuple[VmwBalloonDevice, RecordingRam]:
    ram = RecordingRam(PAGES, HP)
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    dev, _ = started(batched=True, target=target, ram=ram)
    return dev, ram


def test_4k_locks_release_a_huge_page_only_once_it_is_whole() -> None:
    dev, ram = huge_started()
    half = list(range(HP, HP + HP // 2))
    assert (send(dev, batch_request(Command.BATCHED_LOCK, half)).statuses == 0).all()
    assert ram.calls == [] and dev.partial_huge_pages == 1  # kept, counted
    for pfn in range(HP + HP // 2, 2 * HP - 1):
        assert send(dev, Request(Command.LOCK, pfn)).status is Status.SUCCESS
    assert ram.calls == [] and dev.partial_huge_pages == 1
    send(dev, Request(Command.LOCK, 2 * HP - 1))
    assert ram.calls == [("release", [[HP, 2 * HP]])] and dev.partial_huge_pages == 0
    # a 2 MiB page is whole by construction; a 4 KiB UNLOCK in a 4 KiB-locked one reopens it
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [3 * HP]))
    assert ram.calls[-1] == ("release", [[3 * HP, 4 * HP]])
    assert send(dev, Request(Command.UNLOCK, HP + 7)).status is Status.SUCCESS
    assert ram.calls[-1] == ("readmit", [[HP, 2 * HP]]) and dev.partial_huge_pages == 1


def test_pfns_straddling_huge_pages_and_a_snapshot_of_the_partial_ones() -> None:
    dev, ram = huge_started()
    send(dev, batch_request(Command.BATCHED_LOCK, list(range(2 * HP - 200, 2 * HP + 200))))
    assert ram.calls == [] and dev.partial_huge_pages == 2
    restored = VmwBalloonDevice.restore(
        VmwDeviceSnapshot.from_json(dev.snapshot().to_json()), ram)
    assert restored.partial_huge_pages == 2
    send(restored, batch_request(Command.BATCHED_LOCK, list(range(HP, 2 * HP - 200))))
    assert ram.calls == [("release", [[HP, 2 * HP]])] and restored.partial_huge_pages == 1


def test_an_unlock_the_pool_cannot_back_is_busy_and_the_page_stays_locked() -> None:
    dev, ram = huge_started()
    ram.pool = 0
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [0, HP]))
    send(dev, batch_request(Command.BATCHED_LOCK, list(range(2 * HP, 3 * HP))))
    ram.pool = 1  # of the three pages given back, someone took two
    resp = send(dev, batch_request(Command.BATCHED_2M_UNLOCK, [0, HP]))
    assert resp.statuses.tolist() == [Status.SUCCESS, Status.ERROR_BUSY]
    resp = send(dev, batch_request(Command.BATCHED_UNLOCK, [2 * HP, 2 * HP + 1]))
    assert resp.statuses.tolist() == [Status.ERROR_BUSY, Status.ERROR_BUSY]
    assert send(dev, Request(Command.UNLOCK, 2 * HP + 5)).status is Status.ERROR_BUSY
    assert dev.actual_pages == 2 * HP and dev.counters["error_busy"] == 4
    assert dev.balloon_pfns().tolist() == list(range(HP, 3 * HP))
    ram.pool = 2  # memory is back: the same commands now succeed
    assert (send(dev, batch_request(Command.BATCHED_2M_UNLOCK, [HP])).statuses == 0).all()
    assert send(dev, Request(Command.UNLOCK, 2 * HP + 5)).status is Status.SUCCESS
    assert dev.partial_huge_pages == 1


def test_a_reset_is_told_only_once_the_host_can_back_every_page() -> None:
    # the guest pops its whole balloon on ERROR_RESET and touches it at once: with the hugetlb
    # pool dry it would fault into nothing (SIGBUS), so the reset waits for memory
    dev, ram = huge_started()
    ram.pool = 0
    send(dev, batch_request(Command.BATCHED_2M_LOCK, [0, HP]))
    ram.pool = 1  # one of the two pages it gave back was taken by someone else
    dev.request_reset()
    resp = send(dev, Request(Command.GET_TARGET, PAGES))
    assert resp.status is Status.SUCCESS  # answered on its merits: the reset waits
    assert dev.counters["reset_deferred_unbacked"] == 1 and dev.counters["reset"] == 0
    assert dev.counters["readmit_forced_unbacked"] == 0
    assert dev.actual_pages == 2 * HP and ram.pool == 1  # as it was: nothing kept
    ram.pool = 2  # memory is back: the next command tells the guest
    assert send(dev, Request(Command.GET_TARGET, PAGES)).status is Status.ERROR_RESET
    assert dev.actual_pages == 0 and dev.counters["reset"] == 1
    assert dev.counters["readmit_forced_unbacked"] == 0


@pytest.mark.parametrize(("batched", "target"), [(True, 3000), (False, 700), (True, 2 * HP)])
def test_a_pair_over_huge_pages_balloons_whole_blocks(batched: bool, target: int) -> None:
    p = vmw_pair(4 * PAGES, batched=batched, host_page_frames=HP)  # a 64 MiB guest
    p.set_target(target)
    assert p.run_until(lambda q: q.driver.balloon_pages == target, 20)
    assert p.violations == [] and p.device.partial_huge_pages == (1 if target % HP else 0)
    p.set_target(target // 2)
    assert p.run_until(lambda q: q.driver.balloon_pages == target // 2, 20)
    p.set_target(0)
    assert p.run_until(lambda q: q.driver.balloon_pages == 0, 20)
    assert p.violations == [] and p.device.partial_huge_pages == 0


# fuzz property (the long form: `memballoon bench fuzz --target vmw_device`): the host changing
# its mind between any two commands, over 2 MiB host pages from a pool that may run dry
_CMDS = [c for c in Command]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(_CMDS), st.lists(st.integers(0, PAGES // 512 + 1), max_size=6),
              st.integers(0, PAGES + 600)),
    st.tuples(st.sampled_from(["target", "reset", "busy", "pool"]), st.just([]),
              st.integers(0, PAGES))), max_size=30))
def test_every_reply_decodes_for_the_driver_and_the_balloon_stays_released(
        ops: list[tuple[Command | str, list[int], int]]) -> None:
    ram = NullRam(PAGES, host_page_frames=HPAGE_PMD_NR)
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    ram.pool = 0
    dev = VmwBalloonDevice(ram, defer_release=True)
    for op, blocks, n in ops:
        before = dev.actual_pages
        if isinstance(op, Command):
            if op.batched:  # 2 MiB heads, or 4 KiB frames spread over the blocks
                heads = [b * 512 if op in (Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK)
                         else b * 512 + n % 512 for b in blocks]
                req = batch_request(op, heads)
            else:
                req = Request(op, n if op is not Command.START else 0x3E)
            resp = decode_response(dev.handle(encode_request(req)), req)  # never a bad reply
            dev.flush_release()
            if resp.status is Status.SUCCESS and dev.actual_pages > before:
                assert dev.actual_pages <= dev.target_pages  # locks never pass the target
        elif op == "target":
            dev.set_target(n)
        elif op == "reset":
            dev.request_reset()
        elif op == "busy":
            dev.busy_next(n % 3)
        else:
            ram.pool = n % 4
        ball = dev.balloon_pfns()
        assert dev.actual_pages == ball.size and (not ball.size or ball[-1] < PAGES)
        whole = ball[np.bincount(ball // 512, minlength=PAGES // 512)[ball // 512] == 512]
        assert ram.resident_pages_of(whole) == 0  # every whole ballooned host page released


# ------------------------------------------------------------------ runs of single pages
@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, PAGES + 20), max_size=60), st.integers(0, 80),
       st.lists(st.integers(0, PAGES - 1), max_size=5), st.booleans())
def test_a_run_ends_where_its_commands_one_by_one_would_first_fail(
        pfns: list[int], target: int, pinned: list[int], unlock: bool) -> None:
    # lock_run/unlock_run: the state and counters of sending each page alone, up to (not
    # including) the first page that would not be answered SUCCESS
    one, _ = started(target=target)
    run, _ = started(target=target)
    for dev in (one, run):
        dev.set_pinned(pinned)
        if unlock:  # something to unlock: the even pages the run names
            for p in sorted({p for p in pfns if p % 2 == 0 and p < PAGES})[:target]:
                send(dev, Request(Command.LOCK, p))
    arr = np.array(pfns, dtype=np.int64)
    n = run.unlock_run(arr) if unlock else run.lock_run(arr)
    cmd = Command.UNLOCK if unlock else Command.LOCK
    for p in pfns[:n]:
        assert send(one, Request(cmd, p)).status is Status.SUCCESS
    assert state_diff(state_of(one), state_of(run)) == []
    if n < len(pfns):  # the run stopped where a command of its own would not succeed
        assert send(one, Request(cmd, pfns[n])).status is not Status.SUCCESS


def test_runs_stop_for_a_session_that_is_not_plain() -> None:
    dev, ram = started(target=10)
    pfns = np.arange(5, dtype=np.int64)
    dev.busy_next(1)
    assert dev.lock_run(pfns) == 0 and not dev.plain
    send(dev, Request(Command.GET_TARGET, PAGES))  # the busy answer
    assert dev.plain and dev.lock_run(pfns) == 5 and dev.actual_pages == 5
    assert dev.counters["cmd_lock"] == 5 and ram.released_pages_total == 5
    dev.request_reset()
    assert dev.unlock_run(pfns) == 0
    huge, _ = started(target=10, ram=NullRam(PAGES, host_page_frames=HPAGE_PMD_NR))
    assert huge.lock_run(pfns) == 0  # huge host pages: page by page only


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=300, unique=True),
       st.integers(0, 2**16), st.sampled_from(["ascending", "descending", "shuffled"]))
def test_a_batched_unlock_ends_the_same_in_any_order(
        locked: list[int], seed: int, order: str) -> None:
    # a driver's batch is its stack's newest first (descending); the device folds it into
    # the same ranges whatever the order: the same statuses, state, counters and RAM
    rng = np.random.default_rng(seed)
    pfns = np.array(locked, dtype=np.int64)
    give = rng.choice(pfns, int(rng.integers(1, pfns.size + 1)), replace=False)
    give = np.sort(give)
    arranged = {"ascending": give, "descending": give[::-1].copy(),
                "shuffled": rng.permutation(give)}[order]
    ends = []
    for batch in (np.sort(give), arranged):
        dev, ram = started(batched=True, target=PAGES)
        assert not send(dev, batch_request(Command.BATCHED_LOCK, pfns)).statuses.any()
        resp = send(dev, batch_request(Command.BATCHED_UNLOCK, batch))
        assert not resp.statuses.any()
        ends.append(state_of((dev, ram)))
    assert state_diff(ends[0], ends[1]) == []


# ------------------------------------------------------------------ batch fast paths
@settings(max_examples=120, deadline=None)
@given(st.integers(0, PAGES // 512 - 1), st.integers(1, 600), st.integers(0, PAGES + 600),
       st.lists(st.integers(0, PAGES - 1), max_size=4),
       st.lists(st.integers(0, PAGES - 1), max_size=4),
       st.sampled_from(["run", "descending", "repeat", "outside", "scattered"]),
       st.booleans())
def test_a_batch_lock_ends_as_its_page_by_page_checks(
        first: int, n: int, target: int, pinned: list[int], locked: list[int], shape: str,
        huge: bool) -> None:
    # _lock_batch and _lock_batch_2m answer the usual batch (every page granted) in a few
    # numpy calls; the statuses, state, counters and RAM are those of the checked path
    if huge:
        heads = (np.arange(first, first + min(n, 8)) * 512).astype(np.int64)
    else:
        heads = np.arange(first * 512, first * 512 + n, dtype=np.int64)
    pfns = {"run": heads, "descending": heads[::-1].copy(),
            "repeat": np.append(heads, heads[-1]),
            "outside": np.append(heads, PAGES + 512 * 8),
            "scattered": heads[::2].copy()}[shape]
    ends = []
    for checked in (False, True):
        dev, ram = started(batched=True, target=target)
        dev.set_pinned(pinned)
        for p in locked:
            send(dev, Request(Command.LOCK, p))
        if huge:
            st_ = (dev._lock_batch_2m_checked if checked else dev._lock_batch_2m)(pfns)
        else:
            st_ = (dev._lock_batch_checked if checked else dev._lock_batch)(pfns)
        ends.append((st_.tolist(), state_of((dev, ram))))
    assert ends[0][0] == ends[1][0]
    assert state_diff(ends[0][1], ends[1][1]) == []


def test_a_granted_2m_batch_marks_whole_blocks() -> None:
    dev, ram = started(batched=True, target=PAGES)
    heads = np.array([0, 1024, 1536], dtype=np.int64)
    assert not dev._lock_batch_2m(heads).any()
    assert dev.balloon_pfns().tolist() == [*range(512), *range(1024, 2048)]
    assert dev.actual_pages == 3 * 512 and ram.released_pages_total == 3 * 512
    # a second lock of one of them: refused, nothing changes
    assert dev._lock_batch_2m(heads[1:2]).tolist() == [Status.ERROR_PPN_LOCKED]
    assert dev.actual_pages == 3 * 512


@settings(max_examples=120, deadline=None)
@given(st.integers(0, PAGES + 3), st.integers(1, 700), st.integers(0, 800),
       st.lists(st.integers(0, PAGES - 1), max_size=3),
       st.lists(st.integers(0, PAGES - 1), max_size=3), st.booleans(), st.booleans(),
       st.sampled_from(["", "4k", "2m"]))
def test_a_run_of_consecutive_frames_ends_as_its_commands_one_by_one(
        first: int, n: int, target: int, pinned: list[int], locked: list[int],
        descending: bool, unlock: bool, held: str) -> None:
    # lock_run/unlock_run check one run of consecutive frames (the seed driver's usual run:
    # fresh frames ascending, its stack's newest first) with slices of the tables: the same
    # count, state and counters as a command per frame, up to the first that would fail
    pfns = np.arange(first, first + n, dtype=np.int64)
    if descending:
        pfns = pfns[::-1].copy()
    one, _ = started(batched=True, target=target)
    run, _ = started(batched=True, target=target)
    for dev in (one, run):
        dev.set_pinned(pinned)
        for p in locked:
            send(dev, Request(Command.LOCK, p))
        if held == "4k":  # the run's frames locked first, so an unlock run has work
            send(dev, batch_request(Command.BATCHED_LOCK, np.arange(max(first, 0),
                                                                     min(first + n, PAGES))[:512]))
        elif held == "2m":  # a 2 MiB page under the run: never unlocked as 4 KiB frames
            send(dev, batch_request(Command.BATCHED_2M_LOCK, [max(first, 0) // 512 * 512]))
    got = run.unlock_run(pfns) if unlock else run.lock_run(pfns)
    cmd = Command.UNLOCK if unlock else Command.LOCK
    for p in pfns[:got].tolist():
        assert send(one, Request(cmd, p)).status is Status.SUCCESS
    assert state_diff(state_of(one), state_of(run)) == []
    if got < n:  # the run stopped where a command of its own would not succeed
        assert send(one, Request(cmd, int(pfns[got]))).status is not Status.SUCCESS


@settings(max_examples=120, deadline=None)
@given(st.integers(0, PAGES // 512 - 2), st.integers(1, 600), st.integers(0, 599),
       st.sampled_from(["run", "descending", "repeat", "outside", "scattered", "unlocked"]),
       st.booleans())
def test_a_batch_unlock_ends_as_its_page_by_page_checks(
        first: int, n: int, cut: int, shape: str, huge_under: bool) -> None:
    # _unlock_batch answers one run of locked 4 KiB frames (a stack's newest first) with
    # slices; the statuses, state, counters and RAM are those of the checked path
    held = np.arange(first * 512, first * 512 + n, dtype=np.int64)
    pfns = {"run": held, "descending": held[::-1].copy(),
            "repeat": np.append(held, held[-1]), "outside": np.append(held, PAGES + 1),
            "scattered": held[::2].copy(), "unlocked": held + min(cut, n)}[shape]
    ends = []
    for checked in (False, True):
        dev, ram = started(batched=True, target=PAGES)
        send(dev, batch_request(Command.BATCHED_LOCK, held[:512]))
        if len(held) > 512:
            send(dev, batch_request(Command.BATCHED_LOCK, held[512:]))
        if huge_under:  # a 2 MiB page right after: an unlock run reaching it is refused there
            send(dev, batch_request(Command.BATCHED_2M_LOCK, [(first + 2) * 512]))
        st_ = (dev._unlock_batch_checked if checked else dev._unlock_batch)(pfns)
        ends.append((st_.tolist(), state_of((dev, ram))))
    assert ends[0][0] == ends[1][0]
    assert state_diff(ends[0][1], ends[1][1]) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, PAGES + 3), st.integers(1, 700)), min_size=1,
                max_size=6),
       st.booleans(), st.integers(0, 3000),
       st.lists(st.integers(0, PAGES - 1), max_size=3),
       st.lists(st.integers(0, PAGES - 1), max_size=3), st.booleans(), st.booleans())
def test_a_run_of_a_few_runs_ends_as_its_frame_by_frame_reference(
        runs: list[tuple[int, int]], descending: bool, target: int, pinned: list[int],
        locked: list[int], unlock: bool, held: bool) -> None:
    # lock_run/unlock_run check a few runs of consecutive frames (a few blocks' free frames,
    # a stack's newest first) with a slice of the tables each: the same count, state and
    # counters as their frame-by-frame reference and as a command per frame (runs that
    # overlap, touch or reach outside the guest included)
    parts = [np.arange(f, f + n, dtype=np.int64) for f, n in runs]
    pfns = np.concatenate([q[::-1] for q in parts[::-1]] if descending else parts)
    one, _ = started(target=target)
    run, _ = started(target=target)
    ref, _ = started(target=target)
    for dev in (one, run, ref):
        dev.set_pinned(pinned)
        for p in locked:
            send(dev, Request(Command.LOCK, p))
        if held:  # the runs' frames locked first, so an unlock run has work
            for p in sorted({int(p) for p in pfns if 0 <= p < PAGES})[: target // 2]:
                send(dev, Request(Command.LOCK, p))
    cmd = Command.UNLOCK if unlock else Command.LOCK
    if unlock:
        got, want = run.unlock_run(pfns), ref._unlock_run_checked(pfns)
    else:
        got = run.lock_run(pfns)
        want = ref._lock_run_checked(pfns[: max(0, ref.target_pages - ref.actual_pages)])
    assert got == want
    assert state_diff(state_of(ref), state_of(run)) == []
    for p in pfns[:got].tolist():
        assert send(one, Request(cmd, p)).status is Status.SUCCESS
    assert state_diff(state_of(one), state_of(run)) == []
    if got < pfns.size:
        assert send(one, Request(cmd, int(pfns[got]))).status is not Status.SUCCESS
