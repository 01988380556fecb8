"""The engine: collect, decide, act and journal, one synchronous step at a time.

Theory of operation
-------------------
Every world runs the manager through this one object, the way SimPy's real-time environment
differs from the simulated one only in its clock:

- the daemon and the demo wrap it in an asyncio loop (``edge.aio.AsyncEngine``: the backend's
  socket I/O before and after a step, a sleep between steps, the real clock);
- the simulator and the tests call ``step`` in a plain loop with a ``ManualClock``: an hour of
  managed guests is a loop of 3,600 calls, with no sleep.

``step()`` reads the clock once, asks the backend for its samples (``collect``), hands them to
``ManagerCore.step`` (the policy and its distrust: floors, hysteresis, safety), sets each target
through the backend and journals it with whether the backend took it. Nothing the backend does
stops a step for the others: a failed collect costs that round only (``backend_error``); a
``set_target`` that raises is counted (``set_target_error``) and journaled as not applied.

Manual targets (``set_manual``) and the shutdown deflation (``shutdown``/``shutdown_pending``)
go through the same collect, core and journal. The engine does no I/O of its own and reads no
clock but the one it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from memballoon.manager.core import DECISIONS, Action, ManagerCore, ManagerCounter
from memballoon.manager.port import Backend, Clock, HostMemory, HostProbe, JournalSink
from memballoon.model.counters import Counters
from memballoon.model.errors import UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.sample import GuestSample

log = logging.getLogger(__name__)


class Engine:
    """One manager over one backend (module docstring)."""

    def __init__(
        self,
        backend: Backend,
        core: ManagerCore,
        journal: JournalSink,
        clock: Clock,
        *,
        host_probe: HostProbe | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.backend = backend
        self.host_probe = host_probe
        self.host: HostMemory | None = None  # the last reading of the host's own memory
        self.core = core
        self.journal = journal
        self.clock = clock
        self.counters = counters if counters is not None else core.counters
        self.guests: Mapping[str, GuestSample] = {}  # the last collect's samples
        self.last_applied: list[Action] = []  # the last step's actions the backend took
        self.host_resident_bytes = 0
        self.decisions = 0  # targets the backend took
        self.steps = 0

    def now(self) -> float:
        return self.clock.now()

    # ------------------------------------------------------------------ the step
    def collect(self) -> Mapping[str, GuestSample] | None:
        """The backend's samples (kept in ``guests``), or None when it failed this round."""
        try:
            guests = self.backend.guests()
            resident = self.backend.host_resident_bytes()
        except Exception as exc:  # the backend is an edge: any failure costs one round only
            self.counters.inc(ManagerCounter.BACKEND_ERROR)
            log.warning("backend %s failed to report: %r", self.backend.name, exc)
            return None
        self.guests, self.host_resident_bytes = guests, resident
        if self.host_probe is not None:
            try:
                self.host = self.host_probe.read()
            except Exception as exc:  # a failed read costs the host figures, not the round
                self.counters.inc(ManagerCounter.HOST_MEMORY_ERROR)
                log.warning("host memory: %s", exc)
                self.host = None
        return guests

    def apply(self, a: Action, now: float) -> bool:
        """Set ``a``'s target through the backend and journal it with the outcome."""
        try:
            ok = bool(self.backend.set_target(a.guest, a.new_pages))
        except Exception as exc:  # one guest's failure is that guest's only
            self.counters.inc(ManagerCounter.SET_TARGET_ERROR)
            log.warning("set_target(%s, %d) failed: %r", a.guest, a.new_pages, exc)
            ok = False
        if not ok:
            self.counters.inc(ManagerCounter.SET_TARGET_FAILED)
        else:
            self.decisions += 1
            self.counters.inc(DECISIONS[a.kind])
        self.journal.write({**a.record(), "applied": ok, **self._host_record()}, mono=now)
        return ok

    def _host_record(self) -> dict[str, object]:
        """The host figures behind a decision, for the journal (none where unknown)."""
        h = self.core.last_host
        if h is None:
            return {}
        host: dict[str, object] = {"resident_bytes": h.resident_pages * PAGE_SIZE,
                                   "budget_bytes": h.budget_pages * PAGE_SIZE}
        if h.available_pages is not None:
            host.update(available_bytes=h.available_pages * PAGE_SIZE,
                        reserve_bytes=h.reserve_pages * PAGE_SIZE,
                        psi_some_avg10=h.psi_some_avg10)
        return {"host": host}

    def host_short(self) -> bool:
        """Whether the host's available memory is under its reserve now (a fresh read of the
        probe; False without one, or when it cannot be read)."""
        if self.host_probe is None:
            return False
        try:
            host = self.host_probe.read()
        except Exception:  # the next step reads it again and counts the failure
            return False
        return host.available_bytes // PAGE_SIZE < self.core.reserve_pages

    def step(self) -> list[Action]:
        """One round: collect, decide, act, journal. Returns the actions taken (applied or
        not; the journal says which)."""
        self.steps += 1
        guests = self.collect()
        if guests is None:
            return []
        now = self.clock.now()
        actions = self.core.step(now, guests, self.host_resident_bytes, self.host)
        for e in self.core.drain_events():
            self.journal.write({"kind": e.kind, "guest": e.guest, "reason": e.detail}, mono=now)
        self.last_applied = [a for a in actions if self.apply(a, now)]
        return actions

    # ------------------------------------------------------------------ manual targets
    def set_manual(self, guest: str, balloon_pages: int, *,
                   force: bool = False) -> tuple[Action, bool]:
        """Pin ``guest``'s balloon; UsageError for an unknown or dead guest, ConfigError for a
        size under its safety floor unless ``force`` (``ManagerCore.set_manual``)."""
        guests = self.collect()
        if guests is None or guest not in guests:
            raise UsageError(f"no guest named {guest!r}")
        s = guests[guest]
        if not s.alive:
            raise UsageError(f"guest {guest!r} is not alive")
        now = self.clock.now()
        a = self.core.set_manual(now, s, balloon_pages, force=force)
        return a, self.apply(a, now)

    def clear_manual(self, guest: str) -> bool:
        return self.core.clear_manual(guest)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> dict[str, int]:
        """Deflate every live guest to its max size (journaled); returns the balloon each
        must reach (see ``shutdown_pending``)."""
        guests = self.collect()
        if guests is None:
            return {}
        now = self.clock.now()
        actions = self.core.shutdown_actions(guests)
        for a in actions:
            self.apply(a, now)
        return {a.guest: a.new_pages for a in actions}

    def shutdown_pending(self, want: Mapping[str, int]) -> dict[str, int]:
        """Of ``want``, the live guests whose balloon is not there yet."""
        guests = self.collect() or {}
        return {g: p for g, p in want.items()
                if g in guests and guests[g].alive and guests[g].balloon_pages != p}

    def shutdown_incomplete(self, pending: Mapping[str, int], wait_s: float) -> None:
        """Count and journal the balloons that did not get there in ``wait_s``."""
        now = self.clock.now()
        for g, p in pending.items():
            self.counters.inc(ManagerCounter.SHUTDOWN_DEFLATE_INCOMPLETE)
            self.journal.write({"kind": "shutdown_incomplete", "guest": g,
                                "reason": f"balloon not at {p} pages after {wait_s} s"},
                               mono=now)


__all__ = ["Engine"]
