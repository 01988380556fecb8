"""The control socket: owner only, ops dispatched, garbage answered with errors and counted."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.app.config import parse_size
from memballoon.app.control import (
    MAX_LINE_BYTES,
    ControlError,
    ControlServer,
    check_socket_path,
    request,
)
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError, UsageError


class Target:
    def __init__(self) -> None:
        self.sets: list[tuple[str, str | int]] = []
        self.stopped = False

    async def op_status(self) -> dict[str, Any]:
        return {"guests": []}

    async def op_set(self, guest: str, size: str | int, force: bool = False) -> dict[str, Any]:
        if guest == "ghost":
            raise UsageError("no guest named 'ghost'")
        if guest == "bug":
            raise KeyError("bug")
        self.sets.append((guest, size))
        return {"guest": guest}

    async def op_journal(self, last: int | None, guest: str | None) -> list[dict[str, Any]]:
        return [{"last": last, "guest": guest}]

    async def op_register_qemu(self, name: str, qmp: str, agent: str | None,
                               ram_bytes: int) -> dict[str, Any]:
        return {"registered": name, "ram": ram_bytes}

    async def op_shutdown(self) -> dict[str, Any]:
        self.stopped = True
        return {"stopping": True}


async def _raw(path: Path, payload: bytes) -> list[dict[str, Any]]:
    r, w = await asyncio.open_unix_connection(str(path), limit=4 * MAX_LINE_BYTES)
    w.write(payload)
    await w.drain()
    w.write_eof()
    out = []
    while line := await r.readline():
        out.append(json.loads(line))
    w.close()
    return out


def _serve(tmp_path: Path, **kw: Any) -> tuple[ControlServer, Target]:
    t = Target()
    return ControlServer(t, tmp_path / "ctl" / "m.sock", counters=Counters(), **kw), t


def test_ops_and_socket_mode(tmp_path: Path) -> None:
    srv, t = _serve(tmp_path)

    async def go() -> None:
        await srv.start()
        assert stat.S_IMODE(srv.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(srv.path.parent.stat().st_mode) == 0o700
        res = await asyncio.to_thread(request, srv.path, "set", guest="a", size="384MiB")
        assert res == {"guest": "a"} and t.sets == [("a", "384MiB")]
        assert await asyncio.to_thread(request, srv.path, "status") == {"guests": []}
        j = await asyncio.to_thread(request, srv.path, "journal", last=3, guest="a")
        assert j == [{"last": 3, "guest": "a"}]
        r = await asyncio.to_thread(request, srv.path, "register_qemu", name="vm", qmp="/q",
                                    ram_bytes=1 << 30)
        assert r == {"registered": "vm", "ram": 1 << 30}
        with pytest.raises(ControlError, match="no guest named"):
            await asyncio.to_thread(request, srv.path, "set", guest="ghost", size="1GiB")
        assert (await asyncio.to_thread(request, srv.path, "shutdown"))["stopping"]
        assert t.stopped
        await srv.close()
        assert not srv.path.exists()

    asyncio.run(go())


def test_garbage_requests_get_typed_errors_and_counters(tmp_path: Path) -> None:
    srv, _ = _serve(tmp_path)
    lines = [b"not json", b"[1]", b'{"op": "launch_missiles"}', b'{"no_op": 1}',
             b'{"op": "set", "guest": 5, "size": "1GiB"}', b'{"op": "set", "guest": "a"}',
             b'{"op": "journal", "last": -1}', b'{"op": "register_qemu", "name": "x"}',
             b'{"op": "set", "guest": "bug", "size": 1}', b"\xff\xfe",
             b'{"op": "status"}']

    async def go() -> list[dict[str, Any]]:
        await srv.start()
        try:
            return await _raw(srv.path, b"\n".join(lines) + b"\n")
        finally:
            await srv.close()

    replies = asyncio.run(go())
    assert len(replies) == len(lines)
    assert [r["ok"] for r in replies] == [False] * (len(lines) - 1) + [True]
    assert replies[0]["error"].startswith("bad_json") and "not_object" in replies[1]["error"]
    assert "unknown op" in replies[2]["error"] and "internal error" in replies[8]["error"]
    c = srv.counters
    assert c["control_bad_json"] == 2 and c["control_not_object"] == 1
    assert c["control_unknown_op"] == 2 and c["control_bad_args"] == 4
    assert c["control_internal_error"] == 1 and c["control_ok"] == 1


def test_too_long_line_is_refused(tmp_path: Path) -> None:
    srv, _ = _serve(tmp_path)

    async def go() -> list[dict[str, Any]]:
        await srv.start()
        try:
            return await _raw(srv.path, b"x" * (2 * MAX_LINE_BYTES) + b"\n")
        finally:
            await srv.close()

    (reply,) = asyncio.run(go())
    assert not reply["ok"] and "too_long" in reply["error"]
    assert srv.counters["control_too_long"] == 1


def test_other_uids_are_refused(tmp_path: Path) -> None:
    srv, t = _serve(tmp_path, allowed_uid=os.getuid() + 4242)  # we are "someone else"

    async def go() -> None:
        await srv.start()
        try:
            with pytest.raises(ControlError, match="permission denied"):
                await asyncio.to_thread(request, srv.path, "shutdown")
        finally:
            await srv.close()

    asyncio.run(go())
    assert srv.counters["control_refused_uid"] == 1 and not t.stopped


def test_client_without_daemon_says_so(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no memballoon daemon at"):
        request(tmp_path / "none.sock", "status", timeout_s=1.0)


def test_second_daemon_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    srv, _ = _serve(tmp_path)
    srv2 = ControlServer(Target(), srv.path)

    async def go() -> None:
        await srv.start()
        try:
            with pytest.raises(Exception, match="already running"):
                await srv2.start()
        finally:
            await srv.close()
        path = tmp_path / "ctl" / "m.sock"
        stale = socket.socket(socket.AF_UNIX)  # a socket left by a crash, nobody listening
        stale.bind(str(path))
        stale.close()
        await srv2.start()  # is replaced
        await srv2.close()
        path.write_text("precious")  # a regular file is never removed to make room
        with pytest.raises(ConfigError, match="regular file: it is not removed"):
            await srv2.start()
        assert path.read_text() == "precious"

    asyncio.run(go())


# fuzz property (the long form: `memballoon bench fuzz --target control`)
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                     | st.text(max_size=12),
                     lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "guest", "size", "last", "name", "qmp", "agent",
                                        "ram_bytes"]) | st.text(max_size=5), _json,
                       max_size=5)
       | st.fixed_dictionaries({"op": st.sampled_from(["status", "set", "journal",
                                                      "register_qemu"])},
                               optional={"guest": _json, "size": _json | st.text(max_size=30),
                                         "last": _json}))
def test_any_request_is_answered_with_json_and_no_internal_error(req: dict[str, Any]) -> None:
    class Daemon(Target):
        async def op_set(self, guest: str, size: str | int, force: bool = False) -> dict[str, Any]:
            return {"guest": guest, "bytes": None if size == "auto" else parse_size(size)}

    srv = ControlServer(Daemon(), "/nonexistent/m.sock", counters=Counters())
    reply = asyncio.run(srv.handle_line(json.dumps(req).encode()))
    json.dumps(reply, default=str)
    assert isinstance(reply["ok"], bool) and srv.counters["control_internal_error"] == 0


def test_a_socket_path_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for bad, why in [(tmp_path / "file" / "m.sock", "is not a directory"),
                     (tmp_path / "file" / "sub" / "m.sock", "is not a directory"),
                     (tmp_path / "file", "regular file"),
                     (tmp_path / ("x" * 120) / "m.sock", "more than the 107")]:
        with pytest.raises(ConfigError, match=why):
            check_socket_path(bad)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.sock").symlink_to(tmp_path / "file")
    with pytest.raises(ConfigError, match="not a socket"):
        check_socket_path(tmp_path / "d" / "m.sock")
    check_socket_path(tmp_path / "new" / "dir" / "m.sock")  # made at start
    assert (tmp_path / "file").read_text() == "x"
