"""What a virtio driver talks through, and the in-process link used by tests and the simulator.

A transport carries what virtio-pci's common config, notify and ISR regions carry (VIRTIO 1.2
section 4.1): feature negotiation, queue set-up, the device config space, the doorbell
(``notify``) and interrupts back (config changed, buffers used). The rings themselves live in
guest memory (``ram``), which driver and device share.

Interrupts are callbacks the transport delivers to the driver. A driver must treat them as
what they are in a kernel: a wake-up that only records that something happened, so it can
never be re-entered from inside its own ``notify``. It must also never assume the device is
synchronous: after ``notify`` and ``wait`` it reads the used ring, and whatever is not there
yet is still in flight (the local world's device runs in another process).

``DirectTransport`` links a driver to a device object in the same process. By default
``notify`` runs the device at once (a synchronous device); with ``deferred=True`` kicks are
queued until ``run_device()``, which lets tests hold buffers in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

from memballoon.model.errors import PeerError
from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout

ConfigHandler = Callable[[], None]
UsedHandler = Callable[[int], None]
#: ``n`` used-buffer interrupts on a queue at once (``DirectTransport.take_rounds``'s rounds)
UsedManyHandler = Callable[[int, int], None]


class VirtioTransport(Protocol):
    """The driver's view of one virtio device."""

    @property
    def ram(self) -> GuestRamView: ...

    def device_features(self) -> int: ...

    def set_driver_features(self, features: int) -> None: ...

    def queue_max_size(self, queue: int) -> int:
        """The device's largest size for ``queue`` (0: no such queue)."""
        ...

    def setup_queue(self, queue: int, layout: QueueLayout) -> None:
        """Tell the device where ``queue``'s rings are (and enable it); ``PeerError`` if the
        device refused them."""
        ...

    def read_config(self) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def notify(self, queue: int) -> None:
        """The doorbell: new buffers are available on ``queue``."""
        ...

    def wait(self, queue: int) -> bool:
        """Block until the device has used what was kicked on ``queue`` (may return early);
        False if it gave up waiting (the device holds buffers): stop for this work call."""
        ...

    def wait_idle(self, queue: int) -> None:
        """Block until nothing is in flight on ``queue`` (bounded by the transport's timeout).

        For callers that must have the buffer back, as Linux's ``tell_host`` does."""
        ...

    def set_interrupt_handlers(self, config_changed: ConfigHandler, used: UsedHandler) -> None:
        ...


class InterruptSink(Protocol):
    """What a device raises interrupts on."""

    def config_changed(self) -> None: ...

    def used_buffers(self, queue: int) -> None: ...


class VirtioDeviceModel(Protocol):
    """What ``DirectTransport`` needs of a device implemented in this process."""

    @property
    def view(self) -> GuestRamView: ...

    def device_features(self) -> int: ...

    def set_driver_features(self, features: int) -> None: ...

    def queue_max_size(self, queue: int) -> int: ...

    def setup_queue(self, queue: int, layout: QueueLayout) -> bool:
        """Whether the queue is usable on ``layout`` (a refusal is the device's to count)."""
        ...

    def read_config(self) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def notify(self, queue: int) -> int: ...

    def attach(self, irq: InterruptSink) -> None: ...


@runtime_checkable
class BulkRounds(Protocol):
    """A device in this process (or the link to one) that takes whole rounds of inflate or
    deflate buffers in one call: the simulator's bulk path."""

    def can_take_rounds(self, queue: int) -> bool:
        """Whether every frame of the next rounds on ``queue`` (the inflateq or the deflateq)
        will be taken or given back (a healthy queue, nothing held, nothing pinned, nothing to
        release first)."""
        ...

    def take_rounds(self, queue: int, driver: DriverQueue,
                    chains: Sequence[Sequence[tuple[int, int, bool]]], lengths: Sequence[int],
                    rounds: int, frames: npt.NDArray[np.int64], *,
                    ranges: npt.NDArray[np.int64] | None = None) -> None:
        """Take (inflateq) or give back (deflateq) ``frames`` as ``rounds`` doorbells of
        ``chains`` would, each buffer used with its length in ``lengths``: both ends of the
        queue as those round trips leave them. ``ranges``: ``coalesce(frames)``, if the
        caller has it."""
        ...

    def report_blocks(self, queue: int, head: int, blocks: npt.NDArray[np.int64],
                      block_pages: int) -> bool:
        """The doorbell of the free page report ``head`` just made available on ``queue`` (one
        buffer per aligned block of ``blocks``, ``block_pages`` frames each), the device's
        work and its used interrupt, in one call; False, having done nothing, where the
        doorbell could end otherwise: ring it then."""
        ...


_TAKES_ROUNDS: dict[type, bool] = {}


def _takes_rounds(device: object) -> bool:
    """``isinstance(device, BulkRounds)``, remembered per class (a runtime Protocol check costs
    tens of microseconds; the simulator asks at every inflate and deflate)."""
    kind = type(device)
    ok = _TAKES_ROUNDS.get(kind)
    if ok is None:
        ok = _TAKES_ROUNDS[kind] = isinstance(device, BulkRounds)
    return ok


class DirectTransport:
    """An in-process transport: the device is an object, interrupts are plain calls.

    With ``bulk`` (and a synchronous device that can: ``BulkRounds``), ``take_rounds``
    carries whole rounds of inflate or deflate buffers in one call, the simulator's bulk path;
    the driver and the device end as that many doorbells and interrupts leave them."""

    def __init__(self, device: VirtioDeviceModel, *, deferred: bool = False,
                 bulk: bool = True) -> None:
        self.device = device
        self.deferred = deferred
        self.bulk = bulk
        self._kicks: list[int] = []
        self._on_config: ConfigHandler | None = None
        self._on_used: UsedHandler | None = None
        self._on_used_many: UsedManyHandler | None = None
        self.notifies = 0
        self.config_interrupts = 0
        self.used_interrupts = 0
        device.attach(self)

    # -------------------------------------------------------------- the driver's side
    @property
    def ram(self) -> GuestRamView:
        return self.device.view

    def device_features(self) -> int:
        return self.device.device_features()

    def set_driver_features(self, features: int) -> None:
        self.device.set_driver_features(features)

    def queue_max_size(self, queue: int) -> int:
        return self.device.queue_max_size(queue)

    def setup_queue(self, queue: int, layout: QueueLayout) -> None:
        if not self.device.setup_queue(queue, layout):
            raise PeerError(f"the device refused queue {queue}'s rings")

    def read_config(self) -> bytes:
        return self.device.read_config()

    def write_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    def notify(self, queue: int) -> None:
        self.notifies += 1
        if self.deferred:
            if queue not in self._kicks:
                self._kicks.append(queue)
        else:
            self.device.notify(queue)

    def wait(self, queue: int) -> bool:
        """Synchronous device: already done. Deferred: the device has not run; return."""
        return True

    def wait_idle(self, queue: int) -> None:
        """As ``wait``: nothing to wait for in this process."""

    def set_interrupt_handlers(self, config_changed: ConfigHandler, used: UsedHandler) -> None:
        self._on_config = config_changed
        self._on_used = used
        self._on_used_many = None  # a new used handler: its own, if any, comes after

    def set_used_many_handler(self, used_many: UsedManyHandler | None) -> None:
        """What ``used(queue)`` called ``n`` times does, as one call ``used_many(queue, n)``:
        ``take_rounds`` then tells the driver of its rounds' interrupts at once (a bulk call
        of the fleet's first minutes carries hundreds). Set after ``set_interrupt_handlers``,
        which drops it."""
        self._on_used_many = used_many

    def can_take_rounds(self, queue: int) -> bool:
        """Whether ``take_rounds`` may carry the next rounds on ``queue``."""
        dev = self.device
        return (self.bulk and not self.deferred and not self._kicks
                and _takes_rounds(dev) and cast(BulkRounds, dev).can_take_rounds(queue))

    def take_rounds(self, queue: int, driver: DriverQueue,
                    chains: Sequence[Sequence[tuple[int, int, bool]]], lengths: Sequence[int],
                    rounds: int, frames: npt.NDArray[np.int64], *,
                    ranges: npt.NDArray[np.int64] | None = None) -> None:
        """``rounds`` times: publish ``chains``, ring the doorbell, the device takes or gives
        back its part of ``frames`` and returns every buffer used, one interrupt; in one call
        (only after ``can_take_rounds``; ``ranges``: ``coalesce(frames)``, if known)."""
        dev = self.device
        assert _takes_rounds(dev)
        cast(BulkRounds, dev).take_rounds(queue, driver, chains, lengths, rounds, frames,
                                          ranges=ranges)
        self.notifies += rounds
        self.used_interrupts += rounds  # one used interrupt a round (used_buffers, inlined)
        if self._on_used_many is not None:
            self._on_used_many(queue, rounds)
        elif self._on_used is not None:
            for _ in range(rounds):
                self._on_used(queue)

    def report_blocks(self, queue: int, head: int, blocks: npt.NDArray[np.int64],
                      block_pages: int) -> bool:
        """``notify`` of a free page report, in one call where the device can (``bulk``, a
        synchronous device, no kick queued)."""
        dev = self.device
        if not (self.bulk and not self.deferred and not self._kicks and _takes_rounds(dev)
                and cast(BulkRounds, dev).report_blocks(queue, head, blocks, block_pages)):
            return False
        self.notifies += 1
        return True

    # -------------------------------------------------------------- the device's side
    def config_changed(self) -> None:
        self.config_interrupts += 1
        if self._on_config is not None:
            self._on_config()

    def used_buffers(self, queue: int) -> None:
        self.used_interrupts += 1
        if self._on_used is not None:
            self._on_used(queue)

    # -------------------------------------------------------------- deferred mode
    @property
    def pending_kicks(self) -> tuple[int, ...]:
        return tuple(self._kicks)

    @property
    def idle(self) -> bool:
        """Not deferred and no kick queued: a doorbell reaches the device at once (asked
        every period of a busy guest: no tuple of the kicks)."""
        return not self.deferred and not self._kicks

    def run_device(self) -> int:
        """Deliver queued kicks to the device; returns how many queues it ran."""
        kicks, self._kicks = self._kicks, []
        for q in kicks:
            self.device.notify(q)
        return len(kicks)
