"""``memballoon bench reclaim``: how fast a balloon gives a guest's real memory back to the host.

One local guest (a process over a memfd) touches all its RAM. The host inflates its balloon to
half the RAM and waits until the device reports it there (end to end: the host's
``set_target``, the guest's driver allocating and sending frames, the host's device
validating them and punching the memfd), then deflates to 0, then the guest touches every
free page again (refault). Memory released is measured from the memfd's ``st_blocks``. In the
same run, punching the same amount of touched memfd directly (one call per 1 MiB) gives the
machine's raw speed, and ``ratio`` compares the two. The machine is shared and noisy:
``repeat`` runs the whole measurement several times and reports the median run.

``ram`` picks what backs the guest's RAM: 4 KiB shmem, shmem in transparent huge pages
(``thp``) or hugetlbfs (``hugetlb``). With huge pages the host releases whole 2 MiB pages only
(host/hostpages.py): ``partial_huge_pages`` is how many the balloon held in part at the
target, and the raw reference punches the same kind of memory, one 2 MiB page a call.
``thp_backed_bytes`` is how much of the guest's RAM came in as shmem huge pages
(/proc/meminfo ``ShmemHugePages``, less what it was before the run). A host not set up for
the kind is refused with what to set; ``setup_hugepages`` sets it for the run and puts it back.

The legacy VMware protocol sends one page per command and polls once a second: its figures
show the seed's design cap of 16385 pages a cycle, not the machine. ``vmw-batched`` locks 2 MiB
pages, 512 a command; ``virtio`` sends 256-PFN buffers, several in flight.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from memballoon.guest.virtio_driver import HUGE_ARRAY_PFNS
from memballoon.host.hugepages import (
    HugePageSetup,
    check_host,
    huge_pages_for,
    shmem_huge_bytes,
)
from memballoon.host.punch import raw_punch_hole_gib_per_s
from memballoon.local.host import GuestSpec, LocalHost
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import GIB, MIB, PAGE_SIZE, RamKind, mib_to_pages
from memballoon.protocol.virtio_balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX


def _rss_anon_bytes() -> int:
    """This process's own anonymous memory (not the guests' shared memfd pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _array_pfns(protocol: str, kind: RamKind, asked: int | None) -> int | None:
    """PFNs a virtio array in this run (what the guest takes by default); None for VMware."""
    if protocol != "virtio":
        return None
    if asked is not None:
        return asked
    return VIRTIO_BALLOON_ARRAY_PFNS_MAX if kind is RamKind.SMALL else HUGE_ARRAY_PFNS


async def _run(protocol: str, guest_mib: int, ram_kind: RamKind, array_pfns: int | None,
               timeout_s: float) -> dict[str, Any]:
    pages = mib_to_pages(guest_mib)
    half = pages // 2
    spec = GuestSpec(name="bench", mib=guest_mib, protocol=protocol, workload="idle",
                     ram=ram_kind, virtio_array_pfns=array_pfns)
    rss0 = _rss_anon_bytes()
    huge0 = shmem_huge_bytes()
    async with LocalHost([spec], budget_bytes=None) as host:
        host_overhead = _rss_anon_bytes() - rss0
        ram = host.ram("bench")
        # the guest writes every free page (as one that used its memory and freed it); the
        # reply comes once it is done, so st_blocks is settled before we measure
        await host.control("bench", "touch_free", timeout_s)
        before = ram.resident_bytes()
        thp_backed = shmem_huge_bytes() - huge0 if ram_kind is RamKind.THP else 0

        async def move(target: int) -> float:
            t0 = time.perf_counter()
            host.set_target("bench", target)
            ok = await host.wait_until(lambda v: v["bench"].balloon_pages == target, timeout_s,
                                       poll_s=0.002)
            if not ok:
                v = host.guests()["bench"]
                why = host.host_memory_error("bench")
                raise MemballoonError(f"balloon stuck at {v.balloon_pages} pages, target "
                                      f"{target} (alive={v.alive})" + (f": {why}" if why else ""))
            return time.perf_counter() - t0

        inflate_s = await move(half)
        after = ram.resident_bytes()
        partial = host.partial_huge_pages("bench")
        device_counters = host.counters_of("bench")
        deflate_s = await move(0)
        t0 = time.perf_counter()
        touched = int((await host.control("bench", "touch_free"))["touched_pages"])
        refault_s = time.perf_counter() - t0
        lost = int((await host.control("bench", "verify"))["lost_pages"])
        refaulted = ram.resident_bytes()
    moved_gib = half * PAGE_SIZE / GIB
    raw = raw_punch_hole_gib_per_s(half * PAGE_SIZE // MIB, kind=ram_kind)
    gib_per_s = moved_gib / inflate_s
    return {
        "protocol": protocol,
        "ram": str(ram_kind),
        "virtio_array_pfns": array_pfns,
        "guest_bytes": pages * PAGE_SIZE,
        "balloon_bytes": half * PAGE_SIZE,
        "seconds": round(inflate_s, 4),
        "gib_per_s": round(gib_per_s, 3),
        "pages_per_second": round(half / inflate_s, 1),
        "deflate_seconds": round(deflate_s, 4),
        "deflate_gib_per_s": round(moved_gib / deflate_s, 3),
        "refault_seconds": round(refault_s, 4),
        "refault_gib_per_s": round(touched * PAGE_SIZE / GIB / refault_s, 3),
        "resident_before_bytes": before,
        "resident_after_inflate_bytes": after,
        "resident_after_refault_bytes": refaulted,
        "host_released_bytes": before - after,
        "partial_huge_pages": partial,
        "thp_backed_bytes": thp_backed,
        "raw_punch_hole_gib_per_s": round(raw, 3),
        "ratio": round(gib_per_s / raw, 3),
        "host_overhead_bytes": host_overhead,
        "lost_pages": lost,
        "device_counters": {k: v for k, v in device_counters.items() if not k.startswith("_")},
    }


def run_reclaim(protocol: str, guest_mib: int, *, repeat: int = 1, ram: str = "4k",
                setup_hugepages: bool = False, array_pfns: int | None = None,
                timeout_s: float | None = None) -> dict[str, Any]:
    """One run, or with ``repeat`` > 1 that many: the run with the median ratio, every run's
    speeds under ``runs``, the pages lost in all of them (a loss in any run shows) and the
    largest host overhead seen. ``ram`` is ``4k``, ``thp`` or ``hugetlb``; a host not set up
    for it raises ``HostResourceError`` naming what to set, unless ``setup_hugepages``.
    ``array_pfns``: PFNs a virtio array (default Linux's 256 with 4k RAM, sixteen 2 MiB pages
    with huge pages)."""
    if protocol not in ("vmw", "vmw-batched", "virtio"):
        raise ConfigError(f"unknown protocol {protocol!r}; choose vmw, vmw-batched or virtio")
    if guest_mib < 128:
        raise ConfigError(f"--guest-mib must be at least 128, got {guest_mib}")
    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {repeat}")
    try:
        kind = RamKind(ram)
    except ValueError:
        raise ConfigError(f"unknown --ram {ram!r}; choose 4k, thp or hugetlb") from None
    if array_pfns is not None and (protocol != "virtio" or not 1 <= array_pfns <= 16384):
        raise ConfigError(f"--array-pfns is for virtio, from 1 to 16384, got {array_pfns}")
    if kind is not RamKind.SMALL and guest_mib % 4:
        raise ConfigError(f"--ram {kind}: --guest-mib must be a multiple of 4 (half of it is "
                          f"ballooned in whole 2 MiB pages), got {guest_mib}")
    if timeout_s is None:
        # the legacy protocol moves 16385 pages a 1 s cycle by design
        timeout_s = 60.0 + (mib_to_pages(guest_mib) / 16385 if protocol == "vmw" else 0)
    # the guest's RAM, then the raw reference of half of it: never both at once
    needs: dict[RamKind, int] = {}
    if kind is not RamKind.SMALL:
        needs[kind] = huge_pages_for(mib_to_pages(guest_mib))
    setup = HugePageSetup()
    try:
        if setup_hugepages:
            for line in setup.ensure(needs):
                print(f"memballoon: bench reclaim: set {line} (put back afterwards)",
                      file=sys.stderr)
        check_host(needs)
        return _runs(protocol, guest_mib, kind, _array_pfns(protocol, kind, array_pfns), repeat,
                     timeout_s)
    finally:
        setup.restore()


def _runs(protocol: str, guest_mib: int, kind: RamKind, array_pfns: int | None, repeat: int,
          timeout_s: float) -> dict[str, Any]:
    if repeat == 1:
        return asyncio.run(_run(protocol, guest_mib, kind, array_pfns, timeout_s))
    runs = []
    for i in range(repeat):
        r = asyncio.run(_run(protocol, guest_mib, kind, array_pfns, timeout_s))
        print(f"memballoon: bench reclaim: run {i + 1}/{repeat}: {r['gib_per_s']} GiB/s, "
              f"ratio {r['ratio']}", file=sys.stderr)
        runs.append(r)
    median = sorted(runs, key=lambda r: r["ratio"])[(repeat - 1) // 2]
    return {
        **median,
        "lost_pages": sum(r["lost_pages"] for r in runs),
        "host_overhead_bytes": max(r["host_overhead_bytes"] for r in runs),
        "repeat": repeat,
        "partial_huge_pages": max(r["partial_huge_pages"] for r in runs),
        "runs": [{k: r[k] for k in ("gib_per_s", "raw_punch_hole_gib_per_s", "ratio")}
                 for r in runs],
    }
