"""model/counters.py: a bag of named counters, counted by declared names, read by plain string."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import memballoon
from memballoon.model.counters import CounterName, Counters


class DemoCounter(CounterName):
    """Two names for the tests."""

    FRAMES = "frames"  # frames seen
    BAD_FRAMES = "bad_frames"  # frames refused


class OtherCounter(CounterName):
    """Another component's names, one of them shared with ``DemoCounter``."""

    FRAMES = "frames"  # the same name, counted into the same bag
    TICKS = "ticks"  # ticks


def test_inc_counts_one_by_default_and_n_when_told() -> None:
    c = Counters()
    c.inc(DemoCounter.FRAMES)
    c.inc(DemoCounter.FRAMES)
    c.inc(DemoCounter.BAD_FRAMES, 5)
    assert c["frames"] == 2 and c["bad_frames"] == 5
    assert c.total() == 7


def test_reading_is_by_plain_string_or_member_and_absent_is_zero() -> None:
    c = Counters()
    c.inc(DemoCounter.BAD_FRAMES)
    assert c["bad_frames"] == c[DemoCounter.BAD_FRAMES] == 1
    assert c["frames"] == 0 and c["never_declared"] == 0
    assert "frames" not in c.as_dict()  # reading does not create a counter


def test_as_dict_has_plain_string_keys_sorted_and_serializes() -> None:
    c = Counters()
    c.inc(DemoCounter.FRAMES, 3)
    c.inc(DemoCounter.BAD_FRAMES)
    d = c.as_dict()
    assert d == {"bad_frames": 1, "frames": 3}
    assert list(d) == sorted(d)
    assert all(type(k) is str for k in d)  # not enum members: metrics and JSON see the name
    assert json.loads(json.dumps(d)) == d
    assert "'frames': 3" in repr(c)


def test_components_share_a_bag_by_name() -> None:
    c = Counters()
    c.inc(DemoCounter.FRAMES)
    c.inc(OtherCounter.FRAMES, 2)
    c.inc(OtherCounter.TICKS)
    assert c.as_dict() == {"frames": 3, "ticks": 1}


def test_members_are_their_names() -> None:
    assert DemoCounter.FRAMES == "frames" and str(DemoCounter.BAD_FRAMES) == "bad_frames"
    assert f"{DemoCounter.FRAMES}" == "frames"
    assert list(CounterName) == []  # the base has no names of its own


# ------------------------------------------------------------------ every .inc( names a member
SRC = Path(memballoon.__file__).parent
SOURCES = sorted(SRC.rglob("*.py"))


def _stringy(node: ast.expr) -> bool:
    """A name built from text: a string literal, an f-string, or a sum or % of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _stringy(node.left) or _stringy(node.right)
    return False


def string_named_incs(path: Path) -> list[str]:
    """``line: source`` of every ``.inc(...)`` call in ``path`` whose name is a string."""
    text = path.read_text()
    out = []
    for node in ast.walk(ast.parse(text, str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "inc"):
            continue
        names = node.args[:1] + [k.value for k in node.keywords if k.arg == "name"]
        if any(_stringy(a) for a in names):
            out.append(f"{node.lineno}: {ast.get_source_segment(text, node)}")
    return out


def test_the_source_check_sees_literals_and_f_strings(tmp_path: Path) -> None:
    p = tmp_path / "sample.py"
    p.write_text('c.inc("x")\nc.inc(f"died_{r}")\nc.inc("a" + b)\nc.inc(name="y")\n'
                 'c.inc(K.X, 2)\nc.inc(TABLE[r])\nc.inc(TABLE.get(r, K.OTHER))\n')
    assert [s.split(":")[0] for s in string_named_incs(p)] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(SRC)) for p in SOURCES])
def test_every_inc_names_a_declared_member(path: Path) -> None:
    bad = string_named_incs(path)
    assert not bad, f"{path.relative_to(SRC)}: count a CounterName member, not a string:\n" + (
        "\n".join(bad))
