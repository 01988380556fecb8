"""The VMware backdoor over a real Unix socket: the seed driver inflates real memfd memory."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from memballoon.guest.memory import GuestMemory
from memballoon.guest.vmw_driver import VMW_BALLOON_NOSLEEP_ALLOC_MAX, VmwBalloonDriver
from memballoon.host.memfd import MemfdRam
from memballoon.host.vmw_device import VmwBalloonDevice
from memballoon.local.link import GuestLink, LinkClosedError
from memballoon.local.transport_vmw import SocketBackdoor, VmwHostEndpoint
from memballoon.model.units import PAGE_SIZE
from memballoon.protocol.vmw import Command, Request, Status, decode_response, encode_request
from memballoon.protocol.wire import Decoder, Kind, encode

PAGES = 16384  # 64 MiB


class HostThread:
    """The host's side of one guest's socket, served by a thread (the test's stand-in loop)."""

    def __init__(self, sock: socket.socket, endpoint: VmwHostEndpoint) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = Decoder()
        while data := self.sock.recv(1 << 16):
            for m in dec.messages(data):
                if m.kind is Kind.VMW:
                    self.sock.sendall(self.endpoint.handle(m.payload))


@pytest.fixture
def pair() -> Iterator[tuple[MemfdRam, VmwBalloonDevice, socket.socket, HostThread]]:
    ram = MemfdRam(PAGES)
    dev = VmwBalloonDevice(ram)
    host_end, guest_end = socket.socketpair()
    host = HostThread(host_end, VmwHostEndpoint(dev, signalled=False))
    yield ram, dev, guest_end, host
    guest_end.close()
    host.thread.join(5)
    host_end.close()
    ram.close()


@pytest.mark.parametrize("batched", [False, True])
def test_driver_inflates_and_deflates_real_memory_over_the_socket(
    pair: tuple[MemfdRam, VmwBalloonDevice, socket.socket, HostThread], batched: bool
) -> None:
    ram, dev, guest_end, _ = pair
    guest_ram = MemfdRam.attach(os.dup(ram.fd), PAGES)
    mem = GuestMemory(PAGES, store=guest_ram)
    free = np.flatnonzero(mem.state == 0)
    guest_ram.touch(free, 0)  # the guest used all its memory once
    before = ram.resident_bytes()
    drv = VmwBalloonDriver(mem, SocketBackdoor(guest_end), batched=batched)
    drv.load(0.0)
    assert drv.loaded
    dev.set_target(4096)
    drv.work(1.0)
    assert drv.balloon_pages == dev.actual_pages == 4096
    assert before - ram.resident_bytes() == 4096 * PAGE_SIZE
    assert np.array_equal(drv.balloon_pfns(), dev.balloon_pfns())
    dev.set_target(0)
    drv.work(2.0)
    assert dev.actual_pages == drv.balloon_pages == 0
    assert mem.verify_contents() == 0
    guest_ram.close()


def test_legacy_cycle_is_the_seed_cap_one_round_trip_per_page() -> None:
    pages = 32768
    with MemfdRam(pages) as ram:
        dev = VmwBalloonDevice(ram)
        host_end, guest_end = socket.socketpair()
        host = HostThread(host_end, VmwHostEndpoint(dev, signalled=False))
        drv = VmwBalloonDriver(GuestMemory(pages), SocketBackdoor(guest_end))
        drv.load(0.0)
        dev.set_target(pages * 3 // 4)
        drv.work(1.0)
        # the seed's loop counts from 0 and stops once i >= rate: rate + 1 pages a cycle
        assert drv.balloon_pages == VMW_BALLOON_NOSLEEP_ALLOC_MAX + 1 == 16385
        assert dev.counters["cmd_lock"] == drv.balloon_pages
        guest_end.close()
        host.thread.join(5)
        host_end.close()


def test_backdoor_call_is_one_frame_each_way() -> None:
    a, b = socket.socketpair()
    bd = SocketBackdoor(a)
    req = Request(Command.GET_TARGET, 10)
    b.sendall(encode(Kind.STATUS, b"ignored") + encode(Kind.VMW, b"x" * 16))
    # a pushed message before the reply goes to the inbox, the reply to the call
    reply = bd.call(encode_request(req))
    assert reply == b"x" * 16
    assert [m.kind for m in bd.link.inbox] == [Kind.STATUS]
    a.close()
    b.close()


def test_eof_is_a_typed_error_and_the_driver_counts_it() -> None:
    a, b = socket.socketpair()
    b.close()
    link = GuestLink(a)
    with pytest.raises(LinkClosedError):
        SocketBackdoor(link).call(encode_request(Request(Command.START, 2)))
    assert link.counters["link_eof"] + link.counters["link_send_failed"] == 1
    a2, b2 = socket.socketpair()
    b2.close()
    drv = VmwBalloonDriver(GuestMemory(16384), SocketBackdoor(a2))
    drv.load(0.0)  # never raises for what the host does
    assert not drv.loaded
    assert drv.counters["load_failed"] == 1


def test_garbage_from_the_host_closes_the_link() -> None:
    a, b = socket.socketpair()
    b.sendall(b"\xff\xff\xff\xff\x02garbage")
    link = GuestLink(a)
    with pytest.raises(LinkClosedError, match="garbage"):
        SocketBackdoor(link).call(encode_request(Request(Command.START, 2)))
    assert link.counters["link_frame_error"] == 1
    a.close()
    b.close()


def test_host_endpoint_answers_garbage_frames_with_a_status() -> None:
    with MemfdRam(4096) as ram:
        dev = VmwBalloonDevice(ram)
        ep = VmwHostEndpoint(dev, signalled=True)
        out = Decoder().messages(ep.handle(b"\x00" * 16))
        assert out[0].kind is Kind.VMW
        resp = decode_response(out[0].payload, Request(Command.START))
        assert resp.status is Status.ERROR_CMD_INVALID
        assert dev.counters["frame_bad_magic"] == 1
        wake = ep.set_target(10)
        assert wake is not None and Decoder().messages(wake)[0].kind is Kind.WAKE
        assert ram.resident_bytes() == 0
