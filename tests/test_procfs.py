"""procfs: the kernel's memory files parsed from recorded text; bad text is a typed error."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.model.errors import MemballoonError
from memballoon.protocol.procfs import (
    NO_LIMIT_BYTES,
    HostMemoryError,
    Psi,
    parse_counter,
    parse_meminfo,
    parse_psi,
    parse_stat,
)

MEMINFO = """MemTotal:       24634720 kB
MemFree:         1234567 kB
MemAvailable:   20000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def test_meminfo_in_bytes_counts_without_unit() -> None:
    mi = parse_meminfo(MEMINFO)
    assert mi["MemTotal"] == 24634720 * 1024 and mi["MemAvailable"] == 20000000 * 1024
    assert mi["HugePages_Total"] == 0 and mi["Hugepagesize"] == 2 << 20


@pytest.mark.parametrize("text", ["MemTotal: 1 kB\n", "MemTotal: x kB\nMemAvailable: 1 kB\n"])
def test_meminfo_without_what_we_need_names_it(text: str) -> None:
    with pytest.raises(HostMemoryError, match="/proc/meminfo"):
        parse_meminfo(text)


def test_psi_some_and_full() -> None:
    psi = parse_psi("some avg10=1.50 avg60=0.25 avg300=0.00 total=15820\n"
                    "full avg10=0.10 avg60=0.00 avg300=0.00 total=3997\n")
    assert psi == Psi(1.5, 0.25, 15820, 0.1, 3997)
    assert parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").full_avg10 is None


@pytest.mark.parametrize("text", ["", "full avg10=0 avg60=0 total=0",
                                  "some avg10=x avg60=0 total=0", "some avg60=0.00 total=1"])
def test_bad_psi_is_a_host_memory_error(text: str) -> None:
    with pytest.raises(HostMemoryError):
        parse_psi(text)


def test_cgroup_counters_and_limits() -> None:
    assert parse_counter("123\n", source="memory.current") == 123
    assert parse_counter("max\n", source="memory.max") is None
    assert parse_counter("9223372036854771712\n", source="limit") is None  # v1: no limit
    assert parse_counter(str(NO_LIMIT_BYTES - 1), source="limit") == NO_LIMIT_BYTES - 1
    for bad in ("-1", "lots", ""):
        with pytest.raises(HostMemoryError, match="limit"):
            parse_counter(bad, source="limit")
    assert issubclass(HostMemoryError, MemballoonError)


def test_memory_stat() -> None:
    assert parse_stat("cache 10\ntotal_inactive_file 7\nweird line here\n",
                      source="memory.stat") == {"cache": 10, "total_inactive_file": 7}
    with pytest.raises(HostMemoryError):
        parse_stat("cache ten\n", source="memory.stat")


# found by `memballoon bench fuzz` (target qga: a guest's PSI text read through qemu-ga)
@pytest.mark.parametrize("text", [
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n\n",  # was ValueError (unpacking)
    "   \nsome avg10=0.00 avg60=0.00 avg300=0.00 total=5\n",
])
def test_blank_lines_in_psi_are_skipped(text: str) -> None:
    assert parse_psi(text) == Psi(0.0, 0.0, 5)


@pytest.mark.parametrize("text", [
    "some avg10=0 avg60=0 total=5\nfull avg10=0 avg60=0 total=-5",  # was a negative count
    "some avg10=0 avg60=0 total=-1", "some avg10=nan avg60=0 total=1",
    "some avg10=0 avg60=0 total=1\nfull avg10=101 avg60=0 total=1",
])
def test_psi_figures_the_kernel_cannot_write_are_refused(text: str) -> None:
    with pytest.raises(HostMemoryError, match="out of range"):
        parse_psi(text)


# fuzz property (the long form: `memballoon bench fuzz --target qga`, a guest's /proc text)
_words = st.sampled_from(["MemTotal:", "MemAvailable:", "kB", "some", "full", "avg10=1.5",
                          "avg60=0", "total=12", "total=-3", "avg10=nan", "=", "pswpin", "9" * 30,
                          "-1", "1e5", "\n", " ", "\t"])


@settings(max_examples=200)
@given(st.lists(_words | st.text(max_size=6), max_size=30).map(" ".join))
def test_any_text_parses_within_bounds_or_is_a_host_memory_error(text: str) -> None:
    for parse in (parse_meminfo, parse_stat, parse_counter):
        with contextlib.suppress(HostMemoryError):
            parse(text, source="guest")
    try:
        psi = parse_psi(text)
    except HostMemoryError:
        return
    assert 0.0 <= psi.some_avg10 <= 100.0 and psi.some_total_us >= 0
    assert psi.full_total_us is None or psi.full_total_us >= 0
