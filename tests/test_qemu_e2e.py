"""(b) of issue 5: two real guests under a host budget, the manager with the default policy.

One guest idles; the other runs a memory hog (tmpfs: memory it cannot reclaim, there is no
swap) that grows past its start share. The manager must move memory from the idle guest to
the busy one with no OOM kill in either guest kernel (checked on their consoles and in the
agent's vmstat oom_kill) and keep the QEMUs inside the budget (a memory cgroup enforces it
where we are root: it must record no OOM kill either). deflate-on-oom is off: only the
manager can give the busy guest memory back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from memballoon.edge.aio import AsyncEngine
from memballoon.edge.journal import Journal
from memballoon.manager.core import ManagerCore
from memballoon.manager.engine import Engine
from memballoon.model.units import MIB, PAGE_SIZE, bytes_to_pages
from memballoon.policy.registry import make_policy
from memballoon.policy.sample import GuestSettings
from memballoon.qemu.backend import QemuBackend
from memballoon.qemu.image import build_guest_image
from memballoon.qemu.launch import QemuGuest

MAX_MIB = 768
START_MIB = 384
BUDGET_MIB = 1400  # below 2 x 768 MiB of RAM plus QEMU's own: the budget binds
HOG_STEP_MIB = 32
HOG_TOTAL_MIB = 512  # past the busy guest's 384 MiB start share
#: About 20 MiB/s: three manager periods per step (the default policy acts on MemAvailable
#: under its margin, so a guest that fills faster than the policy's lookahead can OOM first).
HOG_PAUSE_S = 1.5
OOM_SIGNS = ("Out of memory", "oom-kill", "Killed process", "Kernel panic")


@pytest.mark.qemu
def test_manager_moves_memory_from_idle_to_busy_guest_without_oom(tmp_path: Path) -> None:
    image = build_guest_image()

    async def main() -> None:
        specs = [QemuGuest(n, max_mib=MAX_MIB, start_mib=START_MIB, accel="tcg")
                 for n in ("idle", "busy")]
        async with await QemuBackend.create(
            specs, run_dir=tmp_path, budget_bytes=BUDGET_MIB * MIB, image=image,
            cgroup_name=f"mb-e2e-{os.getpid()}",
        ) as b:
            assert b.budget is not None
            floor = GuestSettings(min_pages=bytes_to_pages(128 * MIB))
            core = ManagerCore(make_policy("default"), {"idle": floor, "busy": floor},
                               bytes_to_pages(BUDGET_MIB * MIB), enforced=b.budget.enforced,
                               counters=b.counters)
            idle_balloon_max = 0

            def watch(e: Engine) -> None:
                nonlocal idle_balloon_max
                idle_balloon_max = max(idle_balloon_max, e.guests["idle"].balloon_pages)

            m = AsyncEngine(Engine(b, core, Journal(None), b.clock), period_s=0.5,
                            on_tick=watch)
            for _ in range(100):  # reports flowing, pre-inflation done
                snap = await b.poll()
                if all(s.report is not None and abs(s.balloon_pages - s.target_pages) <= 256
                       for s in snap.values()):
                    break
                await asyncio.sleep(0.1)
            idle_balloon0 = snap["idle"].balloon_pages
            task = asyncio.create_task(m.run())
            try:
                busy = b.process("busy")
                agent = b.agent("busy")
                assert busy is not None and agent is not None
                peak_resident = 0
                for total in range(HOG_STEP_MIB, HOG_TOTAL_MIB + 1, HOG_STEP_MIB):
                    start = len(busy.console_text())
                    await agent.send_command(f"hog {HOG_STEP_MIB}")
                    line = await busy.wait_for_console_async("MEMBALLOON-HOG", 60, after=start)
                    assert line.startswith(f"MEMBALLOON-HOG {total} rc=0"), line
                    peak_resident = max(peak_resident, b.host_resident_bytes())
                    await asyncio.sleep(HOG_PAUSE_S)
                for _ in range(20):  # let the manager settle
                    await asyncio.sleep(0.5)
                    peak_resident = max(peak_resident, b.host_resident_bytes())
            finally:
                m.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            snap = await b.poll()
            for name in ("idle", "busy"):
                proc = b.process(name)
                assert proc is not None
                console = proc.console_text()
                assert not any(sign in console for sign in OOM_SIGNS), console[-2000:]
                st = snap[name]
                assert st.alive and st.report is not None and st.report.oom_kills == 0
            busy_size = snap["busy"].ram_pages - snap["busy"].balloon_pages
            assert busy_size * PAGE_SIZE > (START_MIB + 100) * MIB  # it grew past its share
            # The idle guest gave memory while the busy one grew (the policy probes idle guests
            # down; with room left in the budget it may hand it back later).
            assert idle_balloon_max > idle_balloon0 + bytes_to_pages(16 * MIB)
            assert peak_resident <= BUDGET_MIB * MIB
            if b.budget.cgroup is not None:
                assert b.budget.cgroup.oom_kills() == 0

    asyncio.run(main())
