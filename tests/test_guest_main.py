"""One real guest process, driven by the test acting as its host over the wire."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from memballoon.cli import build_parser
from memballoon.host.memfd import MemfdRam
from memballoon.host.vmw_device import VmwBalloonDevice
from memballoon.local.guest_main import EXIT_HOST_GONE, EXIT_OK, config_from_args
from memballoon.local.transport_vmw import VmwHostEndpoint
from memballoon.model.units import PAGE_SIZE, RamKind
from memballoon.protocol.pressure import PressureReport
from memballoon.protocol.wire import Decoder, Kind, Message, encode

PAGES = 16384  # 64 MiB


class FakeHost:
    def __init__(self, protocol: str = "vmw-batched", *, period: float = 0.1,
                 workload: str = "steady") -> None:
        self.ram = MemfdRam(PAGES)
        self.dev = VmwBalloonDevice(self.ram)
        self.ep = VmwHostEndpoint(self.dev, signalled=True)
        self.sock, child = socket.socketpair()
        self.dec = Decoder()
        self.msgs: list[Message] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memballoon.local.guest_main", "--name", "g1", "--protocol",
             protocol, "--pages", str(PAGES), "--workload", workload, "--period", str(period),
             "--sock-fd", str(child.fileno()), "--mem-fd", str(self.ram.fd)],
            pass_fds=[child.fileno(), self.ram.fd],
        )
        child.close()
        self.sock.settimeout(30)

    def next(self, kind: Kind) -> Message:
        """Serve VMW frames until a message of ``kind`` arrives."""
        while True:
            while self.msgs:
                m = self.msgs.pop(0)
                if m.kind is Kind.VMW:
                    self.sock.sendall(self.ep.handle(m.payload))
                elif m.kind is kind:
                    return m
            data = self.sock.recv(1 << 16)
            assert data, "guest closed the socket"
            self.msgs.extend(self.dec.messages(data))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.sock.close()
        self.ram.close()


@pytest.fixture
def host() -> Iterator[FakeHost]:
    h = FakeHost()
    yield h
    h.close()


def test_hello_reports_and_bye(host: FakeHost) -> None:
    hello = json.loads(host.next(Kind.HELLO).payload)
    assert hello == {"v": 1, "guest": "g1", "protocol": "vmw-batched", "pages": PAGES,
                     "pid": host.proc.pid}
    rep = PressureReport.decode(host.next(Kind.STATUS).payload)
    assert rep.guest == "g1" and rep.total_bytes == PAGES * PAGE_SIZE
    assert rep.anon_bytes > 0  # the steady workload wrote its working set into the memfd
    assert host.ram.resident_bytes() >= rep.anon_bytes
    host.sock.sendall(encode(Kind.BYE))
    host.next(Kind.BYE)
    assert host.proc.wait(10) == EXIT_OK


def test_wake_up_runs_the_work_at_once_and_reports_follow(host: FakeHost) -> None:
    host.next(Kind.STATUS)
    wake = host.ep.set_target(1024)
    assert wake is not None
    host.sock.sendall(wake)
    deadline = time.monotonic() + 20
    rep = PressureReport.decode(host.next(Kind.STATUS).payload)
    while rep.balloon_actual_pages != 1024 and time.monotonic() < deadline:
        rep = PressureReport.decode(host.next(Kind.STATUS).payload)
    assert rep.balloon_actual_pages == host.dev.actual_pages == 1024
    assert rep.balloon_target_pages == 1024
    assert rep.refused_pages == 0


def test_control_requests_are_answered_in_order(host: FakeHost) -> None:
    host.next(Kind.STATUS)
    for op in ("touch_free", "verify", "nonsense"):
        host.sock.sendall(encode(Kind.CONTROL, json.dumps({"op": op}).encode()))
    touched = json.loads(host.next(Kind.CONTROL_REPLY).payload)
    verify = json.loads(host.next(Kind.CONTROL_REPLY).payload)
    bad = json.loads(host.next(Kind.CONTROL_REPLY).payload)
    assert touched["touched_pages"] > 0
    assert verify["lost_pages"] == 0 and verify["checked_pages"] > 0
    assert verify["invariant_errors"] == []
    assert "error" in bad


def test_host_gone_ends_the_guest(host: FakeHost) -> None:
    host.next(Kind.STATUS)
    host.sock.close()
    assert host.proc.wait(10) == EXIT_HOST_GONE


def test_host_garbage_ends_the_guest(host: FakeHost) -> None:
    host.next(Kind.STATUS)
    host.sock.sendall(b"\xff" * 64)
    assert host.proc.wait(10) == EXIT_HOST_GONE


def test_cli_has_the_guest_subcommand() -> None:
    args = build_parser().parse_args(
        ["guest", "--name", "x", "--protocol", "virtio", "--pages", "4096", "--sock-fd", "3",
         "--mem-fd", "4", "--kick-fds", "5,6", "--irq-fds", "7,8", "--period", "0.5"]
    )
    cfg = config_from_args(args)
    assert (cfg.kick_fds, cfg.irq_fds, cfg.period_s) == ((5, 6), (7, 8), 0.5)
    assert cfg.ram is RamKind.SMALL
    huge = build_parser().parse_args(
        ["guest", "--name", "x", "--protocol", "virtio", "--pages", "4096", "--sock-fd", "3",
         "--mem-fd", "4", "--ram", "hugetlb"])
    assert config_from_args(huge).ram is RamKind.HUGETLB
    with pytest.raises(SystemExit):
        build_parser().parse_args(["guest", "--name", "x", "--protocol", "virtio", "--pages",
                                   "1", "--sock-fd", "3", "--mem-fd", "4", "--kick-fds", "a"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["guest", "--name", "x", "--protocol", "virtio", "--pages",
                                   "1", "--sock-fd", "3", "--mem-fd", "4", "--ram", "1g"])


def test_a_memfd_of_the_wrong_size_is_refused() -> None:
    ram = MemfdRam(PAGES // 2)
    a, b = socket.socketpair()
    p = subprocess.run(
        [sys.executable, "-m", "memballoon.local.guest_main", "--name", "g", "--protocol",
         "vmw", "--pages", str(PAGES), "--sock-fd", str(b.fileno()), "--mem-fd", str(ram.fd)],
        pass_fds=[b.fileno(), ram.fd], capture_output=True, timeout=30,
    )
    assert p.returncode == 2
    assert b"sealed" in p.stderr or b"bytes" in p.stderr
    a.close()
    b.close()
    ram.close()
