"""The decision journal: JSON lines, bounded by rotation, read back with filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memballoon.edge.journal import Journal, read_journal, rotated
from memballoon.manager.core import Action, Event
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE


def clock() -> float:
    clock.t += 1.0  # type: ignore[attr-defined]
    return clock.t  # type: ignore[attr-defined, no-any-return]


clock.t = 1_700_000_000.0  # type: ignore[attr-defined]


def test_record_has_time_guest_sizes_reason_inputs(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl", wall_clock=clock)
    j.action(Action("a", 10, 20, "why", {"stall_pct": 1.5}), mono=5.0, applied=True)
    (rec,) = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert rec["guest"] == "a" and rec["old_pages"] == 10 and rec["new_pages"] == 20
    assert rec["old_bytes"] == 10 * PAGE_SIZE and rec["new_bytes"] == 20 * PAGE_SIZE
    assert rec["reason"] == "why" and rec["inputs"] == {"stall_pct": 1.5}
    assert rec["applied"] is True and rec["mono"] == 5.0 and rec["kind"] == "policy"
    assert rec["time"].startswith("2023-11-14T") and rec["time"].endswith("+00:00")


def test_rotation_keeps_the_journal_bounded(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    j = Journal(p, max_bytes=2048, keep=2, wall_clock=clock)
    for i in range(200):
        j.action(Action(f"g{i % 3}", i, i + 1, "r" * 20), mono=float(i), applied=True)
    files = [p, rotated(p, 1), rotated(p, 2)]
    assert all(f.exists() for f in files) and not rotated(p, 3).exists()
    assert all(f.stat().st_size <= 2048 for f in files)
    recs = read_journal(p)
    assert [r["old_pages"] for r in recs] == sorted(r["old_pages"] for r in recs)  # in order
    assert recs[-1]["old_pages"] == 199
    assert j.counters["journal_rotations"] > 0


def test_reader_filters_guest_since_last(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    j = Journal(p, wall_clock=clock)
    for i in range(10):
        j.action(Action("a" if i % 2 else "b", i, i + 1, "r"), mono=float(i), applied=True)
    j.event(Event("policy_error", "boom"), mono=11.0)
    assert len(read_journal(p)) == 11
    assert [r["old_pages"] for r in read_journal(p, guest="a")] == [1, 3, 5, 7, 9]
    assert [r["old_pages"] for r in read_journal(p, guest="a", last=2)] == [7, 9]
    t5 = read_journal(p)[5]["ts"]
    assert len(read_journal(p, since=t5)) == 6
    assert read_journal(p, last=1)[0]["kind"] == "policy_error"
    assert j.tail(guest="b", last=1)[0]["old_pages"] == 8


def test_garbage_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    Journal(p).action(Action("a", 0, 1, "r"), mono=0.0, applied=False)
    with p.open("a") as f:
        f.write('{"torn": \n[1,2]\nnot json\n\n')
    Journal(p).action(Action("a", 1, 2, "r"), mono=1.0, applied=True)
    c = Counters()
    recs = read_journal(p, counters=c)
    assert [r["new_pages"] for r in recs] == [1, 2]
    assert c["journal_bad_line"] == 3


def test_memory_only_journal() -> None:
    j = Journal(None)
    j.action(Action("a", 0, 1, "r"), mono=0.0, applied=True)
    assert j.tail()[0]["guest"] == "a" and j.written == 1


def test_a_journal_path_must_be_a_regular_file_or_new_in_an_existing_directory(
        tmp_path: Path) -> None:
    from memballoon.edge.journal import check_journal_path
    from memballoon.model.errors import ConfigError

    (tmp_path / "old.jsonl").write_text("")
    assert check_journal_path(tmp_path / "old.jsonl") == tmp_path / "old.jsonl"
    assert check_journal_path(tmp_path / "new.jsonl") == tmp_path / "new.jsonl"
    secret = tmp_path / "secret"
    secret.write_text("keep")
    (tmp_path / "link.jsonl").symlink_to(secret)
    (tmp_path / "dir.jsonl").mkdir()
    for bad, why in [(tmp_path / "nowhere" / "j.jsonl", "not an existing directory"),
                     (tmp_path / "link.jsonl", "is a symlink"),
                     (tmp_path / "dir.jsonl", "not a regular file"),
                     (Path("/proc/sys/vm/drop_caches"), "proc filesystem"),
                     (Path("/sys/kernel/j.jsonl"), "sysfs filesystem"),
                     (Path("/dev/null"), "not storage|not a regular file")]:
        with pytest.raises(ConfigError, match=why):
            Journal(bad)
    assert secret.read_text() == "keep"
