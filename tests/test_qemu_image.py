"""The test guest image builder: cpio format, tool checks, the real build from Debian packages."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from memballoon.model.errors import ConfigError
from memballoon.qemu.errors import GuestImageError, HostToolMissingError
from memballoon.qemu.image import (
    BUSYBOX_PATH,
    KERNEL_METAPACKAGE,
    build_guest_image,
    build_initramfs,
    default_cache_dir,
    is_static_elf,
    kernel_version_of,
    resolve_kernel_package,
    shared_libraries,
)
from memballoon.qemu.initscript import (
    AGENT_PORT_NAME,
    MODULE_ORDER,
    QGA_PORT_NAME,
    READY_MARKER,
    render_init,
)


def parse_newc(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """An independent newc reader: name -> (mode, data, (rdevmajor, rdevminor))."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert archive[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = archive[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return out
        out[name] = (mode, data, (rmaj, rmin))


def test_initramfs_layout() -> None:
    modules = {name: f"module {name}".encode() for name in MODULE_ORDER}
    blob = build_initramfs(b"BUSYBOX", modules, "#!/bin/busybox sh\necho hi\n")
    entries = parse_newc(gzip.decompress(blob))
    mode, data, _ = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and data.startswith(b"#!/bin/busybox sh")
    assert entries["bin/busybox"][1] == b"BUSYBOX"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    for name in MODULE_ORDER:
        assert entries[f"lib/modules/{name}.ko"][1] == f"module {name}".encode()
    assert stat.S_ISDIR(entries["proc"][0])
    # reproducible: the same inputs give the same bytes (the cache key relies on it)
    assert build_initramfs(b"BUSYBOX", modules, "#!/bin/busybox sh\necho hi\n") == blob


def test_initramfs_is_readable_by_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed (scripts/install-qemu-deps.sh installs it)")
    blob = build_initramfs(b"x" * 5, {n: b"m" for n in MODULE_ORDER}, "#!/bin/sh\n")
    listing = subprocess.run(["cpio", "-it"], input=gzip.decompress(blob), capture_output=True,
                             check=True).stdout.decode().split()
    assert "init" in listing and "bin/busybox" in listing and "dev/console" in listing


def test_init_script_loads_modules_in_order_and_names_port() -> None:
    init = render_init()
    assert init.startswith("#!/bin/busybox sh\n")
    assert " ".join(MODULE_ORDER) in init
    assert MODULE_ORDER[:6] == ("virtio_ring", "virtio", "virtio_pci_legacy_dev",
                                "virtio_pci_modern_dev", "virtio_pci", "virtio_balloon")
    assert AGENT_PORT_NAME in init and READY_MARKER in init
    assert "@" not in init.replace("$@", "")  # every placeholder filled
    for proc_file in ("/proc/meminfo", "/proc/pressure/memory", "/proc/vmstat", "/proc/uptime"):
        assert proc_file in init


def test_static_elf_check(tmp_path: Path) -> None:
    dynamic = Path("/bin/sh").resolve()
    assert not is_static_elf(dynamic)  # dash links libc
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    assert not is_static_elf(text)
    assert not is_static_elf(tmp_path / "missing")
    if BUSYBOX_PATH.exists():
        assert is_static_elf(BUSYBOX_PATH)


def test_missing_busybox_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(HostToolMissingError, match="busybox-static"):
        build_guest_image(tmp_path, busybox=tmp_path / "busybox", kernel_package="linux-image-x")


def test_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HostToolMissingError, match="static"):
        build_guest_image(tmp_path, busybox=Path("/bin/sh"), kernel_package="linux-image-x")


def test_missing_apt_names_what_to_do(tmp_path: Path) -> None:
    if not is_static_elf(BUSYBOX_PATH):
        pytest.skip("needs busybox-static first")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    with pytest.raises(HostToolMissingError, match="apt-cache"):
        build_guest_image(tmp_path, search_path=str(empty))
    with pytest.raises(HostToolMissingError, match="apt-get") as info:
        build_guest_image(tmp_path, search_path=str(empty),
                          kernel_package="linux-image-6.1.0-0-cloud-amd64")
    assert "install-qemu-deps" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_kernel_version_of() -> None:
    assert kernel_version_of("linux-image-6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"
    with pytest.raises(GuestImageError):
        kernel_version_of("busybox")


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMBALLOON_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "guest-image"


# --- the real build (needs apt and busybox-static: installed with QEMU) ----------------


@pytest.mark.qemu
def test_resolve_kernel_package_with_apt() -> None:
    package = resolve_kernel_package()
    assert package.startswith("linux-image-") and package.endswith("-cloud-amd64")
    assert package != KERNEL_METAPACKAGE


@pytest.mark.qemu
def test_real_build_and_cache(tmp_path: Path) -> None:
    shared = build_guest_image()  # the shared cache: downloads the kernel once per host
    assert shared.vmlinuz.stat().st_size > 5_000_000
    # a fresh directory that reuses the downloaded .deb: unpacks and builds from scratch
    debs = tmp_path / "debs"
    debs.mkdir()
    for deb in (shared.vmlinuz.parent.parent / "debs").glob("*.deb"):
        os.link(deb, debs / deb.name)
    image = build_guest_image(tmp_path)
    assert image.kernel_version == shared.kernel_version
    assert image.vmlinuz.read_bytes() == shared.vmlinuz.read_bytes()
    entries = parse_newc(gzip.decompress(image.initramfs.read_bytes()))
    assert entries["init"][1].decode() == render_init()
    for name in MODULE_ORDER:
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"
    assert len(image.initramfs.read_bytes()) < 3_000_000
    stamp = image.initramfs.stat().st_mtime_ns
    again = build_guest_image(tmp_path)  # a cache hit rebuilds nothing
    assert again == image and again.initramfs.stat().st_mtime_ns == stamp


@pytest.mark.qemu
def test_unknown_kernel_package_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError, match=r"linux-image-0\.0\.0-nonexistent"):
        build_guest_image(tmp_path, kernel_package="linux-image-0.0.0-nonexistent")


def test_initramfs_extra_files_get_their_directories() -> None:
    modules = {name: b"m" for name in MODULE_ORDER}
    blob = build_initramfs(b"BB", modules, "#!/bin/sh\n",
                           {"usr/sbin/qemu-ga": (b"QGA", 0o755),
                            "lib64/ld-linux-x86-64.so.2": (b"LD", 0o755)})
    entries = parse_newc(gzip.decompress(blob))
    for d in ("usr", "usr/sbin", "lib64"):
        assert stat.S_ISDIR(entries[d][0])
    assert entries["usr/sbin/qemu-ga"][1] == b"QGA" and entries["usr/sbin/qemu-ga"][0] & 0o111
    assert "@" not in render_init().replace("$@", "") and QGA_PORT_NAME in render_init()


def test_shared_libraries_of_a_dynamic_binary() -> None:
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this host")
    libs = shared_libraries(Path(shutil.which("ls") or "/bin/ls"))
    assert any("libc.so" in k for k in libs) and any("ld-linux" in k for k in libs)
    assert all(p.is_file() for p in libs.values())


@pytest.mark.qemu
def test_real_build_with_the_qemu_guest_agent(tmp_path: Path) -> None:
    image = build_guest_image(qga=True)
    assert image.initramfs.name.startswith("initramfs-qga-")
    entries = parse_newc(gzip.decompress(image.initramfs.read_bytes()))
    assert entries["usr/sbin/qemu-ga"][1][:4] == b"\x7fELF"
    assert any(k.startswith("lib64/ld-linux") for k in entries)
    plain = build_guest_image()  # the other variant is kept, not taken for stale
    assert plain.initramfs.exists() and image.initramfs.exists()
