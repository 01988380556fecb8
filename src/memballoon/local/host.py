"""The local host: launches guest processes over memfd RAM and serves their balloons (asyncio).

Theory of operation
-------------------
``async with LocalHost(specs, budget_bytes=...) as host:`` makes the budget (a memory cgroup
where the machine has one and we are root, else watched only: ``host/cgroup.py``), then for
each ``GuestSpec``: the guest's RAM (``MemfdRam``, sealed), a socketpair, and for virtio one
doorbell and one interrupt eventfd per queue; it spawns ``python -m
memballoon.local.guest_main`` with those fds inherited (``pass_fds``), confined when the host is
root (``local/confine.py``): between fork and exec the child joins a memory cgroup of its own
(inside the budget's, or inside one holding the guests when no budget is set), so it is there
from its first instruction (shmem is charged to its first toucher), and drops to a private uid.
Not root, the guests run unconfined, as the host's uid: ``confinement`` says so once and
``guests_unconfined`` counts them. Before that, cgroups left by a daemon killed with SIGKILL
are removed (``clean_stale``, said in ``stale_cgroups``). The host's end of each guest is served
on the one event loop:

- the socket (non-blocking, ``add_reader``): HELLO (checked against the spec), VMW frames to
  the ``VmwBalloonDevice``, virtio requests to the ``VirtioBalloonDevice``, STATUS reports
  (``PressureReport``, strictly decoded), CONTROL replies, BYE;
- each virtio doorbell eventfd (or NOTIFY message): the queue is noted pending and the device
  pops its chains, reading the rings through the host's own mapping of the guest's RAM;
- the process itself: its exit is awaited.

A guest's input is served in bounded turns (``local/fairness.py``): a turn handles pending
doorbells a few chains at a time and decoded messages until the guest's per-turn share is
spent, then the loop serves the others before the guest's next turn; a guest past its share of
a period is throttled (not read at all) until the period ends. No exception from a guest's
input reaches the loop (unexpected ones are counted by class), and the loop thread's CPU time
spent on each guest is kept (``work_of``).

A guest's RAM is 4 KiB shmem, shmem in transparent huge pages or hugetlbfs (``GuestSpec.ram``).
Before the first guest starts, the host is checked for what huge-page RAM needs (shmem THP on,
enough pool pages): what is missing is a ``HostResourceError`` naming what to set, or, with
``setup_hugepages``, set for the run and put back at ``close`` (``host/hugepages.py``).

A guest's death is noticed at once (EOF on its socket, or its exit, e.g. a SIGKILL from the
cgroup's OOM killer): it is marked dead, every process in its cgroup is killed (a child it
forked does not outlive it to touch memory again) and the cgroup removed, what its RAM held is
recorded (``resident_at_exit_bytes``), then the whole memfd is punched and closed, so the memory
is back at once; the other guests go on. Everything a guest sends is untrusted: malformed input is
counted in that guest's ``counters`` and answered with the protocol's own status; garbage
framing drops (and kills) that guest only; its devices only ever release ranges inside its own
RAM. ``close`` says BYE, waits, terminates, kills, frees and removes the cgroup.

``LocalHost`` is the local world's manager backend (``manager.port.Backend``): ``guests()``
gives one ``GuestSample`` per guest, its ``report_time`` stamped by the host's clock when the
STATUS message arrived; ``set_target`` reaches the guest through its protocol's
``HostEndpoint`` (the VMware backdoor or the virtio transport), never by protocol name.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from memballoon.edge.clock import MonotonicClock
from memballoon.host.cgroup import (
    Budget,
    CgroupSupport,
    MemoryCgroup,
    StaleCleanup,
    clean_stale,
    detect,
    make_budget,
)
from memballoon.host.device import BalloonDevice
from memballoon.host.hugepages import HugePageSetup, check_host, huge_pages_for
from memballoon.host.memfd import MemfdRam
from memballoon.host.virtio_device import VirtioBalloonDevice
from memballoon.host.vmw_device import VmwBalloonDevice
from memballoon.local.confine import Reach, guest_uids, needed_paths, plan_reach, preexec
from memballoon.local.fairness import FairnessCounter, WorkLimits, WorkMeter
from memballoon.local.guest_main import HELLO_VERSION, PROTOCOLS
from memballoon.local.transport_virtio import VirtioHostEndpoint, make_eventfds
from memballoon.local.transport_vmw import VmwHostEndpoint
from memballoon.manager.port import Clock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import (
    ConfigError,
    DescriptorError,
    DeviceConfigError,
    FrameError,
    GuestAddressError,
    MemballoonError,
    PeerError,
    StatsError,
    UsageError,
)
from memballoon.model.units import MIB, PAGE_SIZE, RamKind, mib_to_pages
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport, ReportError
from memballoon.protocol.virtio_balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
    features_of,
)
from memballoon.protocol.virtqueue import GuestRamView
from memballoon.protocol.vmw import VmwFrameError
from memballoon.protocol.wire import UNEXPECTED, Decoder, Kind, Message, encode

#: What the host's virtio devices offer by default. Free page reporting is left out: it would
#: release free memory behind the balloon's back and blur what ballooning itself returns.
DEFAULT_VIRTIO_FEATURES: Final = features_of(
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_X_F_HOST_REFUSE,
    VIRTIO_BALLOON_X_F_HOST_RESET,
)
RECV_BYTES: Final = 1 << 16
#: Bytes queued for a guest that does not read; past this it is dropped as broken.
MAX_OUTBUF_BYTES: Final = 4 * MIB
READY_TIMEOUT_S: Final = 30.0
BYE_WAIT_S: Final = 2.0
TERM_WAIT_S: Final = 2.0
GUEST_MODULE: Final = "memballoon.local.guest_main"
#: What one guest process holds beside its RAM (interpreter, numpy, the model's arrays): a
#: cgroup that enforces a budget for guest RAM gets this much a guest on top.
PROCESS_OVERHEAD_BYTES: Final = 64 * MIB
#: The smallest guest that runs: the guest model keeps max(16 MiB, RAM/64) reserved (kernel
#: image, page tables, struct pages) and that must stay under half its RAM, so more than 32 MiB.
#: Measured: 16 to 32 MiB guests exit at start ("reserved_pages 4096 out of range"), 33 MiB ones
#: of every protocol and workload run and take a balloon of half their RAM.
MIN_GUEST_MIB: Final = 33
#: A guest's work period: finite, and no longer than an hour.
MAX_GUEST_PERIOD_S: Final = 3600.0
#: How long a dead guest's cgroup is given to empty (its processes killed) before it is left.
CGROUP_EMPTY_WAIT_S: Final = 5.0
#: Chains one call to the device may pop, so a turn's byte share is checked between calls.
CHUNK_CHAINS: Final = 8


class LocalHostCounter(CounterName):
    """What ``LocalHost`` counts: in ``counters`` (host-wide: the cgroup, freeing, refused
    targets) and in each guest's bag (the rest; its device counts in its own)."""

    HELLO_TIMEOUT = "hello_timeout"  # guests that sent no HELLO within ready_timeout_s
    HELLO_MISMATCH = "hello_mismatch"  # HELLOs that do not match the guest's spec
    HELLO = "hello"  # HELLOs accepted
    REPORTS = "reports"  # STATUS reports accepted
    REPORT_WRONG_GUEST = "report_wrong_guest"  # STATUS reports naming another guest
    BYE_RECEIVED = "bye_received"  # BYEs from the guest
    FRAME_ERROR = "frame_error"  # socket data that broke the framing (the guest is dropped)
    OUTBUF_OVERFLOW = "outbuf_overflow"  # guests that left over MAX_OUTBUF_BYTES unread
    CONTROL_REPLY_UNEXPECTED = "control_reply_unexpected"  # CONTROL_REPLYs with no request waiting
    CONTROL_REPLY_MALFORMED = "control_reply_malformed"  # CONTROL_REPLYs that are not a JSON object
    SET_TARGET_DEAD = "set_target_dead"  # targets for a dead guest (refused)
    SET_TARGET_REFUSED = "set_target_refused"  # host-wide: unknown guest or target out of range
    CGROUP_REMOVE_FAILED = "cgroup_remove_failed"  # host-wide: budget cgroups not removed at close
    GUEST_CGROUP_LEFT = "guest_cgroup_left"  # host-wide: dead guests' cgroups that did not empty
    GUEST_PROCS_KILLED = "guest_procs_killed"  # processes killed in dead guests' cgroups
    GUESTS_UNCONFINED = "guests_unconfined"  # host-wide: guests started without cgroup or uid
    FREE_FAILED = "free_failed"  # host-wide: dead guests' RAM that could not be measured or punched
    RAM_CLOSE_DEFERRED = "ram_close_deferred"  # host-wide: dead guests' RAM still mapped at close
    DIED_HELLO_TIMEOUT = "died_hello_timeout"  # deaths: no HELLO in time
    DIED_BAD_HELLO = "died_bad_hello"  # deaths: a HELLO that does not match
    DIED_EXIT = "died_exit"  # deaths: the process exited
    DIED_EOF = "died_eof"  # deaths: EOF on the socket
    DIED_GARBAGE = "died_garbage"  # deaths: the framing broke
    DIED_SEND_FAILED = "died_send_failed"  # deaths: a send to the guest failed
    DIED_OUTBUF_OVERFLOW = "died_outbuf_overflow"  # deaths: the guest did not read what we sent
    DIED_SHUTDOWN = "died_shutdown"  # deaths: the host closed
    # messages whose handler raised a MemballoonError it did not expect, by class:
    ERROR_MEMBALLOON_ERROR = "error_MemballoonError"  # a bare MemballoonError
    ERROR_USAGE_ERROR = "error_UsageError"  # a UsageError (a bug on our side)
    ERROR_CONFIG_ERROR = "error_ConfigError"  # a ConfigError
    ERROR_PEER_ERROR = "error_PeerError"  # a bare PeerError
    ERROR_FRAME_ERROR = "error_FrameError"  # a FrameError
    ERROR_VMW_FRAME_ERROR = "error_VmwFrameError"  # a VMware backdoor frame error
    ERROR_DESCRIPTOR_ERROR = "error_DescriptorError"  # a virtqueue descriptor error
    ERROR_GUEST_ADDRESS_ERROR = "error_GuestAddressError"  # an address outside the guest
    ERROR_STATS_ERROR = "error_StatsError"  # a malformed stats buffer
    ERROR_DEVICE_CONFIG_ERROR = "error_DeviceConfigError"  # a malformed device config
    ERROR_REPORT_ERROR = "error_ReportError"  # a malformed pressure report
    ERROR_OTHER = "error_other"  # any other class


#: The class of an exception a message handler raised -> its ``error_<class>`` counter.
_HANDLER_ERRORS: Final[Mapping[type[MemballoonError], LocalHostCounter]] = {
    MemballoonError: LocalHostCounter.ERROR_MEMBALLOON_ERROR,
    UsageError: LocalHostCounter.ERROR_USAGE_ERROR,
    ConfigError: LocalHostCounter.ERROR_CONFIG_ERROR,
    PeerError: LocalHostCounter.ERROR_PEER_ERROR,
    FrameError: LocalHostCounter.ERROR_FRAME_ERROR,
    VmwFrameError: LocalHostCounter.ERROR_VMW_FRAME_ERROR,
    DescriptorError: LocalHostCounter.ERROR_DESCRIPTOR_ERROR,
    GuestAddressError: LocalHostCounter.ERROR_GUEST_ADDRESS_ERROR,
    StatsError: LocalHostCounter.ERROR_STATS_ERROR,
    DeviceConfigError: LocalHostCounter.ERROR_DEVICE_CONFIG_ERROR,
    ReportError: LocalHostCounter.ERROR_REPORT_ERROR,
}


def peer_json_object(payload: bytes) -> dict[str, Any] | None:
    """A guest's JSON object payload (HELLO, CONTROL_REPLY), or None for anything else; never
    raises, a nesting past the recursion limit included (it used to escape to the loop)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def hello_matches(payload: bytes, want: Mapping[str, object]) -> bool:
    """Whether a HELLO payload is a JSON object carrying every ``want`` key with its value."""
    doc = peer_json_object(payload)
    return doc is not None and all(doc.get(k) == v for k, v in want.items())


def signal_child(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to a child that has not been reaped, without reaping it. ``Process.kill``
    goes through ``Popen.send_signal``, which polls (``waitpid``) first: a child that just died
    (a guest the cgroup OOM-killed) is then reaped under asyncio's child watcher, which logs
    "Unknown child process pid" and reports exit code 255 instead of the signal. (Between the
    watcher's reap and the loop hearing of it the pid is free; another process taking it in
    that moment would need the pid space to wrap round.)"""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """One local guest. ``program`` replaces ``python -m memballoon.local.guest_main`` (the
    guest's own arguments follow it): tests use it to run hostile fake guests."""

    name: str
    mib: int
    protocol: str
    workload: str
    period_s: float = 1.0
    seed: int = 0
    prefault: bool = False
    swap_mib: int = 0
    ram: RamKind = RamKind.SMALL
    virtio_array_pfns: int | None = None  # PFNs a virtio array (None: the guest's default)
    program: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"guest name {self.name!r}: use letters, digits, '-', '_'")
        if self.mib < MIN_GUEST_MIB:
            raise ConfigError(f"guest {self.name}: {self.mib} MiB is too small to run: a local "
                              f"guest needs at least {MIN_GUEST_MIB} MiB (16 MiB its kernel "
                              "keeps, under half its RAM)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"guest {self.name}: protocol {self.protocol!r} not in {PROTOCOLS}")
        if not 0 < self.period_s <= MAX_GUEST_PERIOD_S:  # NaN too
            raise ConfigError(f"guest {self.name}: period_s = {self.period_s!r} s is outside "
                              f"the allowed range: more than 0 to {MAX_GUEST_PERIOD_S:g} s")
        if self.swap_mib < 0:
            raise ConfigError(f"guest {self.name}: swap_mib must be >= 0")
        try:
            object.__setattr__(self, "ram", RamKind(self.ram))  # "thp" as well as RamKind.THP
        except ValueError:
            raise ConfigError(f"guest {self.name}: ram {self.ram!r} not in "
                              f"{', '.join(RamKind)}") from None
        if self.virtio_array_pfns is not None and not 1 <= self.virtio_array_pfns <= 16384:
            raise ConfigError(f"guest {self.name}: virtio_array_pfns must be in [1, 16384], "
                              f"got {self.virtio_array_pfns}")
        if self.ram is not RamKind.SMALL and self.mib % 2:
            raise ConfigError(f"guest {self.name}: --ram {self.ram} needs whole 2 MiB pages, "
                              f"got {self.mib} MiB")

    @property
    def pages(self) -> int:
        return mib_to_pages(self.mib)


class HostEndpoint(Protocol):
    """The host's end of one guest's balloon protocol, as ``LocalHost`` drives it."""

    @property
    def device(self) -> BalloonDevice: ...

    @property
    def kinds(self) -> frozenset[Kind]:
        """The wire messages it answers."""
        ...

    @property
    def kick_fds(self) -> Sequence[int]:
        """Doorbell eventfds (the guest writes, the host reads); none for VMware."""
        ...

    @property
    def irq_fds(self) -> Sequence[int]:
        """Interrupt eventfds (the host writes, the guest reads); none for VMware."""
        ...

    def set_target(self, pages: int) -> bytes | None:
        """Set the balloon target; the message to send the guest, if the protocol has one."""
        ...

    def handle_message(self, kind: Kind, payload: bytes) -> bytes | None:
        """Answer one message of ``kinds`` (never raises for the guest's input)."""
        ...

    def after_send(self) -> None:
        """The reply went out: work that may wait until then (releasing a batch)."""
        ...

    def retry(self) -> None:
        """Work the device put off for want of host memory (a held deflate); once a period."""
        ...

    def kick(self, queue: int) -> None:
        """A doorbell eventfd is readable: drain it, note the queue in ``pending``."""
        ...

    @property
    def pending(self) -> AbstractSet[int]:
        """Queues rung (eventfd or message) whose chains are not all popped yet."""
        ...

    def run(self, queue: int, max_chains: int | None = None) -> int:
        """Device work for a pending queue: at most ``max_chains`` chains; how many popped."""
        ...

    @property
    def work_bytes(self) -> int:
        """Guest memory the device read or wrote for the queues so far."""
        ...


@dataclass(eq=False)
class _Guest:
    spec: GuestSpec
    ram: MemfdRam
    sock: socket.socket
    counters: Counters
    endpoint: HostEndpoint | None = None  # None once the guest is dead
    kick_fds: list[int] = field(default_factory=list)
    irq_fds: list[int] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    dec: Decoder = field(default_factory=Decoder)
    outbuf: bytearray = field(default_factory=bytearray)
    connected: bool = True
    alive: bool = True
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    report: PressureReport | None = None
    report_time: float | None = None  # the host's clock when ``report`` arrived
    controls: deque[asyncio.Future[dict[str, Any]]] = field(default_factory=deque)
    exit_code: int | None = None
    resident_at_exit: int | None = None
    final_target: int = 0
    final_actual: int = 0
    watcher: asyncio.Task[None] | None = None
    guest_end: socket.socket | None = None  # the child's end, until it is spawned
    cgroup: MemoryCgroup | None = None  # its own, inside the budget's (None: unconfined)
    uid: int | None = None  # its private uid (None: the host's)
    emptied: asyncio.Task[None] | None = None  # its cgroup being emptied and removed
    meter: WorkMeter = field(default_factory=lambda: WorkMeter(WorkLimits()))
    inbox: deque[Message] = field(default_factory=deque)  # decoded, not handled yet
    reading: bool = False  # the socket's reader is registered
    throttled: bool = False  # past its period's share: not served until the period ends
    turn_scheduled: bool = False
    cpu_s: float = 0.0  # the loop thread's CPU time spent on this guest

    @property
    def device_counters(self) -> Counters | None:
        return self.endpoint.device.counters if self.endpoint is not None else None


class LocalHost:
    """N local guest processes and their balloons (see the module docstring)."""

    def __init__(
        self,
        specs: Iterable[GuestSpec],
        *,
        budget_bytes: int | None,
        cgroup_name: str | None = None,
        virtio_features: int = DEFAULT_VIRTIO_FEATURES,
        python: str = sys.executable,
        ready_timeout_s: float = READY_TIMEOUT_S,
        guest_stderr: int | None = None,
        clock: Clock | None = None,
        setup_hugepages: bool = False,
        guest_uid_base: int | None = None,
        work_limits: WorkLimits | None = None,
    ) -> None:
        self.specs = list(specs)
        #: each guest's share of the loop (None: ``WorkLimits.for_guest`` of its RAM)
        self.work_limits = work_limits
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"guest names must be unique: {names}")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ConfigError(f"host budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = budget_bytes
        self.cgroup_name = cgroup_name or f"memballoon-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.virtio_features = virtio_features
        self.python = python
        self.ready_timeout_s = ready_timeout_s
        self.guest_stderr = guest_stderr
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._budget: Budget | None = None
        self.setup_hugepages = setup_hugepages
        self._hugepages: HugePageSetup | None = None
        #: what ``setup_hugepages`` changed on the host for this run, one line each
        self.host_changes: list[str] = []
        self._guests: dict[str, _Guest] = {}
        self.counters = Counters()
        self.freed_at_exit_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # set after every guest turn: what ``wait_until`` waits on between its checks
        self._progress = asyncio.Event()
        self.guest_uid_base = guest_uid_base
        #: where the guests' cgroups are made: the budget's, or one of ours with no limit
        self._guest_parent: MemoryCgroup | None = None
        self._own_parent = False
        self._uids: list[int] | None = None  # the guests' private uids, in spec order
        self._reach: Reach = ()  # directories closed to the guests' uids on the way to Python
        #: one line: how the guests are confined, or what is not and why
        self.confinement = ""
        #: cgroups left by dead memballoon processes, removed (or not) at start
        self.stale_cgroups = StaleCleanup()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> LocalHost:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def budget(self) -> Budget | None:
        """The host budget (``enforced`` or only watched, and why); None without one."""
        return self._budget

    async def start(self) -> None:
        """Check (or set up) the host, make the budget, spawn every guest and wait for their
        HELLOs. If that fails, whatever was done is undone (``close``) before it raises."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        needs: dict[RamKind, int] = {}
        for spec in self.specs:
            if spec.ram is not RamKind.SMALL:
                needs[spec.ram] = needs.get(spec.ram, 0) + huge_pages_for(spec.pages)
        if needs and self.setup_hugepages:
            self._hugepages = HugePageSetup()
            self.host_changes = self._hugepages.ensure(needs)
        elif needs:
            check_host(needs)
        support = detect()
        if support.usable:
            self.stale_cgroups = clean_stale(support)
        if self.budget_bytes is not None:
            self._budget = make_budget(self.cgroup_name, self.budget_bytes, support=support)
        self._confine(support)
        for spec in self.specs:
            g = self._make_guest(spec)
            await self._spawn(g)
        await self._wait_ready()

    def _confine(self, support: CgroupSupport) -> None:
        """Where the guests' cgroups go and which uids they get (``local/confine.py``); what
        cannot be had is said in ``confinement``."""
        b = self._budget
        missing: list[str] = []
        if b is not None and b.cgroup is not None:
            self._guest_parent = b.cgroup
        elif support.usable:
            try:
                self._guest_parent = MemoryCgroup.create(self.cgroup_name, None,
                                                         support=support)
                self._own_parent = True
            except MemballoonError as exc:
                missing.append(f"no cgroup of their own ({exc}): a child a guest forks may "
                               "outlive it unless it stays in the guest's process group")
        else:
            missing.append(f"no cgroup of their own ({support.reason}): a child a guest forks "
                           "may outlive it unless it stays in the guest's process group")
        if os.geteuid() == 0:
            self._uids = guest_uids(len(self.specs), self.guest_uid_base, os.getpid())
            self._reach = plan_reach(needed_paths(
                [a for s in self.specs for a in (s.program or ())]))
        else:
            missing.append(f"no private uid (not root): guests run as uid {os.geteuid()}, as "
                           "this host does, so a guest could open this host's memfds (every "
                           "guest's RAM) through /proc")
        if missing:
            self.confinement = "guests NOT confined: " + "; ".join(missing)
            return
        assert self._guest_parent is not None and self._uids is not None
        first, last = self._uids[0], self._uids[-1]
        self.confinement = (f"guests confined: each in a memory cgroup of its own under "
                            f"{self._guest_parent.path} from its first instruction, as its own "
                            f"uid ({first}" + (f" to {last})" if last != first else ")")
                            + ", no new privileges, killed with its cgroup")

    def _make_guest(self, spec: GuestSpec) -> _Guest:
        ram = MemfdRam(spec.pages, kind=spec.ram, name=f"memballoon-{spec.name}")
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        limits = self.work_limits or WorkLimits.for_guest(spec.pages)
        g = _Guest(spec, ram, host_end, Counters(), guest_end=guest_end,
                   meter=WorkMeter(limits))
        self._guests[spec.name] = g  # closed with the others if anything below fails
        g.endpoint = _ENDPOINTS[spec.protocol](self, g)
        g.kick_fds, g.irq_fds = list(g.endpoint.kick_fds), list(g.endpoint.irq_fds)
        if self._guest_parent is not None:
            g.cgroup = self._guest_parent.child(f"guest-{spec.name}")
        if self._uids is not None:
            g.uid = self._uids[len(self._guests) - 1]
        if g.cgroup is None or g.uid is None:
            self.counters.inc(LocalHostCounter.GUESTS_UNCONFINED)
        return g

    def _virtio_endpoint(self, g: _Guest) -> HostEndpoint:
        view = GuestRamView(g.ram.mapping, base_gpa=0, guest_bytes=g.ram.size_bytes)
        dev = VirtioBalloonDevice(g.ram, view, features=self.virtio_features)
        return VirtioHostEndpoint(dev, make_eventfds(), make_eventfds(),
                                  lambda data: self._send(g, data))

    def _vmw_endpoint(self, g: _Guest) -> HostEndpoint:
        vdev = VmwBalloonDevice(g.ram, defer_release=True)  # released after each reply
        return VmwHostEndpoint(vdev, signalled=g.spec.protocol == "vmw-batched")

    def _argv(self, g: _Guest, guest_end: socket.socket) -> list[str]:
        s = g.spec
        prog = list(s.program) if s.program else [self.python, "-m", GUEST_MODULE]
        argv = [
            *prog, "--name", s.name, "--protocol", s.protocol, "--pages", str(s.pages),
            "--workload", s.workload, "--seed", str(s.seed), "--period", repr(s.period_s),
            "--sock-fd", str(guest_end.fileno()), "--mem-fd", str(g.ram.fd),
            "--swap-pages", str(mib_to_pages(s.swap_mib)), "--ram", str(s.ram),
        ]
        if g.kick_fds:
            argv += ["--kick-fds", ",".join(map(str, g.kick_fds)),
                     "--irq-fds", ",".join(map(str, g.irq_fds))]
        if s.virtio_array_pfns is not None:
            argv += ["--array-pfns", str(s.virtio_array_pfns)]
        if s.prefault:
            argv.append("--prefault")
        return argv

    async def _spawn(self, g: _Guest) -> None:
        loop = self._loop
        assert loop is not None
        guest_end = g.guest_end
        assert guest_end is not None
        fds = [guest_end.fileno(), g.ram.fd, *g.kick_fds, *g.irq_fds]
        procs_fd = g.cgroup.open_procs() if g.cgroup is not None else None
        try:
            # a process group of its own: what kills an unconfined guest's children
            g.proc = await asyncio.create_subprocess_exec(
                *self._argv(g, guest_end), pass_fds=fds, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self.guest_stderr,
                preexec_fn=preexec(procs_fd, g.uid, self._reach), process_group=0,
            )
        finally:
            if procs_fd is not None:
                os.close(procs_fd)
            guest_end.close()  # the child has its copy; EOF then means the child is gone
            g.guest_end = None
        g.sock.setblocking(False)
        loop.add_reader(g.sock.fileno(), self._on_readable, g)
        g.reading = True
        self._add_kick_readers(g)
        g.watcher = loop.create_task(self._watch(g))

    def _add_kick_readers(self, g: _Guest) -> None:
        assert self._loop is not None
        for q, fd in enumerate(g.kick_fds):
            self._loop.add_reader(fd, self._on_kick, g, q)

    async def restart(self, name: str) -> bool:
        """Start a dead guest again, as a machine boots anew: fresh RAM, a new process, a new
        device (its counters and its meter start afresh). Whether it said HELLO in time."""
        old = self._guest(name)
        if old.alive or self._closed:
            raise UsageError(f"restart {name}: the guest is {'alive' if old.alive else 'gone'}")
        g = self._make_guest(old.spec)
        self._guests[name] = g
        await self._spawn(g)
        await self._ready(g)
        return g.alive

    async def _wait_ready(self) -> None:
        await asyncio.gather(*(self._ready(g) for g in self._guests.values()))

    async def _ready(self, g: _Guest) -> None:
        dead = asyncio.ensure_future(self._until_dead(g))
        hello = asyncio.ensure_future(g.hello.wait())
        try:
            await asyncio.wait({dead, hello}, timeout=self.ready_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            hello.cancel()
        if g.alive and not g.hello.is_set():
            g.counters.inc(LocalHostCounter.HELLO_TIMEOUT)
            self._die(g, LocalHostCounter.DIED_HELLO_TIMEOUT)

    async def _until_dead(self, g: _Guest) -> None:
        while g.alive:
            await asyncio.sleep(0.02)

    async def _watch(self, g: _Guest) -> None:
        assert g.proc is not None
        rc = await g.proc.wait()
        g.exit_code = rc
        self._die(g, LocalHostCounter.DIED_EXIT)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        guests = list(self._guests.values())
        for g in guests:
            if g.connected:
                self._send(g, encode(Kind.BYE))
        await self._reap(guests, BYE_WAIT_S)
        for g in guests:
            if g.proc is not None:
                signal_child(g.proc, signal.SIGTERM)
        await self._reap(guests, TERM_WAIT_S)
        for g in guests:
            if g.proc is not None:
                signal_child(g.proc, signal.SIGKILL)
        await self._reap(guests, TERM_WAIT_S)
        for g in guests:
            self._die(g, LocalHostCounter.DIED_SHUTDOWN)
            if g.watcher is not None and not g.watcher.done():
                g.watcher.cancel()
            if g.emptied is None:
                self._kill_the_rest(g)
        emptying = [g.emptied for g in guests if g.emptied is not None]
        if emptying:
            await asyncio.gather(*emptying, return_exceptions=True)
        await asyncio.sleep(0)  # closes put off until the stack let go of a device run
        for g in guests:
            if not g.ram.closed:
                self._close_ram(g, last=True)
        b = self._budget
        parents = [b.cgroup] if b is not None and b.cgroup is not None else []
        if self._own_parent and self._guest_parent is not None:
            parents.append(self._guest_parent)
        for cg in parents:
            try:
                cg.remove()
            except MemballoonError:
                self.counters.inc(LocalHostCounter.CGROUP_REMOVE_FAILED)
        if self._hugepages is not None:  # the guests' RAM is freed: put the host back
            self._hugepages.restore()
            self._hugepages = None

    async def _reap(self, guests: list[_Guest], timeout_s: float) -> None:
        waits = [g.proc.wait() for g in guests if g.proc is not None and g.proc.returncode is None]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout_s)

    # ------------------------------------------------------------------ death
    def _die(self, g: _Guest, why: LocalHostCounter) -> None:
        """Mark ``g`` dead (counting ``why``, a ``died_*`` member): stop serving it, record
        what its RAM held, free it."""
        if not g.alive:
            return
        g.alive = False
        g.counters.inc(why)
        g.inbox.clear()
        self._disconnect(g)
        if g.proc is not None and not self._closed:
            # a live process whose link is gone or broken is of no use: make sure it is gone
            signal_child(g.proc, signal.SIGKILL)
        if not self._closed:  # closing: the guest exits on its own first (close kills the rest)
            self._kill_the_rest(g)
        loop = self._loop
        for fd in g.kick_fds:
            if loop is not None:
                loop.remove_reader(fd)
        if g.endpoint is not None:
            g.final_target = g.endpoint.device.target_pages
            g.final_actual = g.endpoint.device.actual_pages
        for fut in g.controls:
            if not fut.done():
                fut.set_exception(MemballoonError(f"guest {g.spec.name} died"))
        g.controls.clear()
        ram = g.ram
        try:
            g.resident_at_exit = ram.resident_bytes()
            ram.release(np.array([[0, ram.guest_pages]], dtype=np.int64))  # all of it, now
            self.freed_at_exit_bytes += g.resident_at_exit
        except MemballoonError:
            self.counters.inc(LocalHostCounter.FREE_FAILED)
        # drop the device (and its view of the mapping) so the mapping can be closed
        g.endpoint = None
        for fd in g.kick_fds + g.irq_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        g.kick_fds, g.irq_fds = [], []
        self._close_ram(g)

    def _close_ram(self, g: _Guest, *, last: bool = False) -> None:
        """Unmap and close a dead guest's memfd. A guest that dies under a call into its device
        (a config push whose send failed) leaves the device's view of the mapping alive on
        the stack: the close is then tried again once the loop's turn is over."""
        try:
            g.ram.close()
            return
        except UsageError:
            gc.collect()
        try:
            g.ram.close()
        except UsageError:
            if last or self._loop is None or self._loop.is_closed():
                self.counters.inc(LocalHostCounter.RAM_CLOSE_DEFERRED)
            else:
                self._loop.call_soon(lambda: self._close_ram(g, last=True))

    def _kill_the_rest(self, g: _Guest) -> None:
        """Every process the dead guest left (its cgroup's, else its process group's): none
        outlives it to touch memory again. The cgroup is emptied and removed off the loop's
        critical path (``_empty_cgroup``)."""
        if g.cgroup is None:
            if g.proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(g.proc.pid, signal.SIGKILL)
            return
        with contextlib.suppress(MemballoonError):  # _empty_cgroup tries again, and counts
            g.counters.inc(LocalHostCounter.GUEST_PROCS_KILLED, g.cgroup.kill_pass())
        loop = self._loop
        if loop is not None and loop.is_running():
            g.emptied = loop.create_task(self._empty_cgroup(g, g.cgroup))
        else:
            with contextlib.suppress(MemballoonError):
                if not g.cgroup.pids() and g.cgroup.try_rmdir():
                    return
            self.counters.inc(LocalHostCounter.GUEST_CGROUP_LEFT)

    async def _empty_cgroup(self, g: _Guest, cg: MemoryCgroup) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CGROUP_EMPTY_WAIT_S
        while True:
            try:
                g.counters.inc(LocalHostCounter.GUEST_PROCS_KILLED, cg.kill_pass())
                if not cg.pids() and cg.try_rmdir():
                    return
            except MemballoonError:
                break
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        self.counters.inc(LocalHostCounter.GUEST_CGROUP_LEFT)

    def _disconnect(self, g: _Guest) -> None:
        if not g.connected:
            return
        g.connected = False
        loop = self._loop
        if loop is not None:
            loop.remove_reader(g.sock.fileno())
            loop.remove_writer(g.sock.fileno())
        g.sock.close()
        g.outbuf.clear()

    # ------------------------------------------------------------------ socket I/O
    def _send(self, g: _Guest, data: bytes) -> None:
        if not g.connected:
            return
        if g.outbuf:
            g.outbuf += data
        else:
            try:
                n = g.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._die(g, LocalHostCounter.DIED_SEND_FAILED)
                return
            if n < len(data):
                g.outbuf += data[n:]
                assert self._loop is not None
                self._loop.add_writer(g.sock.fileno(), self._on_writable, g)
        if len(g.outbuf) > MAX_OUTBUF_BYTES:
            # it does not read what we send: broken
            g.counters.inc(LocalHostCounter.OUTBUF_OVERFLOW)
            self._die(g, LocalHostCounter.DIED_OUTBUF_OVERFLOW)

    def _on_writable(self, g: _Guest) -> None:
        try:
            n = g.sock.send(g.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._die(g, LocalHostCounter.DIED_SEND_FAILED)
            return
        del g.outbuf[:n]
        if not g.outbuf and self._loop is not None:
            self._loop.remove_writer(g.sock.fileno())

    def _on_readable(self, g: _Guest) -> None:
        self._guarded(g, self._read, g)

    def _read(self, g: _Guest) -> None:
        if not g.connected:
            return
        try:
            data = g.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._die(g, LocalHostCounter.DIED_EOF)
            return
        try:
            g.inbox.extend(g.dec.messages(data))
        except FrameError:
            g.counters.inc(LocalHostCounter.FRAME_ERROR)
            self._die(g, LocalHostCounter.DIED_GARBAGE)
            return
        self._turn(g)

    def _on_kick(self, g: _Guest, queue: int) -> None:
        self._guarded(g, self._kick, g, queue)

    def _kick(self, g: _Guest, queue: int) -> None:
        if g.endpoint is None:
            return
        g.endpoint.kick(queue)
        g.meter.charge(doorbells=1)
        if g.throttled:
            g.counters.inc(FairnessCounter.DOORBELLS_THROTTLED)
            return
        if not g.turn_scheduled:
            self._turn(g)

    def _on_turn(self, g: _Guest) -> None:
        g.turn_scheduled = False
        self._guarded(g, self._turn, g)

    def _guarded(self, g: _Guest, fn: Callable[..., None], *args: Any) -> None:
        """Run a loop callback for ``g``: its CPU time is the guest's, and nothing it raises
        reaches the loop (a bug on our side, counted ``error_other``: the guest goes on)."""
        t0 = time.thread_time()
        try:
            fn(*args)
        except Exception:
            g.counters.inc(LocalHostCounter.ERROR_OTHER)
        finally:
            g.cpu_s += time.thread_time() - t0

    def _turn(self, g: _Guest) -> None:
        """One bounded turn of ``g``'s pending work (see the module docstring)."""
        if not g.alive or g.throttled or self._loop is None:
            return
        m = g.meter
        m.start_turn(self._loop.time())
        while g.alive and (ep := g.endpoint) is not None and not m.turn_spent:
            try:
                if ep.pending:
                    q = min(ep.pending)
                    before = ep.work_bytes
                    popped = ep.run(q, min(m.chains_left(), CHUNK_CHAINS))
                    m.charge(chains=popped, nbytes=ep.work_bytes - before)
                elif g.inbox:
                    msg = g.inbox.popleft()
                    m.charge(messages=1, nbytes=len(msg.payload),
                             doorbells=int(msg.kind is Kind.NOTIFY))
                    self._dispatch(g, msg)
                else:
                    break
            except MemballoonError as exc:  # a peer error the handlers did not expect
                g.counters.inc(_HANDLER_ERRORS.get(type(exc), LocalHostCounter.ERROR_OTHER))
            except Exception:  # a bug on our side: counted, the guest goes on
                g.counters.inc(LocalHostCounter.ERROR_OTHER)
        self._after_turn(g)

    def _after_turn(self, g: _Guest) -> None:
        self._progress.set()
        loop, ep = self._loop, g.endpoint
        if not g.alive or ep is None or loop is None:
            return
        if g.inbox and g.reading:  # read no more of it until what it sent is handled
            loop.remove_reader(g.sock.fileno())
            g.reading = False
        if g.inbox or ep.pending:
            if g.meter.exhausted:
                self._throttle(g)
                return
            g.counters.inc(FairnessCounter.TURNS_CUT)
            if not g.turn_scheduled:
                g.turn_scheduled = True
                loop.call_soon(self._on_turn, g)
        elif not g.reading and g.connected:
            loop.add_reader(g.sock.fileno(), self._on_readable, g)
            g.reading = True

    def _throttle(self, g: _Guest) -> None:
        """Past its period's share: read nothing of ``g`` until the period ends."""
        loop = self._loop
        assert loop is not None and g.meter.period_end is not None
        g.throttled = True
        g.counters.inc(FairnessCounter.THROTTLED)
        if g.reading:
            loop.remove_reader(g.sock.fileno())
            g.reading = False
        for fd in g.kick_fds:
            loop.remove_reader(fd)
        loop.call_at(g.meter.period_end, self._on_resume, g)

    def _on_resume(self, g: _Guest) -> None:
        g.throttled = False
        if not g.alive:
            return
        self._add_kick_readers(g)
        self._guarded(g, self._turn, g)

    def _dispatch(self, g: _Guest, m: Message) -> None:
        ep = g.endpoint
        match m.kind:
            case kind if ep is not None and kind in ep.kinds:
                reply = ep.handle_message(kind, m.payload)
                if reply is not None:
                    self._send(g, reply)
                if g.endpoint is ep:  # not if the send failed: the guest and its RAM are gone
                    ep.after_send()
            case Kind.STATUS:
                self._status(g, m.payload)
            case Kind.HELLO:
                self._hello(g, m.payload)
            case Kind.CONTROL_REPLY:
                self._control_reply(g, m.payload)
            case Kind.BYE:
                g.counters.inc(LocalHostCounter.BYE_RECEIVED)
            case _:
                g.counters.inc(UNEXPECTED[m.kind])

    def _status(self, g: _Guest, payload: bytes) -> None:
        try:
            rep = PressureReport.decode(payload, counters=g.counters)
        except ReportError:
            return
        if rep.guest != g.spec.name:
            g.counters.inc(LocalHostCounter.REPORT_WRONG_GUEST)
            return
        g.counters.inc(LocalHostCounter.REPORTS)
        g.report, g.report_time = rep, self.clock.now()

    def _hello(self, g: _Guest, payload: bytes) -> None:
        want = {"v": HELLO_VERSION, "guest": g.spec.name, "protocol": g.spec.protocol,
                "pages": g.spec.pages, "pid": g.proc.pid if g.proc else None}
        if not hello_matches(payload, want):
            g.counters.inc(LocalHostCounter.HELLO_MISMATCH)
            self._die(g, LocalHostCounter.DIED_BAD_HELLO)
            return
        g.counters.inc(LocalHostCounter.HELLO)
        g.hello.set()

    def _control_reply(self, g: _Guest, payload: bytes) -> None:
        if not g.controls:
            g.counters.inc(LocalHostCounter.CONTROL_REPLY_UNEXPECTED)
            return
        fut = g.controls.popleft()
        doc = peer_json_object(payload)
        if doc is None:
            g.counters.inc(LocalHostCounter.CONTROL_REPLY_MALFORMED)
            if not fut.done():
                fut.set_exception(MemballoonError("malformed control reply"))
            return
        if not fut.done():
            fut.set_result(doc)

    # ------------------------------------------------------------------ control
    def _guest(self, name: str) -> _Guest:
        g = self._guests.get(name)
        if g is None:
            raise UsageError(f"no guest named {name!r}")
        return g

    def set_target(self, name: str, balloon_pages: int) -> bool:
        """Ask ``name``'s balloon for ``balloon_pages`` pages; False (counted) for an unknown
        guest, a target outside its RAM, or a dead guest."""
        g = self._guests.get(name)
        if g is None or not 0 <= balloon_pages <= g.spec.pages:
            self.counters.inc(LocalHostCounter.SET_TARGET_REFUSED)
            return False
        if not g.alive or g.endpoint is None:
            g.counters.inc(LocalHostCounter.SET_TARGET_DEAD)
            return False
        msg = g.endpoint.set_target(balloon_pages)
        if msg is not None:
            self._send(g, msg)
        return True

    async def control(self, name: str, op: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Send a CONTROL request (``touch_free``, ``verify``, ``stats``) and await the reply."""
        g = self._guest(name)
        if not g.connected:
            raise MemballoonError(f"guest {name} is not connected")
        assert self._loop is not None
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        g.controls.append(fut)
        self._send(g, encode(Kind.CONTROL, json.dumps({"op": op}).encode()))
        return await asyncio.wait_for(fut, timeout_s)

    async def wait_until(self, pred: Callable[[dict[str, GuestSample]], bool],
                         timeout_s: float, poll_s: float = 0.01) -> bool:
        """Check ``pred(guests())`` after every guest turn (and at least every ``poll_s``)
        until it holds or ``timeout_s`` passes: a benchmark's clock stops when the host has
        heard what it waits for, not at the next tick of a poll."""
        assert self._loop is not None
        deadline = self._loop.time() + timeout_s
        while True:
            self._progress.clear()
            if pred(self.guests()):
                return True
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(poll_s, left))

    def pid(self, name: str) -> int | None:
        p = self._guest(name).proc
        return p.pid if p is not None else None

    def ram(self, name: str) -> MemfdRam:
        """The host's ``MemfdRam`` of a guest (closed once the guest is dead)."""
        return self._guest(name).ram

    def not_ready(self) -> dict[str, str]:
        """The guests that died before saying HELLO, each with why (after ``start``)."""
        out: dict[str, str] = {}
        for name, g in self._guests.items():
            if g.hello.is_set() and g.alive:
                continue
            rc = g.exit_code
            why = ("no HELLO in time" if g.counters[LocalHostCounter.DIED_HELLO_TIMEOUT]
                   else "a HELLO that does not match" if g.counters[
                       LocalHostCounter.DIED_BAD_HELLO]
                   else f"exited with status {rc}" if rc is not None and rc >= 0
                   else f"killed by signal {-rc}" if rc is not None else "gone")
            out[name] = why
        return out

    def guest_uid(self, name: str) -> int | None:
        """The guest's private uid (None: it runs as the host's)."""
        return self._guest(name).uid

    def guest_cgroup(self, name: str) -> MemoryCgroup | None:
        """The guest's own memory cgroup (None: unconfined)."""
        return self._guest(name).cgroup

    def exit_code(self, name: str) -> int | None:
        """The guest process's exit status (None while it runs)."""
        return self._guest(name).exit_code

    def resident_at_exit_bytes(self, name: str) -> int | None:
        """What the guest's RAM held when it died (None while it lives)."""
        return self._guest(name).resident_at_exit

    def balloon_pfns(self, name: str) -> npt.NDArray[np.int64]:
        """The frames the guest's device holds in its balloon (none once dead)."""
        ep = self._guest(name).endpoint
        return ep.device.balloon_pfns() if ep is not None else np.zeros(0, dtype=np.int64)

    def partial_huge_pages(self, name: str) -> int:
        """Host huge pages the guest's balloon holds in part (0 with 4 KiB RAM or once dead)."""
        ep = self._guest(name).endpoint
        return ep.device.partial_huge_pages if ep is not None else 0

    def host_memory_error(self, name: str) -> str | None:
        """Why the host last could not give the guest memory back (a hugetlb pool run dry)."""
        ep = self._guest(name).endpoint
        return ep.device.host_pages.last_error if ep is not None else None

    def work_of(self, name: str) -> dict[str, float]:
        """What serving the guest cost: its ``WorkMeter`` figures and the loop thread's CPU
        seconds spent on it (``cpu_s``)."""
        g = self._guest(name)
        return {**g.meter.stats(), "cpu_s": g.cpu_s}

    def counters_of(self, name: str) -> dict[str, int]:
        """The guest's counters: the host's for it and its device's, in one bag."""
        g = self._guest(name)
        counters = g.counters.as_dict()
        dc = g.device_counters
        if dc is not None:
            counters.update(dc.as_dict())
        return counters

    # ------------------------------------------------------------------ the Backend port
    @property
    def name(self) -> str:
        return "local"

    def _sample(self, g: _Guest) -> GuestSample:
        if g.endpoint is not None:
            target, actual = g.endpoint.device.target_pages, g.endpoint.device.actual_pages
        else:
            target, actual = g.final_target, g.final_actual
        rep = g.report
        return GuestSample(
            name=g.spec.name, ram_pages=g.spec.pages, balloon_pages=actual,
            target_pages=target, report=rep, report_time=g.report_time, alive=g.alive,
            resident_bytes=0 if g.ram.closed or not g.alive else g.ram.resident_bytes(),
            active_sampled=rep.active_sampled if rep is not None else 0,
            active_touched=rep.active_touched if rep is not None else 0,
        )

    def guests(self) -> dict[str, GuestSample]:
        for g in self._guests.values():
            if g.endpoint is not None:
                g.endpoint.retry()  # once a manager period: memory may be back
        return {name: self._sample(g) for name, g in self._guests.items()}

    def host_resident_bytes(self) -> int:
        return self.resident_bytes()

    def resident_bytes(self) -> int:
        """What the live guests' RAM holds now (sum of their memfds' st_blocks)."""
        return sum(g.ram.resident_bytes() for g in self._guests.values()
                   if g.alive and not g.ram.closed)

    def ram_bytes(self) -> int:
        return sum(s.pages for s in self.specs) * PAGE_SIZE


_ENDPOINTS: Final[dict[str, Callable[[LocalHost, _Guest], HostEndpoint]]] = {
    "vmw": LocalHost._vmw_endpoint,
    "vmw-batched": LocalHost._vmw_endpoint,
    "virtio": LocalHost._virtio_endpoint,
}


__all__ = [
    "DEFAULT_VIRTIO_FEATURES", "PROCESS_OVERHEAD_BYTES", "GuestSpec", "HostEndpoint", "LocalHost",
]
