"""The QEMU launcher: command line and config checks, then real guests (TCG) end to end.

The ``qemu`` tests boot the real Debian cloud kernel with the real virtio_balloon driver and
drive it over QMP; scripts/install-qemu-deps.sh installs QEMU where it is missing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB, PAGE_SIZE
from memballoon.qemu.agent import AgentChannel
from memballoon.qemu.errors import GuestBootError, GuestGoneError, HostToolMissingError
from memballoon.qemu.image import GuestImage, build_guest_image
from memballoon.qemu.launch import (
    QemuGuest,
    _probe_key,
    build_command,
    choose_accel,
    find_qemu,
    launch,
    launch_and_attach,
    probe_kvm,
)

FAKE_IMAGE = GuestImage("6.1.0-0-test", Path("/img/vmlinuz"), Path("/img/initramfs.cpio.gz"))


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_command_line() -> None:
    g = QemuGuest("vm1", max_mib=1024, start_mib=512, deflate_on_oom=True)
    argv = build_command(g, FAKE_IMAGE, Path("/run/vm1"), "tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert arg_after(argv, "-accel") == ["tcg"] and arg_after(argv, "-m") == ["1024"]
    assert "-nodefaults" in argv and "-no-reboot" in argv  # no NIC: no network in the guest
    assert arg_after(argv, "-display") == ["none"]
    assert arg_after(argv, "-kernel") == ["/img/vmlinuz"]
    assert arg_after(argv, "-initrd") == ["/img/initramfs.cpio.gz"]
    assert "console=ttyS0" in arg_after(argv, "-append")[0]
    devices = arg_after(argv, "-device")
    assert ("virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=off"
            in devices)
    assert "virtserialport,bus=vser0.0,chardev=agent0,name=org.memballoon.agent" in devices
    assert arg_after(argv, "-chardev") == [
        "socket,id=agent0,path=/run/vm1/agent.sock,server=on,wait=off"]
    assert arg_after(argv, "-qmp") == ["unix:/run/vm1/qmp.sock,server=on,wait=off"]
    assert arg_after(argv, "-serial") == ["file:/run/vm1/console.log"]
    assert "-object" not in argv


def test_command_line_memfd_and_kvm() -> None:
    g = QemuGuest("vm2", max_mib=2048, memfd=True, free_page_reporting=True, quiet=False)
    argv = build_command(g, FAKE_IMAGE, Path("/r"), "kvm")
    assert arg_after(argv, "-accel") == ["kvm"]
    assert arg_after(argv, "-object") == ["memory-backend-memfd,id=ram0,size=2048M,share=on"]
    assert arg_after(argv, "-machine") == ["memory-backend=ram0"]
    assert "free-page-reporting=on" in arg_after(argv, "-device")[0]
    assert "quiet" not in arg_after(argv, "-append")[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad name"},
        {"name": ""},
        {"name": "x", "max_mib": 32},
        {"name": "x", "max_mib": 512, "start_mib": 1024},
        {"name": "x", "start_mib": 10},
        {"name": "x", "cpus": 0},
        {"name": "x", "accel": "xen"},
    ],
)
def test_bad_config_is_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        QemuGuest(**kwargs)  # type: ignore[arg-type]


def test_sizes() -> None:
    g = QemuGuest("x", max_mib=1024, start_mib=256)
    assert g.ram_bytes == 1024 * MIB and g.start_bytes == 256 * MIB
    assert QemuGuest("y", max_mib=512).start_bytes == 512 * MIB


def test_qemu_not_installed_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(HostToolMissingError, match="install-qemu-deps"):
        launch(QemuGuest("x", qemu_binary="qemu-system-nonexistent"), FAKE_IMAGE, tmp_path)


@pytest.mark.qemu
def test_missing_image_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guest-image build"):
        launch(QemuGuest("x", accel="tcg"), FAKE_IMAGE, tmp_path)


@pytest.mark.qemu
def test_run_dir_too_long_for_sockets(tmp_path: Path) -> None:
    image = build_guest_image()
    with pytest.raises(ConfigError, match="too long"):
        launch(QemuGuest("x", accel="tcg"), image, tmp_path / ("d" * 110))


@pytest.mark.qemu
def test_forced_accel_and_cached_probe_verdict(tmp_path: Path) -> None:
    image = build_guest_image()
    cache = tmp_path / "probe.json"
    assert choose_accel("tcg", image, probe_cache=cache) == "tcg"
    assert choose_accel("kvm", image, probe_cache=cache) == "kvm"
    assert not cache.exists()  # forcing never probes
    key = _probe_key(image, find_qemu())
    cache.write_text(json.dumps({key: True}))
    if Path("/dev/kvm").exists():
        assert probe_kvm(image, cache_file=cache) is True  # the cached verdict, no boot
        cache.write_text(json.dumps({key: False}))
        assert choose_accel("auto", image, probe_cache=cache) == "tcg"


@pytest.mark.qemu
def test_qemu_that_exits_during_boot_is_a_boot_error(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"not a kernel" * 100)
    image = GuestImage("junk", junk, junk)
    with launch(QemuGuest("junk", accel="tcg"), image, tmp_path / "run") as proc:
        with pytest.raises(GuestBootError, match="exited"):
            proc.wait_ready(30)
        with pytest.raises(GuestGoneError):
            proc.rss_bytes()


# --- real guests ---------------------------------------------------------------------


@pytest.mark.qemu
def test_balloon_1gib_guest_to_512mib_and_back(tmp_path: Path) -> None:
    """(a) of issue 5: the guest's MemTotal and QEMU's RSS both show the balloon."""
    image = build_guest_image()

    async def main() -> None:
        counters = Counters()
        guest = QemuGuest("e2e-a", max_mib=1024, accel="tcg")  # deflate-on-oom off
        proc, qmp = await launch_and_attach(guest, image, tmp_path / "run", counters=counters,
                                            timeout_s=10)
        agent = AgentChannel(proc.agent_path, guest=guest.name, counters=counters)
        try:
            assert proc.accel == "tcg"
            await proc.wait_ready_async(60)
            await agent.connect(wait_s=5)
            first = await agent.read_report(10)
            assert first.mem_total_bytes is not None
            total0 = first.mem_total_bytes
            assert 900 * MIB < total0 <= 1024 * MIB
            assert await qmp.query_balloon() == 1024 * MIB
            assert await qmp.balloon_pages() == 0

            # The guest touches 700 MiB and frees it again: QEMU now holds that RAM.
            await agent.send_command("hog 700")
            await proc.wait_for_console_async("MEMBALLOON-HOG 700 rc=0", 90)
            await agent.send_command("unhog")
            await proc.wait_for_console_async("MEMBALLOON-UNHOG", 30)
            rss_full = proc.rss_bytes()
            assert rss_full > 700 * MIB

            await qmp.set_logical_size(512 * MIB)
            assert abs(await qmp.wait_logical_size(512 * MIB, timeout_s=60) - 512 * MIB) \
                <= 4 * MIB
            assert abs(await qmp.balloon_pages() - 512 * MIB // PAGE_SIZE) <= 1024
            shrunk = await agent.wait_for(
                lambda r: r.mem_total_bytes is not None
                and r.mem_total_bytes <= total0 - 500 * MIB, 15)
            assert shrunk.oom_kills == 0
            rss_inflated = proc.rss_bytes()
            assert rss_full - rss_inflated >= 256 * MIB, (rss_full, rss_inflated)

            await qmp.set_logical_size(1024 * MIB)
            assert await qmp.wait_logical_size(1024 * MIB, timeout_s=60, tolerance_bytes=0) \
                == 1024 * MIB
            back = await agent.wait_for(
                lambda r: r.mem_total_bytes is not None
                and r.mem_total_bytes >= total0 - 4 * MIB, 15)
            assert back.oom_kills == 0
            assert qmp.last_change_bytes is not None  # BALLOON_CHANGE hints arrived
        finally:
            await agent.close()
            await qmp.close()
            proc.close()
        for bad in ("qmp_bad_reply", "qmp_timeout", "agent_bad_json", "agent_bad_value",
                    "agent_bad_schema", "agent_line_too_long"):
            assert counters[bad] == 0, counters

    asyncio.run(main())


@pytest.mark.qemu
def test_preinflated_guest_with_auto_accel_then_qemu_killed(tmp_path: Path) -> None:
    """A guest booted at max RAM, ballooned down to its start size; then QEMU is killed."""
    image = build_guest_image()

    async def main() -> None:
        counters = Counters()
        guest = QemuGuest("e2e-k", max_mib=768, start_mib=384, accel="auto",
                          deflate_on_oom=True, free_page_reporting=True)
        proc, qmp = await launch_and_attach(guest, image, tmp_path / "run", counters=counters,
                                            timeout_s=10, probe_cache=tmp_path / "probe.json")
        agent = AgentChannel(proc.agent_path, guest=guest.name, counters=counters)
        try:
            assert proc.accel in ("kvm", "tcg")
            verdicts = json.loads((tmp_path / "probe.json").read_text())
            assert list(verdicts.values()) in ([True], [False])
            assert proc.accel == ("kvm" if list(verdicts.values()) == [True] else "tcg")
            await proc.wait_ready_async(60)
            assert await qmp.wait_logical_size(384 * MIB, timeout_s=60) - 384 * MIB <= 4 * MIB
            assert abs(await qmp.balloon_pages() - (768 - 384) * MIB // PAGE_SIZE) <= 1024

            await qmp.enable_stats(1)
            stats = await qmp.guest_stats()
            for _ in range(50):
                if stats.total_bytes is not None:
                    break
                await asyncio.sleep(0.2)
                stats = await qmp.guest_stats()
            assert stats.total_bytes is not None and stats.last_update_s > 0
            assert stats.free_bytes is not None and stats.free_bytes < stats.total_bytes

            await agent.connect(wait_s=5)
            report = await agent.read_report(10)
            assert report.mem_total_bytes is not None

            proc.kill()  # QEMU dies mid-run
            with pytest.raises(GuestGoneError):
                await qmp.query_balloon()
            with pytest.raises(GuestGoneError):
                while True:
                    await agent.read_report(10)
            with pytest.raises(GuestGoneError):
                proc.rss_bytes()
        finally:
            await agent.close()
            await qmp.close()
            proc.close()
        assert counters["qmp_connect_failed"] >= 1 and counters["agent_eof"] == 1

    asyncio.run(main())
