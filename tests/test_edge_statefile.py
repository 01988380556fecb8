"""The daemon's state file: atomic, strict, aged by the downtime on restore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memballoon.edge.statefile import (
    DaemonSnapshot,
    downtime_s,
    is_ours,
    read_state,
    set_aside,
    write_state,
)
from memballoon.manager.core import CoreSnapshot
from memballoon.model.errors import ConfigError


def snap(saved_at: float = 1000.0, **kw: object) -> DaemonSnapshot:
    doc: dict[str, object] = {
        "version": 1, "world": "qemu", "policy": "default", "saved_at": saved_at,
        "core": CoreSnapshot(manual={"a": 5}, last_direction={"a": 1},
                             last_change_age_s={"a": 2.0}),
        "policy_state": {"version": 1, "policy": "default", "guests": {}},
        "targets": {"a": 5, "b": 0},
    }
    doc.update(kw)
    return DaemonSnapshot.model_validate(doc)


def test_round_trip_and_downtime(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    assert read_state(p) is None
    write_state(p, snap())
    back = read_state(p)
    assert back == snap() and oct(p.stat().st_mode & 0o777) == "0o600"
    assert downtime_s(back, wall=lambda: 1012.5) == 12.5
    assert downtime_s(back, wall=lambda: 900.0) == 0.0  # the wall clock went back
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"]  # no temporary left


@pytest.mark.parametrize(("text", "needle"), [
    ('{"version": 2}', "version"), ("{", "(root)"), ('{"version": 1}', "world"),
])
def test_a_bad_state_file_is_refused_and_says_what_to_do(tmp_path: Path, text: str,
                                                          needle: str) -> None:
    p = tmp_path / "state.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match="start afresh") as ei:
        read_state(p)
    assert needle in str(ei.value)


def test_another_daemons_state_is_set_aside_not_restored(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    write_state(p, snap())
    s = read_state(p)
    assert s is not None and is_ours(s, world="qemu", policy="default")
    assert not is_ours(s, world="local", policy="default")
    assert not is_ours(s, world="qemu", policy="mom")
    kept = set_aside(p, s)
    assert kept.name == "state.json.qemu-default" and not p.exists()
    assert read_state(kept) == s


def test_a_writer_killed_at_any_moment_leaves_a_whole_document(tmp_path: Path) -> None:
    # a child rewrites the file as fast as it can; SIGKILL it at random moments: the file
    # always parses (old or new), never half
    p = tmp_path / "state.json"
    write_state(p, snap())
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "from pathlib import Path\n"
            "from test_edge_statefile import snap\n"
            "from memballoon.edge.statefile import write_state\n"
            f"p = Path({str(p)!r}); i = 0\n"
            "while True:\n"
            "    i += 1; write_state(p, snap(saved_at=float(i)))\n")
    here = str(Path(__file__).parent)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", code], cwd=here,
                                 env={**os.environ, "PYTHONPATH": here})
        try:
            child.wait(timeout=0.3)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        back = read_state(p)
        assert back is not None and back.targets == {"a": 5, "b": 0}
