"""Fair shares of the host's event loop: how much one guest's input may cost per turn and period.

Theory of operation
-------------------
Everything a guest sends makes the host work: a socket message is decoded and answered, a
doorbell makes the device pop chains, walk descriptors and read buffers out of guest memory.
A guest that rings without end, or keeps a fresh round of large chains behind every doorbell,
must not freeze the loop the other guests are served on, nor take the host's CPU.

The local host serves each guest in **turns**: a turn handles the guest's pending doorbells
(a bounded number of chains at a time) and decoded messages until the guest's per-turn share
is spent, then yields to the loop (the rest goes on in a later turn, after the other guests'
ready events). Over each **period** (``period_s`` of the loop's clock) a guest may use at most
its period share; past it the guest is **throttled**: nothing more of its input is read or
processed until the period ends (its socket and doorbells are not read, so its sends block
and its doorbells coalesce). Both are counted (``FairnessCounter``). An honest guest never
comes near either: its whole RAM moved in and out of the balloon in Linux's 256-PFN arrays
fits a period's share, the rest is room.

``WorkMeter`` is the bookkeeping and nothing else: the caller passes ``now`` and charges what
it did; no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memballoon.model.counters import CounterName
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB

#: Linux's virtio-balloon array (VIRTIO_BALLOON_ARRAY_PFNS_MAX): what an honest buffer holds.
HONEST_ARRAY_PFNS: Final = 256


class FairnessCounter(CounterName):
    """What the local host counts of a guest's share (in that guest's bag)."""

    TURNS_CUT = "turns_cut"  # turns ended with work left (the per-turn share spent)
    THROTTLED = "throttled"  # periods in which the guest spent its share and was paused
    DOORBELLS_THROTTLED = "doorbells_throttled"  # doorbells that found the guest throttled


@dataclass(frozen=True, slots=True)
class WorkLimits:
    """One guest's share. ``for_guest`` scales the period's chains and bytes with its RAM."""

    turn_chains: int = 64
    turn_messages: int = 256
    turn_bytes: int = 512 * 1024
    period_s: float = 1.0
    period_doorbells: int = 4096
    period_messages: int = 65536
    period_chains: int = 4096
    period_bytes: int = 8 * MIB

    def __post_init__(self) -> None:
        for name in ("turn_chains", "turn_messages", "turn_bytes", "period_doorbells",
                     "period_messages", "period_chains", "period_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"work limits: {name} must be >= 1")
        if not 0 < self.period_s < float("inf"):
            raise ConfigError("work limits: period_s must be positive and finite")

    @classmethod
    def for_guest(cls, pages: int) -> WorkLimits:
        """The default share of a guest of ``pages`` 4 KiB pages: twice its RAM in and out of
        the balloon in honest arrays a period (chains, and their PFN bytes), on top of a floor
        for stats, the odd small buffer and set-up."""
        arrays = -(-pages // HONEST_ARRAY_PFNS)
        return cls(period_chains=1024 + 4 * arrays,
                   period_bytes=1 * MIB + 4 * 4 * pages + 16 * 4 * arrays)


@dataclass(slots=True)
class _Tally:
    doorbells: int = 0
    messages: int = 0
    chains: int = 0
    bytes: int = 0


class WorkMeter:
    """A guest's work this turn and this period against its ``WorkLimits``."""

    def __init__(self, limits: WorkLimits) -> None:
        self.limits = limits
        self._turn = _Tally()
        self._period = _Tally()
        self.period_end: float | None = None
        # the largest turn seen, for tests and benchmarks
        self.max_turn_chains = 0
        self.max_turn_messages = 0
        self.max_turn_bytes = 0
        self.turns = 0
        self.periods = 0
        self.total = _Tally()

    def start_turn(self, now: float) -> None:
        """A new turn; a new period too once the last one is over."""
        if self.period_end is None or now >= self.period_end:
            self._period = _Tally()
            self.period_end = now + self.limits.period_s
            self.periods += 1
        self._turn = _Tally()
        self.turns += 1

    def charge(self, *, doorbells: int = 0, messages: int = 0, chains: int = 0,
               nbytes: int = 0) -> None:
        for t in (self._turn, self._period, self.total):
            t.doorbells += doorbells
            t.messages += messages
            t.chains += chains
            t.bytes += nbytes
        self.max_turn_chains = max(self.max_turn_chains, self._turn.chains)
        self.max_turn_messages = max(self.max_turn_messages, self._turn.messages)
        self.max_turn_bytes = max(self.max_turn_bytes, self._turn.bytes)

    @property
    def exhausted(self) -> bool:
        """The period's share is spent: throttle until ``period_end``."""
        lim, p = self.limits, self._period
        return (p.doorbells >= lim.period_doorbells or p.messages >= lim.period_messages
                or p.chains >= lim.period_chains or p.bytes >= lim.period_bytes)

    @property
    def turn_spent(self) -> bool:
        lim, t = self.limits, self._turn
        return (t.messages >= lim.turn_messages or t.chains >= lim.turn_chains
                or t.bytes >= lim.turn_bytes or self.exhausted)

    def stats(self) -> dict[str, int]:
        """Turns, periods, the largest turn and the totals (tests, benchmarks)."""
        t = self.total
        return {"turns": self.turns, "periods": self.periods,
                "max_turn_chains": self.max_turn_chains,
                "max_turn_messages": self.max_turn_messages,
                "max_turn_bytes": self.max_turn_bytes, "doorbells": t.doorbells,
                "messages": t.messages, "chains": t.chains, "bytes": t.bytes}

    def chains_left(self) -> int:
        """Chains this turn may still pop (at least 0)."""
        lim = self.limits
        return max(0, min(lim.turn_chains - self._turn.chains,
                          lim.period_chains - self._period.chains))


__all__ = ["FairnessCounter", "WorkLimits", "WorkMeter"]
