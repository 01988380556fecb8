"""``memballoon bench policy``: a short real run with two policies, real numbers out."""

from __future__ import annotations

import json

import pytest

from memballoon.bench.policy import OVERCOMMIT, peak_bytes, scenario, workload_specs
from memballoon.cli import main

KEYS = {"host_peak_resident_bytes", "host_budget_bytes", "mean_released_bytes",
        "guest_oom_kills", "mean_stall_pct", "p99_stall_pct", "decisions"}


def test_scenario_peaks_are_one_and_a_half_budgets_and_do_not_coincide() -> None:
    specs, budget = scenario(seed=1, seconds=45)
    assert [s.workload.split(":")[0] for s in specs] == ["bursty", "ramp", "steady", "idle"]
    peaks = sum(peak_bytes(s.workload, s.mib, s.seed, 45) for s in specs)
    assert abs(peaks / budget - OVERCOMMIT) < 0.01
    w = workload_specs(45)
    from memballoon.guest.workload import make_workload
    bursty, ramp = make_workload(w["bursty"], 256), make_workload(w["ramp"], 256)
    for t in range(46):  # the two transients never peak at once: the scenario is feasible
        busy = [x.demand(t).anon_pages > 0.5 * 65536 for x in (bursty, ramp)]
        assert not all(busy), t


def test_short_bench_two_policies(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "policy", "--policies", "static,mom", "--seconds", "8",
               "--guest-mib", "128", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["policies"]) == {"static", "mom"}
    assert len(doc["guests"]) == 4
    for name, r in doc["policies"].items():
        assert set(r) >= KEYS, name
        assert r["host_budget_bytes"] == doc["host_budget_bytes"] > 0
        assert r["host_peak_resident_bytes"] > 16 << 20  # the guests really touched memory
        assert 0 <= r["mean_stall_pct"] <= r["p99_stall_pct"] <= 100
        assert r["reports"] >= 8 and r["policy_errors"] == 0
    assert doc["policies"]["static"]["decisions"] == 0  # static never balloons
    assert doc["policies"]["static"]["mean_released_bytes"] == 0
