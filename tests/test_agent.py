"""The agent's report parser, line splitter and channel (against a fake guest on a unix socket)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.manager.port import ManualClock
from memballoon.model.counters import Counters
from memballoon.model.errors import PeerError, UsageError
from memballoon.protocol.pressure import PressureReport
from memballoon.qemu.agent import (
    MAX_LINE_BYTES,
    AgentChannel,
    AgentReport,
    LineSplitter,
    parse_report,
    to_pressure_report,
)
from memballoon.qemu.errors import AgentError, GuestGoneError

# A line exactly as the test image's init writes it (captured from a real 1 GiB TCG guest).
REAL_LINE = (
    '{"v":1,"t":11.47,"meminfo":{"MemTotal":996624,"MemFree":855028,"MemAvailable":788300,'
    '"Cached":104700,"SwapTotal":0,"SwapFree":0},"psi":{"some_avg10":0.00,"some_total":0,'
    '"full_avg10":0.00,"full_total":0},"vmstat":{"pswpin":0,"pswpout":0,"pgmajfault":0,'
    '"oom_kill":0}}'
)


def doc(**over: object) -> dict[str, object]:
    base: dict[str, object] = json.loads(REAL_LINE)
    base.update(over)
    return base


def test_real_line_parses_to_bytes_and_counts() -> None:
    c = Counters()
    r = parse_report(REAL_LINE, guest="g1", counters=c)
    assert r.guest == "g1"
    assert r.uptime_s == pytest.approx(11.47)
    assert r.mem_total_bytes == 996624 * 1024
    assert r.mem_free_bytes == 855028 * 1024
    assert r.mem_available_bytes == 788300 * 1024
    assert r.cached_bytes == 104700 * 1024
    assert r.swap_total_bytes == 0 and r.swap_free_bytes == 0
    assert (r.swap_in_pages, r.swap_out_pages, r.major_faults, r.oom_kills) == (0, 0, 0, 0)
    assert r.psi_some_avg10 == 0.0 and r.psi_full_total_us == 0
    assert c["agent_reports"] == 1
    assert parse_report(REAL_LINE.encode(), guest="g1", counters=c) == r


def test_missing_sections_and_nulls_become_none() -> None:
    c = Counters()
    line = json.dumps({"v": 1, "t": 3, "meminfo": {"MemTotal": 1000, "MemFree": None},
                       "psi": None})
    r = parse_report(line, guest="g", counters=c)
    assert r.mem_total_bytes == 1000 * 1024
    assert r.mem_free_bytes is None and r.mem_available_bytes is None
    assert r.psi_some_avg10 is None and r.psi_some_total_us is None
    assert r.oom_kills is None and r.major_faults is None


def test_psi_values_kept() -> None:
    psi = {"some_avg10": 12.5, "some_total": 123456, "full_avg10": 3, "full_total": 99}
    r = parse_report(json.dumps(doc(psi=psi)), guest="g", counters=Counters())
    assert (r.psi_some_avg10, r.psi_some_total_us) == (12.5, 123456)
    assert (r.psi_full_avg10, r.psi_full_total_us) == (3.0, 99)


@pytest.mark.parametrize(
    ("line", "counter"),
    [
        ("not json", "agent_bad_json"),
        ("[1,2]", "agent_bad_schema"),
        (json.dumps(doc(v=2)), "agent_bad_version"),
        (json.dumps(doc(v=True)), "agent_bad_version"),
        (json.dumps(doc(t="soon")), "agent_bad_schema"),
        (json.dumps(doc(t=-1)), "agent_bad_value"),
        (json.dumps(doc(meminfo=[1])), "agent_bad_schema"),
        (json.dumps(doc(meminfo=None)), "agent_bad_schema"),
        (json.dumps(doc(meminfo={"MemTotal": -5})), "agent_bad_value"),
        (json.dumps(doc(meminfo={"MemTotal": 1.5})), "agent_bad_value"),
        (json.dumps(doc(meminfo={"MemTotal": True})), "agent_bad_value"),
        (json.dumps(doc(meminfo={"MemTotal": 2**60})), "agent_bad_value"),
        (json.dumps(doc(vmstat={"oom_kill": "1"})), "agent_bad_value"),
        (json.dumps(doc(psi={"some_avg10": 101})), "agent_bad_value"),
        (json.dumps(doc(psi={"some_avg10": "x"})), "agent_bad_value"),
        ('{"v":1,"t":NaN,"meminfo":{}}', "agent_bad_json"),
        ('{"v":1,"t":1,"meminfo":{"MemTotal":Infinity}}', "agent_bad_json"),
        ("[" * 3000, "agent_bad_json"),  # deeper than the recursion limit
        (b"\xff\xfe{", "agent_bad_json"),
        ("x" * (MAX_LINE_BYTES + 1), "agent_line_too_long"),
    ],
)
def test_garbage_is_a_counted_agent_error(line: str | bytes, counter: str) -> None:
    c = Counters()
    with pytest.raises(AgentError):
        parse_report(line, guest="g", counters=c)
    assert c[counter] == 1
    assert c["agent_reports"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode))
def test_random_bytes_only_ever_raise_agent_error(data: bytes) -> None:
    c = Counters()
    try:
        report = parse_report(data, guest="g", counters=c)
    except AgentError:
        assert c.total() == 1
    else:
        assert isinstance(report, AgentReport)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 1, 1, 2, "1", None]),
            "t": json_values | st.floats(min_value=0, max_value=1e6),
            "meminfo": st.dictionaries(
                st.sampled_from(["MemTotal", "MemFree", "Cached", "Other"]), json_values
            ) | json_values,
            "psi": st.dictionaries(
                st.sampled_from(["some_avg10", "full_total", "junk"]), json_values
            ) | json_values,
            "vmstat": st.dictionaries(st.sampled_from(["oom_kill", "pswpin"]), json_values),
        },
    )
)
def test_json_shaped_garbage_only_ever_raises_agent_error(d: dict[str, object]) -> None:
    c = Counters()
    try:
        line = json.dumps(d)
    except ValueError:
        return
    try:
        r = parse_report(line, guest="g", counters=c)
    except AgentError:
        assert c["agent_reports"] == 0 and c.total() == 1
        return
    for value in (r.mem_total_bytes, r.mem_free_bytes, r.oom_kills, r.swap_in_pages):
        assert value is None or (isinstance(value, int) and value >= 0)


def test_agent_error_is_a_peer_error() -> None:
    assert issubclass(AgentError, PeerError)


# --- LineSplitter ----------------------------------------------------------------------


def test_splitter_reassembles_lines_fed_byte_by_byte_and_at_once() -> None:
    data = b"one\ntwo\n\nthree\npart"
    whole = LineSplitter(Counters()).feed(data)
    bytewise_splitter = LineSplitter(Counters())
    bytewise = [line for i in range(len(data)) for line in bytewise_splitter.feed(data[i:i + 1])]
    assert whole == bytewise == [b"one", b"two", b"", b"three"]
    assert bytewise_splitter.feed(b"ial\n") == [b"partial"]


def test_splitter_drops_over_long_line_and_resynchronises() -> None:
    c = Counters()
    s = LineSplitter(c, max_line_bytes=10)
    assert s.feed(b"x" * 25) == []
    assert s.feed(b"y" * 25) == []
    assert s.feed(b"zz\nok\n") == [b"ok"]
    assert c["agent_line_too_long"] == 1
    assert s.feed(b"0123456789\n") == [b"0123456789"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 16))
def test_splitter_never_returns_long_lines_or_newlines(chunks: list[bytes], limit: int) -> None:
    s = LineSplitter(Counters(), max_line_bytes=limit)
    for chunk in chunks:
        for line in s.feed(chunk):
            assert len(line) <= limit and b"\n" not in line
        assert len(s._buf) <= limit


# --- AgentChannel against a fake guest -------------------------------------------------


async def fake_guest(path: Path, lines: list[bytes], received: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for line in lines:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.01)
        received.append(await reader.readline())
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


def test_channel_reads_newest_reports_skips_garbage_and_reports_eof(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"

    async def main() -> None:
        received: list[bytes] = []
        flood = b"A" * 100_000 + b"\n"
        good2 = json.dumps(doc(t=12.0)).encode() + b"\n"
        server = await fake_guest(sock, [REAL_LINE.encode() + b"\n", b"junk\n", flood, good2],
                                  received)
        c = Counters()
        clock = ManualClock(42.0)
        async with server, AgentChannel(sock, guest="g", counters=c, clock=clock) as ch:
            await ch.connect(wait_s=1)
            r = await ch.wait_for(lambda r: r.uptime_s == 12.0, timeout_s=5)
            assert r.mem_total_bytes == 996624 * 1024
            assert ch.latest == r and ch.latest_time == 42.0  # stamped where it arrived
            await ch.send_command("mark hi")
            with pytest.raises(GuestGoneError):
                await ch.read_report(timeout_s=5)
            assert ch.gone
        assert received == [b"mark hi\n"]
        assert c["agent_bad_json"] == 1 and c["agent_line_too_long"] == 1
        assert c["agent_reports"] == 2 and c["agent_eof"] == 1

    asyncio.run(main())


def test_channel_times_out_when_guest_is_silent(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # say nothing, hold the connection

        server = await asyncio.start_unix_server(handle, path=str(sock))
        async with server, AgentChannel(sock, guest="g") as ch:
            await ch.connect()
            with pytest.raises(TimeoutError):
                await ch.read_report(timeout_s=0.2)

    asyncio.run(main())


def test_channel_without_socket_is_guest_gone(tmp_path: Path) -> None:
    async def main() -> None:
        c = Counters()
        ch = AgentChannel(tmp_path / "none.sock", guest="g", counters=c)
        with pytest.raises(GuestGoneError):
            await ch.connect(wait_s=0.1)
        assert c["agent_connect_failed"] == 1
        with pytest.raises(UsageError):
            await ch.send_command("two\nlines")

    asyncio.run(main())


# --- conversion to the manager's PressureReport ----------------------------------------


def test_to_pressure_report_converts_units_and_estimates_anon() -> None:
    a = parse_report(REAL_LINE, guest="g1", counters=Counters())
    r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=100,
                           balloon_actual_pages=90, prev=None, period_s=1.0)
    assert isinstance(r, PressureReport)
    assert r.guest == "g1" and r.time_s == pytest.approx(11.47)
    assert r.total_bytes == 996624 * 1024 and r.free_bytes == 855028 * 1024
    assert r.available_bytes == 788300 * 1024 and r.cache_bytes == 104700 * 1024
    assert r.anon_bytes == (996624 - 855028 - 104700) * 1024
    assert r.balloon_bytes == 90 * 4096
    assert (r.balloon_target_pages, r.balloon_actual_pages) == (100, 90)
    assert (r.swap_in_pages, r.swap_out_pages, r.major_faults, r.oom_kills) == (0, 0, 0, 0)
    assert r.stall_pct == 0.0 and r.stall_us == 0 and r.refused_pages is None
    assert PressureReport.decode(r.encode()) == r  # a valid report for the manager


def test_stall_pct_from_psi_total_delta_else_avg10() -> None:
    c = Counters()
    prev = parse_report(json.dumps(doc(t=10.0, psi={"some_avg10": 7.5, "some_total": 1_000_000})),
                        guest="g", counters=c)
    cur = parse_report(json.dumps(doc(t=12.0, psi={"some_avg10": 9.0, "some_total": 1_500_000})),
                       guest="g", counters=c)
    kw = {"ram_bytes": 1 << 30, "balloon_target_pages": 0, "balloon_actual_pages": 0}
    r = to_pressure_report(cur, prev=prev, period_s=1.0, **kw)
    assert r.stall_pct == pytest.approx(25.0)  # 0.5 s stalled of 2 s of guest time
    assert r.stall_us == 1_500_000
    assert to_pressure_report(cur, prev=None, period_s=1.0, **kw).stall_pct == 9.0
    # Guest clock did not advance: the caller's period is used instead.
    same_t = parse_report(json.dumps(doc(t=10.0, psi={"some_total": 1_100_000})),
                          guest="g", counters=c)
    assert to_pressure_report(same_t, prev=prev, period_s=0.5, **kw).stall_pct == \
        pytest.approx(20.0)
    # A counter that went backwards (guest rebooted) falls back to avg10, capped at 100.
    huge = parse_report(json.dumps(doc(t=10.5, psi={"some_avg10": 100, "some_total": 10**12})),
                        guest="g", counters=c)
    assert to_pressure_report(huge, prev=prev, period_s=1.0, **kw).stall_pct == 100.0
    assert to_pressure_report(prev, prev=huge, period_s=1.0, **kw).stall_pct == 7.5


def test_missing_agent_figures_become_neutral_values() -> None:
    a = parse_report(json.dumps({"v": 1, "t": 3, "meminfo": {"MemFree": 100}}), guest="g",
                     counters=Counters())
    r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=0,
                           balloon_actual_pages=1024, prev=None, period_s=1.0)
    assert r.total_bytes == (1 << 30) - 1024 * 4096
    assert r.free_bytes == 100 * 1024 and r.available_bytes == 100 * 1024
    assert r.anon_bytes == r.total_bytes - 100 * 1024
    assert r.stall_pct == 0.0 and r.oom_kills == 0
    # Free above total (a lying guest) never gives negative anon.
    liar = parse_report(json.dumps({"v": 1, "t": 3, "meminfo": {"MemTotal": 1, "MemFree": 9}}),
                        guest="g", counters=Counters())
    assert to_pressure_report(liar, ram_bytes=1 << 30, balloon_target_pages=0,
                              balloon_actual_pages=0, prev=None, period_s=1).anon_bytes == 0


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries({
        "MemTotal": st.none() | st.integers(0, 2**53 - 1),
        "MemFree": st.none() | st.integers(0, 2**53 - 1),
        "MemAvailable": st.none() | st.integers(0, 2**53 - 1),
        "Cached": st.none() | st.integers(0, 2**53 - 1),
    }),
    st.none() | st.integers(0, 2**53 - 1),
    st.floats(0, 100),
    st.floats(0, 1e6),
)
def test_any_valid_agent_report_converts_to_a_decodable_report(
    meminfo: dict[str, int | None], total_us: int | None, avg10: float, t: float
) -> None:
    line = json.dumps({"v": 1, "t": t, "meminfo": meminfo,
                       "psi": {"some_avg10": avg10, "some_total": total_us}})
    a = parse_report(line, guest="g", counters=Counters())
    r = to_pressure_report(a, ram_bytes=1 << 34, balloon_target_pages=5, balloon_actual_pages=3,
                           prev=a, period_s=1.0)
    assert PressureReport.decode(r.encode()) == r


def test_report_carries_the_balloon_the_guest_saw() -> None:
    """vmstat's balloon_inflate - balloon_deflate is the balloon when the guest wrote the
    line; it wins over the host's figure (which may be of a later moment)."""
    c = Counters()
    line = json.dumps(doc(vmstat={"pswpin": 0, "pswpout": 0, "pgmajfault": 0, "oom_kill": 0,
                                  "balloon_inflate": 90000, "balloon_deflate": 40000}))
    a = parse_report(line, guest="g", counters=c)
    assert (a.balloon_inflated_pages, a.balloon_deflated_pages) == (90000, 40000)
    assert a.guest_balloon_pages == 50000
    r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=0,
                           balloon_actual_pages=0, prev=None, period_s=1.0)
    assert r.balloon_actual_pages == 50000 and r.balloon_bytes == 50000 * 4096
    # an older agent (no counters), or impossible ones: the caller's figure stands
    for vm in ({"pswpin": 0}, {"balloon_inflate": 1, "balloon_deflate": 2},
               {"balloon_inflate": 1 << 30, "balloon_deflate": 0}):
        a = parse_report(json.dumps(doc(vmstat=vm)), guest="g", counters=c)
        r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=0,
                               balloon_actual_pages=777, prev=None, period_s=1.0)
        assert r.balloon_actual_pages == 777
    with pytest.raises(AgentError):
        parse_report(json.dumps(doc(vmstat={"balloon_inflate": -1})), guest="g", counters=c)
