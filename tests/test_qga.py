"""Reading pressure through the QEMU guest agent: a fake qemu-ga answering JSON commands as
qga/qapi-schema.json says, then misbehaving (garbage, wrong shapes, huge files, errors)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.counters import Counters
from memballoon.model.errors import PeerError
from memballoon.qemu.agent import to_pressure_report
from memballoon.qemu.errors import GuestAgentError, QgaRefusedError, QgaUnresponsiveError
from memballoon.qemu.qga import MAX_FILE_BYTES, read_file, read_report

MEMINFO = ("MemTotal:         996624 kB\nMemFree:          855028 kB\n"
           "MemAvailable:     788300 kB\nBuffers:               0 kB\n"
           "Cached:           104700 kB\nSwapTotal:              0 kB\n"
           "SwapFree:               0 kB\n")
VMSTAT = ("nr_free_pages 213757\npswpin 3\npswpout 4\npgmajfault 17\noom_kill 1\n"
          "balloon_inflate 70000\nballoon_deflate 4464\nballoon_migrate 0\n")
PSI = ("some avg10=2.50 avg60=1.00 avg300=0.20 total=123456\n"
       "full avg10=1.25 avg60=0.50 avg300=0.10 total=65432\n")


class FakeQga:
    """qemu-ga's guest-file-* commands over a dict of files; ``chunk`` bytes per read."""

    def __init__(self, files: dict[str, str | bytes], chunk: int = 1000) -> None:
        self.files = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
        self.chunk = chunk
        self.open: dict[int, tuple[bytes, int]] = {}
        self.next_handle = 1000
        self.calls: list[str] = []

    def __call__(self, text: str) -> str:
        cmd = json.loads(text)
        ex, args = cmd["execute"], cmd["arguments"]
        self.calls.append(ex)
        if ex == "guest-file-open":
            if args["path"] not in self.files:
                raise QgaRefusedError(f"Failed to open file '{args['path']}'")
            self.next_handle += 1
            self.open[self.next_handle] = (self.files[args["path"]], 0)
            return json.dumps({"return": self.next_handle})
        if ex == "guest-file-read":
            data, pos = self.open[args["handle"]]
            part = data[pos:pos + min(self.chunk, args["count"])]
            self.open[args["handle"]] = (data, pos + len(part))
            return json.dumps({"return": {"count": len(part), "eof": pos + len(part) >= len(data),
                                          "buf-b64": base64.b64encode(part).decode()}})
        if ex == "guest-file-close":
            del self.open[args["handle"]]
            return json.dumps({"return": {}})
        raise AssertionError(ex)


FILES = {"/proc/meminfo": MEMINFO, "/proc/vmstat": VMSTAT, "/proc/pressure/memory": PSI}


def test_reads_meminfo_vmstat_and_psi_in_chunks_and_closes_every_handle() -> None:
    c = Counters()
    qga = FakeQga(dict(FILES), chunk=100)
    a = read_report(qga, guest="d1", counters=c, now=42.0)
    assert not qga.open and qga.calls.count("guest-file-close") == 3
    assert a.guest == "d1" and a.uptime_s == 42.0
    assert a.mem_total_bytes == 996624 * 1024 and a.mem_available_bytes == 788300 * 1024
    assert (a.swap_in_pages, a.swap_out_pages, a.major_faults, a.oom_kills) == (3, 4, 17, 1)
    assert a.guest_balloon_pages == 70000 - 4464
    assert a.psi_some_avg10 == 2.5 and a.psi_some_total_us == 123456
    assert a.psi_full_avg10 == 1.25 and a.psi_full_total_us == 65432
    assert c["qga_reports"] == 1
    r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=0,
                           balloon_actual_pages=0, prev=None, period_s=1.0)
    assert r.balloon_actual_pages == 65536 and r.stall_pct == 2.5


def test_a_kernel_without_psi_still_reports() -> None:
    c = Counters()
    a = read_report(FakeQga({k: v for k, v in FILES.items() if "pressure" not in k}),
                    guest="d", counters=c, now=1.0)
    assert a.psi_some_avg10 is None and a.mem_total_bytes == 996624 * 1024
    assert c["qga_psi_missing"] == 1


def _reply(make: Callable[[dict[str, object]], str]) -> Callable[[str], str]:
    def command(text: str) -> str:
        return make(json.loads(text))
    return command


@pytest.mark.parametrize(("command", "counter"), [
    (_reply(lambda c: "not json"), "qga_bad_reply"),
    (_reply(lambda c: '{"error": {"class": "GenericError"}}'), "qga_bad_reply"),
    (_reply(lambda c: '{"return": "seven"}'), "qga_bad_reply"),
    (_reply(lambda c: '{"return": true}'), "qga_bad_reply"),
    (_reply(lambda c: '{"return": 5}' if c["execute"] == "guest-file-open"
            else '{"return": {"count": 3, "eof": true, "buf-b64": "@@@"}}'), "qga_bad_reply"),
    (_reply(lambda c: '{"return": 5}' if c["execute"] == "guest-file-open"
            else '{"return": {"count": 3}}'), "qga_bad_reply"),
    (_reply(lambda c: '{"return": 5}' if c["execute"] == "guest-file-open" else json.dumps(
        {"return": {"count": 1, "eof": False, "buf-b64": base64.b64encode(b"x" * 40000)
                    .decode()}})), "qga_file_too_long"),
    (_reply(lambda c: '{"return": 5}' if c["execute"] == "guest-file-open" else json.dumps(
        {"return": {"count": 1, "eof": True, "buf-b64": base64.b64encode(b"\xff\xfe")
                    .decode()}})), "qga_bad_text"),
])
def test_garbage_is_a_counted_guest_agent_error(command: Callable[[str], str],
                                                counter: str) -> None:
    c = Counters()
    with pytest.raises(GuestAgentError):
        read_report(command, guest="d", counters=c, now=1.0)
    assert c[counter] >= 1, c
    assert isinstance(GuestAgentError("x"), PeerError)


@pytest.mark.parametrize("files", [
    {**FILES, "/proc/meminfo": "MemTotal: lots kB\n"},
    {**FILES, "/proc/meminfo": "MemFree: 5 kB\n"},  # no MemTotal/MemAvailable
    {**FILES, "/proc/pressure/memory": "some avg10=x\n"},
    {**FILES, "/proc/pressure/memory": "some avg10=250.0 avg60=0 avg300=0 total=1\n"},
    {**FILES, "/proc/vmstat": "pswpin notanumber\n"},
])
def test_text_that_is_not_what_the_kernel_writes_is_refused(files: dict[str, str]) -> None:
    c = Counters()
    with pytest.raises(GuestAgentError):
        read_report(FakeQga(files), guest="d", counters=c, now=1.0)
    assert c["qga_bad_text"] == 1


def test_absent_agent_and_missing_file_pass_through_and_handles_close() -> None:
    def absent(text: str) -> str:
        raise QgaUnresponsiveError("Guest agent is not responding")

    with pytest.raises(QgaUnresponsiveError):
        read_report(absent, guest="d", counters=Counters(), now=1.0)
    qga = FakeQga({})
    with pytest.raises(QgaRefusedError):
        read_file(qga, "/proc/meminfo", Counters())
    big = FakeQga({"/f": b"a" * (MAX_FILE_BYTES + 1)}, chunk=16384)
    with pytest.raises(GuestAgentError):
        read_file(big, "/f", Counters())
    assert not big.open  # closed though the read failed


# fuzz property (the long form: `memballoon bench fuzz --target qga`)
_lines = st.lists(st.sampled_from(["MemTotal: 996624 kB", "MemAvailable: 1 kB", "MemFree: -4 kB",
                                   "Cached: 99999999999999999999 kB", "pswpin 3", "oom_kill -1",
                                   "balloon_inflate 9", "balloon_deflate 10", "",
                                   "some avg10=2.50 avg60=1.00 avg300=0.20 total=123456",
                                   "full avg10=1.25 avg60=0.50 avg300=0.10 total=-5",
                                   "some avg10=inf avg60=0 total=1"]) | st.text(max_size=12),
                  max_size=10).map("\n".join)


@settings(max_examples=100, deadline=None)
@given(_lines, _lines, _lines, st.integers(1, 200))
def test_any_guest_text_reports_within_bounds_or_is_a_guest_agent_error(
        meminfo: str, vmstat: str, psi: str, chunk: int) -> None:
    qga = FakeQga({"/proc/meminfo": meminfo, "/proc/vmstat": vmstat,
                   "/proc/pressure/memory": psi}, chunk=chunk)
    try:
        a = read_report(qga, guest="d", counters=Counters(), now=1.0)
    except GuestAgentError:
        assert not qga.open  # every handle closed all the same
        return
    for k, v in vars(a).items():
        if k.endswith("avg10"):
            assert v is None or 0.0 <= v <= 100.0, k
        elif k not in ("guest", "uptime_s"):
            assert v is None or 0 <= v < 2**53, k
    r = to_pressure_report(a, ram_bytes=1 << 30, balloon_target_pages=0,
                           balloon_actual_pages=0, prev=None, period_s=1.0)
    assert r.total_bytes >= 0 and 0.0 <= r.stall_pct <= 100.0


def test_a_psi_full_total_past_belief_is_left_out() -> None:
    # found by `memballoon bench fuzz` (target qga): some_total was bounded, full_total was not
    huge = "full avg10=1.25 avg60=0.50 avg300=0.10 total=" + "6" * 60 + "\n"
    qga = FakeQga({**FILES, "/proc/pressure/memory": PSI.splitlines()[0] + "\n" + huge})
    a = read_report(qga, guest="d", counters=Counters(), now=1.0)
    assert a.psi_full_total_us is None and a.psi_some_total_us == 123456
