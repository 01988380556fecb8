"""Launches a test guest under QEMU with a virtio-balloon device, a QMP socket and an agent port.

Command line (what worked here, ../shared/notes/qemu-guests.md), per guest run directory:
    qemu-system-x86_64 -name N -accel tcg|kvm -m MAX -smp C -nodefaults -display none
      -no-reboot -kernel vmlinuz -initrd initramfs -append 'console=ttyS0 panic=-1 quiet'
      -device virtio-balloon-pci,id=balloon0,deflate-on-oom=..,free-page-reporting=..
      -device virtio-serial-pci,id=vser0
      -chardev socket,id=agent0,path=RUN/agent.sock,server=on,wait=off
      -device virtserialport,bus=vser0.0,chardev=agent0,name=org.memballoon.agent
      -qmp unix:RUN/qmp.sock,server=on,wait=off -serial file:RUN/console.log
      [-object memory-backend-memfd,id=ram0,size=MAXM,share=on -machine memory-backend=ram0]
``-nodefaults`` also means no NIC: the guest has no network.

Acceleration, ``accel="auto"``: KVM only when /dev/kvm is usable AND a probe boot of the
same image under KVM reaches the READY marker within ``KVM_PROBE_TIMEOUT_S`` (on these
machines /dev/kvm exists but a stock kernel hangs under it); else TCG. The probe's verdict
is cached per (host kernel, QEMU binary, guest kernel) in the image cache, so only the first
launch on a host pays for it. ``accel="tcg"``/``"kvm"`` force one. ``QemuProcess.accel``
says which was used.

A start size below the maximum is a pre-inflated balloon: ``launch_and_attach`` sends the
QMP ``balloon`` at once; QEMU applies it when the guest driver loads (about 0.6 s later).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB
from memballoon.qemu.errors import GuestBootError, GuestGoneError, HostToolMissingError
from memballoon.qemu.image import GuestImage, default_cache_dir
from memballoon.qemu.initscript import AGENT_PORT_NAME, READY_MARKER
from memballoon.qemu.qmp import QmpClient

Accel = Literal["auto", "kvm", "tcg"]
QEMU_BINARY = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT_S = 8.0
#: sun_path is 108 bytes including the terminating NUL (Linux include/uapi/linux/un.h).
_UNIX_PATH_MAX = 107
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class QemuGuest:
    """What to launch. Sizes in MiB (the CLI's unit); the balloon device is ``balloon0``."""

    name: str
    max_mib: int = 1024
    start_mib: int | None = None  # logical size right after boot; None = max_mib
    cpus: int = 1
    accel: Accel = "auto"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    memfd: bool = False  # back RAM with memory-backend-memfd (share=on)
    quiet: bool = True  # kernel ``quiet``: the console log shows errors, OOM kills, markers
    qemu_binary: str = QEMU_BINARY

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"guest name {self.name!r}: use letters, digits, '_', '.', '-'")
        if not 64 <= self.max_mib <= 1 << 20:
            raise ConfigError(f"max_mib={self.max_mib}: must be between 64 and 1048576")
        if self.start_mib is not None and not 64 <= self.start_mib <= self.max_mib:
            raise ConfigError(
                f"start_mib={self.start_mib}: must be between 64 and max_mib={self.max_mib}"
            )
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"cpus={self.cpus}: must be between 1 and 64")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"accel={self.accel!r}: use auto, kvm or tcg")

    @property
    def ram_bytes(self) -> int:
        return self.max_mib * MIB

    @property
    def start_bytes(self) -> int:
        return (self.start_mib if self.start_mib is not None else self.max_mib) * MIB


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def build_command(
    guest: QemuGuest, image: GuestImage, run_dir: Path, accel: Literal["kvm", "tcg"]
) -> list[str]:
    """The full QEMU argv for ``guest`` with its sockets and console log under ``run_dir``."""
    append = "console=ttyS0 panic=-1" + (" quiet" if guest.quiet else "")
    argv = [
        guest.qemu_binary, "-name", guest.name, "-accel", accel,
        "-m", str(guest.max_mib), "-smp", str(guest.cpus),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.vmlinuz), "-initrd", str(image.initramfs), "-append", append,
        "-device",
        f"virtio-balloon-pci,id=balloon0,deflate-on-oom={_on_off(guest.deflate_on_oom)},"
        f"free-page-reporting={_on_off(guest.free_page_reporting)}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={run_dir / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-serial", f"file:{run_dir / 'console.log'}",
    ]
    if guest.memfd:
        argv += [
            "-object", f"memory-backend-memfd,id=ram0,size={guest.max_mib}M,share=on",
            "-machine", "memory-backend=ram0",
        ]
    return argv


def find_qemu(binary: str = QEMU_BINARY) -> str:
    found = shutil.which(binary)
    if found is None:
        raise HostToolMissingError(
            f"{binary} not found: run scripts/install-qemu-deps.sh (as root: apt-get install -y "
            "--no-install-recommends qemu-system-x86)"
        )
    return found


@dataclass
class QemuProcess:
    """A running QEMU: its process, paths and the memory it holds. Closes itself on exit."""

    guest: QemuGuest
    image: GuestImage
    accel: Literal["kvm", "tcg"]
    run_dir: Path
    argv: list[str]
    popen: subprocess.Popen[bytes]
    own_run_dir: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_path(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "qemu.stderr"

    @property
    def ram_bytes(self) -> int:
        return self.guest.ram_bytes

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_bytes(self) -> int:
        """QEMU's resident set (guest RAM it holds plus its own ~85 MiB), from /proc."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError as exc:
            raise GuestGoneError(f"QEMU pid {self.pid} is gone: {exc}") from exc
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise GuestGoneError(f"QEMU pid {self.pid} has no VmRSS (exiting?)")

    def console_text(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def _check_console(self, marker: str, deadline: float, start: int) -> str | None:
        text = self.console_text()
        pos = text.find(marker, start)
        end = -1 if pos < 0 else text.find("\n", pos)
        if end >= 0:  # a whole line only: QEMU may have written half of it so far
            return text[pos:end].rstrip("\r")
        if not self.alive():
            raise GuestBootError(
                f"{self.guest.name}: QEMU exited ({self.popen.returncode}) before "
                f"{marker!r}: {self._stderr_tail()} console: {text[-600:]}"
            )
        if time.monotonic() > deadline:
            raise GuestBootError(
                f"{self.guest.name}: no {marker!r} on the console in time; "
                f"console tail: {text[-600:]!r}"
            )
        return None

    def wait_for_console(self, marker: str, timeout_s: float, *, after: int = 0) -> str:
        """Block until a console line containing ``marker`` appears at or after offset
        ``after``; return that line. GuestBootError on timeout or QEMU exit."""
        deadline = time.monotonic() + timeout_s
        while (line := self._check_console(marker, deadline, after)) is None:
            time.sleep(0.05)
        return line

    async def wait_for_console_async(
        self, marker: str, timeout_s: float, *, after: int = 0
    ) -> str:
        deadline = time.monotonic() + timeout_s
        while (line := self._check_console(marker, deadline, after)) is None:
            await asyncio.sleep(0.05)
        return line

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the guest's init printed READY (modules loaded, agent running)."""
        self.wait_for_console(READY_MARKER, timeout_s)

    async def wait_ready_async(self, timeout_s: float = 60.0) -> None:
        await self.wait_for_console_async(READY_MARKER, timeout_s)

    def kill(self) -> None:
        """SIGKILL QEMU (a crash, as far as the guest and the QMP client can tell)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove a run directory we created."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()
        for sock in (self.qmp_path, self.agent_path):
            sock.unlink(missing_ok=True)
        if self.own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawn(argv: list[str], run_dir: Path) -> subprocess.Popen[bytes]:
    with (run_dir / "qemu.stderr").open("wb") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,  # a Ctrl-C at the terminal is for us, not for the guests
        )


def kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _probe_key(image: GuestImage, qemu: str) -> str:
    st = os.stat(qemu)
    return f"{os.uname().release}|{qemu}|{st.st_mtime_ns}|{image.kernel_version}"


def probe_kvm(
    image: GuestImage,
    *,
    qemu_binary: str = QEMU_BINARY,
    timeout_s: float = KVM_PROBE_TIMEOUT_S,
    cache_file: Path | None = None,
) -> bool:
    """True when this image boots to READY under KVM within ``timeout_s`` (cached verdict)."""
    if not kvm_usable():
        return False
    qemu = find_qemu(qemu_binary)
    cache = cache_file if cache_file is not None else default_cache_dir() / "kvm-probe.json"
    key = _probe_key(image, qemu)
    try:
        seen = json.loads(cache.read_text())
        if isinstance(seen, dict) and isinstance(seen.get(key), bool):
            return bool(seen[key])
    except (OSError, ValueError):
        seen = {}
    guest = QemuGuest(name="kvm-probe", max_mib=256, accel="kvm", qemu_binary=qemu)
    with tempfile.TemporaryDirectory(prefix="mb-probe-", dir="/tmp") as tmp:
        run_dir = Path(tmp)
        proc = QemuProcess(guest, image, "kvm", run_dir, [], _spawn(
            build_command(guest, image, run_dir, "kvm"), run_dir))
        try:
            proc.wait_ready(timeout_s)
            works = True
        except GuestBootError:
            works = False
        finally:
            proc.kill()
    seen = seen if isinstance(seen, dict) else {}
    seen[key] = works
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(seen))
    return works


def choose_accel(
    accel: Accel, image: GuestImage, *, qemu_binary: str = QEMU_BINARY,
    probe_cache: Path | None = None,
) -> Literal["kvm", "tcg"]:
    match accel:
        case "kvm" | "tcg":
            return accel
        case _:
            works = probe_kvm(image, qemu_binary=qemu_binary, cache_file=probe_cache)
            return "kvm" if works else "tcg"


def launch(
    guest: QemuGuest,
    image: GuestImage,
    run_dir: Path | None = None,
    *,
    probe_cache: Path | None = None,
    paused: bool = False,
) -> QemuProcess:
    """Start QEMU for ``guest`` (returns at once; see ``wait_ready``).

    ``paused`` adds ``-S``: the vCPUs wait for QMP ``cont``, so the caller can first move
    QEMU into a memory cgroup before the guest touches its RAM.

    ``run_dir`` holds qmp.sock, agent.sock, console.log and qemu.stderr; by default a fresh
    directory under /tmp (unix socket paths must stay under 108 bytes), removed by close()."""
    qemu = find_qemu(guest.qemu_binary)
    for path in (image.vmlinuz, image.initramfs):
        if not path.is_file():
            raise ConfigError(
                f"guest image file {path} missing: run `memballoon guest-image build`"
            )
    own = run_dir is None
    rd = Path(tempfile.mkdtemp(prefix=f"mb-{guest.name}-", dir="/tmp")) if own else run_dir
    assert rd is not None
    rd.mkdir(parents=True, exist_ok=True)
    longest = rd / "agent.sock"
    if len(str(longest).encode()) > _UNIX_PATH_MAX:
        raise ConfigError(f"run directory {rd} is too long for unix sockets (max 107 bytes)")
    for stale in (rd / "qmp.sock", rd / "agent.sock", rd / "console.log"):
        stale.unlink(missing_ok=True)
    accel = choose_accel(guest.accel, image, qemu_binary=qemu, probe_cache=probe_cache)
    argv = build_command(guest, image, rd, accel)
    argv[0] = qemu
    if paused:
        argv.append("-S")
    return QemuProcess(guest, image, accel, rd, argv, _spawn(argv, rd), own_run_dir=own)


async def launch_and_attach(
    guest: QemuGuest,
    image: GuestImage,
    run_dir: Path | None = None,
    *,
    counters: Counters | None = None,
    timeout_s: float = 5.0,
    probe_cache: Path | None = None,
) -> tuple[QemuProcess, QmpClient]:
    """Launch, connect a QmpClient, and pre-inflate the balloon down to ``start_mib``."""
    proc = launch(guest, image, run_dir, probe_cache=probe_cache)
    client = QmpClient(
        proc.qmp_path, ram_bytes=guest.ram_bytes, timeout_s=timeout_s, counters=counters,
        name=guest.name,
    )
    try:
        await client.connect(wait_s=timeout_s)
        if guest.start_bytes < guest.ram_bytes:
            await client.set_logical_size(guest.start_bytes)
    except BaseException:
        await client.close()
        proc.close()
        raise
    return proc, client
