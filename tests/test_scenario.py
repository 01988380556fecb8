"""Scenario files: every built-in one loads; a wrong key, value or unit is one ConfigError naming
it; traces are read strictly; bench policy's scenario is rebuilt from its own definition."""

from __future__ import annotations

from pathlib import Path

import pytest

from memballoon.app.scenario import (
    BUILTIN,
    WORKLOAD_PARAMS,
    bench_policy_scenario,
    duration,
    load_scenario,
    read_trace,
    scenario_from_toml,
)
from memballoon.bench import policy as bench
from memballoon.guest.workload import Bursts, Diurnal, Steady, Trace
from memballoon.model.errors import ConfigError
from memballoon.model.units import GIB, MIB, PAGE_SIZE

BASE = """
duration = "10min"
[[guests]]
name = "g"
ram = "1GiB"
workload = "idle"
"""


def load(text: str, tmp: Path | None = None) -> object:
    return scenario_from_toml(text, name="t", base=tmp)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_scenario_loads(name: str) -> None:
    sc = load_scenario(name)
    assert sc.guests and sc.seconds > 0 and sc.name == name


def test_a_small_scenario_resolves_sizes_shares_and_durations() -> None:
    sc = scenario_from_toml("""
duration = "1.5h"
seed = 4
period = "2s"
report_every = 4
driver_period = "1s"
[host]
memory = "75%"
reserve = "10%"
budget = "auto"
[[host.usage]]
at = "10min"
for = "90s"
size = "25%"
[policy]
name = "mom"
[[guests]]
name = "web"
count = 3
ram = ["1GiB", "2GiB"]
ram_step = "512MiB"
protocol = "vmw"
min = "25%"
max = "900MiB"
shares = 2000
workload = { kind = "steady", anon = "300MiB", file = "10%", hot = 0.25 }
""", name="x")
    assert sc.seconds == 5400 and sc.seed == 4 and sc.period_s == 2 and sc.report_every_s == 4
    assert sc.driver_period_s == 1.0 and sc.policy == "mom"
    assert [g.name for g in sc.guests] == ["web-0", "web-1", "web-2"]
    assert all(g.ram_pages * PAGE_SIZE in (GIB, GIB + 512 * MIB, 2 * GIB) for g in sc.guests)
    ram = sum(g.ram_pages for g in sc.guests) * PAGE_SIZE
    assert sc.host_bytes == int(0.75 * ram)
    assert sc.budget_pages is None and sc.reserve_pages == int(0.1 * sc.host_bytes) // PAGE_SIZE
    assert sc.host_use(600) == sc.host_use(689) == int(0.25 * sc.host_bytes)
    assert sc.host_use(690) == 0 and sc.host_use(599) == 0
    g = sc.guests[0]
    assert g.protocol == "vmw" and g.settings.shares == 2000
    assert g.settings.min_pages == g.ram_pages // 4 and g.settings.max_pages == 900 * MIB // 4096
    w = g.workload
    assert isinstance(w, Steady) and w.anon_mib == 300 and w.hot == 0.25
    assert w.file_mib == pytest.approx(g.ram_pages * PAGE_SIZE / MIB / 10)


def test_seeds_give_each_guest_its_own_but_repeatable_workload() -> None:
    text = BASE.replace('workload = "idle"', 'count = 2\nworkload = "bursts"')
    a, b = load(text), load(text)
    wa = [g.workload for g in a.guests]  # type: ignore[attr-defined]
    wb = [g.workload for g in b.guests]  # type: ignore[attr-defined]
    assert isinstance(wa[0], Bursts) and wa[0].seed != wa[1].seed
    assert [w.demand(t) for w in wa for t in range(0, 3600, 60)] == \
        [w.demand(t) for w in wb for t in range(0, 3600, 60)]


@pytest.mark.parametrize("text, where", [
    ("duration = 'soon'", "duration: 'soon' is not a duration"),
    ("duration = -5", "duration: -5 must be a finite duration"),
    ("duration = '10min'\nperiod = '0.001s'", "period: 0.001 s must be within"),
    ("colour = 'red'\n" + BASE, "colour: unknown key"),
    ("duration = '10min'\ncheck = 'sometimes'", "check: 'sometimes' is not one of"),
    ("duration = '10min'", "guests: missing"),
    ("duration = '10min'\nguests = []", "guests: give at least one"),
])
def test_bad_top_level_values_name_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load(text)


@pytest.mark.parametrize("replace, where", [
    ('ram = "1GiB"', 'ram = "1 Gib"', ),
    ('ram = "1GiB"', 'ram = "1GB"'),
])
def test_sizes_in_decimal_or_binary_units_load(replace: str, where: str) -> None:
    load(BASE.replace(replace, where))


@pytest.mark.parametrize("old, new, where", [
    ('ram = "1GiB"', 'ram = "1 lightyear"', r"guests\[0\]\.ram: .*unknown unit 'lightyear'"),
    ('ram = "1GiB"', 'ram = "1MiB"', r"guests\[0\]\.ram: 1048576 bytes is under the 16 MiB"),
    ('ram = "1GiB"', 'ram = ["2GiB", "1GiB"]',
     r"guests\[0\]\.ram: \['2GiB', '1GiB'\]: need 0 bytes < smallest <= largest"),
    ('ram = "1GiB"', 'ram = ["1GiB", "2GiB"]\nram_step = "0"',
     r"guests\[0\]\.ram_step: '0': need a step of more than 0 bytes"),
    ('name = "g"', 'name = "-g"', r"guests\[0\]\.name: '-g'"),
    ('workload = "idle"', 'workload = "sleepy"', r"guests\[0\]\.workload\.kind: 'sleepy' is "
                                                 "not one of"),
    ('workload = "idle"', 'workload = { kind = "steady", anon = "45 percent" }',
     r"guests\[0\]\.workload\.anon: '45 percent': unknown unit 'percent' .*, or a share of "
     "the guest's RAM like '25%'"),
    ('workload = "idle"', 'workload = { kind = "steady", hot = 1.5 }',
     r"guests\[0\]\.workload\.hot: 1\.5 must be within \[0, 1\] \(a fraction"),
    ('workload = "idle"', 'workload = { kind = "bursts", every = "often" }',
     r"guests\[0\]\.workload\.every: 'often' is not a duration"),
    ('workload = "idle"', 'workload = { kind = "steady", colour = 1 }',
     r"guests\[0\]\.workload\.colour: unknown key"),
    ('workload = "idle"', 'workload = { kind = "bursts", every = 0 }',
     r"guests\[0\]\.workload\.every: 0 is 0 seconds; a bursts workload needs a duration > 0 "
     "seconds"),
    ('workload = "idle"', 'workload = { kind = "trace" }',
     r"guests\[0\]\.workload\.csv: missing"),
    ('workload = "idle"', 'workload = "idle"\nmin = "2GiB"',
     r"guests\[0\]\.min = '2GiB', guests\[0\]\.max = None: need min <= max <= RAM \(1024 "
     r"MiB\): min is 2048 MiB"),
    ('workload = "idle"', 'workload = "idle"\nprotocol = "xen"',
     r"guests\[0\]\.protocol: 'xen' is not one of vmw, vmw-batched, virtio"),
    ('workload = "idle"', 'workload = "idle"\ncount = 0', r"guests\[0\]\.count: 0 must be"),
])
def test_bad_guests_name_the_key_value_and_unit(old: str, new: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load(BASE.replace(old, new))


@pytest.mark.parametrize("extra, where", [
    ('[host]\nmemory = "lots"', r"host\.memory: .*not a size.*share of the guests' summed RAM"),
    ('[host]\nbudget = "auto"', r"host\.budget: 'auto' reads the host's memory"),
    ('[host]\nmemory = "1GiB"\nbudget = "0"', r"host\.budget: '0' leaves the guests nothing"),
    ('[host]\nmemory = "1GiB"\n[[host.usage]]\nat = 5\nsize = "1GiB"',
     r"host\.usage\[0\]\.for: missing"),
    ('[policy]\nname = "greedy"', r"policy\.name: 'greedy' is not one of"),
    ('[policy]\nname = "esx"\nparams = { rate = 1 }', r"policy\.params\.rate: policy 'esx' has "
                                                       "no such parameter"),
    ('[policy]\nname = "esx"\nvariants = [{ tau = 0.5 }, { tax = 1 }]',
     r"policy\.variants\[1\]\.tax"),
    ('[sweep]\nfrom = 0.4\nto = 1.0\nstep = 0.1', r"sweep: from must be at least to"),
    ('[sweep]\nshares = [1.0, "half"]', r"sweep\.shares\[1\]: 'half' is not a number"),
])
def test_bad_host_policy_and_sweep_values_name_the_key(extra: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load(BASE + extra)


def test_a_sweep_runs_from_the_largest_host_down() -> None:
    sc = load(BASE + "[sweep]\nfrom = 1.0\nto = 0.4\nstep = 0.2")
    assert sc.sweep_shares == (1.0, 0.8, 0.6, 0.4)  # type: ignore[attr-defined]


def test_traces_are_read_strictly(tmp_path: Path) -> None:
    good = tmp_path / "t.csv"
    good.write_text("seconds,anon_mib,cache_mib\n0,100,10\n60,300,20\n\n120,50,0\n")
    assert read_trace(good, "k") == ((0.0, 100.0, 10.0), (60.0, 300.0, 20.0),
                                     (120.0, 50.0, 0.0))
    sc = load(BASE.replace('workload = "idle"', 'workload = { kind = "trace", csv = "t.csv" }'),
              tmp_path)
    w = sc.guests[0].workload  # type: ignore[attr-defined]
    assert isinstance(w, Trace) and w.demand(61).anon_pages == 300 * MIB // PAGE_SIZE
    two = tmp_path / "two.csv"
    two.write_text("seconds,anon_mib\n0,1\n")
    assert read_trace(two, "k") == ((0.0, 1.0, 0.0),)
    for body, where in [
        ("", "is empty"),
        ("time,anon\n0,1\n", "header 'time,anon'"),
        ("seconds,anon_mib\n", "has a header but no rows"),
        ("seconds,anon_mib\n0,lots\n", r"t\.csv:2: anon_mib 'lots' is not a number of MiB"),
        ("seconds,anon_mib\n0,-1\n", r"t\.csv:2: anon_mib '-1' must be a finite number"),
        ("seconds,anon_mib\n5,1\n5,2\n", r"t\.csv:3: seconds 5 does not come after"),
        ("seconds,anon_mib\n0,1,2\n", r"t\.csv:2: 3 columns, the header has 2"),
    ]:
        good.write_text(body)
        with pytest.raises(ConfigError, match=where):
            read_trace(good, "k")
    with pytest.raises(ConfigError, match="cannot read trace"):
        read_trace(tmp_path / "missing.csv", "k")


def test_unknown_files_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no built-in scenario of that name"):
        load_scenario(str(tmp_path / "none.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("duration = [")
    with pytest.raises(ConfigError, match="bad: not valid TOML"):
        load_scenario(str(bad))
    with pytest.raises(ConfigError, match="x: 'soon' is not a duration"):
        duration("soon", "x")
    assert duration("1.5h", "x") == 5400 and duration("90s", "x") == 90 and duration(3, "x") == 3


def test_every_workload_kind_has_defaults_that_build() -> None:
    for kind in WORKLOAD_PARAMS:
        if kind == "trace":
            continue
        sc = load(BASE.replace('workload = "idle"', f'workload = "{kind}"'))
        assert sc.guests[0].workload.name  # type: ignore[attr-defined]
    sc = load(BASE.replace('workload = "idle"', 'workload = { kind = "diurnal", step = "4MiB" }'))
    assert isinstance(sc.guests[0].workload, Diurnal)  # type: ignore[attr-defined]


def test_bench_policy_scenario_is_bench_policys_own() -> None:
    sc = bench_policy_scenario()
    specs, budget = bench.scenario(1, bench.SECONDS)
    assert [g.name for g in sc.guests] == [s.name for s in specs]
    assert sc.host_bytes is None and sc.budget_pages == budget // PAGE_SIZE
    assert all(g.protocol == "virtio" for g in sc.guests)
    assert all(g.settings.min_pages == g.ram_pages // 8 for g in sc.guests)
    peaks = sum(bench.peak_bytes(s.workload, s.mib, s.seed, bench.SECONDS) for s in specs)
    assert peaks == pytest.approx(1.5 * budget, rel=0.01)


def test_a_reserve_share_follows_each_host_of_a_sweep() -> None:
    sc = load(BASE + '[host]\nreserve = "5%"\n[sweep]\nshares = [1.0, 0.5]')
    half = sc.with_host_share(0.5)  # type: ignore[attr-defined]
    assert half.reserve_pages == int(0.05 * half.host_bytes) // PAGE_SIZE
    assert half.budget_pages == half.host_bytes // PAGE_SIZE - half.reserve_pages
    with pytest.raises(ConfigError, match=r"host\.reserve: '100%': a share of the host's"):
        load(BASE + '[host]\nmemory = "1GiB"\nreserve = "100%"')
