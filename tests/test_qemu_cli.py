"""``memballoon guest-image build`` and ``vm start|list|stop``: with no manager, and with a
control server whose ``register_qemu`` attaches the VM to a real QemuBackend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from memballoon.app.control import ControlServer
from memballoon.cli import main
from memballoon.model.units import MIB, PAGE_SIZE
from memballoon.qemu.backend import QemuBackend


def test_bad_sizes_and_unknown_vm_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["vm", "start", "--name", "x", "--mib", "512", "--max-mib", "256",
                 "--run-dir", str(tmp_path)]) == 2
    assert "--max-mib 256 is below --mib 512" in capsys.readouterr().err
    assert main(["vm", "stop", "ghost", "--run-dir", str(tmp_path)]) == 2
    assert "no VM named 'ghost'" in capsys.readouterr().err
    assert main(["vm", "list", "--run-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit):
        main(["vm", "start", "--name", "x", "--mib", "0"])


@pytest.mark.qemu
def test_guest_image_build_prints_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guest-image", "build", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["vmlinuz"]).is_file() and Path(out["initramfs"]).is_file()
    assert out["kernel_version"] in out["vmlinuz"]


def _wait_gone(pid: int) -> bool:
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


@pytest.mark.qemu
def test_vm_start_without_manager_leaves_vm_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rd = tmp_path / "vms"
    rc = main(["vm", "start", "--name", "lone", "--mib", "256", "--max-mib", "512",
               "--accel", "tcg", "--run-dir", str(rd), "--socket", str(tmp_path / "none.sock"),
               "--json"])
    cap = capsys.readouterr()
    info = json.loads(cap.out)
    try:
        assert rc == 0 and info["registered"] is False
        assert "no memballoon daemon" in cap.err and info["qmp"] in cap.err
        assert "accel tcg" in cap.err and "ballooned to 256 MiB" in cap.err
        assert info["ram_bytes"] == 512 * MIB and info["start_bytes"] == 256 * MIB
        assert main(["vm", "list", "--run-dir", str(rd), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(v["name"], v["running"]) for v in listed] == [("lone", True)]
        assert main(["vm", "start", "--name", "lone", "--mib", "256", "--accel", "tcg",
                     "--run-dir", str(rd)]) == 2
        assert "already runs" in capsys.readouterr().err
    finally:
        assert main(["vm", "stop", "lone", "--run-dir", str(rd)]) == 0
    assert _wait_gone(info["pid"])


class _Target:
    """The daemon side of register_qemu, as the manager does it: attach to the backend."""

    def __init__(self, backend: QemuBackend) -> None:
        self.backend = backend

    async def op_register_qemu(self, name: str, qmp: str, agent: str | None,
                               ram_bytes: int) -> dict[str, Any]:
        await self.backend.attach(name, qmp, agent, ram_bytes)
        return {"name": name}

    async def op_status(self) -> dict[str, Any]:
        return {}

    async def op_set(self, guest: str, size: str | int, force: bool = False) -> dict[str, Any]:
        return {}

    async def op_journal(self, last: int | None, guest: str | None) -> list[dict[str, Any]]:
        return []

    async def op_shutdown(self) -> dict[str, Any]:
        return {}


@pytest.mark.qemu
def test_vm_start_registers_with_manager_and_backend_drives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rd = tmp_path / "vms"
    sock = tmp_path / "ctl" / "memballoon.sock"

    async def scenario() -> dict[str, Any]:
        backend = QemuBackend()
        server = ControlServer(_Target(backend), sock)  # type: ignore[arg-type]
        await server.start()
        try:
            rc = await asyncio.to_thread(
                main, ["vm", "start", "--name", "reg", "--mib", "384", "--max-mib", "512",
                       "--accel", "tcg", "--deflate-on-oom", "--run-dir", str(rd),
                       "--socket", str(sock), "--json"])
            assert rc == 0
            target = 128 * MIB // PAGE_SIZE
            for _ in range(300):
                snap = await backend.poll()
                if snap["reg"].report is not None and \
                        abs(snap["reg"].balloon_pages - target) <= 256:
                    break
                await asyncio.sleep(0.1)
            st = snap["reg"]
            assert st.alive and st.ram_pages == 512 * MIB // PAGE_SIZE
            assert abs(st.balloon_pages - target) <= 256
            assert st.report is not None and st.report.guest == "reg"
            assert st.resident_bytes is not None and st.resident_bytes > 0
            assert await backend.apply_target("reg", 0)
            for _ in range(300):
                if (await backend.poll())["reg"].balloon_pages <= 256:
                    break
                await asyncio.sleep(0.1)
            assert (await backend.poll())["reg"].balloon_pages <= 256
            return json.loads(capsys.readouterr().out)
        finally:
            await backend.close()  # attached, not launched: QEMU keeps running
            await server.close()

    info: dict[str, Any] = {}
    try:
        info = asyncio.run(scenario())
        assert info["registered"] is True
    finally:
        main(["vm", "stop", "reg", "--run-dir", str(rd)])
    assert info and _wait_gone(info["pid"])


@pytest.mark.qemu
def test_vm_xml_prints_a_domain_for_virsh(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from memballoon.qemu.libvirt_backend import parse_domain_xml

    assert main(["vm", "xml", "--name", "web1", "--mib", "384", "--max-mib", "512",
                 "--agent", str(tmp_path / "a.sock"), "--qga"]) == 0
    xml = capsys.readouterr().out
    info = parse_domain_xml(xml)
    assert info.balloon and info.qga and info.agent_path == str(tmp_path / "a.sock")
    assert "<currentMemory unit='MiB'>384</currentMemory>" in xml and "initramfs-qga-" in xml
    assert main(["vm", "xml", "--name", "x", "--mib", "512", "--max-mib", "256"]) == 2
    assert "--max-mib 256 is below --mib 512" in capsys.readouterr().err
