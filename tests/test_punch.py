"""The raw reference measurements: they cover what they claim and really release the memory."""

from __future__ import annotations

import json

import pytest

from memballoon.host.punch import (
    RawMeasurement,
    main,
    measure_punch_hole,
    measure_touch,
    raw_punch_hole_gib_per_s,
)
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB


def test_punch_measures_touched_memory_and_leaves_none() -> None:
    m = measure_punch_hole(8)
    assert m.operation == "punch_hole"
    assert m.size_bytes == 8 * MIB
    assert m.calls == 8  # one fallocate per 1 MiB range
    assert m.resident_before_bytes == 8 * MIB  # really touched before the clock started
    assert m.resident_after_bytes == 0  # really released
    assert m.seconds > 0 and m.gib_per_s > 0


def test_a_short_last_chunk_is_punched_too() -> None:
    m = measure_punch_hole(5, chunk_mib=2)
    assert m.calls == 3 and m.resident_after_bytes == 0


def test_raw_rate_is_a_positive_figure() -> None:
    assert raw_punch_hole_gib_per_s(4) > 0


@pytest.mark.parametrize("resident", [False, True])
def test_touch_measures_every_page(resident: bool) -> None:
    m = measure_touch(4, resident=resident)
    assert m.size_bytes == m.resident_after_bytes == 4 * MIB
    assert m.resident_before_bytes == (4 * MIB if resident else 0)


@pytest.mark.parametrize(("mib", "chunk"), [(0, 1), (-3, 1), (4, 0)])
def test_bad_sizes_are_config_errors(mib: int, chunk: int) -> None:
    with pytest.raises(ConfigError):
        measure_punch_hole(mib, chunk_mib=chunk)


def test_gib_per_s_is_size_over_time() -> None:
    m = RawMeasurement("punch_hole", 2 << 30, 0.5, 2048, 2 << 30, 0)
    assert m.gib_per_s == 4.0


def test_main_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["operation"] for r in rows] == ["punch_hole", "touch", "touch"]
    assert all(r["gib_per_s"] > 0 for r in rows)
