"""The manager's Backend over libvirt (libvirt-python): the VMs a libvirt host already runs.

Theory of operation
-------------------
One connection (``uri``, default ``qemu:///system``). Each ``refresh`` (the async shell calls
it before an engine step) asks libvirtd once for every running domain's state and balloon
(``virConnectGetAllDomainStats``: ``balloon.current``/``balloon.maximum`` in KiB of logical
size, the guest's balloon stats, QEMU's RSS); ``flush`` (after the step) sends the targets
``set_target`` queued with ``virDomainSetMemoryFlags(..., VIR_DOMAIN_AFFECT_LIVE)``. Every
libvirt call blocks (an RPC): they run in worker threads, never on the event loop. The manager
speaks balloon pages: ``balloon_pages = (maximum_KiB - current_KiB) * 1024 // PAGE_SIZE``, here
only.

Which domains: every running domain with a virtio memballoon, or (``domains``) only those
whose names match one of the patterns (``fnmatch`` globs: ``web-*``). A domain first seen is
read once from its live XML (``parse_domain_xml``): no virtio balloon means it is left alone
(said once; a domain named exactly stays listed as gone, with what to do); a balloon whose
stats period is off gets one (``setMemoryStatsPeriod``, live only: said once, with the XML to
keep it). Domains are followed without a restart: libvirt lifecycle events (the default event
loop, ``virEventRegisterDefaultImpl``, run by one thread per process) say at once why a domain
went (shut down, destroyed, crashed, migrated away) or came (started, migrated in, defined
and started later), and every refresh lists the running domains again, so a missed event
costs one period. Where the event loop cannot be had, the refresh's list alone follows them
(``events`` says why). Lifecycle changes are kept as ``BackendEvent`` records for the journal
(``drain_events``).

Pressure, per domain, from the best source it has (``pressure_sources``):
1. ``qemu-guest-agent``: a ``org.qemu.guest_agent.0`` channel with qemu-ga in the guest:
   ``/proc/meminfo``, ``/proc/vmstat`` and ``/proc/pressure/memory`` read through libvirt's
   ``qemuAgentCommand`` (``qemu.qga``), each command bounded by ``QGA_TIMEOUT_S``; an agent
   absent or slow is left alone for ``QGA_RETRY_S`` (or until libvirt says it connected), one
   that answers garbage is counted; the next source stands in meanwhile;
2. ``memballoon-agent``: a ``org.memballoon.agent`` unix channel (``memballoon agent`` or the
   test image's init in the guest), read like the QEMU world reads it;
3. ``balloon-stats``: the virtio balloon's own stats (MemFree, MemTotal, MemAvailable, caches,
   major faults, swap-ins): no PSI, so no stall figure; stamped with the guest's
   ``last-update``, so a guest that stopped answering ages like a silent one.
The balloon a report is paired with is the one of the report's moment: the guest's own vmstat
count (qemu-ga, the memballoon agent), else the balloon polled last before the report was
written (``qemu.history``).

Failures, domain by domain (the others never notice): a libvirt error for one domain is
counted (``libvirt_error``); a domain that stopped between collect and act refuses its target
as ``libvirt_domain_gone``; a dropped connection (libvirtd restarted) marks every domain gone
("libvirtd unreachable") and is reopened on the next refresh, events and all.
``libvirt`` is an optional dependency (``pip install memballoon[libvirt]``); without it,
constructing the backend raises ConfigError naming the package.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import html
import importlib
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from memballoon.edge.clock import MonotonicClock
from memballoon.manager.port import Clock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import KIB, PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import MAX_VALUE, PressureReport
from memballoon.qemu.agent import AgentChannel, AgentReport, to_pressure_report
from memballoon.qemu.errors import (
    GuestAgentError,
    GuestGoneError,
    QgaRefusedError,
    QgaUnresponsiveError,
)
from memballoon.qemu.history import BalloonHistory
from memballoon.qemu.image import GuestImage
from memballoon.qemu.initscript import AGENT_PORT_NAME
from memballoon.qemu.qga import QGA_PORT_NAME, read_report

log = logging.getLogger(__name__)

DEFAULT_URI: Final = "qemu:///system"
STATS_PERIOD_S: Final = 2
#: A wall clock that goes back by more than this was stepped (smaller: jitter, ignored).
WALL_STEP_BACK_S: Final = 5.0
#: virDomainModificationImpact VIR_DOMAIN_AFFECT_LIVE (libvirt include/libvirt-domain.h).
VIR_DOMAIN_AFFECT_LIVE: Final = 1
#: virDomainState VIR_DOMAIN_RUNNING and VIR_DOMAIN_PAUSED.
VIR_DOMAIN_RUNNING: Final = 1
VIR_DOMAIN_PAUSED: Final = 3
#: virDomainStatsTypes STATE | BALLOON; virConnectGetAllDomainStatsFlags ACTIVE.
STATS_STATE_BALLOON: Final = 1 | 4
STATS_ACTIVE: Final = 1
#: virErrorNumber values this backend tells apart (libvirt include/virterror.h).
VIR_ERR_INTERNAL_ERROR: Final = 1
VIR_ERR_NO_DOMAIN: Final = 42
VIR_ERR_OPERATION_INVALID: Final = 55
#: virDomainEventID LIFECYCLE and AGENT_LIFECYCLE; agent state CONNECTED.
EVENT_LIFECYCLE: Final = 0
EVENT_AGENT_LIFECYCLE: Final = 18
AGENT_STATE_CONNECTED: Final = 1
#: Each qemu-ga command's timeout (libvirt takes whole seconds).
QGA_TIMEOUT_S: Final = 1
#: An absent or slow qemu-ga is left alone this long (unless libvirt says it connected).
QGA_RETRY_S: Final = 30.0
#: A domain that stopped is listed as gone this long, then forgotten (named ones never are).
FORGET_AFTER_S: Final = 600.0
#: libvirt's keepalive: a ping every 5 s, the connection declared dead after 3 unanswered.
KEEPALIVE_INTERVAL_S: Final = 5
KEEPALIVE_COUNT: Final = 3

#: Why a domain is gone when only a poll saw it go (a lifecycle event then says how).
NOT_RUNNING: Final = "not running"

SOURCE_QGA: Final = "qemu-guest-agent"
SOURCE_AGENT: Final = "memballoon-agent"
SOURCE_STATS: Final = "balloon-stats"
SOURCE_NONE: Final = "none"


class LibvirtCounter(CounterName):
    """What ``LibvirtBackend`` counts (libvirt's answers and the guests' are untrusted)."""

    LIBVIRT_CONNECT = "libvirt_connect"  # connections opened (the first, and after a drop)
    # the host's wall clock went back by more than WALL_STEP_BACK_S (histories restarted)
    LIBVIRT_WALL_CLOCK_STEPPED_BACK = "libvirt_wall_clock_stepped_back"
    LIBVIRT_CONNECT_FAILED = "libvirt_connect_failed"  # refreshes that found no libvirtd
    LIBVIRT_DISCONNECTED = "libvirt_disconnected"  # connections that dropped (libvirtd went)
    LIBVIRT_NO_DOMAIN = "libvirt_no_domain"  # domains named in the config libvirt does not run
    LIBVIRT_NO_BALLOON = "libvirt_no_balloon"  # domains left alone: no virtio balloon device
    LIBVIRT_BAD_XML = "libvirt_bad_xml"  # domain XML that does not parse
    LIBVIRT_STATS_PERIOD_SET = "libvirt_stats_period_set"  # balloon stats periods turned on
    LIBVIRT_STATS_PERIOD_FAILED = "libvirt_stats_period_failed"  # ... that libvirt refused
    LIBVIRT_ERROR = "libvirt_error"  # libvirt calls that failed
    LIBVIRT_BAD_STATS = "libvirt_bad_stats"  # balloon stats without a believable size
    LIBVIRT_TARGET_OUT_OF_RANGE = "libvirt_target_out_of_range"  # targets outside [0, RAM)
    LIBVIRT_SET_TARGET = "libvirt_set_target"  # targets set
    LIBVIRT_DOMAIN_GONE = "libvirt_domain_gone"  # targets for a domain that stopped meanwhile
    LIBVIRT_EVENT = "libvirt_event"  # lifecycle events taken
    LIBVIRT_QGA_UNRESPONSIVE = "libvirt_qga_unresponsive"  # qemu-ga absent or slow (backs off)
    LIBVIRT_QGA_FAILED = "libvirt_qga_failed"  # qemu-ga reads refused or garbage
    LIBVIRT_AGENT_UNREACHABLE = "libvirt_agent_unreachable"  # memballoon channels not open


def _import_libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise ConfigError(
            "libvirt-python is not installed: pip install 'memballoon[libvirt]' "
            "(needs libvirt-dev and pkg-config to build)"
        ) from exc
    return libvirt


# --- the libvirt event loop: one per process --------------------------------------------

_loop_lock = threading.Lock()
#: Per libvirt module (tests load a fake one beside the real): "" running, else why not.
_loops: dict[int, str] = {}


def _run_event_loop(lv: Any) -> None:
    while True:
        try:
            lv.virEventRunDefaultImpl()
        except Exception:  # a failed iteration must not end event delivery
            time.sleep(0.1)


def start_event_loop(lv: Any) -> str | None:
    """libvirt's default event loop and the thread that runs it, once per process; None
    when it runs, else why it cannot (the backend then follows domains by polling)."""
    with _loop_lock:
        if id(lv) not in _loops:
            try:
                lv.virEventRegisterDefaultImpl()
            except Exception as exc:
                _loops[id(lv)] = f"libvirt event loop unavailable ({exc})"
            else:
                threading.Thread(target=_run_event_loop, args=(lv,), name="libvirt-events",
                                 daemon=True).start()
                _loops[id(lv)] = ""
        return _loops[id(lv)] or None


# --- pure helpers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the live XML of a domain says that this backend needs."""

    balloon_model: str | None  # <memballoon model=...>; None: no element
    stats_period_s: int  # <memballoon><stats period=.../>; 0: off
    qga: bool  # a virtio channel named org.qemu.guest_agent.0
    agent_path: str | None  # the unix socket of a org.memballoon.agent channel
    accel: str = "unknown"  # <domain type=...>: kvm, or qemu (TCG: software emulation)

    @property
    def balloon(self) -> bool:
        return self.balloon_model == "virtio" or (self.balloon_model or "").startswith(
            "virtio-")


def parse_domain_xml(text: str) -> DomainInfo:
    """``DomainInfo`` from a domain's XML; ConfigError (the caller counts it) when it does
    not parse."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"domain XML does not parse: {exc}") from None
    balloon = root.find("./devices/memballoon")
    model = None if balloon is None else balloon.get("model")
    period = 0
    stats = None if balloon is None else balloon.find("stats")
    if stats is not None:
        try:
            period = max(0, int(stats.get("period", "0")))
        except ValueError:
            period = 0
    qga, agent_path = False, None
    for ch in root.findall("./devices/channel"):
        target = ch.find("target")
        if target is None or target.get("type") != "virtio":
            continue
        name = target.get("name")
        if name == QGA_PORT_NAME:
            qga = True
        elif name == AGENT_PORT_NAME and ch.get("type") == "unix":
            src = ch.find("source")
            if src is not None and src.get("path"):
                agent_path = src.get("path")
    accel = {"kvm": "kvm", "qemu": "tcg"}.get(root.get("type", ""), root.get("type", "unknown"))
    return DomainInfo(model, period, qga, agent_path, accel)


@dataclass(frozen=True, slots=True)
class DomainSelection:
    """Which domains to manage: all (``patterns`` None) or those a pattern matches."""

    patterns: tuple[str, ...] | None = None

    def matches(self, name: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatchcase(name, p)
                                            for p in self.patterns)

    def named(self) -> tuple[str, ...]:
        """The patterns that are plain names (no glob): domains the operator asked for by
        name, listed as gone while libvirt does not run them."""
        return tuple(p for p in self.patterns or () if not any(c in p for c in "*?["))


def _kib(stats: Mapping[str, Any], key: str) -> int | None:
    v = stats.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_VALUE // KIB:
        return None
    return v


def report_from_stats(name: str, stats: Mapping[str, Any], *, max_kib: int,
                      target_pages: int, balloon_pages: int, time_s: float
                      ) -> PressureReport | None:
    """A PressureReport from the balloon stats libvirt relays (``memoryStats`` names, KiB),
    or None before the guest answered. ``balloon_pages`` is the balloon of the stats' moment;
    ``time_s`` their time (the guest's ``last-update``)."""
    total = _kib(stats, "available")
    free = _kib(stats, "unused")
    if total is None or free is None:
        return None
    usable = _kib(stats, "usable")
    cache = _kib(stats, "disk_caches") or 0
    balloon = min(max(0, balloon_pages), max_kib * KIB // PAGE_SIZE)
    return PressureReport(
        guest=name, time_s=max(0.0, min(time_s, float(MAX_VALUE))), total_bytes=total * KIB,
        free_bytes=free * KIB,
        available_bytes=(usable if usable is not None else free + cache) * KIB,
        anon_bytes=max(0, total - free - cache) * KIB, cache_bytes=cache * KIB,
        balloon_bytes=balloon * PAGE_SIZE,
        swap_in_pages=(_kib(stats, "swap_in") or 0) * KIB // PAGE_SIZE,
        swap_out_pages=(_kib(stats, "swap_out") or 0) * KIB // PAGE_SIZE,
        major_faults=_kib(stats, "major_fault") or 0, oom_kills=0, stall_us=0,
        stall_pct=0.0, balloon_target_pages=max(0, target_pages),
        balloon_actual_pages=balloon,
    )


def balloon_stats(record: Mapping[str, Any]) -> dict[str, Any]:
    """``getAllDomainStats``' ``balloon.*`` keys under ``memoryStats``' names."""
    out = {k.removeprefix("balloon."): v for k, v in record.items()
           if k.startswith("balloon.")}
    out["actual"] = out.pop("current", None)
    return out


def domain_xml(name: str, image: GuestImage, *, max_mib: int, current_mib: int | None = None,
               stats_period_s: int = STATS_PERIOD_S, agent_path: str | None = None,
               qga: bool = False, balloon: bool = True) -> str:
    """A TCG domain with direct kernel boot of the test guest and a virtio balloon (tests,
    benchmarks and the README's examples use it).

    ``current_mib`` below ``max_mib`` starts it ballooned down (libvirt's currentMemory);
    ``stats_period_s=0`` leaves the balloon's stats off; ``balloon=False`` gives it none;
    ``agent_path`` adds the memballoon agent channel, ``qga`` the QEMU guest agent's."""
    cur = max_mib if current_mib is None else current_mib
    if not 64 <= cur <= max_mib:
        raise ConfigError(f"current_mib={cur}: must be between 64 and max_mib={max_mib}")
    agent = "" if agent_path is None else (
        f"<channel type='unix'><source mode='bind' path='{html.escape(agent_path)}'/>"
        f"<target type='virtio' name='{AGENT_PORT_NAME}'/></channel>")
    if qga:
        agent += f"<channel type='unix'><target type='virtio' name='{QGA_PORT_NAME}'/></channel>"
    stats = f"<stats period='{stats_period_s}'/>" if stats_period_s > 0 else ""
    mb = f"<memballoon model='virtio'>{stats}</memballoon>" if balloon else (
        "<memballoon model='none'/>")
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
        f"{mb}{agent}</devices></domain>"
    )


# --- the backend ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """Something that happened to a guest (or the connection, ``guest=""``), for the journal
    and the operator: ``kind`` one word, ``detail`` a sentence."""

    guest: str
    kind: str
    detail: str


@dataclass
class _Domain:
    name: str
    uuid: str
    info: DomainInfo
    dom: Any = None
    ram_pages: int = 0
    balloon_pages: int = 0
    target_pages: int = 0
    target_set: bool = False  # memballoon set ``target_pages`` (else it follows the balloon)
    alive: bool = True
    gone_reason: str = ""
    gone_at: float = 0.0
    rss_bytes: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    history: BalloonHistory = field(default_factory=BalloonHistory)  # on the wall clock
    report: PressureReport | None = None
    report_time: float | None = None
    source: str = SOURCE_NONE
    note: str = ""
    qga_retry_at: float = 0.0
    qga_prev: AgentReport | None = None
    qga_report: AgentReport | None = None
    agent: AgentChannel | None = None
    agent_retry_at: float = 0.0
    agent_seen: AgentReport | None = None
    agent_prev: AgentReport | None = None
    agent_report: PressureReport | None = None
    agent_time: float | None = None


class LibvirtBackend:
    """Backend for the running domains of one libvirt connection (module docstring)."""

    def __init__(self, uri: str = DEFAULT_URI, *, domains: Sequence[str] | None = None,
                 counters: Counters | None = None, stats_period_s: int = STATS_PERIOD_S,
                 clock: Clock | None = None, events: bool = True,
                 wall: Callable[[], float] = time.time,
                 on_guest: Callable[[str, int], None] | None = None) -> None:
        self._libvirt = _import_libvirt()
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.wall = wall  # libvirt's last-update is epoch seconds
        self.uri = uri
        self.selection = DomainSelection(None if domains is None else tuple(domains))
        self.counters = counters if counters is not None else Counters()
        if not 0 < stats_period_s <= 3600:
            raise ConfigError(f"stats_period_s = {stats_period_s}: must be 1 to 3600")
        self.stats_period_s = stats_period_s
        #: Told each domain's RAM in pages when first seen or changed (the daemon resolves
        #: its settings, a min of "25%" for one).
        self.on_guest = on_guest
        self.events_error: str | None = (start_event_loop(self._libvirt) if events
                                         else "lifecycle events off")
        # libvirt prints every error to stderr by default: they are counted here instead
        self._libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._dropped = threading.Event()
        self._lock = threading.Lock()  # one poll or flush on the connection's state at a time
        self._doms: dict[str, _Domain] = {}
        self._ignored: dict[str, str] = {}  # uuid of domains left alone -> name (said once)
        self._lifecycle: collections.deque[tuple[str, int, int]] = collections.deque(
            maxlen=1024)
        self._agent_up: collections.deque[str] = collections.deque(maxlen=1024)
        self._events: list[BackendEvent] = []
        self._pending: dict[str, int] = {}
        self._samples: dict[str, GuestSample] = {}
        self._unreachable = ""  # why libvirtd cannot be reached ("" while it can)
        self._stale_agents: list[AgentChannel] = []  # channels of runs that ended, to close
        self._wall_last = 0.0

    @property
    def name(self) -> str:
        return "libvirt"

    @property
    def follows_events(self) -> bool:
        return self.events_error is None

    # --- connection and events (worker thread) ---------------------------------------------

    def _connection(self) -> Any:
        lv = self._libvirt
        if self._conn is not None and (self._dropped.is_set() or not self._alive(self._conn)):
            self.counters.inc(LibvirtCounter.LIBVIRT_DISCONNECTED)
            self._event("", "libvirt", f"connection to {self.uri} lost")
            self._drop_connection()
        if self._conn is None:
            conn = lv.open(self.uri)
            self._dropped.clear()
            self.counters.inc(LibvirtCounter.LIBVIRT_CONNECT)
            if self.events_error is None:
                self._register(conn)
            self._conn = conn
            if self._unreachable:
                self._event("", "libvirt", f"connected to {self.uri} again")
            self._unreachable = ""
        return self._conn

    def _alive(self, conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except self._libvirt.libvirtError:
            return False

    def _register(self, conn: Any) -> None:
        lv = self._libvirt
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            conn.registerCloseCallback(lambda _c, _reason, _o: self._dropped.set(), None)
            self._callbacks = [
                conn.domainEventRegisterAny(None, EVENT_LIFECYCLE, self._on_lifecycle, None),
                conn.domainEventRegisterAny(None, EVENT_AGENT_LIFECYCLE, self._on_agent, None),
            ]
        except lv.libvirtError as exc:  # an old libvirtd: poll instead, and say so
            self.events_error = f"libvirt events unavailable ({exc})"
            self._event("", "libvirt", f"{self.events_error}: following domains by polling")

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any
                      ) -> None:
        """libvirt's event thread: note it; the next refresh acts on it."""
        with contextlib.suppress(Exception):
            self._lifecycle.append((dom.name(), int(event), int(detail)))

    def _on_agent(self, _conn: Any, dom: Any, state: int, _reason: int, _opaque: Any) -> None:
        if state == AGENT_STATE_CONNECTED:
            with contextlib.suppress(Exception):
                self._agent_up.append(dom.name())

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb in self._callbacks:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(cb)
        self._callbacks = []
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()

    def _event(self, guest: str, kind: str, detail: str) -> None:
        self._events.append(BackendEvent(guest, kind, detail))
        log.info("libvirt: %s %s: %s", guest or "-", kind, detail)

    def drain_events(self) -> list[BackendEvent]:
        """What happened to domains and the connection since the last call."""
        ev, self._events = self._events, []
        return ev

    # --- the poll (worker thread) ---------------------------------------------------------

    def _take_lifecycle(self) -> None:
        now = self.clock.now()
        while self._lifecycle:
            name, event, detail = self._lifecycle.popleft()
            self.counters.inc(LibvirtCounter.LIBVIRT_EVENT)
            what = lifecycle_text(self._libvirt, event, detail)
            d = self._doms.get(name)
            # only a stop ends a run: a crash may leave it paused, an undefine running
            if what.startswith("stopped") and d is not None and (
                    d.alive or d.gone_reason.startswith(NOT_RUNNING)):
                self._gone(d, what, now)  # the event says why; the poll only saw it go
            if what.startswith("started") and d is not None:
                d.uuid = ""  # a new run: read its XML and size again
            if what.startswith(("started", "defined")):
                for uuid in [u for u, n in self._ignored.items() if n == name]:
                    del self._ignored[uuid]  # it may have a balloon now
            if what == "shutting down: finished":
                continue  # the "stopped" event that follows says how
            if self.selection.matches(name) and (d is not None or what.startswith(
                    ("started", "defined"))):
                self._event(name, "domain", what)
        while self._agent_up:
            d = self._doms.get(self._agent_up.popleft())
            if d is not None:
                d.qga_retry_at = 0.0  # qemu-ga came up: try it now

    def _wall_now(self) -> float:
        """The wall clock, never going back (an NTP step must not reorder the history)."""
        w = self.wall()
        if w < self._wall_last - WALL_STEP_BACK_S:
            # stepped back (an NTP step, an admin's date): QEMU's last-update follows the new
            # time, so holding the old one would age every stats report by the step; the
            # balloon histories are of the old timeline: start them again
            self.counters.inc(LibvirtCounter.LIBVIRT_WALL_CLOCK_STEPPED_BACK)
            for d in self._doms.values():
                d.history.clear()
            self._wall_last = w
        self._wall_last = max(self._wall_last, w)
        return self._wall_last

    def _gone(self, d: _Domain, why: str, now: float) -> None:
        d.alive, d.gone_reason, d.gone_at = False, why, now
        d.rss_bytes, d.dom = None, None

    def _poll(self) -> None:
        with self._lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        lv = self._libvirt
        now = self.clock.now()
        self._take_lifecycle()
        try:
            conn = self._connection()
            records = conn.getAllDomainStats(STATS_STATE_BALLOON, STATS_ACTIVE)
        except lv.libvirtError as exc:
            self.counters.inc(LibvirtCounter.LIBVIRT_CONNECT_FAILED)
            why = f"libvirtd unreachable at {self.uri}: {exc.get_error_message()}"
            if not self._unreachable:
                self._event("", "libvirt", f"{why}; retrying every period")
            self._unreachable = why
            self._drop_connection()
            for d in self._doms.values():
                if d.alive:
                    self._gone(d, why, now)
            return
        seen: set[str] = set()
        for dom, rec in records:
            try:
                name, uuid = dom.name(), dom.UUIDString()
            except lv.libvirtError:
                self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
                continue
            if not self.selection.matches(name) or self._ignored.get(uuid) == name:
                continue
            known = self._doms.get(name)
            cur = known if known is not None and known.uuid == uuid else self._adopt(
                dom, name, uuid, known, now)
            if cur is None:
                continue
            seen.add(name)
            cur.dom = dom
            self._take_stats(cur, rec, now)
        for name, d in list(self._doms.items()):
            if name in seen:
                continue
            if d.alive:
                self._gone(d, NOT_RUNNING, now)
            if now - d.gone_at > FORGET_AFTER_S and name not in self.selection.named():
                del self._doms[name]
        for name in self.selection.named():
            if name not in self._doms and name not in self._ignored.values():
                self.counters.inc(LibvirtCounter.LIBVIRT_NO_DOMAIN)
                self._doms[name] = _Domain(name, "", DomainInfo(None, 0, False, None),
                                           alive=False, gone_at=now,
                                           gone_reason=f"libvirt at {self.uri} does not run a "
                                           f"domain named {name!r}")

    def _adopt(self, dom: Any, name: str, uuid: str, old: _Domain | None, now: float
               ) -> _Domain | None:
        """A domain seen for the first time (or started again): its XML, once."""
        lv = self._libvirt
        try:
            info = parse_domain_xml(dom.XMLDesc(0))
        except lv.libvirtError:
            self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
            return None
        except ConfigError as exc:
            self.counters.inc(LibvirtCounter.LIBVIRT_BAD_XML)
            self._ignore(name, uuid, f"left alone: {exc}")
            return None
        if not info.balloon:
            self.counters.inc(LibvirtCounter.LIBVIRT_NO_BALLOON)
            why = (f"no virtio balloon device (memballoon model {info.balloon_model!r}): add "
                   "<memballoon model='virtio'><stats period='2'/></memballoon> to its XML "
                   "(virsh edit) and restart it")
            self._ignore(name, uuid, why)
            if name in self.selection.named():
                self._doms[name] = _Domain(name, uuid, info, alive=False, gone_at=now,
                                           gone_reason=why)
            return None
        d = _Domain(name, uuid, info)
        if old is not None and old.agent is not None:  # a new run: a new channel
            self._stale_agents.append(old.agent)
            old.agent = None
        self._doms[name] = d
        period = info.stats_period_s
        if period <= 0:
            try:
                dom.setMemoryStatsPeriod(self.stats_period_s, VIR_DOMAIN_AFFECT_LIVE)
            except lv.libvirtError as exc:
                self.counters.inc(LibvirtCounter.LIBVIRT_STATS_PERIOD_FAILED)
                d.note = f"balloon stats off and could not be turned on: {exc}"
                self._event(name, "stats", d.note)
            else:
                self.counters.inc(LibvirtCounter.LIBVIRT_STATS_PERIOD_SET)
                self._event(name, "stats", (
                    f"balloon stats period was off: turned on at {self.stats_period_s} s "
                    f"(live only; add <stats period='{self.stats_period_s}'/> under "
                    "<memballoon> in its XML to keep it)"))
        sources = [s for s, have in ((SOURCE_QGA, info.qga), (SOURCE_AGENT,
                   info.agent_path is not None), (SOURCE_STATS, True)) if have]
        self._event(name, "managed", f"on {info.accel}; pressure from "
                    + ", else ".join(sources))
        return d

    def _ignore(self, name: str, uuid: str, why: str) -> None:
        if self._ignored.get(uuid) != name:
            self._ignored[uuid] = name
            self._event(name, "skipped", why)

    def _take_stats(self, d: _Domain, rec: Mapping[str, Any], now: float) -> None:
        state = rec.get("state.state")
        if state not in (VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED):
            if d.alive:
                self._gone(d, f"{NOT_RUNNING} (libvirt state {state!r:.20})", now)
            return
        stats = balloon_stats(rec)
        max_kib = _kib(stats, "maximum")
        actual = _kib(stats, "actual")
        if max_kib is None or max_kib * KIB < PAGE_SIZE:
            self.counters.inc(LibvirtCounter.LIBVIRT_BAD_STATS)
            if d.alive or not d.gone_reason:
                self._gone(d, f"no believable balloon size from libvirt (balloon.maximum = "
                              f"{stats.get('maximum')!r:.40})", now)
            return
        if actual is None or actual > max_kib:
            self.counters.inc(LibvirtCounter.LIBVIRT_BAD_STATS)
            actual = max_kib
        d.alive, d.gone_reason = True, ""
        ram = max_kib * KIB // PAGE_SIZE
        d.balloon_pages = (max_kib - actual) * KIB // PAGE_SIZE
        d.ram_pages = ram
        if not d.target_set:
            # libvirt keeps no target apart from the balloon (its currentMemory follows
            # QEMU's actual from the start): until memballoon sets one, the balloon is it
            d.target_pages = d.balloon_pages
        d.stats = stats
        rss = _kib(stats, "rss")
        d.rss_bytes = None if rss is None else rss * KIB
        d.history.add(self._wall_now(), d.balloon_pages)

    # --- pressure sources ----------------------------------------------------------------

    def _qga_command(self, dom: Any) -> Callable[[str], str]:
        libvirt_qemu: Any = importlib.import_module("libvirt_qemu")  # ships with libvirt-python
        lv = self._libvirt

        def command(text: str) -> str:
            try:
                return str(libvirt_qemu.qemuAgentCommand(dom, text, QGA_TIMEOUT_S, 0))
            except lv.libvirtError as exc:
                msg = exc.get_error_message() or str(exc)
                if exc.get_error_code() == VIR_ERR_INTERNAL_ERROR:
                    raise QgaRefusedError(msg) from None  # the agent answered: an error
                raise QgaUnresponsiveError(msg) from None
        return command

    def _read_qga(self, d: _Domain, now: float) -> None:
        """One qemu-ga read for ``d`` (a worker thread of its own)."""
        dom = d.dom
        if dom is None:
            return
        try:
            rep = read_report(self._qga_command(dom), guest=d.name, counters=self.counters,
                              now=now)
        except QgaUnresponsiveError as exc:
            self.counters.inc(LibvirtCounter.LIBVIRT_QGA_UNRESPONSIVE)
            d.qga_retry_at = now + QGA_RETRY_S
            d.note = f"qemu-guest-agent unresponsive ({exc}); next try in {QGA_RETRY_S:.0f} s"
            d.qga_report = None
        except GuestAgentError as exc:
            self.counters.inc(LibvirtCounter.LIBVIRT_QGA_FAILED)
            d.qga_retry_at = now + QGA_RETRY_S
            d.note = f"qemu-guest-agent read failed ({exc}); next try in {QGA_RETRY_S:.0f} s"
            d.qga_report = None
        else:
            d.qga_prev, d.qga_report = d.qga_report, rep
            d.note = ""

    async def _sync_agents(self) -> None:
        """Open the memballoon agent channels of live domains that have one; close the rest."""
        now = self.clock.now()
        stale, self._stale_agents = self._stale_agents, []
        for channel in stale:
            await channel.close()
        for d in self._doms.values():
            path = d.info.agent_path
            if not d.alive or path is None:
                if d.agent is not None:
                    await d.agent.close()
                    d.agent = None
                continue
            if d.agent is None or (d.agent.gone and now >= d.agent_retry_at):
                if d.agent is not None:
                    await d.agent.close()
                d.agent = AgentChannel(path, guest=d.name, counters=self.counters,
                                       clock=self.clock)
                d.agent_retry_at = now + 1.0
                try:
                    await d.agent.connect()
                except GuestGoneError:
                    self.counters.inc(LibvirtCounter.LIBVIRT_AGENT_UNREACHABLE)

    def _take_agent(self, d: _Domain) -> None:
        a = d.agent
        if a is None or a.latest is None or a.latest is d.agent_seen:
            return
        arrived = a.latest_time if a.latest_time is not None else self.clock.now()
        period = arrived - d.agent_time if d.agent_time is not None else 1.0
        d.agent_prev, d.agent_seen = d.agent_seen, a.latest
        # the guest's own balloon count where it gives one (to_pressure_report), else the
        # balloon polled last before the line came (wall clock: the history's)
        then = d.history.at(self._wall_now() - max(0.0, self.clock.now() - arrived))
        d.agent_report = to_pressure_report(
            a.latest, ram_bytes=d.ram_pages * PAGE_SIZE, balloon_target_pages=d.target_pages,
            balloon_actual_pages=d.balloon_pages if then is None else then,
            prev=d.agent_prev, period_s=period)
        d.agent_time = arrived

    def _choose_report(self, d: _Domain, now: float, qga_fresh: bool) -> None:
        """The domain's report from its best source this period (module docstring)."""
        if qga_fresh and d.qga_report is not None:
            d.report = to_pressure_report(
                d.qga_report, ram_bytes=d.ram_pages * PAGE_SIZE,
                balloon_target_pages=d.target_pages, balloon_actual_pages=d.balloon_pages,
                prev=d.qga_prev, period_s=1.0)
            d.report_time, d.source = now, SOURCE_QGA
            return
        self._take_agent(d)
        if d.agent_report is not None and d.agent is not None and not d.agent.gone:
            d.report, d.report_time, d.source = d.agent_report, d.agent_time, SOURCE_AGENT
            return
        last = _kib(d.stats, "last-update")
        if last:
            wall = self._wall_now()
            then = d.history.at(float(last))
            rep = report_from_stats(
                d.name, d.stats, max_kib=d.ram_pages * PAGE_SIZE // KIB,
                target_pages=d.target_pages,
                balloon_pages=d.balloon_pages if then is None else then, time_s=float(last))
            if rep is not None:
                d.report, d.source = rep, SOURCE_STATS
                d.report_time = now - max(0.0, wall - last)  # its age on the engine's clock
                return
        d.report, d.report_time, d.source = None, None, SOURCE_NONE

    # --- Backend ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Poll libvirtd once (every domain), then each domain's pressure source."""
        await asyncio.to_thread(self._poll)
        await self._sync_agents()
        now = self.clock.now()
        ask = [d for d in self._doms.values()
               if d.alive and d.info.qga and d.dom is not None and now >= d.qga_retry_at]
        if ask:
            await asyncio.gather(*(asyncio.to_thread(self._read_qga, d, now) for d in ask))
        asked = {d.name for d in ask}
        samples: dict[str, GuestSample] = {}
        for d in self._doms.values():
            if d.alive:
                self._choose_report(d, now, d.name in asked)
                if self.on_guest is not None and d.ram_pages:
                    self.on_guest(d.name, d.ram_pages)
            samples[d.name] = GuestSample(
                name=d.name, ram_pages=d.ram_pages, balloon_pages=d.balloon_pages,
                target_pages=d.target_pages, report=d.report if d.alive else None,
                report_time=d.report_time if d.alive else None, alive=d.alive,
                resident_bytes=d.rss_bytes if d.alive else None)
        self._samples = samples

    def guests(self) -> Mapping[str, GuestSample]:
        """The domains as the last ``refresh`` saw them."""
        return dict(self._samples)

    async def poll(self) -> Mapping[str, GuestSample]:
        """``refresh`` then ``guests``: the samples now (for benches and tools)."""
        await self.refresh()
        return self.guests()

    def pressure_sources(self) -> dict[str, str]:
        """Per domain, where its pressure came from at the last refresh."""
        return {n: d.source if d.alive else SOURCE_NONE for n, d in self._doms.items()}

    def accels(self) -> dict[str, str]:
        """Per domain, the accelerator it runs on (its XML's type: kvm, or tcg)."""
        return {n: d.info.accel for n, d in self._doms.items() if d.uuid}

    def notes(self) -> dict[str, str]:
        """Per domain, why it is gone or what its pressure source lacks ("" when nothing)."""
        return {n: d.gone_reason if not d.alive else d.note for n, d in self._doms.items()}

    def agent(self, name: str) -> AgentChannel | None:
        """``name``'s memballoon agent channel, if it has one open (tests send it commands)."""
        d = self._doms.get(name)
        return None if d is None else d.agent

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
        if pending:
            await asyncio.to_thread(self._set_many, pending)

    async def apply_target(self, guest: str, balloon_pages: int) -> bool:
        """Set ``guest``'s balloon through libvirt now; False (counted) when it cannot."""
        return await asyncio.to_thread(self._set_one, guest, balloon_pages)

    def _set_many(self, pending: Mapping[str, int]) -> None:
        for guest, pages in pending.items():
            self._set_one(guest, pages)

    def _set_one(self, guest: str, balloon_pages: int) -> bool:
        lv = self._libvirt
        with self._lock:
            d = self._doms.get(guest)
            if d is None or not d.alive or d.dom is None:
                return False
            if not 0 <= balloon_pages < d.ram_pages:
                self.counters.inc(LibvirtCounter.LIBVIRT_TARGET_OUT_OF_RANGE)
                return False
            kib = (d.ram_pages - balloon_pages) * PAGE_SIZE // KIB
            try:
                d.dom.setMemoryFlags(kib, VIR_DOMAIN_AFFECT_LIVE)
            except lv.libvirtError as exc:
                if exc.get_error_code() in (VIR_ERR_NO_DOMAIN, VIR_ERR_OPERATION_INVALID):
                    # stopped between collect and act: the next refresh says how
                    self.counters.inc(LibvirtCounter.LIBVIRT_DOMAIN_GONE)
                    self._gone(d, "stopped before its target was set", self.clock.now())
                else:
                    self.counters.inc(LibvirtCounter.LIBVIRT_ERROR)
                    log.warning("libvirt: %s: setMemoryFlags(%d KiB): %s", guest, kib, exc)
                return False
            d.target_pages, d.target_set = balloon_pages, True
            self.counters.inc(LibvirtCounter.LIBVIRT_SET_TARGET)
            return True

    def host_resident_bytes(self) -> int:
        """The live domains' QEMU RSS as libvirt reported it at the last refresh."""
        return sum(d.rss_bytes or 0 for d in self._doms.values() if d.alive)

    async def aclose(self) -> None:
        """Close the agent channels and the connection (the domains run on)."""
        for d in self._doms.values():
            if d.agent is not None:
                await d.agent.close()
                d.agent = None
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


def lifecycle_text(lv: Any, event: int, detail: int) -> str:
    """A lifecycle event as words: "stopped: destroyed", "started: migrated in"."""
    names = {
        "STARTED": ("started", {"BOOTED": "booted", "MIGRATED": "migrated in",
                                "RESTORED": "restored", "FROM_SNAPSHOT": "from a snapshot",
                                "WAKEUP": "woken up"}),
        "STOPPED": ("stopped", {"SHUTDOWN": "shut down", "DESTROYED": "destroyed",
                                "CRASHED": "crashed", "MIGRATED": "migrated away",
                                "SAVED": "saved", "FAILED": "failed",
                                "FROM_SNAPSHOT": "from a snapshot"}),
        "DEFINED": ("defined", {}), "UNDEFINED": ("undefined", {}),
        "SUSPENDED": ("suspended", {}), "RESUMED": ("resumed", {}),
        "SHUTDOWN": ("shutting down", {"FINISHED": "finished", "GUEST": "asked by the guest",
                                       "HOST": "asked by the host"}),
        "CRASHED": ("crashed", {}),
        "PMSUSPENDED": ("suspended by the guest", {}),
    }
    for key, (word, details) in names.items():
        if getattr(lv, f"VIR_DOMAIN_EVENT_{key}", None) == event:
            for dkey, dword in details.items():
                if getattr(lv, f"VIR_DOMAIN_EVENT_{key}_{dkey}", None) == detail:
                    return f"{word}: {dword}"
            return word
    return f"event {event} (detail {detail})"


__all__ = ["DEFAULT_URI", "SOURCE_AGENT", "SOURCE_NONE", "SOURCE_QGA", "SOURCE_STATS",
           "BackendEvent", "DomainInfo", "DomainSelection", "LibvirtBackend", "LibvirtCounter",
           "balloon_stats", "domain_xml", "lifecycle_text", "parse_domain_xml",
           "report_from_stats", "start_event_loop"]
