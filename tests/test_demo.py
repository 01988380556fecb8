"""The demo with real guest processes and memory, shortened."""

import asyncio

import pytest

from memballoon.app.demo import DemoConfig, print_summary, run_demo
from memballoon.model.units import MIB

KEYS = ("host_budget_bytes", "host_peak_resident_bytes", "host_released_bytes",
        "budget_enforced", "guest_oom_kills", "data_corruptions", "guests")


def test_a_short_demo_moves_real_memory_and_keeps_data(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DemoConfig(seconds=8, guest_mib=256, budget_mib=600)
    s = asyncio.run(run_demo(cfg, live=False, log=lambda _: None))
    for k in KEYS:
        assert k in s
    assert s["host_budget_bytes"] == 600 * MIB
    assert s["data_corruptions"] == 0
    assert s["host_released_bytes"] > 0  # hole-punched memory, counted by the backend
    assert 0 < s["host_peak_resident_bytes"] <= s["host_budget_bytes"]
    assert [g["name"] for g in s["guests"]] == ["idle", "steady", "bursty"]
    assert all(g["alive"] for g in s["guests"])
    print_summary(s)
    assert "returned to host" in capsys.readouterr().out


def test_demo_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="--seconds"):
        DemoConfig(seconds=0)
    with pytest.raises(ValueError, match="--budget-mib"):
        DemoConfig(budget_mib=100)
    with pytest.raises(ValueError, match="--guest-mib"):
        DemoConfig(guest_mib=8)
