"""A simulation's guests in worker processes: the sharded world of ``sim run`` and ``bench sim``.

Theory of operation
-------------------
Between two manager steps the simulated guests are independent: ``SimBackend.advance`` runs
each guest's ticks, signalled driver work and reports without reading another guest. So the
guests can live in N worker processes, worker k owning the guests ``i % N == k`` for the
whole run (round-robin: a scenario lists its guests by kind, and kinds cost very
differently), while this process runs the engine (manager core and policy) as an in-process
run does. A run's results are exactly the in-process run's (a test holds them to it).

Shard 0 lives in this process (``local``, the default): it is sent its messages after the
workers, so it runs while they do, and N shards keep N processes busy (the engine runs
between two advances, when the workers wait anyway). The others are workers forked from this
process when the world is built; each builds the pairs of its own guests only
(``scenario.make_pairs``: a pair depends on its own spec, whose workload carries its seed, so
a subset's pairs are the full build's) under a ``SimBackend`` of its own, without a host.
Every shard answers the same messages (``_Shard.handle``); ``ShardedBackend``, here, is the
manager's ``Backend`` and the run's ``SimGuests``:

- ``advance``: every worker is sent the kills and targets queued for it since its last
  message, then the seconds; it applies them in the order they were made (nothing reads the
  guests between an engine step's ``set_target`` and the next ``advance``, so applying them
  late changes nothing; a target's signalled driver work runs at the start of the next
  advance in ``SimBackend`` anyway) and advances, all workers at once. Each answers with its
  guests whose sample changed (``SimBackend.changed_rows``: plain tuples, a report as its
  fields: a tenth of the cost of pickling the records; () where the guest's last row carried
  that report already, as a guest ticked between two report rounds does; a sleeping guest,
  whose report alone is new, as that report's time, stall and active sample, rebuilt here
  with ``report_unchanged`` of the report its last row made), the stall of every report it pushed
  as three arrays (report times, guest indices, stalls) and its counters. Stalls are merged
  by report time and guest index (``merge_stalls``), the in-process order, so their mean and
  percentiles are bit-identical.
- ``guests()`` rebuilds the samples of the changed guests from their rows as ``SimBackend``
  does (where only the report is new, from the last sample's figures): the same values, for
  the same guests (a policy that re-reads only the samples that are new objects sees the same
  ones); a report object is kept while its fields stand.
- ``set_target`` is checked here (a known, live guest; 0 to its RAM), counted when refused,
  and queued for the guest's worker.
- The host is this process's: it sums the guests' resident bytes and, past the host's memory,
  kills the guest holding the most, as ``SimBackend`` does; the dead guest's sample is built
  here at once and the kill is queued for its worker.
- ``sync``, ``check_guest``, ``violations`` and ``guest_oom_kills`` ask every worker (each
  first applies what is queued) and merge the answers in guest order.
- The workers' counters (ticks, idle periods, wakes, reports, signalled work) are added to
  this backend's, which the manager shares, after every answer.

ESX sampling (a policy that reads active-page samples) draws from one random generator in
guest order across the fleet, which separate processes cannot reproduce: such a run stays in
this process (``Shards`` falls back to ``scenario.build``), as does a run of one guest.

Failures: a worker that dies, answers what is not an answer or reports an exception raises
``ShardError`` naming the shard (counted as ``sim_shard_errors``); every worker is then
ended (terminate, then kill, then join), as they are at the end of a run (the world's
context). Workers are daemonic (they die with this process) and exit when their pipe closes.
Memory: each worker reports its peak resident set (``ru_maxrss``) when the world closes;
what a worker inherited from this process at the fork is counted in both.

Speed: a step costs the engine's step, then the slowest shard's advance, then this process
reading the answers (about a microsecond a changed guest: the rows unpickled and kept, the
samples built as in process; shard 0's samples are built as soon as its answer is in, while
the workers still run); the workers wait during the engine's step. On a machine whose
cores are busy with other work, each hand-over waits for a core, and a sharded run can be
slower than one in a single process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Final, NoReturn, Protocol

import numpy as np
import numpy.typing as npt

from memballoon.guest.report import report_unchanged
from memballoon.manager.engine import Engine
from memballoon.manager.port import ManualClock
from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import MemballoonError, UsageError
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Policy
from memballoon.policy.sample import GuestSample
from memballoon.protocol.pressure import PressureReport
from memballoon.sim.backend import (
    REPORT_FIELDS,
    ReportRow,
    SampleRow,
    SimBackend,
    SimCounter,
    SimHostProbe,
    guest_sample,
    host_oom_victim,
    usage_at,
)
from memballoon.sim.run import RunWorld, StallSink, collector_for_run
from memballoon.sim.scenario import (
    Scenario,
    build,
    host_usage,
    make_engine,
    make_pairs,
    make_scenario_policy,
)

#: The simulator counters a worker keeps (the rest are this process's).
WORKER_COUNTERS: Final = (SimCounter.TICKS, SimCounter.IDLE_PERIODS, SimCounter.WAKES,
                          SimCounter.REPORTS, SimCounter.SIGNALLED)
#: Longest wait for one worker's answer (an advance of a fleet's share takes milliseconds).
ANSWER_TIMEOUT_S: Final = 600.0
#: The most shards a default picks (the guests' side stops halving long before).
MAX_DEFAULT_SHARDS: Final = 4

_CTX = multiprocessing.get_context("fork")  # the scenario is in memory already: no pickling


class ShardCounter(CounterName):
    ERRORS = "sim_shard_errors"  # workers that died, failed or answered garbage


class ShardError(MemballoonError):
    """A simulation worker failed (``shard``: its number)."""

    def __init__(self, shard: int, detail: str) -> None:
        self.shard = shard
        super().__init__(f"simulation shard {shard}: {detail}")


#: A shard's stalls since its last answer: report times, guest indices, stalls.
StallColumns = tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64]]


def merge_stalls(parts: Sequence[StallColumns]) -> list[float]:
    """The stalls of ``parts`` in the in-process order: by report time, then guest index (a
    report round pushes its reports in guest order), as ``sorted`` of the (time, index,
    stall) tuples of every part in turn gives them (``lexsort`` is stable: equal keys keep
    that order too); the reference is the property test's. No time or stall is NaN (a
    report's stall is clamped to 0-100)."""
    if len(parts) == 1:
        times, indices, pcts = parts[0]
    else:
        times, indices, pcts = (np.concatenate(col) for col in zip(*parts, strict=True))
    if len(pcts) != len(times) or len(indices) != len(times):
        raise ValueError("stall columns of different lengths")
    order = np.lexsort((pcts, indices, times))
    out: list[float] = pcts[order].tolist()
    return out


def _stall_columns(cols: Any) -> StallColumns:
    """``cols`` if it is a shard's ``StallColumns``, else ``ValueError``."""
    if not (type(cols) is tuple and len(cols) == 3
            and all(type(c) is np.ndarray and c.ndim == 1 for c in cols)
            and cols[0].dtype == np.float64 and cols[1].dtype == np.int64
            and cols[2].dtype == np.float64):
        raise ValueError("not stall columns")
    return cols


# ---------------------------------------------------------------------------------- worker
def _worker(conn: Connection, sc: Scenario, shard: int, shards: int, sleep: bool,
            others: Sequence[Connection]) -> None:
    """A worker's life: build its guests, then answer messages until told to close."""
    for c in others:  # the other workers' pipes, inherited through the fork
        c.close()
    # A worker writes nothing, and must not touch the streams it inherited: a thread of the
    # parent (a progress bar's) may have held their locks at the fork, for ever in the copy.
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the worker's to its end
    try:
        _serve(conn, sc, shard, shards, sleep)
    except (EOFError, KeyboardInterrupt):
        pass  # the parent is gone, or interrupted with us: nobody to answer
    except BaseException as exc:  # reported to the parent, which raises
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}", None))
    finally:
        conn.close()


def _serve(conn: Connection, sc: Scenario, shard: int, shards: int, sleep: bool) -> None:
    """A worker's loop: build the shard, then answer each message (after ``close``, stop)."""
    s = _Shard(sc, shard, shards, sleep)
    # as an in-process run does: the guests' models out of the collector's scans, its young
    # generation collected less often
    with collector_for_run():
        conn.send(s.hello())
        while True:
            msg = conn.recv()
            conn.send(s.handle(msg))
            if msg[0] == "close":
                return


class _Shard:
    """The guests ``shard::shards`` of ``sc`` under a ``SimBackend`` of their own, answering
    the parent's messages: in a worker, or in the parent itself (``_LocalShard``)."""

    def __init__(self, sc: Scenario, shard: int, shards: int, sleep: bool, *,
                 fields: bool = True) -> None:
        self.fields = fields  # reports as their fields (to another process), or as they are
        specs = sc.guests[shard::shards]
        self.index = index = {g.name: shard + k * shards for k, g in enumerate(specs)}
        # every report's (time, guest index, stall) since the last answer, as three columns
        self.stalls: tuple[list[float], list[int], list[float]] = ([], [], [])
        times, indices, pcts = self.stalls

        def on_report(name: str, r: PressureReport) -> None:
            times.append(r.time_s)
            indices.append(index[name])
            pcts.append(r.stall_pct)

        self.backend = SimBackend(
            make_pairs(sc, specs), ManualClock(), report_every_s=sc.report_every_s,
            check=sc.check == "every", settings={g.name: g.settings for g in specs},
            sleep=sleep, on_report=on_report)

    def stall_columns(self) -> StallColumns:
        """The stalls since the last answer as arrays (a few bytes a report to pickle, and
        ``merge_stalls`` sorts them without a tuple a report); the lists emptied."""
        times, indices, pcts = self.stalls
        cols = (np.array(times, dtype=np.float64), np.array(indices, dtype=np.int64),
                np.array(pcts, dtype=np.float64))
        for col in self.stalls:
            col.clear()
        return cols

    def counts(self) -> tuple[int, ...]:
        return tuple(self.backend.counters[c] for c in WORKER_COUNTERS)

    def hello(self) -> tuple[str, Any, tuple[int, ...]]:
        """The first answer: every guest's row."""
        return ("ok", self.backend.changed_rows(fields=self.fields), self.counts())

    def handle(self, msg: tuple[str, list[str], list[tuple[str, int]], Any],
               ) -> tuple[str, Any, tuple[int, ...]]:
        """Apply the kills and targets ``msg`` carries, then do what it asks."""
        op, kills, targets, arg = msg
        b = self.backend
        for name in kills:
            b.kill(name)
        for name, pages in targets:
            b.set_target(name, pages)
        payload: Any = None
        if op == "advance":
            b.advance(arg)
            payload = (b.changed_rows(fields=self.fields), self.stall_columns())
        elif op == "sync":
            b.sync()
        elif op == "check":  # every shard syncs, as ``SimBackend.check_guest`` syncs all
            if arg in self.index:
                payload = b.check_guest(arg)
            else:
                b.sync()
        elif op == "violations":
            payload = b.guest_violations(full=arg)
        elif op == "oom":
            payload = b.guest_oom_kills()
        elif op == "close":
            payload = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            raise UsageError(f"unknown message {op!r}")
        return ("ok", payload, self.counts())


class _Link(Protocol):
    """What the parent uses of a shard's end of the pipe."""

    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...

    def poll(self, timeout: float = 0.0) -> bool: ...

    def close(self) -> None: ...


class _LocalShard:
    """A shard in the parent, behind the part of ``Connection`` the parent uses: a message
    is handled as it is sent (after the workers' are sent: they run meanwhile)."""

    def __init__(self, shard: _Shard) -> None:
        self.shard = shard
        self.answer: Any = shard.hello()

    def send(self, msg: Any) -> None:
        self.answer = self.shard.handle(msg)

    def recv(self) -> Any:
        return self.answer

    def poll(self, timeout: float = 0.0) -> bool:
        return True

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------- parent
class ShardedBackend:
    """The guests of ``sc`` in ``shards`` worker processes (module docstring)."""

    def __init__(self, sc: Scenario, shards: int, *, stalls: StallSink,
                 sleep: bool = True, local: bool = True) -> None:
        n = len(sc.guests)
        if not 1 <= shards <= n:
            raise UsageError(f"shards must be 1 to {n} (the guests), got {shards}")
        self.clock = ManualClock()
        self.counters = Counters()
        self.host_bytes = sc.host_bytes
        self.host_usage = host_usage(sc)
        self.host_oom_kills = 0
        self.worker_peak_rss_bytes: list[int] = []
        self._stalls = stalls
        self._n = shards
        self._names = [g.name for g in sc.guests]
        self._settings = [g.settings for g in sc.guests]
        self._by_name = {name: i for i, name in enumerate(self._names)}
        # each guest's last ``SampleRow`` as its worker sent it, and what this process changed
        # since: alive, resident bytes (a kill); its report and report time (of that row, or
        # of a ``ReportRow`` since), the fields that report was built from (None: from a
        # ``ReportRow``); whether its sample must be built from the row again (a row or a
        # kill since the last build; else only the report is new)
        self._rows: list[SampleRow] = [(0, 0, 0, 0, None, None, True, 0)] * n
        self._report: list[PressureReport | None] = [None] * n
        self._report_time: list[float | None] = [None] * n
        self._fields: list[tuple[Any, ...] | PressureReport | None] = [None] * n
        self._renew = [True] * n
        self._alive = [True] * n
        self._resident = [0] * n
        self._resident_sum = 0
        # ``guests()`` as ``SimBackend.guests``: cached samples, the guests whose sample must be
        # built again, the last answer and its figures by guest
        self._sampled = [False] * n
        self._stale: list[int] = list(range(n))  # every sample built once the rows are in
        self._samples: dict[str, GuestSample] = {}
        self._returned: Mapping[str, GuestSample] | None = None
        self._balloon_arr: npt.NDArray[np.int64] = np.zeros(n, dtype=np.int64)
        self._resident_arr: npt.NDArray[np.int64] = np.zeros(n, dtype=np.int64)
        # what waits for each worker's next message, and its counters as last answered
        self._kills: list[list[str]] = [[] for _ in range(shards)]
        self._targets: list[list[tuple[str, int]]] = [[] for _ in range(shards)]
        self._counts: list[tuple[int, ...]] = [(0,) * len(WORKER_COUNTERS)] * shards
        # shard 0 in this process (``local``) or a worker like the others; the local one is
        # sent its messages last, so that it runs while the workers do
        self._conns: list[_Link] = []
        self._procs: list[BaseProcess | None] = []
        self._order = [*range(1, shards), 0] if local else list(range(shards))
        self._closed = False
        try:
            for k in range(shards):
                if k == 0 and local:
                    self._conns.append(_LocalShard(_Shard(sc, 0, shards, sleep, fields=False)))
                    self._procs.append(None)
                    continue
                mine, theirs = _CTX.Pipe()
                p = _CTX.Process(target=_worker, name=f"memballoon-sim-shard-{k}", daemon=True,
                                 args=(theirs, sc, k, shards, sleep,
                                       [c for c in self._conns if isinstance(c, Connection)]))
                p.start()
                theirs.close()  # the worker's end: ours closed, its death reads as EOF here
                self._conns.append(mine)
                self._procs.append(p)
            for k in range(shards):
                self._apply(k, self._recv(k))
            # every sample built now, in guest order (the order of the samples' mapping, which
            # ``advance`` keeps while it builds shard 0's first)
            self._build_samples(self._stale)
            self._stale.clear()
        except BaseException:
            self.close(force=True)
            raise

    @property
    def name(self) -> str:
        return "sim"

    @property
    def shards(self) -> int:
        return self._n

    # ------------------------------------------------------------------ messages
    def _ask(self, op: str, arg: Any = None) -> list[Any]:
        """Send ``op`` (after what is queued) to every worker; their answers, by shard."""
        self._send(op, arg)
        return [self._recv(k) for k in range(self._n)]

    def _send(self, op: str, arg: Any) -> None:
        """Send ``op`` (after what is queued) to every shard, the local one last (it answers
        as it is sent, while the workers run)."""
        for k in self._order:
            c = self._conns[k]
            msg = (op, self._kills[k], self._targets[k], arg)
            self._kills[k], self._targets[k] = [], []
            try:
                c.send(msg)
            except OSError as exc:
                self._fail(k, f"cannot be written to ({exc}); {self._exit(k)}")

    def _recv(self, k: int) -> Any:
        c, p = self._conns[k], self._procs[k]
        if isinstance(c, Connection) and p is not None and not c.poll(0):  # answer or end
            if not wait([c, p.sentinel], ANSWER_TIMEOUT_S):
                self._fail(k, f"no answer in {ANSWER_TIMEOUT_S:g} s")
            if not c.poll(0):  # its end came first (what it wrote before is readable)
                self._fail(k, f"died; {self._exit(k)}")
        try:
            msg = c.recv()
        except (EOFError, OSError):
            self._fail(k, f"died; {self._exit(k)}")
        except Exception as exc:  # whatever unpickling garbage raises
            self._fail(k, f"answered garbage ({type(exc).__name__})")
        if type(msg) is tuple and len(msg) == 3:
            tag, payload, counts = msg
            if tag == "error":
                self._fail(k, f"failed: {payload}")
            if (tag == "ok" and type(counts) is tuple and len(counts) == len(WORKER_COUNTERS)
                    and all(type(c) is int for c in counts)):
                self._count(k, counts)
                return payload
        self._fail(k, f"answered garbage: {msg!r:.80}")

    def _exit(self, k: int) -> str:
        p = self._procs[k]
        if p is None:
            return "in this process"
        p.join(1.0)
        return f"exit code {p.exitcode}" if p.exitcode is not None else "still running"

    def _fail(self, k: int, detail: str) -> NoReturn:
        self.counters.inc(ShardCounter.ERRORS)
        self.close(force=True)
        raise ShardError(k, detail)

    def _count(self, k: int, counts: tuple[int, ...]) -> None:
        for name, new, old in zip(WORKER_COUNTERS, counts, self._counts[k], strict=True):
            if new > old:
                self.counters.inc(name, new - old)
        self._counts[k] = counts

    def _apply(self, k: int, rows: list[SampleRow | ReportRow]) -> None:
        """The rows of worker ``k``'s changed guests (local indices: guest ``k + j * N``);
        the reports are built from them now, the samples at the next ``guests()`` (a
        fleet's worth a step: kept to a few list stores a row)."""
        n, last, alive, resident = self._n, self._rows, self._alive, self._resident
        reports, times, fields, names = self._report, self._report_time, self._fields, self._names
        renew, sampled, stale = self._renew, self._sampled, self._stale
        delta = 0
        try:
            for row in rows:
                i = k + row[0] * n
                if len(row) == 8:  # a ``SampleRow``
                    f = row[4]
                    if not (f is None or type(f) is PressureReport
                            or (type(f) is tuple and len(f) in (0, len(REPORT_FIELDS)))):
                        raise ValueError("a row without a report's fields")
                    live = row[6]
                    if not live and not alive[i]:
                        continue  # the worker's echo of a kill made here: nothing new
                    last[i] = row
                    alive[i] = live
                    delta += row[7] - resident[i]
                    resident[i] = row[7]
                    renew[i] = True
                    if type(f) is tuple and not f:  # its last row's (or ``ReportRow``'s) report
                        if reports[i] is None:
                            raise ValueError("a report repeated without one")
                    elif f is not fields[i]:
                        if f is None or isinstance(f, PressureReport):  # the local shard's
                            reports[i] = f
                        elif f != fields[i]:  # new fields (mostly: the time first, told at once)
                            reports[i] = PressureReport(names[i], *f)
                        fields[i] = f
                    times[i] = row[5]
                else:  # a ``ReportRow``: the report repeated, of a guest alive with one
                    prev = reports[i]
                    if prev is None or not alive[i]:
                        raise ValueError("a repeated report without one")
                    if len(row) == 6:
                        reports[i] = report_unchanged(prev, row[2], stall_pct=row[3],
                                                      active_sampled=row[4],
                                                      active_touched=row[5])
                    elif len(row) == 3 and type(row[2]) is PressureReport:
                        reports[i] = row[2]
                    else:
                        raise ValueError(f"a row of {len(row)} values")
                    fields[i] = None
                    times[i] = row[1]
                if sampled[i]:
                    sampled[i] = False
                    stale.append(i)
        except (TypeError, ValueError, IndexError) as exc:
            self._fail(k, f"answered garbage rows ({exc})")
        finally:
            self._resident_sum += delta

    # ------------------------------------------------------------------ the run
    def advance(self, seconds: float) -> float:
        """Every worker advances its guests by ``seconds`` (module docstring); then the host
        takes its memory back if it must."""
        end = self.clock.now() + seconds
        self._send("advance", seconds)
        answers: list[Any] = []
        for k in range(self._n):
            answer = self._recv(k)
            if not (type(answer) is tuple and len(answer) == 2):
                self._fail(k, f"answered garbage: {answer!r:.80}")
            self._apply(k, answer[0])
            answers.append(answer)
            if k == 0 and self._n > 1:
                # shard 0's answer is in while the others still run: build the samples of its
                # guests now, in what would be a wait (the rest wait for their rows)
                n, stale = self._n, self._stale
                mine = [i for i in stale if i % n == 0]
                if mine:
                    self._build_samples(mine)
                    stale[:] = [i for i in stale if i % n]
        try:
            merged = merge_stalls([_stall_columns(a[1]) for a in answers])
        except (TypeError, ValueError) as exc:  # which worker's, the merge cannot tell
            self._fail(0, f"(or another) answered garbage stalls ({exc})")
        self._stalls(merged)
        self.clock.set(max(self.clock.now(), end))
        self._enforce_host()
        return end

    def sync(self) -> None:
        self._ask("sync")

    def check_guest(self, name: str) -> list[str]:
        i = self._by_name[name]
        out: list[str] = self._ask("check", name)[i % self._n]
        return out

    def violations(self, *, full: bool = True) -> list[str]:
        by_shard = self._ask("violations", full)
        return [f"{name}: {v}" for i, name in enumerate(self._names)
                for v in by_shard[i % self._n][i // self._n]]

    def guest_oom_kills(self) -> list[int]:
        by_shard = self._ask("oom")
        return [int(by_shard[i % self._n][i // self._n]) for i in range(len(self._names))]

    def close(self, *, force: bool = False) -> None:
        """End every worker (asked, and its peak memory kept; with ``force``, at once)."""
        if self._closed:
            return
        self._closed = True
        peaks: list[int] = []
        for c, p in zip(self._conns, self._procs, strict=True):
            if force or p is None:
                continue
            try:
                c.send(("close", [], [], None))
                if c.poll(10.0):
                    msg = c.recv()
                    peaks.append(int(msg[1]))
            except (OSError, EOFError, TypeError, ValueError, IndexError):
                peaks.append(0)
        self.worker_peak_rss_bytes = peaks
        for p in filter(None, self._procs):
            p.join(0 if force else 10.0)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self._conns:
            c.close()

    # ------------------------------------------------------------------ the Backend port
    def alive(self, name: str) -> bool:
        return self._alive[self._by_name[name]]

    def guests(self) -> dict[str, GuestSample]:
        stale = self._stale
        if stale:
            self._build_samples(stale)
            stale.clear()
        snap = self._returned = dict(self._samples)
        return snap

    def _build_samples(self, stale: list[int]) -> None:
        """The samples of the guests ``stale``: from their rows where those are new (the
        per-guest figures stored into the arrays at once: a numpy store a guest costs as
        much as the sample), else the last sample's figures with the new report."""
        out, names, settings = self._samples, self._names, self._settings
        rows, reports, times, alives = self._rows, self._report, self._report_time, self._alive
        resident, renew, sampled = self._resident, self._renew, self._sampled
        built: list[int] = []
        balloons: list[int] = []
        for i in stale:
            name = names[i]
            sampled[i] = True
            if not renew[i]:  # only the report is new (or nothing: a target set here)
                b = out[name]
                out[name] = guest_sample(name, b.ram_pages, b.balloon_pages, b.target_pages,
                                         b.settings, reports[i], times[i], b.alive,
                                         resident[i])
                continue
            renew[i] = False
            row, alive = rows[i], alives[i]
            bal = row[2] if alive else 0
            out[name] = guest_sample(name, row[1], bal, row[3], settings[i], reports[i],
                                     times[i], alive, resident[i])
            built.append(i)
            balloons.append(bal)
        if built:
            self._balloon_arr[built] = balloons
            self._resident_arr[built] = [resident[i] for i in built]

    def sample_figures(
        self, samples: Mapping[str, GuestSample],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
        """As ``SimBackend.sample_figures``."""
        if samples is not self._returned:
            return None
        return self._balloon_arr, self._resident_arr

    def set_target(self, guest: str, balloon_pages: int) -> bool:
        i = self._by_name.get(guest)
        if i is None or not self._alive[i] or not 0 <= balloon_pages <= self._rows[i][1]:
            self.counters.inc(SimCounter.SET_TARGET_REFUSED)
            return False
        self._targets[i % self._n].append((guest, balloon_pages))
        self._mark(i)
        return True

    def host_resident_bytes(self) -> int:
        return self._resident_sum

    def resident_pages(self) -> int:
        return self._resident_sum // PAGE_SIZE

    # ------------------------------------------------------------------ the host
    def usage_bytes(self) -> int:
        """What the host takes for itself now."""
        return usage_at(self.host_usage, self.clock.now())

    def _mark(self, i: int) -> None:
        if self._sampled[i]:
            self._sampled[i] = False
            self._stale.append(i)

    def _enforce_host(self) -> None:
        if self.host_bytes is None:
            return
        while self._resident_sum + self.usage_bytes() > self.host_bytes:
            alive, names = self._alive, self._names
            victim = host_oom_victim((r, names[i]) for i, r in enumerate(self._resident)
                                     if alive[i])
            if victim is None:
                return
            self._kill(self._by_name[victim])
            self.host_oom_kills += 1
            self.counters.inc(SimCounter.HOST_OOM_KILLS)

    def _kill(self, i: int) -> None:
        """As ``SimBackend.kill``; the worker is told with its next message."""
        self._alive[i] = False
        self._resident_sum -= self._resident[i]
        self._resident[i] = 0
        self._renew[i] = True
        self._mark(i)
        self._kills[i % self._n].append(self._names[i])


@dataclass
class ShardWorld:
    """A sharded run's world: the backend, the engine over it, the policy."""

    backend: ShardedBackend
    engine: Engine
    policy: Policy


class Shards:
    """A ``sim.run.BuildWorld`` spreading a run's guests over ``shards`` processes: with
    ``local``, this one (which runs the engine too) and ``shards - 1`` workers, else
    ``shards`` workers; 1: in this process, as ``scenario.build``. After a run, ``used`` is
    the shards it had and ``worker_peak_rss_bytes`` each worker's peak memory."""

    def __init__(self, shards: int, *, local: bool = True) -> None:
        if shards < 1:
            raise UsageError(f"shards must be positive, got {shards}")
        self.shards = shards
        self.local = local
        self.used = 1
        self.worker_peak_rss_bytes: list[int] = []

    def __call__(self, sc: Scenario, stalls: StallSink,
                 sleep: bool) -> contextlib.AbstractContextManager[RunWorld]:
        pol = make_scenario_policy(sc)
        self.worker_peak_rss_bytes = []
        self.used = 1 if pol.name == "esx" else min(self.shards, len(sc.guests))
        if self.used <= 1:  # ESX samples from one rng in guest order: in this process
            w = build(sc, on_report=lambda name, r: stalls((r.stall_pct,)), sleep=sleep,
                      policy=pol)
            return contextlib.nullcontext(w)
        # built now, as ``scenario.build`` builds (a run freezes the collector after)
        b = ShardedBackend(sc, self.used, stalls=stalls, sleep=sleep, local=self.local)
        return self._closing(ShardWorld(b, make_engine(sc, b, SimHostProbe(b), pol), pol))

    @contextlib.contextmanager
    def _closing(self, w: ShardWorld) -> Iterator[RunWorld]:
        try:
            yield w
        finally:
            w.backend.close()
            self.worker_peak_rss_bytes = w.backend.worker_peak_rss_bytes


def default_shards() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_SHARDS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this system
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_SHARDS, cpus))


__all__ = ["ShardCounter", "ShardError", "ShardWorld", "ShardedBackend", "Shards",
           "StallColumns", "default_shards", "merge_stalls"]
