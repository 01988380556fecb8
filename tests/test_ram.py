"""Host RAM backends: NullRam, the simulator's backend (the page helpers are in test_pages)."""

import numpy as np
import pytest

from memballoon.host.ram import NullRam
from memballoon.model.errors import GuestAddressError, UsageError
from memballoon.model.pages import RangeArray, coalesce
from memballoon.model.units import PAGE_SIZE


def test_ranges_outside_the_guest_are_refused_before_anything_is_released() -> None:
    ram = NullRam(1024)
    ram.touch(np.arange(1024, dtype=np.int64), 1)
    with pytest.raises(GuestAddressError):
        ram.release(np.array([[10, 20], [1000, 1025]], dtype=np.int64))
    assert ram.resident_bytes() == 1024 * PAGE_SIZE
    with pytest.raises(GuestAddressError):
        ram.readmit(np.array([[-1, 3]], dtype=np.int64))


def test_null_ram_counts_resident_pages() -> None:
    ram = NullRam(1024)
    ram.touch(np.arange(100, dtype=np.int64), 1)
    ram.touch(np.arange(50, 150, dtype=np.int64), 2)
    assert ram.resident_bytes() == 150 * PAGE_SIZE
    assert ram.release(coalesce(np.arange(0, 10))) == 10
    assert ram.resident_bytes() == 140 * PAGE_SIZE
    # readmit does not repopulate: the host faults pages in only when touched, as QEMU does
    ram.readmit(coalesce(np.arange(0, 10)))
    assert ram.resident_bytes() == 140 * PAGE_SIZE
    assert ram.verify(np.arange(10, dtype=np.int64)) == 0


def test_null_ram_needs_a_guest() -> None:
    with pytest.raises(UsageError):
        NullRam(0)


def test_forget_is_a_noop_unless_a_subclass_overrides_it() -> None:
    class Logging(NullRam):
        def forget(self, ranges: RangeArray) -> None:
            pass

    assert NullRam(1024).forget_is_noop
    assert not Logging(1024).forget_is_noop  # the guest model must tell it what it forgets


def test_touch_counts_resident_pages_once() -> None:
    ram = NullRam(1024)
    ram.touch(np.array([1, 2, 3], dtype=np.int64), 1)
    ram.touch(np.array([2, 3], dtype=np.int64), 2)  # resident already: no change
    ram.touch(np.array([3, 4], dtype=np.int64), 3)
    assert ram.resident_bytes() == 4 * PAGE_SIZE
    assert ram.resident_pages_of(np.array([0, 1, 4, 5], dtype=np.int64)) == 2


def test_touching_a_run_is_touching_its_frames() -> None:
    a, b = NullRam(4096), NullRam(4096)
    for first, k in ((10, 100), (50, 200), (0, 1), (4000, 96)):
        a.touch_run(first, k, 1)
        b.touch(np.arange(first, first + k, dtype=np.int64), 1)
        assert a.resident_bytes() == b.resident_bytes()
        assert np.array_equal(a._resident, b._resident)


def test_touching_a_run_honours_a_subclass_s_touch() -> None:
    seen: list[list[int]] = []

    class Logging(NullRam):
        def touch(self, pfns: np.ndarray, generation: int) -> None:  # type: ignore[type-arg]
            seen.append(pfns.tolist())
            super().touch(pfns, generation)

    ram = Logging(1024)
    ram.touch_run(5, 3, 1)
    assert seen == [[5, 6, 7]] and ram.resident_bytes() == 3 * PAGE_SIZE
