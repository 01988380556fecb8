"""The virtio memory balloon device's wire facts: ids, feature bits, queues, config, stats.

Sources: VIRTIO 1.2 section 5.5 "Traditional Memory Balloon Device" and Linux
``include/uapi/linux/virtio_balloon.h`` (the stat tags 10 to 15 arrived in Linux 6.12).

Two private feature bits carry VMware's extensions from seed 001 (Torokhov, "VMware balloon
driver over virtio", 2010), which upstream virtio never adopted:

- ``VIRTIO_BALLOON_X_F_HOST_REFUSE`` (bit 22): the host may refuse pages. Each inflate chain
  carries, after the device-readable PFN array, one device-writable status byte per PFN
  (``VIRTIO_BALLOON_X_STATUS_TAKEN`` or ``..._REFUSED``); refused frames stay the guest's, the
  driver keeps them aside (so it does not get them again) and frees them once the target is
  reached.
- ``VIRTIO_BALLOON_X_F_HOST_RESET`` (bit 23): the host may reset the balloon. The config space
  grows by ``u32 x_reset_generation`` (device writes; it bumps it and raises a config-change
  interrupt) and ``u32 x_reset_ack`` (driver writes the generation it has handled). On a new
  generation the driver drops every balloon frame WITHOUT telling the device, which already
  took its memory back.

Why 22 and 23: VIRTIO 1.2 section 6 gives device types bits 0 to 23 (and 50 to 127); bits 24
to 49 belong to the transport and queue mechanisms (INDIRECT_DESC 28, EVENT_IDX 29,
VERSION_1 32, ...). Upstream balloon bits grow from 0 (0 to 5 today) and crosvm's private
ones sit at 6 and 8, so the top two device bits are the farthest from anything assigned.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import DeviceConfigError, StatsError

VIRTIO_ID_BALLOON: Final = 5


class StatsCounter(CounterName):
    """What ``decode_stats`` counts in the caller's bag when it skips part of a buffer."""

    STATS_TRUNCATED = "stats_truncated"  # buffers ending in a partial entry (that entry skipped)
    STATS_UNKNOWN_TAG = "stats_unknown_tag"  # entries with a tag past VIRTIO_BALLOON_S_NR


# Feature bits (virtio_balloon.h)
VIRTIO_BALLOON_F_MUST_TELL_HOST: Final = 0  # tell host before reclaiming pages
VIRTIO_BALLOON_F_STATS_VQ: Final = 1  # memory stats virtqueue
VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Final = 2  # deflate balloon on OOM
VIRTIO_BALLOON_F_FREE_PAGE_HINT: Final = 3  # VQ to report free pages
VIRTIO_BALLOON_F_PAGE_POISON: Final = 4  # guest is using page poisoning
VIRTIO_BALLOON_F_REPORTING: Final = 5  # page reporting virtqueue
# Device-independent bits (VIRTIO 1.2 section 6)
VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_VERSION_1: Final = 32
# memballoon's private bits for seed 001 (see the module docstring)
VIRTIO_BALLOON_X_F_HOST_REFUSE: Final = 22
VIRTIO_BALLOON_X_F_HOST_RESET: Final = 23

VIRTIO_BALLOON_X_STATUS_TAKEN: Final = 0
VIRTIO_BALLOON_X_STATUS_REFUSED: Final = 1

VIRTIO_BALLOON_PFN_SHIFT: Final = 12  # the balloon always speaks 4 KiB frames
# Linux drivers/virtio/virtio_balloon.c: PFNs per inflate/deflate buffer (1 MiB)
VIRTIO_BALLOON_ARRAY_PFNS_MAX: Final = 256
# Linux virtio_balloon.c OOM_VBALLOON_DEFAULT_PAGES (module parameter oom_pages): pages
# deflated per OOM notification
VIRTIO_BALLOON_OOM_NR_PAGES: Final = 256
# free page hinting command ids (config free_page_hint_cmd_id)
VIRTIO_BALLOON_CMD_ID_STOP: Final = 0
VIRTIO_BALLOON_CMD_ID_DONE: Final = 1


def bit(n: int) -> int:
    return 1 << n


def has(features: int, n: int) -> bool:
    return bool(features >> n & 1)


def features_of(*bits: int) -> int:
    out = 0
    for b in bits:
        out |= 1 << b
    return out


class BalloonQueue(IntEnum):
    """The balloon's queues by role (the spec's names), in the order they are numbered."""

    INFLATEQ = 0
    DEFLATEQ = 1
    STATSQ = 2
    FREE_PAGE_VQ = 3
    REPORTING_VQ = 4


def queue_indices(features: int) -> dict[BalloonQueue, int]:
    """Queue index of every queue the negotiated ``features`` make exist.

    Like Linux's ``init_vqs`` with ``virtio_find_vqs``: a queue whose feature is not
    negotiated has no name and takes no index, so the later ones move down (REPORTING alone
    puts reporting_vq at 2).
    """
    present = [BalloonQueue.INFLATEQ, BalloonQueue.DEFLATEQ]
    if has(features, VIRTIO_BALLOON_F_STATS_VQ):
        present.append(BalloonQueue.STATSQ)
    if has(features, VIRTIO_BALLOON_F_FREE_PAGE_HINT):
        present.append(BalloonQueue.FREE_PAGE_VQ)
    if has(features, VIRTIO_BALLOON_F_REPORTING):
        present.append(BalloonQueue.REPORTING_VQ)
    return {q: i for i, q in enumerate(present)}


# ---------------------------------------------------------------- config space
CONFIG_BYTES: Final = 16  # struct virtio_balloon_config
CONFIG_X_BYTES: Final = 24  # with the private reset extension
OFFSET_NUM_PAGES: Final = 0
OFFSET_ACTUAL: Final = 4
OFFSET_FREE_PAGE_HINT_CMD_ID: Final = 8
OFFSET_POISON_VAL: Final = 12
OFFSET_X_RESET_GENERATION: Final = 16
OFFSET_X_RESET_ACK: Final = 20
#: Fields the driver may write; the rest belong to the device.
DRIVER_WRITABLE_OFFSETS: Final = frozenset({OFFSET_ACTUAL, OFFSET_POISON_VAL, OFFSET_X_RESET_ACK})

_CONFIG = struct.Struct("<IIII")
_CONFIG_X = struct.Struct("<IIIIII")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class BalloonConfig:
    """The balloon's config space (all fields little-endian u32)."""

    num_pages: int  # device: the balloon size it wants, in 4 KiB pages
    actual: int  # driver: the balloon size it has
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0
    x_reset_generation: int = 0  # private reset extension only
    x_reset_ack: int = 0

    def encode(self, *, extended: bool = False) -> bytes:
        return encode_config(self.num_pages, self.actual, self.free_page_hint_cmd_id,
                             self.poison_val, self.x_reset_generation, self.x_reset_ack,
                             extended=extended)

    @classmethod
    def decode(cls, data: bytes) -> BalloonConfig:
        """``DeviceConfigError`` unless ``data`` is 16 or 24 bytes."""
        if cls is BalloonConfig and type(data) is bytes:
            return _decode_config(data)  # a driver reads the same bytes period after period
        return cls._decode(data)

    @classmethod
    def _decode(cls, data: bytes) -> BalloonConfig:
        if len(data) == CONFIG_BYTES:
            return cls(*_CONFIG.unpack(data))
        if len(data) == CONFIG_X_BYTES:
            return cls(*_CONFIG_X.unpack(data))
        raise DeviceConfigError(f"balloon config of {len(data)} bytes (want 16 or 24)")


@functools.lru_cache(maxsize=4096)
def _decode_config(data: bytes) -> BalloonConfig:
    """``BalloonConfig.decode``, remembered: the config is immutable, and decoding it anew costs
    more than looking the bytes up (exceptions are not cached: they are raised again)."""
    return BalloonConfig._decode(data)


def encode_config(num_pages: int, actual: int, free_page_hint_cmd_id: int = 0,
                  poison_val: int = 0, x_reset_generation: int = 0, x_reset_ack: int = 0, *,
                  extended: bool = False) -> bytes:
    """A ``BalloonConfig``'s bytes from its fields (a device's read, no object built)."""
    if extended:
        return _CONFIG_X.pack(num_pages, actual, free_page_hint_cmd_id, poison_val,
                              x_reset_generation, x_reset_ack)
    return _CONFIG.pack(num_pages, actual, free_page_hint_cmd_id, poison_val)


def encode_u32(value: int) -> bytes:
    return _U32.pack(value & 0xFFFF_FFFF)


def decode_u32(data: bytes) -> int:
    if len(data) != 4:
        raise DeviceConfigError(f"config field of {len(data)} bytes (want 4)")
    return int(_U32.unpack(data)[0])


# ---------------------------------------------------------------- statistics
class StatTag(IntEnum):
    """``VIRTIO_BALLOON_S_*``: memory in bytes, events in counts."""

    SWAP_IN = 0  # bytes swapped in
    SWAP_OUT = 1  # bytes swapped out
    MAJFLT = 2  # major faults
    MINFLT = 3  # minor faults
    MEMFREE = 4  # free memory, bytes
    MEMTOT = 5  # total memory, bytes
    AVAIL = 6  # available memory as in /proc/meminfo, bytes
    CACHES = 7  # disk caches, bytes
    HTLB_PGALLOC = 8  # hugetlb page allocations
    HTLB_PGFAIL = 9  # hugetlb page allocation failures
    OOM_KILL = 10  # OOM killer invocations
    ALLOC_STALL = 11  # allocation stalls
    ASYNC_SCAN = 12  # bytes scanned by kswapd
    DIRECT_SCAN = 13  # bytes scanned in direct reclaim
    ASYNC_RECLAIM = 14  # bytes reclaimed by kswapd
    DIRECT_RECLAIM = 15  # bytes reclaimed in direct reclaim


VIRTIO_BALLOON_S_SWAP_IN: Final = StatTag.SWAP_IN
VIRTIO_BALLOON_S_SWAP_OUT: Final = StatTag.SWAP_OUT
VIRTIO_BALLOON_S_MAJFLT: Final = StatTag.MAJFLT
VIRTIO_BALLOON_S_MINFLT: Final = StatTag.MINFLT
VIRTIO_BALLOON_S_MEMFREE: Final = StatTag.MEMFREE
VIRTIO_BALLOON_S_MEMTOT: Final = StatTag.MEMTOT
VIRTIO_BALLOON_S_AVAIL: Final = StatTag.AVAIL
VIRTIO_BALLOON_S_CACHES: Final = StatTag.CACHES
VIRTIO_BALLOON_S_HTLB_PGALLOC: Final = StatTag.HTLB_PGALLOC
VIRTIO_BALLOON_S_HTLB_PGFAIL: Final = StatTag.HTLB_PGFAIL
VIRTIO_BALLOON_S_OOM_KILL: Final = StatTag.OOM_KILL
VIRTIO_BALLOON_S_ALLOC_STALL: Final = StatTag.ALLOC_STALL
VIRTIO_BALLOON_S_ASYNC_SCAN: Final = StatTag.ASYNC_SCAN
VIRTIO_BALLOON_S_DIRECT_SCAN: Final = StatTag.DIRECT_SCAN
VIRTIO_BALLOON_S_ASYNC_RECLAIM: Final = StatTag.ASYNC_RECLAIM
VIRTIO_BALLOON_S_DIRECT_RECLAIM: Final = StatTag.DIRECT_RECLAIM
VIRTIO_BALLOON_S_NR: Final = 16

#: ``VIRTIO_BALLOON_S_NAMES`` (virtio_balloon.h), by tag.
VIRTIO_BALLOON_S_NAMES: Final = (
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
)

STAT_ENTRY_BYTES: Final = 10  # struct virtio_balloon_stat { __le16 tag; __le64 val; } packed
_STAT_DTYPE = np.dtype([("tag", "<u2"), ("val", "<u8")])  # unaligned: itemsize 10
assert _STAT_DTYPE.itemsize == STAT_ENTRY_BYTES


def encode_stats(stats: Mapping[int, int] | Iterable[tuple[int, int]]) -> bytes:
    """Entries ``(tag, value)`` as the packed stats buffer, in the given order."""
    items = list(stats.items()) if isinstance(stats, Mapping) else list(stats)
    arr = np.empty(len(items), dtype=_STAT_DTYPE)
    for i, (tag, val) in enumerate(items):
        arr[i] = (int(tag), int(val) & 0xFFFF_FFFF_FFFF_FFFF)
    return arr.tobytes()


def decode_stats(
    data: bytes, *, counters: Counters | None = None, strict: bool = False
) -> dict[int, int]:
    """A stats buffer as ``{tag: value}`` (a later entry for a tag wins, as in QEMU).

    A truncated last entry or an unknown tag raises ``StatsError`` when ``strict``; otherwise
    it is skipped and counted (``stats_truncated``, ``stats_unknown_tag``) in ``counters``.
    """
    whole, rest = divmod(len(data), STAT_ENTRY_BYTES)
    if rest:
        if strict:
            raise StatsError(f"stats buffer of {len(data)} bytes: a truncated entry")
        if counters is not None:
            counters.inc(StatsCounter.STATS_TRUNCATED)
    arr = np.frombuffer(data, dtype=_STAT_DTYPE, count=whole)
    known = arr["tag"] < VIRTIO_BALLOON_S_NR
    bad = int(whole - int(known.sum()))
    if bad:
        if strict:
            raise StatsError(f"unknown stat tag(s) {sorted(set(arr['tag'][~known].tolist()))}")
        if counters is not None:
            counters.inc(StatsCounter.STATS_UNKNOWN_TAG, bad)
    good = arr[known]
    return dict(zip(good["tag"].tolist(), good["val"].tolist(), strict=True))


def stat_name(tag: int) -> str:
    return VIRTIO_BALLOON_S_NAMES[tag]
