"""The manager's Backend over libvirt (libvirt-python), for hosts whose VMs libvirt runs.

libvirt speaks KiB of *logical size* like QMP speaks bytes (``virDomainSetMemoryFlags`` with
``VIR_DOMAIN_AFFECT_LIVE``; ``virDomainMemoryStats`` ``actual``); the manager speaks balloon
pages, so ``balloon_pages = (maxMemory_KiB - actual_KiB) * 1024 // PAGE_SIZE``, here only.
Pressure comes from the balloon driver's stats libvirt relays (``memoryStats``: ``unused`` =
MemFree, ``available`` = MemTotal, ``usable`` = MemAvailable, ``disk_caches``,
``major_fault``, ``swap_in``/``swap_out`` in KiB); they carry no PSI, so ``stall_pct`` is 0.
Stats need a period (``setMemoryStatsPeriod``), set once per domain.

Every libvirt call blocks (an RPC to libvirtd): they run in a worker thread, in ``refresh``
(the async shell calls it before each engine step: the samples ``guests`` returns) and
``flush`` (after it: the targets ``set_target`` queued). A libvirt error
for one domain is counted (``libvirt_error``) and marks that guest dead while the others go
on; a dropped connection is reopened on the next poll. ``libvirt`` is an optional dependency
(``pip install memballoon[libvirt]``); without it, constructing the backend raises ConfigError.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections.abc import Mapping, Sequence
from typing import Any, Final

from memballoon.edge.clock import MonotonicClock
from memballoon.manager.port import Clock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import KIB, PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import MAX_VALUE, PressureReport
from memballoon.qemu.image import GuestImage
from memballoon.qemu.initscript import AGENT_PORT_NAME

DEFAULT_URI: Final = "qemu:///system"
STATS_PERIOD_S: Final = 2
#: virDomainModificationImpact VIR_DOMAIN_AFFECT_LIVE (libvirt include/libvirt-domain.h).
VIR_DOMAIN_AFFECT_LIVE: Final = 1
#: virDomainState VIR_DOMAIN_RUNNING and VIR_DOMAIN_PAUSED.
VIR_DOMAIN_RUNNING: Final = 1
VIR_DOMAIN_PAUSED: Final = 3


class LibvirtCounter(CounterName):
    """What ``LibvirtBackend`` counts."""

    LIBVIRT_CONNECT = "libvirt_connect"  # connections opened (the first, and after a drop)
    LIBVIRT_NO_DOMAIN = "libvirt_no_domain"  # named domains libvirt does not know
    LIBVIRT_ERROR = "libvirt_error"  # libvirt calls that failed
    LIBVIRT_BAD_STATS = "libvirt_bad_stats"  # memory stats without a believable actual
    LIBVIRT_TARGET_OUT_OF_RANGE = "libvirt_target_out_of_range"  # targets outside [0, RAM)
    LIBVIRT_SET_TARGET = "libvirt_set_target"  # targets set


def _import_libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise ConfigError(
            "libvirt-python is not installed: pip install 'memballoon[libvirt]' "
            "(needs libvirt-dev and pkg-config to build)"
        ) from exc
    return libvirt


def domain_xml(name: str, image: GuestImage, *, max_mib: int, current_mib: int | None = None,
               stats_period_s: int = STATS_PERIOD_S, agent_path: str | None = None) -> str:
    """A TCG domain with direct kernel boot of the test guest and a virtio balloon.

    ``current_mib`` below ``max_mib`` starts it ballooned down (libvirt's currentMemory)."""
    cur = max_mib if current_mib is None else current_mib
    if not 64 <= cur <= max_mib:
        raise ConfigError(f"current_mib={cur}: must be between 64 and max_mib={max_mib}")
    agent = "" if agent_path is None else (
        f"<channel type='unix'><source mode='bind' path='{html.escape(agent_path)}'/>"
        f"<target type='virtio' name='{AGENT_PORT_NAME}'/></channel>")
    return (
        f"<domain type='qemu'><name>{html.escape(name)}</name>"
        f"<memory unit='MiB'>{max_mib}</memory>"
        f"<currentMemory unit='MiB'>{cur}</currentMemory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{html.escape(str(image.vmlinuz))}</kernel>"
        f"<initrd>{html.escape(str(image.initramfs))}</initrd>"
        "<cmdline>console=ttyS0 panic=-1 quiet</cmdline></os>"
        "<on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        "<devices><serial type='pty'><target port='0'/></serial>"
        f"<memballoon model='virtio'><stats period='{stats_period_s}'/></memballoon>"
        f"{agent}</devices></domain>"
    )


def _kib_stat(stats: Mapping[str, Any], key: str) -> int | None:
    v = stats.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_VALUE // KIB:
        return None
    return v


def report_from_stats(name: str, stats: Mapping[str, Any], *, max_kib: int,
                      target_pages: int, now: float) -> PressureReport | None:
    """A PressureReport from libvirt's memoryStats, or None before the guest reported."""
    total = _kib_stat(stats, "available")
    free = _kib_stat(stats, "unused")
    actual = _kib_stat(stats, "actual")
    if total is None or free is None or actual is None:
        return None
    usable = _kib_stat(stats, "usable")
    cache = _kib_stat(stats, "disk_caches") or 0
    balloon_pages = max(0, (max_kib - actual) * KIB // PAGE_SIZE)
    return PressureReport(
        guest=name, time_s=now, total_bytes=total * KIB, free_bytes=free * KIB,
        available_bytes=(usable if usable is not None else free + cache) * KIB,
        anon_bytes=max(0, total - free - cache) * KIB, cache_bytes=cache * KIB,
        balloon_bytes=balloon_pages * PAGE_SIZE,
        swap_in_pages=(_kib_stat(stats, "swap_in") or 0) * KIB // PAGE_SIZE,
        swap_out_pages=(_kib_stat(stats, "swap_out") or 0) * KIB // PAGE_SIZE,
        major_faults=_kib_stat(stats, "major_fault") or 0, oom_kills=0, stall_us=0,
        stall_pct=0.0, balloon_target_pages=target_pages,
        balloon_actual_pages=balloon_pages,
    )


class LibvirtBackend:
    """Backend for the running domains of one libvirt connection (or the ``domains`` named)."""

    def __init__(self, uri: str = DEFAULT_URI, *, domains: Sequence[str] | None = None,
                 counters: Counters | None = None,
                 stats_period_s: int = STATS_PERIOD_S, clock: Clock | None = None) -> None:
        self._libvirt = _import_libvirt()
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._samples: dict[str, GuestSample] = {}
        self._pending: dict[str, int] = {}
        self.uri = uri
        self.counters = counters if counters is not None else Counters()
        self.stats_period_s = stats_period_s
        self._only = None if domains is None else list(domains)
        self._conn: Any = None
        self._targets: dict[str, int] = {}
        self._stats_on: set[str] = set()
        self._rss: dict[str, int] = {}

    @property
    def name(self) -> str:
        return "libvirt"

    def _connection(self) -> Any:
        if self._conn is None or not self._conn.isAlive():
            self._conn = self._libvirt.open(self.uri)
            self.counters.inc(LibvirtCounter.LIBVIRT_CONNECT)
        return self._conn

    def _poll(self) -> dict[str, GuestSample]:
        lv = self._libvirt
        try:
            conn = self._connection()
            if self._only is None:
                doms = {d.name(): d for d in conn.listAllDomains(1)}  # ACTIVE
            else:
                doms = {}
                for n in self._only:
                    try:
                        doms[n] = conn.lookupByName(n)
                    except lv.libvirtError:
                        self.counters.inc(LibvirtCounter.LIBVIRT_NO_DOMAIN)
        except lv.libvirtError:
            self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
            self._conn = None
            return {n: self._dead(n) for n in (self._only or list(self._targets))}
        out: dict[str, GuestSample] = {}
        now = self.clock.now()
        for n in self._only or list(doms):
            dom = doms.get(n)
            out[n] = self._dead(n) if dom is None else self._one(n, dom, now)
        return out

    def _dead(self, n: str) -> GuestSample:
        self._rss.pop(n, None)
        return GuestSample(n, 0, 0, self._targets.get(n, 0), alive=False)

    def _one(self, n: str, dom: Any, now: float) -> GuestSample:
        try:
            state, max_kib, _cur, _cpus, _t = dom.info()
            if state not in (VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED):
                return self._dead(n)
            if n not in self._stats_on:
                dom.setMemoryStatsPeriod(self.stats_period_s, VIR_DOMAIN_AFFECT_LIVE)
                self._stats_on.add(n)
            stats = dom.memoryStats()
        except self._libvirt.libvirtError:
            self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
            return self._dead(n)
        actual = _kib_stat(stats, "actual")
        if actual is None or actual > max_kib:
            self.counters.inc(LibvirtCounter.LIBVIRT_BAD_STATS)
            actual = max_kib
        balloon_pages = (max_kib - actual) * KIB // PAGE_SIZE
        target = self._targets.setdefault(n, balloon_pages)
        rss = _kib_stat(stats, "rss")
        if rss is not None:
            self._rss[n] = rss * KIB
        return GuestSample(
            name=n, ram_pages=max_kib * KIB // PAGE_SIZE,
            balloon_pages=balloon_pages, target_pages=target,
            report=report_from_stats(n, stats, max_kib=max_kib, target_pages=target, now=now),
            report_time=now, resident_bytes=self._rss.get(n),
        )

    async def refresh(self) -> None:
        self._samples = await asyncio.to_thread(self._poll)

    def guests(self) -> Mapping[str, GuestSample]:
        """The domains as the last ``refresh`` saw them."""
        return dict(self._samples)

    async def poll(self) -> Mapping[str, GuestSample]:
        """``refresh`` then ``guests``: the samples now (for benches and tools)."""
        await self.refresh()
        return self.guests()

    def _set(self, guest: str, balloon_pages: int) -> bool:
        lv = self._libvirt
        try:
            dom = self._connection().lookupByName(guest)
            max_kib = int(dom.maxMemory())
            if balloon_pages < 0 or balloon_pages * PAGE_SIZE >= max_kib * KIB:
                self.counters.inc(LibvirtCounter.LIBVIRT_TARGET_OUT_OF_RANGE)
                return False
            dom.setMemoryFlags(max_kib - balloon_pages * PAGE_SIZE // KIB,
                               VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError:
            self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
            return False
        self._targets[guest] = balloon_pages
        self.counters.inc(LibvirtCounter.LIBVIRT_SET_TARGET)
        return True

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        """Queue a target for ``flush``; False for a domain the last refresh did not see
        alive, or a target outside its RAM (counted)."""
        s = self._samples.get(guest)
        if s is None or not s.alive:
            return False
        if not 0 <= balloon_pages < s.ram_pages:
            self.counters.inc(LibvirtCounter.LIBVIRT_TARGET_OUT_OF_RANGE)
            return False
        self._pending[guest] = balloon_pages
        return True

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for guest, pages in pending.items():
            await self.apply_target(guest, pages)

    async def apply_target(self, guest: str, balloon_pages: int) -> bool:
        """Set ``guest``'s balloon through libvirt now; False (counted) when it cannot."""
        return await asyncio.to_thread(self._set, guest, balloon_pages)

    def host_resident_bytes(self) -> int:
        """The domains' QEMU RSS as libvirt reported it at the last poll."""
        return sum(self._rss.values())

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                conn.close()


__all__ = ["LibvirtBackend", "domain_xml", "report_from_stats"]
