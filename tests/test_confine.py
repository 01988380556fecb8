"""Confining a guest process: uids, the way to Python through closed directories, the child's
set-up between fork and exec (run in real children)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memballoon.local.confine import (
    GUEST_UID_BASE,
    MAX_GUEST_UID,
    UIDS_PER_HOST,
    dumpable,
    guest_uids,
    needed_paths,
    plan_reach,
    preexec,
    set_dumpable,
)
from memballoon.model.errors import ConfigError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid, mount namespace)")

_PROBE = """
import json, os
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"ids": os.getresuid() + os.getresgid(), "groups": os.getgroups(),
                  "nnp": status["NoNewPrivs"].strip(), "root": sorted(os.listdir("/root"))
                  if os.path.isdir("/root") and os.access("/root", os.R_OK) else None}))
"""


def test_each_host_gets_its_own_block_of_uids() -> None:
    assert guest_uids(3, 100_000, 1) == [100_000, 100_001, 100_002]
    a, b = guest_uids(2, None, 4242), guest_uids(2, None, 4243)
    assert a[0] == GUEST_UID_BASE + 4242 * UIDS_PER_HOST and b[0] - a[0] == UIDS_PER_HOST
    assert a[-1] < b[0]  # no uid shared by two hosts
    assert guest_uids(1, None, 2**22)[0] <= MAX_GUEST_UID


@pytest.mark.parametrize(("n", "base"), [(UIDS_PER_HOST + 1, None), (1, 0), (1, 999),
                                         (2, MAX_GUEST_UID)])
def test_uids_out_of_range_are_config_errors(n: int, base: int | None) -> None:
    with pytest.raises(ConfigError, match="guest_uid_base"):
        guest_uids(n, base, 1)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory others can search (pytest's tmp_path sits under closed ones)."""
    d = Path(tempfile.mkdtemp(prefix="memballoon-confine-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(d)


def test_a_closed_directory_on_the_way_is_planned_with_only_the_entries_needed(
        open_tmp: Path) -> None:
    tmp_path = open_tmp
    closed = tmp_path / "home"
    (closed / "py" / "bin").mkdir(parents=True)
    (closed / "secret").mkdir()
    tool = closed / "py" / "bin" / "tool"
    tool.write_text("")
    tmp_path.chmod(0o755)
    closed.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(closed / "py")
    plan = plan_reach([str(link / "bin" / "tool"), str(tool)])
    assert plan == ((str(closed), ("py",)),)
    (closed / "py").chmod(0o700)  # a second closed directory further down: cannot be opened
    with pytest.raises(ConfigError, match="both closed"):
        plan_reach([str(tool)])
    (closed / "py").chmod(0o755)
    assert plan_reach([str(tmp_path)]) == ()


def test_the_interpreter_and_import_paths_are_needed() -> None:
    need = needed_paths(["/bin/sh", "-c", "x"])
    assert sys.executable in need and "/bin/sh" in need and "-c" not in need
    assert all(os.path.isabs(p) for p in need)


@root_only
def test_the_child_drops_to_its_uid_without_groups_or_new_privileges_and_reaches_python(
) -> None:
    uid = GUEST_UID_BASE + 7
    reach = plan_reach(needed_paths())
    out = subprocess.run([sys.executable, "-c", _PROBE], preexec_fn=preexec(None, uid, reach),
                         capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    assert got["ids"] == [uid] * 6 and got["groups"] == [] and got["nnp"] == "1"
    if reach:  # a closed directory (pyenv under /root) shows only what leads to Python
        assert got["root"] is None or all(
            any(d == "/root" and n in names for d, names in reach) for n in got["root"])
    # the host's own mount table is untouched
    assert "memballoon-reach" not in Path("/proc/self/mountinfo").read_text()


@root_only
def test_a_child_that_cannot_be_confined_is_not_started(tmp_path: Path) -> None:
    bad = os.open(tmp_path / "not-a-cgroup", os.O_RDONLY | os.O_CREAT, 0o600)  # write fails
    try:
        with pytest.raises(subprocess.SubprocessError):
            subprocess.run(["/bin/true"], preexec_fn=preexec(bad, GUEST_UID_BASE + 8))
    finally:
        os.close(bad)


def test_dumpable_is_set_and_read_in_a_child() -> None:
    code = ("from memballoon.local.confine import dumpable, set_dumpable\n"
            "a = dumpable(); set_dumpable(False); print(a, dumpable())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]
    assert dumpable()  # this process untouched
    assert callable(set_dumpable)
