"""The VMware balloon backdoor protocol: commands, statuses, capabilities and a fixed frame codec.

Source: Linux ``drivers/misc/vmw_balloon.c`` (v2.6.34, the seed: protocol version 2, one page
per command; v4.20+: capabilities negotiated at START, batched LOCK/UNLOCK, batches of 2 MiB
pages).

Theory of operation
-------------------
On real hardware one command is one ``inl`` on port ``VMW_BALLOON_HV_PORT`` with registers in
(``eax`` magic, ``ecx`` command, ``ebx`` data) and registers out (``eax`` status, ``ebx``
result). Batched commands pass the guest-physical page of a batch instead, and the host writes
a status into the low bits of each entry. Here the registers and the batch page travel as
bytes, so the driver and the device can sit on either side of a function call or a socket:

request  (little-endian)::

    u32 magic (VMW_BALLOON_HV_MAGIC) | u32 command | u64 data
    batched commands only:  u32 count | count x u64 entry (PFN << 12, low 12 bits 0)
    (``data`` of a batched command is the count, as the real driver passes it in ``esi``;
    an entry of BATCHED_2M_LOCK / BATCHED_2M_UNLOCK names the first frame of a 2 MiB page,
    ``1 << VMW_BALLOON_2M_ORDER`` frames; the codec carries it, the host checks alignment)

response (little-endian)::

    i32 status | u32 count | u64 result
    then ``count`` x u64 entry: PFN << 12 | per-page status in the low 12 bits

The response's ``count`` is 0 except for a batched command the host processed (status
SUCCESS): then it echoes the request's entries with their statuses. A batched command failed
as a whole (CMD_INVALID, RESET, BUSY, ...) answers 0 entries: its status covers every page.
A per-page status is 12 bits wide; FAILURE (-1) is written as 0xFFF.

Decoding is strict and the only exception it raises is ``VmwFrameError`` (a ``FrameError``),
whose ``reason`` names the rule broken (a counter name for whoever caught it) and whose
``status`` is what a host answers to such a frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from memballoon.model.errors import FrameError, UsageError
from memballoon.model.units import PAGE_SHIFT, PFN32_MAX

PfnArray = npt.NDArray[np.int64]
StatusArray = npt.NDArray[np.int32]
_K = TypeVar("_K")
_V = TypeVar("_V")

# The seed's constants (vmw_balloon.c, v2.6.34).
VMW_BALLOON_HV_PORT = 0x5670
VMW_BALLOON_HV_MAGIC = 0x456C6D6F
VMW_BALLOON_PROTOCOL_VERSION = 2
VMW_BALLOON_GUEST_ID = 1  # Linux
#: One 4 KiB page of u64 entries (v4.20+ ``VMW_BALLOON_BATCH_MAX_PAGES``).
VMW_BALLOON_BATCH_MAX_PAGES = (1 << PAGE_SHIFT) // 8
#: A 2 MiB page is 2**9 frames (``PMD_SHIFT - PAGE_SHIFT`` on x86-64).
VMW_BALLOON_2M_ORDER = 9

U64_MAX = (1 << 64) - 1
ENTRY_STATUS_MASK = (1 << PAGE_SHIFT) - 1
ENTRY_PFN_MAX = (1 << (64 - PAGE_SHIFT)) - 1
_FAILURE_ENTRY = ENTRY_STATUS_MASK  # -1 in 12 bits

_REQ = struct.Struct("<IIQ")
_RESP = struct.Struct("<iIQ")
_COUNT = struct.Struct("<I")
REQUEST_HEADER_SIZE = _REQ.size
RESPONSE_HEADER_SIZE = _RESP.size


class Command(IntEnum):
    START = 0
    GET_TARGET = 1
    LOCK = 2
    UNLOCK = 3
    GUEST_ID = 4
    # no command 5
    BATCHED_LOCK = 6
    BATCHED_UNLOCK = 7
    BATCHED_2M_LOCK = 8
    BATCHED_2M_UNLOCK = 9

    @property
    def batched(self) -> bool:
        return self in _BATCHED_COMMANDS


class Status(IntEnum):
    SUCCESS = 0
    FAILURE = -1
    ERROR_CMD_INVALID = 1
    ERROR_PPN_INVALID = 2
    ERROR_PPN_LOCKED = 3
    ERROR_PPN_UNLOCKED = 4
    ERROR_PPN_PINNED = 5
    ERROR_PPN_NOTNEEDED = 6
    ERROR_RESET = 7
    ERROR_BUSY = 8
    #: START's answer from a v4.20+ host: ``result`` holds the granted capabilities.
    SUCCESS_WITH_CAPABILITIES = 0x03000000


# Plain lookups: enum attribute access and Enum(value) are slow on Python 3.11, and the
# version-2 protocol pays them once per page.
_BATCHED_COMMANDS = frozenset((Command.BATCHED_LOCK, Command.BATCHED_UNLOCK,
                               Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK))
_PAGE_COMMANDS = frozenset((Command.LOCK, Command.UNLOCK))
_COMMAND_BY_VALUE = {int(c): c for c in Command}
_STATUS_BY_VALUE = {int(s): s for s in Status}
_SUCCESS = Status.SUCCESS
_SHIFT_U64 = np.uint64(PAGE_SHIFT)
_MASK_U64 = np.uint64(ENTRY_STATUS_MASK)
_ENTRY_PFN_MAX_U64 = np.uint64(ENTRY_PFN_MAX)
#: Statuses a single page of a batch can carry.
_ENTRY_STATUSES = np.array(
    [int(s) for s in Status if s is not Status.SUCCESS_WITH_CAPABILITIES], dtype=np.int32
)


class Capability(IntFlag):
    """START's data and result since Linux 4.20 (bit 0 reserved)."""

    BASIC_CMDS = 1 << 1  # == VMW_BALLOON_PROTOCOL_VERSION: a version-2 peer offers only this
    BATCHED_CMDS = 1 << 2
    BATCHED_2M_CMDS = 1 << 3
    SIGNALLED_WAKEUP_CMD = 1 << 4
    TARGET_64_BIT = 1 << 5  # VMW_BALLOON_64_BIT_TARGET


class VmwFrameError(FrameError):
    """A frame that breaks the codec's rules; ``reason`` is a counter name."""

    def __init__(self, reason: str, detail: str, status: Status = Status.FAILURE) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.status = status


_EMPTY_PFNS: PfnArray = np.empty(0, dtype=np.int64)
_EMPTY_STATUSES: StatusArray = np.empty(0, dtype=np.int32)


def _empty_pfns() -> PfnArray:
    return _EMPTY_PFNS


def _empty_statuses() -> StatusArray:
    return _EMPTY_STATUSES


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One backdoor command. ``pfns`` is the batch of a batched command, else empty."""

    command: Command
    data: int = 0
    pfns: PfnArray = field(default_factory=_empty_pfns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (
            self.command == other.command
            and self.data == other.data
            and np.array_equal(self.pfns, other.pfns)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True, eq=False)
class Response:
    """The host's answer. For a processed batch: ``pfns`` echoed with per-page ``statuses``."""

    status: Status
    result: int = 0
    pfns: PfnArray = field(default_factory=_empty_pfns)
    statuses: StatusArray = field(default_factory=_empty_statuses)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (
            self.status == other.status
            and self.result == other.result
            and np.array_equal(self.pfns, other.pfns)
            and np.array_equal(self.statuses, other.statuses)
        )

    __hash__ = None  # type: ignore[assignment]


# Memos of the single-register messages (frozen, so shareable): a guest sends GET_TARGET
# every period and a version-2 driver a LOCK per page, and building a frozen dataclass costs
# more than the rest of a round trip. Bounded: emptied when full.
_MEMO_MAX = 1 << 12
_requests: dict[tuple[int, int], Request] = {}
_responses: dict[tuple[int, int], Response] = {}
_request_frames: dict[bytes, Request] = {}
_response_frames: dict[bytes, Response] = {}


def _remember(memo: dict[_K, _V], key: _K, value: _V) -> _V:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value
    return value


def scalar_request(command: Command, data: int = 0) -> Request:
    """``Request(command, data)`` for a command without a batch, shared (it is frozen)."""
    req = _requests.get((command, data))
    if req is None:
        req = _remember(_requests, (command, data), Request(command, data))
    return req


def scalar_response(status: Status, result: int = 0) -> Response:
    """``Response(status, result)`` without entries, shared (it is frozen)."""
    resp = _responses.get((status, result))
    if resp is None:
        resp = _remember(_responses, (status, result), Response(status, result))
    return resp


def batch_request(command: Command, pfns: npt.ArrayLike) -> Request:
    """A batched command (4 KiB or 2 MiB pages) of ``pfns`` (data = count)."""
    arr = np.asarray(pfns, dtype=np.int64).reshape(-1)
    return Request(command, int(arr.size), arr)


# ---------------------------------------------------------------------------------- requests
def encode_request(req: Request) -> bytes:
    """The request's frame. Raises ``UsageError`` for a request the codec cannot carry."""
    if not 0 <= req.data <= U64_MAX:
        raise UsageError(f"data {req.data} does not fit u64")
    head = _REQ.pack(VMW_BALLOON_HV_MAGIC, int(req.command), req.data)
    if req.command not in _BATCHED_COMMANDS:
        if req.pfns.size:
            raise UsageError(f"{req.command.name} carries no batch")
        if req.command in _PAGE_COMMANDS and req.data > PFN32_MAX:
            raise UsageError(f"{req.command.name}: PFN {req.data:#x} over 32 bits")
        return head
    n = int(req.pfns.size)
    if n > VMW_BALLOON_BATCH_MAX_PAGES or req.data != n:
        raise UsageError(f"batch of {n} pages with data {req.data}")
    # as u64 a negative PFN is over the maximum too: one comparison checks both bounds
    pfns = np.asarray(req.pfns, dtype=np.int64).view(np.uint64)
    if n and bool((pfns > _ENTRY_PFN_MAX_U64).any()):
        raise UsageError("batch PFN out of range")
    entries = (pfns << _SHIFT_U64).astype("<u8", copy=False)  # no-op on little-endian
    return b"".join((head, _COUNT.pack(n), entries.tobytes()))


def decode_request(frame: bytes) -> Request:
    """Parse a request frame; raises ``VmwFrameError`` on every malformed frame."""
    size = len(frame)
    if size == REQUEST_HEADER_SIZE and type(frame) is bytes:  # no batch: seen before, likely
        known = _request_frames.get(frame)
        if known is not None:
            return known
    if size < REQUEST_HEADER_SIZE:
        raise VmwFrameError("short_frame", f"{size} bytes, header needs {REQUEST_HEADER_SIZE}")
    magic, cmd, data = _REQ.unpack_from(frame)
    if magic != VMW_BALLOON_HV_MAGIC:
        raise VmwFrameError("bad_magic", f"{magic:#x}", Status.ERROR_CMD_INVALID)
    command = _COMMAND_BY_VALUE.get(cmd)
    if command is None:
        raise VmwFrameError("unknown_command", f"{cmd}", Status.ERROR_CMD_INVALID)
    if command not in _BATCHED_COMMANDS:
        if size != REQUEST_HEADER_SIZE:
            raise VmwFrameError("long_frame", f"{command.name} frame of {size} bytes")
        if command in _PAGE_COMMANDS and data > PFN32_MAX:
            raise VmwFrameError(
                "pfn_over_32_bits", f"{command.name} PFN {data:#x}", Status.ERROR_PPN_INVALID
            )
        return _remember(_request_frames, bytes(frame), scalar_request(command, data))
    body = REQUEST_HEADER_SIZE + _COUNT.size
    if size < body:
        raise VmwFrameError("short_frame", f"{command.name} without a count")
    (count,) = _COUNT.unpack_from(frame, REQUEST_HEADER_SIZE)
    if count > VMW_BALLOON_BATCH_MAX_PAGES:
        raise VmwFrameError("count_over_max", f"{count} > {VMW_BALLOON_BATCH_MAX_PAGES}")
    if count != data:
        raise VmwFrameError("count_mismatch", f"count {count}, data {data}")
    want = body + 8 * count
    if size != want:
        raise VmwFrameError("short_frame" if size < want else "long_frame",
                            f"{size} bytes for {count} entries, want {want}")
    entries = np.frombuffer(frame, dtype="<u8", count=count, offset=body)
    if count and bool((entries & _MASK_U64).any()):
        raise VmwFrameError("entry_low_bits", "request entry with low bits set",
                            Status.ERROR_PPN_INVALID)
    pfns: PfnArray = (entries >> _SHIFT_U64).view(np.int64)  # under 2**52: same as a cast
    return Request(command, data, pfns)


# ---------------------------------------------------------------------------------- responses
def encode_response(resp: Response) -> bytes:
    """The response's frame. Raises ``UsageError`` for a response the codec cannot carry."""
    if not 0 <= resp.result <= U64_MAX:
        raise UsageError(f"result {resp.result} does not fit u64")
    n = int(resp.pfns.size)
    if n != resp.statuses.size or n > VMW_BALLOON_BATCH_MAX_PAGES:
        raise UsageError(f"{n} PFNs with {resp.statuses.size} statuses")
    head = _RESP.pack(int(resp.status), n, resp.result)
    if n == 0:
        return head
    codes = (np.asarray(resp.statuses, dtype=np.int64) & ENTRY_STATUS_MASK).view(np.uint64)
    pfns = np.asarray(resp.pfns, dtype=np.int64).view(np.uint64)  # wraps as a cast to u64
    body: bytes = ((pfns << _SHIFT_U64) | codes).astype("<u8", copy=False).tobytes()
    return head + body


def decode_response(frame: bytes, request: Request) -> Response:
    """Parse the answer to ``request``; raises ``VmwFrameError`` on every malformed frame.

    A batched answer must echo the request's PFNs in order (the host writes statuses into the
    batch the guest gave it; it does not choose pages).
    """
    size = len(frame)
    if size == RESPONSE_HEADER_SIZE and type(frame) is bytes:  # no entries: seen before, likely
        known = _response_frames.get(frame)
        if known is not None:
            if known.status is _SUCCESS and request.pfns.size:
                raise VmwFrameError("count_mismatch", "successful batch answered without entries")
            return known
    if size < RESPONSE_HEADER_SIZE:
        raise VmwFrameError("short_frame", f"{size} bytes, header needs {RESPONSE_HEADER_SIZE}")
    raw_status, count, result = _RESP.unpack_from(frame)
    status = _STATUS_BY_VALUE.get(raw_status)
    if status is None:
        raise VmwFrameError("unknown_status", f"{raw_status}")
    want = RESPONSE_HEADER_SIZE + 8 * count
    if size != want:
        raise VmwFrameError("short_frame" if size < want else "long_frame",
                            f"{size} bytes for {count} entries, want {want}")
    if count == 0:
        resp = _remember(_response_frames, bytes(frame), scalar_response(status, result))
        if status is _SUCCESS and request.pfns.size:
            raise VmwFrameError("count_mismatch", "successful batch answered without entries")
        return resp
    if request.command not in _BATCHED_COMMANDS:
        raise VmwFrameError("count_mismatch", f"{request.command.name} answered with entries")
    if count != request.pfns.size:
        raise VmwFrameError("count_mismatch", f"{count} entries for {request.pfns.size} pages")
    if status is not _SUCCESS:
        raise VmwFrameError("count_mismatch", f"entries with batch status {status.name}")
    entries = np.frombuffer(frame, dtype="<u8", count=count, offset=RESPONSE_HEADER_SIZE)
    pfns: PfnArray = (entries >> _SHIFT_U64).view(np.int64)  # under 2**52: same as a cast
    if not bool((pfns == request.pfns).all()):  # as many as the request's (checked above)
        raise VmwFrameError("pfn_mismatch", "batch answer does not echo the request's PFNs")
    low = entries & _MASK_U64
    if not bool(low.any()):  # every page SUCCESS (0): the common answer, nothing to look up
        return Response(status, result, pfns, np.zeros(count, dtype=np.int32))
    codes = low.astype(np.int32)
    codes[codes == _FAILURE_ENTRY] = -1  # Status.FAILURE (a plain int for numpy)
    bad = ~np.isin(codes, _ENTRY_STATUSES)
    if bool(bad.any()):
        raise VmwFrameError("unknown_status", f"page status {int(codes[bad][0])}")
    return Response(status, result, pfns, codes)
