"""`memballoon bench sim`: the fleet scenario per protocol, each in a process of its own, with the
figures the issue asks for (short forms here; the hour is the benchmark)."""

from __future__ import annotations

import json

import pytest

from memballoon.bench.sim import fleet, main, run_bench, run_one
from memballoon.cli import main as cli_main

FIGURES = ("guests", "simulated_seconds", "wall_seconds", "guest_steps_per_second",
           "engine_step_ms_p99", "peak_rss_bytes", "invariant_violations")


def test_the_fleet_subset_keeps_the_mix_on_one_protocol() -> None:
    full = fleet("virtio")
    assert len(full.guests) == 1000 and full.seconds == 3600 and full.driver_period_s == 1.0
    sub = fleet("vmw", guests=20, seconds=30.0)
    assert len(sub.guests) == 20 and sub.seconds == 30.0
    assert {g.protocol for g in sub.guests} == {"vmw"}
    assert len({g.name.split("-")[0] for g in sub.guests}) >= 4  # several workload groups
    assert sub.host_bytes is not None and full.host_bytes is not None
    assert sub.host_bytes / sub.ram_pages == pytest.approx(full.host_bytes / full.ram_pages)


@pytest.mark.parametrize("protocol", ["vmw", "vmw-batched", "virtio"])
def test_one_protocol_reports_every_figure(protocol: str) -> None:
    r = run_one(protocol, 6, 20.0, progress=False)
    assert all(k in r for k in FIGURES)
    assert r["guests"] == 6 and r["simulated_seconds"] == 20.0
    assert r["invariant_violations"] == 0 and r["peak_rss_bytes"] > 0
    assert r["guest_steps_per_second"] > 0 and r["engine_step_ms_p99"] is not None


def test_each_protocol_runs_in_a_process_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    res = run_bench(["vmw-batched"], guests=3, seconds=10.0, repeat=2, progress=False)
    r = res["protocols"]["vmw-batched"]
    assert r["repeat"] == 2 and len(r["runs"]) == 2 and r["invariant_violations"] == 0
    assert main(["--child", "vmw", "--guests", "2", "--seconds", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"] == "vmw"


def test_shards_run_the_same_fleet_and_add_the_workers_memory() -> None:
    one = run_one("vmw-batched", 8, 30.0, progress=False)
    two = run_one("vmw-batched", 8, 30.0, progress=False, shards=2)
    assert one["shards"] == 1 and two["shards"] == 2
    for k in ("decisions", "guest_ticks", "guest_idle_periods", "mean_stall_pct",
              "p99_stall_pct", "mean_released_bytes", "guest_oom_kills", "invariant_violations"):
        assert one[k] == two[k], k
    assert two["peak_rss_bytes"] > 0
    res = run_bench(["virtio"], guests=4, seconds=5.0, progress=False, shards=2)
    assert res["protocols"]["virtio"]["shards"] == 2


def test_the_command_prints_json_and_refuses_bad_protocols(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "sim", "--protocols", "virtio", "--guests", "2", "--duration",
                     "5s", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["protocols"]) == {"virtio"}
    assert 1 <= doc["protocols"]["virtio"]["shards"] <= 2  # the default: the CPUs, 2 guests
    assert cli_main(["bench", "sim", "--protocols", "vmw", "--guests", "2", "--duration",
                     "5s", "--shards", "1", "--no-progress"]) == 0
    assert "1 shard)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["bench", "sim", "--protocols", "xen"])
    assert "unknown protocol 'xen'" in capsys.readouterr().err
