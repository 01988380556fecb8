"""LocalBackend over a real LocalHost: snapshots with report times and ESX samples, targets."""

from __future__ import annotations

import asyncio
import json

from memballoon.local.host import GuestSpec, LocalHost
from memballoon.manager.local_backend import LocalBackend
from memballoon.protocol.pressure import PressureReport


def test_states_reports_and_targets() -> None:
    async def go() -> None:
        spec = GuestSpec("g", 64, "virtio", "steady", period_s=0.2)
        async with LocalHost([spec], budget_bytes=None) as host:
            b = LocalBackend(host)
            assert await host.wait_until(lambda s: s["g"].report is not None, 20.0)
            st = (await b.guests())["g"]
            assert st.alive and st.ram_pages == spec.pages and st.report_time is not None
            assert st.active_sampled == 100 and 0 <= st.active_touched <= 100  # ESX sample
            t0 = st.report_time
            assert (await b.guests())["g"].report_time == t0  # same report, same time
            assert await b.set_target("g", 1024)
            assert await host.wait_until(lambda s: s["g"].actual_pages == 1024, 20.0)
            st = (await b.guests())["g"]
            assert (st.target_pages, st.balloon_pages) == (1024, 1024)
            assert b.host_resident_bytes() == host.resident_bytes() > 0
            assert not await b.set_target("nobody", 1)
            assert not await b.set_target("g", spec.pages + 1)
            assert b.counters["set_target_refused"] == 2

    asyncio.run(go())


def test_report_without_sampling_fields_still_decodes() -> None:
    r = PressureReport("g", 1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0)
    doc = json.loads(r.encode())
    assert "active_sampled" not in doc  # old readers see the old shape
    r2 = PressureReport("g", 1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, None, 100, 37)
    assert PressureReport.decode(r2.encode()) == r2
    doc = json.loads(r2.encode())
    doc["active_touched"] = 101
    import pytest

    from memballoon.protocol.pressure import ReportError
    with pytest.raises(ReportError):
        PressureReport.decode(json.dumps(doc))
