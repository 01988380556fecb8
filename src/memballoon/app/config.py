"""``memballoon run --config host.toml``: the daemon's config (tomllib + pydantic v2).

Sizes are a whole number of bytes or a string with a binary or decimal unit: ``"3GiB"``,
``"512 MiB"``, ``"1.5GiB"``, ``"64MB"``, ``"4096B"``. Every error is one ``ConfigError`` whose
message names the key (``guests[1].min``), the value and, for sizes, the unit expected.
See examples/host.toml (local world) and examples/qemu.toml.
"""

from __future__ import annotations

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
    mult = UNITS.get(unit.lower())
    if mult is None:
        raise ConfigError(f"{value!r}: unknown unit {unit!r} (use {UNIT_HELP})")
    n = float(num) * mult if "." in num else int(num) * mult
    if n != int(n):
        raise ConfigError(f"{value!r} is not a whole number of bytes")
    return int(n)


def _size(v: object) -> int:
    return parse_size(v)


Size = Annotated[int, BeforeValidator(_size)]

#: The default ``host_reserve``: this share of the host's memory stays available to the host.
DEFAULT_HOST_RESERVE: Final = "5%"
_PERCENT_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*")


def _budget(v: object) -> int | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return parse_size(v)


def _reserve(v: object) -> int | str:
    if isinstance(v, str):
        m = _PERCENT_RE.fullmatch(v)
        if m is not None:
            pct = float(m.group(1))
            if not 0.0 <= pct < 100.0:
                raise ConfigError(f"{v!r}: a share of the host's memory must be under 100%")
            return f"{pct:g}%"
    return parse_size(v)


def reserve_bytes(reserve: int | str, total_bytes: int) -> int:
    """``host_reserve`` in bytes for a host of ``total_bytes`` (a size, or a share "5%")."""
    if isinstance(reserve, int):
        return reserve
    return int(float(reserve.rstrip("%")) / 100.0 * total_bytes) // PAGE_SIZE * PAGE_SIZE


#: ``budget``: a size, or ``"auto"``: the host's available memory beyond ``host_reserve``.
Budget = Annotated[int | Literal["auto"], BeforeValidator(_budget)]
#: ``host_reserve``: a size, or a share of the host's memory (``"5%"``).
Reserve = Annotated[int | str, BeforeValidator(_reserve)]


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
    hold_s: float = Field(default=10.0, ge=0.0)
    report_max_age_s: float = Field(default=10.0, gt=0.0)


class GuestConfig(_Strict):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mib: int | None = Field(default=None, ge=16)  # local
    max_mib: int | None = Field(default=None, ge=64)  # qemu: RAM
    start_mib: int | None = Field(default=None, ge=64)  # qemu: logical size at boot
    protocol: Literal["vmw", "vmw-batched", "virtio"] = "virtio"
    workload: Literal["idle", "steady", "bursty", "ramp", "diurnal"] = "idle"
    seed: int = 0
    period_s: float = Field(default=1.0, gt=0.0)
    swap: Size = 0
    min: Size | None = None
    max: Size | None = None
    shares: int = Field(default=1000, gt=0)
    cpus: int = Field(default=1, ge=1, le=64)

    @property
    def ram_bytes(self) -> int:
        mib = self.mib if self.mib is not None else self.max_mib
        assert mib is not None
        return mib * MIB

    @model_validator(mode="after")
    def _limits(self) -> GuestConfig:
        if self.mib is None and self.max_mib is None:
            raise ConfigError("give mib (local) or max_mib (qemu)")
        ram = self.ram_bytes
        if self.min is not None and self.min > ram:
            raise ConfigError(f"min = {self.min} bytes is above the guest's RAM ({ram} bytes)")
        if self.max is not None and self.max > ram:
            raise ConfigError(f"max = {self.max} bytes is above the guest's RAM ({ram} bytes)")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ConfigError(f"max = {self.max} bytes is below min = {self.min} bytes")
        if self.start_mib is not None and self.max_mib is not None \
                and self.start_mib > self.max_mib:
            raise ConfigError(f"start_mib = {self.start_mib} is above max_mib = {self.max_mib}")
        return self

    def settings(self) -> GuestSettings:
        return GuestSettings(
            min_pages=(self.min or 0) // PAGE_SIZE,
            max_pages=None if self.max is None else self.max // PAGE_SIZE,
            shares=self.shares,
        )


class HostConfig(_Strict):
    world: Literal["local", "qemu"] = "local"
    budget: Budget
    host_reserve: Reserve = DEFAULT_HOST_RESERVE
    host_cgroup: str | None = None  # the cgroup standing for the guests' share (machine.slice)
    period_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    policy: PolicyConfig = PolicyConfig()
    hysteresis: HysteresisConfig = HysteresisConfig()
    journal: Path | None = None
    journal_max: Size = 8 * MIB
    socket: Path | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    run_dir: Path | None = None  # qemu: where QMP/agent sockets live
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
            if self.world == "qemu" and g.max_mib is None:
                raise ConfigError(f"guest {g.name}: the qemu world needs max_mib")
        return self

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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return HostConfig.model_validate(doc)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def load_config(path: Path | str) -> HostConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    cfg = load_config_text(text, str(p))
    base = p.parent
    # relative paths in the file are relative to the file, not to where the daemon started
    upd: dict[str, Path] = {}
    for key in ("journal", "socket", "run_dir"):
        v = getattr(cfg, key)
        if v is not None and not v.is_absolute():
            upd[key] = base / v
    return cfg.model_copy(update=upd) if upd else cfg


__all__ = ["DEFAULT_HOST_RESERVE", "GuestConfig", "HostConfig", "default_socket_path",
           "load_config", "load_config_text", "parse_size", "reserve_bytes"]
