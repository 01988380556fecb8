"""The daemon's state file: what a restarted daemon needs to go on where a crashed one stopped.

One JSON document, ``DaemonSnapshot`` (version 1): the manager core's snapshot (manual targets,
each guest's last change), the policy's (named, validated by ``policy.registry``), and each
guest's last balloon target. Written atomically every period (a temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory), so a SIGKILL at any moment leaves
either the old document or the new one, never half of one. Times inside are ages at the moment
of saving; the wall clock at saving (``saved_at``) lets a restart age them by the time the
daemon was down (a monotonic clock does not survive a restart; a wall clock that jumped back
counts as no time).

Reading is strict: a document of another version or a malformed one is refused with a
ConfigError that says what to do (move the file away to start afresh), never half-read; one
left by a daemon of another world or policy is set aside (renamed, kept) and the daemon starts
afresh, saying so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from memballoon.manager.core import CoreSnapshot
from memballoon.model.errors import ConfigError
from memballoon.model.snapshot import Snapshot


class DaemonSnapshot(Snapshot):
    version: Literal[1]
    world: str
    policy: str
    saved_at: Annotated[float, Field(allow_inf_nan=False)]  # wall clock, epoch seconds
    core: CoreSnapshot
    policy_state: dict[str, Any]  # the policy's own snapshot, checked by the policy registry
    targets: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


def write_state(path: Path, snap: DaemonSnapshot) -> None:
    """Replace ``path`` with ``snap`` atomically (see the module docstring)."""
    data = snap.to_json().encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_state(path: Path) -> DaemonSnapshot | None:
    """The state at ``path`` (None when there is none); ConfigError for one of another version
    or not whole (never half-read). Whether it is this daemon's (its world and policy) is the
    caller's to check: ``is_ours``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"state file {path}: cannot read it: {exc.strerror}") from None
    try:
        return DaemonSnapshot.from_json(data)
    except ConfigError as exc:
        raise ConfigError(f"state file {path}: {exc}; move {path} away to start afresh"
                          ) from None


def is_ours(snap: DaemonSnapshot, *, world: str, policy: str) -> bool:
    """Whether ``snap`` was left by a daemon of this world and policy (another's state says
    nothing about these guests: it is set aside, not restored)."""
    return snap.world == world and snap.policy == policy


def set_aside(path: Path, snap: DaemonSnapshot) -> Path:
    """Rename another daemon's state out of the way (kept, not deleted); returns where."""
    to = path.with_name(f"{path.name}.{snap.world}-{snap.policy}")
    os.replace(path, to)
    return to


def downtime_s(snap: DaemonSnapshot, wall: Callable[[], float] = time.time) -> float:
    """How long the daemon was down (0 when the wall clock went back meanwhile). Restoring
    the core and the policy at ``now - downtime_s(snap)`` ages everything by it."""
    return max(0.0, wall() - snap.saved_at)


__all__ = ["DaemonSnapshot", "downtime_s", "is_ours", "read_state", "set_aside", "write_state"]
