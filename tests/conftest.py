"""Shared fixtures: a host set up for huge-page guest RAM, and put back, one test at a time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator

import pytest

from memballoon.host.hugepages import HugePageSetup
from memballoon.model.units import RamKind

#: Tests that change the host's huge-page settings take this lock (pytest -n runs workers in
#: parallel, and one worker putting a value back must not pull it from under another).
HUGEPAGE_LOCK = "/tmp/memballoon-tests-hugepages.lock"

HugeHost = Callable[[RamKind, int], None]


@pytest.fixture
def huge_host() -> Iterator[HugeHost]:
    """``huge_host(kind, huge_pages)`` makes the host ready for that much huge-page RAM (shmem
    THP on, or that many pool pages free); everything changed is put back after the test. CI
    runs as root on a fresh machine, where neither is set up."""
    if os.geteuid() != 0:
        pytest.skip("setting up huge pages needs root (CI runs as root)")
    with open(HUGEPAGE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        setup = HugePageSetup()
        try:
            def ready(kind: RamKind, huge_pages: int) -> None:
                setup.ensure({kind: huge_pages})

            yield ready
        finally:
            setup.restore()
            fcntl.flock(lock, fcntl.LOCK_UN)
