"""Scenario files: the TOML a ``memballoon sim`` command reads, checked into ``sim.Scenario``.

A scenario is untrusted config: every value is checked, and a wrong one is one ``ConfigError``
naming the key (``guests[1].workload.peak``), the value and the unit expected. Sizes are as in
the daemon's config (``parse_size``: ``"3GiB"``, ``"512 MiB"``, bytes as an integer); many may
also be a share (``"25%"``) of what they belong to: a guest's RAM for its limits and workload,
the guests' summed RAM for the host's memory. Durations are seconds, or a number with a unit
(``"90s"``, ``"10min"``, ``"1.5h"``).

    name = "example"              # default: the file's name
    description = "..."
    duration = "30min"            # simulated time (required)
    seed = 1
    period = "1s"                 # the manager's period
    report_every = "1s"           # each guest's pressure report
    driver_period = "native"      # or a duration: every balloon driver's work period
    record_every = "0s"           # per-guest series (size, balloon, resident; ESX's estimate)
    check = "spot"                # invariants: "every" period, one guest a minute ("spot"), "end"
    max_stall_pct = 5.0           # a run is safe with no OOM kill and p99 stall under this

    [host]
    memory = "80%"                # what guests and the host's own usage share; left out: no limit
    budget = "memory"             # what the manager holds guests to: "memory" (the host's,
                                  # less the reserve; without a limit, the guests' summed
                                  # RAM), "auto" (the host's available memory
                                  # beyond the reserve, read each step), a size or a share
    reserve = "0"                 # a size or a share of the host's memory
    [[host.usage]]                # memory the host takes for itself, a while
    at = "10min"
    for = "5min"
    size = "2GiB"                 # or a share of the host's memory

    [sweep]                       # run on hosts of each share of the guests' RAM, largest first
    shares = [1.0, 0.9, 0.8]      # or from = 1.0, to = 0.4, step = 0.05

    [policy]
    name = "default"              # default, static, mom, proxmox, esx
    params = {}                   # the policy's parameters
    variants = [{tau = 0.0}, {tau = 0.75}]   # sim run: one run per set of params

    [[guests]]
    name = "web"                  # with count > 1: web-0, web-1, ...
    count = 1
    ram = "4GiB"                  # or ["1GiB", "8GiB"]: drawn per guest in ram_step steps
    ram_step = "256MiB"
    protocol = "virtio"           # vmw, vmw-batched, virtio
    min = "25%"                   # limits of the guest's size: a size or a share of its RAM
    max = "100%"
    shares = 1000
    swap = "0"
    workload = "idle"             # or a table: kind and its parameters (WORKLOAD_PARAMS)

Workload kinds and their parameters (sizes a share of the guest's RAM or a size; times
durations): ``WORKLOAD_PARAMS``. A ``trace`` reads ``csv``, a file (relative to the scenario)
with the header ``seconds,anon_mib`` or ``seconds,anon_mib,cache_mib`` and one row per change.

Built-in scenarios (``BUILTIN``) live next to this module (``scenarios/NAME.toml``); one more,
``bench-policy``, is ``bench policy``'s real-memory scenario built from its own definition.
"""

from __future__ import annotations

import csv
import math
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final

from memballoon.app.config import UNIT_HELP, parse_size
from memballoon.guest.workload import (
    Bursts,
    Bursty,
    Dbench,
    Diurnal,
    Idle,
    Ramp,
    Steady,
    Toucher,
    Trace,
    Workload,
    make_workload,
)
from memballoon.harness.pair import PROTOCOLS
from memballoon.model.errors import ConfigError, UsageError
from memballoon.model.units import MIB, PAGE_SIZE
from memballoon.policy.registry import POLICIES, policy_params
from memballoon.policy.sample import GuestSettings
from memballoon.sim.scenario import CHECKS, GuestSpec, HostUse, Scenario

BUILTIN: Final = ("idle-tax", "ws-estimator", "overcommit", "burst", "fleet", "bench-policy")
_DURATION_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|sec|min|m|h)?\s*")
_DURATION_UNITS: Final = {None: 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
_SHARE_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*")
MAX_GUESTS: Final = 100_000
MAX_SECONDS: Final = 30 * 86400.0
MAX_TRACE_ROWS: Final = 1_000_000

#: Per workload kind: parameter -> (what it is, default). "size": a share of the guest's RAM
#: or a size; "rate": the same, per second; "time": a duration; "fraction": a number within
#: [0, 1]; "number": one >= 0; "path": a file.
WORKLOAD_PARAMS: Final[dict[str, dict[str, tuple[str, object]]]] = {
    "idle": {"anon": ("size", "8%"), "file": ("size", "4%")},
    "steady": {"anon": ("size", "45%"), "file": ("size", "20%"), "hot": ("fraction", 0.5),
               "cold": ("fraction", 0.01)},
    "bursty": {"base": ("size", "10%"), "peak": ("size", "70%"), "file": ("size", "5%"),
               "period": ("time", 20.0), "burst": ("time", 6.0), "ramp": ("time", 3.0),
               "phase": ("time", None)},
    "ramp": {"start": ("size", "10%"), "peak": ("size", "85%"), "rate": ("rate", "3.125%"),
             "file": ("size", "2%"), "at": ("time", 0.0), "stop": ("time", None)},
    "diurnal": {"low": ("size", "5%"), "high": ("size", "30%"), "file": ("size", "5%"),
                "period": ("time", 3600.0), "step": ("size", "8MiB")},
    "bursts": {"base": ("size", "10%"), "spike": ("size", "40%"), "file": ("size", "5%"),
               "every": ("time", 600.0), "median": ("time", 40.0), "sigma": ("number", 1.0),
               "ramp": ("time", 10.0)},
    "dbench": {"anon": ("size", "5%"), "file": ("size", "50%"), "run": ("time", 300.0),
               "pause": ("time", 120.0), "hot": ("fraction", 0.6), "phase": ("time", 0.0)},
    "toucher": {"low": ("size", "5%"), "high": ("size", "25%"), "period": ("time", 300.0),
                "file": ("size", "1%")},
    "trace": {"csv": ("path", None), "hot": ("fraction", 0.5), "cold": ("fraction", 0.01)},
}


# ---------------------------------------------------------------------- values
def _show(v: object) -> str:
    return repr(v) if not isinstance(v, dict) else "a table"


def duration(value: object, key: str) -> float:
    """Seconds in ``value`` (a number, or a string with s, min or h)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a duration")
    if isinstance(value, int | float):
        secs = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        secs = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: {_show(value)} is not a duration; give seconds (a number) "
                          "or a number with a unit (s, min, h)")
    if not math.isfinite(secs) or secs < 0:
        raise ConfigError(f"{key}: {value!r} must be a finite duration >= 0 seconds")
    return secs


def share(value: object) -> float | None:
    """The share in ``"25%"`` (0.25), or None when ``value`` is not written as one."""
    if isinstance(value, str) and (m := _SHARE_RE.fullmatch(value)):
        return float(m.group(1)) / 100.0
    return None


def size_bytes(value: object, key: str, of_bytes: int | None = None, *,
               what: str = "") -> int:
    """Bytes in ``value``: a size, or with ``of_bytes`` a share of it (``"25%"``)."""
    s = share(value)
    if s is not None:
        if of_bytes is None:
            raise ConfigError(f"{key}: {value!r}: a share needs something to be a share of; "
                              f"give a size ({UNIT_HELP})")
        return int(s * of_bytes)
    try:
        return parse_size(value)
    except ConfigError as exc:
        hint = f", or a share of {what} like '25%'" if what else ""
        raise ConfigError(f"{key}: {exc}{hint}") from None


def _number(value: object, key: str, lo: float, hi: float, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: {_show(value)} is not a number ({unit})")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ConfigError(f"{key}: {value!r} must be within [{lo:g}, {hi:g}] ({unit})")
    return v


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: {_show(value)} is not a whole number")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} must be within [{lo}, {hi}]")
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: {_show(value)} is not a non-empty string")
    return value


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {_show(value)} is not one of {', '.join(choices)}")
    return str(value)


class _Table:
    """A TOML table being read: it knows its path, and refuses keys nobody read."""

    def __init__(self, doc: object, path: str) -> None:
        if not isinstance(doc, dict):
            raise ConfigError(f"{path or '(top level)'}: {_show(doc)} is not a table")
        self.doc: dict[str, Any] = doc
        self.path = path
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def has(self, k: str) -> bool:
        return k in self.doc

    def get(self, k: str, default: object = None) -> Any:
        self.seen.add(k)
        return self.doc.get(k, default)

    def need(self, k: str) -> Any:
        if k not in self.doc:
            raise ConfigError(f"{self.key(k)}: missing")
        return self.get(k)

    def done(self) -> None:
        extra = sorted(set(self.doc) - self.seen)
        if extra:
            raise ConfigError(f"{self.key(extra[0])}: unknown key (known here: "
                              f"{', '.join(sorted(self.seen))})")


# ---------------------------------------------------------------------- traces
def read_trace(path: Path, key: str) -> tuple[tuple[float, float, float], ...]:
    """Rows of a CSV trace: header ``seconds,anon_mib[,cache_mib]``, one row per change."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read trace {str(path)!r}: {exc.strerror}") from None
    lines = list(csv.reader(text.splitlines()))
    if not lines:
        raise ConfigError(f"{key}: trace {str(path)!r} is empty")
    header = [h.strip() for h in lines[0]]
    if header not in (["seconds", "anon_mib"], ["seconds", "anon_mib", "cache_mib"]):
        raise ConfigError(f"{key}: {path}:1: header {','.join(header)!r}; want "
                          "'seconds,anon_mib' or 'seconds,anon_mib,cache_mib'")
    units = ("seconds", "MiB", "MiB")
    rows: list[tuple[float, float, float]] = []
    for lineno, row in enumerate(lines[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ConfigError(f"{key}: {path}:{lineno}: {len(row)} columns, the header has "
                              f"{len(header)}")
        vals: list[float] = []
        for col, cell, unit in zip(header, row, units, strict=False):
            try:
                v = float(cell)
            except ValueError:
                raise ConfigError(f"{key}: {path}:{lineno}: {col} {cell.strip()!r} is not a "
                                  f"number of {unit}") from None
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{key}: {path}:{lineno}: {col} {cell.strip()!r} must be "
                                  f"a finite number of {unit} >= 0")
            vals.append(v)
        if rows and vals[0] <= rows[-1][0]:
            raise ConfigError(f"{key}: {path}:{lineno}: seconds {vals[0]:g} does not come "
                              f"after the previous row's {rows[-1][0]:g}")
        rows.append((vals[0], vals[1], vals[2] if len(vals) > 2 else 0.0))
        if len(rows) > MAX_TRACE_ROWS:
            raise ConfigError(f"{key}: {path}: more than {MAX_TRACE_ROWS} rows")
    if not rows:
        raise ConfigError(f"{key}: trace {str(path)!r} has a header but no rows")
    return tuple(rows)


# ---------------------------------------------------------------------- workloads
WorkloadMaker = Callable[[int, int], Workload]  # (RAM bytes, seed) -> workload


def workload_maker(value: object, key: str, base: Path | None) -> WorkloadMaker:
    """What builds a guest's workload from its RAM and seed, checked now (the trace read)."""
    t = _Table({"kind": value} if isinstance(value, str) else value, key)
    kind = _choice(t.need("kind"), t.key("kind"), tuple(WORKLOAD_PARAMS))
    spec = WORKLOAD_PARAMS[kind]
    raw = {p: t.get(p, default) for p, (_, default) in spec.items()}
    t.done()
    # check what does not depend on the guest now (sizes are checked against a 1 GiB guest)
    for p, (what, _) in spec.items():
        _param(raw[p], what, t.key(p), 1 << 30)
    rows = None
    if kind == "trace":
        if raw["csv"] is None:
            raise ConfigError(f"{t.key('csv')}: missing (the trace file)")
        path = Path(_str(raw["csv"], t.key("csv")))
        rows = read_trace(path if path.is_absolute() or base is None else base / path,
                          t.key("csv"))

    def make(ram_bytes: int, seed: int) -> Workload:
        v = {p: _param(raw[p], what, t.key(p), ram_bytes) for p, (what, _) in spec.items()}
        return _workload(kind, v, seed, rows, t.path, raw)

    make(1 << 30, 0)  # a bad combination (a Demand the model refuses) shows now
    return make


def _param(value: object, what: str, key: str, ram_bytes: int) -> Any:
    if value is None:
        return None
    match what:
        case "size" | "rate":
            return size_bytes(value, key, ram_bytes, what="the guest's RAM") / MIB
        case "time":
            return duration(value, key)
        case "fraction":
            return _number(value, key, 0.0, 1.0, "a fraction from 0 to 1")
        case "number":
            return _number(value, key, 0.0, 1e6, "a number >= 0")
        case _:
            return value


def _workload(kind: str, v: Mapping[str, Any], seed: int,
              rows: tuple[tuple[float, float, float], ...] | None, key: str = "workload",
              raw: Mapping[str, object] | None = None) -> Workload:
    try:
        match kind:
            case "idle":
                return Idle(anon_mib=v["anon"], file_mib=v["file"])
            case "steady":
                return Steady(anon_mib=v["anon"], file_mib=v["file"], hot=v["hot"],
                              cold_access_per_s=v["cold"])
            case "bursty":
                return Bursty(base_mib=v["base"], peak_mib=v["peak"], file_mib=v["file"],
                              period_s=v["period"] or 1.0, burst_s=v["burst"],
                              ramp_s=v["ramp"], seed=seed, phase_s=v["phase"])
            case "ramp":
                return Ramp(start_mib=v["start"], peak_mib=v["peak"], mib_per_s=v["rate"],
                            file_mib=v["file"], start_at_s=v["at"], stop_at_s=v["stop"])
            case "diurnal":
                return Diurnal(low_mib=v["low"], high_mib=v["high"], file_mib=v["file"],
                               period_s=v["period"] or 1.0, seed=seed,
                               step_mib=v["step"] or 1.0)
            case "bursts":
                return Bursts(base_mib=v["base"], spike_mib=v["spike"], file_mib=v["file"],
                              every_s=v["every"], median_s=v["median"], sigma=v["sigma"],
                              ramp_s=v["ramp"], seed=seed)
            case "dbench":
                return Dbench(anon_mib=v["anon"], file_mib=v["file"], run_s=v["run"],
                              pause_s=v["pause"], hot=v["hot"], phase_s=v["phase"])
            case "toucher":
                return Toucher(low_mib=v["low"], high_mib=v["high"], period_s=v["period"],
                               file_mib=v["file"])
            case _:
                assert rows is not None
                return Trace(rows, hot=v["hot"], cold_access_per_s=v["cold"])
    except UsageError as exc:  # the model's own limits (a time of 0 where it needs one)
        spec = WORKLOAD_PARAMS[kind]
        zero = [p for p, (what, _) in spec.items() if what == "time" and v[p] == 0]
        if zero:
            p = zero[0]
            shown = (raw or {}).get(p, 0)
            raise ConfigError(f"{key}.{p}: {shown!r} is 0 seconds; a {kind} workload needs "
                              f"a duration > 0 seconds here ({exc})") from None
        raise ConfigError(f"{key}: a {kind} workload with these values is refused: "
                          f"{exc}") from None


# ---------------------------------------------------------------------- the scenario
def _guests(items: object, seed: int, base: Path | None) -> tuple[GuestSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("guests: give at least one [[guests]] table")
    rng = random.Random(seed)
    out: list[GuestSpec] = []
    for i, item in enumerate(items):
        t = _Table(item, f"guests[{i}]")
        name = _str(t.need("name"), t.key("name"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            raise ConfigError(f"{t.key('name')}: {name!r}: letters, digits, '_', '.', '-' "
                              "(at most 63, not starting with a punctuation mark)")
        count = _int(t.get("count", 1), t.key("count"), 1, MAX_GUESTS)
        ram = t.need("ram")
        step = size_bytes(t.get("ram_step", "256MiB"), t.key("ram_step"))
        if isinstance(ram, list):
            if len(ram) != 2:
                raise ConfigError(f"{t.key('ram')}: a range is [smallest, largest]")
            lo, hi = (size_bytes(r, f"{t.key('ram')}[{j}]") for j, r in enumerate(ram))
            if not 0 < lo <= hi:
                raise ConfigError(f"{t.key('ram')}: {ram!r}: need 0 bytes < smallest <= "
                                  "largest")
            if step <= 0:
                raise ConfigError(f"{t.key('ram_step')}: {t.get('ram_step')!r}: need a step "
                                  "of more than 0 bytes")
        else:
            lo = hi = size_bytes(ram, t.key("ram"))
        if lo < 16 * MIB:
            raise ConfigError(f"{t.key('ram')}: {lo} bytes is under the 16 MiB a guest needs")
        protocol = _choice(t.get("protocol", "virtio"), t.key("protocol"), PROTOCOLS)
        lim = {k: t.get(k) for k in ("min", "max", "swap")}
        shares = _int(t.get("shares", 1000), t.key("shares"), 1, 1_000_000)
        make = workload_maker(t.need("workload"), t.key("workload"), base)
        t.done()
        for n in range(count):
            ram_bytes = lo if lo == hi else lo + step * rng.randrange((hi - lo) // step + 1)
            ram_pages = ram_bytes // PAGE_SIZE
            lims = {k: None if v is None else size_bytes(v, t.key(k), ram_bytes,
                                                         what="the guest's RAM") // PAGE_SIZE
                    for k, v in lim.items()}
            mn, mx = lims["min"] or 0, lims["max"]
            if mn > ram_pages or (mx is not None and not mn <= mx):
                raise ConfigError(
                    f"{t.key('min')} = {lim['min']!r}, {t.key('max')} = {lim['max']!r}: need "
                    f"min <= max <= RAM ({ram_bytes / MIB:g} MiB): min is "
                    f"{mn * PAGE_SIZE / MIB:g} MiB"
                    + ("" if mx is None else f", max {mx * PAGE_SIZE / MIB:g} MiB"))
            gname = name if count == 1 else f"{name}-{n}"
            out.append(GuestSpec(
                gname, ram_pages, protocol, make(ram_bytes, seed * 1000 + len(out)),
                GuestSettings(min_pages=mn, max_pages=mx, shares=shares),
                swap_pages=lims["swap"] or 0))
    names = [g.name for g in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise ConfigError(f"guests: the name {dup!r} is used twice")
    if len(out) > MAX_GUESTS:
        raise ConfigError(f"guests: {len(out)} guests; at most {MAX_GUESTS}")
    return tuple(out)


def _policy(doc: object) -> tuple[str, dict[str, Any], tuple[dict[str, Any], ...]]:
    t = _Table(doc if doc is not None else {}, "policy")
    name = _choice(t.get("name", "default"), t.key("name"), POLICIES)
    params = _Table(t.get("params", {}), t.key("params")).doc
    allowed = policy_params(name)
    variants_raw = t.get("variants", [])
    t.done()
    if not isinstance(variants_raw, list):
        raise ConfigError("policy.variants: an array of tables of parameters")
    variants = tuple(_Table(v, f"policy.variants[{i}]").doc for i, v in enumerate(variants_raw))
    for where, p in [("policy.params", params)] + [
            (f"policy.variants[{i}]", v) for i, v in enumerate(variants)]:
        bad = sorted(set(p) - set(allowed))
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: policy {name!r} has no such parameter (it "
                              f"takes {', '.join(allowed) or 'none'})")
    return name, dict(params), variants


def _sweep(doc: object) -> tuple[float, ...]:
    if doc is None:
        return ()
    t = _Table(doc, "sweep")
    if t.has("shares"):
        raw = t.get("shares")
        if not isinstance(raw, list) or not raw:
            raise ConfigError("sweep.shares: an array of shares of the guests' RAM")
        shares = [_number(s, f"sweep.shares[{i}]", 0.01, 10.0, "a share of the guests' RAM")
                  for i, s in enumerate(raw)]
    else:
        hi = _number(t.need("from"), "sweep.from", 0.01, 10.0, "a share of the guests' RAM")
        lo = _number(t.need("to"), "sweep.to", 0.01, 10.0, "a share of the guests' RAM")
        step = _number(t.need("step"), "sweep.step", 0.001, 10.0, "a share of the guests' RAM")
        if lo > hi:
            raise ConfigError("sweep: from must be at least to")
        n = math.floor((hi - lo) / step + 1e-9)
        shares = [round(hi - k * step, 6) for k in range(n + 1)]
    t.done()
    return tuple(sorted(set(shares), reverse=True))


def scenario_from_toml(text: str, *, name: str, base: Path | None = None) -> Scenario:
    """The scenario in ``text`` (``name`` if it names none; ``base``: where its files are)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    try:
        return _scenario(doc, name, base)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _scenario(doc: dict[str, Any], default_name: str, base: Path | None) -> Scenario:
    t = _Table(doc, "")
    name = _str(t.get("name", default_name), "name")
    seconds = duration(t.need("duration"), "duration")
    if not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"duration: {seconds:g} s must be within (0, {MAX_SECONDS:g}] s")
    seed = _int(t.get("seed", 1), "seed", 0, 2**31)
    period = duration(t.get("period", 1.0), "period")
    report = duration(t.get("report_every", period), "report_every")
    dp_raw = t.get("driver_period", "native")
    driver_period = None if dp_raw == "native" else duration(dp_raw, "driver_period")
    for key, v in (("period", period), ("report_every", report),
                   ("driver_period", driver_period)):
        if v is not None and not 0.01 <= v <= 3600:
            raise ConfigError(f"{key}: {v:g} s must be within [0.01, 3600] s")
    record = duration(t.get("record_every", 0.0), "record_every")
    check = _choice(t.get("check", "spot"), "check", CHECKS)
    max_stall = _number(t.get("max_stall_pct", 5.0), "max_stall_pct", 0.0, 100.0, "percent")
    description = str(t.get("description", ""))
    guests = _guests(t.need("guests"), seed, base)
    ram_bytes = sum(g.ram_pages for g in guests) * PAGE_SIZE
    policy, params, variants = _policy(t.get("policy"))
    sweep = _sweep(t.get("sweep"))
    host = _Table(t.get("host", {}), "host")
    mem = host.get("memory")
    host_bytes = None if mem is None else size_bytes(mem, "host.memory", ram_bytes,
                                                     what="the guests' summed RAM")
    if host_bytes is not None and host_bytes < PAGE_SIZE:
        raise ConfigError(f"host.memory: {mem!r} leaves no memory")
    reserve_raw = host.get("reserve", 0)
    reserve_share = share(reserve_raw)
    if reserve_share is not None and not 0 <= reserve_share < 1:
        raise ConfigError(f"host.reserve: {reserve_raw!r}: a share of the host's memory must "
                          "be under 100%")
    if reserve_share is not None and host_bytes is None and sweep:
        reserve = 0  # each host of the sweep keeps its share
    else:
        reserve = size_bytes(reserve_raw, "host.reserve", host_bytes,
                             what="the host's memory") // PAGE_SIZE
    budget_raw = host.get("budget", "memory")
    if budget_raw == "auto":
        if host_bytes is None and not sweep:
            raise ConfigError("host.budget: 'auto' reads the host's memory: set host.memory")
        budget = None
    elif budget_raw == "memory":  # without a host limit: the guests' RAM, nothing held back
        budget = max(1, (host_bytes or ram_bytes) // PAGE_SIZE - reserve)
    else:
        budget = size_bytes(budget_raw, "host.budget", host_bytes,
                            what="the host's memory") // PAGE_SIZE
        if budget <= 0:
            raise ConfigError(f"host.budget: {budget_raw!r} leaves the guests nothing")
    spans = []
    usage = host.get("usage", [])
    if not isinstance(usage, list):
        raise ConfigError("host.usage: an array of tables (at, for, size)")
    for i, u in enumerate(usage):
        ut = _Table(u, f"host.usage[{i}]")
        start = duration(ut.need("at"), ut.key("at"))
        length = duration(ut.need("for"), ut.key("for"))
        size = size_bytes(ut.need("size"), ut.key("size"), host_bytes,
                          what="the host's memory")
        ut.done()
        spans.append((start, start + length, size))
    host.done()
    t.done()
    if budget is None and host_bytes is None:
        host_bytes = ram_bytes  # a sweep sets it per point; this is the largest host's
    return Scenario(
        name=name, seconds=seconds, guests=guests, host_bytes=host_bytes, budget_pages=budget,
        reserve_pages=reserve, reserve_share=reserve_share, host_use=HostUse(tuple(spans)),
        policy=policy,
        policy_params=params, variants=variants, sweep_shares=sweep,
        max_stall_pct=max_stall, seed=seed, period_s=period, report_every_s=report,
        driver_period_s=driver_period, record_every_s=record, check=check,
        description=description)


def builtin_text(name: str) -> str:
    """The TOML of built-in scenario ``name``."""
    return resources.files("memballoon.app").joinpath("scenarios", f"{name}.toml").read_text()


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or a scenario file."""
    if name_or_path == "bench-policy":
        return bench_policy_scenario()
    if name_or_path in BUILTIN:
        return scenario_from_toml(builtin_text(name_or_path), name=name_or_path)
    path = Path(name_or_path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{name_or_path}: no built-in scenario of that name "
                          f"({', '.join(BUILTIN)}) and no such file: {exc.strerror}") from None
    return scenario_from_toml(text, name=path.stem, base=path.parent)


def bench_policy_scenario(seconds: float | None = None, seed: int = 1) -> Scenario:
    """``bench policy``'s scenario on the simulator: the same four guests, workloads, seeds,
    floors and budget (``bench/policy.py``), virtio, one manager step a second."""
    from memballoon.bench import policy as bench

    secs = bench.SECONDS if seconds is None else seconds
    specs, budget = bench.scenario(seed, secs)
    guests = tuple(
        GuestSpec(s.name, s.mib * MIB // PAGE_SIZE, s.protocol,
                  make_workload(s.workload, s.mib, s.seed),
                  GuestSettings(min_pages=int(s.mib * MIB // PAGE_SIZE * bench.FLOOR_FRACTION)))
        for s in specs)
    # no host limit: the real bench's cgroup holds the guests' budget plus their processes'
    # own interpreters, which the simulator has no model of; the manager's budget is the same
    return Scenario(name="bench-policy", seconds=secs, guests=guests, host_bytes=None,
                    budget_pages=budget // PAGE_SIZE, seed=seed,
                    description="bench policy's four local guests (bursty, ramp, steady, "
                                "idle; peaks 1.5 times the budget), simulated")


__all__ = ["BUILTIN", "WORKLOAD_PARAMS", "bench_policy_scenario", "builtin_text", "duration",
           "load_scenario", "read_trace", "scenario_from_toml", "size_bytes"]
