"""Builds the small test guest: a Debian cloud kernel plus a busybox initramfs with the agent.

The kernel comes from Debian's ``linux-image-cloud-amd64`` metapackage, resolved with
``apt-cache depends`` to the concrete package (it changes with point releases), fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x``: nothing is installed on the host.
The initramfs is written here in the cpio "newc" format (Linux
Documentation/driver-api/early-userspace/buffer-format.rst) and gzip'd, so no cpio binary is
needed and the archive is byte-for-byte reproducible (mtime 0, uid/gid 0).

With ``qga=True`` the initramfs also carries the QEMU guest agent (Debian's
``qemu-guest-agent``, fetched the same way) and the shared libraries it needs, found with
``ldd`` on this host (Debian 12 like the guest's userland: the same libc); init starts it on
the ``org.qemu.guest_agent.0`` port, so a libvirt domain can be read through qemu-ga as a
real one would be. It is a separate image: the plain one stays small.

Cache layout under ``dir`` (keyed by kernel version and a hash of the init script):
    debs/<package>_<version>_amd64.deb
    <kernel_version>/vmlinuz
    <kernel_version>/initramfs-<hash12>.cpio.gz
    <kernel_version>/initramfs-qga-<hash12>.cpio.gz
See ../shared/notes/qemu-guests.md for the measurements behind these choices.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memballoon.qemu.errors import GuestImageError, HostToolMissingError
from memballoon.qemu.initscript import MODULE_ORDER, render_init

#: Debian metapackage whose dependency names the current cloud kernel.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
#: Debian package of the QEMU guest agent, and where it puts the binary.
QGA_PACKAGE = "qemu-guest-agent"
QGA_BINARY = "usr/sbin/qemu-ga"
#: Where busybox-static puts its binary.
BUSYBOX_PATH = Path("/bin/busybox")
_INSTALL_HINT = (
    "install it with scripts/install-qemu-deps.sh (as root: apt-get install -y "
    "--no-install-recommends qemu-system-x86 busybox-static cpio kmod)"
)
_ELF_PT_INTERP = 3


@dataclass(frozen=True)
class GuestImage:
    """A bootable test guest: kernel, initramfs, and the kernel version they belong to."""

    kernel_version: str
    vmlinuz: Path
    initramfs: Path


def default_cache_dir() -> Path:
    """``$MEMBALLOON_CACHE/guest-image``, else ``~/.cache/memballoon/guest-image``."""
    base = os.environ.get("MEMBALLOON_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "memballoon"
    return root / "guest-image"


def _which(tool: str, search_path: str | None, package: str) -> str:
    found = shutil.which(tool, path=search_path)
    if found is None:
        raise HostToolMissingError(f"{tool} not found (package {package}): {_INSTALL_HINT}")
    return found


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageError(f"{what}: {' '.join(argv)} failed: {exc}") from exc
    if done.returncode != 0:
        raise GuestImageError(
            f"{what}: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-400:]}"
        )
    return done.stdout


def is_static_elf(path: Path) -> bool:
    """True when ``path`` is a 64-bit little-endian ELF with no PT_INTERP (no dynamic loader)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    if phentsize < 4 or len(table) < phentsize * phnum:
        return False
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != _ELF_PT_INTERP for i in range(phnum)
    )


def resolve_kernel_package(search_path: str | None = None) -> str:
    """The concrete package behind KERNEL_METAPACKAGE (linux-image-6.1.0-56-cloud-amd64)."""
    apt_cache = _which("apt-cache", search_path, "apt")
    out = _run([apt_cache, "depends", KERNEL_METAPACKAGE], what="resolving the guest kernel")
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key.endswith("Depends") and value.startswith("linux-image-"):
            return value
    raise GuestImageError(
        f"apt-cache does not know what {KERNEL_METAPACKAGE} depends on: run apt-get update"
    )


def kernel_version_of(package: str) -> str:
    if not package.startswith("linux-image-"):
        raise GuestImageError(f"not a kernel image package: {package}")
    return package.removeprefix("linux-image-")


# --- cpio newc -------------------------------------------------------------------------


class _Cpio:
    """A newc cpio writer: 110-byte ASCII headers, names and data padded to 4 bytes."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        raw_name = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(raw_name), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(header + raw_name)
        self._out.write(b"\0" * (-(len(header) + len(raw_name)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def build_initramfs(busybox: bytes, modules: dict[str, bytes], init: str,
                    extra: dict[str, tuple[bytes, int]] | None = None) -> bytes:
    """The gzip'd newc archive: /init, /bin/busybox, /lib/modules/*.ko, /dev/console, and
    ``extra`` files (path without the leading /, (data, permissions)), in path order."""
    cpio = _Cpio()
    dirs = ["bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"]
    for path in sorted(extra or {}):
        parts = path.split("/")[:-1]
        dirs += ["/".join(parts[:i + 1]) for i in range(len(parts))]
    for d in dict.fromkeys(dirs):  # each once, parents first
        cpio.directory(d)
    # The kernel opens /dev/console before /init runs: without the node init has no stdio.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    for name in MODULE_ORDER:
        cpio.file(f"lib/modules/{name}.ko", modules[name])
    for path, (data, perm) in sorted((extra or {}).items()):
        cpio.file(path, data, perm)
    cpio.file("init", init.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def shared_libraries(binary: Path, search_path: str | None = None) -> dict[str, Path]:
    """What the dynamic loader maps for ``binary`` on this host (``ldd``): the path it asks
    for (the interpreter's, or the library's as resolved) -> the file to copy."""
    ldd = _which("ldd", search_path, "libc-bin")
    out = _run([ldd, str(binary)], what=f"finding the libraries of {binary.name}")
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs[parts[i + 1]] = Path(parts[i + 1]).resolve()
            elif "not" in parts:
                raise GuestImageError(f"{binary.name} needs {parts[0]}, not on this host")
        elif parts and parts[0].startswith("/"):  # the interpreter: /lib64/ld-linux...
            libs[parts[0]] = Path(parts[0]).resolve()
    return libs


# --- kernel package --------------------------------------------------------------------


def _find_module(root: Path, version: str, name: str) -> bytes:
    for base in (root / "lib" / "modules" / version, root / "usr" / "lib" / "modules" / version):
        for suffix in (".ko", ".ko.xz", ".ko.gz"):
            for path in base.glob(f"kernel/**/{name}{suffix}"):
                data = path.read_bytes()
                if suffix == ".ko.xz":
                    return lzma.decompress(data)
                if suffix == ".ko.gz":
                    return gzip.decompress(data)
                return data
    raise GuestImageError(
        f"module {name} not found in the {version} kernel package (is it built in, or .ko.zst?)"
    )


def _download_deb(package: str, deb_dir: Path, search_path: str | None) -> Path:
    existing = sorted(deb_dir.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    apt_get = _which("apt-get", search_path, "apt")
    deb_dir.mkdir(parents=True, exist_ok=True)
    _run([apt_get, "download", package], cwd=deb_dir, what=f"downloading {package}")
    got = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not got:
        raise GuestImageError(f"apt-get download {package} left no .deb in {deb_dir}")
    return got[-1]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock: parallel test workers may build the same image at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_guest_image(
    dir: Path | None = None,
    *,
    kernel_package: str | None = None,
    busybox: Path = BUSYBOX_PATH,
    search_path: str | None = None,
    rebuild: bool = False,
    qga: bool = False,
) -> GuestImage:
    """Build (or find in the cache) the test guest image under ``dir``.

    ``kernel_package`` pins the kernel (skips apt-cache); ``search_path`` replaces $PATH when
    looking for apt-get, apt-cache, dpkg-deb and ldd; ``qga`` adds the QEMU guest agent
    (module docstring). Raises HostToolMissingError or GuestImageError, each naming what to
    do.
    """
    root = (dir if dir is not None else default_cache_dir()).resolve()
    if not busybox.exists():
        raise HostToolMissingError(f"{busybox} not found (package busybox-static): {_INSTALL_HINT}")
    if not is_static_elf(busybox):
        raise HostToolMissingError(
            f"{busybox} is not a static x86-64 binary: the guest has no libc; "
            f"install busybox-static: {_INSTALL_HINT}"
        )
    package = kernel_package or resolve_kernel_package(search_path)
    version = kernel_version_of(package)
    init = render_init()
    init_hash = hashlib.sha256(init.encode() + busybox.read_bytes()).hexdigest()[:12]
    out = root / version
    vmlinuz = out / "vmlinuz"
    variant = "initramfs-qga-" if qga else "initramfs-"
    initramfs = out / f"{variant}{init_hash}.cpio.gz"
    with _locked(root / ".lock"):
        if not rebuild and vmlinuz.is_file() and initramfs.is_file():
            return GuestImage(version, vmlinuz, initramfs)
        deb = _download_deb(package, root / "debs", search_path)
        dpkg_deb = _which("dpkg-deb", search_path, "dpkg")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix="unpack-") as tmp:
            tree = Path(tmp)
            _run([dpkg_deb, "-x", str(deb), str(tree)], what=f"unpacking {deb.name}")
            kernel = tree / "boot" / f"vmlinuz-{version}"
            if not kernel.is_file():
                raise GuestImageError(f"{deb.name} has no boot/vmlinuz-{version}")
            modules = {name: _find_module(tree, version, name) for name in MODULE_ORDER}
            _atomic_write(vmlinuz, kernel.read_bytes())
        extra = _qga_files(root, search_path) if qga else None
        _atomic_write(initramfs, build_initramfs(busybox.read_bytes(), modules, init, extra))
        for stale in out.glob(f"{variant}*.cpio.gz"):
            # the other variant's files are not stale ("initramfs-" also matches "-qga-")
            if stale != initramfs and stale.name.startswith("initramfs-qga-") == qga:
                stale.unlink(missing_ok=True)
    return GuestImage(version, vmlinuz, initramfs)


def _qga_files(root: Path, search_path: str | None) -> dict[str, tuple[bytes, int]]:
    """qemu-ga from its Debian package and the libraries it needs, as initramfs files."""
    deb = _download_deb(QGA_PACKAGE, root / "debs", search_path)
    dpkg_deb = _which("dpkg-deb", search_path, "dpkg")
    with tempfile.TemporaryDirectory(dir=root, prefix="unpack-") as tmp:
        tree = Path(tmp)
        _run([dpkg_deb, "-x", str(deb), str(tree)], what=f"unpacking {deb.name}")
        binary = tree / QGA_BINARY
        if not binary.is_file():
            raise GuestImageError(f"{deb.name} has no {QGA_BINARY}")
        files = {QGA_BINARY: (binary.read_bytes(), 0o755)}
        for want, real in shared_libraries(binary, search_path).items():
            files[want.lstrip("/")] = (real.read_bytes(), 0o755)
    return files
