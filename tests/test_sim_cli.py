"""`memballoon sim`: list, show, run and compare scenarios; JSON out; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memballoon.app.scenario import BUILTIN, load_scenario
from memballoon.app.sim_cli import toucher_steps
from memballoon.cli import main

TINY = """
description = "two small guests"
duration = "30s"
[host]
memory = "200MiB"
[[guests]]
name = "idle"
ram = "128MiB"
min = "12.5%"
workload = { kind = "idle", anon = "8MiB", file = "4MiB" }
[[guests]]
name = "web"
ram = "128MiB"
protocol = "vmw"
min = "12.5%"
workload = { kind = "steady", anon = "40MiB", file = "16MiB" }
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_list_and_show_the_builtin_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTIN)
    assert main(["sim", "show", "overcommit"]) == 0
    assert "[sweep]" in capsys.readouterr().out
    assert main(["sim", "show", "nope"]) == 2
    assert "not a built-in scenario file" in capsys.readouterr().err


def test_run_prints_one_json_object(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "run", str(tiny), "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["scenario"] == "tiny" and doc["description"] == "two small guests"
    (run,) = doc["runs"]
    for key in ("host_peak_resident_bytes", "mean_released_bytes", "guest_oom_kills",
                "mean_stall_pct", "p99_stall_pct", "per_guest", "safe"):
        assert key in run
    assert run["simulated_seconds"] == 30.0 and run["policy"] == "default"
    assert main(["sim", "run", str(tiny), "--policy", "static", "--duration", "10s",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "static" in text and "mean size" in text


def test_compare_runs_each_policy(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "compare", "--scenario", str(tiny), "--policies", "static,mom",
                 "--duration", "20s", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["policies"]) == ["static", "mom"]
    assert main(["sim", "compare", "--scenario", str(tiny), "--policies", "static",
                 "--duration", "10s", "--no-progress"]) == 0
    assert "static" in capsys.readouterr().out


def test_a_sweep_in_two_processes_gives_the_same_answer(
        tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.write_text(TINY.replace('[host]\nmemory = "200MiB"\n', "[sweep]\nshares = [1.0, 0.1]\n"))
    out = []
    for jobs in ("1", "2"):
        assert main(["sim", "run", str(tiny), "--duration", "20s", "--jobs", jobs, "--json",
                     "--no-progress"]) == 0
        out.append(json.loads(capsys.readouterr().out)["runs"][0])
    assert out[0]["sweep"] == out[1]["sweep"]
    assert out[0]["min_safe_budget_ratio"] == 1.0  # 10% of the RAM is too little
    assert main(["sim", "run", str(tiny), "--duration", "20s", "--shards", "2", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["sweep"] == out[0]["sweep"]


def test_a_run_in_two_shards_gives_the_same_answer(
        tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = []
    for shards in ("1", "2"):
        assert main(["sim", "run", str(tiny), "--shards", shards, "--json",
                     "--no-progress"]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[0] == out[1]


@pytest.mark.parametrize("argv, needle", [
    (["sim", "run", "no-such-scenario"], "no built-in scenario of that name"),
    (["sim", "compare", "--scenario", "idle-tax", "--policies", "greedy"],
     "--policies: unknown policy 'greedy'"),
    (["sim", "run", "idle-tax", "--duration", "soon"], "--duration: 'soon' is not a duration"),
    (["sim", "run", "idle-tax", "--shards", "2", "--jobs", "2"], "--shards and --jobs"),
])
def test_bad_input_exits_2_naming_it(argv: list[str], needle: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--no-progress"]) == 2
    assert needle in capsys.readouterr().err


def test_toucher_steps_read_the_estimate_at_each_step() -> None:
    sc = load_scenario("ws-estimator")
    rows = [[float(t), 0.0, 0.0, 0.0, 0.25 if ((t - 1) // 600) % 2 else 0.05]
            for t in range(0, 2400, 5)]
    steps = toucher_steps(sc, {"series": {"toucher": rows}})
    assert [s["step"] for s in steps] == ["up", "down", "up"]
    assert all(s["seconds_to_90pct"] == 5.0 for s in steps)
    assert toucher_steps(sc, {"series": {}}) == []


def test_a_run_draws_a_progress_bar_on_a_terminal(tiny: Path) -> None:
    # the bar goes to the console it is given (stderr by default), one task per label, and
    # follows the run to its end
    import io

    from rich.console import Console

    from memballoon.app.sim_cli import progress_bar
    from memballoon.sim.run import run_scenario

    buf = io.StringIO()
    term = Console(file=buf, force_terminal=True, width=100)
    seen: list[tuple[str, float, float]] = []
    with progress_bar(True, console=term) as prog:
        def both(label: str, done: float, total: float) -> None:
            seen.append((label, done, total))
            prog(label, done, total)

        run_scenario(load_scenario(str(tiny)), progress=both)
    assert seen and seen[-1] == ("tiny", 30.0, 30.0)
    assert "memballoon: tiny" in buf.getvalue() and "100%" in buf.getvalue()
    # with the guests in two processes (a worker forked while the bar's thread draws), too
    from memballoon.app.sim_shards import Shards

    seen.clear()
    with progress_bar(True, console=term) as prog:
        def again(label: str, done: float, total: float) -> None:
            seen.append((label, done, total))
            prog(label, done, total)

        run_scenario(load_scenario(str(tiny)), progress=again, build_world=Shards(2))
    assert len(seen) == 30 and seen[-1] == ("tiny", 30.0, 30.0)


def test_the_commands_show_progress_unless_told_not_to(
        tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import contextlib

    from memballoon.app import sim_cli

    calls: list[tuple[bool, str]] = []

    @contextlib.contextmanager
    def spy(enabled: bool = True, console: object = None):  # type: ignore[no-untyped-def]
        yield lambda label, done, total: calls.append((enabled, label))

    monkeypatch.setattr(sim_cli, "progress_bar", spy)
    assert main(["sim", "run", str(tiny), "--duration", "5s", "--json"]) == 0
    assert calls and all(enabled for enabled, _ in calls)
    calls.clear()
    assert main(["sim", "compare", "--scenario", str(tiny), "--policies", "static",
                 "--duration", "5s", "--json", "--no-progress"]) == 0
    assert calls and not any(enabled for enabled, _ in calls)
    capsys.readouterr()
