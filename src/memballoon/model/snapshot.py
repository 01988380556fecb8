"""The base of every versioned snapshot: what must survive a daemon restart.

Firecracker's ``persist.rs`` gives each device an explicit state to save and restore; here each
component that keeps state across steps (the manager core, each policy, each balloon device)
declares a ``Snapshot`` subclass: a frozen pydantic model that refuses unknown keys, carries a
``version`` (a ``Literal``: a snapshot of another version is refused, not guessed at), and
stores times as ages relative to the moment it was taken, never as readings of a monotonic
clock (a new process, or a rebooted host, has another origin).

A snapshot read back from disk is untrusted input: ``from_json`` turns every validation failure
into a ``ConfigError`` naming the snapshot and the first bad field.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, ValidationError

from memballoon.model.errors import ConfigError


class SnapshotPart(BaseModel):
    """A record inside a snapshot: frozen, and no field it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Snapshot(SnapshotPart):
    """A whole snapshot: what one component saves and restores."""

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Parse and validate; ConfigError (naming the field) for anything wrong."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise ConfigError(f"{cls.__name__}: {where}: {err['msg']}") from None


__all__ = ["Snapshot", "SnapshotPart"]
