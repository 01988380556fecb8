"""bench soak in a short form: a few local guests and the hostile one, every check every period."""

from __future__ import annotations

import asyncio
import json

import pytest

from memballoon.bench.soak import HOSTILE, guest_specs, soak
from memballoon.cli import main
from memballoon.model.errors import ConfigError


def test_a_short_soak_keeps_every_invariant_and_every_page() -> None:
    res = asyncio.run(soak(2, 12.0, seed=3, guest_mib=64, kill_rate=0.15))
    assert res["periods"] >= 10
    assert res["invariant_violations"] == 0, res["violations_sample"]
    assert res["data_corruptions"] == 0 and res["pages_verified"] > 0
    assert res["refaulted_bytes"] == 0 and res["released_bytes"] > 0
    assert res["guest_kills"] >= 1 and res["guest_restarts"] >= 1
    # the hostile guest was served, throttled and refused; the others' targets were reached
    assert res["hostile_throttled_periods"] > 0
    assert res["hostile_refused"]["buffer_in_balloon"] > 0
    assert res["latency_samples"] > 0 and res["good_guest_p99_latency_ms"] is not None
    assert 0 <= res["hostile_guest_cpu_share"] < 1


def test_guests_are_drawn_from_the_seed_with_the_hostile_last() -> None:
    a, b = guest_specs(5, 7), guest_specs(5, 7)
    assert a == b and a[-1].name == HOSTILE and a[-1].program is not None
    assert {s.protocol for s in a[:-1]} == {"virtio", "vmw-batched", "vmw"}
    assert guest_specs(2, 7, hostile=False)[-1].name == "g1"
    with pytest.raises(ConfigError):
        asyncio.run(soak(0, 1.0))


def test_the_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--guests", "0"], ["--minutes", "-1"], ["--minutes", "inf"]):
        with pytest.raises(SystemExit) as e:
            main(["bench", "soak", *argv])
        assert e.value.code == 2
    assert "--guests" in capsys.readouterr().err


def test_the_cli_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "soak", "--guests", "1", "--minutes", "0.05", "--guest-mib", "64",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["invariant_violations"] == 0 and res["periods"] >= 2
