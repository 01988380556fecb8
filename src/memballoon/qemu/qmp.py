"""An asyncio QMP client for QEMU's virtio-balloon, on the ``qemu.qmp`` library.

Units are converted here and nowhere else: QMP speaks the guest's *logical size* in bytes
(RAM minus balloon: ``balloon {"value"}``, ``query-balloon`` -> ``actual``), memballoon speaks
balloon pages of 4 KiB: ``balloon_pages = (ram_bytes - logical_bytes) // PAGE_SIZE``.
Semantics from QEMU qapi/machine.json and hw/virtio/virtio-balloon.c, as measured in
../shared/notes/virtio-balloon.md:

- ``BALLOON_CHANGE`` events carry intermediate values about once a second: kept as a hint
  (``last_change_bytes``), never as the truth; ``query-balloon`` is the truth.
- Guest stats need ``qom-set guest-stats-polling-interval`` first; until the guest answers,
  every stat reads 2^64-1, which we report as None.
- A missing balloon device answers with error class ``DeviceNotActive``.

Every call has a timeout. When the socket drops (QEMU restarted its monitor, or a reply was
garbage and qemu.qmp hung up), the client reconnects once and retries: every command used
here is idempotent. When the socket cannot be reopened QEMU is gone: GuestGoneError.
All peer misbehaviour bumps a named counter in ``counters`` before the typed error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError, Runstate, StateError
from qemu.qmp.qmp_client import BadReplyError

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SHIFT, PAGE_SIZE
from memballoon.qemu.errors import (
    BalloonStuckError,
    DeviceNotActiveError,
    GuestGoneError,
    QmpCommandError,
    QmpReplyError,
    QmpTimeoutError,
)


class QmpCounter(CounterName):
    """What ``QmpClient`` counts (QEMU's monitor is a peer: each misbehaviour has its name)."""

    QMP_TIMEOUT = "qmp_timeout"  # greetings or replies that did not come within timeout_s
    QMP_CONNECT_FAILED = "qmp_connect_failed"  # connections to the monitor given up
    QMP_RECONNECT = "qmp_reconnect"  # reconnects after a dropped session
    QMP_DISCONNECT = "qmp_disconnect"  # sessions that dropped during a command
    QMP_BAD_REPLY = "qmp_bad_reply"  # replies that were malformed or held impossible values
    QMP_DEVICE_NOT_ACTIVE = "qmp_device_not_active"  # commands refused: no active balloon device
    QMP_COMMAND_ERROR = "qmp_command_error"  # commands refused with another error class
    QMP_EVENT_BALLOON_CHANGE = "qmp_event_balloon_change"  # BALLOON_CHANGE events taken as a hint
    QMP_BAD_EVENT = "qmp_bad_event"  # BALLOON_CHANGE events without a positive actual
    QMP_EVENT_SHUTDOWN = "qmp_event_shutdown"  # SHUTDOWN events
    QMP_EVENT_OTHER = "qmp_event_other"  # other events (ignored)
    QMP_BALLOON_STUCK = "qmp_balloon_stuck"  # waits for the logical size given up (stalled or late)


#: QOM path of the balloon when launched with ``-device virtio-balloon-pci,id=balloon0``.
BALLOON_QOM_PATH = "/machine/peripheral/balloon0"
#: QEMU fills every guest stat with this until the guest has answered (virtio-balloon.c).
STAT_MISSING = 2**64 - 1
DEFAULT_TIMEOUT_S = 5.0

# QMP guest-stats names (QEMU hw/virtio/virtio-balloon.c balloon_stat_names) -> our fields.
_STAT_FIELDS: Mapping[str, str] = {
    "stat-swap-in": "swap_in_bytes",
    "stat-swap-out": "swap_out_bytes",
    "stat-major-faults": "major_faults",
    "stat-minor-faults": "minor_faults",
    "stat-free-memory": "free_bytes",
    "stat-total-memory": "total_bytes",
    "stat-available-memory": "available_bytes",
    "stat-disk-caches": "disk_caches_bytes",
    "stat-htlb-pgalloc": "htlb_pgalloc",
    "stat-htlb-pgfail": "htlb_pgfail",
}


@dataclass(frozen=True)
class GuestStats:
    """Balloon statistics as QEMU last received them from the guest; None = not reported."""

    last_update_s: int  # host epoch seconds of the guest's last answer; 0 = never
    swap_in_bytes: int | None = None
    swap_out_bytes: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    available_bytes: int | None = None
    disk_caches_bytes: int | None = None
    htlb_pgalloc: int | None = None
    htlb_pgfail: int | None = None


class _Client(QMPClient):
    """qemu.qmp's client without its default event queue (unbounded: a flood would grow it).

    Events go to one callback that keeps only what we use.
    """

    def __init__(self, owner: QmpClient) -> None:
        super().__init__(owner.name)
        self._owner = owner

    async def _event_dispatch(self, msg: Any) -> None:
        self._owner._on_event(msg)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class QmpClient:
    """One guest's QMP monitor. Not safe for concurrent calls from several tasks at once."""

    def __init__(
        self,
        socket_path: str | Path,
        *,
        ram_bytes: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        counters: Counters | None = None,
        qom_path: str = BALLOON_QOM_PATH,
        name: str = "memballoon",
    ) -> None:
        if timeout_s <= 0 or not math.isfinite(timeout_s):
            raise UsageError(f"timeout_s must be positive, got {timeout_s}")
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.counters = counters if counters is not None else Counters()
        self.qom_path = qom_path
        self.name = name
        self._ram_bytes = ram_bytes
        self._qmp: _Client | None = None
        #: Last logical size seen in a BALLOON_CHANGE event (a hint only), in bytes.
        self.last_change_bytes: int | None = None
        #: True once QEMU announced SHUTDOWN: the guest is going away.
        self.shutdown_seen = False

    # --- connection -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._qmp is not None and self._qmp.runstate == Runstate.RUNNING

    async def connect(self, *, wait_s: float = 0.0) -> None:
        """Open the socket and negotiate capabilities; with ``wait_s``, keep trying that long
        while the socket does not exist yet (QEMU just started). Raises GuestGoneError."""
        deadline = time.monotonic() + wait_s
        while True:
            last_try = time.monotonic() >= deadline
            try:
                await self._connect_once(count=last_try)
                return
            except GuestGoneError:
                if last_try:
                    raise
                await asyncio.sleep(0.05)

    async def _connect_once(self, *, count: bool = True) -> None:
        await self._drop()
        qmp = _Client(self)
        try:
            await asyncio.wait_for(qmp.connect(self.socket_path), self.timeout_s)
        except TimeoutError as exc:
            self.counters.inc(QmpCounter.QMP_TIMEOUT)
            await _quiet_disconnect(qmp)
            raise QmpTimeoutError(
                f"{self.socket_path}: no QMP greeting within {self.timeout_s} s"
            ) from exc
        except (ConnectError, OSError, EOFError, QMPError) as exc:
            if count:
                self.counters.inc(QmpCounter.QMP_CONNECT_FAILED)
            await _quiet_disconnect(qmp)
            raise GuestGoneError(f"{self.socket_path}: cannot reach QEMU's monitor: {exc}") from exc
        self._qmp = qmp

    async def _drop(self) -> BaseException | None:
        """Close the current session; return what killed it, if anything did."""
        qmp, self._qmp = self._qmp, None
        return None if qmp is None else await _quiet_disconnect(qmp)

    async def close(self) -> None:
        await self._drop()

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the one path every command takes -------------------------------------------

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one idempotent QMP command: timeout, error mapping, one reconnect-and-retry."""
        for attempt in (0, 1):
            if not self.connected:
                cause = await self._drop()
                if cause is not None or attempt:
                    self.counters.inc(QmpCounter.QMP_RECONNECT)
                await self._connect_once()
            qmp = self._qmp
            assert qmp is not None
            try:
                return await asyncio.wait_for(qmp.execute(command, arguments), self.timeout_s)
            except TimeoutError as exc:
                self.counters.inc(QmpCounter.QMP_TIMEOUT)
                raise QmpTimeoutError(
                    f"{command}: no reply from QEMU within {self.timeout_s} s"
                ) from exc
            except ExecuteError as exc:
                raise self._command_error(command, exc) from exc
            except BadReplyError as exc:
                self.counters.inc(QmpCounter.QMP_BAD_REPLY)
                raise QmpReplyError(f"{command}: malformed reply: {exc}") from exc
            except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
                cause = await self._drop()
                if cause is None or isinstance(cause, EOFError | OSError):
                    self.counters.inc(QmpCounter.QMP_DISCONNECT)
                    if attempt:
                        raise GuestGoneError(f"{command}: QMP socket dropped twice") from exc
                else:  # qemu.qmp hung up on a reply it could not parse
                    self.counters.inc(QmpCounter.QMP_BAD_REPLY)
                    if attempt:
                        raise QmpReplyError(f"{command}: unparseable reply: {cause!r}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _command_error(self, command: str, exc: ExecuteError) -> Exception:
        error_class = str(exc.error_class)
        if error_class == "DeviceNotActive":
            self.counters.inc(QmpCounter.QMP_DEVICE_NOT_ACTIVE)
            return DeviceNotActiveError(f"{command}: no active balloon device: {exc}")
        self.counters.inc(QmpCounter.QMP_COMMAND_ERROR)
        return QmpCommandError(f"{command}: QEMU refused: {error_class}: {exc}", error_class)

    def _on_event(self, msg: Any) -> None:
        event = msg.get("event") if isinstance(msg, Mapping) else None
        if event == "BALLOON_CHANGE":
            data = msg.get("data")
            actual = data.get("actual") if isinstance(data, Mapping) else None
            if _is_int(actual) and actual > 0:
                self.counters.inc(QmpCounter.QMP_EVENT_BALLOON_CHANGE)
                self.last_change_bytes = actual
            else:
                self.counters.inc(QmpCounter.QMP_BAD_EVENT)
        elif event == "SHUTDOWN":
            self.shutdown_seen = True
            self.counters.inc(QmpCounter.QMP_EVENT_SHUTDOWN)
        else:
            self.counters.inc(QmpCounter.QMP_EVENT_OTHER)

    def _bad(self, what: str) -> QmpReplyError:
        self.counters.inc(QmpCounter.QMP_BAD_REPLY)
        return QmpReplyError(what)

    # --- balloon ---------------------------------------------------------------------

    async def ram_bytes(self) -> int:
        """The guest's RAM (``-m``) in bytes, from query-memory-size-summary (cached)."""
        if self._ram_bytes is None:
            reply = await self.execute("query-memory-size-summary")
            base = reply.get("base-memory") if isinstance(reply, Mapping) else None
            if not _is_int(base) or base <= 0:
                raise self._bad(f"query-memory-size-summary: bad base-memory in {reply!r:.200}")
            self._ram_bytes = base
        return self._ram_bytes

    async def query_balloon(self) -> int:
        """The guest's logical size (RAM minus balloon) in bytes: query-balloon ``actual``."""
        reply = await self.execute("query-balloon")
        actual = reply.get("actual") if isinstance(reply, Mapping) else None
        if not _is_int(actual) or actual <= 0:
            raise self._bad(f"query-balloon: bad actual in {reply!r:.200}")
        return int(actual)

    async def balloon_pages(self) -> int:
        """The balloon's size in 4 KiB pages."""
        ram = await self.ram_bytes()
        logical = await self.query_balloon()
        if logical > ram:
            raise self._bad(f"query-balloon: actual {logical} above RAM {ram}")
        return (ram - logical) >> PAGE_SHIFT

    async def set_logical_size(self, size_bytes: int) -> None:
        """QMP ``balloon``: ask the guest to settle at ``size_bytes`` of usable RAM.

        QEMU clamps a value above RAM to RAM; the guest moves asynchronously."""
        if size_bytes <= 0:
            raise UsageError(f"logical size must be positive, got {size_bytes}")
        await self.execute("balloon", {"value": size_bytes})

    async def set_balloon_pages(self, pages: int) -> None:
        """Ask for a balloon of ``pages`` 4 KiB pages."""
        ram = await self.ram_bytes()
        if pages < 0 or pages * PAGE_SIZE >= ram:
            raise UsageError(f"balloon of {pages} pages does not fit {ram} bytes of RAM")
        await self.set_logical_size(ram - pages * PAGE_SIZE)

    async def wait_logical_size(
        self,
        target_bytes: int,
        *,
        timeout_s: float,
        tolerance_bytes: int = 4 << 20,
        stall_s: float = 5.0,
        poll_s: float = 0.1,
    ) -> int:
        """Poll query-balloon until the logical size is within tolerance of the target.

        Raises BalloonStuckError when it has not moved for ``stall_s`` (discard inhibited,
        or the guest cannot give more) or is still short at ``timeout_s``."""
        start = time.monotonic()
        last = await self.query_balloon()
        last_move = start
        while abs(last - target_bytes) > tolerance_bytes:
            now = time.monotonic()
            if now - last_move > stall_s or now - start > timeout_s:
                self.counters.inc(QmpCounter.QMP_BALLOON_STUCK)
                raise BalloonStuckError(
                    f"balloon stuck at {last} bytes logical, target {target_bytes}"
                )
            await asyncio.sleep(poll_s)
            actual = await self.query_balloon()
            if actual != last:
                last, last_move = actual, time.monotonic()
        return last

    # --- guest stats -----------------------------------------------------------------

    async def enable_stats(self, interval_s: int) -> None:
        """Ask the guest for balloon stats every ``interval_s`` seconds (0 turns them off)."""
        if interval_s < 0:
            raise UsageError(f"stats interval must be >= 0, got {interval_s}")
        await self.execute(
            "qom-set",
            {"path": self.qom_path, "property": "guest-stats-polling-interval",
             "value": interval_s},
        )

    async def guest_stats(self) -> GuestStats:
        reply = await self.execute(
            "qom-get", {"path": self.qom_path, "property": "guest-stats"}
        )
        if not isinstance(reply, Mapping):
            raise self._bad(f"guest-stats: not an object: {reply!r:.200}")
        stats = reply.get("stats")
        last = reply.get("last-update")
        # last-update is QEMU's time_t: an int64 of seconds, never negative
        if not isinstance(stats, Mapping) or not _is_int(last) or not 0 <= last < 1 << 63:
            raise self._bad(f"guest-stats: missing stats or last-update: {reply!r:.200}")
        values: dict[str, int | None] = {}
        for key, field in _STAT_FIELDS.items():
            raw = stats.get(key)
            if raw is None:
                continue
            if not _is_int(raw) or not 0 <= raw <= STAT_MISSING:
                raise self._bad(f"guest-stats: {key} is not a u64: {raw!r:.50}")
            values[field] = None if raw == STAT_MISSING else int(raw)
        return GuestStats(last_update_s=int(last), **values)


async def _quiet_disconnect(qmp: QMPClient) -> BaseException | None:
    """Disconnect; qemu.qmp re-raises there what killed the session, which we return."""
    try:
        await qmp.disconnect()
    except Exception as exc:
        return exc
    return None
