"""host.toml: valid examples load; every bad key, value and unit is a ConfigError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    ('budget = "1GiB"\nperiod_s = 0', ["period_s", "0.0 s", "0.1 to 3600 s"]),
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
    ('budget = "512"', ["budget", "no unit", "'512MiB'"]),
    ("budget = 1073741824", ["budget", "no unit", "'1073741824B'"]),
    ('budget = "1GiB"\n' + GUEST + 'min = 64', ["guests[0].min", "no unit", "'64MiB'"]),
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


def test_libvirt_world_defaults_and_shares_of_ram() -> None:
    from memballoon.app.config import DEFAULT_LIBVIRT_URI, resolve_settings

    h = load_config(EXAMPLES / "libvirt.toml")
    assert h.world == "libvirt" and h.budget == "auto" and h.uri == DEFAULT_LIBVIRT_URI
    h = load_config_text('world = "libvirt"\nbudget = "auto"\nuri = "qemu+ssh://h/system"\n'
                         'domains = ["web-*", "db1"]\nstats_period_s = 5\n'
                         '[defaults]\nmin = "25%"\nmax = "90%"\nshares = 500\n'
                         '[[guests]]\nname = "db1"\nmin = "2GiB"\nshares = 3000\n')
    assert h.domains == ["web-*", "db1"] and h.stats_period_s == 5
    ram = 8 * GIB // 4096
    db = resolve_settings(h.guest("db1"), h.defaults, ram)
    assert (db.min_pages, db.max_pages, db.shares) == (2 * GIB // 4096, ram * 9 // 10, 3000)
    web = resolve_settings(h.guest("web-3"), h.defaults, ram)
    assert (web.min_pages, web.max_pages, web.shares) == (ram // 4, ram * 9 // 10, 500)
    # a domain smaller than its min keeps all its RAM; a size min above a share max holds
    tiny = resolve_settings(h.guest("db1"), h.defaults, 256 * MIB // 4096)
    assert tiny.min_pages == tiny.max_pages == 256 * MIB // 4096
    assert resolve_settings(None, None, ram).min_pages == 0  # nothing set: no floor
    g = load_config_text('budget = "1GiB"\n' + GUEST + 'min = "10%"').guests[0]
    assert g.settings().min_pages == 256 * MIB // 4096 // 10


def test_qemu_attach_and_launch_options(tmp_path: Path) -> None:
    q = load_config(EXAMPLES / "qemu-attach.toml")
    assert q.world == "qemu" and all(g.qmp is not None and g.qmp.is_absolute() for g in q.guests)
    (tmp_path / "h.toml").write_text(
        'world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"\nqmp = "vm/qmp.sock"\n'
        'agent = "vm/agent.sock"\n[[guests]]\nname = "l"\nmax_mib = 512\naccel = "tcg"\n'
        'deflate_on_oom = true\nfree_page_reporting = true\n')
    h = load_config(tmp_path / "h.toml")
    a, lau = h.guests
    assert a.qmp == tmp_path / "vm/qmp.sock" and a.agent == tmp_path / "vm/agent.sock"
    assert a.ram_bytes is None  # learnt from QEMU
    assert (lau.accel, lau.deflate_on_oom, lau.free_page_reporting) == ("tcg", True, True)


@pytest.mark.parametrize(("toml", "needles"), [
    ('world = "libvirt"\nbudget = "auto"\n' + GUEST, ["guest a", "mib", "only min, max"]),
    ('world = "libvirt"\nbudget = "auto"\n[[guests]]\nname = "a"\nmin = "120%"',
     ["guests[0].min", "0% to 100%"]),
    ('world = "libvirt"\nbudget = "auto"\n[defaults]\nmin = "50%"\nmax = "10%"',
     ["defaults", "below min"]),
    ('world = "libvirt"\nbudget = "auto"\nstats_period_s = 0', ["stats_period_s"]),
    ('budget = "auto"\nuri = "qemu:///system"', ["uri", "only for world"]),
    ('budget = "auto"\ndomains = ["x"]', ["domains", "only for world"]),
    ('world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"', ["max_mib", "qmp"]),
    ('world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"\nqmp = "/q"\nstart_mib = 256',
     ["start_mib", "only for a VM memballoon launches"]),
    ('world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"\nqmp = "/q"\naccel = "kvm"',
     ["accel", "QEMU command line"]),
    ('world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"\nmax_mib = 256\nagent = "/a"',
     ["agent needs qmp"]),
    ('world = "qemu"\nbudget = "auto"\n[[guests]]\nname = "a"\nmax_mib = 256\naccel = "xen"',
     ["guests[0].accel", "'xen'"]),
    ('world = "libvirt"\nbudget = "auto"\n[[guests]]\nname = "a"\nqmp = "/q"',
     ["qmp is for world"]),
    ('budget = "auto"\n[[guests]]\nname = "a"\nmib = 64\nqmp = "/q"', ["mib", "launches"]),
])
def test_bad_world_keys_name_what_to_do(toml: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_text(toml, "host.toml")
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


# found by `memballoon bench fuzz` (target config): each escaped as an untyped error
@pytest.mark.parametrize("size", ["9" * 400 + ".5GiB", "9" * 5000 + "GiB", "1" * 40])
def test_a_size_of_absurdly_many_digits_is_a_config_error(size: str) -> None:
    with pytest.raises(ConfigError, match="digits"):
        parse_size(size)  # was OverflowError (inf to int) or int()'s bare ValueError
    with pytest.raises(ConfigError, match="budget"):
        load_config_text(f'budget = "{size}"')


@pytest.mark.parametrize("toml", ["a = " + "[" * 5000 + "]" * 5000,
                                  'budget = "1GiB"\n[policy]\nparams = {x = ' + "[" * 900
                                  + "]" * 900 + "}"])
def test_a_config_nested_past_the_recursion_limit_is_a_config_error(toml: str) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config_text(toml, "host.toml")  # was RecursionError


def test_a_config_file_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "host.toml"
    p.write_bytes(b'budget = "1GiB"\n# \xff\xfe\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)  # was UnicodeDecodeError


# fuzz property (the long form: `memballoon bench fuzz --target config`)
_value = st.one_of(st.integers(-(2**70), 2**70).map(str), st.floats().map(repr),
                   st.text(max_size=10).map(lambda t: json.dumps(t, ensure_ascii=False)),
                   st.sampled_from(['"1GiB"', '"512 MiB"', '"1.5GiB"', '"25%"', '"auto"',
                                    '"-3MiB"', '"0B"', "true", "[]", "{}", '"9e99GiB"',
                                    '"' + "7" * 30 + 'KiB"', "[[[[1]]]]", '"local"', '"qemu"',
                                    '"libvirt"', '"virtio"', '"idle"']))
_key = st.sampled_from(["world", "budget", "host_reserve", "period_s", "name", "mib",
                        "max_mib", "protocol", "workload", "min", "max", "shares", "swap",
                        "journal", "socket", "uri", "domains", "params", "hold_s", "qmp", "x"])
_line = st.builds("{} = {}".format, _key, _value) | st.sampled_from(
    ["[[guests]]", "[policy]", "[hysteresis]", "[defaults]", "[policy.params]", "name = \"a\"",
     "mib = 256"])


@settings(max_examples=150, deadline=None)
@given(st.lists(_line, max_size=14))
def test_any_config_loads_within_bounds_or_is_one_config_error(lines: list[str]) -> None:
    try:
        cfg = load_config_text("\n".join(lines), "host.toml")
    except ConfigError as exc:
        assert str(exc).startswith("host.toml")
        return
    assert cfg.budget == "auto" or cfg.budget > 0
    for g in cfg.guests:
        s = g.settings(1 << 18)
        assert 0 <= s.min_pages <= (s.max_pages if s.max_pages is not None else 1 << 18)


# ------------------------------------------------------------------ values that cannot work
@pytest.mark.parametrize(("toml", "needles"), [
    # periods: infinite, vanishing (spins a core), negative, NaN; key, value, unit, range
    ("period_s = inf", ["period_s", "inf s", "0.1 to 3600 s"]),
    ("period_s = 1e-300", ["period_s", "1e-300 s", "0.1 to 3600 s"]),
    ("period_s = -1", ["period_s", "-1.0 s", "0.1 to 3600 s"]),
    ("period_s = nan", ["period_s", "nan s", "0.1 to 3600 s"]),
    ('period_s = "1s"', ["period_s", "'1s'", "not a number of seconds"]),
    (GUEST + "period_s = inf", ["guests[0].period_s", "inf s", "0.05 to 60 s"]),
    (GUEST + "period_s = 1e-300", ["guests[0].period_s", "1e-300 s"]),
    ("[hysteresis]\nhold_s = nan", ["hysteresis.hold_s", "nan s", "0 to 86400 s"]),
    ("[hysteresis]\nreport_max_age_s = 0", ["hysteresis.report_max_age_s",
                                            "more than 0 to 86400 s"]),
    # guests too small to run, or absurdly large
    ('[[guests]]\nname = "a"\nmib = 16', ["guests[0].mib", "16 MiB", "too small",
                                         "at least 33 MiB"]),
    ('[[guests]]\nname = "a"\nmib = 32', ["guests[0].mib", "at least 33 MiB"]),
    ('[[guests]]\nname = "a"\nmib = 1073741824', ["guests[0].mib", "1073741824 MiB",
                                                 "4 TiB"]),
    ('world = "qemu"\n[[guests]]\nname = "q"\nmax_mib = 1073741824', ["guests[0].max_mib",
                                                                    "4 TiB"]),
    ('world = "qemu"\nguest_uid_base = 100000', ["guest_uid_base", "local"]),
    ("guest_uid_base = 5", ["guest_uid_base", "1000"]),
])
def test_values_that_cannot_work_are_refused_with_key_value_unit_and_range(
        toml: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_text('budget = "1GiB"\n' + toml, "host.toml")
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_the_smallest_local_guest_is_the_local_worlds() -> None:
    from memballoon.app.config import MIN_LOCAL_GUEST_MIB
    from memballoon.local.host import MIN_GUEST_MIB

    assert MIN_LOCAL_GUEST_MIB == MIN_GUEST_MIB
    h = load_config_text(f'budget = "1GiB"\n[[guests]]\nname = "a"\nmib = {MIN_GUEST_MIB}\n'
                         "period_s = 0.05\n")
    assert h.guests[0].mib == MIN_GUEST_MIB and h.guests[0].period_s == 0.05
