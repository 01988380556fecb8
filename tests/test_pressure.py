"""The pressure report's versioned JSON codec: round trips, and strict refusal of garbage."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.counters import Counters
from memballoon.model.errors import PeerError
from memballoon.protocol.pressure import (
    MAX_REPORT_BYTES,
    MAX_VALUE,
    REPORT_VERSION,
    PressureReport,
    ReportError,
)

counts = st.integers(0, MAX_VALUE)
reports = st.builds(
    PressureReport,
    guest=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    time_s=st.floats(0, 1e9, allow_nan=False),
    total_bytes=counts, free_bytes=counts, available_bytes=counts, anon_bytes=counts,
    cache_bytes=counts, balloon_bytes=counts, swap_in_pages=counts, swap_out_pages=counts,
    major_faults=counts, oom_kills=counts, stall_us=counts,
    stall_pct=st.floats(0, 100, allow_nan=False),
    balloon_target_pages=counts, balloon_actual_pages=counts,
    refused_pages=st.none() | counts,
)


def _report() -> PressureReport:
    return PressureReport("g1", 12.5, 1 << 30, 1 << 28, 1 << 29, 1 << 27, 1 << 26, 1 << 25,
                          3, 4, 5, 0, 1234, 2.5, 8192, 8000, None)


@given(reports)
def test_encode_decode_round_trip(r: PressureReport) -> None:
    data = r.encode()
    assert len(data) <= MAX_REPORT_BYTES
    assert PressureReport.decode(data) == r


def test_version_is_pinned_and_written() -> None:
    assert REPORT_VERSION == 1
    doc = json.loads(_report().encode())
    assert doc["v"] == 1
    assert doc["refused_pages"] is None
    assert set(doc) == {"v", "guest", "time_s", "total_bytes", "free_bytes", "available_bytes",
                        "anon_bytes", "cache_bytes", "balloon_bytes", "swap_in_pages",
                        "swap_out_pages", "major_faults", "oom_kills", "stall_us", "stall_pct",
                        "balloon_target_pages", "balloon_actual_pages", "refused_pages"}


def _mutated(**changes: object) -> bytes:
    doc = json.loads(_report().encode())
    for k, v in changes.items():
        if v is ...:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'{"v": 1, "time_s": NaN}', "bad_number"),
        (_mutated(v=2), "bad_version"),
        (_mutated(v=...), "bad_version"),
        (_mutated(free_bytes=...), "missing_key"),
        (_mutated(extra=1), "unknown_key"),
        (_mutated(free_bytes=-1), "out_of_range"),
        (_mutated(free_bytes=MAX_VALUE + 1), "out_of_range"),
        (_mutated(free_bytes=1.5), "bad_type"),
        (_mutated(free_bytes=True), "bad_type"),
        (_mutated(stall_pct=101), "out_of_range"),
        (_mutated(guest=""), "bad_type"),
        (_mutated(guest=7), "bad_type"),
        (_mutated(refused_pages="x"), "bad_type"),
        (b" " * (MAX_REPORT_BYTES + 1), "too_long"),
        (b"\xff\xfe", "not_json"),
    ],
)
def test_garbage_is_a_typed_error_and_a_counter(data: bytes, reason: str) -> None:
    c = Counters()
    with pytest.raises(ReportError) as ei:
        PressureReport.decode(data, counters=c)
    assert ei.value.reason == reason
    assert isinstance(ei.value, PeerError)
    assert c[f"report_{reason}"] == 1


@given(st.binary(max_size=600))
def test_random_bytes_raise_only_report_errors(data: bytes) -> None:
    with contextlib.suppress(ReportError):
        PressureReport.decode(data)


def test_missing_refused_pages_decodes_as_none() -> None:
    assert PressureReport.decode(_mutated(refused_pages=...)).refused_pages is None


def test_report_without_sampling_fields_still_decodes() -> None:
    r = PressureReport("g", 1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
    doc = json.loads(r.encode())
    assert "active_sampled" not in doc  # old readers see the old shape
    r2 = PressureReport("g", 1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, None, 100, 37)
    assert PressureReport.decode(r2.encode()) == r2
    doc = json.loads(r2.encode())
    doc["active_touched"] = 101
    with pytest.raises(ReportError):
        PressureReport.decode(json.dumps(doc))


# fuzz property (the long form: `memballoon bench fuzz --target pressure_report`)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
    | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=6)


@settings(max_examples=150)
@given(reports, st.dictionaries(st.sampled_from(["v", "guest", "time_s", "free_bytes",
                                                 "stall_pct", "refused_pages",
                                                 "active_sampled", "active_touched", "extra"]),
                                _values, max_size=3))
def test_a_report_with_any_fields_changed_is_refused_once_or_within_bounds(
        r: PressureReport, change: dict[str, object]) -> None:
    doc = {**json.loads(r.encode()), **change}
    c = Counters()
    try:
        got = PressureReport.decode(json.dumps(doc).encode(), counters=c)
    except ReportError as exc:
        assert c.as_dict() == {exc.counter.value: 1}  # counted once, by the rule it broke
        return
    assert 0.0 <= got.stall_pct <= 100.0 and 0.0 <= got.time_s <= MAX_VALUE
    assert 0 <= got.free_bytes <= MAX_VALUE and got.active_touched <= got.active_sampled
    assert PressureReport.decode(got.encode()) == got
