"""read_only_record: slots, equality and hash by fields, replace, and read-only to mypy."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, replace
from pathlib import Path

import pytest
from mypy import api as mypy_api

from memballoon.model.record import read_only_record


@read_only_record
class _R:
    a: int
    b: str = "x"


@dataclass(frozen=True)
class _Frozen:
    a: int
    b: str = "x"


def test_a_record_compares_hashes_and_copies_as_a_frozen_dataclass_does() -> None:
    r = _R(1)
    f = _Frozen(1)
    assert (r == _R(1), r != _R(2), r == _R(1, "y")) == (f == _Frozen(1), f != _Frozen(2),
                                                        f == _Frozen(1, "y"))
    assert hash(r) == hash(_R(1)) and len({r, _R(1), _R(2)}) == 2
    c = replace(r, b="y")
    assert (r.a, r.b, c.a, c.b) == (1, "x", 1, "y")
    assert not hasattr(r, "__dict__")  # slots
    with pytest.raises(FrozenInstanceError):
        setattr(f, "a", 2)  # noqa: B010 (the frozen one refuses at run time; the record, to mypy)


def test_mypy_refuses_an_assignment_to_a_field(tmp_path: Path) -> None:
    src = tmp_path / "use.py"
    src.write_text("from memballoon.model.record import read_only_record\n\n\n"
                   "@read_only_record\nclass R:\n    a: int\n\n\nr = R(1)\nr.a = 2\n")
    out, _err, status = mypy_api.run(["--strict", "--no-incremental", str(src)])
    assert status == 1 and 'Property "a" defined in "R" is read-only' in out, out
