"""The bench's check on fleet slices: every guest of every call, the columnar figures and rule
equal the scalar policy's (the bench's own report of differences is empty), one policy
carried through the calls decides alike on both paths of ``decide``, and its timing reports
both paths."""

from __future__ import annotations

import pytest

from memballoon.bench.vector_policy import capture, check, timing, wired


@pytest.mark.parametrize(("protocol", "share"), [("virtio", None), ("vmw", 0.15)])
def test_fleet_slice_has_no_difference(protocol: str, share: float | None) -> None:
    pol, calls = capture(protocol, 20, 120.0, share)
    assert len(calls) == 120
    compared, diffs, rules = check(pol, calls)
    assert diffs == []
    assert check(pol, calls, persistent=True)[1] == []
    assert compared == sum(len(c.guests) for c in calls) > 0
    assert rules["probe"] > 0 and rules["hold"] > 0
    # one policy through the calls: the columns decide as the scalar path
    w, differ = wired(pol, calls, repeats=1)
    assert differ == 0
    assert w["scalar_decide_ms_per_call"] > 0 and w["batch_decide_ms_per_call"] > 0


def test_timing_reports_both_paths() -> None:
    pol, calls = capture("virtio", 10, 20.0, None)
    t = timing(pol, calls, repeats=1)
    assert t["scalar_ms_per_call"] > 0 and t["batch_ms_per_call"] > 0
    assert t["speedup"] == t["scalar_ms_per_call"] / t["batch_ms_per_call"]
