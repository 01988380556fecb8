"""``memballoon bench protocol``: one driver/device pair on the virtual clock.

Inflate a guest's balloon to the requested size and count the driver work periods it took, the
wall time, and every invariant violation seen after every period. Many guests under the
manager: ``memballoon bench sim`` (the simulator, ``bench/sim.py``).
"""

from __future__ import annotations

import time
from typing import Any

from memballoon.guest.workload import Workload, make_workload
from memballoon.harness.pair import PROTOCOLS, check_pair, make_pair
from memballoon.model.errors import ConfigError
from memballoon.model.units import mib_to_pages


def _workload(kind: str, guest_mib: int, seed: int) -> Workload:
    return make_workload("idle" if kind == "idle" else "steady", guest_mib, seed)


def run_single(
    protocol: str,
    guest_mib: int,
    balloon_mib: int,
    *,
    workload: str = "idle",
    max_cycles: int = 10_000,
    check: bool = True,
) -> dict[str, Any]:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not 0 <= balloon_mib < guest_mib:
        raise ConfigError(f"--balloon-mib must be within [0, {guest_mib}) for a "
                          f"{guest_mib} MiB guest, got {balloon_mib}")
    guest_pages = mib_to_pages(guest_mib)
    target = mib_to_pages(balloon_mib)
    pair = make_pair(protocol, guest_pages, _workload(workload, guest_mib, 0))
    pair.tick(check=check)  # let the workload settle before the host asks
    pair.cycles = 0
    pair.set_target(target)
    t0 = time.perf_counter()
    pair.run_until(lambda p: p.driver.balloon_pages >= target, max_cycles, check=check)
    wall = time.perf_counter() - t0
    if not check:
        pair.violations.extend(check_pair(pair))
    return {
        "protocol": protocol,
        "workload": workload,
        "guest_pages": guest_pages,
        "target_pages": target,
        "balloon_pages": pair.driver.balloon_pages,
        "cycles": pair.cycles,
        "simulated_seconds": round(pair.cycles * pair.period_s, 6),
        "wall_seconds": round(wall, 6),
        "pages_per_wall_second": round(pair.driver.balloon_pages / wall, 1) if wall else None,
        "invariant_violations": len(pair.violations),
        "violations_sample": pair.violations[:5],
        "driver_stats": pair.driver.stats(),
        "device_counters": pair.device.counters.as_dict(),
    }
