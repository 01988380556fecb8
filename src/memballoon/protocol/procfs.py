"""Pure parsers for the kernel's memory files: ``/proc/meminfo``, PSI, cgroup counters.

The host's own memory is read from text the kernel writes; the reader (``edge/hostmem.py``)
does the I/O, these functions only parse, so they are tested on recorded text. A file that does
not parse raises ``HostMemoryError`` naming the file and what was wrong (an older kernel, a
cgroup without the controller): the caller falls back or says what to set, never crashes.

Formats (Linux Documentation/filesystems/proc.rst, accounting/psi.rst, admin-guide/cgroup-v2.rst):

- meminfo: ``MemTotal:       16314048 kB`` lines;
- PSI: ``some avg10=0.00 avg60=0.00 avg300=0.00 total=0`` and a ``full`` line (``full`` is
  absent for CPU, present for memory since 5.2);
- cgroup v2 ``memory.current``/``memory.max`` (``max`` means no limit) and v1
  ``memory.usage_in_bytes``/``memory.limit_in_bytes`` (a page-rounded LONG_MAX means none);
- ``memory.stat``: ``key value`` lines (v1 names its hierarchical totals ``total_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memballoon.model.errors import MemballoonError
from memballoon.model.units import KIB

#: A v1 limit at or above this is "no limit" (the kernel reports PAGE_COUNTER_MAX pages).
NO_LIMIT_BYTES: Final = 1 << 62


class HostMemoryError(MemballoonError):
    """A host memory file that cannot be read or parsed (names the file and what to do)."""


@dataclass(frozen=True, slots=True)
class Psi:
    """One PSI resource: the share of time some (or all) tasks stalled, over 10 s, 60 s and
    300 s windows (percent), and the total stall time (microseconds, cumulative)."""

    some_avg10: float
    some_avg60: float
    some_total_us: int
    full_avg10: float | None = None  # None where the kernel has no ``full`` line
    full_total_us: int | None = None


def parse_meminfo(text: str, *, source: str = "/proc/meminfo") -> dict[str, int]:
    """Every ``Key: value [kB]`` line as bytes (values without a unit are counts)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            n = int(parts[0])
        except ValueError:
            raise HostMemoryError(f"{source}: {key}: {parts[0]!r} is not a number") from None
        out[key.strip()] = n * KIB if parts[1:2] == ["kB"] else n
    for need in ("MemTotal", "MemAvailable"):
        if need not in out:
            raise HostMemoryError(f"{source}: no {need} line (a kernel older than 3.14?)")
    return out


def parse_psi(text: str, *, source: str = "/proc/pressure/memory") -> Psi:
    """A PSI file's ``some`` (required) and ``full`` (optional) lines."""
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, *fields = line.split() or [""]
        if kind in ("some", "full"):
            rows[kind] = dict(f.split("=", 1) for f in fields if "=" in f)
    if "some" not in rows:
        raise HostMemoryError(f"{source}: no 'some' line")
    try:
        some = rows["some"]
        full = rows.get("full")
        psi = Psi(
            some_avg10=float(some["avg10"]), some_avg60=float(some["avg60"]),
            some_total_us=int(some["total"]),
            full_avg10=float(full["avg10"]) if full is not None else None,
            full_total_us=int(full["total"]) if full is not None else None,
        )
    except (KeyError, ValueError) as exc:
        raise HostMemoryError(f"{source}: malformed PSI line ({exc})") from None
    # a guest's PSI arrives through qemu-ga: only what a kernel can write (shares in percent,
    # cumulative microseconds) gets through
    avgs = (psi.some_avg10, psi.some_avg60, psi.full_avg10)
    totals = (psi.some_total_us, psi.full_total_us)
    if not (all(a is None or 0.0 <= a <= 100.0 for a in avgs)
            and all(t is None or t >= 0 for t in totals)):
        raise HostMemoryError(f"{source}: PSI figures out of range")
    return psi


def parse_counter(text: str, *, source: str) -> int | None:
    """A cgroup counter or limit file: bytes, or None for no limit (``max``, or v1's
    near-LONG_MAX)."""
    value = text.strip()
    if value == "max":
        return None
    try:
        n = int(value)
    except ValueError:
        raise HostMemoryError(f"{source}: {value[:40]!r} is not a number") from None
    if n < 0:
        raise HostMemoryError(f"{source}: negative value {n}")
    return None if n >= NO_LIMIT_BYTES else n


def parse_stat(text: str, *, source: str) -> dict[str, int]:
    """A cgroup ``memory.stat``: ``key value`` lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            raise HostMemoryError(f"{source}: {parts[0]}: {parts[1]!r} is not a number"
                                  ) from None
    return out


__all__ = ["NO_LIMIT_BYTES", "HostMemoryError", "Psi", "parse_counter", "parse_meminfo",
           "parse_psi", "parse_stat"]
