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
from memballoon.model.errors import GuestAddressError, MemballoonError, PeerError, UsageError
from memballoon.model.pages import PfnArray, RangeArray, as_pfns, check_ranges, range_pages
from memballoon.model.units import PAGE_SHIFT, PAGE_SIZE

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

    def __init__(self, guest_pages: int, *, name: str = "memballoon-guest") -> None:
        if guest_pages <= 0:
            raise UsageError(f"guest_pages must be positive, got {guest_pages}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, guest_pages << PAGE_SHIFT)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._open(fd, guest_pages)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, guest_pages: int, *, counters: Counters | None = None) -> MemfdRam:
        """Map RAM another process created (the guest side); owns ``fd`` once it returns.

        The fd comes from the peer, so its size and seals are checked: a file of the wrong
        size or one that could still shrink raises ``PeerError`` (and bumps
        ``memfd_attach_rejected``) instead of mapping memory that may vanish under us.
        """
        if guest_pages <= 0:
            raise UsageError(f"guest_pages must be positive, got {guest_pages}")
        try:
            size = os.fstat(fd).st_size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            if counters is not None:
                counters.inc(MemfdCounter.MEMFD_ATTACH_REJECTED)
            raise PeerError(f"fd {fd} is not a memfd: {exc}") from exc
        want = guest_pages << PAGE_SHIFT
        if size != want or seals & fcntl.F_SEAL_SHRINK == 0:
            if counters is not None:
                counters.inc(MemfdCounter.MEMFD_ATTACH_REJECTED)
            raise PeerError(
                f"memfd {fd} is {size} bytes with seals {seals:#x}; want {want} bytes "
                "sealed against shrinking"
            )
        self = cls.__new__(cls)
        self._open(fd, guest_pages)
        return self

    def _open(self, fd: int, guest_pages: int) -> None:
        self._fd = fd
        self._guest_pages = guest_pages
        self._mm: mmap.mmap | None = mmap.mmap(
            fd,
            guest_pages << PAGE_SHIFT,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
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
        """Punch one hole per range; every range is checked before the first punch."""
        self._live()
        ranges = self._checked(ranges)
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
        """Nothing to map back: a page faults in again when the guest touches it (as QEMU)."""
        self._live()
        return range_pages(self._checked(ranges))

    def resident_bytes(self) -> int:
        """What the host really holds for this RAM: allocated blocks of the memfd."""
        self._live()
        return os.fstat(self._fd).st_blocks * 512

    def _checked(self, ranges: RangeArray) -> RangeArray:
        r = np.asarray(ranges)
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise GuestAddressError(f"PFN ranges must be integers, got {r.dtype}")
        r = r.astype(np.int64, copy=False)
        check_ranges(r, self._guest_pages)
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


__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "STAMP_COLUMNS",
    "MemfdRam",
    "punch_hole",
    "stamp_checksum",
]
