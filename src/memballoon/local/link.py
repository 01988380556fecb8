"""The guest's end of its Unix socket to the host: blocking, framed, with an inbox.

The guest runtime is one thread. It sends requests and blocks for their replies (the VMware
backdoor, virtio's feature and queue set-up), and the host also pushes messages at any time
(config changes, wake-ups, control requests, BYE). ``GuestLink`` sorts what arrives: a reply
kind goes to the request waiting for it (replies come in order: the host answers a socket's
requests one by one); a kind with a registered handler is handed to it at once (virtio's
config pushes, so the transport's config copy is fresh even in the middle of a work call);
everything else waits in ``inbox`` for the runtime's loop.

The host is a peer like any other: garbage framing or EOF raises ``LinkClosedError`` (a
``PeerError``) and bumps a counter; the guest then has nothing left to talk to and exits.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import FrameError, PeerError
from memballoon.protocol.wire import Decoder, Kind, Message, encode

RECV_BYTES: Final = 1 << 16
#: What a request waits for its reply before it gives up: the host answers in microseconds;
#: this only bounds a hung host.
REPLY_TIMEOUT_S: Final = 30.0
REPLY_KINDS: Final = frozenset({Kind.VMW, Kind.VIRTIO_REPLY})


class LinkCounter(CounterName):
    """What ``GuestLink`` counts: why the link closed (once), and replies it could not use."""

    LINK_SEND_FAILED = "link_send_failed"  # the link closed: a send to the host failed
    LINK_RECV_FAILED = "link_recv_failed"  # the link closed: a receive from the host failed
    LINK_EOF = "link_eof"  # the link closed: the host closed its end
    LINK_FRAME_ERROR = "link_frame_error"  # the link closed: the host broke the framing
    REPLY_TIMEOUT = "reply_timeout"  # requests the host did not answer in time
    REPLY_WRONG_KIND = "reply_wrong_kind"  # replies of another kind than the request's


class LinkClosedError(PeerError):
    """The host closed the socket, or broke the framing (then we closed it)."""


class GuestLink:
    """A blocking framed link to the host (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, counters: Counters | None = None) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.counters = counters if counters is not None else Counters()
        self._dec = Decoder()
        self._replies: deque[Message] = deque()
        self.inbox: deque[Message] = deque()
        self.handlers: dict[Kind, Callable[[bytes], None]] = {}
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: Kind, payload: bytes = b"") -> None:
        if self.closed:
            raise LinkClosedError("link to the host is closed")
        try:
            self.sock.sendall(encode(kind, payload))
        except OSError as exc:
            self._close(LinkCounter.LINK_SEND_FAILED)
            raise LinkClosedError(f"sending to the host: {exc}") from exc

    def _close(self, why: LinkCounter) -> None:
        """Close for good, counting ``why`` (one of the ``link_*`` members) the first time."""
        if not self.closed:
            self.closed = True
            self.counters.inc(why)

    def _ingest(self, data: bytes) -> None:
        if not data:
            self._close(LinkCounter.LINK_EOF)
            raise LinkClosedError("the host closed the connection")
        try:
            msgs = self._dec.messages(data)
        except FrameError as exc:
            self._close(LinkCounter.LINK_FRAME_ERROR)
            raise LinkClosedError(f"garbage from the host: {exc}") from exc
        for m in msgs:
            if m.kind in REPLY_KINDS:
                self._replies.append(m)
            elif (h := self.handlers.get(m.kind)) is not None:
                h(m.payload)
            else:
                self.inbox.append(m)

    def pump(self, timeout_s: float | None = 0.0) -> bool:
        """Read what the host sent, waiting up to ``timeout_s`` (None: forever) for something.

        Returns whether anything was read."""
        if self.closed:
            raise LinkClosedError("link to the host is closed")
        if timeout_s is not None:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
            if not r:
                return False
        try:
            data = self.sock.recv(RECV_BYTES)
        except OSError as exc:
            self._close(LinkCounter.LINK_RECV_FAILED)
            raise LinkClosedError(f"receiving from the host: {exc}") from exc
        self._ingest(data)
        return True

    def request(self, kind: Kind, payload: bytes, reply: Kind,
                timeout_s: float = REPLY_TIMEOUT_S) -> bytes:
        """Send one request and block for its reply (the next message of kind ``reply``)."""
        self.send(kind, payload)
        return self.await_reply(reply, timeout_s)

    def await_reply(self, reply: Kind, timeout_s: float = REPLY_TIMEOUT_S) -> bytes:
        deadline: float | None = None
        while not self._replies:
            # fast path: a blocking recv (the host answers within microseconds)
            if deadline is None:
                deadline = time.monotonic() + timeout_s
                r, _, _ = select.select([self.sock], [], [], timeout_s)
            else:
                r, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not r:
                self.counters.inc(LinkCounter.REPLY_TIMEOUT)
                raise LinkClosedError(f"no reply from the host in {timeout_s:g} s")
            self.pump(None)
        m = self._replies.popleft()
        if m.kind is not reply:
            self.counters.inc(LinkCounter.REPLY_WRONG_KIND)
            raise PeerError(f"expected a {reply.name} reply, got {m.kind.name}")
        return m.payload

    def close(self) -> None:
        self.closed = True
        self.sock.close()
