"""virtio across a socket and eventfds: rings in the shared memfd, read by the host's mapping."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.memory import GuestMemory
from memballoon.guest.virtio_driver import VirtioBalloonDriver
from memballoon.host.memfd import MemfdRam
from memballoon.host.ram import NullRam
from memballoon.host.virtio_device import VirtioBalloonDevice
from memballoon.local.host import DEFAULT_VIRTIO_FEATURES
from memballoon.local.link import GuestLink
from memballoon.local.transport_virtio import (
    IRQ_COALESCE_CHAINS,
    MAX_QUEUES,
    REPLY_BAD,
    LocalVirtioTransport,
    VirtioHostEndpoint,
    VirtioOp,
    make_eventfds,
)
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE, PageState
from memballoon.protocol.virtio_balloon import VIRTIO_BALLOON_F_MUST_TELL_HOST, features_of
from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout
from memballoon.protocol.wire import Decoder, Kind, encode

PAGES = 32768  # 128 MiB


class HostThread:
    """The host's loop for one guest, in a thread: socket requests and doorbell eventfds."""

    def __init__(self, sock: socket.socket, ep: VirtioHostEndpoint) -> None:
        self.sock, self.ep = sock, ep
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = Decoder()
        fds = [self.sock.fileno(), *self.ep.kick_fds]
        while not self.stop:
            r, _, _ = select.select(fds, [], [], 0.05)
            with self.lock:
                for fd in r:
                    if fd != self.sock.fileno():
                        self.ep.kick(self.ep.kick_fds.index(fd))
                        self._run_pending()
                        continue
                    try:
                        data = self.sock.recv(1 << 16)
                    except OSError:
                        return
                    if not data:
                        return
                    for m in dec.messages(data):
                        if m.kind is Kind.VIRTIO and (rep := self.ep.handle_request(m.payload)):
                            self.sock.sendall(rep)
                        elif m.kind is Kind.NOTIFY:
                            self.ep.notify_message(m.payload)
                            self._run_pending()

    def _run_pending(self) -> None:
        for q in sorted(self.ep.pending):
            self.ep.run(q)


@dataclass
class World:
    host_ram: MemfdRam
    guest_ram: MemfdRam
    device: VirtioBalloonDevice
    endpoint: VirtioHostEndpoint
    transport: LocalVirtioTransport
    host: HostThread
    guest_sock: socket.socket

    def set_target(self, pages: int) -> None:
        with self.host.lock:
            self.device.set_target(pages)  # pushes CONFIG to the guest


@pytest.fixture
def world() -> Iterator[World]:
    host_ram = MemfdRam(PAGES)
    guest_ram = MemfdRam.attach(os.dup(host_ram.fd), PAGES)
    kick, irq = make_eventfds(), make_eventfds()
    host_end, guest_end = socket.socketpair()
    view = GuestRamView(host_ram.mapping, base_gpa=0, guest_bytes=host_ram.size_bytes)
    dev = VirtioBalloonDevice(host_ram, view, features=DEFAULT_VIRTIO_FEATURES)
    ep = VirtioHostEndpoint(dev, kick, irq, host_end.sendall)
    host = HostThread(host_end, ep)
    gview = GuestRamView(guest_ram.mapping, base_gpa=0, guest_bytes=guest_ram.size_bytes)
    t = LocalVirtioTransport(GuestLink(guest_end), gview, kick, irq)
    yield World(host_ram, guest_ram, dev, ep, t, host, guest_end)
    host.stop = True
    guest_end.close()
    host.thread.join(5)
    host_end.close()
    for fd in kick + irq:
        os.close(fd)


def test_driver_inflates_real_memory_through_rings_in_the_memfd(world: World) -> None:
    mem = GuestMemory(PAGES, store=world.guest_ram)
    world.guest_ram.touch(np.flatnonzero(mem.state == PageState.FREE), 0)
    drv = VirtioBalloonDriver(mem, world.transport)
    drv.load(0.0)
    before = world.host_ram.resident_bytes()
    world.set_target(PAGES // 2)
    world.transport.link.pump(1.0)  # the config push arrives
    assert world.transport.config_pending
    drv.work(0.1)
    assert world.transport.drain(5.0)
    drv.work(0.2)  # collects the tail and writes actual
    assert drv.balloon_pages == world.device.inflated_pages == PAGES // 2
    assert before - world.host_ram.resident_bytes() == PAGES // 2 * PAGE_SIZE
    assert np.array_equal(drv.balloon_pfns(), world.device.balloon_pfns())
    world.host.thread.join(0.1)
    assert world.device.actual_pages == PAGES // 2  # the one-way config write got there
    world.set_target(0)
    world.transport.link.pump(1.0)
    drv.work(0.3)
    world.transport.drain(5.0)
    drv.work(0.4)
    assert drv.balloon_pages == world.device.inflated_pages == 0
    world.guest_ram.touch(np.flatnonzero(mem.state == PageState.FREE), 1)
    assert mem.verify_contents() == 0
    assert world.endpoint.counters["doorbells"] > 0


def test_config_reads_are_served_from_the_pushed_copy(world: World) -> None:
    t = world.transport
    first = t.read_config()
    assert int.from_bytes(first[:4], "little") == 0
    world.set_target(77)
    for _ in range(100):
        if int.from_bytes(t.read_config()[:4], "little") == 77:
            break
        t.link.pump(0.05)
    assert int.from_bytes(t.read_config()[:4], "little") == 77
    t.write_config(4, (5).to_bytes(4, "little"))
    assert t.read_config()[4:8] == (5).to_bytes(4, "little")


def _inflateq(t: LocalVirtioTransport) -> DriverQueue:
    """Negotiate MUST_TELL_HOST only (plain PFN arrays) and set up the inflate queue."""
    t.set_driver_features(features_of(VIRTIO_BALLOON_F_MUST_TELL_HOST))
    lay = QueueLayout.packed(1 << 20, 16)
    t.setup_queue(0, lay)
    return DriverQueue(t.ram, lay, Counters())


def test_pipelined_wait_returns_early_and_drain_waits_for_all(world: World) -> None:
    t = world.transport
    q = _inflateq(t)
    world.set_target(100)
    for i in range(3):
        t.ram.write((2 << 20) + 64 * i, np.array([5000 + i], "<u4").tobytes())
        q.add([((2 << 20) + 64 * i, 4, False)])
    q.publish()
    t.notify(0)
    assert t.drain(5.0)
    assert t.in_flight(0) == 0
    assert len(q.collect()) == 3
    assert world.device.inflated_pages == 3


def test_a_wait_the_host_does_not_answer_gives_up_and_says_so(world: World) -> None:
    t = world.transport
    q = _inflateq(t)
    world.set_target(100)
    t.ram.write(2 << 20, np.array([5000], "<u4").tobytes())
    q.add([(2 << 20, 4, False)])
    q.publish()  # made available, but no doorbell: the host never looks
    assert t.wait(0, depth=1, timeout_s=0.05) is False
    assert t.counters["wait_timeout"] == 1
    assert t.wait(1, depth=1, timeout_s=0.05) is True  # nothing in flight there
    t.notify(0)
    assert t.drain(5.0)


def test_hostile_requests_are_counted_and_refused(world: World) -> None:
    ep = world.endpoint
    bad = [b"", b"\x63", bytes([VirtioOp.QUEUE_MAX]), bytes([VirtioOp.SET_FEATURES]) + b"\x01",
           bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", MAX_QUEUES + 3, 16, 0, 0, 0)]
    for payload in bad:
        rep = ep.handle_request(payload)
        assert rep is not None
        assert Decoder().messages(rep)[0].payload == bytes([REPLY_BAD])
    assert ep.handle_request(bytes([VirtioOp.WRITE_CONFIG]) + b"\x00") is None
    assert ep.counters["virtio_request_malformed"] == 5
    assert ep.counters["setup_queue_without_eventfd"] == 1
    # a queue laid outside guest RAM: the device counts it, nothing breaks
    out = PAGES * PAGE_SIZE
    ep.handle_request(bytes([VirtioOp.SET_FEATURES]) + struct.pack("<Q", 1))
    rep = ep.handle_request(bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", 0, 16, out,
                                                                          out, out))
    assert ep.counters["setup_bad_layout"] == 1
    assert rep is not None and Decoder().messages(rep)[0].payload == bytes([REPLY_BAD])
    ep.notify_message(b"\x00")
    ep.notify_message(struct.pack("<H", 0))
    assert ep.counters["notify_malformed"] == 1
    assert world.host_ram.resident_bytes() == 0


def test_pfns_outside_the_guest_are_never_released(world: World) -> None:
    t = world.transport
    q = _inflateq(t)
    world.guest_ram.touch(np.arange(4096, 8192), 0)
    world.set_target(1000)
    pfns = np.array([PAGES, PAGES + 1, 2**32 - 1, 5000, 5000], dtype="<u4")
    t.ram.write(2 << 20, pfns.tobytes())
    q.add([(2 << 20, pfns.nbytes, False)])
    q.add([(PAGES * PAGE_SIZE - 4, 64, False)])  # a buffer running past the end of RAM
    q.publish()
    before = world.host_ram.resident_bytes()
    t.notify(0)
    assert t.drain(5.0)
    c = world.device.counters
    assert c["inflate_pfn_outside_guest"] == 3
    assert c["inflate_pfn_duplicate"] == 1
    assert c["inflateq_bad_descriptor"] == 1
    assert world.device.inflated_pages == 1
    assert before - world.host_ram.resident_bytes() == PAGE_SIZE


def test_doorbell_flood_costs_counters_only(world: World) -> None:
    t = world.transport
    _inflateq(t)
    for _ in range(20000):
        t.notify(0)
    t.link.send(Kind.NOTIFY, struct.pack("<H", 4))
    world.host.thread.join(0.3)
    c = world.endpoint.counters
    assert 1 <= c["doorbells"] <= 20000  # eventfds coalesce a flood
    assert world.device.inflated_pages == 0
    assert world.host.thread.is_alive()
    assert t.read_config()  # still answering


def test_push_of_a_malformed_config_is_ignored(world: World) -> None:
    t = world.transport
    good = t.read_config()
    world.endpoint.send(encode(Kind.CONFIG, b"\x01\x02"))
    t.link.pump(1.0)
    assert t.read_config() == good
    assert t.counters["config_push_malformed"] == 1


# fuzz property (the long form: `memballoon bench fuzz --target virtio_device`)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=48) | st.sampled_from(list(VirtioOp)).flatmap(
    lambda op: st.binary(max_size=40).map(lambda b: bytes([op]) + b)), max_size=20))
def test_any_request_is_answered_well_formed_or_not_at_all(payloads: list[bytes]) -> None:
    pages = 256
    dev = VirtioBalloonDevice(NullRam(pages), GuestRamView(bytearray(pages * PAGE_SIZE),
                                                           base_gpa=0,
                                                           guest_bytes=pages * PAGE_SIZE),
                              features=DEFAULT_VIRTIO_FEATURES)
    sent: list[bytes] = []
    ep = VirtioHostEndpoint(dev, [-1] * MAX_QUEUES, [], sent.append)
    for p in payloads:
        rep = ep.handle_request(p)  # never raises
        if rep is not None:
            (m,) = Decoder().messages(rep)
            assert m.kind is Kind.VIRTIO_REPLY and m.payload[:1] in (b"\x00", b"\x01")
        ep.notify_message(p[:2])
    assert all(m.kind is Kind.CONFIG for m in Decoder().messages(b"".join(sent)))
    assert 0 <= dev.actual_pages <= dev.inflated_pages


def test_refusals_heard_late_over_the_pipeline_still_reach_the_target(world: World) -> None:
    # issue 11 (seed 001 over a pipelined transport): the host refuses more frames than one
    # cycle may; their refusals come back after the fill loop counted them as on their way.
    # The driver goes round again and keeps them aside until the target is reached.
    mem = GuestMemory(PAGES, store=world.guest_ram)
    drv = VirtioBalloonDriver(mem, world.transport)
    drv.load(0.0)
    pinned = np.flatnonzero(mem.state == PageState.FREE)[:1500]
    with world.host.lock:
        world.device.pin(pinned)
    world.set_target(PAGES // 2)
    world.transport.link.pump(1.0)
    t = 0.1
    for _ in range(12):
        drv.work(t)
        world.transport.drain(5.0)
        t += 0.2
    drv.work(t)
    assert drv.balloon_pages == world.device.inflated_pages == PAGES // 2
    assert drv.counters["refused_pages"] >= pinned.size and drv.refused_pages == 0
    assert drv.transient_pfns().size == 0
    assert not np.isin(drv.balloon_pfns(), pinned).any()
    assert bool((mem.state[pinned] == PageState.FREE).all())


def test_a_queue_set_up_the_device_refuses_is_answered_failed(world: World) -> None:
    # issue 11: a set-up the device refused (counted) was answered OK, the guest none the wiser
    ep = world.endpoint
    ep.handle_request(bytes([VirtioOp.SET_FEATURES]) + struct.pack("<Q", 1))
    ok = bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", 0, 16, 0x100000, 0x100100,
                                                     0x100200)
    too_large = bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", 0, 4096, 0x100000,
                                                            0x110000, 0x112000)
    misaligned = bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", 1, 16, 0x100008,
                                                             0x100100, 0x100200)
    no_queue = bytes([VirtioOp.SETUP_QUEUE]) + struct.pack("<HIQQQ", 3, 16, 0x100000,
                                                           0x100100, 0x100200)
    replies = {name: ep.handle_request(req) for name, req in (
        ("ok", ok), ("too_large", too_large), ("misaligned", misaligned), ("no_queue", no_queue))}
    status = {n: Decoder().messages(r)[0].payload[:1] for n, r in replies.items() if r}
    assert status == {"ok": b"\x00", "too_large": REPLY_BAD.to_bytes(1, "little"),
                      "misaligned": REPLY_BAD.to_bytes(1, "little"),
                      "no_queue": REPLY_BAD.to_bytes(1, "little")}
    c = world.device.counters
    assert (c["setup_queue_too_large"], c["setup_bad_layout"], c["setup_unknown_queue"]) == (
        1, 1, 1)


def _irqs(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def test_used_interrupts_come_once_per_drained_queue_or_coalesced_chains() -> None:
    ram = MemfdRam(PAGES)
    view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
    dev = VirtioBalloonDevice(ram, view, features=DEFAULT_VIRTIO_FEATURES)
    kick, irq = make_eventfds(), make_eventfds()
    ep = VirtioHostEndpoint(dev, kick, irq, lambda _data: None)
    try:
        dev.set_driver_features(features_of(VIRTIO_BALLOON_F_MUST_TELL_HOST))
        lay = QueueLayout.packed(1 << 20, 64)
        assert dev.setup_queue(0, lay)
        q = DriverQueue(view, lay, Counters())
        dev.set_target(1000)
        chunk = 8  # what the local host pops a call
        assert IRQ_COALESCE_CHAINS % chunk == 0
        n = IRQ_COALESCE_CHAINS + chunk
        for i in range(n):
            view.write((2 << 20) + 64 * i, np.array([5000 + i], "<u4").tobytes())
            q.add([((2 << 20) + 64 * i, 4, False)])
        q.publish()
        os.write(kick[0], (1).to_bytes(8, "little"))
        ep.kick(0)
        raised = []
        while 0 in ep.pending:
            ep.run(0, chunk)
            raised.append(_irqs(irq[0]))
        # one interrupt once IRQ_COALESCE_CHAINS were used, one when the queue drained (the
        # last call popped nothing), none per call in between
        k = IRQ_COALESCE_CHAINS // chunk
        assert raised == [0] * (k - 1) + [1] + [0] + [1]
        assert len(q.collect()) == n and dev.inflated_pages == n
        ep.used_buffers(2)  # outside a run (a stats request): at once
        assert _irqs(irq[2]) == 1
        ep.run(0, chunk)  # nothing new: no interrupt owed
        assert _irqs(irq[0]) == 0
    finally:
        for fd in kick + irq:
            os.close(fd)
