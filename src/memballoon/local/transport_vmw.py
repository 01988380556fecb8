"""The VMware backdoor over a Unix socket: one ``VMW`` frame out, one ``VMW`` frame back.

On VMware the guest's ``inl`` traps to the monitor and returns with the answer in registers;
here ``SocketBackdoor.call`` sends the request frame (``protocol.vmw``) in a wire ``VMW``
message and blocks for the ``VMW`` reply, so ``guest.vmw_driver`` runs unchanged. The legacy
driver makes one round trip per page (16385 a cycle at its seed cap), so the path is kept
lean: one ``sendall``, one ``select`` + ``recv``, no allocation beyond the frames.

The host side (``VmwHostEndpoint``) hands each frame to the guest's ``VmwBalloonDevice``,
which never raises, and returns the reply frame; with the batched (v4.20+) protocol the host
also rings the guest's doorbell (a ``WAKE`` message: SIGNALLED_WAKEUP_CMD's interrupt) when the
target changes, so the work runs at once instead of at the next poll.
"""

from __future__ import annotations

import socket

from memballoon.host.vmw_device import VmwBalloonDevice
from memballoon.local.link import GuestLink
from memballoon.model.counters import CounterName, Counters
from memballoon.protocol.wire import Kind, encode


class VmwTransportCounter(CounterName):
    """What ``VmwHostEndpoint`` counts (in its device's bag unless given one)."""

    KICK_WITHOUT_DOORBELL = "kick_without_doorbell"  # kicks: the backdoor has no doorbell
    WAKEUPS_SENT = "wakeups_sent"  # WAKE messages sent on a new target (batched protocol)


class SocketBackdoor:
    """The guest's ``Backdoor`` over the host socket; EOF raises ``LinkClosedError``."""

    __slots__ = ("link",)

    def __init__(self, sock: socket.socket | GuestLink) -> None:
        self.link = sock if isinstance(sock, GuestLink) else GuestLink(sock)

    def call(self, request: bytes) -> bytes:
        return self.link.request(Kind.VMW, request, Kind.VMW)


class VmwHostEndpoint:
    """Host side: answers one guest's ``VMW`` frames with its device (a ``HostEndpoint``)."""

    __slots__ = ("counters", "device", "signalled")

    kinds = frozenset({Kind.VMW})
    kick_fds: tuple[int, ...] = ()  # the backdoor is the socket: no doorbells
    irq_fds: tuple[int, ...] = ()
    pending: frozenset[int] = frozenset()  # no queues: every frame is answered at once
    work_bytes = 0  # a frame's work is its message

    def __init__(self, device: VmwBalloonDevice, *, signalled: bool,
                 counters: Counters | None = None) -> None:
        self.device = device
        self.signalled = signalled  # ring the guest's doorbell on a new target (batched)
        self.counters = counters if counters is not None else device.counters

    def handle(self, frame: bytes) -> bytes:
        """The wire message answering one ``VMW`` payload (the device never raises)."""
        return encode(Kind.VMW, self.device.handle(frame))

    def handle_message(self, kind: Kind, payload: bytes) -> bytes | None:
        return self.handle(payload)

    def after_send(self) -> None:
        """Punch the pages of the batch just answered while the guest prepares its next."""
        self.device.flush_release()

    def retry(self) -> None:
        # the VMware driver retries a refused UNLOCK itself, in a later cycle; releases the
        # host failed are ours to retry
        self.device.retry_releases()  # returns at once when nothing is owed

    def kick(self, queue: int) -> None:
        self.counters.inc(VmwTransportCounter.KICK_WITHOUT_DOORBELL)

    def run(self, queue: int, max_chains: int | None = None) -> int:
        return 0

    def set_target(self, pages: int) -> bytes | None:
        """Set the target; returns the wake-up message to send, if the protocol has one."""
        self.device.set_target(pages)
        if self.signalled:
            self.counters.inc(VmwTransportCounter.WAKEUPS_SENT)
            return encode(Kind.WAKE)
        return None
