"""Speed work must not change a decision: slices of the ``fleet`` scenario, run through the
simulator, the engine, the manager core and the default policy, journal exactly the records
(guest, old and new target, reason, inputs, host figures, applied) and end with exactly the
counters recorded in ``tests/data/fleet-decisions/`` before the manager's step was made cheap.

A slice whose behaviour changes on purpose (a policy or scenario change) regenerates the
fixtures with ``PYTHONPATH=src .venv/bin/python tests/test_sim_decisions.py --write`` (and
says so in its commit).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memballoon.bench.sim import fleet
from memballoon.policy.default import DefaultPolicy
from memballoon.sim.scenario import build

DATA = Path(__file__).parent / "data" / "fleet-decisions"
#: (protocol, guests, simulated seconds, host share: None the fleet's own host; a share presses
#: the budget: the policy reclaims, cuts growth back to floors, the host OOM-kills)
SLICES = (("virtio", 40, 600.0, None), ("vmw", 40, 300.0, 0.15),
          ("vmw-batched", 40, 600.0, 0.2))


class Recorder:
    """A ``JournalSink`` keeping every record but the wall clock's."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, rec: dict[str, Any], *, mono: float) -> dict[str, Any]:
        full = {"mono": round(mono, 6), **rec}
        self.records.append(full)
        return full


def run_slice(protocol: str, guests: int, seconds: float,
              share: float | None) -> dict[str, Any]:
    sc = fleet(protocol, guests, seconds)
    if share is not None:
        sc = sc.with_host_share(share)
    w = build(sc)
    rec = Recorder()
    w.engine.journal = rec
    for _ in range(round(sc.seconds / sc.period_s)):
        w.backend.advance(sc.period_s)
        w.engine.step()
    assert isinstance(w.policy, DefaultPolicy)
    return {"records": rec.records, "counters": w.backend.counters.as_dict(),
            "policy_counters": w.policy.counters.as_dict()}


def fixture(protocol: str) -> Path:
    return DATA / f"{protocol}.json.gz"


@pytest.mark.parametrize("spec", SLICES, ids=[s[0] for s in SLICES])
def test_a_fleet_slice_decides_exactly_as_recorded(
        spec: tuple[str, int, float, float | None]) -> None:
    want = json.loads(gzip.decompress(fixture(spec[0]).read_bytes()))
    got = json.loads(json.dumps(run_slice(*spec)))
    assert len(want["records"]) > 100  # the slice decides something
    for i, (g, w) in enumerate(zip(got["records"], want["records"], strict=False)):
        assert g == w, f"record {i} differs"
    assert len(got["records"]) == len(want["records"])
    assert got["counters"] == want["counters"]
    assert got["policy_counters"] == want["policy_counters"]


def main() -> int:
    if sys.argv[1:] != ["--write"]:
        print(__doc__)
        return 2
    DATA.mkdir(parents=True, exist_ok=True)
    for spec in SLICES:
        data = json.dumps(run_slice(*spec), sort_keys=True).encode()
        fixture(spec[0]).write_bytes(gzip.compress(data, mtime=0))
        print(fixture(spec[0]), len(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
