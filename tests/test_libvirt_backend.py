"""LibvirtBackend: stats conversion (pure), then a real libvirtd with the qemu driver on TCG.

The real test follows ../shared/notes/qemu-guests.md "libvirt on these machines": as root it
installs what is missing (Debian packages, libvirt-python from PyPI), writes a qemu.conf that
runs QEMU as root when none exists, starts virtlogd and libvirtd by hand when no libvirtd
answers, and stops only the daemons it started. Without root it is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memballoon.model.errors import ConfigError
from memballoon.model.units import KIB, MIB, PAGE_SIZE
from memballoon.protocol.pressure import PressureReport
from memballoon.qemu.image import GuestImage, build_guest_image
from memballoon.qemu.libvirt_backend import domain_xml, report_from_stats

IMG = GuestImage("6.1.0-test", Path("/img/vmlinuz"), Path("/img/initrd.gz"))
QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
             'security_driver = "none"\ncgroup_controllers = [ ]\n')
PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "libvirt-dev",
            "pkg-config"]
SOCK = Path("/run/libvirt/libvirt-sock")


def test_report_from_libvirt_stats_in_kib() -> None:
    stats = {"actual": 393216, "available": 380000, "unused": 300000, "usable": 320000,
             "disk_caches": 20000, "major_fault": 7, "swap_in": 8, "swap_out": 0,
             "rss": 250000, "last_update": 1}
    r = report_from_stats("d", stats, max_kib=524288, target_pages=100, now=5.0)
    assert r is not None and PressureReport.decode(r.encode()) == r
    assert r.balloon_actual_pages == (524288 - 393216) * KIB // PAGE_SIZE == 32768
    assert r.total_bytes == 380000 * KIB and r.free_bytes == 300000 * KIB
    assert r.available_bytes == 320000 * KIB and r.cache_bytes == 20000 * KIB
    assert r.anon_bytes == (380000 - 300000 - 20000) * KIB
    assert r.swap_in_pages == 2 and r.major_faults == 7 and r.stall_pct == 0.0
    # Before the guest's first stats: only actual (and rss) are there.
    assert report_from_stats("d", {"actual": 524288}, max_kib=524288, target_pages=0,
                             now=1.0) is None
    assert report_from_stats("d", {"actual": "x", "available": -1, "unused": 1},
                             max_kib=1, target_pages=0, now=1.0) is None


def test_domain_xml_boots_the_test_guest_with_a_balloon() -> None:
    xml = domain_xml("a<b", IMG, max_mib=512, current_mib=384, agent_path="/r/agent.sock")
    assert "<domain type='qemu'><name>a&lt;b</name>" in xml
    assert "<memory unit='MiB'>512</memory><currentMemory unit='MiB'>384</currentMemory>" in xml
    assert "<kernel>/img/vmlinuz</kernel><initrd>/img/initrd.gz</initrd>" in xml
    assert "<memballoon model='virtio'><stats period='2'/></memballoon>" in xml
    assert "name='org.memballoon.agent'" in xml
    with pytest.raises(ConfigError):
        domain_xml("x", IMG, max_mib=512, current_mib=1024)


# --- a real libvirtd -------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _prepare_host() -> None:
    """Install and configure what libvirtd needs; pytest.skip with the reason otherwise."""
    if os.geteuid() != 0:
        pytest.skip("libvirt test needs root (to install packages and start libvirtd)")
    if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
        done = _run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES])
        if done.returncode != 0:
            pytest.skip(f"cannot install {' '.join(PACKAGES)}: {done.stderr.strip()[-300:]}")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        done = _run([sys.executable, "-m", "pip", "install", "libvirt-python"])
        if done.returncode != 0:
            pytest.skip(f"cannot pip install libvirt-python: {done.stderr.strip()[-300:]}")
    # libvirtd's QEMU driver refuses to start until this user and group exist (notes).
    try:
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        _run(["groupadd", "-r", "libvirt-qemu"])
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        _run(["useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt",
              "-s", "/usr/sbin/nologin", "libvirt-qemu"])
    conf = Path("/etc/libvirt/qemu.conf")
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(QEMU_CONF)
    for d in ("/var/log/libvirt", "/var/lib/libvirt/qemu", "/run/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)


def _answers() -> bool:
    return _run(["virsh", "-c", "qemu:///system", "version"], timeout=10).returncode == 0


def _pid(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(path).read_text().split()[0])
    return None


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[str]:
    _prepare_host()
    started: list[int] = []
    if not _answers():
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"),
                                ("libvirtd", "/run/libvirtd.pid")):
            done = _run([daemon, "-d"], timeout=30)
            if done.returncode != 0:
                pytest.skip(f"{daemon} -d failed: {done.stderr.strip()[-300:]}")
            for _ in range(100):
                pid = _pid(pidfile)
                if pid is not None:
                    started.append(pid)
                    break
                time.sleep(0.05)
        for _ in range(100):
            if _answers():
                break
            time.sleep(0.05)
        else:
            pytest.skip("libvirtd started but qemu:///system does not answer: "
                        + Path("/var/log/libvirt/libvirtd.log").read_text()[-300:])
    yield "qemu:///system"
    for pid in reversed(started):  # only the daemons this fixture started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.mark.qemu
def test_libvirt_backend_on_real_libvirtd(libvirtd: str) -> None:
    import libvirt

    from memballoon.qemu.libvirt_backend import LibvirtBackend

    image = build_guest_image()
    names = [f"mb-lv-a-{os.getpid()}", f"mb-lv-b-{os.getpid()}"]
    conn = libvirt.open(libvirtd)
    doms: list[Any] = []
    try:
        doms.append(conn.createXML(domain_xml(names[0], image, max_mib=512), 0))
        doms.append(conn.createXML(domain_xml(names[1], image, max_mib=512, current_mib=384),
                                   0))
        backend = LibvirtBackend(libvirtd, domains=[*names, "mb-lv-none"])

        async def until(pred: Any, what: str) -> dict[str, Any]:
            for _ in range(300):
                snap = dict(await backend.poll())
                if pred(snap):
                    return snap
                await asyncio.sleep(0.1)
            raise AssertionError(f"{what}: {snap}")

        async def main() -> None:
            a, b = names
            quarter = 128 * MIB // PAGE_SIZE
            snap = await until(lambda s: s[a].report is not None and s[b].report is not None
                               and abs(s[b].balloon_pages - quarter) <= 256, "boot")
            assert snap[a].alive and snap[a].ram_pages == 512 * MIB // PAGE_SIZE
            assert not snap["mb-lv-none"].alive
            assert snap[a].report.total_bytes > 256 * MIB
            assert backend.host_resident_bytes() > 0
            assert await backend.apply_target(a, quarter)
            snap = await until(lambda s: abs(s[a].balloon_pages - quarter) <= 256, "inflate")
            assert snap[a].target_pages == quarter
            assert await backend.apply_target(b, 0)
            await until(lambda s: s[b].balloon_pages <= 256, "deflate")
            assert not await backend.apply_target(a, 512 * MIB // PAGE_SIZE)
            assert not await backend.apply_target("mb-lv-none", 1)
            doms[1].destroy()  # one VM dies: the other goes on
            snap = await until(lambda s: not s[b].alive, "destroyed")
            assert snap[a].alive
            assert await backend.apply_target(a, 0)
            assert backend.counters["libvirt_target_out_of_range"] == 1

        asyncio.run(main())
        backend.close()
    finally:
        for d in doms:
            with contextlib.suppress(libvirt.libvirtError):
                d.destroy()
        conn.close()
