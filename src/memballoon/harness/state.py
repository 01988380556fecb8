"""Everything an object holds, as plain values: to check that two paths end in the same state.

A fast path (a guest that sleeps through quiet periods, a bulk path that takes many pages in
one numpy step) is allowed only if it ends exactly where the slow path ends: the same page
states, lists, counters, statistics and protocol state. ``state_of`` walks an object graph
(dataclass fields, ``__slots__``, ``__dict__``) into nested dicts, lists and bytes, so a test
compares two driver/device pairs with ``==`` and ``state_diff`` says where they part.

What counts is what a later call can observe: a growable array's spare capacity is not state
(``PfnStack``/``PfnDeque`` compare by their contents), nor are bound methods and functions (the
wiring is the same by construction). Shared objects are walked once and referred to by the
order in which they were first met, so aliasing differences show too.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import numpy as np

_SCALARS = (int, float, str, bool, type(None), bytes, complex)


def _attrs(obj: object) -> list[str]:
    names: list[str] = []
    for klass in type(obj).__mro__:
        slots = getattr(klass, "__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    if hasattr(obj, "__dict__"):
        names.extend(vars(obj))
    return [n for n in dict.fromkeys(names) if not n.startswith("__")]


def state_of(obj: object, _seen: dict[int, int] | None = None) -> Any:
    """``obj``'s state as nested plain values (module docstring)."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, enum.Enum):
        return (type(obj).__qualname__, obj.value)
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if callable(obj) and not hasattr(obj, "__slots__") and not hasattr(obj, "__dict__"):
        return ("callable",)
    if hasattr(obj, "__self__") or type(obj).__name__ in ("function", "method"):
        return ("callable",)
    if id(obj) in seen:
        return ("ref", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if type(obj).__name__ in ("PfnStack", "PfnDeque"):
        return ("pfns", obj.to_array().tobytes())  # type: ignore[attr-defined]
    if isinstance(obj, dict):
        return {repr(k): state_of(v, seen) for k, v in obj.items()}
    if isinstance(obj, list | tuple | deque):
        return [state_of(v, seen) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted(repr(v) for v in obj)
    out: dict[str, Any] = {"(type)": type(obj).__qualname__}
    for name in _attrs(obj):
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        out[name] = state_of(value, seen)
    return out


def state_diff(a: Any, b: Any, path: str = "", limit: int = 20) -> list[str]:
    """Where two ``state_of`` values differ, as ``path: a != b`` lines (at most ``limit``)."""
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if len(out) >= limit:
            return
        if type(x) is not type(y):
            out.append(f"{p}: {type(x).__name__} != {type(y).__name__}")
        elif isinstance(x, dict):
            for k in dict.fromkeys([*x, *y]):
                if k not in x or k not in y:
                    out.append(f"{p}.{k}: only on one side")
                else:
                    walk(x[k], y[k], f"{p}.{k}")
        elif isinstance(x, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{p}[{i}]")
        elif x != y:
            out.append(f"{p}: {repr(x)[:60]} != {repr(y)[:60]}")

    walk(a, b, path or "(root)")
    return out


__all__ = ["state_diff", "state_of"]
