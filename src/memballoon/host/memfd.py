"""Real guest RAM: a memfd the host creates, maps shared, and releases by punching holes.

Theory of operation
-------------------
The host creates one memfd per guest (``memfd_create(2)``), sizes it with ``ftruncate`` and
seals its size (``F_SEAL_SHRINK | F_SEAL_GROW``) so that the guest, which receives the same fd,
cannot shrink the file under the host's mapping: a shrunk shared file turns the host's next
access into SIGBUS, a crash a hostile guest could otherwise cause at will. Both processes map
the whole file ``MAP_SHARED``: a byte one writes, the other reads.

Release gives the memory behind PFN ranges back to the host with one
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` per coalesced range (man 2 fallocate;
``mm/shmem.c`` ``shmem_fallocate``). ``MADV_DONTNEED`` would not do: on a shared mapping it
only drops this process's page-table entries, the shmem pages stay. A punched page reads back
as zeros and is faulted in again when touched, so ``readmit`` has nothing to do but check
bounds, as QEMU's ``virtio-balloon`` deflate does. What the host holds is the file's
``st_blocks``, the same figure /proc/meminfo counts as ``Shmem``.

The guest's side (``PageStore``) writes a stamp into each page it touches: PFN, generation and
a checksum, at both ends of the page, through a numpy ``(pages, 512)`` uint64 view of the
mapping, so touching and verifying are vectorised. The expected generation of each page is kept
in a numpy array (0 = never stamped, else generation + 1), so a page that was punched while in
use is caught: it reads back zeros.

Huge pages (``RamKind``): with ``thp`` the memfd is ordinary shmem and both processes map it
``MADV_HUGEPAGE``, so with shmem THP set to ``advise`` a page the guest touches comes in as a
2 MiB folio; with ``hugetlb`` the memfd is on hugetlbfs (``MFD_HUGETLB | MFD_HUGE_2MB``) and its
pages come from the reserved pool (the mapping reserves them all, or fails at once). Either
way the RAM is whole 2 MiB pages and the host gives memory back in whole host pages only:
``release`` refuses a range that is not (``host/hostpages.py`` decides which are whole; a
4 KiB punch into hugetlbfs would zero data and free nothing). A punched hugetlb page goes back
to the pool and its reservation with it: ``readmit`` takes it from the pool again at once
(``fallocate``), so a pool another user emptied meanwhile is a ``HostResourceError`` the
device answers, not a SIGBUS when the guest touches the page.

Note on accounting: shmem pages are charged to the memory cgroup of the process that first
touches them (``host/cgroup.py``), here the guest process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
from collections.abc import Callable
from types import TracebackType
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from memballoon.model.counters import CounterName, Counters
from memballoon.model.errors import (
    ConfigError,
    GuestAddressError,
    HostResourceError,
    MemballoonError,
    PeerError,
    UsageError,
)
from memballoon.model.pages import (
    PfnArray,
    RangeArray,
    as_pfns,
    check_ranges,
    merge_ranges,
    range_pages,
)
from memballoon.model.units import HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE, RamKind

# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

WORDS_PER_PAGE: Final = PAGE_SIZE // 8
#: Word columns of a page that hold the stamp: PFN, generation, checksum at the head and again
#: at the tail, so a page torn at either end is caught.
STAMP_COLUMNS: Final = np.array(
    [0, 1, 2, WORDS_PER_PAGE - 3, WORDS_PER_PAGE - 2, WORDS_PER_PAGE - 1], dtype=np.intp
)
#: Mixed into the checksum so that an all-zero (punched) page never verifies, even PFN 0 gen 0.
STAMP_MAGIC: Final = np.uint64(0x6D656D62616C6C6E)  # "memballn"
_MIX_PFN: Final = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constants (splitmix64)
_MIX_GEN: Final = np.uint64(0xBF58476D1CE4E5B9)
#: Pages stamped or verified per numpy call: bounds the temporaries to a few MiB.
STAMP_CHUNK_PAGES: Final = 1 << 16

_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class MemfdCounter(CounterName):
    """What ``MemfdRam.attach`` counts in the bag its caller passes."""

    MEMFD_ATTACH_REJECTED = "memfd_attach_rejected"  # fds from the peer refused (size, seals)


def _load_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "fallocate64", None) or libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_fallocate: Final = _load_fallocate()


def _load_mincore() -> Callable[[int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.mincore
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


_mincore: Final = _load_mincore()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset + length)`` of the file behind ``fd``, keeping its size."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset}+{length}: {os.strerror(err)}")


def allocate(fd: int, offset: int, length: int) -> None:
    """Back ``[offset, offset + length)`` of the file behind ``fd`` with memory now."""
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate at {offset}+{length}: {os.strerror(err)}")


def hugetlb_short(need: int) -> str:
    """What to set when the hugetlb pool cannot back ``need`` more 2 MiB pages."""
    from memballoon.host.hugepages import describe, missing  # sysfs reading, errors only

    try:
        writes = missing(RamKind.HUGETLB, need)
        return describe(RamKind.HUGETLB, writes, huge_pages=need) if writes else (
            f"the 2 MiB hugetlb pool could not give {need} pages")
    except HostResourceError as exc:
        return str(exc)


def stamp_checksum(
    pfns: npt.NDArray[np.uint64], generation: npt.NDArray[np.uint64] | np.uint64
) -> npt.NDArray[np.uint64]:
    """The checksum word of a stamp (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        return (pfns * _MIX_PFN) ^ (generation * _MIX_GEN) ^ STAMP_MAGIC


class MemfdRam:
    """One guest's RAM as a sealed memfd mapped shared: ``RamBackend`` and ``PageStore``.

    The host makes it with ``MemfdRam(guest_pages)`` and passes ``fd`` to the guest process
    (``subprocess`` ``pass_fds`` or SCM_RIGHTS; the fd is close-on-exec otherwise), which opens
    it with ``MemfdRam.attach(fd, guest_pages)``.
    """

    def __init__(self, guest_pages: int, *, kind: RamKind = RamKind.SMALL,
                 name: str = "memballoon-guest") -> None:
        _check_size(guest_pages, kind)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if kind is RamKind.HUGETLB:
            flags |= os.MFD_HUGETLB | os.MFD_HUGE_2MB
        try:
            fd = os.memfd_create(name, flags)
        except OSError as exc:
            raise HostResourceError(f"memfd_create for --ram {kind}: {exc.strerror}") from exc
        try:
            try:
                os.ftruncate(fd, guest_pages << PAGE_SHIFT)
            except OSError as exc:
                raise HostResourceError(f"sizing guest RAM to {guest_pages << PAGE_SHIFT} "
                                        f"bytes: {exc.strerror}") from exc
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._open(fd, guest_pages, kind)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, guest_pages: int, *, kind: RamKind = RamKind.SMALL,
               counters: Counters | None = None) -> MemfdRam:
        """Map RAM another process created (the guest side); owns ``fd`` once it returns.

        The fd comes from the peer, so its size, seals and page size are checked: a file of
        the wrong size, one that could still shrink, or one whose pages are not ``kind``'s
        raises ``PeerError`` (and bumps ``memfd_attach_rejected``) instead of mapping memory
        that may vanish under us.
        """
        _check_size(guest_pages, kind)
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            if counters is not None:
                counters.inc(MemfdCounter.MEMFD_ATTACH_REJECTED)
            raise PeerError(f"fd {fd} is not a memfd: {exc}") from exc
        want = guest_pages << PAGE_SHIFT
        # hugetlbfs gives its page size as the block size; shmem gives 4 KiB
        block = HPAGE_PMD_SIZE if kind is RamKind.HUGETLB else PAGE_SIZE
        if st.st_size != want or seals & fcntl.F_SEAL_SHRINK == 0 or st.st_blksize != block:
            if counters is not None:
                counters.inc(MemfdCounter.MEMFD_ATTACH_REJECTED)
            raise PeerError(
                f"memfd {fd} is {st.st_size} bytes in blocks of {st.st_blksize} with seals "
                f"{seals:#x}; want {want} bytes in blocks of {block} sealed against shrinking"
            )
        self = cls.__new__(cls)
        self._open(fd, guest_pages, kind)
        return self

    def _open(self, fd: int, guest_pages: int, kind: RamKind) -> None:
        self._fd = fd
        self._guest_pages = guest_pages
        self._kind = kind
        self._host_frames = kind.host_page_frames
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                fd,
                guest_pages << PAGE_SHIFT,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            if kind is RamKind.HUGETLB:  # the mapping reserves every page of the pool at once
                need = guest_pages // self._host_frames
                raise HostResourceError(f"mapping {need} hugetlb pages: {exc.strerror}; "
                                        f"{hugetlb_short(need)}") from exc
            raise HostResourceError(f"mapping {guest_pages << PAGE_SHIFT} bytes of guest RAM: "
                                    f"{exc.strerror}") from exc
        if kind is RamKind.THP:
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        self._view: memoryview | None = memoryview(self._mm)
        words = np.frombuffer(self._mm, dtype=np.uint64)
        self._words: npt.NDArray[np.uint64] | None = words.reshape(guest_pages, WORDS_PER_PAGE)
        # What each page's stamp should say (generation + 1; 0: never stamped here). Made on
        # the first touch: the host maps every guest's RAM but stamps none (8 bytes a page
        # would be 8 MiB for a 4 GiB guest, resident once the allocator reuses freed memory).
        self._expect: npt.NDArray[np.uint64] | None = None
        self.released_pages_total = 0
        self.release_calls_total = 0

    # ---------------------------------------------------------------- plumbing
    @property
    def fd(self) -> int:
        """The memfd (close-on-exec: hand it over with ``pass_fds`` or SCM_RIGHTS)."""
        self._live()
        return self._fd

    @property
    def guest_pages(self) -> int:
        return self._guest_pages

    @property
    def kind(self) -> RamKind:
        return self._kind

    @property
    def host_page_frames(self) -> int:
        """4 KiB frames in one host page (1, or 512 for 2 MiB pages)."""
        return self._host_frames

    @property
    def size_bytes(self) -> int:
        return self._guest_pages << PAGE_SHIFT

    @property
    def mapping(self) -> memoryview:
        """The whole RAM as a writable memoryview (guest-physical address = offset)."""
        return self._live_view()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap and close the fd. Views handed out (``mapping`` slices, numpy arrays over it)
        must be released first, or ``UsageError`` says so and nothing is closed."""
        if self._mm is None:
            return
        assert self._view is not None
        self._words = None
        self._view.release()
        try:
            self._mm.close()
        except BufferError as exc:
            self._view = memoryview(self._mm)
            self._words = np.frombuffer(self._mm, dtype=np.uint64).reshape(
                self._guest_pages, WORDS_PER_PAGE
            )
            raise UsageError(f"MemfdRam still exported to a view: {exc}") from exc
        self._mm = None
        self._view = None
        os.close(self._fd)

    def __enter__(self) -> MemfdRam:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"fd={self._fd}"
        return f"MemfdRam(guest_pages={self._guest_pages}, {state})"

    def _live(self) -> None:
        if self._mm is None:
            raise UsageError("MemfdRam is closed")

    def _live_view(self) -> memoryview:
        if self._view is None:
            raise UsageError("MemfdRam is closed")
        return self._view

    def _live_words(self) -> npt.NDArray[np.uint64]:
        if self._words is None:
            raise UsageError("MemfdRam is closed")
        return self._words

    # ---------------------------------------------------------------- RamBackend
    def release(self, ranges: RangeArray) -> int:
        """Punch one hole per range; every range is checked before the first punch (and, with
        huge pages, must be whole host pages)."""
        self._live()
        ranges = self._checked(ranges, whole=True)
        for start, end in ranges.tolist():
            try:
                punch_hole(self._fd, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)
            except OSError as exc:
                raise MemballoonError(f"releasing PFNs [{start}, {end}): {exc}") from exc
            self.release_calls_total += 1
        n = range_pages(ranges)
        self.released_pages_total += n
        return n

    def readmit(self, ranges: RangeArray) -> int:
        """Shmem: nothing to map back, a page faults in again when the guest touches it (as
        QEMU). hugetlb (whole host pages only): each page is taken from the pool now, since
        a fault into an empty pool would be SIGBUS; pages it cannot get raise
        ``HostResourceError`` listing them in ``unbacked`` once every other page is in."""
        self._live()
        ranges = self._checked(ranges, whole=True)
        if self._kind is RamKind.HUGETLB:
            self._allocate(ranges)
        return range_pages(ranges)

    def _allocate(self, ranges: RangeArray) -> None:
        unbacked: list[tuple[int, int]] = []
        step = self._host_frames
        reason = ""
        for start, end in ranges.tolist():
            try:
                allocate(self._fd, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)
                continue
            except OSError as exc:
                reason = exc.strerror or str(exc)
            # the pool ran short inside this range: find the pages it can still give
            for lo in range(start, end, step):
                try:
                    allocate(self._fd, lo << PAGE_SHIFT, step << PAGE_SHIFT)
                except OSError:
                    unbacked.append((lo, lo + step))
        if unbacked:
            merged = merge_ranges([s for s, _ in unbacked], [e for _, e in unbacked])
            need = len(unbacked)
            raise HostResourceError(
                f"no hugetlb memory to give {need} huge pages back to the guest ({reason}); "
                f"{hugetlb_short(need)}",
                tuple((int(s), int(e)) for s, e in merged.tolist()),
            )
    def resident_bytes(self) -> int:
        """What the host really holds for this RAM: allocated blocks of the memfd."""
        self._live()
        return os.fstat(self._fd).st_blocks * 512

    def _checked(self, ranges: RangeArray, *, whole: bool = False) -> RangeArray:
        r = np.asarray(ranges)
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise GuestAddressError(f"PFN ranges must be integers, got {r.dtype}")
        r = r.astype(np.int64, copy=False)
        check_ranges(r, self._guest_pages)
        if whole and self._host_frames > 1 and r.size and bool((r % self._host_frames).any()):
            raise UsageError(f"--ram {self._kind}: only whole 2 MiB host pages can be released "
                             "or readmitted (host/hostpages.py decides which are whole)")
        return r

    # ---------------------------------------------------------------- PageStore
    def touch(self, pfns: PfnArray, generation: int) -> None:
        """Write the stamp of ``generation`` at both ends of each page (faults them in)."""
        words = self._live_words()
        p = self._checked_pfns(pfns)
        if p.size == 0:
            return
        if not 0 <= generation < 2**63 - 1:
            raise UsageError(f"generation out of range: {generation}")
        gen = np.uint64(generation)
        for lo in range(0, p.size, STAMP_CHUNK_PAGES):
            chunk = p[lo : lo + STAMP_CHUNK_PAGES]
            u = chunk.astype(np.uint64)
            col = np.stack((u, np.full_like(u, gen), stamp_checksum(u, gen)), axis=1)
            words[np.ix_(chunk, STAMP_COLUMNS)] = np.concatenate((col, col), axis=1)
            if self._expect is None:
                self._expect = np.zeros(self._guest_pages, dtype=np.uint64)
            self._expect[chunk] = gen + np.uint64(1)

    def forget(self, ranges: RangeArray) -> None:
        """Drop this process's mapping of frames the guest gives its balloon (``MADV_DONTNEED``
        on a shared mapping: the pages stay in the memfd until the host punches them).

        The host's punch then finds nothing of ours to unmap, so it sends our CPU no TLB
        shoot-down, and the unmapping is done here, on the guest's CPU, while the host punches
        earlier pages. With huge pages only whole host pages are dropped (a part of one would
        only split the mapping).
        """
        mm = self._mm
        if mm is None:
            raise UsageError("MemfdRam is closed")
        r = self._checked(ranges)
        hp = self._host_frames
        if hp > 1 and len(r):
            lo = -(-r[:, 0] // hp) * hp
            hi = r[:, 1] // hp * hp
            r = np.stack((lo, hi), axis=1)[hi > lo]
        for start, end in r.tolist():
            mm.madvise(mmap.MADV_DONTNEED, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)

    def verify(self, pfns: PfnArray) -> int:
        """How many of these pages lost their last stamp (a punched page reads zeros).

        Pages never stamped here have nothing to lose and are not counted. Pages no longer in
        the memfd count as lost without being read, so checking does not fault them back in.
        """
        self._live()
        p = self._checked_pfns(pfns)
        if self._expect is None:
            return 0  # nothing stamped here
        exp = self._expect[p]
        p = p[exp != 0]
        want = exp[exp != 0].astype(np.int64) - 1
        return int(np.count_nonzero(self.stamped_generations(p) != want))

    def resident_mask(self, pfns: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of these pages the memfd holds now (``mincore(2)`` over the shared mapping:
        it reports the file's page cache, so what another process touched counts too)."""
        words = self._live_words()
        p = self._checked_pfns(pfns)
        if p.size == 0:
            return np.zeros(0, dtype=np.bool_)
        lo, hi = int(p.min()), int(p.max()) + 1
        vec = np.empty(hi - lo, dtype=np.uint8)
        addr = words.ctypes.data + (lo << PAGE_SHIFT)
        if _mincore(addr, (hi - lo) << PAGE_SHIFT, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise MemballoonError(f"mincore over PFNs [{lo}, {hi}): {os.strerror(err)}")
        return (vec[p - lo] & 1).astype(np.bool_)

    def stamped_generations(self, pfns: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The generation each page's stamp carries, or -1 where there is no intact stamp.

        Reads the memory itself, not this process's expectations: what another process that
        maps the same RAM wrote is seen here. Pages not in the memfd are not read (-1).
        """
        words = self._live_words()
        p = self._checked_pfns(pfns)
        out = np.full(p.size, -1, dtype=np.int64)
        for lo in range(0, p.size, STAMP_CHUNK_PAGES):
            chunk = p[lo : lo + STAMP_CHUNK_PAGES]
            here = self.resident_mask(chunk)
            c = chunk[here]
            got = words[np.ix_(c, STAMP_COLUMNS)]
            u = c.astype(np.uint64)
            gen = got[:, 1]
            want = np.stack((u, gen, stamp_checksum(u, gen)), axis=1)
            ok = (got[:, :3] == want).all(axis=1) & (got[:, 3:] == want).all(axis=1)
            ok &= gen < np.uint64(2**63)  # touch() never writes more; keeps the int64 cast exact
            res = np.full(chunk.size, -1, dtype=np.int64)
            res[here] = np.where(ok, gen.astype(np.int64), -1)
            out[lo : lo + chunk.size] = res
        return out

    def expected_generation(self, pfn: int) -> int | None:
        """The generation last stamped into ``pfn`` (None when never touched)."""
        p = self._checked_pfns(np.array([pfn]))
        e = 0 if self._expect is None else int(self._expect[p[0]])
        return None if e == 0 else e - 1

    def _checked_pfns(self, pfns: npt.ArrayLike) -> PfnArray:
        # numpy would wrap a negative index silently: check bounds before indexing.
        p = as_pfns(pfns)
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self._guest_pages):
            raise GuestAddressError(
                f"PFNs [{int(p.min())}, {int(p.max())}] outside guest memory of "
                f"{self._guest_pages} pages"
            )
        return p


def _check_size(guest_pages: int, kind: RamKind) -> None:
    if guest_pages <= 0:
        raise UsageError(f"guest_pages must be positive, got {guest_pages}")
    if guest_pages % kind.host_page_frames:
        raise ConfigError(f"--ram {kind}: guest RAM must be whole 2 MiB pages, got "
                          f"{guest_pages} pages of 4 KiB")


__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "STAMP_COLUMNS",
    "MemfdRam",
    "allocate",
    "punch_hole",
    "stamp_checksum",
]
