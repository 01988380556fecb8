"""Host memory probes over recorded /proc and cgroup trees, and over this machine's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from memballoon.edge.hostmem import CgroupProbe, ProcProbe, make_probe
from memballoon.model.errors import ConfigError
from memballoon.protocol.procfs import HostMemoryError

GIB = 1 << 30


def fake_proc(tmp: Path, *, psi: bool = True, avail_kib: int = 6 * 1024 * 1024) -> Path:
    proc = tmp / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {8 * 1024 * 1024} kB\n"
                                  f"MemAvailable: {avail_kib} kB\n")
    if psi:
        (proc / "pressure" / "memory").write_text(
            "some avg10=12.00 avg60=3.00 avg300=1.00 total=99\n"
            "full avg10=2.00 avg60=0.00 avg300=0.00 total=9\n")
    return proc


def test_proc_probe_reads_meminfo_and_psi(tmp_path: Path) -> None:
    m = ProcProbe(fake_proc(tmp_path)).read()
    assert (m.total_bytes, m.available_bytes) == (8 * GIB, 6 * GIB)
    assert m.psi is not None and m.psi.some_avg10 == 12.0 and m.psi.full_avg10 == 2.0


def test_an_old_kernel_without_psi_still_gives_memory(tmp_path: Path) -> None:
    m = ProcProbe(fake_proc(tmp_path, psi=False)).read()
    assert m.psi is None and m.available_bytes == 6 * GIB


def test_cgroup_v2_limit_usage_and_its_own_pressure(tmp_path: Path) -> None:
    cg = tmp_path / "machine.slice"
    cg.mkdir()
    (cg / "memory.current").write_text(f"{3 * GIB}\n")
    (cg / "memory.max").write_text(f"{4 * GIB}\n")
    (cg / "memory.pressure").write_text("some avg10=0.50 avg60=0 avg300=0 total=1\n")
    m = CgroupProbe(cg, machine=ProcProbe(fake_proc(tmp_path))).read()
    assert (m.total_bytes, m.available_bytes) == (4 * GIB, 1 * GIB)
    assert m.psi is not None and m.psi.some_avg10 == 0.5 and "cgroup v2" in m.source
    (cg / "memory.max").write_text("max\n")  # no limit: the machine bounds it
    m = CgroupProbe(cg, machine=ProcProbe(fake_proc(tmp_path / "b"))).read()
    assert (m.total_bytes, m.available_bytes) == (8 * GIB, 6 * GIB) and "no limit" in m.source


def test_cgroup_v1_drops_inactive_cache_and_is_bounded_by_the_machine(tmp_path: Path) -> None:
    cg = tmp_path / "memory" / "machine.slice"
    cg.mkdir(parents=True)
    (cg / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (cg / "memory.limit_in_bytes").write_text(f"{16 * GIB}\n")
    (cg / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {GIB}\n")
    machine = ProcProbe(fake_proc(tmp_path, avail_kib=1024 * 1024))  # 1 GiB left
    m = CgroupProbe(cg, machine=machine).read()
    assert m.total_bytes == 8 * GIB  # its limit is beyond the machine
    assert m.available_bytes == 1 * GIB  # the machine has less left than the cgroup may take
    assert m.psi is not None and m.psi.some_avg10 == 12.0  # v1 has none: the machine's


def test_a_missing_cgroup_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(HostMemoryError, match=r"machine\.slice"):
        CgroupProbe(tmp_path / "nope")
    with pytest.raises(ConfigError, match="host_cgroup"):
        make_probe(tmp_path / "nope")


def test_this_machine() -> None:
    probe, what = make_probe()
    m = probe.read()
    assert 0 < m.available_bytes <= m.total_bytes and "host memory from /proc/meminfo" in what
