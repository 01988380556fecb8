"""``memballoon bench protocol``: a driver/device pair (or many) on the virtual clock.

Single pair: inflate a guest's balloon to the requested size and count the driver work periods
it took, the wall time, and every invariant violation seen after every period.

Many pairs (``guests > 0``): independent guests of 1 to 8 GiB, mostly idle, each with a few
target changes (about ``changes_per_hour`` a guest, each to at most 10% of its RAM), run for
``simulated_seconds`` in 1 s periods. This is the load a simulator of a thousand guests puts
on the same driver, device and guest-model code. Invariants are checked cheaply (sizes agree)
every period, fully for one guest in turn every minute, and fully for all at the end;
``wall_seconds`` is the stepping alone, ``check_seconds`` the checking.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from memballoon.guest.workload import Workload, make_workload
from memballoon.harness.pair import PROTOCOLS, Pair, check_pair, make_pair
from memballoon.model.errors import ConfigError
from memballoon.model.units import mib_to_pages

Progress = Callable[[str], None]

#: In the many-guest run, one guest in turn gets the full (O(guest size)) invariant check this
#: often; every guest gets the cheap size check every period and the full check at the end.
SPOT_CHECK_EVERY_S = 60


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


def run_many(
    protocol: str,
    guests: int,
    simulated_seconds: int,
    *,
    seed: int = 1,
    changes_per_hour: float = 2.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    if guests <= 0 or simulated_seconds <= 0 or changes_per_hour <= 0:
        raise ConfigError("--guests, --simulated-seconds and the change rate must be positive")
    rng = random.Random(seed)
    pairs: list[Pair] = []
    changes: list[tuple[int, int, int]] = []  # (second, guest, target pages)
    t_build = time.perf_counter()
    for g in range(guests):
        mib = rng.randrange(4, 33) * 256  # 1 to 8 GiB
        kind = rng.choices(["idle", "diurnal"], weights=[95, 5])[0]  # mostly idle
        pair = make_pair(protocol, mib_to_pages(mib), make_workload(kind, mib, seed=g),
                         period_s=1.0)
        pairs.append(pair)
        # a few target changes: about changes_per_hour a guest, each to at most 10% of its RAM
        t = rng.expovariate(changes_per_hour / 3600.0)
        while t < simulated_seconds:
            changes.append((int(t), g, mib_to_pages(mib * rng.uniform(0.0, 0.1))))
            t += rng.expovariate(changes_per_hour / 3600.0)
    changes.sort()
    build_s = time.perf_counter() - t_build
    t0 = time.perf_counter()
    check_s = 0.0
    ci = 0
    for sec in range(simulated_seconds):
        while ci < len(changes) and changes[ci][0] <= sec:
            _, g, tgt = changes[ci]
            pairs[g].set_target(tgt)
            ci += 1
        for p in pairs:
            p.tick(check=False)
        if sec % SPOT_CHECK_EVERY_S == 0:
            tc = time.perf_counter()
            spot = pairs[(sec // SPOT_CHECK_EVERY_S) % guests]
            spot.violations.extend(check_pair(spot))
            check_s += time.perf_counter() - tc
        if progress and (sec + 1) % max(1, simulated_seconds // 10) == 0:
            progress(f"{sec + 1}/{simulated_seconds} simulated seconds, "
                     f"{time.perf_counter() - t0:.1f} s wall")
    tc = time.perf_counter()
    for p in pairs:
        p.violations.extend(check_pair(p))
    check_s += time.perf_counter() - tc
    wall = time.perf_counter() - t0 - check_s
    periods = guests * simulated_seconds
    violations = [v for p in pairs for v in p.violations]
    return {
        "protocol": protocol,
        "guests": guests,
        "guest_pages": sum(p.mem.total_pages for p in pairs),
        "target_changes": len(changes),
        "balloon_pages": sum(p.driver.balloon_pages for p in pairs),
        "simulated_seconds": simulated_seconds,
        "guest_periods": periods,
        "build_seconds": round(build_s, 3),
        "wall_seconds": round(wall, 3),
        "check_seconds": round(check_s, 3),
        "guest_periods_per_wall_second": round(periods / wall, 1) if wall else None,
        "oom_kills": sum(p.mem.events.oom_kills for p in pairs),
        "invariant_violations": len(violations),
        "violations_sample": violations[:5],
    }
