"""Confining a local guest process (edge code: prctl, uids, the child between fork and exec).

Theory of operation
-------------------
A guest process is untrusted. When the host is root, ``LocalHost`` spawns each guest with
``preexec`` as its ``preexec_fn``, run by the child after ``fork`` and before ``exec``, so the
guest program never runs a single instruction outside its confinement and nothing in it is
left to the guest to do:

1. it writes its own pid to its cgroup's ``cgroup.procs`` through an fd the host opened as root
   (``MemoryCgroup.open_procs``): the guest is in its memory cgroup (one per guest, inside the
   budget's) from its first instruction, so every page it touches is charged there, and every
   process it forks is in it too, to be killed with it;
2. it drops to a private uid and gid (``guest_uids``: one per guest, no supplementary groups):
   another guest, of another uid, cannot open its memfd through ``/proc/PID/fd``, nor signal
   or trace it, nor open the host's (root's) fds; the guest only needs what it inherits (its
   socket, its memfd, its eventfds: inherited fds need no permission) and to read Python and
   memballoon, which are world-readable;
3. ``PR_SET_NO_NEW_PRIVS``: no set-uid program gives it privileges back;
4. ``PR_SET_PDEATHSIG`` = SIGKILL (after the uid change, which would clear it): a guest does
   not outlive a host killed with SIGKILL.

``PR_SET_DUMPABLE`` cannot be set from here: ``execve`` makes a process dumpable again when its
uids agree. memballoon's guest (``guest_main``) clears it as the first thing it does
(``set_dumpable``), so even a process of its own uid, or one that got its uid, cannot open its
memfd through /proc; a hostile guest that does not only exposes itself, and its uid is its own.

A private uid must still reach Python and memballoon. Where a directory on the way to them is
closed to other users (``/root`` is 0700, and a pyenv Python lives under it), ``plan_reach``
finds it and the child, before dropping its uid, gets a mount namespace of its own in which
that directory is an empty tmpfs (mode 0755) with only the entries on the way bind-mounted
back in: the guest reaches the interpreter, and sees nothing else of that directory. Mounts it
makes stay in its namespace (private propagation).

When the host is not root, none of this is possible: guests run as the host's uid, in the
host's cgroup. ``LocalHost`` says so once, names what is not confined, and counts each such
guest; a dead guest's process group is killed instead of its cgroup (a child that left the
group survives).
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from memballoon.model.errors import ConfigError

#: Guests' uids start here by default: far above system and ordinary users (and subuid ranges,
#: which start at 100000), under 2^31 for tools that keep uids signed.
GUEST_UID_BASE: Final = 1_900_000_000
#: Without a configured base, each host takes a block of this many uids by its pid, so two
#: hosts on one machine do not share a uid (with a pid 200000 apart they would).
UIDS_PER_HOST: Final = 1024
_PID_SLOTS: Final = 200_000
#: The highest uid a guest may get (2^31 - 2; -1 means "unchanged" to the kernel).
MAX_GUEST_UID: Final = 2**31 - 2
#: The lowest configured base: uids below are the system's and its users'.
MIN_GUEST_UID_BASE: Final = 1000

PR_SET_PDEATHSIG: Final = 1
PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4
PR_SET_NO_NEW_PRIVS: Final = 38

CLONE_NEWNS: Final = 0x00020000
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
_unshare = _libc.unshare
_unshare.argtypes = (ctypes.c_int,)
_unshare.restype = ctypes.c_int
_mount = _libc.mount
_mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p)
_mount.restype = ctypes.c_int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    """``mount(2)``; OSError on failure."""
    _check(_mount(_enc(source), target.encode(), _enc(fstype), flags, _enc(data)),
           f"mount {target}")


def _enc(v: str | None) -> bytes | None:
    return None if v is None else v.encode()


#: A directory closed to other users and the entries in it a guest must reach.
Reach = tuple[tuple[str, tuple[str, ...]], ...]


def needed_paths(program: Sequence[str] = ()) -> list[str]:
    """What a guest process must reach: the interpreter, its prefixes, every import path and
    the program (its first word, and any argument naming an existing file)."""
    out = [sys.executable, sys.prefix, sys.base_prefix, *sys.path]
    out += [a for a in program if os.path.isabs(a) and os.path.exists(a)]
    return [p for p in out if p and os.path.isabs(p) and os.path.exists(p)]


def plan_reach(paths: Iterable[str]) -> Reach:
    """The directories on the way to ``paths`` (as written and resolved) that other users
    cannot search, each with the entries under it that lead to them. A second closed
    directory further down cannot be opened this way: ``ConfigError`` names it."""
    closed: dict[str, set[str]] = {}
    for p in paths:
        for form in {os.path.abspath(p), os.path.realpath(p)}:
            parts = Path(form).parts
            blocked_at: str | None = None
            for i in range(1, len(parts)):
                d = str(Path(*parts[:i]))
                try:
                    st = os.stat(d)
                except OSError:
                    break
                if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
                    if blocked_at is not None:
                        raise ConfigError(
                            f"{form}: {blocked_at} and {d} are both closed to other users; a "
                            "guest's private uid cannot reach it (install Python and "
                            "memballoon where other users can read them)")
                    blocked_at = d
                    closed.setdefault(d, set()).add(parts[i])
    return tuple((d, tuple(sorted(names))) for d, names in sorted(closed.items()))


def open_reach(reach: Reach) -> None:
    """In the child (root, before exec): a mount namespace of its own where each closed
    directory is an empty tmpfs with only the entries on the way bound back in."""
    if not reach:
        return
    _check(_unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
    for d, names in reach:
        held = [(n, os.open(os.path.join(d, n), os.O_PATH)) for n in names]  # before hiding
        mount("memballoon-reach", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for n, fd in held:
            target = os.path.join(d, n)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
            os.close(fd)


def prctl(option: int, arg2: int = 0) -> int:
    """``prctl(2)`` with one argument; OSError on failure."""
    return _check(int(_prctl(option, arg2, 0, 0, 0)), f"prctl({option})")


def set_dumpable(on: bool) -> None:
    """Make this process (not) dumpable: when not, its /proc/PID files belong to root and only a
    process with CAP_SYS_PTRACE may open its fds through /proc/PID/fd."""
    prctl(PR_SET_DUMPABLE, 1 if on else 0)


def dumpable() -> bool:
    return prctl(PR_GET_DUMPABLE) != 0


def guest_uids(n: int, base: int | None, host_pid: int) -> list[int]:
    """The private uids (and gids) of ``n`` guests: ``base + i``; without a base, a block of
    ``UIDS_PER_HOST`` picked by the host's pid above ``GUEST_UID_BASE``."""
    if base is None:
        if n > UIDS_PER_HOST:
            raise ConfigError(f"{n} guests: more than {UIDS_PER_HOST} need guest_uid_base set "
                              "(the first of a range of uids for them)")
        base = GUEST_UID_BASE + (host_pid % _PID_SLOTS) * UIDS_PER_HOST
    if base < MIN_GUEST_UID_BASE or base + n - 1 > MAX_GUEST_UID:
        raise ConfigError(f"guest_uid_base = {base}: the guests' uids {base} to {base + n - 1} "
                          f"must be within {MIN_GUEST_UID_BASE} to {MAX_GUEST_UID}")
    return [base + i for i in range(n)]


def preexec(procs_fd: int | None, uid: int | None, reach: Reach = ()) -> Callable[[], None]:
    """What the child runs between fork and exec (module docstring): join the cgroup whose
    ``cgroup.procs`` is open as ``procs_fd``, open the way to Python (``reach``), drop to
    ``uid`` (also its gid), no new privileges, die with the host. Any failure raises, and the
    guest is not started."""

    def run() -> None:
        if procs_fd is not None:
            os.write(procs_fd, str(os.getpid()).encode())
        if uid is not None:
            open_reach(reach)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return run


__all__ = [
    "GUEST_UID_BASE",
    "UIDS_PER_HOST",
    "Reach",
    "dumpable",
    "guest_uids",
    "needed_paths",
    "open_reach",
    "plan_reach",
    "prctl",
    "preexec",
    "set_dumpable",
]
