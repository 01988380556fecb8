"""The hostile local guest (local/hostile.py) against a real LocalHost: it is what it says."""

from __future__ import annotations

import asyncio
import sys

from memballoon.local.host import GuestSpec, LocalHost
from memballoon.local.hostile import main


def test_a_storm_is_throttled_refused_and_believed_in_nothing() -> None:
    async def go() -> None:
        spec = GuestSpec("storm", 64, "virtio", "idle",
                         program=(sys.executable, "-m", "memballoon.local.hostile", "storm"))
        async with LocalHost([spec], budget_bytes=None) as host:
            assert await host.wait_until(
                lambda s: host.counters_of("storm").get("throttled", 0) >= 2
                and host.counters_of("storm").get("actual_beyond_held", 0) > 0, 30)
            c = host.counters_of("storm")
            assert c["buffer_in_balloon"] > 0  # its PFN array in its own balloon: not read
            assert c["actual_beyond_held"] > 0  # its lie about actual
            v = host.guests()["storm"]
            assert v.alive and v.balloon_pages <= host.balloon_pfns("storm").size
            assert not [k for k in c if k.startswith("error_")]

    asyncio.run(go())


def test_it_needs_a_mode() -> None:
    assert main([]) == 2 and main(["calm"]) == 2
