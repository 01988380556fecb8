"""QmpClient against a fake QMP server on a unix socket: good, malformed, late and missing replies.

The real-QEMU side of the client is exercised in test_qemu_launch.py.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.counters import Counters
from memballoon.model.errors import PeerError, UsageError
from memballoon.model.units import MIB, PAGE_SIZE
from memballoon.qemu.errors import (
    BalloonStuckError,
    DeviceNotActiveError,
    GuestGoneError,
    QmpCommandError,
    QmpReplyError,
    QmpTimeoutError,
)
from memballoon.qemu.qmp import STAT_MISSING, GuestStats, QmpClient

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": ["oob"]}}
RAM = 1024 * MIB

# A handler gets (command, arguments, id) and returns the raw bytes to send (b"" = no reply).
Handler = Callable[[str, dict[str, Any], object], Awaitable[bytes]]


def reply(ret: object, msg_id: object) -> bytes:
    return json.dumps({"return": ret, "id": msg_id}).encode() + b"\r\n"


class FakeQmp:
    """A QMP server speaking just enough of the protocol, with scripted misbehaviour."""

    def __init__(self, path: Path, handler: Handler, *, greet: bool = True) -> None:
        self.path = path
        self.handler = handler
        self.greet = greet
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> FakeQmp:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def event(self, name: str, data: object) -> None:
        for w in self.writers:
            w.write(json.dumps({"event": name, "data": data,
                                "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n")
            await w.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            if not self.greet:
                await reader.read()
                return
            writer.write(json.dumps(GREETING).encode() + b"\r\n")
            # qemu.qmp sends bare JSON objects with no newline, as QEMU's streaming parser allows
            decoder, buf = json.JSONDecoder(), ""
            while data := await reader.read(4096):
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    if not await self._command(msg, writer):
                        return
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def _command(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        cmd, args, msg_id = msg["execute"], msg.get("arguments", {}), msg.get("id")
        if cmd == "qmp_capabilities":
            writer.write(reply({}, msg_id))
            return True
        self.calls.append((cmd, args))
        out = await self.handler(cmd, args, msg_id)
        if out == b"CLOSE":
            writer.close()
            return False
        writer.write(out)
        await writer.drain()
        return True


def balloon_handler(state: dict[str, Any]) -> Handler:
    """A well-behaved device: balloon sets actual at once; stats as QEMU returns them."""

    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        match cmd:
            case "query-balloon":
                return reply({"actual": state["actual"]}, msg_id)
            case "balloon":
                state["actual"] = min(args["value"], RAM)
                return reply({}, msg_id)
            case "query-memory-size-summary":
                return reply({"base-memory": RAM, "plugged-memory": 0}, msg_id)
            case "qom-set":
                return reply({}, msg_id)
            case "qom-get":
                return reply(state["stats"], msg_id)
        return json.dumps({"error": {"class": "CommandNotFound", "desc": cmd},
                           "id": msg_id}).encode() + b"\n"

    return handle


def run(tmp_path: Path, handler: Handler, body: Callable[[FakeQmp, QmpClient], Awaitable[None]],
        *, greet: bool = True, timeout_s: float = 1.0) -> Counters:
    counters = Counters()

    async def main() -> None:
        fake = await FakeQmp(tmp_path / "qmp.sock", handler, greet=greet).start()
        client = QmpClient(fake.path, timeout_s=timeout_s, counters=counters)
        try:
            await body(fake, client)
        finally:
            await client.close()
            await fake.stop()

    asyncio.run(main())
    return counters


def test_query_set_and_page_conversion(tmp_path: Path) -> None:
    state: dict[str, Any] = {"actual": RAM}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        await qmp.connect()
        assert await qmp.query_balloon() == RAM
        assert await qmp.balloon_pages() == 0
        await qmp.set_logical_size(512 * MIB)
        assert ("balloon", {"value": 512 * MIB}) in fake.calls
        assert await qmp.balloon_pages() == 512 * MIB // PAGE_SIZE
        await qmp.set_balloon_pages(1000)
        assert await qmp.query_balloon() == RAM - 1000 * PAGE_SIZE
        assert await qmp.wait_logical_size(RAM - 1000 * PAGE_SIZE, timeout_s=1) == RAM - 4096000
        with pytest.raises(UsageError):
            await qmp.set_logical_size(0)
        with pytest.raises(UsageError):
            await qmp.set_balloon_pages(RAM // PAGE_SIZE)

    c = run(tmp_path, balloon_handler(state), body)
    assert c.total() == 0


def test_guest_stats_missing_values_are_none(tmp_path: Path) -> None:
    stats = {"stat-swap-in": 0, "stat-free-memory": 5 * MIB, "stat-total-memory": STAT_MISSING,
             "stat-unknown-future": 7}
    state: dict[str, Any] = {"actual": RAM, "stats": {"stats": stats, "last-update": 1700}}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        await qmp.enable_stats(2)
        assert fake.calls[-1] == ("qom-set", {"path": "/machine/peripheral/balloon0",
                                              "property": "guest-stats-polling-interval",
                                              "value": 2})
        s = await qmp.guest_stats()
        assert s == GuestStats(last_update_s=1700, swap_in_bytes=0, free_bytes=5 * MIB)
        assert s.total_bytes is None and s.major_faults is None

    run(tmp_path, balloon_handler(state), body)


@pytest.mark.parametrize(
    "bad",
    [
        {"stats": {"stat-swap-in": -1}, "last-update": 0},
        {"stats": {"stat-swap-in": "0"}, "last-update": 0},
        {"stats": {"stat-swap-in": 2**64}, "last-update": 0},
        {"stats": [], "last-update": 0},
        {"stats": {}},
        [],
        # found by `memballoon bench fuzz` (target qmp): last-update had no upper bound
        {"stats": {}, "last-update": 2**63},
        {"stats": {}, "last-update": 10**30},
    ],
)
def test_malformed_guest_stats(tmp_path: Path, bad: object) -> None:
    state: dict[str, Any] = {"actual": RAM, "stats": bad}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpReplyError):
            await qmp.guest_stats()

    assert run(tmp_path, balloon_handler(state), body)["qmp_bad_reply"] == 1


@pytest.mark.parametrize(
    "ret", [{}, {"actual": "1073741824"}, {"actual": True}, {"actual": -5}, {"actual": 0}, [1]]
)
def test_malformed_query_balloon_is_typed_and_counted(tmp_path: Path, ret: object) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        return reply(ret, msg_id)

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpReplyError):
            await qmp.query_balloon()

    assert run(tmp_path, handle, body)["qmp_bad_reply"] == 1


def test_actual_above_ram_is_rejected(tmp_path: Path) -> None:
    state: dict[str, Any] = {"actual": 2 * RAM}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpReplyError):
            await qmp.balloon_pages()

    assert run(tmp_path, balloon_handler(state), body)["qmp_bad_reply"] == 1


def test_reply_without_return_or_error(tmp_path: Path) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        return json.dumps({"id": msg_id, "surprise": 1}).encode() + b"\n"

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpReplyError):
            await qmp.query_balloon()

    assert run(tmp_path, handle, body)["qmp_bad_reply"] == 1


def test_device_not_active_and_other_errors(tmp_path: Path) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        cls = "DeviceNotActive" if cmd == "query-balloon" else "GenericError"
        return json.dumps({"error": {"class": cls, "desc": "No balloon device has been "
                                     "activated"}, "id": msg_id}).encode() + b"\n"

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(DeviceNotActiveError):
            await qmp.query_balloon()
        with pytest.raises(QmpCommandError) as info:
            await qmp.set_logical_size(MIB)
        assert info.value.error_class == "GenericError"
        assert qmp.connected  # errors are answers: the session stays up

    c = run(tmp_path, handle, body)
    assert c["qmp_device_not_active"] == 1 and c["qmp_command_error"] == 1


def test_missing_reply_times_out_and_late_reply_is_not_mistaken(tmp_path: Path) -> None:
    n = {"calls": 0}

    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        n["calls"] += 1
        if n["calls"] == 1:
            return b""  # never answered
        if n["calls"] == 2:
            await asyncio.sleep(0.5)  # answered after the client gave up
            return reply({"actual": 111 * MIB}, msg_id)
        return reply({"actual": 222 * MIB}, msg_id)

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpTimeoutError):
            await qmp.query_balloon()
        with pytest.raises(QmpTimeoutError):
            await qmp.query_balloon()
        await asyncio.sleep(0.5)  # the late reply arrives and must be dropped
        assert await qmp.query_balloon() == 222 * MIB

    c = run(tmp_path, handle, body, timeout_s=0.2)
    assert c["qmp_timeout"] == 2


def test_no_greeting_times_out(tmp_path: Path) -> None:
    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpTimeoutError):
            await qmp.connect()

    c = run(tmp_path, balloon_handler({}), body, greet=False, timeout_s=0.2)
    assert c["qmp_timeout"] == 1


def test_garbage_once_reconnects_and_retries(tmp_path: Path) -> None:
    n = {"calls": 0}

    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        n["calls"] += 1
        if n["calls"] == 1:
            return b"{this is not json\n"
        return reply({"actual": 300 * MIB}, msg_id)

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        assert await qmp.query_balloon() == 300 * MIB
        assert fake.connections == 2

    c = run(tmp_path, handle, body)
    assert c["qmp_bad_reply"] == 1 and c["qmp_reconnect"] == 1


def test_garbage_every_time_is_a_reply_error(tmp_path: Path) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        return b"\x00\xff garbage\n"

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(QmpReplyError):
            await qmp.query_balloon()

    assert run(tmp_path, handle, body)["qmp_bad_reply"] == 2


def test_dropped_socket_reconnects_and_retries(tmp_path: Path) -> None:
    n = {"calls": 0}

    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        n["calls"] += 1
        return b"CLOSE" if n["calls"] == 1 else reply({"actual": RAM}, msg_id)

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        assert await qmp.query_balloon() == RAM
        assert fake.connections == 2

    c = run(tmp_path, handle, body)
    assert c["qmp_disconnect"] == 1 and c["qmp_reconnect"] == 1


def test_server_gone_is_guest_gone(tmp_path: Path) -> None:
    state: dict[str, Any] = {"actual": RAM}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        assert await qmp.query_balloon() == RAM
        await fake.stop()  # QEMU exits: the listening socket disappears
        with pytest.raises(GuestGoneError):
            await qmp.query_balloon()
        fake.server = await asyncio.start_unix_server(fake._serve, path=str(fake.path))
        assert await qmp.query_balloon() == RAM  # a restarted monitor is picked up again

    c = run(tmp_path, balloon_handler(state), body)
    assert c["qmp_connect_failed"] == 1


def test_connect_to_missing_socket(tmp_path: Path) -> None:
    async def main() -> None:
        c = Counters()
        qmp = QmpClient(tmp_path / "nothing.sock", counters=c)
        with pytest.raises(GuestGoneError):
            await qmp.connect(wait_s=0.2)
        assert c["qmp_connect_failed"] == 1
        assert isinstance(GuestGoneError("x"), PeerError)

    asyncio.run(main())


def test_balloon_change_events_are_hints(tmp_path: Path) -> None:
    state: dict[str, Any] = {"actual": RAM}

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        await qmp.connect()
        await fake.event("BALLOON_CHANGE", {"actual": 700 * MIB})
        await fake.event("BALLOON_CHANGE", {"actual": "lots"})
        await fake.event("SHUTDOWN", {"guest": True})
        for _ in range(2000):  # a flood of events costs counters, not memory
            await fake.event("RTC_CHANGE", {"offset": 1})
        assert await qmp.query_balloon() == RAM  # query-balloon stays the truth
        assert qmp.last_change_bytes == 700 * MIB
        assert qmp.shutdown_seen

    c = run(tmp_path, balloon_handler(state), body)
    assert c["qmp_event_balloon_change"] == 1 and c["qmp_bad_event"] == 1
    assert c["qmp_event_other"] == 2000


def test_balloon_that_does_not_move_is_stuck(tmp_path: Path) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        # like QEMU with RAM discard inhibited: the command succeeds, actual never moves
        return reply({"actual": RAM} if cmd == "query-balloon" else {}, msg_id)

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        await qmp.set_logical_size(512 * MIB)
        with pytest.raises(BalloonStuckError):
            await qmp.wait_logical_size(512 * MIB, timeout_s=5, stall_s=0.3, poll_s=0.05)

    assert run(tmp_path, handle, body)["qmp_balloon_stuck"] == 1


def test_bad_timeout_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        QmpClient(tmp_path / "x", timeout_s=0)


def test_socket_dropping_on_every_command_is_guest_gone(tmp_path: Path) -> None:
    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        return b"CLOSE"

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        with pytest.raises(GuestGoneError):
            await qmp.query_balloon()

    assert run(tmp_path, handle, body)["qmp_disconnect"] == 2


# fuzz property (the long form: `memballoon bench fuzz --target qmp`): every reply QEMU could
# send for the balloon's commands, through the real qemu.qmp client
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats()
                     | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.sampled_from(["actual", "base-memory", "stats",
                                                        "last-update", "stat-free-memory",
                                                        "class", "desc"]) | st.text(max_size=4),
                                       kids, max_size=4), max_leaves=10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["return", "error", "other"]), _json), min_size=1,
                max_size=6))
def test_any_reply_is_a_value_in_range_or_a_typed_error(
        replies: list[tuple[str, object]]) -> None:
    left = list(replies)

    async def handle(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        key, value = left.pop(0) if left else ("return", {})
        return json.dumps({key: value, "id": msg_id}).encode() + b"\n"

    async def body(fake: FakeQmp, qmp: QmpClient) -> None:
        for call in (qmp.query_balloon, qmp.balloon_pages, qmp.guest_stats):
            try:
                got = await call()
            except PeerError:
                continue
            if isinstance(got, GuestStats):
                assert got.last_update_s >= 0
                assert all(v is None or 0 <= v < STAT_MISSING for v in vars(got).values())
            else:
                assert got >= 0

    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), handle, body, timeout_s=0.5)
