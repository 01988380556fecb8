"""The daemon's control API: newline-delimited JSON on a Unix socket, for its owner only.

Request ``{"op": OP, ...}`` -> ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}``. Ops: ``status``; ``set`` (``guest``, ``size``: the guest's logical size with a unit,
as QMP's ``balloon`` takes it, or ``"auto"`` to hand the guest back to the policy; ``force``:
set a size under the guest's safety floor);
``journal`` (``last``, ``guest``); ``register_qemu`` (``name``, ``qmp``, ``agent``,
``ram_bytes``); ``shutdown``.

Owner only, twice: the socket is created mode 0600 in a 0700 directory, and every connection's
``SO_PEERCRED`` uid must be the daemon's (or root's); anyone else gets one error line and is
hung up on (``control_refused_uid``). Everything a client sends is untrusted: a line longer
than ``MAX_LINE_BYTES``, not JSON, not an object, an unknown op or bad arguments is answered
with an error and counted (``control_<reason>``), never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, MemballoonError

MAX_LINE_BYTES: Final = 64 * 1024
IDLE_TIMEOUT_S: Final = 60.0
CLIENT_TIMEOUT_S: Final = 10.0
_PEERCRED: Final = struct.Struct("3i")  # struct ucred {pid, uid, gid} (Linux socket(7))


class ControlCounter(CounterName):
    """What the control server counts (its clients are untrusted: each refusal has its name)."""

    CONTROL_OK = "control_ok"  # requests answered
    CONTROL_REFUSED_UID = "control_refused_uid"  # connections from another user (hung up on)
    CONTROL_TOO_LONG = "control_too_long"  # requests over MAX_LINE_BYTES (hung up on)
    CONTROL_CLIENT_DROPPED = "control_client_dropped"  # clients that went idle or dropped
    CONTROL_BAD_JSON = "control_bad_json"  # requests that are not JSON
    CONTROL_NOT_OBJECT = "control_not_object"  # requests that are not a JSON object
    CONTROL_UNKNOWN_OP = "control_unknown_op"  # requests of an unknown op
    CONTROL_BAD_ARGS = "control_bad_args"  # requests with a missing or ill-typed argument
    CONTROL_OP_FAILED = "control_op_failed"  # ops that failed (a MemballoonError or ValueError)
    CONTROL_INTERNAL_ERROR = "control_internal_error"  # ops that raised anything else (a bug)


class ControlError(MemballoonError):
    """The control request failed: no daemon, or the daemon answered with an error."""


class ControlTarget(Protocol):
    """What the control server asks of the daemon."""

    async def op_status(self) -> dict[str, Any]: ...
    async def op_set(self, guest: str, size: str | int,
                     force: bool = False) -> dict[str, Any]: ...
    async def op_journal(self, last: int | None, guest: str | None) -> list[dict[str, Any]]: ...
    async def op_register_qemu(self, name: str, qmp: str, agent: str | None,
                               ram_bytes: int) -> dict[str, Any]: ...
    async def op_shutdown(self) -> dict[str, Any]: ...


class _BadRequest(Exception):
    """A request refused: ``counter`` is why, ``reason`` its name without ``control_``."""

    def __init__(self, counter: ControlCounter, detail: str) -> None:
        super().__init__(detail)
        self.counter = counter
        self.reason = counter.value.removeprefix("control_")


def _str(req: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    v = req.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= 4096:
        raise _BadRequest(ControlCounter.CONTROL_BAD_ARGS, f"{key} must be a non-empty string")
    return v


def _int(req: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    v = req.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 2**53:
        raise _BadRequest(ControlCounter.CONTROL_BAD_ARGS, f"{key} must be a whole number >= 0")
    return v


#: sun_path holds 108 bytes with its NUL (unix(7)).
MAX_SOCKET_PATH_BYTES: Final = 107


def check_socket_path(path: Path) -> None:
    """Whether the control socket can be made at ``path``; ConfigError says why not. A path
    under a regular file, too long for AF_UNIX, or naming anything but a socket (a regular
    file is never deleted to make room) is refused."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"socket = {str(path)!r}: {len(os.fsencode(str(path)))} bytes, more "
                          f"than the {MAX_SOCKET_PATH_BYTES} a unix socket path may have")
    for up in reversed(path.parents):
        try:
            st = up.stat()
        except FileNotFoundError:
            break  # made at start (mode 0700)
        except OSError as exc:
            raise ConfigError(f"socket = {str(path)!r}: {up}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"socket = {str(path)!r}: {up} is not a directory")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"socket = {str(path)!r}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
        raise ConfigError(f"socket = {str(path)!r} exists and is {kind}: it is not removed to "
                          "make room; choose another path")


class ControlServer:
    def __init__(self, target: ControlTarget, path: Path | str, *,
                 counters: Counters | None = None, allowed_uid: int | None = None) -> None:
        self.target = target
        self.path = Path(path)
        self.counters = counters if counters is not None else Counters()
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        check_socket_path(self.path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():  # a socket (check_socket_path)
            if _alive(self.path):
                raise ConfigError(f"control socket {self.path}: a daemon is already running")
            self.path.unlink()
        old = os.umask(0o177)  # bind creates the socket file 0600: no window for others
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_LINE_BYTES)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _peer_ok(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            _pid, uid, _gid = _PEERCRED.unpack(raw)
        except (OSError, struct.error, AttributeError):
            return False
        return bool(uid == self.allowed_uid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self._peer_ok(writer):
                self.counters.inc(ControlCounter.CONTROL_REFUSED_UID)
                await self._reply(writer, {"ok": False, "error": "permission denied: "
                                           "the control socket is for its owner only"})
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except (ValueError, asyncio.LimitOverrunError):
                    self.counters.inc(ControlCounter.CONTROL_TOO_LONG)
                    await self._reply(writer, {"ok": False, "error": "too_long: request "
                                               f"over {MAX_LINE_BYTES} bytes"})
                    return
                if not line:
                    return
                await self._reply(writer, await self.handle_line(line))
        except (TimeoutError, ConnectionError, OSError):
            self.counters.inc(ControlCounter.CONTROL_CLIENT_DROPPED)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        writer.write(json.dumps(doc, default=str).encode() + b"\n")
        await writer.drain()

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise _BadRequest(ControlCounter.CONTROL_BAD_JSON, "request is not JSON") from None
            if not isinstance(req, dict):
                raise _BadRequest(ControlCounter.CONTROL_NOT_OBJECT,
                                  "request must be a JSON object")
            result = await self._dispatch(req)
        except _BadRequest as exc:
            self.counters.inc(exc.counter)
            return {"ok": False, "error": f"{exc.reason}: {exc}"}
        except (MemballoonError, ValueError) as exc:
            self.counters.inc(ControlCounter.CONTROL_OP_FAILED)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in an op must not take the daemon down
            self.counters.inc(ControlCounter.CONTROL_INTERNAL_ERROR)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        self.counters.inc(ControlCounter.CONTROL_OK)
        return {"ok": True, "result": result}

    async def _dispatch(self, req: Mapping[str, Any]) -> Any:
        t = self.target
        match req.get("op"):
            case "status":
                return await t.op_status()
            case "set":
                guest = _str(req, "guest")
                size = req.get("size")
                if isinstance(size, bool) or not isinstance(size, str | int):
                    raise _BadRequest(ControlCounter.CONTROL_BAD_ARGS,
                                      "size must be a string with a unit or bytes")
                assert guest is not None
                force = req.get("force", False)
                if not isinstance(force, bool):
                    raise _BadRequest(ControlCounter.CONTROL_BAD_ARGS, "force must be a bool")
                return await t.op_set(guest, size, force)
            case "journal":
                return await t.op_journal(_int(req, "last", optional=True),
                                          _str(req, "guest", optional=True))
            case "register_qemu":
                name, qmp = _str(req, "name"), _str(req, "qmp")
                ram = _int(req, "ram_bytes")
                assert name is not None and qmp is not None and ram is not None
                return await t.op_register_qemu(name, qmp, _str(req, "agent", optional=True),
                                                ram)
            case "shutdown":
                return await t.op_shutdown()
            case op:
                raise _BadRequest(ControlCounter.CONTROL_UNKNOWN_OP, f"unknown op {str(op)[:40]!r}")


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def request(socket_path: Path | str, op: str, *, timeout_s: float = CLIENT_TIMEOUT_S,
            **args: Any) -> Any:
    """Send one request to the daemon and return its ``result``; ``ControlError`` otherwise."""
    path = str(socket_path)
    line = json.dumps({"op": op, **args}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no memballoon daemon at {path} (is `memballoon run` "
                               "running? give --socket PATH)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the daemon's owner only)") from None
        except OSError as exc:
            raise ControlError(f"{path}: cannot connect: {exc.strerror}") from None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(line)  # a refusing daemon may answer and hang up first: read it
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"{path}: no answer within {timeout_s} s") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror}") from None
    try:
        doc = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: the daemon sent no valid answer") from None
    if not isinstance(doc, dict) or "ok" not in doc:
        raise ControlError(f"{path}: malformed answer")
    if not doc["ok"]:
        raise ControlError(str(doc.get("error", "unknown error")))
    return doc.get("result")


__all__ = ["MAX_LINE_BYTES", "ControlError", "ControlServer", "ControlTarget", "request"]
