"""``memballoon bench qemu --json`` on a real guest: every figure present and plausible."""

from __future__ import annotations

import json

import pytest

from memballoon.cli import main
from memballoon.model.units import MIB


def test_inflate_must_fit_the_guest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "qemu", "--guest-mib", "256", "--inflate-mib", "256"]) == 2
    assert "--inflate-mib 256" in capsys.readouterr().err


@pytest.mark.qemu
def test_bench_qemu_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "qemu", "--json", "--accel", "tcg"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["accel"] == "tcg" and r["inflate_mib"] == 512 and r["guest_mib"] == 1024
    for key in ("boot_seconds", "inflate_seconds", "inflate_gib_per_s",
                "direct_inflate_seconds", "overhead_ratio"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["overhead_ratio"] == pytest.approx(
        r["inflate_seconds"] / r["direct_inflate_seconds"], rel=0.01)
    assert r["inflate_gib_per_s"] == pytest.approx(
        512 / 1024 / r["inflate_seconds"], rel=0.01)
    # The guest touched 700 MiB and freed it; the balloon took 512 MiB back from QEMU.
    assert r["rss_before_bytes"] > 600 * MIB
    assert r["rss_before_bytes"] - r["rss_after_bytes"] > 256 * MIB
