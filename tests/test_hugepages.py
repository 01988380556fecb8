"""The host's huge-page settings: what is missing, said as commands, and set up then put back."""

from __future__ import annotations

from pathlib import Path

import pytest

from memballoon.host.hugepages import (
    HUGETLB_DIR,
    SYSFS,
    THP_SHMEM,
    THP_SHMEM_PMD,
    HugePageSetup,
    check_host,
    huge_pages_for,
    missing,
    read_hugetlb_pool,
    read_thp_shmem,
    shmem_huge_bytes,
)
from memballoon.model.errors import HostResourceError, UsageError
from memballoon.model.units import RamKind


def fake_sysfs(tmp_path: Path, *, top: str = "always within_size advise [never] deny force",
               pmd: str | None = "always [inherit] within_size advise never",
               pool: tuple[int, int, int] = (0, 0, 0)) -> Path:
    (tmp_path / THP_SHMEM).parent.mkdir(parents=True)
    (tmp_path / THP_SHMEM).write_text(top + "\n")
    if pmd is not None:
        (tmp_path / THP_SHMEM_PMD).parent.mkdir(parents=True)
        (tmp_path / THP_SHMEM_PMD).write_text(pmd + "\n")
    d = tmp_path / HUGETLB_DIR
    d.mkdir(parents=True)
    for name, v in zip(("nr_hugepages", "free_hugepages", "resv_hugepages"), pool, strict=True):
        (d / name).write_text(f"{v}\n")
    return tmp_path


def test_thp_off_says_what_to_write(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    assert read_thp_shmem(sysfs).effective == "never"
    assert missing(RamKind.THP, 10, sysfs) == {sysfs / THP_SHMEM: "advise"}
    with pytest.raises(HostResourceError) as exc:
        check_host({RamKind.THP: 10}, sysfs)
    msg = str(exc.value)
    assert f"echo advise > {sysfs / THP_SHMEM}" in msg and "--setup-hugepages" in msg


def test_the_2mib_knob_wins_over_the_global_one(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, top="always within_size [advise] never deny force",
                       pmd="always inherit within_size advise [never]")
    assert not read_thp_shmem(sysfs).ok
    assert missing(RamKind.THP, 1, sysfs) == {sysfs / THP_SHMEM_PMD: "advise"}
    ok = fake_sysfs(tmp_path / "old", top="always within_size [advise] never deny force",
                    pmd=None)  # before Linux 6.11: the global knob only
    assert read_thp_shmem(ok).ok and missing(RamKind.THP, 1, ok) == {}


def test_a_short_hugetlb_pool_asks_for_what_is_missing(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, pool=(40, 30, 10))  # 20 free and unreserved
    assert read_hugetlb_pool(sysfs).available == 20
    assert missing(RamKind.HUGETLB, 20, sysfs) == {}
    assert missing(RamKind.HUGETLB, 64, sysfs) == {
        sysfs / HUGETLB_DIR / "nr_hugepages": "84"}
    with pytest.raises(HostResourceError, match="20 of its 40 pages free, 64 needed"):
        check_host({RamKind.HUGETLB: 64}, sysfs)
    assert missing(RamKind.SMALL, 10**6, sysfs) == {}


def test_setup_writes_then_puts_back(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    with HugePageSetup(sysfs) as setup:
        done = setup.ensure({RamKind.THP: 4})
        assert done == [f"{sysfs / THP_SHMEM}: never -> advise"]
        assert read_thp_shmem(sysfs).ok
        assert setup.ensure({RamKind.THP: 4}) == []  # nothing left to do
    assert (sysfs / THP_SHMEM).read_text() == "never"


def test_setup_that_the_kernel_does_not_take_is_an_error_and_still_put_back(
        tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, pool=(2, 2, 0))  # a fake pool: writing does not grow it
    setup = HugePageSetup(sysfs)
    with pytest.raises(HostResourceError, match="did not take it"):
        setup.ensure({RamKind.HUGETLB: 8})
    setup.restore()
    assert (sysfs / HUGETLB_DIR / "nr_hugepages").read_text() == "2"


def test_missing_knobs_are_host_errors(tmp_path: Path) -> None:
    with pytest.raises(HostResourceError, match="no shmem THP knob"):
        read_thp_shmem(tmp_path)
    with pytest.raises(HostResourceError, match="no 2 MiB hugetlb pool"):
        read_hugetlb_pool(tmp_path)


def test_shmem_huge_bytes_reads_meminfo(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nShmemHugePages:    4096 kB\n")
    assert shmem_huge_bytes(tmp_path / "meminfo") == 4 << 20
    (tmp_path / "old").write_text("MemTotal: 100 kB\n")
    assert shmem_huge_bytes(tmp_path / "old") == 0
    assert shmem_huge_bytes() >= 0


def test_huge_pages_for() -> None:
    assert huge_pages_for(2048) == 4
    with pytest.raises(UsageError):
        huge_pages_for(100)


def test_real_setup_grows_the_pool_and_thp_then_puts_both_back(huge_host: object) -> None:
    # huge_host: root only, and its lock keeps the other tests' settings out of the way
    pool0 = read_hugetlb_pool()
    thp0 = (SYSFS / THP_SHMEM).read_text()
    with HugePageSetup() as setup:
        setup.ensure({RamKind.HUGETLB: pool0.available + 4, RamKind.THP: 1})
        assert read_hugetlb_pool().available >= pool0.available + 4
        assert read_thp_shmem().ok
    assert read_hugetlb_pool().total == pool0.total
    assert (SYSFS / THP_SHMEM).read_text() == thp0


class FakeKernel(HugePageSetup):
    """A setup whose writes to the fake pool act as the kernel's do: every page added is free."""

    @staticmethod
    def _write(path: Path, value: str) -> None:
        if path.name == "nr_hugepages":
            old = int(path.read_text())
            free = path.parent / "free_hugepages"
            free.write_text(str(int(free.read_text()) + int(value) - old))
        path.write_text(value)


def test_two_runs_setting_up_at_once_each_take_back_only_their_own(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, pool=(4, 0, 0))  # 4 pages, all in use by someone else
    nr = sysfs / HUGETLB_DIR / "nr_hugepages"
    a, b = FakeKernel(sysfs), FakeKernel(sysfs)
    assert a.ensure({RamKind.HUGETLB: 10, RamKind.THP: 1}) == [
        f"{nr}: 4 -> 14", f"{sysfs / THP_SHMEM}: never -> advise"]
    assert b.ensure({RamKind.HUGETLB: 15, RamKind.THP: 1}) == [f"{nr}: 14 -> 19"]
    a.restore()  # the pool loses a's 10 pages, not b's
    assert nr.read_text() == "9" and read_hugetlb_pool(sysfs).available == 5
    b.restore()
    assert nr.read_text() == "4" and read_thp_shmem(sysfs).effective == "never"


def test_a_knob_someone_else_changed_since_is_left_alone(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    setup = HugePageSetup(sysfs)
    setup.ensure({RamKind.THP: 1})
    (sysfs / THP_SHMEM).write_text("always")  # an administrator's choice meanwhile
    setup.restore()
    assert (sysfs / THP_SHMEM).read_text() == "always"
