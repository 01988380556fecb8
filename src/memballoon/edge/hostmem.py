"""Reading the host's own memory each period (edge: file I/O): the whole machine or a cgroup.

``ProcProbe`` reads ``/proc/meminfo`` (MemTotal, MemAvailable) and ``/proc/pressure/memory``;
``CgroupProbe`` reads the cgroup that stands for the guests' share of the host (e.g.
``machine.slice``, which libvirt puts every VM in): v2 ``memory.current``, ``memory.max``,
``memory.pressure``; v1 ``memory.usage_in_bytes`` less the inactive page cache it can drop,
``memory.limit_in_bytes`` (no PSI in v1: the machine's ``/proc/pressure/memory`` stands in).
A cgroup without a limit is bounded by the machine: its available memory is the smaller of
the two. A kernel without PSI (before 4.20, or booted with ``psi=0``) gives ``psi=None`` and
``make_probe`` says so once; a missing file or cgroup is a ``HostMemoryError`` that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from memballoon.manager.port import HostMemory, HostProbe
from memballoon.model.errors import ConfigError
from memballoon.protocol.procfs import (
    HostMemoryError,
    Psi,
    parse_counter,
    parse_meminfo,
    parse_psi,
    parse_stat,
)

PROC: Final = Path("/proc")
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise HostMemoryError(f"cannot read {path}: {exc.strerror}") from None


class ProcProbe:
    """The whole machine: ``/proc/meminfo`` and ``/proc/pressure/memory``."""

    def __init__(self, proc: Path = PROC) -> None:
        self.meminfo_path = proc / "meminfo"
        self.psi_path = proc / "pressure" / "memory"
        self.has_psi = self.psi_path.exists()

    def psi(self) -> Psi | None:
        if not self.has_psi:
            return None
        return parse_psi(_read(self.psi_path), source=str(self.psi_path))

    def read(self) -> HostMemory:
        mi = parse_meminfo(_read(self.meminfo_path), source=str(self.meminfo_path))
        return HostMemory(total_bytes=mi["MemTotal"], available_bytes=mi["MemAvailable"],
                          psi=self.psi(), source=str(self.meminfo_path))


class CgroupProbe:
    """One memory cgroup (v1 or v2, found by its files), bounded by the machine's memory."""

    def __init__(self, path: Path, *, machine: ProcProbe | None = None) -> None:
        self.path = path
        self.machine = machine if machine is not None else ProcProbe()
        if (path / "memory.current").exists():
            self.version = 2
        elif (path / "memory.usage_in_bytes").exists():
            self.version = 1
        else:
            raise HostMemoryError(
                f"{path} is not a memory cgroup (no memory.current or memory.usage_in_bytes); "
                f"name an existing cgroup directory such as {CGROUP_ROOT}/machine.slice "
                f"(v2) or {CGROUP_ROOT}/memory/machine.slice (v1)")

    def read(self) -> HostMemory:
        machine = self.machine.read()
        p = self.path
        if self.version == 2:
            used = parse_counter(_read(p / "memory.current"), source=str(p / "memory.current"))
            limit = parse_counter(_read(p / "memory.max"), source=str(p / "memory.max"))
            psi: Psi | None = parse_psi(_read(p / "memory.pressure"),
                                        source=str(p / "memory.pressure"))
        else:
            used = parse_counter(_read(p / "memory.usage_in_bytes"),
                                 source=str(p / "memory.usage_in_bytes"))
            limit = parse_counter(_read(p / "memory.limit_in_bytes"),
                                  source=str(p / "memory.limit_in_bytes"))
            stat = parse_stat(_read(p / "memory.stat"), source=str(p / "memory.stat"))
            # v1 charges page cache to the cgroup; what it could drop at once is not in use
            used = max(0, (used or 0) - stat.get("total_inactive_file", 0))
            psi = machine.psi
        used = used or 0
        if limit is None:  # no limit of its own: the machine bounds it
            return HostMemory(machine.total_bytes, machine.available_bytes, psi,
                              f"cgroup v{self.version} {p} (no limit)")
        avail = min(max(0, limit - used), machine.available_bytes)
        return HostMemory(min(limit, machine.total_bytes), avail, psi,
                          f"cgroup v{self.version} {p}")


def make_probe(cgroup: str | Path | None = None) -> tuple[HostProbe, str]:
    """The probe for ``cgroup`` (a path, absolute or under /sys/fs/cgroup), else for the
    machine; and one line for the operator saying what is read. ConfigError names a cgroup
    that is not there."""
    proc = ProcProbe()
    if cgroup is None:
        probe: HostProbe = proc
    else:
        path = Path(cgroup)
        if not path.is_absolute():
            path = CGROUP_ROOT / path
        try:
            probe = CgroupProbe(path, machine=proc)
        except HostMemoryError as exc:
            raise ConfigError(f"host_cgroup = {str(cgroup)!r}: {exc}") from None
    try:
        first = probe.read()
    except HostMemoryError as exc:
        raise ConfigError(f"host memory: {exc}") from None
    psi = "PSI" if first.psi is not None else (
        "no PSI (kernel without /proc/pressure: pressure from available memory only)")
    return probe, f"host memory from {first.source}, {psi}"


__all__ = ["CgroupProbe", "ProcProbe", "make_probe"]
