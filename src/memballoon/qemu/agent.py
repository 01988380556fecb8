"""The in-guest agent's reports: parsing (pure) and the virtio-serial channel (I/O).

The guest writes ONE JSON line a second (schema v1, written by initscript.py's agent):
    {"v": 1, "t": <guest uptime s>,
     "meminfo": {"MemTotal", "MemFree", "MemAvailable", "Cached", "SwapTotal", "SwapFree"} (kB),
     "psi": {"some_avg10", "some_total", "full_avg10", "full_total"} | null,
     "vmstat": {"pswpin", "pswpout", "pgmajfault", "oom_kill", "balloon_inflate",
                "balloon_deflate"}}
PSI is Linux's /proc/pressure/memory (Documentation/accounting/psi.rst: avg10 in percent,
total in microseconds); vmstat counters are /proc/vmstat's (pswpin/pswpout in pages;
balloon_inflate/balloon_deflate: pages the balloon driver took and gave back since boot,
counted by mm/balloon_compaction.c, so their difference is the balloon *as the guest saw it
when it wrote the line*). Any field may be null or absent (older kernels, no PSI, an older
agent): it becomes None.

The guest is untrusted: a line that is not valid JSON, has the wrong shape or version, holds
out-of-range numbers or is longer than ``MAX_LINE_BYTES`` raises AgentError after bumping a
named counter; nothing else escapes. The channel keeps only the latest report, so a guest
that floods costs a bounded buffer and CPU, never unbounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from memballoon.edge.clock import MonotonicClock
from memballoon.manager.port import Clock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import KIB, PAGE_SIZE
from memballoon.protocol.pressure import MAX_VALUE as REPORT_MAX_VALUE
from memballoon.protocol.pressure import PressureReport
from memballoon.qemu.errors import AgentError, GuestGoneError

AGENT_SCHEMA_VERSION = 1
#: A real report is about 330 bytes; anything past this is a flood or garbage.
MAX_LINE_BYTES = 4096
#: Counters, kB and microsecond totals above this are not believable (2^53: exact in JSON).
_MAX_VALUE = 2**53


class AgentCounter(CounterName):
    """What the agent's parser and channel count (every line the guest sends is untrusted)."""

    AGENT_REPORTS = "agent_reports"  # lines accepted as reports
    AGENT_LINE_TOO_LONG = "agent_line_too_long"  # lines over the length limit (dropped whole)
    AGENT_BAD_JSON = "agent_bad_json"  # lines that are not UTF-8 JSON, or hold NaN/Infinity
    AGENT_BAD_SCHEMA = "agent_bad_schema"  # JSON of the wrong shape (not an object, no uptime)
    AGENT_BAD_VERSION = "agent_bad_version"  # reports of another schema version
    AGENT_BAD_VALUE = "agent_bad_value"  # numbers of the wrong type or out of range
    AGENT_CONNECT_FAILED = "agent_connect_failed"  # connections to the agent socket given up
    AGENT_EOF = "agent_eof"  # agent sockets that closed or failed


@dataclass(frozen=True)
class AgentReport:
    """One agent report, in bytes and counts. None = the guest did not report it."""

    guest: str
    uptime_s: float
    mem_total_bytes: int | None = None
    mem_free_bytes: int | None = None
    mem_available_bytes: int | None = None
    cached_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None
    swap_in_pages: int | None = None  # vmstat pswpin (cumulative)
    swap_out_pages: int | None = None  # vmstat pswpout (cumulative)
    major_faults: int | None = None  # vmstat pgmajfault (cumulative)
    oom_kills: int | None = None  # vmstat oom_kill (cumulative)
    balloon_inflated_pages: int | None = None  # vmstat balloon_inflate (cumulative)
    balloon_deflated_pages: int | None = None  # vmstat balloon_deflate (cumulative)
    psi_some_avg10: float | None = None  # percent of the last 10 s some task stalled on memory
    psi_some_total_us: int | None = None
    psi_full_avg10: float | None = None  # percent of the last 10 s all tasks stalled
    psi_full_total_us: int | None = None

    @property
    def guest_balloon_pages(self) -> int | None:
        """The balloon when the guest wrote this report (inflated minus deflated pages), or
        None when the guest did not say (or its counters are impossible)."""
        i, d = self.balloon_inflated_pages, self.balloon_deflated_pages
        if i is None or d is None or d > i:
            return None
        return i - d


_MEMINFO: Mapping[str, str] = {
    "MemTotal": "mem_total_bytes",
    "MemFree": "mem_free_bytes",
    "MemAvailable": "mem_available_bytes",
    "Cached": "cached_bytes",
    "SwapTotal": "swap_total_bytes",
    "SwapFree": "swap_free_bytes",
}
_VMSTAT: Mapping[str, str] = {
    "pswpin": "swap_in_pages",
    "pswpout": "swap_out_pages",
    "pgmajfault": "major_faults",
    "oom_kill": "oom_kills",
    "balloon_inflate": "balloon_inflated_pages",
    "balloon_deflate": "balloon_deflated_pages",
}
_PSI_TOTALS: Mapping[str, str] = {"some_total": "psi_some_total_us",
                                  "full_total": "psi_full_total_us"}
_PSI_AVGS: Mapping[str, str] = {"some_avg10": "psi_some_avg10", "full_avg10": "psi_full_avg10"}


class _Reject(Exception):
    """Internal: carries the counter out of the validators."""

    def __init__(self, counter: AgentCounter, why: str) -> None:
        super().__init__(why)
        self.counter = counter


def _reject_constant(name: str) -> float:
    raise _Reject(AgentCounter.AGENT_BAD_JSON, f"non-JSON constant {name}")


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_VALUE:
        raise _Reject(AgentCounter.AGENT_BAD_VALUE, f"{what} is not a count: {value!r:.40}")
    return value


def _percent(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject(AgentCounter.AGENT_BAD_VALUE, f"{what} is not a number: {value!r:.40}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 100.0):
        raise _Reject(AgentCounter.AGENT_BAD_VALUE, f"{what} is not a percentage: {number}")
    return number


def _section(doc: Mapping[str, object], key: str, required: bool) -> Mapping[str, object]:
    value = doc.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _Reject(AgentCounter.AGENT_BAD_SCHEMA, f"{key} is not an object")
    return value


def _parse(line: bytes | str, guest: str) -> AgentReport:
    if len(line) > MAX_LINE_BYTES:
        raise _Reject(AgentCounter.AGENT_LINE_TOO_LONG, f"line of {len(line)} bytes")
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, depth
        raise _Reject(AgentCounter.AGENT_BAD_JSON, f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _Reject(AgentCounter.AGENT_BAD_SCHEMA, "not a JSON object")
    version = doc.get("v")
    if isinstance(version, bool) or version != AGENT_SCHEMA_VERSION:
        raise _Reject(AgentCounter.AGENT_BAD_VERSION, f"schema version {version!r:.20}, want 1")
    uptime = doc.get("t")
    if isinstance(uptime, bool) or not isinstance(uptime, int | float):
        raise _Reject(AgentCounter.AGENT_BAD_SCHEMA, "t (uptime) missing or not a number")
    uptime_s = float(uptime)
    if not (math.isfinite(uptime_s) and 0.0 <= uptime_s < _MAX_VALUE):
        raise _Reject(AgentCounter.AGENT_BAD_VALUE, f"uptime {uptime_s} out of range")
    fields: dict[str, int | float | None] = {}
    meminfo = _section(doc, "meminfo", required=True)
    for key, name in _MEMINFO.items():
        kib = _count(meminfo.get(key), key)
        fields[name] = None if kib is None else kib * KIB
    vmstat = _section(doc, "vmstat", required=False)
    for key, name in _VMSTAT.items():
        fields[name] = _count(vmstat.get(key), key)
    psi = _section(doc, "psi", required=False)
    for key, name in _PSI_TOTALS.items():
        fields[name] = _count(psi.get(key), key)
    for key, name in _PSI_AVGS.items():
        fields[name] = _percent(psi.get(key), key)
    return AgentReport(guest, uptime_s, **fields)  # type: ignore[arg-type]


def parse_report(line: bytes | str, *, guest: str, counters: Counters) -> AgentReport:
    """One agent line -> AgentReport; AgentError (counted) for anything else."""
    try:
        report = _parse(line, guest)
    except _Reject as exc:
        counters.inc(exc.counter)
        raise AgentError(f"{guest}: agent line rejected: {exc}") from None
    counters.inc(AgentCounter.AGENT_REPORTS)
    return report


def _cap(value: int) -> int:
    # PressureReport refuses values above 2^53 (not exact in JSON doubles); the agent's kB
    # figures times 1024 can exceed it only for a lying guest.
    return max(0, min(value, REPORT_MAX_VALUE))


def to_pressure_report(
    agent: AgentReport,
    *,
    ram_bytes: int,
    balloon_target_pages: int,
    balloon_actual_pages: int,
    prev: AgentReport | None,
    period_s: float,
) -> PressureReport:
    """The manager's one report shape (protocol/pressure.py) from an agent report.

    The report's balloon is the one the guest saw when it wrote the line
    (``AgentReport.guest_balloon_pages``) where the guest says, else ``balloon_actual_pages``,
    the caller's best figure for that moment: MemAvailable and the balloon must be of one
    moment, or a balloon that moved in between reads as a working-set jump.

    ``stall_pct`` is the share of the time between ``prev`` and ``agent`` (guest uptime, or
    ``period_s`` when the uptimes do not advance) that PSI ``some.total`` grew by; without a
    usable ``prev`` it is PSI's own ``some avg10``. Anonymous memory is not in the agent's
    line: it is estimated as MemTotal - MemFree - Cached (never below 0). Figures the guest
    did not report become neutral values: total = RAM minus balloon, free/cache 0,
    available = free + cache, counters and stall 0.
    """
    seen = agent.guest_balloon_pages
    if seen is not None and seen * PAGE_SIZE < ram_bytes:
        balloon_actual_pages = seen
    balloon_bytes = balloon_actual_pages * PAGE_SIZE
    total = agent.mem_total_bytes
    if total is None:
        total = max(0, ram_bytes - balloon_bytes)
    free = agent.mem_free_bytes or 0
    cache = agent.cached_bytes or 0
    available = agent.mem_available_bytes
    if available is None:
        available = free + cache
    anon = max(0, total - free - cache)
    stall_us = agent.psi_some_total_us or 0
    stall_pct = agent.psi_some_avg10 or 0.0
    if (prev is not None and prev.psi_some_total_us is not None
            and agent.psi_some_total_us is not None
            and agent.psi_some_total_us >= prev.psi_some_total_us):
        span_s = agent.uptime_s - prev.uptime_s
        if span_s <= 0:
            span_s = period_s
        if span_s > 0:
            grown_us = agent.psi_some_total_us - prev.psi_some_total_us
            stall_pct = min(100.0, 100.0 * grown_us / (span_s * 1e6))
    return PressureReport(
        guest=agent.guest,
        time_s=min(agent.uptime_s, float(REPORT_MAX_VALUE)),
        total_bytes=_cap(total),
        free_bytes=_cap(free),
        available_bytes=_cap(available),
        anon_bytes=_cap(anon),
        cache_bytes=_cap(cache),
        balloon_bytes=_cap(balloon_bytes),
        swap_in_pages=_cap(agent.swap_in_pages or 0),
        swap_out_pages=_cap(agent.swap_out_pages or 0),
        major_faults=_cap(agent.major_faults or 0),
        oom_kills=_cap(agent.oom_kills or 0),
        stall_us=_cap(stall_us),
        stall_pct=max(0.0, stall_pct),
        balloon_target_pages=_cap(balloon_target_pages),
        balloon_actual_pages=_cap(balloon_actual_pages),
        refused_pages=None,  # Linux's virtio_balloon has no refusals
    )


class LineSplitter:
    """Splits a byte stream into lines of at most ``max_line_bytes`` (newline excluded).

    A longer line is dropped whole (counted once as ``agent_line_too_long``) and the
    splitter resynchronises at the next newline, holding at most ``max_line_bytes`` bytes.
    """

    def __init__(self, counters: Counters, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._counters = counters
        self._max = max_line_bytes
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            if not self._skipping:
                if len(self._buf) + len(chunk) > self._max:
                    self._counters.inc(AgentCounter.AGENT_LINE_TOO_LONG)
                    self._buf.clear()
                    self._skipping = True
                else:
                    self._buf += chunk
            if nl < 0:
                break
            if not self._skipping:
                lines.append(bytes(self._buf))
            self._buf.clear()
            self._skipping = False
            start = nl + 1
        return lines


class AgentChannel:
    """The host end of a guest's agent port (QEMU's ``agent.sock`` chardev).

    Once connected, a reader task consumes the socket continuously and keeps only the newest
    valid report (``latest``): pressure is a level, a backlog of old lines is worth nothing.
    Garbage is counted and skipped. Commands for the test image's init (``hog N``,
    ``unhog``, ``mark X``...) go the other way with ``send_command``."""

    def __init__(
        self, socket_path: str | Path, *, guest: str, counters: Counters | None = None,
        max_line_bytes: int = MAX_LINE_BYTES, clock: Clock | None = None,
    ) -> None:
        self.socket_path = str(socket_path)
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.guest = guest
        self.counters = counters if counters is not None else Counters()
        self._splitter = LineSplitter(self.counters, max_line_bytes)
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._seq = 0
        self._gone: GuestGoneError | None = None
        #: The newest valid report, or None before the first one.
        self.latest: AgentReport | None = None
        #: When it arrived, on ``clock`` (the engine's): a report's age is counted from here.
        self.latest_time: float | None = None

    @property
    def gone(self) -> bool:
        return self._gone is not None

    async def connect(self, *, wait_s: float = 0.0) -> None:
        """Open the socket (retrying for ``wait_s`` while QEMU starts) and start reading."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    self.counters.inc(AgentCounter.AGENT_CONNECT_FAILED)
                    raise GuestGoneError(
                        f"{self.guest}: cannot reach the agent socket {self.socket_path}: {exc}"
                    ) from exc
                await asyncio.sleep(0.05)
        self._gone = None
        self._task = asyncio.create_task(self._pump(reader), name=f"agent-{self.guest}")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(65536):
                for line in self._splitter.feed(data):
                    try:
                        report = parse_report(line, guest=self.guest, counters=self.counters)
                    except AgentError:
                        continue
                    self.latest, self.latest_time = report, self.clock.now()
                    self._seq += 1
                self._changed.set()
            self.counters.inc(AgentCounter.AGENT_EOF)
            self._gone = GuestGoneError(f"{self.guest}: agent socket closed (QEMU gone?)")
        except OSError as exc:
            self.counters.inc(AgentCounter.AGENT_EOF)
            self._gone = GuestGoneError(f"{self.guest}: agent socket failed: {exc}")
        finally:
            self._changed.set()

    async def read_report(self, timeout_s: float) -> AgentReport:
        """The next report newer than the current ``latest``.

        GuestGoneError when the socket closed, TimeoutError after ``timeout_s``."""
        if self._task is None:
            await self.connect()
        seq = self._seq
        async with asyncio.timeout(timeout_s):
            while True:
                if self._seq != seq and self.latest is not None:
                    return self.latest
                if self._gone is not None:
                    raise self._gone
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(
        self, predicate: Callable[[AgentReport], bool], timeout_s: float
    ) -> AgentReport:
        """The first new report for which ``predicate`` holds (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout_s):
            while True:
                report = await self.read_report(timeout_s)
                if predicate(report):
                    return report

    async def send_command(self, command: str) -> None:
        if "\n" in command or len(command) > 200:
            raise UsageError(f"bad agent command {command!r:.60}")
        if self._writer is None:
            await self.connect()
        writer = self._writer
        assert writer is not None
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
        except OSError as exc:
            raise GuestGoneError(f"{self.guest}: agent socket failed: {exc}") from exc

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> AgentChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
