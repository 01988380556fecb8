"""Reference speeds of the raw memory operations, measured in the same run as a benchmark.

``memballoon bench reclaim`` compares its end-to-end inflate rate with punching the same amount
of touched memfd memory of the same kind (``RamKind``: 4 KiB shmem in 1 MiB ranges; shmem THP
or hugetlbfs in 2 MiB host pages) directly (``raw_punch_hole_gib_per_s``), so the ratio says
what the protocol costs above the kernel's own work on this machine, today.

Only the operation itself is inside ``perf_counter``: the memory is touched (and checked
resident through ``st_blocks``) before the clock starts, and checked released after it stops.

Run ``python -m memballoon.host.punch [MiB [4k|thp|hugetlb]]`` for both figures as JSON (huge
pages need the host set up for them: ``host/hugepages.py``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from memballoon.host.memfd import MemfdRam, punch_hole
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import GIB, HPAGE_PMD_SIZE, MIB, PAGE_SIZE, RamKind


@dataclass(frozen=True, slots=True)
class RawMeasurement:
    operation: str
    size_bytes: int  # what the operation covered
    seconds: float  # perf_counter around the operation only
    calls: int  # system calls (punch) or vectorised numpy calls (touch)
    resident_before_bytes: int  # st_blocks of the memfd before the clock started
    resident_after_bytes: int  # and after it stopped

    @property
    def gib_per_s(self) -> float:
        return self.size_bytes / GIB / self.seconds if self.seconds > 0 else float("inf")


def _checked_size(mib: int, chunk_mib: int = 1) -> int:
    if mib <= 0 or chunk_mib <= 0:
        raise ConfigError(f"sizes must be positive MiB, got {mib} MiB in {chunk_mib} MiB chunks")
    return mib * MIB


def measure_punch_hole(mib: int, *, chunk_mib: int | None = None,
                       kind: RamKind = RamKind.SMALL) -> RawMeasurement:
    """Touch ``mib`` MiB of a fresh memfd of ``kind``, then punch it with one fallocate per
    chunk (default: 1 MiB, or one 2 MiB host page with huge pages)."""
    if chunk_mib is None:
        chunk = MIB if kind is RamKind.SMALL else HPAGE_PMD_SIZE
        size = _checked_size(mib)
    else:
        size = _checked_size(mib, chunk_mib)
        chunk = chunk_mib * MIB
    with MemfdRam(size // PAGE_SIZE, kind=kind, name="memballoon-punch") as ram:
        words = np.frombuffer(ram.mapping, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        words[:, 0] = 1  # one store per page faults every page in
        del words
        before = ram.resident_bytes()
        if before != size:
            raise MemballoonError(f"touched {size} bytes but the memfd holds {before}")
        fd = ram.fd
        offsets = range(0, size, chunk)
        t0 = time.perf_counter()
        for off in offsets:
            punch_hole(fd, off, min(chunk, size - off))
        seconds = time.perf_counter() - t0
        after = ram.resident_bytes()
    if after != 0:
        raise MemballoonError(f"punched {size} bytes but the memfd still holds {after}")
    return RawMeasurement("punch_hole", size, seconds, len(offsets), before, after)


def raw_punch_hole_gib_per_s(mib: int, *, chunk_mib: int | None = None,
                             kind: RamKind = RamKind.SMALL) -> float:
    """GiB/s of ``fallocate(PUNCH_HOLE)`` over ``mib`` MiB of touched memfd of ``kind``, one
    call per 1 MiB range (4 KiB pages) or per 2 MiB host page."""
    return measure_punch_hole(mib, chunk_mib=chunk_mib, kind=kind).gib_per_s


def measure_touch(mib: int, *, resident: bool = False) -> RawMeasurement:
    """``MemfdRam.touch`` of every page of a ``mib`` MiB memfd: stamping plus, unless
    ``resident``, the page faults that bring the memory in (the usual cost)."""
    size = _checked_size(mib)
    pages = size // PAGE_SIZE
    with MemfdRam(pages, name="memballoon-touch") as ram:
        pfns = np.arange(pages, dtype=np.int64)
        if resident:
            ram.touch(pfns, 0)
        before = ram.resident_bytes()
        t0 = time.perf_counter()
        ram.touch(pfns, 1)
        seconds = time.perf_counter() - t0
        after = ram.resident_bytes()
        lost = ram.verify(pfns)
    if after != size or lost:
        raise MemballoonError(f"touch left {after} of {size} bytes resident, {lost} pages lost")
    calls = -(-pages // 65536)
    return RawMeasurement("touch", size, seconds, calls, before, after)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    mib = int(args[0]) if args else 1024
    kind = RamKind(args[1]) if len(args) > 1 else RamKind.SMALL
    out = []
    for m in (measure_punch_hole(mib, kind=kind), measure_touch(mib),
              measure_touch(mib, resident=True)):
        out.append({**asdict(m), "gib_per_s": round(m.gib_per_s, 3)})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
