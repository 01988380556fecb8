"""The policies by name, as the config file and the CLI name them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Final

from memballoon.policy.base import Policy
from memballoon.policy.default import DefaultPolicy
from memballoon.policy.esx import EsxPolicy
from memballoon.policy.mom import MomPolicy
from memballoon.policy.proxmox import ProxmoxPolicy
from memballoon.policy.static import StaticPolicy

POLICIES: Final = ("default", "static", "mom", "proxmox", "esx")

_FACTORIES: Final[dict[str, Callable[..., Policy]]] = {
    "default": DefaultPolicy,
    "static": StaticPolicy,
    "mom": MomPolicy,
    "proxmox": ProxmoxPolicy,
    "esx": EsxPolicy,
}


def policy_params(name: str) -> tuple[str, ...]:
    """The parameters policy ``name`` accepts."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    sig = inspect.signature(_FACTORIES[name])
    return tuple(p for p in sig.parameters if p != "self")


def make_policy(name: str, **params: object) -> Policy:
    """A fresh policy ``name`` with ``params``; ValueError names an unknown policy or parameter."""
    allowed = policy_params(name)
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(
            f"policy {name!r} has no parameter {', '.join(map(repr, bad))}; "
            f"it takes {', '.join(allowed) or 'none'}"
        )
    try:
        return _FACTORIES[name](**params)
    except TypeError as exc:  # a value of the wrong type for the constructor's arithmetic
        raise ValueError(f"policy {name!r}: bad parameter value: {exc}") from exc
