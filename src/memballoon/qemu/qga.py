"""A guest's memory pressure read through the QEMU guest agent (qemu-ga), for libvirt domains.

Where a domain runs qemu-ga (a ``org.qemu.guest_agent.0`` channel and the agent in the
guest), the host can read the guest's own files through it, with no memballoon code inside
the guest: ``/proc/meminfo``, ``/proc/vmstat`` (swap-ins, major faults, OOM kills and the
balloon driver's ``balloon_inflate``/``balloon_deflate``, so the report carries the balloon
the guest saw) and ``/proc/pressure/memory`` (PSI; absent on kernels before 4.20 or booted
with ``psi=0``: the report then has no stall figure, and ``psi_missing`` counts it).

Each file costs three commands (QEMU qga/qapi-schema.json): ``guest-file-open`` {path, mode}
-> handle; ``guest-file-read`` {handle, count} -> {count, buf-b64, eof}; ``guest-file-close``.
The caller passes ``command``: one JSON command in, the agent's JSON reply out (libvirt's
``qemuAgentCommand`` bound to a domain and a timeout), raising ``QgaUnresponsiveError`` when
the agent is absent or slow and ``QgaRefusedError`` when it answers with an error. Replies are
untrusted: anything but the documented shape, a file over ``MAX_FILE_BYTES`` or text that does
not parse is a ``GuestAgentError`` after a ``QgaCounter``; a handle is always closed.

The report's ``uptime_s`` is the caller's clock at the read (the engine's): the guest's own
uptime would cost three more round trips a period, and the stall share needs only a span.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Final

from memballoon.model.counters import CounterName, Counters
from memballoon.protocol.procfs import HostMemoryError, parse_meminfo, parse_psi, parse_stat
from memballoon.qemu.agent import AgentReport
from memballoon.qemu.errors import GuestAgentError, QgaRefusedError
from memballoon.qemu.initscript import QGA_PORT_NAME

MEMINFO: Final = "/proc/meminfo"
VMSTAT: Final = "/proc/vmstat"
PSI_MEMORY: Final = "/proc/pressure/memory"
#: /proc/meminfo is about 1.5 KiB and /proc/vmstat about 5 KiB; past this is not procfs.
MAX_FILE_BYTES: Final = 64 * 1024
READ_CHUNK: Final = 16 * 1024
#: Counters and byte figures above 2^53 are not believable (nor exact as JSON doubles).
MAX_VALUE: Final = 2**53

#: JSON command in, JSON reply out; raises QgaUnresponsiveError / QgaRefusedError.
AgentCommand = Callable[[str], str]


class QgaCounter(CounterName):
    """What reading through qemu-ga counts (its replies are untrusted)."""

    QGA_REPORTS = "qga_reports"  # pressure reports read whole
    QGA_BAD_REPLY = "qga_bad_reply"  # replies that are not the documented JSON shape
    QGA_BAD_TEXT = "qga_bad_text"  # file contents that do not parse as the kernel writes them
    QGA_FILE_TOO_LONG = "qga_file_too_long"  # files past MAX_FILE_BYTES
    QGA_PSI_MISSING = "qga_psi_missing"  # reads of a guest without /proc/pressure/memory


def _bad(counters: Counters, counter: QgaCounter, what: str) -> GuestAgentError:
    counters.inc(counter)
    return GuestAgentError(what)


def _return(reply: str, what: str, counters: Counters) -> object:
    """The ``return`` member of a reply (anything else is garbage)."""
    try:
        doc = json.loads(reply)
    except (ValueError, RecursionError, TypeError):
        raise _bad(counters, QgaCounter.QGA_BAD_REPLY, f"{what}: reply is not JSON") from None
    if not isinstance(doc, dict) or "return" not in doc:
        raise _bad(counters, QgaCounter.QGA_BAD_REPLY, f"{what}: reply has no 'return'")
    return doc["return"]


def _call(command: AgentCommand, execute: str, arguments: Mapping[str, object],
          counters: Counters) -> object:
    return _return(command(json.dumps({"execute": execute, "arguments": dict(arguments)})),
                   execute, counters)


def read_file(command: AgentCommand, path: str, counters: Counters) -> str:
    """``path``'s text inside the guest (at most ``MAX_FILE_BYTES``)."""
    handle = _call(command, "guest-file-open", {"path": path, "mode": "r"}, counters)
    if isinstance(handle, bool) or not isinstance(handle, int) or handle < 0:
        raise _bad(counters, QgaCounter.QGA_BAD_REPLY, f"guest-file-open {path}: no handle")
    data = bytearray()
    try:
        while True:
            got = _call(command, "guest-file-read", {"handle": handle, "count": READ_CHUNK},
                        counters)
            if not isinstance(got, dict) or not isinstance(got.get("buf-b64"), str) \
                    or not isinstance(got.get("eof"), bool):
                raise _bad(counters, QgaCounter.QGA_BAD_REPLY,
                           f"guest-file-read {path}: no buf-b64/eof")
            try:
                chunk = base64.b64decode(got["buf-b64"], validate=True)
            except (binascii.Error, ValueError):
                raise _bad(counters, QgaCounter.QGA_BAD_REPLY,
                           f"guest-file-read {path}: buf-b64 is not base64") from None
            data += chunk
            if len(data) > MAX_FILE_BYTES:
                raise _bad(counters, QgaCounter.QGA_FILE_TOO_LONG,
                           f"{path}: over {MAX_FILE_BYTES} bytes")
            if got["eof"] or not chunk:
                break
    finally:
        # the read's outcome stands; qemu-ga drops its handles when it restarts
        with contextlib.suppress(GuestAgentError):
            _call(command, "guest-file-close", {"handle": handle}, counters)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(counters, QgaCounter.QGA_BAD_TEXT, f"{path}: not ASCII text") from None


def _count(values: Mapping[str, int], key: str) -> int | None:
    v = values.get(key)
    return v if v is not None and 0 <= v < MAX_VALUE else None


def read_report(command: AgentCommand, *, guest: str, counters: Counters,
                now: float) -> AgentReport:
    """One pressure report read through qemu-ga (module docstring); GuestAgentError (counted
    where the reply was at fault) when it cannot be had."""
    meminfo_text = read_file(command, MEMINFO, counters)
    vmstat_text = read_file(command, VMSTAT, counters)
    try:
        psi_text: str | None = read_file(command, PSI_MEMORY, counters)
    except QgaRefusedError:  # no PSI in this kernel: the rest still stands
        counters.inc(QgaCounter.QGA_PSI_MISSING)
        psi_text = None
    try:
        mi = parse_meminfo(meminfo_text, source=f"{guest}:{MEMINFO}")
        vm = parse_stat(vmstat_text, source=f"{guest}:{VMSTAT}")
        psi = None if psi_text is None else parse_psi(psi_text, source=f"{guest}:{PSI_MEMORY}")
    except HostMemoryError as exc:
        raise _bad(counters, QgaCounter.QGA_BAD_TEXT, str(exc)) from None
    if psi is not None and not (0.0 <= psi.some_avg10 <= 100.0 and 0 <= psi.some_total_us
                                < MAX_VALUE):
        raise _bad(counters, QgaCounter.QGA_BAD_TEXT, f"{guest}: PSI out of range")
    counters.inc(QgaCounter.QGA_REPORTS)
    full10 = None if psi is None else psi.full_avg10
    full_us = None if psi is None else psi.full_total_us  # optional: left out past belief
    return AgentReport(
        guest=guest, uptime_s=max(0.0, now),
        mem_total_bytes=_count(mi, "MemTotal"), mem_free_bytes=_count(mi, "MemFree"),
        mem_available_bytes=_count(mi, "MemAvailable"), cached_bytes=_count(mi, "Cached"),
        swap_total_bytes=_count(mi, "SwapTotal"), swap_free_bytes=_count(mi, "SwapFree"),
        swap_in_pages=_count(vm, "pswpin"), swap_out_pages=_count(vm, "pswpout"),
        major_faults=_count(vm, "pgmajfault"), oom_kills=_count(vm, "oom_kill"),
        balloon_inflated_pages=_count(vm, "balloon_inflate"),
        balloon_deflated_pages=_count(vm, "balloon_deflate"),
        psi_some_avg10=None if psi is None else psi.some_avg10,
        psi_some_total_us=None if psi is None else psi.some_total_us,
        psi_full_avg10=None if full10 is None or not 0.0 <= full10 <= 100.0 else full10,
        psi_full_total_us=None if full_us is None or not 0 <= full_us < MAX_VALUE else full_us,
    )


__all__ = ["QGA_PORT_NAME", "AgentCommand", "QgaCounter", "read_file", "read_report"]
