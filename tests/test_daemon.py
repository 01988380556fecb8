"""A real ``memballoon run`` with two small local guests, driven through the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from libvirt_host import Libvirtd, libvirtd  # noqa: F401 (the fixture)
from memballoon.cli import main
from memballoon.edge.journal import read_journal
from memballoon.model.units import MIB

CONFIG = """
world = "local"
budget = "160MiB"
period_s = 0.5
journal = "journal.jsonl"
socket = "ctl/m.sock"
metrics_port = 0
[policy]
name = "default"
[[guests]]
name = "g1"
mib = 64
workload = "idle"
min = "24MiB"
[[guests]]
name = "g2"
mib = 64
protocol = "vmw-batched"
workload = "steady"
min = "40MiB"
"""


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = path.read_text()
        if text in out:
            return out
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in daemon output:\n{path.read_text()}")


def test_run_status_set_journal_top_and_sigterm(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG)
    log = tmp_path / "daemon.out"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "memballoon.cli", "run", "--config",
                                 str(cfg)], stdout=f, stderr=subprocess.STDOUT)
    try:
        out = _wait_for(log, "ready", proc, 60.0)
        assert "host budget 160 MiB" in out
        assert ("ENFORCED by" in out) or ("only WATCHED" in out)
        sock = str(tmp_path / "ctl" / "m.sock")
        time.sleep(1.5)  # a few manager rounds and reports

        assert main(["status", "--json", "--socket", sock]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["policy"] == "default" and st["budget_bytes"] == 160 << 20
        assert {g["name"] for g in st["guests"]} == {"g1", "g2"}
        assert all(g["alive"] and g["ram_bytes"] == 64 << 20 for g in st["guests"])
        assert all(g["free_bytes"] is not None for g in st["guests"])

        # under its safety floor (a 64 MiB guest: its working set plus 64 MiB): refused,
        # saying why; --force sets it anyway
        assert main(["set", "g1", "40MiB", "--config", str(cfg)]) == 2
        assert "safety floor" in capsys.readouterr().err
        assert main(["set", "g1", "40", "--config", str(cfg)]) == 2  # no unit
        assert "'40MiB'" in capsys.readouterr().err
        assert main(["set", "g1", "40MiB", "--force", "--config", str(cfg)]) == 0
        assert "size 40 MiB" in capsys.readouterr().out
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            main(["status", "--json", "--socket", sock])
            g1 = {g["name"]: g for g in json.loads(capsys.readouterr().out)["guests"]}["g1"]
            if g1["actual_bytes"] == 24 << 20:
                break
            time.sleep(0.2)
        assert g1["manual"] and g1["target_bytes"] == 24 << 20 and g1["actual_bytes"] == 24 << 20

        assert main(["set", "g1", "1TiB", "--socket", sock]) == 2  # above its RAM
        assert "above guest g1's RAM" in capsys.readouterr().err

        assert main(["journal", "--guest", "g1", "--last", "5", "--json", "--socket", sock]) == 0
        recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert recs and all(r["guest"] == "g1" for r in recs)
        assert recs[-1]["kind"] == "manual" and recs[-1]["new_bytes"] == 24 << 20

        assert main(["top", "--once", "--socket", sock]) == 0
        frame = capsys.readouterr().out
        assert "g1" in frame and "g2" in frame and "policy default" in frame

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert "balloons deflated" in out and "stopped" in out
    shut = [r for r in read_journal(tmp_path / "journal.jsonl") if r["kind"] == "shutdown"]
    assert {r["guest"] for r in shut} >= {"g1"}
    assert all(r["new_pages"] == 0 and r["applied"] for r in shut)
    assert not [r for r in read_journal(tmp_path / "journal.jsonl")
                if r["kind"] == "shutdown_incomplete"]
    assert not (tmp_path / "ctl" / "m.sock").exists()
    assert main(["status", "--socket", str(tmp_path / "ctl" / "m.sock")]) == 2
    assert "no memballoon daemon" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "journal.jsonl")


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG.replace('budget = "160MiB"', 'budget = "160 furlongs"'))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and "furlongs" in err
    cfg.write_text(CONFIG.replace('name = "default"', 'name = "magic"'))
    assert main(["run", "--config", str(cfg)]) == 2
    assert "magic" in capsys.readouterr().err


# --- start-up refusals: nothing left behind, never "ready" (issue 11 item 3) ---------------

def _ours() -> list[Path]:
    """The memory cgroups this process's daemons made (LocalHost: memballoon-<pid>-...)."""
    from memballoon.host.cgroup import detect

    root = detect().root
    return sorted(root.glob(f"memballoon-{os.getpid()}-*")) if root is not None else []


def _refused(tmp_path: Path, toml: str) -> tuple[str, str]:
    """Run a daemon on ``toml`` in this process: the ConfigError and what it said."""
    import io

    from memballoon.app.config import load_config
    from memballoon.app.daemon import Daemon
    from memballoon.model.errors import ConfigError

    cfg = tmp_path / "host.toml"
    cfg.write_text(toml)
    out = io.StringIO()
    before = _ours()
    with pytest.raises(ConfigError) as ei:
        asyncio.run(Daemon(load_config(cfg), out=out).run())
    said = out.getvalue()
    assert "ready" not in said.splitlines(), said
    assert _ours() == before  # no budget cgroup left behind
    return str(ei.value), said


def test_a_budget_or_a_local_guest_larger_than_the_host_is_refused(tmp_path: Path) -> None:
    why, said = _refused(tmp_path, CONFIG.replace('budget = "160MiB"', 'budget = "64TiB"'))
    assert "budget = 67108864 MiB is more than the host's memory" in why and "auto" in why
    assert "ENFORCED" not in said
    why, _ = _refused(tmp_path, CONFIG.replace("mib = 64\nworkload = \"idle\"",
                                               "mib = 4194304\nworkload = \"idle\""))
    assert "g1: mib = 4194304 is more than the host's memory" in why


def test_a_socket_path_that_cannot_be_made_is_refused_before_any_guest_starts(
        tmp_path: Path) -> None:
    (tmp_path / "ctl").write_text("a regular file")
    why, said = _refused(tmp_path, CONFIG)  # socket = "ctl/m.sock": under a regular file
    assert "ctl is not a directory" in why and "guest" not in said
    (tmp_path / "ctl").unlink()
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "m.sock").write_text("precious")
    why, _ = _refused(tmp_path, CONFIG)
    assert "regular file: it is not removed" in why
    assert (tmp_path / "ctl" / "m.sock").read_text() == "precious"


def test_a_journal_path_that_is_not_a_file_is_refused_before_any_guest_starts(
        tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("keep")
    (tmp_path / "journal.jsonl").symlink_to(tmp_path / "secret")
    why, _ = _refused(tmp_path, CONFIG)
    assert "journal" in why and "symlink" in why
    assert (tmp_path / "secret").read_text() == "keep"
    why, _ = _refused(tmp_path, CONFIG.replace('journal = "journal.jsonl"',
                                               'journal = "/proc/sys/vm/drop_caches"'))
    assert "proc filesystem" in why


def test_guests_that_do_not_start_stop_the_daemon_before_ready(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memballoon.local import host

    monkeypatch.setattr(host, "GUEST_MODULE", "memballoon.no_such_guest")  # exits at once
    why, _ = _refused(tmp_path, CONFIG)
    assert "guest(s) did not start: g1: " in why and "g2: " in why, why
    assert not (tmp_path / "ctl" / "m.sock").exists()


# --- the libvirt world, against a real libvirtd ---------------------------------------------

LIBVIRT_CONFIG = """
world = "libvirt"
uri = "qemu:///system"
domains = ["{prefix}*"]
budget = "auto"
host_reserve = "256MiB"
period_s = 0.5
journal = "journal.jsonl"
socket = "ctl/m.sock"
state = "state.json"
[defaults]
min = "25%"
[[guests]]
name = "{prefix}y"
min = "200MiB"
shares = 2000
"""


def _status(sock: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", "--json", "--socket", sock]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _until(sock: str, capsys: pytest.CaptureFixture[str], pred: Any, what: str,
           timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = _status(sock, capsys)
        try:
            if pred({g["name"]: g for g in st["guests"]}):
                return st
        except KeyError:  # a guest not listed yet: the manager lists guests from its first tick
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what}: {json.dumps(st)[:3000]}")


@pytest.mark.qemu
def test_libvirt_world_follows_domains_and_survives_a_libvirtd_restart(
        libvirtd: Libvirtd, tmp_path: Path,  # noqa: F811 (the fixture)
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13, item 5's second test: a domain destroyed and another started while the
    daemon runs; libvirtd restarted under the daemon: it reconnects and goes on."""
    import libvirt

    from memballoon.qemu.image import build_guest_image
    from memballoon.qemu.libvirt_backend import domain_xml

    image = build_guest_image()
    prefix = f"mb-d{os.getpid()}-"
    x, y = prefix + "x", prefix + "y"
    cfg = tmp_path / "libvirt.toml"
    cfg.write_text(LIBVIRT_CONFIG.format(prefix=prefix))
    sock = str(tmp_path / "ctl" / "m.sock")
    conn = libvirt.open(libvirtd.uri)
    doms: dict[str, Any] = {}
    log = tmp_path / "daemon.out"
    proc: subprocess.Popen[bytes] | None = None
    try:
        doms[x] = conn.createXML(domain_xml(x, image, max_mib=512), 0)
        with log.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "memballoon.cli", "run", "--config",
                                     str(cfg)], stdout=f, stderr=subprocess.STDOUT)
        out = _wait_for(log, "ready", proc, 60.0)
        assert "following domains by libvirt lifecycle events" in out
        assert f"{x}: managed: on tcg; pressure from balloon-stats" in out
        st = _until(sock, capsys, lambda g: x in g and g[x]["alive"]
                    and g[x]["pressure_source"] == "balloon-stats", "x managed")
        gx = {g["name"]: g for g in st["guests"]}[x]
        assert gx["min_bytes"] == 128 * MIB  # [defaults] min = "25%" of 512 MiB
        assert gx["accel"] == "tcg"
        assert st["world"] == "libvirt" and st["host"] is not None
        assert "QEMU RSS" in st["budget_held_against"]

        doms.pop(x).destroy()  # while the daemon runs
        doms[y] = conn.createXML(domain_xml(y, image, max_mib=768), 0)
        st = _until(sock, capsys, lambda g: y in g and g[y]["alive"] and not g[x]["alive"]
                    and g[x]["note"] == "stopped: destroyed", "x destroyed, y started")
        gy = {g["name"]: g for g in st["guests"]}[y]
        assert gy["min_bytes"] == 200 * MIB and gy["shares"] == 2000  # its own entry

        libvirtd.stop_libvirtd()  # under the daemon: the domains keep running
        st = _until(sock, capsys, lambda g: not g[y]["alive"]
                    and "libvirtd unreachable" in (g[y]["note"] or ""), "libvirtd gone")
        libvirtd.start_libvirtd()
        conn = libvirt.open(libvirtd.uri)  # ours dropped with libvirtd too
        doms[y] = conn.lookupByName(y)
        st = _until(sock, capsys, lambda g: g[y]["alive"], "reconnected")
        assert st["counters"]["libvirt_connect"] >= 2
        assert main(["set", y, "512MiB", "--socket", sock]) == 0  # it goes on
        capsys.readouterr()
        _until(sock, capsys, lambda g: abs(g[y]["actual_bytes"] - 256 * MIB) <= MIB,
               "set after the restart")

        # issue 11 item 4: the daemon SIGKILLed, restarted: it finds the domain again and
        # goes on from its state file (the pin holds, nothing moved back and forth)
        time.sleep(1.5)  # a period or two: the state file holds the pin
        proc.send_signal(signal.SIGKILL)  # no shutdown, no deflation
        proc.wait(10)
        assert doms[y].info()[2] == 512 * 1024  # the domain ran on, still ballooned
        with (tmp_path / "daemon2.out").open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "memballoon.cli", "run", "--config",
                                     str(cfg)], stdout=f, stderr=subprocess.STDOUT)
        out2 = _wait_for(tmp_path / "daemon2.out", "ready", proc, 60.0)
        assert "restored from" in out2 and "1 manual target(s)" in out2
        st = _until(sock, capsys, lambda g: g[y]["alive"] and g[y]["manual"], "re-attached")
        assert abs({g["name"]: g for g in st["guests"]}[y]["actual_bytes"] - 256 * MIB) <= MIB

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert doms[y].info()[2] == 768 * 1024  # deflated to its max on shutdown
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for dom in doms.values():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        conn.close()
    out = log.read_text()
    assert f"{x}: domain: stopped: destroyed" in out and f"{y}: domain: started" in out
    assert "connection to qemu:///system lost" in out or "libvirtd unreachable" in out
    recs = read_journal(tmp_path / "journal.jsonl")
    kinds = {(r.get("guest"), r["kind"], r.get("reason")) for r in recs}
    assert (x, "domain", "stopped: destroyed") in kinds
    assert any(r["kind"] == "shutdown" and r["guest"] == y and r["applied"] for r in recs)


# --- the qemu world: a VM it launches and one it attaches to ---------------------------------

QEMU_CONFIG = """
world = "qemu"
budget = "1536MiB"
period_s = 0.5
journal = "journal.jsonl"
socket = "ctl/m.sock"
run_dir = "run"
[[guests]]
name = "lau"
max_mib = 384
min = "25%"
accel = "tcg"
deflate_on_oom = true
free_page_reporting = true
[[guests]]
name = "att"
qmp = "vm/qmp.sock"
agent = "vm/agent.sock"
min = "128MiB"
[[guests]]
name = "ghost"
qmp = "nowhere/qmp.sock"
"""


@pytest.mark.qemu
def test_qemu_world_launches_attaches_and_leaves_the_attached_vm_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13 item 2: a [[guests]] entry with qmp manages a VM started by something else,
    never launched or killed by memballoon, deflated to its max on shutdown; a missing QMP
    socket is a clear note while the others are served; launch options as `vm start` takes
    them; the daemon says which accelerator each guest runs on; status reads the last period
    and gives the enforcing cgroup's usage and limit."""
    from memballoon.qemu.image import build_guest_image
    from memballoon.qemu.launch import QemuGuest, launch
    from memballoon.qemu.qmp import QmpClient

    image = build_guest_image()
    cfg = tmp_path / "qemu.toml"
    cfg.write_text(QEMU_CONFIG)
    sock = str(tmp_path / "ctl" / "m.sock")
    vm = launch(QemuGuest("att", max_mib=512, accel="tcg"), image, tmp_path / "vm")
    log = tmp_path / "daemon.out"
    proc: subprocess.Popen[bytes] | None = None
    try:
        vm.wait_ready(60)
        with log.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "memballoon.cli", "run", "--config",
                                     str(cfg)], stdout=f, stderr=subprocess.STDOUT)
        out = _wait_for(log, "ready", proc, 120.0)
        assert "guest lau: launched, QEMU on tcg (software emulation" in out
        assert "guest att: attached, QEMU on tcg" in out
        assert "guest ghost: not attached yet" in out and "-qmp unix:" in out
        st = _until(sock, capsys, lambda g: g["lau"]["alive"] and g["att"]["alive"]
                    and g["att"]["pressure_source"] == "memballoon-agent", "both served")
        g = {x["name"]: x for x in st["guests"]}
        assert not g["ghost"]["alive"] and "no QMP socket" in g["ghost"]["note"]
        assert g["lau"]["accel"] == g["att"]["accel"] == "tcg"
        assert g["lau"]["min_bytes"] == 96 * MIB and g["att"]["min_bytes"] == 128 * MIB
        assert g["att"]["ram_bytes"] == 512 * MIB  # from QEMU: the entry gave no size
        assert "QEMU RSS" in st["budget_held_against"]
        if st["budget_enforced"]:
            cg = st["cgroup"]
            assert cg["limit_bytes"] == 1536 * MIB and cg["usage_bytes"] > 0
        # status reads the last period's figures and polls no guest: checked without a clock in
        # test_status_reads_the_last_period_and_polls_no_guest
        assert main(["set", "att", "384MiB", "--socket", sock]) == 0
        capsys.readouterr()
        _until(sock, capsys, lambda g: abs(g["att"]["actual_bytes"] - 128 * MIB) <= MIB,
               "att ballooned")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert vm.alive()  # attached: never killed by memballoon

        async def logical() -> int:
            async with QmpClient(vm.qmp_path) as q:
                await q.connect()
                return await q.query_balloon()

        assert asyncio.run(logical()) == 512 * MIB  # deflated to its max on shutdown
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        vm.close()
    assert "balloons deflated" in log.read_text()
    launched = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path / "run")
                in _cmdline(int(pid))]
    assert launched == []  # the VM it launched is stopped with it


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_status_reads_the_last_period_and_polls_no_guest() -> None:
    """Found on two QEMU guests: each status call polled every guest again (0.45 s)."""
    from memballoon.app.config import load_config_text
    from memballoon.app.daemon import Daemon
    from memballoon.edge.aio import AsyncEngine
    from memballoon.edge.journal import Journal
    from memballoon.manager.core import ManagerCore
    from memballoon.manager.engine import Engine
    from memballoon.manager.port import ManualClock
    from memballoon.model.counters import Counters
    from memballoon.policy.registry import make_policy
    from memballoon.policy.sample import GuestSample

    class Polled:
        """A socket world's backend that counts its polls."""

        name = "fake"

        def __init__(self) -> None:
            self.counters = Counters()
            self.refreshes = 0
            self.balloon = 0

        async def refresh(self) -> None:
            self.refreshes += 1
            self.balloon += 256

        async def flush(self) -> None:
            pass

        def guests(self) -> dict[str, GuestSample]:
            return {"g": GuestSample("g", 65536, self.balloon, 0)}

        def set_target(self, guest: str, balloon_pages: int) -> bool:
            return True

        def host_resident_bytes(self) -> int:
            return 123

        def pressure_sources(self) -> dict[str, str]:
            return {"g": "memballoon-agent"}

        def notes(self) -> dict[str, str]:
            return {"g": "a note"}

    cfg = load_config_text('world = "qemu"\nbudget = "1GiB"\n[[guests]]\nname = "g"\n'
                           'max_mib = 256\nmin = "25%"\n')
    d = Daemon(cfg)
    b = Polled()
    core = ManagerCore(make_policy("static"), d.settings, 65536, counters=d.counters)
    clock = ManualClock(10.0)
    d.manager = AsyncEngine(Engine(b, core, Journal(None), clock, counters=d.counters))
    d.backend = b

    async def main() -> None:
        assert d.manager is not None
        await d.manager.run_once()
        d._tick(d.manager.engine)
        clock.advance(0.5)
        st = await d.op_status()
        for _ in range(5):
            assert await d.op_status() == st
        assert b.refreshes == 1  # the period's poll only
        g = st["guests"][0]
        assert g["actual_bytes"] == 256 * 4096 and g["min_bytes"] == 64 * MIB
        assert g["pressure_source"] == "memballoon-agent" and g["note"] == "a note"
        assert st["collected_age_s"] == 0.5 and st["host_resident_bytes"] == 123
        assert "QEMU RSS" in st["budget_held_against"] and st["cgroup"] is None

    asyncio.run(main())


ATTACH_ONLY = """
world = "qemu"
budget = "1536MiB"
period_s = 0.5
journal = "journal.jsonl"
socket = "ctl/m.sock"
state = "state.json"
run_dir = "run"
[[guests]]
name = "att"
qmp = "vm/qmp.sock"
agent = "vm/agent.sock"
min = "128MiB"
"""


@pytest.mark.qemu
def test_a_daemon_killed_mid_run_comes_back_where_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11 item 4: SIGKILLed, restarted, the daemon re-attaches to the running VM and
    goes on from its state file: the manual pin holds, the balloon is not moved back and
    forth, nothing is released twice."""
    from memballoon.qemu.image import build_guest_image
    from memballoon.qemu.launch import QemuGuest, launch

    image = build_guest_image()
    cfg = tmp_path / "qemu.toml"
    cfg.write_text(ATTACH_ONLY)
    sock = str(tmp_path / "ctl" / "m.sock")
    vm = launch(QemuGuest("att", max_mib=512, accel="tcg"), image, tmp_path / "vm")
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> str:
        log = tmp_path / f"daemon{n}.out"
        with log.open("wb") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "memballoon.cli", "run",
                                           "--config", str(cfg)], stdout=f,
                                          stderr=subprocess.STDOUT))
        return _wait_for(log, "ready", procs[-1], 120.0)

    try:
        vm.wait_ready(60)
        out = start(1)
        assert "none yet: starting afresh" in out
        _until(sock, capsys, lambda g: g["att"]["alive"] and g["att"]["report_age_s"]
               is not None, "served")
        assert main(["set", "att", "384MiB", "--socket", sock]) == 0
        capsys.readouterr()
        _until(sock, capsys, lambda g: abs(g["att"]["actual_bytes"] - 128 * MIB) <= MIB,
               "att ballooned")
        time.sleep(1.5)  # a period or two: the state file holds the pin
        procs[0].send_signal(signal.SIGKILL)  # no shutdown, no deflation
        procs[0].wait(10)
        assert vm.alive()
        out = start(2)
        assert "restored from" in out and "1 manual target(s)" in out
        g = _until(sock, capsys, lambda g: g["att"]["alive"], "re-attached")
        att = {x["name"]: x for x in g["guests"]}["att"]
        assert att["manual"] and abs(att["actual_bytes"] - 128 * MIB) <= MIB
        recs = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()
                if '"att"' in x]
        pinned = max(i for i, r in enumerate(recs) if r.get("kind") == "manual")
        # the pin held through the restart: nothing but that pin moved the balloon since
        assert [r["kind"] for r in recs[pinned + 1:] if "new_pages" in r] in ([], ["shutdown"])
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        vm.close()
