"""``memballoon run --config host.toml``: the daemon's config (tomllib + pydantic v2).

Sizes are a whole number of bytes or a string with a binary or decimal unit: ``"3GiB"``,
``"512 MiB"``, ``"1.5GiB"``, ``"64MB"``, ``"4096B"``. Every error is one ``ConfigError`` whose
message names the key (``guests[1].min``), the value and, for sizes, the unit expected.
A guest's ``min`` and ``max`` may also be a share of its RAM (``"25%"``), resolved when its RAM
is known (``resolve_settings``): a libvirt domain's when it is first seen.

Worlds: ``local`` (guest processes, ``mib``), ``qemu`` (VMs memballoon launches, ``max_mib``,
or running VMs it attaches to by their QMP socket, ``qmp``), ``libvirt`` (the running domains
of ``uri``, all or those ``domains`` matches; ``[[guests]]`` entries only set limits, and
``[defaults]`` sets them for every guest an entry leaves them to).
See examples/host.toml, examples/qemu.toml, examples/qemu-attach.toml, examples/libvirt.toml.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from memballoon.model.errors import ConfigError
from memballoon.model.units import GIB, KIB, MIB, PAGE_SIZE
from memballoon.policy.sample import GuestSettings

UNITS: Final = {
    "b": 1, "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1 << 40,
    "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}
_SIZE_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
UNIT_HELP: Final = "B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
_MAX_SIZE_DIGITS: Final = 24  # 2**64 has 20
PROTOCOLS: Final = ("vmw", "vmw-batched", "virtio")
WORKLOADS: Final = ("idle", "steady", "bursty", "ramp", "diurnal")
DEFAULT_SOCKET_NAME: Final = "memballoon.sock"


def parse_size(value: object) -> int:
    """Bytes in ``value`` (an int of bytes or a string with a unit); ConfigError says why."""
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a size; give bytes or a string with a unit "
                          f"({UNIT_HELP})")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{value} bytes is negative")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not a size; give bytes or a string like '512MiB'")
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ConfigError(f"{value!r} is not a size; write a number and a unit ({UNIT_HELP})")
    num, unit = m.group(1), m.group(2) or "B"
    if len(num) > _MAX_SIZE_DIGITS:  # int() refuses past 4300 digits, float() overflows to inf
        raise ConfigError(f"{value[:40]!r}...: {len(num)} digits is not a size")
    mult = UNITS.get(unit.lower())
    if mult is None:
        raise ConfigError(f"{value!r}: unknown unit {unit!r} (use {UNIT_HELP})")
    n = float(num) * mult if "." in num else int(num) * mult
    if n != int(n):
        raise ConfigError(f"{value!r} is not a whole number of bytes")
    return int(n)


def size_with_unit(value: object) -> int:
    """``parse_size`` for what an administrator types: a bare number other than 0 is refused,
    with the unit it probably lacks (seed 003: guests over-shrunk "due to bad UI - entering the
    wrong units")."""
    n = parse_size(value)
    bare = isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
    if bare and n != 0:
        raise ConfigError(f"{value!r} has no unit: write '{n}MiB' (or '{n}B' if you mean "
                          f"bytes)")
    return n


def _size(v: object) -> int:
    return size_with_unit(v)


Size = Annotated[int, BeforeValidator(_size)]

#: The smallest local guest that runs: its kernel keeps 16 MiB (guest/memory.py: image, page
#: tables, struct pages), which must stay under half its RAM (local.host.MIN_GUEST_MIB).
MIN_LOCAL_GUEST_MIB: Final = 33
#: The largest guest RAM a config may name (4 TiB); a local guest must also fit the host.
MAX_GUEST_MIB: Final = 4 << 20


def _guest_mib(lo: int, what: str) -> Any:
    """A guest's RAM in MiB: a whole number from ``lo`` to ``MAX_GUEST_MIB``."""

    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{v!r} is not a whole number of MiB")
        if v < lo:
            raise ConfigError(f"{v} MiB is too small to run: {what} needs at least {lo} MiB")
        if v > MAX_GUEST_MIB:
            raise ConfigError(f"{v} MiB is more than {MAX_GUEST_MIB} MiB (4 TiB), the most a "
                              "guest may have here")
        return v

    return BeforeValidator(check)


def _seconds(lo: float, hi: float, *, lo_open: bool = False) -> Any:
    """A duration in seconds within [lo, hi] (``(lo, hi]`` with ``lo_open``): inf, NaN, a
    negative or a vanishing period (1e-300 s spins a core) is refused, with the range."""

    def check(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{v!r} is not a number of seconds")
        f = float(v)
        low_ok = f > lo if lo_open else f >= lo
        if not math.isfinite(f) or not low_ok or f > hi:
            bound = f"more than {lo:g}" if lo_open else f"{lo:g}"
            raise ConfigError(f"{f!r} s is outside the allowed range: {bound} to {hi:g} s")
        return f

    return BeforeValidator(check)


#: The manager's period: 10 a second at most (shorter only spins), an hour at least.
HostPeriod = Annotated[float, _seconds(0.1, 3600.0)]
#: A local guest's work and report period.
GuestPeriod = Annotated[float, _seconds(0.05, 60.0)]
#: Hysteresis durations: up to a day.
HoldSeconds = Annotated[float, _seconds(0.0, 86400.0)]
MaxAgeSeconds = Annotated[float, _seconds(0.0, 86400.0, lo_open=True)]

#: The default ``host_reserve``: this share of the host's memory stays available to the host.
DEFAULT_HOST_RESERVE: Final = "5%"
_PERCENT_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*")


def _budget(v: object) -> int | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return size_with_unit(v)


def _reserve(v: object) -> int | str:
    if isinstance(v, str):
        m = _PERCENT_RE.fullmatch(v)
        if m is not None:
            pct = float(m.group(1))
            if not 0.0 <= pct < 100.0:
                raise ConfigError(f"{v!r}: a share of the host's memory must be under 100%")
            return f"{pct:g}%"
    return size_with_unit(v)


def reserve_bytes(reserve: int | str, total_bytes: int) -> int:
    """``host_reserve`` in bytes for a host of ``total_bytes`` (a size, or a share "5%")."""
    if isinstance(reserve, int):
        return reserve
    return int(float(reserve.rstrip("%")) / 100.0 * total_bytes) // PAGE_SIZE * PAGE_SIZE


#: ``budget``: a size, or ``"auto"``: the host's available memory beyond ``host_reserve``.
Budget = Annotated[int | Literal["auto"], BeforeValidator(_budget)]
#: ``host_reserve``: a size, or a share of the host's memory (``"5%"``).
Reserve = Annotated[int | str, BeforeValidator(_reserve)]


def _limit(v: object) -> int | str:
    if isinstance(v, str) and _PERCENT_RE.fullmatch(v) is not None:
        pct = float(v.strip().rstrip("%"))
        if not 0.0 <= pct <= 100.0:
            raise ConfigError(f"{v!r}: a share of the guest's RAM must be 0% to 100%")
        return f"{pct:g}%"
    return size_with_unit(v)


#: A guest's ``min``/``max``: a size, or a share of its RAM (``"25%"``).
Limit = Annotated[int | str, BeforeValidator(_limit)]


def limit_pages(limit: int | str, ram_pages: int) -> int:
    """``limit`` (bytes, or a share "25%") in whole pages of a guest of ``ram_pages``."""
    if isinstance(limit, int):
        return limit // PAGE_SIZE
    return int(float(limit.rstrip("%")) / 100.0 * ram_pages)


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/memballoon/memballoon.sock``, else ``/run/memballoon/...`` for root,
    else ``/tmp/memballoon-<uid>/memballoon.sock``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "memballoon" / DEFAULT_SOCKET_NAME
    if os.getuid() == 0:
        return Path("/run/memballoon") / DEFAULT_SOCKET_NAME
    return Path(f"/tmp/memballoon-{os.getuid()}") / DEFAULT_SOCKET_NAME


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PolicyConfig(_Strict):
    name: str = "default"
    params: dict[str, Any] = Field(default_factory=dict)


class HysteresisConfig(_Strict):
    min_change: Size = 1 * MIB
    min_change_fraction: float = Field(default=0.0025, ge=0.0, lt=1.0)
    hold_s: HoldSeconds = 10.0
    report_max_age_s: MaxAgeSeconds = 10.0


class DefaultsConfig(_Strict):
    """Limits for every guest whose ``[[guests]]`` entry leaves them out (or that has none:
    a libvirt domain not named)."""

    min: Limit | None = None
    max: Limit | None = None
    shares: int = Field(default=1000, gt=0)

    @model_validator(mode="after")
    def _order(self) -> DefaultsConfig:
        _check_order(self.min, self.max)
        return self


def _check_order(lo: int | str | None, hi: int | str | None) -> None:
    """A max below its min, where both are sizes or both shares (mixed: the min holds)."""
    if lo is None or hi is None or isinstance(lo, int) != isinstance(hi, int):
        return
    if limit_pages(hi, 10**6) < limit_pages(lo, 10**6):
        raise ConfigError(f"max = {hi!r} is below min = {lo!r}")


class GuestConfig(_Strict):
    # libvirt domain names may hold more than this, but not in a [[guests]] entry: ask if so
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mib: Annotated[int, _guest_mib(MIN_LOCAL_GUEST_MIB, "a local guest (16 MiB its kernel "
                                  "keeps, under half its RAM)")] | None = None  # local
    # qemu: RAM (attach: QEMU's, if given); logical size at boot
    max_mib: Annotated[int, _guest_mib(64, "a QEMU guest")] | None = None
    start_mib: Annotated[int, _guest_mib(64, "a QEMU guest")] | None = None
    protocol: Literal["vmw", "vmw-batched", "virtio"] = "virtio"
    ram: Literal["4k", "thp", "hugetlb"] = "4k"  # local: what backs the RAM on the host
    workload: Literal["idle", "steady", "bursty", "ramp", "diurnal"] = "idle"
    seed: int = 0
    period_s: GuestPeriod = 1.0
    swap: Size = 0
    min: Limit | None = None  # a size or a share of the guest's RAM ("25%")
    max: Limit | None = None
    shares: int | None = Field(default=None, gt=0)  # None: [defaults].shares (1000)
    cpus: int = Field(default=1, ge=1, le=64)
    # qemu, a VM memballoon launches (as `memballoon vm start` takes them)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    # qemu, a running VM to attach to: its QMP socket and, optionally, its agent socket
    qmp: Path | None = None
    agent: Path | None = None

    @property
    def ram_bytes(self) -> int | None:
        """RAM from the config (None: learnt from QEMU or libvirt)."""
        mib = self.mib if self.mib is not None else self.max_mib
        return None if mib is None else mib * MIB

    @model_validator(mode="after")
    def _limits(self) -> GuestConfig:
        ram = self.ram_bytes
        for key in ("min", "max"):
            v = getattr(self, key)
            if ram is not None and isinstance(v, int) and v > ram:
                raise ConfigError(f"{key} = {v} bytes is above the guest's RAM ({ram} bytes)")
        _check_order(self.min, self.max)
        if self.start_mib is not None and self.max_mib is not None \
                and self.start_mib > self.max_mib:
            raise ConfigError(f"start_mib = {self.start_mib} is above max_mib = {self.max_mib}")
        if self.agent is not None and self.qmp is None:
            raise ConfigError("agent needs qmp (the VM to attach to)")
        if self.qmp is not None:
            launch_only = [k for k in ("start_mib", "accel", "deflate_on_oom",
                                       "free_page_reporting", "cpus", "mib")
                           if k in self.model_fields_set]
            if launch_only:
                raise ConfigError(
                    f"{', '.join(launch_only)}: only for a VM memballoon launches; this one "
                    "is attached by its qmp socket (set them on its QEMU command line)")
        return self

    def settings(self, ram_pages: int | None = None,
                 defaults: DefaultsConfig | None = None) -> GuestSettings:
        """The guest's limits in pages (``resolve_settings``); RAM from the config when
        ``ram_pages`` is not given."""
        if ram_pages is None:
            ram = self.ram_bytes
            ram_pages = 0 if ram is None else ram // PAGE_SIZE
        return resolve_settings(self, defaults, ram_pages)


def resolve_settings(guest: GuestConfig | None, defaults: DefaultsConfig | None,
                     ram_pages: int) -> GuestSettings:
    """A guest's ``GuestSettings``: its entry's limits, else ``[defaults]``', shares alike;
    shares of RAM ("25%") taken of ``ram_pages``; a size above the RAM clamps to it (a
    libvirt domain smaller than its defaults' min keeps all its RAM)."""
    d = defaults if defaults is not None else DefaultsConfig()
    lo = guest.min if guest is not None and guest.min is not None else d.min
    hi = guest.max if guest is not None and guest.max is not None else d.max
    shares = guest.shares if guest is not None and guest.shares is not None else d.shares
    cap = ram_pages if ram_pages > 0 else None
    min_pages = 0 if lo is None else limit_pages(lo, ram_pages)
    max_pages = None if hi is None else limit_pages(hi, ram_pages)
    if cap is not None:
        min_pages = min(min_pages, cap)
        max_pages = None if max_pages is None else min(max_pages, cap)
    if max_pages is not None and max_pages < min_pages:
        max_pages = min_pages  # a size min above a share max: the min holds
    return GuestSettings(min_pages=min_pages, max_pages=max_pages, shares=shares)


DEFAULT_LIBVIRT_URI: Final = "qemu:///system"


class HostConfig(_Strict):
    world: Literal["local", "qemu", "libvirt"] = "local"
    # libvirt: the connection, which domains (names or glob patterns; all with a virtio
    # balloon when left out), the balloon stats period memballoon turns on where it is off
    uri: str = Field(default=DEFAULT_LIBVIRT_URI, min_length=1, max_length=1024)
    domains: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = None
    stats_period_s: int = Field(default=2, ge=1, le=3600)
    defaults: DefaultsConfig = DefaultsConfig()
    budget: Budget
    host_reserve: Reserve = DEFAULT_HOST_RESERVE
    host_cgroup: str | None = None  # the cgroup standing for the guests' share (machine.slice)
    period_s: HostPeriod = 1.0
    policy: PolicyConfig = PolicyConfig()
    hysteresis: HysteresisConfig = HysteresisConfig()
    journal: Path | None = None
    journal_max: Size = 8 * MIB
    # what a restarted daemon goes on from (manual targets, each guest's last change, the
    # policy's state); default: beside the control socket
    state: Path | None = None
    socket: Path | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    run_dir: Path | None = None  # qemu: where QMP/agent sockets live
    setup_hugepages: bool = False  # local: set shmem THP / the hugetlb pool up for huge-page
                                   # RAM for the run and put it back at exit
    # local, as root: guests run as uids guest_uid_base, +1, ... (None: a block of 1024 picked
    # by the daemon's pid above 1900000000)
    guest_uid_base: int | None = Field(default=None, ge=1000, le=2**31 - 2)
    guests: list[GuestConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> HostConfig:
        if self.budget != "auto" and self.budget <= 0:
            raise ConfigError("budget must be positive (or \"auto\")")
        names = [g.name for g in self.guests]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"guest names must be unique: {', '.join(dup)} repeated")
        for g in self.guests:
            if self.world == "local" and g.mib is None:
                raise ConfigError(f"guest {g.name}: the local world needs mib")
            if self.world == "qemu" and g.max_mib is None and g.qmp is None:
                raise ConfigError(f"guest {g.name}: the qemu world needs max_mib (a VM to "
                                  "launch) or qmp (a running VM to attach to)")
            if self.world != "qemu" and g.qmp is not None:
                raise ConfigError(f"guest {g.name}: qmp is for world = \"qemu\"")
            if self.world == "libvirt":
                extra = sorted(g.model_fields_set - {"name", "min", "max", "shares"})
                if extra:
                    raise ConfigError(f"guest {g.name}: {', '.join(extra)}: a libvirt domain "
                                      "takes only min, max and shares here (its RAM and "
                                      "devices are libvirt's)")
        if self.world != "local" and "guest_uid_base" in self.model_fields_set:
            raise ConfigError("guest_uid_base: only for world = \"local\"")
        if self.world != "libvirt":
            extra = sorted({"uri", "domains", "stats_period_s"} & self.model_fields_set)
            if extra:
                raise ConfigError(f"{', '.join(extra)}: only for world = \"libvirt\"")
        return self

    def guest(self, name: str) -> GuestConfig | None:
        """The ``[[guests]]`` entry named ``name``, if any."""
        return next((g for g in self.guests if g.name == name), None)

    @property
    def state_path(self) -> Path:
        return self.state if self.state is not None else self.socket_path.parent / "state.json"

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else default_socket_path()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in ("int", "str", "float"):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in exc.errors():
        key = _loc(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) \
            else f" (got {value!r})"
        lines.append(f"{key}: {msg}{shown}")
    return ConfigError(f"{source}: " + "; ".join(lines))


def load_config_text(text: str, source: str = "<config>") -> HostConfig:
    try:
        doc = tomllib.loads(text)
        return HostConfig.model_validate(doc)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise _explain(exc, source) from None
    except RecursionError:  # tomllib and pydantic both recurse per level of nesting
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None


def load_config(path: Path | str) -> HostConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    cfg = load_config_text(text, str(p))
    base = p.parent
    # relative paths in the file are relative to the file, not to where the daemon started
    upd: dict[str, Any] = {}
    for key in ("journal", "socket", "run_dir", "state"):
        v = getattr(cfg, key)
        if v is not None and not v.is_absolute():
            upd[key] = base / v
    guests = [g.model_copy(update={k: base / getattr(g, k) for k in ("qmp", "agent")
                                   if getattr(g, k) is not None
                                   and not getattr(g, k).is_absolute()})
              for g in cfg.guests]
    if guests != cfg.guests:
        upd["guests"] = guests
    return cfg.model_copy(update=upd) if upd else cfg


__all__ = ["DEFAULT_HOST_RESERVE", "DEFAULT_LIBVIRT_URI", "DefaultsConfig", "GuestConfig",
           "HostConfig", "default_socket_path", "limit_pages", "load_config",
           "load_config_text", "parse_size", "reserve_bytes", "resolve_settings",
           "size_with_unit"]
