"""Metrics: served on localhost from their own registry, scraped over HTTP."""

from __future__ import annotations

import urllib.request

from memballoon.app.metrics import ManagerMetrics
from memballoon.manager.core import ManagerCounter
from memballoon.manager.port import HostMemory
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample, HostSample
from memballoon.protocol.pressure import PressureReport
from memballoon.protocol.procfs import Psi


def test_scrape() -> None:
    c = Counters()
    c.inc(ManagerCounter.POLICY_ERROR, 2)
    m = ManagerMetrics(c)
    rep = PressureReport("a", 1.0, 1 << 28, 1000, 2000, 0, 0, 0, 0, 0, 0, 0, 0, 12.5, 0, 0, 7)
    m.update({"a": GuestSample("a", 65536, 300, 400, report=rep, report_time=0.0),
              "b": GuestSample("b", 65536, 0, 0, alive=False)},
             HostSample(budget_pages=(1 << 30) // PAGE_SIZE, resident_pages=3,
                        reserve_pages=10),
             HostMemory(total_bytes=8 << 30, available_bytes=5 << 30,
                        psi=Psi(1.5, 0.5, 100, 0.25, 10), source="/proc/meminfo"),
             decisions=9)
    port = m.serve(0)
    try:
        assert m.port == port and port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        m.close()
    body = text.decode()
    v = {k: float(x) for k, _, x in (ln.rpartition(" ") for ln in body.splitlines()
                                     if ln and not ln.startswith("#"))}
    assert v['memballoon_guest_balloon_target_bytes{guest="a"}'] == 400 * PAGE_SIZE
    assert v['memballoon_guest_balloon_actual_bytes{guest="a"}'] == 300 * PAGE_SIZE
    assert v['memballoon_guest_free_bytes{guest="a"}'] == 1000.0
    assert v['memballoon_guest_available_bytes{guest="a"}'] == 2000.0
    assert v['memballoon_guest_stall_pct{guest="a"}'] == 12.5
    assert v['memballoon_guest_refused_pages{guest="a"}'] == 7.0
    assert v['memballoon_guest_alive{guest="b"}'] == 0.0
    assert v["memballoon_host_resident_bytes"] == 3.0 * PAGE_SIZE
    assert v["memballoon_host_available_bytes"] == float(5 << 30)
    assert v["memballoon_host_total_bytes"] == float(8 << 30)
    assert v["memballoon_host_reserve_bytes"] == 10.0 * PAGE_SIZE
    assert v['memballoon_host_memory_pressure_pct{kind="some"}'] == 1.5
    assert v['memballoon_host_memory_pressure_pct{kind="full"}'] == 0.25
    assert v["memballoon_host_budget_bytes"] == float(1 << 30)
    assert v["memballoon_decisions"] == 9.0
    assert v['memballoon_events_total{event="policy_error"}'] == 2.0
    assert "python_gc_objects_collected_total" not in body  # not the global registry
