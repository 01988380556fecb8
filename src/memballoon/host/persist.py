"""What both devices' snapshots share: sets of frames as ranges (Firecracker's ``persist.rs``).

A device's snapshot (``VmwDeviceSnapshot``, ``VirtioDeviceSnapshot``, each beside its device)
keeps every set of frames (the balloon, the pinned frames) as half-open ``[start, end)`` ranges,
never as a list of frames: a 16 GiB guest has 4 million of them, and a balloon is mostly long
runs. ``FrameRanges`` is that field: sorted, non-overlapping, non-empty ranges of non-negative
frame numbers (touching ranges are allowed: they are still one set). Which guest they must lie
inside is the snapshot's ``guest_pages``, checked by ``check_inside``.

``ranges_of`` and ``mask_of`` convert between a device's per-frame bitmap and ranges; both cost
numpy passes over the bitmap, not Python work per frame.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import numpy.typing as npt
from pydantic import AfterValidator, Field

from memballoon.model.errors import ConfigError
from memballoon.model.pages import RangeArray

Frame = Annotated[int, Field(ge=0)]


def _sorted_disjoint(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    if not ranges:
        return ranges
    r = np.asarray(ranges, dtype=np.int64)
    if bool((r[:, 1] <= r[:, 0]).any()):
        raise ConfigError("a frame range is empty or reversed (each is [start, end), start < end)")
    if bool((r[1:, 0] < r[:-1, 1]).any()):
        raise ConfigError("frame ranges must be sorted and must not overlap")
    return ranges


#: Half-open ``[start, end)`` frame ranges, sorted and non-overlapping; JSON ``[[s, e], ...]``.
FrameRanges = Annotated[tuple[tuple[Frame, Frame], ...], AfterValidator(_sorted_disjoint)]


def check_inside(name: str, ranges: tuple[tuple[int, int], ...], guest_pages: int) -> None:
    """Raise ``ConfigError`` (a validation error, in a model) if a range runs past the guest."""
    if ranges and ranges[-1][1] > guest_pages:  # sorted: the last range ends last
        raise ConfigError(f"{name}: frame range {list(ranges[-1])} runs past the guest's "
                         f"{guest_pages} pages")


def check_disjoint(name_a: str, a: tuple[tuple[int, int], ...],
                   name_b: str, b: tuple[tuple[int, int], ...]) -> None:
    """Raise ``ConfigError`` if the two sorted range sets share a frame."""
    if not a or not b:
        return
    ra, rb = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    # the first range of b ending after each range of a starts: overlap iff it starts before
    # that range of a ends
    k = np.searchsorted(rb[:, 1], ra[:, 0], side="right")
    hit = k < len(rb)
    if bool((rb[k[hit], 0] < ra[hit, 1]).any()):
        raise ConfigError(f"{name_a} and {name_b} share frames")


def ranges_of(mask: npt.NDArray[np.bool_]) -> tuple[tuple[int, int], ...]:
    """The set frames of a per-frame bitmap, as maximal ranges (for a snapshot field).

    >>> ranges_of(np.array([0, 1, 1, 0, 1], dtype=np.bool_))
    ((1, 3), (4, 5))
    """
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0))
    return tuple(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def mask_of(ranges: tuple[tuple[int, int], ...], frames: int) -> npt.NDArray[np.bool_]:
    """A bitmap of ``frames`` with the frames of ``ranges`` set (sorted, disjoint, inside).

    >>> mask_of(((1, 3), (4, 5)), 6).astype(int).tolist()
    [0, 1, 1, 0, 1, 0]
    """
    step = np.zeros(frames + 1, dtype=np.int8)
    if ranges:
        r = as_range_array(ranges)
        step[r[:, 0]] = 1  # disjoint: no two ranges start or end at the same frame...
        np.add.at(step, r[:, 1], -1)  # ...but one may end where the next starts
    return np.cumsum(step[:-1], dtype=np.int8).astype(np.bool_)


def as_range_array(ranges: tuple[tuple[int, int], ...]) -> RangeArray:
    """Snapshot ranges as the ``(k, 2)`` array the page helpers take."""
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


__all__ = ["FrameRanges", "as_range_array", "check_disjoint", "check_inside", "mask_of",
           "ranges_of"]
