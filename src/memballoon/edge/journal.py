"""The decision journal: every balloon target change as one JSON line (edge: file I/O, clocks).

Each record: ``time`` (wall clock, ISO 8601 UTC), ``ts`` (wall clock, epoch seconds, for
filtering), ``mono`` (the manager's monotonic clock), ``kind`` (policy, manual, correction,
shutdown, or an event such as policy_error), ``guest``, ``old_pages``/``new_pages`` and the same
in bytes, ``reason``, ``inputs`` (the figures that led to it) and ``applied`` (whether the
backend accepted it). The file is append-only; past ``max_bytes`` it is rotated to
``<path>.1`` ... ``<path>.<keep>`` (the oldest dropped), so the journal stays bounded. The last
records are also kept in memory, which is all a journal without a path has.

``read_journal`` reads the rotated files oldest first; a line that is not a JSON object (a
torn write, a hand edit) is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from memballoon.manager.core import Action, Event
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError, UsageError

#: Filesystems that are not storage: a "regular file" there is a kernel knob (/proc/sys,
#: /sys, cgroup files), written to as root it would change the machine, not keep a journal.
PSEUDO_FS: Final = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devtmpfs", "devpts", "debugfs", "tracefs",
    "securityfs", "configfs", "bpf", "pstore", "efivarfs", "hugetlbfs", "mqueue", "fusectl",
    "binfmt_misc", "autofs", "rpc_pipefs", "nsfs", "selinuxfs",
})
MOUNTS: Final = Path("/proc/self/mounts")
MAX_BYTES: Final = 8 << 20
KEEP: Final = 3
MEMORY_RECORDS: Final = 1000


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class JournalCounter(CounterName):
    """What the journal counts (``Journal.counters``; ``read_journal`` into the caller's bag)."""

    JOURNAL_WRITE_FAILED = "journal_write_failed"  # records the file did not take (OSError)
    JOURNAL_ROTATIONS = "journal_rotations"  # rotations of the file past max_bytes
    JOURNAL_BAD_LINE = "journal_bad_line"  # lines read back that are not JSON objects


def _fstype(path: Path, mounts: Path = MOUNTS) -> str | None:
    """The type of the filesystem ``path`` (resolved) is on: its longest mount point."""
    try:
        table = mounts.read_text()
    except OSError:
        return None
    best, kind = "", None
    where = str(path)
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = where == mnt or where.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def check_journal_path(path: Path | str, key: str = "journal") -> Path:
    """The journal's path, if it is one: a regular file (not a symlink), or a new file in an
    existing directory, on a filesystem that stores files (not /proc, /sys, a cgroup...).
    ConfigError names the key, the path and what is wrong."""
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    parent = p.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} = {str(p)!r}: {parent} is not an existing directory (the "
                          "journal goes in one; make it first)")
    kind = _fstype(parent.resolve())
    if kind in PSEUDO_FS:
        raise ConfigError(f"{key} = {str(p)!r}: {parent} is on a {kind} filesystem, not "
                          "storage; put the journal in a directory such as /var/lib/memballoon")
    try:
        st = p.lstat()
    except FileNotFoundError:
        return p
    except OSError as exc:
        raise ConfigError(f"{key} = {str(p)!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ConfigError(f"{key} = {str(p)!r} is {what}: the journal is only written to a "
                          "regular file or a new one")
    return p


class Journal:
    def __init__(
        self,
        path: Path | str | None,
        *,
        max_bytes: int = MAX_BYTES,
        keep: int = KEEP,
        wall_clock: Callable[[], float] = time.time,
        counters: Counters | None = None,
    ) -> None:
        if max_bytes < 1024 or keep < 1:
            raise UsageError("journal max_bytes must be >= 1024 and keep >= 1")
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.keep = keep
        self.wall_clock = wall_clock
        self.recent: deque[dict[str, Any]] = deque(maxlen=MEMORY_RECORDS)
        self.counters = counters if counters is not None else Counters()
        self.written = 0
        if self.path is not None:
            self.path = check_journal_path(self.path)

    def action(self, a: Action, *, mono: float, applied: bool) -> dict[str, Any]:
        return self.write({**a.record(), "applied": applied}, mono=mono)

    def event(self, e: Event, *, mono: float) -> dict[str, Any]:
        return self.write({"kind": e.kind, "guest": e.guest, "reason": e.detail}, mono=mono)

    def write(self, rec: dict[str, Any], *, mono: float) -> dict[str, Any]:
        ts = self.wall_clock()
        full = {"time": iso(ts), "ts": round(ts, 3), "mono": round(mono, 3), **rec}
        self.recent.append(full)
        self.written += 1
        if self.path is None:
            return full
        line = (json.dumps(full, separators=(",", ":"), default=str) + "\n").encode()
        try:
            self._rotate_if_needed(len(line))
            # no symlink swapped in since the check is followed
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, line)  # one write of one line: a reader never sees half a record
            finally:
                os.close(fd)
        except OSError:
            self.counters.inc(JournalCounter.JOURNAL_WRITE_FAILED)
        return full

    def _rotate_if_needed(self, incoming: int) -> None:
        assert self.path is not None
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else rotated(self.path, i - 1)
            if src.exists():
                os.replace(src, rotated(self.path, i))
        self.counters.inc(JournalCounter.JOURNAL_ROTATIONS)

    def tail(self, *, guest: str | None = None, last: int | None = None) -> list[dict[str, Any]]:
        if self.path is not None:
            return read_journal(self.path, guest=guest, last=last)
        recs = [r for r in self.recent if guest is None or r.get("guest") == guest]
        return recs[-last:] if last else recs


def rotated(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def _lines(path: Path, counters: Counters | None) -> Iterator[dict[str, Any]]:
    files = sorted((p for p in path.parent.glob(path.name + ".*")
                    if p.name.rsplit(".", 1)[-1].isdigit()),
                   key=lambda p: -int(p.name.rsplit(".", 1)[-1]))
    files.append(path)
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                if counters is not None:
                    counters.inc(JournalCounter.JOURNAL_BAD_LINE)
                continue
            yield doc


def read_journal(
    path: Path | str,
    *,
    guest: str | None = None,
    since: float | None = None,
    last: int | None = None,
    counters: Counters | None = None,
) -> list[dict[str, Any]]:
    """Records oldest first; ``since`` is wall-clock epoch seconds; ``last`` keeps the newest N."""
    out: list[dict[str, Any]] = []
    for doc in _lines(Path(path), counters):
        if guest is not None and doc.get("guest") != guest:
            continue
        ts = doc.get("ts")
        if since is not None and not (isinstance(ts, int | float) and ts >= since):
            continue
        out.append(doc)
    if last is not None:
        out = out[-last:] if last > 0 else []
    return out


__all__ = ["Journal", "iso", "read_journal", "rotated"]
