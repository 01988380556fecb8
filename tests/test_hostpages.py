"""The partially-ballooned-page rule: whole host pages released, partial ones kept and counted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.host.hostpages import HostPageCounter, HostPages, in_ranges
from memballoon.host.memfd import MemfdRam
from memballoon.host.ram import NullRam
from memballoon.model.counters import Counters
from memballoon.model.errors import HostResourceError, MemballoonError, UsageError
from memballoon.model.pages import RangeArray, coalesce
from memballoon.model.units import HPAGE_PMD_NR, PAGE_SIZE

HP = HPAGE_PMD_NR
PAGES = 8 * HP  # a 16 MiB guest in 8 host pages


class Recorder(NullRam):
    """NullRam that keeps every release/readmit call, and can run dry on readmit."""

    def __init__(self, pages: int = PAGES, frames: int = HP) -> None:
        super().__init__(pages, host_page_frames=frames)
        self.released: list[list[list[int]]] = []
        self.readmitted: list[list[list[int]]] = []
        self.dry: set[int] = set()  # host pages the "pool" cannot back again
        self.ballooned: np.ndarray | None = None  # if set: frames released must be in it

    def release(self, ranges: RangeArray) -> int:
        self.released.append(ranges.tolist())
        if self.ballooned is not None:
            for s, e in ranges.tolist():
                assert self.ballooned[s:e].all(), f"released [{s}, {e}) not all ballooned"
        return super().release(ranges)

    def readmit(self, ranges: RangeArray) -> int:
        self.readmitted.append(ranges.tolist())
        super().readmit(ranges)
        bad = sorted({int(p) for s, e in ranges.tolist() for p in range(s // HP, e // HP)}
                     & self.dry)
        if bad:
            raise HostResourceError("pool dry", tuple((p * HP, (p + 1) * HP) for p in bad))
        return int((ranges[:, 1] - ranges[:, 0]).sum())


def r(*pairs: tuple[int, int]) -> RangeArray:
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def touched(frames: int = HP) -> tuple[Recorder, HostPages, Counters]:
    ram = Recorder(frames=frames)
    ram.touch(np.arange(PAGES, dtype=np.int64), 1)
    c = Counters()
    return ram, HostPages(ram, c), c


def test_small_pages_pass_straight_through() -> None:
    ram, hp, _ = touched(frames=1)
    assert hp.take(r((5, 9))) == 4 and ram.released == [[[5, 9]]]
    assert len(hp.give(r((6, 7)))) == 0 and ram.readmitted == [[[6, 7]]]
    assert hp.partial_huge_pages == 0 and not hp.huge


def test_half_a_host_page_is_kept_and_counted_until_the_rest_comes() -> None:
    ram, hp, c = touched()
    hp.take(r((0, HP // 2)))
    assert ram.released == [] and hp.partial_huge_pages == 1
    assert ram.resident_bytes() == PAGES * 4096  # nothing released wrongly
    hp.take(r((HP // 2, HP)))
    assert ram.released == [[[0, HP]]] and hp.partial_huge_pages == 0
    assert ram.resident_pages_of(np.arange(HP)) == 0
    assert c[HostPageCounter.HUGE_PAGES_RELEASED] == 1


def test_a_range_straddling_host_pages_counts_in_each() -> None:
    ram, hp, _ = touched()
    hp.take(r((HP - 3, 2 * HP + 5)))  # the end of page 0, all of page 1, the start of page 2
    assert ram.released == [[[HP, 2 * HP]]]
    assert hp.partial_huge_pages == 2
    assert hp.partial_pfns().tolist() == [0, 2 * HP]
    hp.take(r((0, HP - 3), (2 * HP + 5, 3 * HP)))
    assert ram.released[-1] == [[0, HP], [2 * HP, 3 * HP]]  # one call, merged per host page
    assert hp.partial_huge_pages == 0 and hp.released_huge_pages == 3


def test_giving_part_of_a_released_page_back_readmits_it_whole() -> None:
    ram, hp, c = touched()
    hp.take(r((0, 2 * HP)))
    assert len(hp.give(r((HP + 10, HP + 20)))) == 0
    assert ram.readmitted == [[[HP, 2 * HP]]]  # the whole host page, once
    assert hp.partial_huge_pages == 1 and hp.released_huge_pages == 1
    assert c[HostPageCounter.HUGE_PAGES_READMITTED] == 1
    hp.give(r((HP + 20, HP + 30)))  # not released any more: nothing to readmit
    assert len(ram.readmitted) == 1
    hp.take(r((HP + 10, HP + 30)))  # whole again: released again
    assert ram.released[-1] == [[HP, 2 * HP]] and hp.partial_huge_pages == 0


def test_a_dry_pool_keeps_the_frames_ballooned_unless_forced() -> None:
    ram, hp, c = touched()
    hp.take(r((0, 3 * HP)))
    ram.dry = {1}
    left = hp.give(r((HP - 2, 2 * HP + 2)))
    assert left.tolist() == [[HP, 2 * HP]]  # page 1 stays in the balloon, released
    assert hp.released_huge_pages == 1 and hp.partial_huge_pages == 2
    assert c[HostPageCounter.READMIT_UNBACKED_PAGES] == HP
    assert hp.last_error is not None and "pool dry" in hp.last_error
    ram.dry = set()
    assert len(hp.give(r((HP, 2 * HP)))) == 0  # memory is back: it goes
    assert hp.released_huge_pages == 0
    hp.take(r((HP, 2 * HP)))
    ram.dry = {1}
    assert len(hp.give(r((HP, 2 * HP)), force=True)) == 0  # a reset: given up anyway
    assert c[HostPageCounter.READMIT_FORCED_UNBACKED] == HP


def test_free_page_reports_release_whole_host_pages_only() -> None:
    ram, hp, c = touched()
    assert hp.release_free(r((HP - 8, 3 * HP + 8))) == 2 * HP
    assert ram.released == [[[HP, 3 * HP]]]
    assert c[HostPageCounter.REPORT_PARTIAL_FRAMES] == 16
    assert hp.partial_huge_pages == 0  # reports are not the balloon


def test_taking_a_frame_twice_or_giving_one_never_taken_is_our_bug() -> None:
    _, hp, _ = touched()
    hp.take(r((0, HP)))
    with pytest.raises(UsageError):
        hp.take(r((5, 6)))
    with pytest.raises(UsageError):
        hp.give(r((HP, HP + 1)))


def test_ram_that_is_not_whole_host_pages_is_refused() -> None:
    with pytest.raises(UsageError):
        NullRam(HP + 1, host_page_frames=HP)
    with pytest.raises(UsageError):
        NullRam(PAGES, host_page_frames=HP).release(r((0, 1)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(1, 3 * HP), st.booleans()),
                max_size=25))
def test_any_sequence_keeps_the_rule_and_matches_a_rebuild(
        ops: list[tuple[int, int, bool]]) -> None:
    ram, hp, _ = touched()
    ballooned = np.zeros(PAGES, dtype=np.bool_)
    ram.ballooned = ballooned  # a release of any frame not ballooned fails the test
    for start, length, take in ops:
        span = np.arange(start, min(PAGES, start + length))
        pick = span[~ballooned[span]] if take else span[ballooned[span]]
        if pick.size == 0:
            continue
        if take:
            ballooned[pick] = True
            hp.take(coalesce(pick))
        else:
            hp.give(coalesce(pick))
            ballooned[pick] = False
        per_page = ballooned.reshape(-1, HP).sum(axis=1)
        whole = np.repeat(per_page == HP, HP)
        assert ram.resident_pages_of(np.flatnonzero(whole)) == 0  # whole pages released
        assert hp.partial_huge_pages == int(np.count_nonzero((per_page > 0) & (per_page < HP)))
    again = HostPages(ram, Counters())
    again.rebuild(ballooned)
    assert again.partial_huge_pages == hp.partial_huge_pages
    assert again.released_huge_pages == hp.released_huge_pages


def test_in_ranges() -> None:
    got = in_ranges(np.array([0, 4, 5, 9, 10, 11]), r((4, 6), (10, 11)))
    assert got.tolist() == [False, True, True, False, True, False]
    assert in_ranges(np.array([1, 2]), r()).tolist() == [False, False]


# ------------------------------------------------------------------ releases that fail
class _FailingMemfd(MemfdRam):
    """A memfd whose host refuses the next ``fail`` releases (a host in trouble: fallocate
    failing), as the backend reports it."""

    fail = 0

    def release(self, ranges: RangeArray) -> int:
        if self.fail:
            self.fail -= 1
            raise MemballoonError("releasing PFNs: [Errno 5] Input/output error")
        return super().release(ranges)


def test_a_failed_release_is_owed_retried_and_never_punches_a_frame_given_back() -> None:
    # issue 11 item 7: a host so full (or so broken) that releases fall behind: nothing
    # raises, the frames stay in the balloon, their memory is released once the host can,
    # and a frame the guest takes back before that is never punched (its data is kept)
    with _FailingMemfd(2048, name="memballoon-test-owed") as ram:
        every = np.arange(2048, dtype=np.int64)
        ram.touch(every, 7)
        c = Counters()
        hp = HostPages(ram, c)
        ram.fail = 2
        assert hp.take(r((0, 512), (1024, 1536))) == 1024  # no exception: taken, owed
        assert c[HostPageCounter.RELEASE_FAILED] == 1 and hp.owing
        assert hp.release_owed_pages == 1024
        assert ram.resident_bytes() == 2048 * PAGE_SIZE  # nothing released yet
        hp.give(r((1024, 1536)))  # the guest takes these back before the host could
        ram.touch(np.arange(1024, 1536, dtype=np.int64), 9)  # and writes to them
        assert hp.release_owed_pages == 512
        assert hp.retry_releases() == 0 and c[HostPageCounter.RELEASE_FAILED] == 2  # still
        assert hp.retry_releases() == 512  # the host can again
        assert not hp.owing and hp.release_owed_pages == 0
        assert c[HostPageCounter.RELEASE_RETRIED] == 512
        assert ram.resident_bytes() == (2048 - 512) * PAGE_SIZE  # st_blocks went down
        assert ram.verify(np.arange(1024, 1536, dtype=np.int64)) == 0  # never punched
        assert ram.verify(np.arange(512, 1024, dtype=np.int64)) == 0  # never in the balloon
        assert hp.retry_releases() == 0  # nothing owed: nothing done


def test_a_failed_huge_page_release_is_retried_whole() -> None:
    rec, hp, c = touched()
    real = rec.release
    fails = [1]

    def release(ranges: RangeArray) -> int:
        if fails[0]:
            fails[0] -= 1
            raise MemballoonError("releasing PFNs: [Errno 12] Cannot allocate memory")
        return real(ranges)

    rec.release = release  # type: ignore[method-assign]
    hp.take(r((0, HP)))  # a whole host page: its release fails
    assert c[HostPageCounter.RELEASE_FAILED] == 1 and hp.release_owed_pages == HP
    assert c[HostPageCounter.HUGE_PAGES_RELEASED] == 0
    assert hp.retry_releases() == HP
    assert c[HostPageCounter.HUGE_PAGES_RELEASED] == 1 and hp.release_owed_pages == 0
