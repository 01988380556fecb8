"""Huge pages on this host: is it set up for a kind of guest RAM, and setting it up for a run.

Theory of operation
-------------------
Two kinds of guest RAM (``RamKind``) need the host's cooperation:

- ``thp``: shmem (a memfd) gets transparent huge pages only where sysfs allows it. Since Linux
  6.11 each page size has its own knob; the 2 MiB one is
  ``transparent_hugepage/hugepages-2048kB/shmem_enabled``, whose ``inherit`` defers to
  ``transparent_hugepage/shmem_enabled`` (older kernels have only that one). memballoon maps
  guest RAM with ``MADV_HUGEPAGE``, so ``advise``, ``always``, ``within_size`` and ``force``
  do; ``never`` and ``deny`` do not (Documentation/admin-guide/mm/transhuge.rst).
- ``hugetlb``: hugetlbfs pages come from a pool reserved beforehand
  (``hugepages/hugepages-2048kB/nr_hugepages``); mapping a guest's RAM reserves all its pages at
  once, so the pool must have that many free and unreserved.

``missing`` lists what is not set, as the commands that set it; ``check_host`` raises
``HostResourceError`` with them. ``HugePageSetup`` (the explicit ``--setup-hugepages``) writes
what is missing for the run and ``restore`` puts back every value it changed. The sysfs root is
a parameter, so the logic is tested on a fake tree too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from memballoon.model.errors import HostResourceError, UsageError
from memballoon.model.units import HPAGE_PMD_SIZE, RamKind

SYSFS: Final = Path("/sys")
THP_DIR: Final = "kernel/mm/transparent_hugepage"
THP_SHMEM: Final = f"{THP_DIR}/shmem_enabled"
THP_SHMEM_PMD: Final = f"{THP_DIR}/hugepages-{HPAGE_PMD_SIZE // 1024}kB/shmem_enabled"
HUGETLB_DIR: Final = f"kernel/mm/hugepages/hugepages-{HPAGE_PMD_SIZE // 1024}kB"
#: shmem_enabled values under which a MADV_HUGEPAGE mapping gets huge pages.
THP_SHMEM_OK: Final = frozenset({"always", "within_size", "advise", "force"})
#: What ``HugePageSetup`` writes where the value does not do.
THP_SHMEM_SETTING: Final = "advise"

_SELECTED = re.compile(r"\[([a-z_]+)\]")


def _selected(text: str) -> str:
    """The bracketed choice of a sysfs knob (``always [advise] never`` -> ``advise``)."""
    m = _SELECTED.search(text)
    return m.group(1) if m else text.strip()


@dataclass(frozen=True, slots=True)
class ThpShmem:
    """The shmem THP knobs: the global one and the 2 MiB one (None before Linux 6.11)."""

    top: str
    pmd: str | None

    @property
    def effective(self) -> str:
        return self.top if self.pmd in (None, "inherit") else self.pmd

    @property
    def ok(self) -> bool:
        return self.effective in THP_SHMEM_OK


@dataclass(frozen=True, slots=True)
class HugetlbPool:
    """The 2 MiB hugetlb pool, in huge pages."""

    total: int  # nr_hugepages
    free: int  # free_hugepages
    reserved: int  # resv_hugepages: free but promised to mappings already made

    @property
    def available(self) -> int:
        return self.free - self.reserved


def read_thp_shmem(sysfs: Path = SYSFS) -> ThpShmem:
    try:
        top = _selected((sysfs / THP_SHMEM).read_text())
    except OSError as exc:
        raise HostResourceError(f"this kernel has no shmem THP knob ({sysfs / THP_SHMEM}: "
                                f"{exc.strerror}): use --ram 4k or hugetlb") from exc
    pmd_path = sysfs / THP_SHMEM_PMD
    pmd = _selected(pmd_path.read_text()) if pmd_path.exists() else None
    return ThpShmem(top, pmd)


def read_hugetlb_pool(sysfs: Path = SYSFS) -> HugetlbPool:
    d = sysfs / HUGETLB_DIR
    try:
        return HugetlbPool(*(int((d / f).read_text()) for f in
                             ("nr_hugepages", "free_hugepages", "resv_hugepages")))
    except OSError as exc:
        raise HostResourceError(f"this kernel has no 2 MiB hugetlb pool ({d}: {exc.strerror}): "
                                "use --ram 4k or thp") from exc


def missing(kind: RamKind, huge_pages: int, sysfs: Path = SYSFS) -> dict[Path, str]:
    """What must be written where (path -> value) before guests of ``kind`` needing
    ``huge_pages`` 2 MiB pages in all can run; empty when the host is ready."""
    match kind:
        case RamKind.SMALL:
            return {}
        case RamKind.THP:
            thp = read_thp_shmem(sysfs)
            if thp.ok:
                return {}
            if thp.pmd is not None and thp.pmd != "inherit":
                return {sysfs / THP_SHMEM_PMD: THP_SHMEM_SETTING}
            return {sysfs / THP_SHMEM: THP_SHMEM_SETTING}
        case RamKind.HUGETLB:
            pool = read_hugetlb_pool(sysfs)
            short = huge_pages - pool.available
            return {sysfs / HUGETLB_DIR / "nr_hugepages": str(pool.total + short)} \
                if short > 0 else {}


def describe(kind: RamKind, writes: dict[Path, str], sysfs: Path = SYSFS,
             huge_pages: int | None = None) -> str:
    """One line: why the host is not ready for ``kind`` (needing ``huge_pages`` 2 MiB pages)
    and the commands that make it so."""
    if kind is RamKind.HUGETLB:
        pool = read_hugetlb_pool(sysfs)
        need = "" if huge_pages is None else f", {huge_pages} needed"
        why = (f"the 2 MiB hugetlb pool has {pool.available} of its {pool.total} pages "
               f"free{need}")
    else:
        why = f"shmem transparent huge pages are {read_thp_shmem(sysfs).effective!r}"
    cmds = "; ".join(f"echo {v} > {p}" for p, v in writes.items())
    return (f"--ram {kind}: {why}; as root run: {cmds} (or pass --setup-hugepages to set it "
            "for this run and put it back afterwards)")


def check_host(needs: dict[RamKind, int], sysfs: Path = SYSFS) -> None:
    """Raise ``HostResourceError`` naming what to set unless the host can back ``needs``
    (huge pages each kind needs in all)."""
    for kind, pages in needs.items():
        writes = missing(kind, pages, sysfs)
        if writes:
            raise HostResourceError(describe(kind, writes, sysfs, pages))


class HugePageSetup:
    """Sets what ``missing`` lists for a run, and puts it all back (``with`` or ``restore``).

    Other runs may set the same knobs meanwhile, so what is put back is this run's own change:
    the pool shrinks by the pages this run added to it (not to the size it saw first), and a
    THP knob is written back only if it still says what this run wrote.
    """

    def __init__(self, sysfs: Path = SYSFS) -> None:
        self.sysfs = sysfs
        self._saved: dict[Path, tuple[str, str]] = {}  # file -> (value before, value written)
        self._added = 0  # pool pages this run added

    @property
    def changed(self) -> dict[Path, str]:
        """The files written so far and what they held before."""
        return {p: before for p, (before, _) in self._saved.items()}

    def ensure(self, needs: dict[RamKind, int]) -> list[str]:
        """Make the host ready for ``needs``; one line per value written (empty: ready)."""
        done: list[str] = []
        for kind, pages in needs.items():
            writes = missing(kind, pages, self.sysfs)
            if writes and self.sysfs == SYSFS and os.geteuid() != 0:
                raise HostResourceError(f"--setup-hugepages needs root; "
                                        f"{describe(kind, writes, huge_pages=pages)}")
            for path, value in writes.items():
                old = _selected(path.read_text())
                self._write(path, value)
                if kind is RamKind.HUGETLB:
                    self._added += int(value) - int(old)
                self._saved[path] = (self._saved.get(path, (old, value))[0], value)
                done.append(f"{path}: {old} -> {value}")
            still = missing(kind, pages, self.sysfs)
            if still:
                why = describe(kind, still, self.sysfs, pages)
                raise HostResourceError(f"--setup-hugepages: the kernel did not take it ({why}); "
                                        "memory may be too fragmented for more huge pages")
        return done

    def restore(self) -> None:
        """Undo this run's changes, last first (see the class docstring)."""
        errors: list[str] = []
        for path, (before, written) in reversed(list(self._saved.items())):
            try:
                if path.name == "nr_hugepages":
                    now = int(path.read_text())
                    self._write(path, str(max(0, now - self._added)))
                elif _selected(path.read_text()) == written:
                    self._write(path, before)
            except (HostResourceError, OSError, ValueError) as exc:
                errors.append(f"{path}: {exc}")
        self._saved.clear()
        self._added = 0
        if errors:
            raise HostResourceError("; ".join(errors))

    @staticmethod
    def _write(path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise HostResourceError(f"writing {value!r} to {path}: {exc.strerror}") from exc

    def __enter__(self) -> HugePageSetup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()


def shmem_huge_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Shmem (memfd) memory the machine holds in transparent huge pages now
    (``ShmemHugePages``): how a run shows its RAM really came in 2 MiB pages."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("ShmemHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def huge_pages_for(guest_pages: int) -> int:
    """2 MiB host pages behind ``guest_pages`` 4 KiB frames (a whole number of them)."""
    frames = RamKind.THP.host_page_frames
    if guest_pages % frames:
        raise UsageError(f"{guest_pages} pages are not whole 2 MiB pages")
    return guest_pages // frames


__all__ = ["HugePageSetup", "HugetlbPool", "ThpShmem", "check_host", "describe",
           "huge_pages_for", "missing", "read_hugetlb_pool", "read_thp_shmem",
           "shmem_huge_bytes"]
