"""host.toml: valid examples load; every bad key, value and unit is a ConfigError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from memballoon.app.config import load_config, load_config_text, parse_size, reserve_bytes
from memballoon.model.errors import ConfigError
from memballoon.model.units import GIB, MIB

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GUEST = '[[guests]]\nname = "a"\nmib = 256\n'


def test_examples_load() -> None:
    h = load_config(EXAMPLES / "host.toml")
    assert h.world == "local" and h.budget == 640 * MIB and len(h.guests) == 3
    assert h.guests[0].settings().min_pages == 128 * MIB // 4096
    assert h.journal is not None and h.journal.is_absolute()  # relative to the file
    q = load_config(EXAMPLES / "qemu.toml")
    assert q.world == "qemu" and q.guests[0].start_mib == 768


@pytest.mark.parametrize(("text", "want"), [
    ("3GiB", 3 * GIB), ("512MiB", 512 * MIB), ("512 MiB", 512 * MIB), ("1.5GiB", 3 * GIB // 2),
    ("64MB", 64_000_000), ("4096", 4096), ("4096B", 4096), (4096, 4096), ("2k", 2048),
])
def test_sizes(text: str | int, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(("toml", "needles"), [
    ('budget = "3XB"', ["budget", "'3XB'", "unit 'XB'", "MiB"]),
    ('budget = "lots"', ["budget", "'lots'", "unit"]),
    ("budget = -5", ["budget", "negative"]),
    ("budget = true", ["budget", "True"]),
    ('budget = "0.5B"', ["budget", "whole number"]),
    ('budget = "1GiB"\nbugdet = 1', ["bugdet", "unknown key"]),
    ("", ["budget", "required"]),
    ('budget = "1GiB"\nworld = "mars"', ["world", "'mars'", "local"]),
    ('budget = "1GiB"\nperiod_s = 0', ["period_s", "greater than 0"]),
    ('budget = "1GiB"\nmetrics_port = 70000', ["metrics_port", "70000"]),
    ('budget = "1GiB"\n[policy]\nnme = "x"', ["policy.nme", "unknown key"]),
    ('budget = "1GiB"\n[hysteresis]\nmin_change = "1 parsec"', ["hysteresis.min_change",
                                                                "parsec"]),
    ('budget = "1GiB"\n' + GUEST + 'mibs = 3', ["guests[0].mibs", "unknown key"]),
    ('budget = "1GiB"\n' + GUEST + 'min = "1TiB"', ["guests[0]", "min", "above"]),
    ('budget = "1GiB"\n' + GUEST + 'max = "12QB"', ["guests[0].max", "'12QB'", "unit"]),
    ('budget = "1GiB"\n' + GUEST + 'min = "200MiB"\nmax = "100MiB"', ["max", "below min"]),
    ('budget = "1GiB"\n' + GUEST + 'protocol = "tcp"', ["guests[0].protocol", "'tcp'"]),
    ('budget = "1GiB"\n' + GUEST + 'workload = "crypto"', ["guests[0].workload", "crypto"]),
    ('budget = "1GiB"\n' + GUEST + 'shares = 0', ["guests[0].shares", "greater than 0"]),
    ('budget = "1GiB"\n' + GUEST + GUEST, ["unique", "a"]),
    ('budget = "1GiB"\n[[guests]]\nname = "b"', ["guest b", "needs mib"]),
    ('budget = "1GiB"\n[[guests]]\nname = "bad name!"\nmib = 64', ["guests[0].name"]),
    ('world = "qemu"\nbudget = "1GiB"\n' + GUEST, ["qemu world needs max_mib"]),
    ('budget = "1GiB"\n[[guests]]\nname = "q"\nmax_mib = 128\nstart_mib = 256',
     ["start_mib", "above max_mib"]),
    ("budget = [", ["not valid TOML"]),
    ('budget = "automatic"', ["budget", "'automatic'"]),
    ('budget = "auto"\nhost_reserve = "120%"', ["host_reserve", "under 100%"]),
    ('budget = "auto"\nhost_reserve = "lots"', ["host_reserve", "'lots'", "unit"]),
])
def test_bad_config_names_key_value_unit(toml: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_text(toml, "host.toml")
    msg = str(ei.value)
    assert msg.startswith("host.toml: ")
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_auto_budget_and_host_reserve() -> None:
    h = load_config_text('budget = "auto"\nhost_reserve = "7.5%"\nhost_cgroup = "machine.slice"')
    assert h.budget == "auto" and h.host_reserve == "7.5%" and h.host_cgroup == "machine.slice"
    assert reserve_bytes(h.host_reserve, 1000 * 4096) == 75 * 4096
    h = load_config_text('budget = "AUTO"\nhost_reserve = "512MiB"')
    assert h.budget == "auto" and reserve_bytes(h.host_reserve, GIB) == 512 * MIB
    assert load_config_text('budget = "1GiB"').host_reserve == "5%"  # the default


def test_guest_ram_kind_and_setup_hugepages() -> None:
    h = load_config_text('budget = "1GiB"\nsetup_hugepages = true\n' + GUEST + 'ram = "thp"',
                         "host.toml")
    assert h.setup_hugepages and h.guests[0].ram == "thp"
    plain = load_config_text('budget = "1GiB"\n' + GUEST, "host.toml")
    assert plain.guests[0].ram == "4k" and not plain.setup_hugepages
    with pytest.raises(ConfigError, match=r"guests\[0\]\.ram.*'1g'"):
        load_config_text('budget = "1GiB"\n' + GUEST + 'ram = "1g"', "host.toml")
