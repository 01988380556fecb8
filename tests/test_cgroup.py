"""Memory cgroups: detection, file formats of both hierarchies, and a real OOM kill at the limit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memballoon.host.cgroup import (
    Budget,
    BudgetMode,
    CgroupSupport,
    Hierarchy,
    MemoryCgroup,
    detect,
    make_budget,
)
from memballoon.host.memfd import MemfdRam
from memballoon.model.errors import ConfigError, MemballoonError
from memballoon.model.units import MIB, PAGE_SIZE

SUPPORT = detect()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.usable, reason=f"needs root and a memory cgroup: {SUPPORT.reason}"
)


# ------------------------------------------------------------------ detection (fake mount tables)
def _mounts(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "mounts"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_detect_finds_v1_memory(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    mem.mkdir()
    m = _mounts(
        tmp_path,
        [
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0",
            "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0",
            f"cgroup {mem} cgroup rw,relatime,memory 0 0",
        ],
    )
    s = detect(mounts=m, euid=0)
    assert (s.hierarchy, s.root, s.usable) == (Hierarchy.V1, mem, True)


def test_detect_prefers_v2_with_the_memory_controller(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu io memory pids\n")
    m = _mounts(
        tmp_path,
        [f"cgroup {tmp_path}/memory cgroup rw,memory 0 0", f"cgroup2 {unified} cgroup2 rw 0 0"],
    )
    assert detect(mounts=m, euid=0).hierarchy is Hierarchy.V2


def test_detect_ignores_a_v2_mount_without_memory(tmp_path: Path) -> None:
    # This project's machines: v1 memory, and a v2 "unified" mount holding only hugetlb.
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    m = _mounts(
        tmp_path,
        [f"cgroup2 {unified} cgroup2 rw 0 0", f"cgroup {tmp_path}/mem cgroup rw,memory 0 0"],
    )
    s = detect(mounts=m, euid=0)
    assert (s.hierarchy, s.root) == (Hierarchy.V1, tmp_path / "mem")


def test_detect_without_memory_cgroup_or_root_says_why(tmp_path: Path) -> None:
    m = _mounts(tmp_path, ["proc /proc proc rw 0 0"])
    s = detect(mounts=m, euid=0)
    assert s.hierarchy is Hierarchy.NONE and not s.usable and "no memory cgroup" in s.reason
    m = _mounts(tmp_path, [f"cgroup {tmp_path} cgroup rw,memory 0 0"])
    s = detect(mounts=m, euid=1000)
    assert s.hierarchy is Hierarchy.V1 and not s.usable and "not root" in s.reason
    s = detect(mounts=tmp_path / "missing", euid=0)
    assert s.hierarchy is Hierarchy.NONE and "cannot read" in s.reason


def test_watched_budget_when_no_cgroup_can_be_made() -> None:
    s = CgroupSupport(Hierarchy.NONE, None, True, "no memory cgroup is mounted")
    b = make_budget("x", 64 * MIB, support=s)
    assert b == Budget(64 * MIB, BudgetMode.WATCHED, "no memory cgroup is mounted")
    assert not b.enforced and b.cgroup is None
    assert "only watched" in b.describe() and "64 MiB" in b.describe()


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "x" * 101, "a b"])
def test_bad_names_and_limits_are_config_errors(name: str) -> None:
    s = CgroupSupport(Hierarchy.V1, Path("/nonexistent"), True, "")
    with pytest.raises(ConfigError):
        MemoryCgroup.create(name, MIB, support=s)
    with pytest.raises(ConfigError):
        MemoryCgroup.create("ok", 0, support=s)
    with pytest.raises(ConfigError):
        make_budget("ok", -1, support=s)


def test_create_without_a_hierarchy_is_a_config_error() -> None:
    s = CgroupSupport(Hierarchy.NONE, None, True, "no memory cgroup is mounted")
    with pytest.raises(ConfigError, match="no memory cgroup"):
        MemoryCgroup.create("ok", MIB, support=s)


# ------------------------------------------------------------------ file formats (fake trees)
def test_v1_files_are_written_and_read(tmp_path: Path) -> None:
    s = CgroupSupport(Hierarchy.V1, tmp_path, True, "")
    cg = MemoryCgroup.create("g", 64 * MIB, support=s)
    assert (tmp_path / "g" / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    (cg.path / "memory.usage_in_bytes").write_text("4096\n")
    (cg.path / "memory.max_usage_in_bytes").write_text("8192\n")
    (cg.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (cg.path / "cgroup.procs").write_text("12\n34\n")
    assert (cg.usage_bytes(), cg.max_usage_bytes(), cg.oom_kills()) == (4096, 8192, 3)
    assert cg.read_limit_bytes() == 64 * MIB
    assert cg.pids() == [12, 34]


def test_v2_files_are_written_and_read(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    s = CgroupSupport(Hierarchy.V2, tmp_path, True, "")
    cg = MemoryCgroup.create("g", 64 * MIB, support=s)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"
    assert (cg.path / "memory.max").read_text() == str(64 * MIB)
    assert not (cg.path / "memory.swap.max").exists()  # only set where the kernel has it
    (cg.path / "memory.current").write_text("4096\n")
    (cg.path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    assert cg.max_usage_bytes() is None  # no memory.peak before Linux 5.19
    (cg.path / "memory.peak").write_text("12288\n")
    (cg.path / "memory.max").write_text("max\n")
    assert (cg.usage_bytes(), cg.max_usage_bytes(), cg.oom_kills()) == (4096, 12288, 2)
    assert cg.read_limit_bytes() == -1


def test_v2_sets_swap_max_to_zero_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    real_mkdir = Path.mkdir

    def kernel_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self)  # the kernel fills a new cgroup directory with its files
        (self / "memory.swap.max").write_text("max\n")

    monkeypatch.setattr(Path, "mkdir", kernel_mkdir)
    s = CgroupSupport(Hierarchy.V2, tmp_path, True, "")
    cg = MemoryCgroup.create("g", MIB, support=s)
    assert (cg.path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "memory\n"  # already delegated


def test_a_stale_directory_is_reused_only_when_it_can_go(tmp_path: Path) -> None:
    s = CgroupSupport(Hierarchy.V1, tmp_path, True, "")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "cgroup.procs").write_text("4242\n")
    with pytest.raises(ConfigError, match="has tasks"):
        MemoryCgroup.create("g", MIB, support=s)
    (tmp_path / "g" / "cgroup.procs").write_text("\n")
    # A real cgroup directory with no tasks can be removed; a plain one with files cannot.
    with pytest.raises(MemballoonError, match="stale"):
        MemoryCgroup.create("g", MIB, support=s)
    (tmp_path / "g" / "cgroup.procs").unlink()
    assert MemoryCgroup.create("g", MIB, support=s).path.is_dir()


def test_garbage_in_a_cgroup_file_is_a_typed_error(tmp_path: Path) -> None:
    s = CgroupSupport(Hierarchy.V1, tmp_path, True, "")
    cg = MemoryCgroup.create("g", MIB, support=s)
    (cg.path / "memory.usage_in_bytes").write_text("lots\n")
    with pytest.raises(MemballoonError, match="not a number"):
        cg.usage_bytes()
    with pytest.raises(MemballoonError):
        cg.max_usage_bytes()  # file missing


# ------------------------------------------------------------------ the real thing (root only)
@pytest.fixture
def cgroup64() -> Iterator[MemoryCgroup]:
    cg = MemoryCgroup.create(f"memballoon-test-{os.getpid()}", 64 * MIB, support=SUPPORT)
    try:
        yield cg
    finally:
        for pid in cg.pids():  # anything a failed test left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        cg.remove()
    assert not cg.path.exists()


@needs_cgroup
def test_real_cgroup_holds_the_limit_and_tasks(cgroup64: MemoryCgroup) -> None:
    assert cgroup64.read_limit_bytes() == 64 * MIB
    assert cgroup64.oom_kills() == 0
    child = subprocess.Popen(["sleep", "30"])
    try:
        cgroup64.add(child.pid)
        assert cgroup64.pids() == [child.pid]
        assert cgroup64.usage_bytes() >= 0
        cgroup64.remove()  # moves the live task out first
        assert not cgroup64.path.exists()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


@needs_cgroup
def test_adding_a_missing_process_is_a_typed_error(cgroup64: MemoryCgroup) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(MemballoonError):
        cgroup64.add(child.pid)


@needs_cgroup
def test_make_budget_enforces_with_a_cgroup() -> None:
    b = make_budget(f"memballoon-budget-{os.getpid()}", 32 * MIB, support=SUPPORT)
    try:
        assert b.enforced and b.cgroup is not None and b.cgroup.path.is_dir()
        assert "enforced" in b.describe()
    finally:
        if b.cgroup is not None:
            b.cgroup.remove()


_TOUCHER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from memballoon.host.memfd import MemfdRam

    fd, pages = int(sys.argv[1]), int(sys.argv[2])
    ram = MemfdRam.attach(fd, pages)
    sys.stdin.readline()  # wait until the host has put us in the cgroup
    for lo in range(0, pages, 256):  # 1 MiB at a time, like a workload growing
        ram.touch(np.arange(lo, lo + 256, dtype=np.int64), 1)
    print("survived", flush=True)
    """
)


@needs_cgroup
def test_a_guest_touching_past_the_limit_is_oom_killed(cgroup64: MemoryCgroup) -> None:
    pages = 128 * MIB // PAGE_SIZE
    with MemfdRam(pages, name="oom-guest") as ram:
        child = subprocess.Popen(
            [sys.executable, "-c", _TOUCHER, str(ram.fd), str(pages)],
            pass_fds=(ram.fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            cgroup64.add(child.pid)
            out, _ = child.communicate("go\n", timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -9, out
        assert "survived" not in out
        assert cgroup64.oom_kills() >= 1
        # The memory the guest did touch is charged to its cgroup (shmem: first toucher),
        # and never more than the limit.
        assert 0 < ram.resident_bytes() <= 64 * MIB
        peak = cgroup64.max_usage_bytes()
        assert peak is None or peak <= 64 * MIB
        assert np.count_nonzero(ram.resident_mask(np.arange(pages))) * PAGE_SIZE == (
            ram.resident_bytes()
        )


@needs_cgroup
def test_clean_stale_removes_only_empty_cgroups_of_creators_that_are_gone() -> None:
    from memballoon.host.cgroup import clean_stale

    assert SUPPORT.root is not None
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text())  # no process has it
    empty = SUPPORT.root / f"memballoon-{dead_pid}-empty"
    busy = SUPPORT.root / f"memballoon-qemu-{dead_pid + 1}"
    mine = SUPPORT.root / f"memballoon-{os.getpid()}-live"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for d in (empty, empty / "guest-a", busy, mine):
            d.mkdir()
        (busy / "cgroup.procs").write_text(str(sleeper.pid))
        done = clean_stale(SUPPORT)
        assert str(empty) in done.removed and not empty.exists()
        assert any(str(busy) in k for k in done.kept) and busy.exists()
        assert mine.exists() and str(mine) not in done.removed  # its creator lives
        assert "removed" in done.describe()
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in (empty, busy, mine):
            MemoryCgroup(SUPPORT.hierarchy, SUPPORT.root, d.name, None).remove()
