"""LibvirtBackend: pure helpers, a fake libvirt for the hostile cases, then a real libvirtd.

The fake (``FakeLibvirt``: the libvirt-python calls the backend makes, with libvirt's own
numbers) misbehaves on purpose: domains without a balloon or with stats off, impossible stats,
a domain destroyed between collect and act, libvirtd going away and coming back, a QEMU guest
agent that is absent, slow or sends garbage. Each time the other domains must go on.

The real tests follow ../shared/notes/qemu-guests.md "libvirt on these machines"
(``libvirt_host.libvirtd``: installs what is missing, runs QEMU as root, starts virtlogd and
libvirtd by hand when none answers, stops only what it started; one test at a time across
pytest workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import memballoon.qemu.libvirt_backend as lvb
from libvirt_host import Libvirtd, libvirtd  # noqa: F401 (the fixture)
from memballoon.manager.port import ManualClock
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import KIB, MIB, PAGE_SIZE
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport
from memballoon.qemu.image import GuestImage, build_guest_image
from memballoon.qemu.libvirt_backend import (
    DomainSelection,
    LibvirtBackend,
    balloon_stats,
    domain_xml,
    lifecycle_text,
    parse_domain_xml,
    report_from_stats,
)
from test_qemu_backend import AGENT_LINE, agent_server
from test_qga import FILES, FakeQga

IMG = GuestImage("6.1.0-test", Path("/img/vmlinuz"), Path("/img/initrd.gz"))
GIB_KIB = 1 << 20


# --- pure helpers ------------------------------------------------------------------------


def test_report_from_libvirt_stats_in_kib() -> None:
    stats = {"actual": 393216, "available": 380000, "unused": 300000, "usable": 320000,
             "disk_caches": 20000, "major_fault": 7, "swap_in": 8, "swap_out": 0,
             "rss": 250000, "last-update": 1}
    r = report_from_stats("d", stats, max_kib=524288, target_pages=100, balloon_pages=32768,
                          time_s=5.0)
    assert r is not None and PressureReport.decode(r.encode()) == r
    assert r.balloon_actual_pages == 32768 and r.time_s == 5.0
    assert r.total_bytes == 380000 * KIB and r.free_bytes == 300000 * KIB
    assert r.available_bytes == 320000 * KIB and r.cache_bytes == 20000 * KIB
    assert r.anon_bytes == (380000 - 300000 - 20000) * KIB
    assert r.swap_in_pages == 2 and r.major_faults == 7 and r.stall_pct == 0.0
    # Before the guest's first stats: only actual (and rss) are there.
    assert report_from_stats("d", {"actual": 524288}, max_kib=524288, target_pages=0,
                             balloon_pages=0, time_s=1.0) is None
    assert report_from_stats("d", {"actual": "x", "available": -1, "unused": 1},
                             max_kib=1, target_pages=0, balloon_pages=0, time_s=1.0) is None
    # a balloon beyond RAM is not believed
    r = report_from_stats("d", stats, max_kib=4, target_pages=0, balloon_pages=10**9,
                          time_s=1.0)
    assert r is not None and r.balloon_actual_pages == 1


def test_getalldomainstats_keys_become_memorystats_names() -> None:
    rec = {"state.state": 1, "balloon.current": 5, "balloon.maximum": 9, "balloon.rss": 3,
           "balloon.last-update": 77, "vcpu.current": 1}
    assert balloon_stats(rec) == {"actual": 5, "maximum": 9, "rss": 3, "last-update": 77}


def test_domain_xml_boots_the_test_guest_with_a_balloon() -> None:
    xml = domain_xml("a<b", IMG, max_mib=512, current_mib=384, agent_path="/r/agent.sock",
                     qga=True)
    assert "<domain type='qemu'><name>a&lt;b</name>" in xml
    assert "<memory unit='MiB'>512</memory><currentMemory unit='MiB'>384</currentMemory>" in xml
    assert "<kernel>/img/vmlinuz</kernel><initrd>/img/initrd.gz</initrd>" in xml
    assert "<memballoon model='virtio'><stats period='2'/></memballoon>" in xml
    info = parse_domain_xml(xml)
    assert info.balloon and info.stats_period_s == 2 and info.qga
    assert info.accel == "tcg"
    assert info.agent_path == "/r/agent.sock"
    off = parse_domain_xml(domain_xml("x", IMG, max_mib=512, stats_period_s=0))
    assert off.balloon and off.stats_period_s == 0 and not off.qga and off.agent_path is None
    none = parse_domain_xml(domain_xml("x", IMG, max_mib=512, balloon=False))
    assert not none.balloon and none.balloon_model == "none"
    assert not parse_domain_xml("<domain><devices/></domain>").balloon
    assert parse_domain_xml("<domain><devices><memballoon model='virtio-non-transitional'>"
                            "<stats period='x'/></memballoon></devices></domain>").balloon
    with pytest.raises(ConfigError):
        parse_domain_xml("<domain><unclosed>")
    with pytest.raises(ConfigError):
        domain_xml("x", IMG, max_mib=512, current_mib=1024)


def test_selection_by_names_and_globs() -> None:
    every = DomainSelection()
    assert every.matches("anything") and every.named() == ()
    sel = DomainSelection(("web-*", "db1", "cache-[ab]"))
    assert [sel.matches(n) for n in ("web-3", "db1", "db10", "cache-a", "cache-c")] == [
        True, True, False, True, False]
    assert sel.named() == ("db1",)


def test_lifecycle_events_in_words() -> None:
    lv = FakeLibvirt()
    assert lifecycle_text(lv, 5, 1) == "stopped: destroyed"
    assert lifecycle_text(lv, 5, 3) == "stopped: migrated away"
    assert lifecycle_text(lv, 2, 1) == "started: migrated in"
    assert lifecycle_text(lv, 0, 9) == "defined"
    assert lifecycle_text(lv, 6, 1) == "shutting down: asked by the guest"
    assert lifecycle_text(lv, 99, 0) == "event 99 (detail 0)"


# --- a fake libvirt ----------------------------------------------------------------------


class FakeLibvirtError(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.msg, self.code = msg, code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.msg


class FakeDom:
    def __init__(self, lv: FakeLibvirt, name: str, *, max_kib: int = GIB_KIB,
                 balloon: bool = True, stats_period_s: int = 2, agent_path: str | None = None,
                 qga: FakeQga | None = None, current_mib: int | None = None) -> None:
        self.lv, self._name, self.max_kib = lv, name, max_kib
        self.uuid = f"uuid-{name}-{len(lv.doms)}"
        self.xml = domain_xml(name, IMG, max_mib=max_kib // 1024, balloon=balloon,
                              stats_period_s=stats_period_s, agent_path=agent_path,
                              qga=qga is not None, current_mib=current_mib)
        self.qga = qga
        self.running = True
        self.actual = max_kib
        self.stats_period = stats_period_s
        self.guest_stats: dict[str, Any] = {"available": 1000000, "unused": 600000,
                                            "usable": 700000, "disk_caches": 50000,
                                            "major_fault": 1, "swap_in": 0, "swap_out": 0}
        self.last_update = 0
        self.record_override: dict[str, Any] | None = None
        self.set_calls: list[int] = []
        self.xml_reads = 0

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, flags: int) -> str:
        self.xml_reads += 1
        return self.xml

    def setMemoryStatsPeriod(self, period: int, flags: int) -> int:
        assert flags == 1
        self.stats_period = period
        return 0

    def setMemoryFlags(self, kib: int, flags: int) -> int:
        assert flags == 1
        if not self.running:
            raise FakeLibvirtError("Requested operation is not valid: domain is not running",
                                   55)
        self.set_calls.append(kib)
        self.actual = kib
        return 0

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"state.state": 1, "state.reason": 1,
                               "balloon.current": self.actual,
                               "balloon.maximum": self.max_kib, "balloon.rss": 300000}
        if self.stats_period and self.last_update:
            rec.update({f"balloon.{k}": v for k, v in self.guest_stats.items()})
            rec["balloon.last-update"] = self.last_update
        if self.record_override is not None:
            rec.update(self.record_override)
        return rec


class FakeConn:
    def __init__(self, lv: FakeLibvirt) -> None:
        self.lv = lv
        self.alive = True
        self.callbacks: dict[int, Any] = {}
        self.close_cb: Any = None

    def _check(self) -> None:
        if not self.alive or not self.lv.up:
            raise FakeLibvirtError("Cannot write data: Broken pipe", 38)

    def isAlive(self) -> int:
        return 1 if self.alive else 0

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[FakeDom, dict[str, Any]]]:
        self._check()
        assert stats == 5 and flags == 1
        return [(d, d.record()) for d in self.lv.doms.values() if d.running]

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int:
        self.close_cb = cb
        return 0

    def unregisterCloseCallback(self) -> int:
        return 0

    def domainEventRegisterAny(self, dom: Any, event: int, cb: Any, opaque: Any) -> int:
        self.callbacks[event] = cb
        return len(self.callbacks)

    def domainEventDeregisterAny(self, cb_id: int) -> int:
        return 0

    def close(self) -> int:
        self.alive = False
        return 0


class FakeLibvirt(types.SimpleNamespace):
    """The libvirt-python module as the backend uses it (libvirt's own numbers)."""

    libvirtError = FakeLibvirtError
    VIR_DOMAIN_EVENT_DEFINED, VIR_DOMAIN_EVENT_UNDEFINED, VIR_DOMAIN_EVENT_STARTED = 0, 1, 2
    VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_CRASHED = 5, 8
    VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, VIR_DOMAIN_EVENT_STOPPED_DESTROYED = 0, 1
    VIR_DOMAIN_EVENT_STOPPED_MIGRATED = 3
    VIR_DOMAIN_EVENT_STARTED_BOOTED, VIR_DOMAIN_EVENT_STARTED_MIGRATED = 0, 1
    VIR_DOMAIN_EVENT_SHUTDOWN, VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED = 6, 0
    VIR_DOMAIN_EVENT_SHUTDOWN_GUEST = 1

    def __init__(self) -> None:
        super().__init__()
        self.doms: dict[str, FakeDom] = {}
        self.up = True
        self.conns: list[FakeConn] = []

    def add(self, name: str, **kw: Any) -> FakeDom:
        d = self.doms[name] = FakeDom(self, name, **kw)
        return d

    def open(self, uri: str) -> FakeConn:
        if not self.up:
            raise FakeLibvirtError("Failed to connect socket to '/run/libvirt/libvirt-sock': "
                                   "No such file or directory", 38)
        self.conns.append(FakeConn(self))
        return self.conns[-1]

    def virEventRegisterDefaultImpl(self) -> int:
        return 0

    def virEventRunDefaultImpl(self) -> int:
        time.sleep(3600)
        return 0

    def registerErrorHandler(self, f: Any, ctx: Any) -> int:
        return 1


def _agent_command(dom: FakeDom, text: str, timeout: int, flags: int) -> str:
    """libvirt_qemu.qemuAgentCommand: the agent's refusals come back as internal errors."""
    if dom.qga is None:
        raise FakeLibvirtError("argument unsupported: QEMU guest agent is not configured", 74)
    try:
        return dom.qga(text)
    except lvb.QgaRefusedError as exc:
        raise FakeLibvirtError(f"internal error: unable to execute QEMU agent command: {exc}",
                               1) from None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibvirt:
    lv = FakeLibvirt()
    monkeypatch.setattr(lvb, "_import_libvirt", lambda: lv)
    monkeypatch.setitem(sys.modules, "libvirt_qemu",
                        types.SimpleNamespace(qemuAgentCommand=_agent_command))
    return lv


class World:
    """A backend over the fake on a manual clock and a settable wall clock."""

    def __init__(self, lv: FakeLibvirt, **kw: Any) -> None:
        self.lv = lv
        self.clock = ManualClock(100.0)
        self.wall = [1_000_000.0]
        self.seen: list[tuple[str, int]] = []
        self.b = LibvirtBackend("qemu:///system", counters=Counters(), clock=self.clock,
                                wall=lambda: self.wall[0],
                                on_guest=lambda n, r: self.seen.append((n, r)), **kw)

    def step(self, seconds: float = 1.0) -> dict[str, Any]:
        self.clock.advance(seconds)
        self.wall[0] += seconds
        asyncio.run(self.b.refresh())
        return dict(self.b.guests())


def test_selects_balloon_domains_turns_stats_on_and_says_why_it_leaves_others(
        fake: FakeLibvirt) -> None:
    fake.add("web-1", stats_period_s=0)
    fake.add("web-2").last_update = 999_999
    fake.add("db", balloon=False)
    fake.add("other")
    fake.add("web-3", current_mib=768)  # just started: its driver has not inflated yet
    w = World(fake, domains=["web-*", "db", "ghost"])
    snap = w.step()
    # libvirt keeps no target apart from the balloon: it follows the balloon until set
    assert snap["web-3"].balloon_pages == snap["web-3"].target_pages == 0
    del snap["web-3"]
    assert set(snap) == {"web-1", "web-2", "db", "ghost"}
    assert snap["web-1"].alive and snap["web-2"].alive
    assert not snap["db"].alive and not snap["ghost"].alive
    notes = w.b.notes()
    assert "no virtio balloon" in notes["db"] and "virsh edit" in notes["db"]
    assert "does not run a domain named 'ghost'" in notes["ghost"]
    assert fake.doms["web-1"].stats_period == 2
    ev = {(e.guest, e.kind): e.detail for e in w.b.drain_events()}
    assert "turned on at 2 s" in ev[("web-1", "stats")]
    assert "no virtio balloon" in ev[("db", "skipped")]
    assert ev[("web-2", "managed")] == "on tcg; pressure from balloon-stats"
    c = w.b.counters
    assert (c["libvirt_stats_period_set"], c["libvirt_no_balloon"], c["libvirt_no_domain"]) == (
        1, 1, 1)
    s = snap["web-2"]
    assert s.ram_pages == GIB_KIB * KIB // PAGE_SIZE and s.balloon_pages == 0
    assert s.report is not None and s.report.available_bytes == 700000 * KIB
    assert s.report_age_s(w.clock.now()) == pytest.approx(2.0)  # stats of 2 s ago
    assert snap["web-1"].report is None  # its guest has not answered yet
    assert w.b.pressure_sources() == {"web-1": "none", "web-2": "balloon-stats", "db": "none",
                                      "ghost": "none", "web-3": "none"}
    assert w.b.host_resident_bytes() == 3 * 300000 * KIB
    assert sorted(set(w.seen)) == [("web-1", 262144), ("web-2", 262144), ("web-3", 262144)]
    snap = w.step()
    assert fake.doms["web-1"].xml_reads == 1 and fake.doms["db"].xml_reads == 1  # once each
    assert not w.b.drain_events()  # said once
    fake.doms["web-3"].actual = 768 * 1024  # its driver took the balloon libvirt asked for
    assert w.step()["web-3"].target_pages == 256 * MIB // PAGE_SIZE
    # db gets a balloon (virsh edit) and is started again: managed from then on
    fake.doms["db"].xml = domain_xml("db", IMG, max_mib=1024)
    w.b._on_lifecycle(None, fake.doms["db"], 0, 1, None)  # defined: updated
    w.b._on_lifecycle(None, fake.doms["db"], 2, 0, None)  # started: booted
    assert w.step()["db"].alive and w.b.notes()["db"] == ""
    w.b._on_lifecycle(None, fake.doms["web-1"], 1, 0, None)  # undefined: still running
    assert w.step()["web-1"].alive


def test_targets_and_a_domain_destroyed_between_collect_and_act(fake: FakeLibvirt) -> None:
    fake.add("a")
    fake.add("b")
    w = World(fake)
    w.step()
    quarter = 256 * MIB // PAGE_SIZE
    assert w.b.set_target("a", quarter) and w.b.set_target("b", quarter)
    assert not w.b.set_target("a", GIB_KIB * KIB // PAGE_SIZE)  # all its RAM
    assert not w.b.set_target("nope", 1)
    fake.doms["b"].running = False  # destroyed after collect, before act
    asyncio.run(w.b.flush())
    assert fake.doms["a"].set_calls == [GIB_KIB - 256 * 1024]
    assert w.b.counters["libvirt_domain_gone"] == 1 and w.b.counters["libvirt_set_target"] == 1
    assert w.b.counters["libvirt_target_out_of_range"] == 1
    assert "stopped before its target was set" in w.b.notes()["b"]
    w.b._on_lifecycle(None, fake.doms["b"], 6, 0, None)  # libvirt's event thread: said by
    w.b._on_lifecycle(None, fake.doms["b"], 5, 1, None)  # the stop that follows
    snap = w.step()
    assert snap["a"].alive and snap["a"].balloon_pages == quarter
    assert snap["a"].target_pages == quarter and not snap["b"].alive
    assert ("b", "domain", "stopped: destroyed") in [(e.guest, e.kind, e.detail)
                                                     for e in w.b.drain_events()]
    # b comes back (a new run): adopted again, its XML read again
    fake.doms["b"].running = True
    w.b._on_lifecycle(None, fake.doms["b"], 2, 0, None)
    snap = w.step()
    assert snap["b"].alive and fake.doms["b"].xml_reads == 2
    assert not asyncio.run(w.b.apply_target("a", -1))


def test_libvirtd_going_away_and_coming_back(fake: FakeLibvirt) -> None:
    fake.add("a")
    w = World(fake)
    assert w.step()["a"].alive
    w.b.drain_events()
    fake.up = False
    for _ in range(3):
        snap = w.step()
        assert not snap["a"].alive
    assert "libvirtd unreachable" in w.b.notes()["a"]
    assert w.b.counters["libvirt_connect_failed"] == 3
    assert not w.b.set_target("a", 1)
    ev = [e.detail for e in w.b.drain_events()]
    assert len(ev) == 1 and "retrying every period" in ev[0]  # said once, not each period
    fake.up = True
    assert w.step()["a"].alive
    assert w.b.counters["libvirt_connect"] == 2
    assert [e.detail for e in w.b.drain_events()] == ["connected to qemu:///system again"]
    fake.conns[-1].alive = False  # the socket drops under an open connection
    assert w.step()["a"].alive
    assert w.b.counters["libvirt_disconnected"] == 1 and w.b.counters["libvirt_connect"] == 3


def test_impossible_stats_are_counted_and_others_go_on(fake: FakeLibvirt) -> None:
    fake.add("liar").record_override = {"balloon.current": 5 * GIB_KIB}
    fake.add("junk").record_override = {"balloon.maximum": "lots"}
    fake.add("fine")
    w = World(fake)
    snap = w.step()
    assert snap["liar"].balloon_pages == 0  # current above maximum: taken as no balloon
    assert not snap["junk"].alive and snap["fine"].alive
    assert "no believable balloon size" in w.b.notes()["junk"]
    assert w.b.counters["libvirt_bad_stats"] == 2


def test_guest_agent_first_then_stats_while_it_is_absent_slow_or_garbage(
        fake: FakeLibvirt) -> None:
    qga = FakeQga(dict(FILES))
    d = fake.add("g", qga=qga)
    d.actual = GIB_KIB - 200 * 1024  # QEMU says 200 MiB of balloon, the guest saw 256 MiB
    d.last_update = 999_999
    w = World(fake)
    s = w.step()["g"]
    assert w.b.pressure_sources()["g"] == "qemu-guest-agent"
    assert s.report is not None and s.report.stall_pct == 2.5
    assert s.report.balloon_actual_pages == 70000 - 4464  # the guest's own count
    assert s.report_age_s(w.clock.now()) == 0.0

    def absent(text: str) -> str:
        raise FakeLibvirtError("Guest agent is not responding: QEMU guest agent is not "
                               "connected", 86)

    d.qga = absent  # type: ignore[assignment]
    s = w.step()["g"]
    assert w.b.pressure_sources()["g"] == "balloon-stats" and s.report is not None
    assert "unresponsive" in w.b.notes()["g"]
    assert w.b.counters["libvirt_qga_unresponsive"] == 1
    w.step()
    assert w.b.counters["libvirt_qga_unresponsive"] == 1  # left alone for QGA_RETRY_S
    d.qga = qga
    w.b._on_agent(None, d, 1, 0, None)  # libvirt: the agent connected
    w.step()
    assert w.b.pressure_sources()["g"] == "qemu-guest-agent" and w.b.notes()["g"] == ""
    d.qga = FakeQga({**FILES, "/proc/meminfo": "garbage"})
    w.step()
    assert w.b.counters["libvirt_qga_failed"] == 1 and w.b.counters["qga_bad_text"] == 1
    assert w.b.pressure_sources()["g"] == "balloon-stats"
    w.step(lvb.QGA_RETRY_S)  # retried after the back-off: still garbage
    assert w.b.counters["libvirt_qga_failed"] == 2


def test_memballoon_agent_channel_and_stats_of_their_own_moment(
        fake: FakeLibvirt, tmp_path: Path) -> None:
    async def main() -> None:
        server = await agent_server(tmp_path / "ag.sock", [AGENT_LINE.encode()])
        try:
            fake.add("ag", agent_path=str(tmp_path / "ag.sock"))
            st = fake.add("st")
            w = World(fake)
            w.clock.advance(1)
            await w.b.refresh()
            for _ in range(100):
                if w.b.pressure_sources()["ag"] == "memballoon-agent":
                    break
                await asyncio.sleep(0.02)
                w.clock.advance(0.02)
                await w.b.refresh()
            assert w.b.pressure_sources()["ag"] == "memballoon-agent"
            rep = w.b.guests()["ag"].report
            assert rep is not None and rep.total_bytes == 996624 * 1024
            # the stats' moment: written when the balloon was 0, read after it moved
            w.wall[0] += 1
            st.last_update = int(w.wall[0])
            st.actual = GIB_KIB - 300 * 1024
            w.wall[0] += 1
            await w.b.refresh()
            s = w.b.guests()["st"]
            assert s.balloon_pages == 300 * MIB // PAGE_SIZE
            assert s.report is not None and s.report.balloon_actual_pages == 0
            await w.b.aclose()
        finally:
            server.close()

    asyncio.run(main())


def test_events_registered_and_connection_drop_reopens(fake: FakeLibvirt) -> None:
    fake.add("a")
    w = World(fake, events=True)
    w.step()
    assert w.b.follows_events
    conn = fake.conns[-1]
    assert set(conn.callbacks) == {0, 18} and conn.close_cb is not None
    conn.callbacks[0](conn, fake.doms["a"], 5, 3, None)  # migrated away
    fake.doms["a"].running = False
    snap = w.step()
    assert not snap["a"].alive and w.b.notes()["a"] == "stopped: migrated away"
    conn.close_cb(conn, 1, None)  # libvirtd closed the connection
    w.step()
    assert w.b.counters["libvirt_disconnected"] == 1 and len(fake.conns) == 2
    w.b.close()


def test_without_libvirt_python_the_error_names_the_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(ConfigError, match=r"memballoon\[libvirt\]"):
        lvb._import_libvirt()


# --- a real libvirtd ---------------------------------------------------------------------


async def _until(backend: LibvirtBackend, pred: Any, what: str, tries: int = 300
                 ) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for _ in range(tries):
        snap = dict(await backend.poll())
        if pred(snap):
            return snap
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: {snap} {backend.notes()} {backend.counters}")


@pytest.mark.qemu
def test_libvirt_backend_on_real_libvirtd(libvirtd: Libvirtd,  # noqa: F811 (the fixture)
                                          tmp_path: Path) -> None:
    """Domains of a real libvirtd: stats turned on, a domain without a balloon left alone,
    the memballoon agent channel as a pressure source, QEMU's RSS going down when a balloon
    inflates, a domain destroyed (the event says so) and one defined and started later."""
    import libvirt

    image = build_guest_image()
    pre = f"mb-lv-{os.getpid()}-"
    a, b, c, d = (pre + x for x in "abcd")
    conn = libvirt.open(libvirtd.uri)
    doms: dict[str, Any] = {}
    backend = LibvirtBackend(libvirtd.uri, domains=[pre + "*"], counters=Counters())
    quarter, half = 128 * MIB // PAGE_SIZE, 512 * MIB // PAGE_SIZE

    async def main() -> None:
        doms[a] = conn.createXML(domain_xml(a, image, max_mib=768, stats_period_s=0,
                                            agent_path=str(tmp_path / "a.agent")), 0)
        doms[b] = conn.createXML(domain_xml(b, image, max_mib=512, current_mib=384), 0)
        doms[c] = conn.createXML(domain_xml(c, image, max_mib=256, balloon=False), 0)
        src = backend.pressure_sources
        snap = await _until(backend, lambda s: a in s and b in s
                            and src().get(a) == "memballoon-agent"
                            and src().get(b) == "balloon-stats"
                            and abs(s[b].balloon_pages - quarter) <= 256, "boot")
        assert c not in snap  # no balloon: left alone, said once
        said = {(e.guest, e.kind): e.detail for e in backend.drain_events()}
        assert "no virtio balloon" in said[(c, "skipped")]
        assert "turned on at 2 s" in said[(a, "stats")]
        assert backend.counters["libvirt_stats_period_set"] == 1
        assert snap[a].ram_pages == 768 * MIB // PAGE_SIZE and snap[a].balloon_pages == 0
        ra = snap[a].report
        assert ra is not None and ra.total_bytes > 600 * MIB
        assert ra.balloon_actual_pages == 0  # the guest's own count (vmstat)
        assert backend.host_resident_bytes() > 0

        # the guest touches 400 MiB and frees it: QEMU holds it until the balloon takes it
        agent = backend.agent(a)
        assert agent is not None
        await agent.send_command("hog 400")
        await agent.wait_for(lambda r: (r.mem_available_bytes or 0) < 368 * MIB, 60)
        await agent.send_command("unhog")
        await agent.wait_for(lambda r: (r.mem_available_bytes or 0) > 568 * MIB, 60)
        snap = await _until(backend, lambda s: (s[a].resident_bytes or 0) > 450 * MIB,
                            "touched")
        rss_before = snap[a].resident_bytes
        assert await backend.apply_target(a, half)
        snap = await _until(backend, lambda s: abs(s[a].balloon_pages - half) <= 256
                            and s[a].report is not None
                            and abs(s[a].report.balloon_actual_pages - half) <= 256,
                            "inflated, and the guest saw it")
        await asyncio.sleep(2.5)  # libvirt's rss comes with the stats period
        snap = await _until(backend, lambda s: True, "rss")
        rss_after = snap[a].resident_bytes
        assert rss_before is not None and rss_after is not None
        assert rss_before - rss_after > 300 * MIB, (rss_before, rss_after)  # released
        assert snap[a].target_pages == half
        assert await backend.apply_target(b, 0)
        await _until(backend, lambda s: s[b].balloon_pages <= 256, "deflate")
        assert not await backend.apply_target(a, 768 * MIB // PAGE_SIZE)

        doms.pop(b).destroy()  # one VM dies: the event says how; the other goes on
        snap = await _until(backend, lambda s: not s[b].alive
                            and backend.notes()[b] == "stopped: destroyed", "destroyed")
        assert snap[a].alive and await backend.apply_target(a, 0)
        assert backend.follows_events

        doms[d] = conn.defineXML(domain_xml(d, image, max_mib=384))  # defined later ...
        doms[d].create()  # ... and started: followed without a restart
        await _until(backend, lambda s: d in s and s[d].alive, "started later")
        said = {(e.guest, e.kind): e.detail for e in backend.drain_events()}
        assert said[(b, "domain")] == "stopped: destroyed"
        assert said[(d, "domain")].startswith("started")
        assert backend.counters["libvirt_error"] == 0
        await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        backend.close()
        for dom in doms.values():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        conn.close()


@pytest.mark.qemu
def test_qemu_guest_agent_through_real_libvirtd(libvirtd: Libvirtd,  # noqa: F811
                                                tmp_path: Path) -> None:
    """A guest running qemu-ga (the test image built with it) is read through libvirt's
    qemuAgentCommand: PSI, vmstat and the balloon the guest saw; a domain with the agent's
    channel but no agent inside falls back to its balloon stats, saying why."""
    import libvirt

    with_qga = build_guest_image(qga=True)
    plain = build_guest_image()
    pre = f"mb-qga-{os.getpid()}-"
    q, n = pre + "q", pre + "n"
    conn = libvirt.open(libvirtd.uri)
    doms: dict[str, Any] = {}
    backend = LibvirtBackend(libvirtd.uri, domains=[pre + "*"], counters=Counters())
    quarter = 128 * MIB // PAGE_SIZE

    async def main() -> None:
        doms[q] = conn.createXML(domain_xml(q, with_qga, max_mib=512, qga=True), 0)
        doms[n] = conn.createXML(domain_xml(n, plain, max_mib=512, qga=True), 0)
        src = backend.pressure_sources
        snap = await _until(backend, lambda s: src().get(q) == "qemu-guest-agent"
                            and src().get(n) == "balloon-stats", "sources", tries=600)
        r = snap[q].report
        assert r is not None and r.total_bytes > 400 * MIB and r.balloon_actual_pages == 0
        assert snap[q].report_age_s(backend.clock.now()) is not None
        assert "unresponsive" in backend.notes()[n]
        assert backend.counters["libvirt_qga_unresponsive"] >= 1
        assert backend.counters["qga_reports"] >= 1
        assert await backend.apply_target(q, quarter)
        snap = await _until(backend, lambda s: s[q].report is not None
                            and abs(s[q].report.balloon_actual_pages - quarter) <= 256
                            and src()[q] == "qemu-guest-agent", "the guest saw it")
        assert snap[q].report is not None and snap[q].report.total_bytes < 400 * MIB
        await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        backend.close()
        for dom in doms.values():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        conn.close()


def test_a_wall_clock_stepped_back_or_forward_leaves_the_stats_fresh(fake: FakeLibvirt) -> None:
    # issue 11 item 7: the host's wall clock jumps (an NTP step, an admin's date). QEMU's
    # last-update is on that wall clock; a report written after the step is fresh either way,
    # and the balloon history restarts rather than attributing old-timeline balloons
    d = fake.add("g")
    w = World(fake)

    def fresh_after(step_s: float) -> GuestSample:
        w.wall[0] += step_s
        d.last_update = int(w.wall[0])
        d.actual = GIB_KIB - 100 * 1024
        return w.step()["g"]

    s = fresh_after(0)
    assert s.report is not None and s.report_age_s(w.clock.now()) == pytest.approx(1.0)
    for jump in (-3600.0, 7200.0):
        s = fresh_after(jump)
        assert w.b.pressure_sources()["g"] == "balloon-stats"
        assert s.report is not None and s.report_age_s(w.clock.now()) == pytest.approx(1.0)
        assert s.report.balloon_actual_pages == 100 * MIB // PAGE_SIZE
    assert w.b.counters["libvirt_wall_clock_stepped_back"] == 1
