"""A real libvirtd for the tests that need one (they are marked ``qemu`` and run in CI as root).

Follows ../shared/notes/qemu-guests.md "libvirt on these machines": as root it installs what is
missing (Debian packages; libvirt-python from PyPI into this interpreter, built against
libvirt-dev), writes a qemu.conf that runs QEMU as root when none exists, creates the
``libvirt-qemu`` user libvirtd's QEMU driver insists on, and starts virtlogd and libvirtd by
hand when no libvirtd answers. ``scripts/install-qemu-deps.sh`` installs the same packages
before the tests; this is the fallback for a bare ``pytest``.

One libvirt test at a time across pytest-xdist workers (an flock held for the test), and each
stops only the daemons it started, so a worker never pulls libvirtd out from under another.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

URI = "qemu:///system"
QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
             'security_driver = "none"\ncgroup_controllers = [ ]\n')
PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "libvirt-dev",
            "pkg-config"]
LOCK = Path("/run/memballoon-test-libvirtd.lock")
LIBVIRTD_PIDFILE = "/run/libvirtd.pid"
VIRTLOGD_PIDFILE = "/run/virtlogd.pid"


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def prepare_host() -> None:
    """Install and configure what libvirtd needs (as root); fail saying what did not work."""
    if os.geteuid() != 0:
        pytest.skip("libvirt tests need root (to install packages and start libvirtd)")
    if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
        done = _run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES])
        if done.returncode != 0:
            pytest.fail(f"cannot install {' '.join(PACKAGES)}: {done.stderr.strip()[-300:]}")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        done = _run([sys.executable, "-m", "pip", "install", "libvirt-python"])
        if done.returncode != 0:
            pytest.fail(f"cannot pip install libvirt-python: {done.stderr.strip()[-300:]}")
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


def answers() -> bool:
    return _run(["virsh", "-c", URI, "version"], timeout=10).returncode == 0


def _pid(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(path).read_text().split()[0])
    return None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class Libvirtd:
    """The libvirtd a test runs against; ``started`` are the pids this fixture started."""

    uri: str = URI
    started: dict[str, int] = field(default_factory=dict)

    def start(self, daemon: str, pidfile: str) -> None:
        done = _run([daemon, "-d"], timeout=30)
        if done.returncode != 0:
            pytest.fail(f"{daemon} -d failed: {done.stderr.strip()[-300:]}")
        for _ in range(100):
            pid = _pid(pidfile)
            if pid is not None and not _gone(pid):
                self.started[daemon] = pid
                return
            time.sleep(0.05)
        pytest.fail(f"{daemon} -d wrote no pid to {pidfile}")

    def wait_answers(self) -> None:
        for _ in range(200):
            if answers():
                return
            time.sleep(0.05)
        log = Path("/var/log/libvirt/libvirtd.log")
        pytest.fail("libvirtd started but qemu:///system does not answer: "
                    + (log.read_text()[-300:] if log.exists() else "(no log)"))

    def stop_libvirtd(self) -> None:
        """Stop the libvirtd this fixture started (the domains keep running)."""
        pid = self.started.pop("libvirtd", None)
        if pid is None:
            pytest.fail("this test did not start the libvirtd that runs: not stopping "
                        "someone else's daemon")
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if _gone(pid):
                return
            time.sleep(0.05)
        pytest.fail(f"libvirtd {pid} did not stop within 10 s")

    def start_libvirtd(self) -> None:
        self.start("libvirtd", LIBVIRTD_PIDFILE)
        self.wait_answers()


@pytest.fixture
def libvirtd() -> Iterator[Libvirtd]:
    prepare_host()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one libvirt test at a time, across workers
        d = Libvirtd()
        try:
            if not answers():
                logd = _pid(VIRTLOGD_PIDFILE)
                if logd is None or _gone(logd):
                    d.start("virtlogd", VIRTLOGD_PIDFILE)
                d.start_libvirtd()
            yield d
        finally:
            for pid in reversed(list(d.started.values())):  # only what this fixture started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            fcntl.flock(lock, fcntl.LOCK_UN)
