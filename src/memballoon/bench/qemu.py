"""``memballoon bench qemu``: one real guest, a 512 MiB inflate through the manager's backend
against the same inflate as a bare QMP ``balloon`` command, in the same run.

Both inflates start from the same state: the guest has just touched and freed 700 MiB (at
most two thirds of its RAM: hog, then unhog), so QEMU holds that RAM and the balloon's pages
really are given back (RSS falls).
"Arrived" is query-balloon within ``ARRIVED_TOLERANCE_PAGES`` of the target for both paths,
polled at the same interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from memballoon.model.errors import ConfigError
from memballoon.model.units import GIB, MIB, PAGE_SHIFT, PAGE_SIZE
from memballoon.qemu.backend import ARRIVED_TOLERANCE_PAGES, QemuBackend
from memballoon.qemu.errors import BalloonStuckError, GuestBootError
from memballoon.qemu.image import build_guest_image
from memballoon.qemu.launch import Accel, QemuGuest, QemuProcess
from memballoon.qemu.qmp import QmpClient

GUEST_MIB: Final = 1024
INFLATE_MIB: Final = 512
HOG_MIB: Final = 700
POLL_S: Final = 0.02
TIMEOUT_S: Final = 120.0


async def _touch_and_free(b: QemuBackend, name: str, proc: QemuProcess) -> None:
    agent = b.agent(name)
    assert agent is not None
    start = len(proc.console_text())
    # tmpfs pages cannot be reclaimed without swap: leave the guest a third of its RAM.
    hog_mib = min(HOG_MIB, proc.guest.max_mib * 2 // 3)
    await agent.send_command(f"hog {hog_mib}")
    line = await proc.wait_for_console_async("MEMBALLOON-HOG", TIMEOUT_S, after=start)
    if "rc=0" not in line:
        raise GuestBootError(f"bench guest could not write {hog_mib} MiB: {line}")
    await agent.send_command("unhog")
    await proc.wait_for_console_async("MEMBALLOON-UNHOG", TIMEOUT_S, after=start)


async def _wait_pages(b: QemuBackend, name: str, pages: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        st = (await b.poll())[name]
        if abs(st.balloon_pages - pages) <= ARRIVED_TOLERANCE_PAGES:
            return
        if time.monotonic() > deadline or not st.alive:
            raise BalloonStuckError(f"balloon at {st.balloon_pages} pages, target {pages}")
        await asyncio.sleep(POLL_S)


async def _wait_logical(qmp: QmpClient, size_bytes: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while abs(await qmp.query_balloon() - size_bytes) > ARRIVED_TOLERANCE_PAGES * PAGE_SIZE:
        if time.monotonic() > deadline:
            raise BalloonStuckError(f"balloon did not reach {size_bytes} bytes logical")
        await asyncio.sleep(POLL_S)


async def run_bench(
    *, accel: Accel = "auto", guest_mib: int = GUEST_MIB, inflate_mib: int = INFLATE_MIB,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    if not 64 <= inflate_mib < guest_mib:
        raise ConfigError(f"--inflate-mib {inflate_mib}: must be >= 64 and below --guest-mib")
    image = await asyncio.to_thread(build_guest_image)
    name = "bench-qemu"
    ram = guest_mib * MIB
    pages = (inflate_mib * MIB) >> PAGE_SHIFT
    with tempfile.TemporaryDirectory(prefix="mb-bench-", dir="/tmp") as tmp:
        rd = run_dir if run_dir is not None else Path(tmp)
        t0 = time.monotonic()
        b = await QemuBackend.create(
            [QemuGuest(name, max_mib=guest_mib, accel=accel)], run_dir=rd,
            budget_bytes=ram + 512 * MIB, image=image, qmp_timeout_s=10.0,
        )
        async with b:
            boot_s = time.monotonic() - t0
            proc = b.process(name)
            assert proc is not None
            await _touch_and_free(b, name, proc)
            rss_before = proc.rss_bytes()
            t = time.monotonic()
            if not await b.apply_target(name, pages):
                raise BalloonStuckError("the backend could not set the target")
            await _wait_pages(b, name, pages)
            inflate_s = time.monotonic() - t
            rss_after = proc.rss_bytes()

            await b.apply_target(name, 0)
            await _wait_pages(b, name, 0)
            await _touch_and_free(b, name, proc)
            qmp = b.qmp(name)
            t = time.monotonic()
            await qmp.execute("balloon", {"value": ram - pages * PAGE_SIZE})
            await _wait_logical(qmp, ram - pages * PAGE_SIZE)
            direct_s = time.monotonic() - t
    return {
        "accel": proc.accel,
        "guest_mib": guest_mib,
        "inflate_mib": inflate_mib,
        "boot_seconds": round(boot_s, 3),
        "inflate_seconds": round(inflate_s, 4),
        "inflate_gib_per_s": round(inflate_mib * MIB / GIB / inflate_s, 3),
        "direct_inflate_seconds": round(direct_s, 4),
        "overhead_ratio": round(inflate_s / direct_s, 3),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "budget": b.budget.describe() if b.budget is not None else "none",
    }


def _cmd(args: argparse.Namespace) -> int:
    result = asyncio.run(run_bench(accel=args.accel, guest_mib=args.guest_mib,
                                   inflate_mib=args.inflate_mib))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<24} {v}")
    sys.stdout.flush()
    return 0


def register(bsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = bsub.add_parser(
        "qemu", help="a real QEMU guest: inflate through the manager's backend vs bare QMP",
        description="Boot a test guest, make it touch and free memory, inflate its balloon "
                    "through QemuBackend and then with a bare QMP balloon command.",
    )
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--guest-mib", type=int, default=GUEST_MIB)
    p.add_argument("--inflate-mib", type=int, default=INFLATE_MIB)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd)


__all__ = ["register", "run_bench"]
