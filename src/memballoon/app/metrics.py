"""Prometheus metrics of the manager (edge: an HTTP server thread from prometheus_client).

Its own ``CollectorRegistry`` (never the process-global one, so tests and several managers in
one process do not collide), served on 127.0.0.1 only. Gauges are refreshed from the manager's
last snapshot once a round (``update``); counters mirror the manager's ``Counters`` bag.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily

from memballoon.manager.port import HostMemory
from memballoon.model.counters import Counters
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample, HostSample


class _CountersCollector:
    """Exposes a ``Counters`` bag as ``memballoon_events_total{event=...}``."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def collect(self) -> Any:
        fam = CounterMetricFamily("memballoon_events", "manager and backend event counters",
                                  labels=["event"])
        for name, v in self.counters.as_dict().items():
            fam.add_metric([name], v)
        yield fam

    def describe(self) -> Any:
        return []


class ManagerMetrics:
    def __init__(self, counters: Counters) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        g = ["guest"]
        self.target = Gauge("memballoon_guest_balloon_target_bytes", "balloon target", g,
                            registry=r)
        self.actual = Gauge("memballoon_guest_balloon_actual_bytes", "balloon actual", g,
                            registry=r)
        self.ram = Gauge("memballoon_guest_ram_bytes", "guest RAM", g, registry=r)
        self.free = Gauge("memballoon_guest_free_bytes", "guest MemFree", g, registry=r)
        self.avail = Gauge("memballoon_guest_available_bytes", "guest MemAvailable", g,
                           registry=r)
        self.stall = Gauge("memballoon_guest_stall_pct", "share of the last period stalled "
                           "on memory (PSI some)", g, registry=r)
        self.refused = Gauge("memballoon_guest_refused_pages", "frames the host refused "
                             "(cumulative, from the guest's driver)", g, registry=r)
        self.alive = Gauge("memballoon_guest_alive", "1 while the guest runs", g, registry=r)
        self.resident = Gauge("memballoon_host_resident_bytes", "host memory the guests hold",
                              registry=r)
        self.budget = Gauge("memballoon_host_budget_bytes", "host budget for the guests",
                            registry=r)
        self.decisions = Gauge("memballoon_decisions", "balloon targets applied since start",
                               registry=r)
        self.host_total = Gauge("memballoon_host_total_bytes", "the host's memory (MemTotal, "
                                "or its cgroup's limit)", registry=r)
        self.host_avail = Gauge("memballoon_host_available_bytes", "the host's available "
                                "memory (MemAvailable, or what its cgroup may still take)",
                                registry=r)
        self.host_reserve = Gauge("memballoon_host_reserve_bytes", "what the host keeps "
                                  "available for itself", registry=r)
        self.host_psi = Gauge("memballoon_host_memory_pressure_pct", "host memory PSI avg10",
                              ["kind"], registry=r)
        r.register(_CountersCollector(counters))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def update(self, states: Mapping[str, GuestSample], host: HostSample | None,
               memory: HostMemory | None, *, decisions: int) -> None:
        """Refresh the gauges from one step: the guests, the policy's view of the host and
        the host's own memory (None where not read)."""
        for name, st in states.items():
            self.target.labels(name).set(st.target_pages * PAGE_SIZE)
            self.actual.labels(name).set(st.balloon_pages * PAGE_SIZE)
            self.ram.labels(name).set(st.ram_pages * PAGE_SIZE)
            self.alive.labels(name).set(1 if st.alive else 0)
            r = st.report
            if r is not None:
                self.free.labels(name).set(r.free_bytes)
                self.avail.labels(name).set(r.available_bytes)
                self.stall.labels(name).set(r.stall_pct)
                self.refused.labels(name).set(r.refused_pages or 0)
        if host is not None:
            self.resident.set(host.resident_pages * PAGE_SIZE)
            self.budget.set(host.budget_pages * PAGE_SIZE)
            self.host_reserve.set(host.reserve_pages * PAGE_SIZE)
        if memory is not None:
            self.host_total.set(memory.total_bytes)
            self.host_avail.set(memory.available_bytes)
            if memory.psi is not None:
                self.host_psi.labels("some").set(memory.psi.some_avg10)
                if memory.psi.full_avg10 is not None:
                    self.host_psi.labels("full").set(memory.psi.full_avg10)
        self.decisions.set(decisions)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0: any free port); returns the port."""
        out = start_http_server(port, addr=addr, registry=self.registry)
        if isinstance(out, tuple):  # prometheus_client >= 0.20 returns (server, thread)
            self._server, self._thread = out
            self.port = int(self._server.server_address[1])
        else:
            self.port = port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["ManagerMetrics"]
