"""A memory cgroup that holds the host's budget for its guests, where the machine has one.

Two hierarchies exist (Documentation/admin-guide/cgroup-v1/memory.rst and cgroup-v2.rst):

=========== ============================ ==================================
            v1 (``memory`` mounted alone) v2 (unified, ``memory`` enabled)
=========== ============================ ==================================
limit       ``memory.limit_in_bytes``    ``memory.max`` (+ ``memory.swap.max`` = 0)
usage       ``memory.usage_in_bytes``    ``memory.current``
peak        ``memory.max_usage_in_bytes`` ``memory.peak`` (Linux 5.19+)
OOM kills   ``memory.oom_control``        ``memory.events``
            ``oom_kill``                  ``oom_kill``
=========== ============================ ==================================

Shmem pages (the guests' memfd RAM, ``host/memfd.py``) are charged to the cgroup of the process
that first touches them, so the guests, not the host, must be in the cgroup before they touch
their RAM; the pages stay charged there as long as the memfd holds them.

Where there is no usable hierarchy, or we are not root, the host cannot enforce a budget: it
only watches resident bytes. ``make_budget`` says which, and why.

Each local guest gets a cgroup of its own inside the budget's (``MemoryCgroup.child``, no limit
of its own: the parent's holds them all), so that when the guest dies every process in it can
be killed (``kill_pass``) and none outlives it. A daemon killed with SIGKILL leaves its cgroups
behind; ``clean_stale`` removes those whose creator (the pid in their name) is gone and that
hold no task, children first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from memballoon.model.errors import ConfigError, MemballoonError

V1_DEFAULT_ROOT: Final = Path("/sys/fs/cgroup/memory")
V2_DEFAULT_ROOT: Final = Path("/sys/fs/cgroup")
MOUNTS: Final = Path("/proc/self/mounts")

#: A cgroup name is one path component: no "/", no "..", nothing the kernel files could clash with.
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
#: How long ``remove`` waits for the tasks it moved out (exiting tasks linger briefly).
REMOVE_TIMEOUT_S: Final = 2.0
#: v2 writes "max" for no limit; v1 reports a huge page-rounded number.
_UNLIMITED: Final = "max"
#: The cgroups memballoon makes, with the pid of the process that made them:
#: ``memballoon-<pid>-...`` (local world), ``memballoon-<tag>-<pid>[-...]`` (qemu, benches).
STALE_RE: Final = re.compile(r"^memballoon-(?:[a-z]+-)?([0-9]+)(?:-.*)?$")


class Hierarchy(StrEnum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class CgroupSupport:
    """What ``detect`` found: the memory hierarchy, its root, and whether we may use it."""

    hierarchy: Hierarchy
    root: Path | None
    is_root: bool
    reason: str  # one line a person can act on

    @property
    def usable(self) -> bool:
        return self.hierarchy is not Hierarchy.NONE and self.is_root


def _unescape_mount(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal (fs/proc_namespace.c).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def detect(*, mounts: Path = MOUNTS, euid: int | None = None) -> CgroupSupport:
    """Find the memory cgroup hierarchy from the mount table (v2 with ``memory`` preferred)."""
    is_root = (os.geteuid() if euid is None else euid) == 0
    try:
        table = mounts.read_text()
    except OSError as exc:
        return CgroupSupport(Hierarchy.NONE, None, is_root, f"cannot read {mounts}: {exc}")
    v1: Path | None = None
    v2: list[Path] = []
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where, fstype, opts = Path(_unescape_mount(parts[1])), parts[2], parts[3].split(",")
        if fstype == "cgroup" and "memory" in opts and v1 is None:
            v1 = where
        elif fstype == "cgroup2":
            v2.append(where)
    for where in v2:
        try:
            controllers = (where / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" in controllers:
            return _support(Hierarchy.V2, where, is_root)
    if v1 is not None:
        return _support(Hierarchy.V1, v1, is_root)
    return CgroupSupport(
        Hierarchy.NONE, None, is_root, "no memory cgroup is mounted (neither v1 nor v2)"
    )


def _support(h: Hierarchy, root: Path, is_root: bool) -> CgroupSupport:
    if not is_root:
        why = f"memory cgroup {h.value} at {root}, but we are not root: cannot create cgroups"
    else:
        why = f"memory cgroup {h.value} at {root}"
    return CgroupSupport(h, root, is_root, why)


class MemoryCgroup:
    """One memory cgroup directory we created, with a hard memory limit (None: none of its own,
    a guest's inside the budget's)."""

    __slots__ = ("hierarchy", "limit_bytes", "name", "path", "root")

    def __init__(self, hierarchy: Hierarchy, root: Path, name: str, limit_bytes: int | None,
                 *, path: Path | None = None) -> None:
        # Use ``create`` or ``child``; this only binds an existing directory.
        if hierarchy is Hierarchy.NONE:
            raise ConfigError("no memory cgroup hierarchy to bind to")
        self.hierarchy = hierarchy
        self.root = root
        self.name = name
        self.path = root / name if path is None else path
        self.limit_bytes = limit_bytes

    @classmethod
    def create(
        cls, name: str, limit_bytes: int | None, *, support: CgroupSupport | None = None
    ) -> MemoryCgroup:
        """Make ``<root>/<name>`` with a hard limit of ``limit_bytes`` (no swap to escape to;
        None: no limit, a cgroup only to hold guests' cgroups).

        A directory left by an earlier run that died is removed first when it is empty of
        tasks; one with tasks in it is refused (``ConfigError``).
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"cgroup name {name!r}: use letters, digits, '_', '-', '.'")
        if limit_bytes is not None and limit_bytes <= 0:
            raise ConfigError(f"cgroup limit must be positive, got {limit_bytes} bytes")
        s = detect() if support is None else support
        if s.root is None or s.hierarchy is Hierarchy.NONE:
            raise ConfigError(f"cannot create memory cgroup {name!r}: {s.reason}")
        cg = cls(s.hierarchy, s.root, name, limit_bytes)
        if cg.path.exists():
            if cg.pids():
                raise ConfigError(f"cgroup {cg.path} exists and has tasks; remove it first")
            try:
                cg._rmdir()
            except OSError as exc:
                raise MemballoonError(f"cannot remove stale cgroup {cg.path}: {exc}") from exc
        if s.hierarchy is Hierarchy.V2:
            cg._enable_v2_memory_controller()
        try:
            cg.path.mkdir()
        except OSError as exc:
            raise MemballoonError(f"cannot create cgroup {cg.path}: {exc}") from exc
        if limit_bytes is None:
            return cg
        try:
            if s.hierarchy is Hierarchy.V1:
                cg._write("memory.limit_in_bytes", str(limit_bytes))
            else:
                cg._write("memory.max", str(limit_bytes))
                if (cg.path / "memory.swap.max").exists():
                    cg._write("memory.swap.max", "0")
        except BaseException:
            cg._rmdir()
            raise
        return cg

    def child(self, name: str) -> MemoryCgroup:
        """Make ``<this>/<name>``, with no limit of its own (this one's holds it). One left by
        an earlier run is reused when empty; one with tasks is refused (``ConfigError``)."""
        if not _NAME_RE.match(name):
            raise ConfigError(f"cgroup name {name!r}: use letters, digits, '_', '-', '.'")
        cg = MemoryCgroup(self.hierarchy, self.root, name, None, path=self.path / name)
        if cg.path.exists():
            if cg.pids():
                raise ConfigError(f"cgroup {cg.path} exists and has tasks; remove it first")
            return cg
        if self.hierarchy is Hierarchy.V2:
            self._enable_v2_memory_controller(self.path / "cgroup.subtree_control")
        try:
            cg.path.mkdir()
        except OSError as exc:
            raise MemballoonError(f"cannot create cgroup {cg.path}: {exc}") from exc
        return cg

    def open_procs(self) -> int:
        """An fd open for writing on ``cgroup.procs`` (close-on-exec): a child about to exec
        writes its own pid to it (``local/confine.py``), so it is in here from its first
        instruction, and the check of write permission was done here, as root."""
        try:
            return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MemballoonError(f"cannot open {self.path / 'cgroup.procs'}: {exc}") from exc

    def kill_pass(self) -> int:
        """SIGKILL every process in the cgroup now; how many were signalled. A process forked
        meanwhile shows in the next pass (a process with SIGKILL pending cannot fork), so
        passes until ``pids()`` is empty leave none."""
        n = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                n += 1
        return n

    def try_rmdir(self) -> bool:
        """Remove the (empty) directory; False while tasks (or child cgroups) keep it busy."""
        try:
            self._rmdir()
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise MemballoonError(f"cannot remove cgroup {self.path}: {exc}") from exc
        return True

    def _enable_v2_memory_controller(self, ctl: Path | None = None) -> None:
        # Children of a v2 cgroup get the memory files only when the parent delegates it.
        ctl = self.root / "cgroup.subtree_control" if ctl is None else ctl
        try:
            if "memory" not in ctl.read_text().split():
                ctl.write_text("+memory")
        except OSError as exc:
            raise MemballoonError(f"cannot enable the memory controller in {ctl}: {exc}") from exc

    # ------------------------------------------------------------------ files
    def _write(self, file: str, value: str) -> None:
        try:
            (self.path / file).write_text(value)
        except OSError as exc:
            raise MemballoonError(f"writing {value!r} to {self.path / file}: {exc}") from exc

    def _read(self, file: str) -> str:
        try:
            return (self.path / file).read_text()
        except OSError as exc:
            raise MemballoonError(f"reading {self.path / file}: {exc}") from exc

    def _read_int(self, file: str) -> int:
        text = self._read(file).strip()
        if text == _UNLIMITED:
            return -1
        try:
            return int(text)
        except ValueError as exc:
            raise MemballoonError(f"{self.path / file}: not a number: {text!r}") from exc

    def _keyed(self, file: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self._read(file).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
        return out

    # ------------------------------------------------------------------ use
    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup. Do it before it touches
        its RAM: pages are charged to the cgroup of the first toucher."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError as exc:
            raise MemballoonError(f"no process {pid} to put in {self.path}") from exc
        except OSError as exc:
            raise MemballoonError(f"cannot move {pid} into {self.path}: {exc}") from exc

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise MemballoonError(f"reading {self.path / 'cgroup.procs'}: {exc}") from exc
        return [int(x) for x in text.split()]

    def usage_bytes(self) -> int:
        """Memory charged to the cgroup now (anonymous, page cache and the guests' shmem)."""
        f = "memory.usage_in_bytes" if self.hierarchy is Hierarchy.V1 else "memory.current"
        return self._read_int(f)

    def max_usage_bytes(self) -> int | None:
        """Peak charge since creation; ``None`` on v2 kernels without ``memory.peak``."""
        if self.hierarchy is Hierarchy.V1:
            return self._read_int("memory.max_usage_in_bytes")
        if not (self.path / "memory.peak").exists():
            return None
        return self._read_int("memory.peak")

    def read_limit_bytes(self) -> int:
        """The limit the kernel holds (v1 rounds it down to whole pages); -1 for none."""
        f = "memory.limit_in_bytes" if self.hierarchy is Hierarchy.V1 else "memory.max"
        return self._read_int(f)

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed in this cgroup for hitting its limit."""
        if self.hierarchy is Hierarchy.V1:
            keyed = self._keyed("memory.oom_control")  # "oom_kill" since Linux 4.13
        else:
            keyed = self._keyed("memory.events")
        return keyed.get("oom_kill", 0)

    def remove(self) -> None:
        """Move any tasks left to the hierarchy's root, then remove the directory (and the
        cgroups under it first)."""
        if not self.path.exists():
            return
        with contextlib.suppress(OSError):  # guests' cgroups first: v1 keeps a parent busy
            for sub in sorted(p for p in self.path.iterdir() if p.is_dir()):
                MemoryCgroup(self.hierarchy, self.root, sub.name, None, path=sub).remove()
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while True:
            for pid in self.pids():
                try:
                    (self.root / "cgroup.procs").write_text(str(pid))
                except ProcessLookupError:
                    pass  # it exited meanwhile
                except OSError as exc:
                    raise MemballoonError(f"cannot move {pid} out of {self.path}: {exc}") from exc
            try:
                self._rmdir()
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise MemballoonError(f"cannot remove cgroup {self.path}: {exc}") from exc
            time.sleep(0.01)

    def _rmdir(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()

    def __repr__(self) -> str:
        return f"MemoryCgroup({self.hierarchy.value}, {str(self.path)!r}, {self.limit_bytes})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # a "pid" past what a pid can be: none
        return False
    except PermissionError:
        return True
    return True


def _has_tasks(path: Path) -> bool:
    """Whether ``path`` or any cgroup under it holds a task (unreadable counts as yes)."""
    for d, _dirs, files in os.walk(path):
        if "cgroup.procs" not in files:
            continue
        try:
            if (Path(d) / "cgroup.procs").read_text().split():
                return True
        except OSError:
            return True
    return False


@dataclass(frozen=True, slots=True)
class StaleCleanup:
    """What ``clean_stale`` did: cgroups removed, and those left (with why)."""

    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = []
        if self.removed:
            parts.append(f"removed {len(self.removed)} empty cgroup(s) left by memballoon "
                         f"processes that are gone: {', '.join(self.removed)}")
        if self.kept:
            parts.append(f"left {len(self.kept)}: {'; '.join(self.kept)}")
        return "; ".join(parts)


def clean_stale(support: CgroupSupport | None = None, *,
                alive: Callable[[int], bool] = _pid_alive) -> StaleCleanup:
    """Remove ``memballoon-*`` cgroups at the hierarchy's root whose creator (the pid in the
    name, ``STALE_RE``) is gone and that hold no task anywhere beneath, children first. A live
    creator's cgroup is never touched (it may be about to use it, empty); one with tasks is
    left and said."""
    s = detect() if support is None else support
    if not s.usable or s.root is None:
        return StaleCleanup()
    removed: list[str] = []
    kept: list[str] = []
    try:
        names = sorted(p.name for p in s.root.iterdir() if p.is_dir())
    except OSError:
        return StaleCleanup()
    for name in names:
        m = STALE_RE.match(name)
        if m is None or alive(int(m.group(1))):
            continue
        top = s.root / name
        if _has_tasks(top):
            kept.append(f"{top} still holds tasks")
            continue
        dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
        try:
            for d in dirs:  # deepest first: a v1 cgroup with children cannot go
                with contextlib.suppress(FileNotFoundError):
                    d.rmdir()
        except OSError as exc:
            kept.append(f"{top}: {exc.strerror}")
            continue
        removed.append(str(top))
    return StaleCleanup(tuple(removed), tuple(kept))


class BudgetMode(StrEnum):
    ENFORCED = "enforced"  # a memory cgroup holds the limit: overshoot means the kernel kills
    WATCHED = "watched"  # no cgroup: the host only watches resident bytes


@dataclass(frozen=True, slots=True)
class Budget:
    """The host's memory budget for its guests and how it is held."""

    limit_bytes: int
    mode: BudgetMode
    reason: str
    cgroup: MemoryCgroup | None = None

    @property
    def enforced(self) -> bool:
        return self.mode is BudgetMode.ENFORCED

    def describe(self) -> str:
        mib = self.limit_bytes / (1 << 20)
        if self.enforced:
            return f"host budget {mib:.0f} MiB enforced by {self.reason}"
        return f"host budget {mib:.0f} MiB only watched (not enforced): {self.reason}"


def make_budget(name: str, limit_bytes: int, *, support: CgroupSupport | None = None) -> Budget:
    """A cgroup-enforced budget where we can make one, else a watched one saying why not."""
    if limit_bytes <= 0:
        raise ConfigError(f"host budget must be positive, got {limit_bytes} bytes")
    s = detect() if support is None else support
    if not s.usable:
        return Budget(limit_bytes, BudgetMode.WATCHED, s.reason)
    try:
        cg = MemoryCgroup.create(name, limit_bytes, support=s)
    except MemballoonError as exc:
        return Budget(limit_bytes, BudgetMode.WATCHED, f"cgroup not created: {exc}")
    return Budget(
        limit_bytes, BudgetMode.ENFORCED, f"memory cgroup {s.hierarchy.value} {cg.path}", cg
    )
