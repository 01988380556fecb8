"""The guest pressure report: what every world tells the manager about one guest, once a period.

Local guests send it as a wire ``STATUS`` message; the QEMU world converts its in-guest agent's
lines into it; the simulator builds it directly. It is the one shape the manager consumes.

JSON codec, version 1 (``REPORT_VERSION``): one object, keys as the field names below plus
``"v": 1``. Memory figures are bytes; ``swap_in_pages``/``swap_out_pages`` are pages (vmstat
``pswpin``/``pswpout``); ``major_faults``, ``oom_kills`` and ``stall_us`` are cumulative since
the guest started; ``stall_pct`` is the share of the last period some task stalled on memory
(PSI ``some``); balloon sizes are 4 KiB pages. ``refused_pages`` is the driver's cumulative
count of frames the host refused, or null for drivers without refusals.
``active_sampled``/``active_touched`` (optional, added later; absent means 0) carry ESX-style
active-page sampling (Waldspurger 2002): of ``active_sampled`` random frames, how many the
guest touched again; encoded only when a sample was taken, so older readers still decode it.

Decoding is strict: the report comes from a guest, so anything but exactly this shape (unknown
or missing keys, wrong types, negative or unbelievable values, more than ``MAX_REPORT_BYTES``)
raises ``ReportError`` (a ``PeerError``) naming the rule broken, one ``ReportCounter`` member;
with a ``Counters`` bag it also bumps that counter (``report_<reason>``). Unknown versions are
refused rather than guessed at.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Final

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import PeerError, UsageError
from memballoon.model.record import read_only_record

REPORT_VERSION: Final = 1
#: A real report is about 500 bytes; a longer one is garbage or a flood.
MAX_REPORT_BYTES: Final = 4096
#: Counters and byte figures above 2^53 are not believable (and not exact in JSON doubles).
MAX_VALUE: Final = 2**53
MAX_NAME_CHARS: Final = 100


class ReportCounter(CounterName):
    """What ``PressureReport.decode`` counts: the rule a rejected report broke, one each."""

    REPORT_TOO_LONG = "report_too_long"  # reports over MAX_REPORT_BYTES
    REPORT_NOT_JSON = "report_not_json"  # reports that are not UTF-8 JSON
    REPORT_BAD_NUMBER = "report_bad_number"  # reports holding NaN or Infinity
    REPORT_NOT_OBJECT = "report_not_object"  # JSON that is not an object
    REPORT_BAD_VERSION = "report_bad_version"  # reports of an unknown version ("v")
    REPORT_MISSING_KEY = "report_missing_key"  # reports without a required field
    REPORT_UNKNOWN_KEY = "report_unknown_key"  # reports with a field this version does not have
    REPORT_BAD_TYPE = "report_bad_type"  # a field of the wrong type; a guest name empty or too long
    REPORT_OUT_OF_RANGE = "report_out_of_range"  # a number negative or past its bound


class ReportError(PeerError):
    """A pressure report that cannot be decoded: ``counter`` is the rule broken, ``reason`` its
    name without the ``report_`` prefix."""

    def __init__(self, counter: ReportCounter, detail: str) -> None:
        self.counter = counter
        self.reason = counter.value.removeprefix("report_")
        super().__init__(f"{self.reason}: {detail}")


@read_only_record
class PressureReport:
    guest: str
    time_s: float  # guest clock: seconds since the guest started
    total_bytes: int
    free_bytes: int
    available_bytes: int
    anon_bytes: int
    cache_bytes: int
    balloon_bytes: int
    swap_in_pages: int
    swap_out_pages: int
    major_faults: int
    oom_kills: int
    stall_us: int
    stall_pct: float
    balloon_target_pages: int
    balloon_actual_pages: int
    refused_pages: int | None = None
    active_sampled: int = 0
    active_touched: int = 0

    def encode(self) -> bytes:
        doc = {"v": REPORT_VERSION, **asdict(self)}
        if self.active_sampled == 0 and self.active_touched == 0:
            for k in _OPTIONAL_INT_FIELDS:
                del doc[k]
        data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_REPORT_BYTES:
            raise UsageError(f"report of {len(data)} bytes exceeds {MAX_REPORT_BYTES}")
        return data

    @classmethod
    def decode(cls, data: bytes | str, *, counters: Counters | None = None) -> PressureReport:
        try:
            return _decode(data)
        except ReportError as exc:
            if counters is not None:
                counters.inc(exc.counter)
            raise


_FIELDS: Final = {f.name: f for f in fields(PressureReport)}
#: Integer fields a report may leave out (they default to 0).
_OPTIONAL_INT_FIELDS: Final = ("active_sampled", "active_touched")
_INT_FIELDS: Final = frozenset(
    n for n in _FIELDS
    if n not in ("guest", "time_s", "stall_pct", "refused_pages", *_OPTIONAL_INT_FIELDS)
)


def _reject_constant(name: str) -> float:
    raise ReportError(ReportCounter.REPORT_BAD_NUMBER, f"{name} is not a finite number")


def _int(doc: dict[str, object], name: str) -> int:
    v = doc[name]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ReportError(ReportCounter.REPORT_BAD_TYPE,
                          f"{name} must be an integer, got {type(v).__name__}")
    if not 0 <= v <= MAX_VALUE:
        raise ReportError(ReportCounter.REPORT_OUT_OF_RANGE, f"{name} = {v}")
    return v


def _float(doc: dict[str, object], name: str, hi: float) -> float:
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ReportError(ReportCounter.REPORT_BAD_TYPE,
                          f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not (math.isfinite(f) and 0.0 <= f <= hi):
        raise ReportError(ReportCounter.REPORT_OUT_OF_RANGE, f"{name} = {v}")
    return f


def _decode(data: bytes | str) -> PressureReport:
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(ReportCounter.REPORT_TOO_LONG, f"{len(data)} bytes > {MAX_REPORT_BYTES}")
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except ReportError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ReportError(ReportCounter.REPORT_NOT_JSON, str(exc)[:80]) from None
    if not isinstance(doc, dict):
        raise ReportError(ReportCounter.REPORT_NOT_OBJECT, type(doc).__name__)
    if doc.get("v") != REPORT_VERSION:
        raise ReportError(ReportCounter.REPORT_BAD_VERSION, f"v = {doc.get('v')!r}")
    keys = set(doc) - {"v"}
    missing = set(_FIELDS) - keys - {"refused_pages", *_OPTIONAL_INT_FIELDS}
    if missing:
        raise ReportError(ReportCounter.REPORT_MISSING_KEY, ", ".join(sorted(missing)))
    extra = keys - set(_FIELDS)
    if extra:
        raise ReportError(ReportCounter.REPORT_UNKNOWN_KEY, ", ".join(sorted(extra))[:80])
    guest = doc["guest"]
    if not isinstance(guest, str) or not 0 < len(guest) <= MAX_NAME_CHARS:
        raise ReportError(ReportCounter.REPORT_BAD_TYPE, "guest must be a non-empty string")
    refused = doc.get("refused_pages")
    kw: dict[str, object] = {n: _int(doc, n) for n in _INT_FIELDS}
    kw.update({n: _int(doc, n) for n in _OPTIONAL_INT_FIELDS if n in doc})
    if kw.get("active_touched", 0) > kw.get("active_sampled", 0):  # type: ignore[operator]
        raise ReportError(ReportCounter.REPORT_OUT_OF_RANGE, "active_touched > active_sampled")
    return PressureReport(
        guest=guest,
        time_s=_float(doc, "time_s", float(MAX_VALUE)),
        stall_pct=_float(doc, "stall_pct", 100.0),
        refused_pages=None if refused is None else _int(doc, "refused_pages"),
        **kw,  # type: ignore[arg-type]
    )


__all__ = [
    "MAX_REPORT_BYTES", "REPORT_VERSION", "PressureReport", "ReportCounter", "ReportError",
]
