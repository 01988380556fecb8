"""The VMware backdoor codec: constants pinned to the seed, frame layout, strict decoding."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.errors import FrameError, UsageError
from memballoon.protocol.vmw import (
    REQUEST_HEADER_SIZE,
    RESPONSE_HEADER_SIZE,
    VMW_BALLOON_2M_ORDER,
    VMW_BALLOON_BATCH_MAX_PAGES,
    VMW_BALLOON_GUEST_ID,
    VMW_BALLOON_HV_MAGIC,
    VMW_BALLOON_HV_PORT,
    VMW_BALLOON_PROTOCOL_VERSION,
    Capability,
    Command,
    Request,
    Response,
    Status,
    VmwFrameError,
    batch_request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    scalar_request,
    scalar_response,
)


def test_seed_constants() -> None:
    assert VMW_BALLOON_HV_PORT == 0x5670
    assert VMW_BALLOON_HV_MAGIC == 0x456C6D6F
    assert VMW_BALLOON_PROTOCOL_VERSION == 2
    assert VMW_BALLOON_GUEST_ID == 1
    assert VMW_BALLOON_BATCH_MAX_PAGES == 512
    assert [(c.name, int(c)) for c in Command] == [
        ("START", 0), ("GET_TARGET", 1), ("LOCK", 2), ("UNLOCK", 3), ("GUEST_ID", 4),
        ("BATCHED_LOCK", 6), ("BATCHED_UNLOCK", 7), ("BATCHED_2M_LOCK", 8),
        ("BATCHED_2M_UNLOCK", 9),
    ]
    assert VMW_BALLOON_2M_ORDER == 9  # 2 MiB pages of 512 frames
    assert {s.name: int(s) for s in Status} == {
        "SUCCESS": 0, "FAILURE": -1, "ERROR_CMD_INVALID": 1, "ERROR_PPN_INVALID": 2,
        "ERROR_PPN_LOCKED": 3, "ERROR_PPN_UNLOCKED": 4, "ERROR_PPN_PINNED": 5,
        "ERROR_PPN_NOTNEEDED": 6, "ERROR_RESET": 7, "ERROR_BUSY": 8,
        "SUCCESS_WITH_CAPABILITIES": 0x03000000,
    }


def test_capabilities_and_version_2() -> None:
    assert Capability.BASIC_CMDS == 1 << 1 == VMW_BALLOON_PROTOCOL_VERSION
    assert Capability.BATCHED_CMDS == 1 << 2
    assert Capability.BATCHED_2M_CMDS == 1 << 3
    assert Capability.SIGNALLED_WAKEUP_CMD == 1 << 4
    assert Capability.TARGET_64_BIT == 1 << 5


def test_request_layout() -> None:
    frame = encode_request(Request(Command.LOCK, 0x1234))
    assert frame == struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, 2, 0x1234)
    assert len(frame) == REQUEST_HEADER_SIZE == 16
    frame = encode_request(batch_request(Command.BATCHED_LOCK, [5, 7]))
    assert frame == struct.pack("<IIQIQQ", VMW_BALLOON_HV_MAGIC, 6, 2, 2, 5 << 12, 7 << 12)
    # a 2 MiB batch names the first frame of each 2 MiB page, in the same layout
    frame = encode_request(batch_request(Command.BATCHED_2M_LOCK, [512, 1024]))
    assert frame == struct.pack("<IIQIQQ", VMW_BALLOON_HV_MAGIC, 8, 2, 2, 512 << 12, 1024 << 12)


def test_response_layout() -> None:
    req = batch_request(Command.BATCHED_UNLOCK, [9, 10])
    resp = Response(Status.SUCCESS, 77, req.pfns, np.array([0, -1], dtype=np.int32))
    frame = encode_response(resp)
    assert frame == struct.pack("<iIQQQ", 0, 2, 77, 9 << 12, (10 << 12) | 0xFFF)
    assert len(encode_response(Response(Status.ERROR_RESET))) == RESPONSE_HEADER_SIZE
    assert decode_response(frame, req) == resp


def _reason(frame: bytes) -> str:
    with pytest.raises(VmwFrameError) as info:
        decode_request(frame)
    return info.value.reason


def test_request_rejections() -> None:
    good = encode_request(Request(Command.GET_TARGET, 4096))
    assert _reason(good[:10]) == "short_frame"
    assert _reason(good + b"\0") == "long_frame"
    assert _reason(struct.pack("<IIQ", 0xDEADBEEF, 1, 0)) == "bad_magic"
    assert _reason(struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, 5, 0)) == "unknown_command"
    assert _reason(struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, 99, 0)) == "unknown_command"
    over = struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, Command.LOCK, 1 << 32)
    with pytest.raises(VmwFrameError) as info:
        decode_request(over)
    assert info.value.reason == "pfn_over_32_bits"
    assert info.value.status is Status.ERROR_PPN_INVALID
    unlock_ok = struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, Command.UNLOCK, (1 << 32) - 1)
    assert decode_request(unlock_ok).data == (1 << 32) - 1
    head = struct.pack("<IIQ", VMW_BALLOON_HV_MAGIC, Command.BATCHED_LOCK, 2)
    assert _reason(head) == "short_frame"
    assert _reason(head + struct.pack("<IQ", 2, 1 << 12)) == "short_frame"
    assert _reason(head + struct.pack("<IQQQ", 2, 1 << 12, 2 << 12, 0)) == "long_frame"
    assert _reason(head + struct.pack("<IQ", 1, 1 << 12)) == "count_mismatch"
    assert _reason(head + struct.pack("<IQQ", 2, 1 << 12, (2 << 12) | 3)) == "entry_low_bits"
    big = struct.pack("<IIQI", VMW_BALLOON_HV_MAGIC, Command.BATCHED_LOCK, 513, 513)
    assert _reason(big + bytes(8 * 513)) == "count_over_max"


def test_batch_pfns_may_exceed_32_bits() -> None:
    req = batch_request(Command.BATCHED_LOCK, [1 << 40])
    assert decode_request(encode_request(req)) == req


def test_response_rejections() -> None:
    lock = Request(Command.LOCK, 3)
    batch = batch_request(Command.BATCHED_LOCK, [3, 4])
    ok = encode_response(Response(Status.SUCCESS))
    cases = [
        (ok[:8], lock, "short_frame"),
        (ok + b"\0", lock, "long_frame"),
        (struct.pack("<iIQ", 42, 0, 0), lock, "unknown_status"),
        (struct.pack("<iIQQ", 0, 1, 0, 3 << 12), lock, "count_mismatch"),
        (struct.pack("<iIQ", 0, 0, 0), batch, "count_mismatch"),
        (struct.pack("<iIQQ", 0, 1, 0, 3 << 12), batch, "count_mismatch"),
        (struct.pack("<iIQQQ", 7, 2, 0, 3 << 12, 4 << 12), batch, "count_mismatch"),
        (struct.pack("<iIQQQ", 0, 2, 0, 3 << 12, 5 << 12), batch, "pfn_mismatch"),
        (struct.pack("<iIQQQ", 0, 2, 0, 3 << 12, (4 << 12) | 0x123), batch, "unknown_status"),
        (struct.pack("<iIQQQ", 0, 2, 0, 3 << 12, 4 << 12)[:-1], batch, "short_frame"),
    ]
    for frame, req, reason in cases:
        with pytest.raises(VmwFrameError) as info:
            decode_response(frame, req)
        assert info.value.reason == reason, (frame, reason)
    # a failed batch answers without entries: its status covers every page
    assert decode_response(encode_response(Response(Status.ERROR_BUSY)), batch).status is (
        Status.ERROR_BUSY
    )


def test_encode_refuses_what_the_frame_cannot_carry() -> None:
    with pytest.raises(UsageError):
        encode_request(Request(Command.LOCK, 1 << 32))
    with pytest.raises(UsageError):
        encode_request(Request(Command.GET_TARGET, -1))
    with pytest.raises(UsageError):
        encode_request(batch_request(Command.BATCHED_LOCK, np.arange(513)))
    with pytest.raises(UsageError):
        encode_request(Request(Command.BATCHED_LOCK, 3, np.arange(2, dtype=np.int64)))
    with pytest.raises(UsageError):
        encode_response(Response(Status.SUCCESS, 0, np.arange(2, dtype=np.int64)))


# ------------------------------------------------------------------ properties
_u64 = st.integers(0, (1 << 64) - 1)
_single = st.builds(
    Request,
    st.sampled_from([Command.START, Command.GET_TARGET, Command.GUEST_ID]),
    _u64,
) | st.builds(Request, st.sampled_from([Command.LOCK, Command.UNLOCK]), st.integers(0, 2**32 - 1))
_batch = st.builds(
    batch_request,
    st.sampled_from([c for c in Command if c.batched]),
    st.lists(st.integers(0, (1 << 52) - 1), max_size=VMW_BALLOON_BATCH_MAX_PAGES),
)
_entry_status = st.sampled_from([s for s in Status if s is not Status.SUCCESS_WITH_CAPABILITIES])


@given(_single | _batch)
def test_request_round_trip(req: Request) -> None:
    assert decode_request(encode_request(req)) == req


@given(_batch, st.data())
def test_batch_response_round_trip(req: Request, data: st.DataObject) -> None:
    codes = data.draw(st.lists(_entry_status, min_size=req.pfns.size, max_size=req.pfns.size))
    resp = Response(Status.SUCCESS, data.draw(_u64), req.pfns, np.array(codes, dtype=np.int32))
    assert decode_response(encode_response(resp), req) == resp


@given(_single, st.sampled_from(list(Status)), _u64)
def test_single_response_round_trip(req: Request, status: Status, result: int) -> None:
    resp = Response(status, result)
    assert decode_response(encode_response(resp), req) == resp


@settings(max_examples=300)
@given(st.binary(max_size=64) | st.binary(min_size=16, max_size=4200))
def test_random_bytes_only_frame_error(frame: bytes) -> None:
    for attempt in (lambda: decode_request(frame),
                    lambda: decode_response(frame, Request(Command.LOCK, 1)),
                    lambda: decode_response(frame, batch_request(Command.BATCHED_LOCK, [0, 1]))):
        with contextlib.suppress(FrameError):
            attempt()


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), _u64, st.binary(max_size=64))
def test_random_headers_only_frame_error(magic: int, cmd: int, data: int, tail: bytes) -> None:
    frame = struct.pack("<IIQ", magic, cmd, data) + tail
    try:
        req = decode_request(frame)
    except FrameError:
        return
    assert encode_request(req) == frame  # whatever decodes re-encodes to the same bytes


# fuzz properties (the long form: `memballoon bench fuzz --target vmw_frame --target vmw_reply`)
@settings(max_examples=100)
@given(st.sampled_from([c for c in Command if c.batched]), st.data())
def test_batch_frames_decode_to_exactly_their_encoding_or_a_frame_error(
        cmd: Command, data: st.DataObject) -> None:
    pfns = data.draw(st.lists(st.integers(0, (1 << 52) - 1), max_size=12))
    low = data.draw(st.lists(st.integers(0, 0xFFF), min_size=len(pfns), max_size=len(pfns))
                    | st.just([0] * len(pfns)))
    count = data.draw(st.just(len(pfns)) | st.integers(0, 600))
    word = data.draw(st.just(count) | _u64)
    frame = struct.pack("<IIQI", VMW_BALLOON_HV_MAGIC, cmd, word, count) + b"".join(
        struct.pack("<Q", p << 12 | lo) for p, lo in zip(pfns, low, strict=True)) + data.draw(
        st.binary(max_size=9) | st.just(b""))
    try:
        req = decode_request(frame)
    except FrameError:
        return
    assert encode_request(req) == frame and req.data == req.pfns.size == count


@settings(max_examples=100)
@given(_batch | _single, st.integers(-(2**31), 2**31 - 1), _u64, st.data())
def test_a_reply_the_driver_takes_is_exactly_its_encoding(req: Request, status: int,
                                                          result: int,
                                                          data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, 0xFFF), min_size=req.pfns.size,
                               max_size=req.pfns.size) | st.just([0] * req.pfns.size))
    entries = b"".join(struct.pack("<Q", int(p) << 12 | c)
                       for p, c in zip(req.pfns.tolist(), codes, strict=True))
    count = data.draw(st.just(req.pfns.size) | st.integers(0, 8))
    frame = struct.pack("<iIQ", status, count, result) + data.draw(
        st.just(entries) | st.binary(max_size=40))
    try:
        resp = decode_response(frame, req)
    except FrameError:
        return
    assert encode_response(resp) == frame
    assert not resp.pfns.size or np.array_equal(resp.pfns, req.pfns)


def test_scalar_messages_are_shared_and_decode_the_same_every_time() -> None:
    # GET_TARGET every period, a LOCK per page: the messages without a batch are memoized
    # (they are frozen), and a memo never lets a frame through that the codec refuses
    assert scalar_request(Command.GET_TARGET, 7) is scalar_request(Command.GET_TARGET, 7)
    assert scalar_request(Command.LOCK, 7) == Request(Command.LOCK, 7)
    assert scalar_response(Status.SUCCESS, 9) is scalar_response(Status.SUCCESS, 9)
    assert scalar_response(Status.ERROR_BUSY) == Response(Status.ERROR_BUSY)
    frame = encode_request(Request(Command.GET_TARGET, 4096))
    first, again = decode_request(frame), decode_request(bytes(frame))
    assert first is again and first == Request(Command.GET_TARGET, 4096)
    assert decode_request(bytearray(frame)) == first  # a frame that is not bytes: no memo
    lock = Request(Command.LOCK, 3)
    ok = encode_response(Response(Status.SUCCESS, 5))
    assert decode_response(ok, lock) is decode_response(ok, lock)
    batch = batch_request(Command.BATCHED_LOCK, [1, 2])
    for _ in range(2):  # the memoized answer is still refused for a batch
        with pytest.raises(VmwFrameError, match="count_mismatch"):
            decode_response(ok, batch)
    with pytest.raises(VmwFrameError, match="bad_magic"):
        decode_request(b"\0" * REQUEST_HEADER_SIZE)
