"""Message framing between a local guest process and the host, over a Unix stream socket.

Frame: ``u32 length`` (little-endian, of what follows) ``| u8 kind | payload``. The decoder is
incremental and does no I/O: feed it bytes as they arrive (one at a time or all at once), take
whole messages out. A frame longer than ``MAX_FRAME`` or of an unknown kind is a ``FrameError``:
the peer is broken or hostile, and the connection is dropped after the error is counted.

Kinds:
    HELLO   guest -> host   JSON: {"v": 1, "guest": name, "protocol": ..., "pages": N}
    VMW     both ways       one VMware backdoor frame (memballoon.protocol.vmw)
    CONFIG  host -> guest   virtio: the device's config space changed (bytes of config)
    STATUS  guest -> host   JSON pressure report (memballoon.protocol.pressure)
    NOTIFY  guest -> host   virtio doorbell without an eventfd: u16 queue index
    BYE     either          orderly close
    VIRTIO        guest -> host   virtio transport request (memballoon.local.transport_virtio)
    VIRTIO_REPLY  host -> guest   its answer
    WAKE          host -> guest   VMware doorbell: the target changed, run the work now
    CONTROL       host -> guest   JSON {"op": ...}: harness requests (touch, verify)
    CONTROL_REPLY guest -> host   JSON answer to the oldest CONTROL
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from memballoon.model.counters import CounterName
from memballoon.model.errors import FrameError

MAX_FRAME = 1 << 20  # 1 MiB: a batched VMware frame is ~4 KiB, a status report < 4 KiB
_HDR = struct.Struct("<IB")


class Kind(IntEnum):
    HELLO = 1
    VMW = 2
    CONFIG = 3
    STATUS = 4
    NOTIFY = 5
    BYE = 6
    VIRTIO = 7
    VIRTIO_REPLY = 8
    WAKE = 9
    CONTROL = 10
    CONTROL_REPLY = 11


class UnexpectedKindCounter(CounterName):
    """Messages of a kind their receiver does not take, one name per ``Kind``: counted by the
    host (in the guest's bag) and by the guest process (in its own)."""

    UNEXPECTED_HELLO = "unexpected_hello"  # a HELLO at a guest
    UNEXPECTED_VMW = "unexpected_vmw"  # a VMW frame from a virtio guest
    UNEXPECTED_CONFIG = "unexpected_config"  # a CONFIG at the host, or at a VMware guest
    UNEXPECTED_STATUS = "unexpected_status"  # a STATUS at a guest
    UNEXPECTED_NOTIFY = "unexpected_notify"  # a NOTIFY from a VMware guest, or at a guest
    UNEXPECTED_BYE = "unexpected_bye"  # none: both ends take BYE
    UNEXPECTED_VIRTIO = "unexpected_virtio"  # a VIRTIO request from a VMware guest, or at a guest
    UNEXPECTED_VIRTIO_REPLY = "unexpected_virtio_reply"  # a VIRTIO_REPLY at the host
    UNEXPECTED_WAKE = "unexpected_wake"  # a WAKE at the host
    UNEXPECTED_CONTROL = "unexpected_control"  # a CONTROL at the host
    UNEXPECTED_CONTROL_REPLY = "unexpected_control_reply"  # a CONTROL_REPLY at a guest


#: The counter of an unexpected message of each kind (every kind has one: this fails at import
#: when a new ``Kind`` has no member above).
UNEXPECTED: Final[Mapping[Kind, UnexpectedKindCounter]] = {
    k: UnexpectedKindCounter(f"unexpected_{k.name.lower()}") for k in Kind
}


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    payload: bytes


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    if len(payload) + 1 > MAX_FRAME:
        raise FrameError(f"message of {len(payload)} bytes exceeds the {MAX_FRAME} byte limit")
    return _HDR.pack(len(payload) + 1, kind) + payload


class Decoder:
    """Incremental decoder: ``feed(data)`` then ``next()`` until it returns None."""

    __slots__ = ("_buf", "broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            raise FrameError("decoder already failed; drop the connection")
        self._buf += data

    def next(self) -> Message | None:
        if len(self._buf) < _HDR.size:
            return None
        length, kind = _HDR.unpack_from(self._buf)
        if length == 0 or length > MAX_FRAME:
            self.broken = True
            raise FrameError(f"frame length {length} outside [1, {MAX_FRAME}]")
        try:
            k = Kind(kind)
        except ValueError:
            self.broken = True
            raise FrameError(f"unknown message kind {kind}") from None
        end = 4 + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[_HDR.size:end])
        del self._buf[:end]
        return Message(k, payload)

    def messages(self, data: bytes) -> list[Message]:
        """Feed ``data`` and return every whole message it completes."""
        self.feed(data)
        out: list[Message] = []
        while (m := self.next()) is not None:
            out.append(m)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
