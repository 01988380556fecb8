"""virtio between processes: rings in the guest's memfd, doorbells and interrupts as eventfds.

Theory of operation
-------------------
What virtio-pci carries in its common config, notify and ISR regions (VIRTIO 1.2 section 4.1)
travels three ways here, as a VMM like QEMU or Firecracker does it with KVM's ioeventfd and
irqfd:

- the rings and buffers stay in guest RAM: the guest's ``GuestRamView`` covers its whole memfd
  mapping, the host's device reads the same memory through the host's own mapping;
- feature negotiation, queue set-up and config reads are request/reply messages on the Unix
  socket (wire kinds ``VIRTIO`` / ``VIRTIO_REPLY``); config writes (``actual``) are one-way;
  config changes are pushed by the host as ``CONFIG`` messages carrying the whole config space,
  so the guest keeps a copy and reads it without a round trip (the config-change interrupt);
- one doorbell eventfd per queue (the guest writes, the host's event loop reads it and runs the
  device for that queue in the guest's turn, ``run``: the ioeventfd) and one interrupt eventfd
  per queue (the host writes after it used buffers, the guest ``wait`` polls it with a
  timeout, the irqfd).

The eventfds and the memfd reach the guest by inheritance (``subprocess`` ``pass_fds``), their
numbers on its command line; the socket likewise (one end of a ``socketpair``).

``wait`` lets the guest run ahead of the device: on the inflate and deflate queues it returns
as soon as fewer than ``pipeline_depth`` buffers are in flight (read from the rings' own
indexes), so the guest fills the next PFN array while the host punches the last one; the
transport contract allows an early return, the driver takes only what the used ring shows.
``drain`` waits until nothing is in flight, for the runtime to finish a work call's tail.

Request payload: ``u8 op`` then the op's little-endian arguments; reply: ``u8 status`` (0 ok)
then data. Everything from the guest is untrusted on the host: a malformed request is
counted and answered ``REPLY_BAD``, never raised; the device checks everything else.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Final

from memballoon.guest.virtio_driver import PFN_SLOTS
from memballoon.host.virtio_device import VirtioBalloonDevice
from memballoon.local.link import GuestLink
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import PeerError, UsageError
from memballoon.protocol.virtio_balloon import CONFIG_BYTES, CONFIG_X_BYTES
from memballoon.protocol.virtio_transport import ConfigHandler, UsedHandler
from memballoon.protocol.virtqueue import GuestRamView, QueueLayout
from memballoon.protocol.wire import Kind, encode

#: Queues a balloon can have (inflate, deflate, stats, free page hint, reporting): one doorbell
#: and one interrupt eventfd each.
MAX_QUEUES: Final = 5
#: inflateq and deflateq: the queues the guest may run ahead on.
PIPELINED_QUEUES: Final = frozenset({0, 1})
DEFAULT_PIPELINE_DEPTH: Final = PFN_SLOTS
#: Used buffers an inflate/deflate interrupt may wait for while the device still has chains
#: to pop on that queue (the host runs it a few chains a call): one interrupt when the queue
#: is drained or this many chains are used, not one per call. Half the guest's PFN buffers:
#: it refills that half while the device works through the other.
IRQ_COALESCE_CHAINS: Final = PFN_SLOTS // 2
#: A wait gives up after this long (the device answers in well under a millisecond; this only
#: bounds a hung host, whose death the socket reports anyway).
WAIT_TIMEOUT_S: Final = 5.0

REPLY_OK: Final = 0
REPLY_BAD: Final = 1

_ONE: Final = (1).to_bytes(8, "little")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SETUP = struct.Struct("<HIQQQ")
_IDX_MASK: Final = 0xFFFF


class VirtioOp(IntEnum):
    GET_FEATURES = 1  # -> u64
    SET_FEATURES = 2  # u64 -> ack
    QUEUE_MAX = 3  # u16 queue -> u32 size
    SETUP_QUEUE = 4  # u16 queue, u32 size, u64 desc, u64 avail, u64 used -> ack
    READ_CONFIG = 5  # -> config bytes
    WRITE_CONFIG = 6  # u32 offset, data (no reply)


def make_eventfds(n: int = MAX_QUEUES) -> list[int]:
    """``n`` non-blocking, close-on-exec eventfds (hand them over with ``pass_fds``)."""
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def _drain_eventfd(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class VirtioTransportCounter(CounterName):
    """What the virtio transport counts: the guest's end (``LocalVirtioTransport``, in its link's
    bag) and the host's (``VirtioHostEndpoint``, in its device's bag unless given one)."""

    VIRTIO_REQUEST_REFUSED = "virtio_request_refused"  # guest: requests the host refused
    VIRTIO_REPLY_MALFORMED = "virtio_reply_malformed"  # guest: replies of the wrong length
    CONFIG_PUSH_MALFORMED = "config_push_malformed"  # guest: config of a wrong length (ignored)
    CONFIG_INTERRUPTS = "config_interrupts"  # guest: config changes the host pushed
    USED_INTERRUPTS = "used_interrupts"  # guest: used-buffer interrupts taken
    WAIT_TIMEOUT = "wait_timeout"  # guest: waits for used buffers that timed out
    IRQ_WRITE_FAILED = "irq_write_failed"  # host: interrupt eventfd writes that failed
    DOORBELLS = "doorbells"  # host: doorbell eventfds that woke the device
    DOORBELLS_SPURIOUS = "doorbells_spurious"  # host: of those, ones with nothing written
    NOTIFY_MALFORMED = "notify_malformed"  # host: NOTIFY messages of the wrong length
    NOTIFY_MESSAGES = "notify_messages"  # host: doorbells rung by a NOTIFY message
    # host: SETUP_QUEUE for a queue without eventfds (refused)
    SETUP_QUEUE_WITHOUT_EVENTFD = "setup_queue_without_eventfd"
    VIRTIO_REQUEST_MALFORMED = "virtio_request_malformed"  # host: unknown op or bad length


# ====================================================================== guest side
class LocalVirtioTransport:
    """The guest driver's ``VirtioTransport`` to a device in the host process."""

    def __init__(
        self,
        link: GuestLink,
        ram: GuestRamView,
        kick_fds: Sequence[int],
        irq_fds: Sequence[int],
        *,
        pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
        wait_timeout_s: float = WAIT_TIMEOUT_S,
    ) -> None:
        if len(kick_fds) != len(irq_fds) or not kick_fds:
            raise UsageError("one doorbell and one interrupt eventfd per queue")
        if pipeline_depth < 1:
            raise UsageError("pipeline_depth must be >= 1")
        self.link = link
        self._ram = ram
        self.kick_fds = list(kick_fds)
        self.irq_fds = list(irq_fds)
        self.pipeline_depth = pipeline_depth
        self.wait_timeout_s = wait_timeout_s
        self.counters = link.counters
        self._layouts: dict[int, QueueLayout] = {}
        self._polls: dict[int, select.poll] = {}
        self._config: bytearray | None = None
        self._driver_writes: dict[int, bytes] = {}
        self._on_config: ConfigHandler | None = None
        self._on_used: UsedHandler | None = None
        #: set when the host pushed a config change; the runtime clears it and runs the work
        self.config_pending = False
        link.handlers[Kind.CONFIG] = self._config_pushed

    # -------------------------------------------------------------- requests
    def _request(self, op: VirtioOp, args: bytes = b"") -> bytes:
        reply = self.link.request(Kind.VIRTIO, bytes([op]) + args, Kind.VIRTIO_REPLY)
        if not reply or reply[0] != REPLY_OK:
            self.counters.inc(VirtioTransportCounter.VIRTIO_REQUEST_REFUSED)
            raise PeerError(f"host refused {op.name}")
        return reply[1:]

    def _u(self, s: struct.Struct, data: bytes, what: str) -> int:
        if len(data) != s.size:
            self.counters.inc(VirtioTransportCounter.VIRTIO_REPLY_MALFORMED)
            raise PeerError(f"{what}: {len(data)} bytes, want {s.size}")
        return int(s.unpack(data)[0])

    @property
    def ram(self) -> GuestRamView:
        return self._ram

    def device_features(self) -> int:
        return self._u(_U64, self._request(VirtioOp.GET_FEATURES), "features")

    def set_driver_features(self, features: int) -> None:
        self._request(VirtioOp.SET_FEATURES, _U64.pack(features))

    def queue_max_size(self, queue: int) -> int:
        if not 0 <= queue < len(self.kick_fds):
            return 0  # no doorbell for it: as good as no queue
        return self._u(_U32, self._request(VirtioOp.QUEUE_MAX, _U16.pack(queue)), "queue size")

    def setup_queue(self, queue: int, layout: QueueLayout) -> None:
        if not 0 <= queue < len(self.kick_fds):
            raise UsageError(f"queue {queue}: no doorbell eventfd")
        self._request(VirtioOp.SETUP_QUEUE, _SETUP.pack(
            queue, layout.size, layout.desc_gpa, layout.avail_gpa, layout.used_gpa))
        self._layouts[queue] = layout
        p = select.poll()
        p.register(self.irq_fds[queue], select.POLLIN)
        p.register(self.link.fileno(), select.POLLIN)
        self._polls[queue] = p

    def read_config(self) -> bytes:
        if self._config is None:
            data = self._request(VirtioOp.READ_CONFIG)
            self._apply_config(data)
        else:
            self.link.pump(0.0)  # apply any pushed change first
        assert self._config is not None
        return bytes(self._config)

    def write_config(self, offset: int, data: bytes) -> None:
        self._driver_writes[offset] = bytes(data)
        if self._config is not None and offset >= 0 and offset + len(data) <= len(self._config):
            self._config[offset : offset + len(data)] = data
        self.link.send(Kind.VIRTIO, bytes([VirtioOp.WRITE_CONFIG]) + _U32.pack(offset) + data)

    def _apply_config(self, data: bytes) -> bool:
        if len(data) not in (CONFIG_BYTES, CONFIG_X_BYTES):
            self.counters.inc(VirtioTransportCounter.CONFIG_PUSH_MALFORMED)
            return False
        cfg = bytearray(data)
        # what we wrote may not have reached the host when it pushed: ours wins
        for off, val in self._driver_writes.items():
            if off + len(val) <= len(cfg):
                cfg[off : off + len(val)] = val
        self._config = cfg
        return True

    def _config_pushed(self, payload: bytes) -> None:
        if self._apply_config(payload):
            self.counters.inc(VirtioTransportCounter.CONFIG_INTERRUPTS)
            self.config_pending = True
            if self._on_config is not None:
                self._on_config()

    # -------------------------------------------------------------- doorbells and interrupts
    def notify(self, queue: int) -> None:
        os.write(self.kick_fds[queue], _ONE)

    def in_flight(self, queue: int) -> int:
        """Buffers made available on ``queue`` and not yet used (from the rings themselves)."""
        lay = self._layouts.get(queue)
        if lay is None:
            return 0
        v = self._ram
        return (v.read_u16(lay.avail_gpa + 2) - v.read_u16(lay.used_gpa + 2)) & _IDX_MASK

    def _block(self, queue: int, timeout_s: float) -> None:
        """Sleep until the queue's interrupt or a host message (or the timeout)."""
        events = self._polls[queue].poll(max(0, int(timeout_s * 1000)) + 1)
        for fd, _ in events:
            if fd == self.link.fileno():
                self.link.pump(0.0)
            elif _drain_eventfd(fd):
                self.counters.inc(VirtioTransportCounter.USED_INTERRUPTS)
                if self._on_used is not None:
                    self._on_used(queue)

    def wait(self, queue: int, *, depth: int | None = None,
             timeout_s: float | None = None) -> bool:
        """Block until fewer than ``depth`` buffers are in flight on ``queue``; False if the
        timeout came first (the host holds them).

        ``depth`` defaults to ``pipeline_depth`` on inflateq/deflateq and 1 elsewhere."""
        if queue not in self._layouts:
            return True
        if depth is None:
            depth = self.pipeline_depth if queue in PIPELINED_QUEUES else 1
        budget = self.wait_timeout_s if timeout_s is None else timeout_s
        deadline: float | None = None
        while self.in_flight(queue) >= depth:
            now = time.monotonic()
            if deadline is None:
                deadline = now + budget
            elif now >= deadline:
                self.counters.inc(VirtioTransportCounter.WAIT_TIMEOUT)
                return False
            self._block(queue, deadline - now)
        return True

    def wait_idle(self, queue: int) -> None:
        """Block until nothing is in flight on ``queue`` (or the wait timeout)."""
        self.wait(queue, depth=1)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is in flight on inflateq and deflateq; returns whether so."""
        for q in sorted(PIPELINED_QUEUES & set(self._layouts)):
            self.wait(q, depth=1, timeout_s=timeout_s)
        return all(self.in_flight(q) == 0 for q in PIPELINED_QUEUES)

    def set_interrupt_handlers(self, config_changed: ConfigHandler, used: UsedHandler) -> None:
        self._on_config = config_changed
        self._on_used = used


# ====================================================================== host side
class VirtioHostEndpoint:
    """Host side: one guest's ``VirtioBalloonDevice`` behind its socket and eventfds.

    It is the device's ``InterruptSink``: a used buffer writes the queue's interrupt eventfd,
    a config change sends the whole config space to the guest with ``send``.
    """

    kinds = frozenset({Kind.VIRTIO, Kind.NOTIFY})

    def __init__(
        self,
        device: VirtioBalloonDevice,
        kick_fds: Sequence[int],
        irq_fds: Sequence[int],
        send: Callable[[bytes], None],
        *,
        counters: Counters | None = None,
    ) -> None:
        self.device = device
        self.kick_fds = list(kick_fds)
        self.irq_fds = list(irq_fds)
        self.send = send
        self.counters = counters if counters is not None else device.counters
        #: queues whose doorbell rang and whose chains the device has not all popped yet
        self.pending: set[int] = set()
        self._running: int | None = None  # the queue ``run`` is processing
        self._owed: dict[int, int] = {}  # queue -> chains popped since its interrupt was owed
        device.attach(self)

    # -------------------------------------------------------------- InterruptSink
    def config_changed(self) -> None:
        self.send(encode(Kind.CONFIG, self.device.read_config()))

    def used_buffers(self, queue: int) -> None:
        if queue == self._running and queue in PIPELINED_QUEUES:
            self._owed.setdefault(queue, 0)  # ``run`` raises it (coalesced)
            return
        self._interrupt(queue)

    def _interrupt(self, queue: int) -> None:
        if 0 <= queue < len(self.irq_fds):
            try:
                os.write(self.irq_fds[queue], _ONE)
            except OSError:
                self.counters.inc(VirtioTransportCounter.IRQ_WRITE_FAILED)

    # -------------------------------------------------------------- doorbells
    def kick(self, queue: int) -> None:
        """The doorbell of ``queue`` rang (its eventfd is readable): drain it and note the
        queue as pending; the host runs the device for it in its own turn (``run``)."""
        n = _drain_eventfd(self.kick_fds[queue])
        self.counters.inc(VirtioTransportCounter.DOORBELLS)
        if n == 0:
            self.counters.inc(VirtioTransportCounter.DOORBELLS_SPURIOUS)
        self.pending.add(queue)

    def notify_message(self, payload: bytes) -> None:
        """A ``NOTIFY`` message: a doorbell rung over the socket instead of an eventfd."""
        if len(payload) != _U16.size:
            self.counters.inc(VirtioTransportCounter.NOTIFY_MALFORMED)
            return
        (q,) = _U16.unpack(payload)
        self.counters.inc(VirtioTransportCounter.NOTIFY_MESSAGES)
        self.pending.add(q)

    def run(self, queue: int, max_chains: int | None = None) -> int:
        """Run the device for a pending ``queue``: at most ``max_chains`` chains (all without);
        how many it popped. Fewer than ``max_chains`` means the queue is drained (it leaves
        ``pending``). Never raises."""
        self._running = queue
        try:
            popped = self.device.notify(queue, max_chains=max_chains)
        finally:
            self._running = None
        drained = max_chains is None or popped < max_chains
        if drained:
            self.pending.discard(queue)
        if queue in self._owed:
            # one interrupt per drained queue or IRQ_COALESCE_CHAINS chains: a wakeup of the
            # guest per call would have it preempt the host for a few buffers at a time
            self._owed[queue] += popped
            if drained or self._owed[queue] >= IRQ_COALESCE_CHAINS:
                del self._owed[queue]
                self._interrupt(queue)
        return popped

    @property
    def work_bytes(self) -> int:
        """Guest memory the device read or wrote for the queues so far."""
        return self.device.work_bytes

    # -------------------------------------------------------------- HostEndpoint
    def set_target(self, pages: int) -> bytes | None:
        """Set the target; the device pushes the config change itself (``config_changed``)."""
        self.device.set_target(pages)
        return None

    def handle_message(self, kind: Kind, payload: bytes) -> bytes | None:
        if kind is Kind.NOTIFY:
            self.notify_message(payload)
            return None
        return self.handle_request(payload)

    def after_send(self) -> None:
        pass  # the device releases each doorbell's frames as it takes them

    def retry(self) -> None:
        """Finish deflates the device held for want of host memory, if memory is back."""
        if self.device.held_deflates or self.device.host_pages.owing:
            self.device.retry_held()

    # -------------------------------------------------------------- requests
    def handle_request(self, payload: bytes) -> bytes | None:
        """Answer one ``VIRTIO`` request; the reply message, or None for a one-way op."""
        try:
            op = VirtioOp(payload[0]) if payload else None
        except ValueError:
            op = None
        args = payload[1:]
        d = self.device
        data: bytes | None = None
        match op:
            case VirtioOp.GET_FEATURES if not args:
                data = _U64.pack(d.device_features())
            case VirtioOp.SET_FEATURES if len(args) == _U64.size:
                d.set_driver_features(_U64.unpack(args)[0])
                data = b""
            case VirtioOp.QUEUE_MAX if len(args) == _U16.size:
                data = _U32.pack(d.queue_max_size(_U16.unpack(args)[0]))
            case VirtioOp.SETUP_QUEUE if len(args) == _SETUP.size:
                q, size, desc, avail, used = _SETUP.unpack(args)
                if q >= len(self.kick_fds):
                    self.counters.inc(VirtioTransportCounter.SETUP_QUEUE_WITHOUT_EVENTFD)
                elif d.setup_queue(q, QueueLayout(size, desc, avail, used)):  # checks it
                    data = b""  # a refused set-up (counted by the device) is answered BAD
            case VirtioOp.READ_CONFIG if not args:
                data = d.read_config()
            case VirtioOp.WRITE_CONFIG if _U32.size < len(args) <= _U32.size + 8:
                (off,) = _U32.unpack_from(args)
                d.write_config(off, args[_U32.size:])  # counts bad offsets itself
                return None
            case VirtioOp.WRITE_CONFIG:
                self.counters.inc(VirtioTransportCounter.VIRTIO_REQUEST_MALFORMED)
                return None
            case _:
                self.counters.inc(VirtioTransportCounter.VIRTIO_REQUEST_MALFORMED)
        if data is None:
            return encode(Kind.VIRTIO_REPLY, bytes([REPLY_BAD]))
        return encode(Kind.VIRTIO_REPLY, bytes([REPLY_OK]) + data)
