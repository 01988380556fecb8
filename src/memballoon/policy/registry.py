"""The policies by name, as the config file and the CLI name them, and their snapshots."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Final

from memballoon.model.errors import ConfigError, UsageError
from memballoon.policy.base import Policy, PolicySnapshot
from memballoon.policy.default import DefaultPolicy, DefaultSnapshot
from memballoon.policy.esx import EsxPolicy, EsxSnapshot
from memballoon.policy.mom import MomPolicy, MomSnapshot
from memballoon.policy.proxmox import ProxmoxPolicy, ProxmoxSnapshot
from memballoon.policy.static import StaticPolicy, StaticSnapshot

POLICIES: Final = ("default", "static", "mom", "proxmox", "esx")

_FACTORIES: Final[dict[str, Callable[..., Policy]]] = {
    "default": DefaultPolicy,
    "static": StaticPolicy,
    "mom": MomPolicy,
    "proxmox": ProxmoxPolicy,
    "esx": EsxPolicy,
}

_SNAPSHOTS: Final[dict[str, type[PolicySnapshot]]] = {
    "default": DefaultSnapshot,
    "static": StaticSnapshot,
    "mom": MomSnapshot,
    "proxmox": ProxmoxSnapshot,
    "esx": EsxSnapshot,
}


def policy_params(name: str) -> tuple[str, ...]:
    """The parameters policy ``name`` accepts."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    sig = inspect.signature(_FACTORIES[name])
    return tuple(p for p in sig.parameters if p != "self")


def make_policy(name: str, **params: object) -> Policy:
    """A fresh policy ``name`` with ``params``; ConfigError names an unknown policy or
    parameter."""
    allowed = policy_params(name)
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ConfigError(
            f"policy {name!r} has no parameter {', '.join(map(repr, bad))}; "
            f"it takes {', '.join(allowed) or 'none'}"
        )
    try:
        return _FACTORIES[name](**params)
    except TypeError as exc:  # a value of the wrong type for the constructor's arithmetic
        raise ConfigError(f"policy {name!r}: bad parameter value: {exc}") from exc


def read_snapshot(name: str, data: str | bytes) -> PolicySnapshot:
    """Policy ``name``'s snapshot from its JSON (``snapshot(now).model_dump_json()``).

    ConfigError for a snapshot that does not parse, breaks a bound (negative pages, a time
    that is not finite), is of another version, or is another policy's.
    """
    kind = _SNAPSHOTS.get(name)
    if kind is None:
        raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return kind.from_json(data)
    except ConfigError as exc:
        raise ConfigError(f"policy {name!r}: bad snapshot: {exc}") from None


def restore_policy(policy: Policy, data: str | bytes, now: float) -> None:
    """Restore ``policy`` from its snapshot's JSON on the caller's clock at ``now``
    (ConfigError as ``read_snapshot``; the policy is left as it was then)."""
    policy.restore(read_snapshot(policy.name, data), now)
