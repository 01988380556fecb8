"""A hostile local guest: ``python -m memballoon.local.hostile storm --name ... (guest args)``.

What a guest could do to its host if its kernel were someone else's, for the soak
(``memballoon bench soak``) and the tests: it takes the same inherited fds and arguments as
``guest_main`` (``GuestSpec.program``), says a valid HELLO, then, in mode ``storm`` (virtio):

- keeps a fresh round of large chains behind every doorbell: every slot of a 128-entry inflate
  ring names the same chain of 127 descriptors (64 KiB of PFNs, its own frames) or a one-buffer
  chain whose PFN array lies in a frame it ballooned (the host must not read it back in);
- rings the doorbell eventfd and sends NOTIFY messages in bulk, without waiting for anything;
- writes ``actual = 0xFFFFFFFF`` (a balloon it does not have) now and then.

It never returns; the host kills it. Nothing here is imported by the host.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Final

import numpy as np

from memballoon.host.memfd import MemfdRam
from memballoon.local.guest_main import HELLO_VERSION, add_arguments
from memballoon.local.link import GuestLink
from memballoon.local.transport_virtio import LocalVirtioTransport
from memballoon.model.errors import MemballoonError
from memballoon.protocol.virtio_balloon import OFFSET_ACTUAL, VIRTIO_BALLOON_F_MUST_TELL_HOST
from memballoon.protocol.virtqueue import GuestRamView, QueueLayout
from memballoon.protocol.wire import Kind, encode

MODES: Final = ("storm",)
RING_GPA: Final = 1 << 20
PFNS_GPA: Final = 2 << 20
QUEUE_SIZE: Final = 128
#: Its own frames it sends to the balloon over and over (64 KiB of u32 PFNs).
FIRST_PFN: Final = 8192
PFNS: Final = 16384
_DESC = struct.Struct("<QIHH")
_NEXT: Final = 1


def storm(a: argparse.Namespace, sock: socket.socket) -> None:
    ram = MemfdRam.attach(a.mem_fd, a.pages)
    link = GuestLink(sock)
    view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
    t = LocalVirtioTransport(link, view, a.kick_fds, a.irq_fds)
    t.set_driver_features(1 << VIRTIO_BALLOON_F_MUST_TELL_HOST)  # plain PFN arrays
    lay = QueueLayout.packed(RING_GPA, QUEUE_SIZE)
    t.setup_queue(0, lay)
    view.write(PFNS_GPA, np.arange(FIRST_PFN, FIRST_PFN + PFNS, dtype="<u4").tobytes())
    big = QUEUE_SIZE - 1
    per = PFNS * 4 // big // 4 * 4
    for i in range(big):  # head 0: one chain of 127 descriptors
        last = i == big - 1
        view.write(lay.desc_gpa + 16 * i, _DESC.pack(
            PFNS_GPA + per * i, per, 0 if last else _NEXT, 0 if last else i + 1))
    # head 127: one PFN array inside a frame the first round puts in the balloon
    view.write(lay.desc_gpa + 16 * big, _DESC.pack(FIRST_PFN * 4096, 4, 0, 0))
    for slot in range(QUEUE_SIZE):
        view.write_u16(lay.avail_gpa + 4 + 2 * slot, big if slot % 2 else 0)
    bells = encode(Kind.NOTIFY, struct.pack("<H", 0)) * 64
    lie = encode(Kind.VIRTIO, bytes([6]) + struct.pack("<I", OFFSET_ACTUAL)
                 + (0xFFFFFFFF).to_bytes(4, "little"))  # WRITE_CONFIG actual
    rounds = 0
    while True:
        used = view.read_u16(lay.used_gpa + 2)
        view.write_u16(lay.avail_gpa + 2, (used + QUEUE_SIZE) & 0xFFFF)
        t.notify(0)
        sock.sendall(bells if rounds % 16 else bells + lie)
        rounds += 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in MODES:
        print(f"usage: python -m memballoon.local.hostile {{{','.join(MODES)}}} GUEST-ARGS",
              file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="memballoon.local.hostile")
    add_arguments(p)
    a = p.parse_args(args[1:])
    sock = socket.socket(fileno=a.sock_fd)
    hello = {"v": HELLO_VERSION, "guest": a.name, "protocol": a.protocol, "pages": a.pages,
             "pid": os.getpid()}
    sock.sendall(encode(Kind.HELLO, json.dumps(hello).encode()))
    try:
        storm(a, sock)
    except (OSError, MemballoonError):  # the host is gone or dropped us
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
