"""ManagerCore: the policy's answer distrusted, floors enforced, hysteresis, manual pins."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from memballoon.manager.core import Action, CoreSnapshot, Hysteresis, ManagerCore
from memballoon.model.units import PAGE_SIZE
from memballoon.policy.base import Decision, clamp_balloon
from memballoon.policy.sample import GuestSample, GuestSettings, HostSample
from memballoon.protocol.pressure import PressureReport

RAM = 65536  # 256 MiB


def report(name: str, stall: float = 0.0, avail: int = 128 << 20) -> PressureReport:
    return PressureReport(name, 1.0, RAM * PAGE_SIZE, avail, avail, 1 << 20, 1 << 20, 0, 0, 0,
                          0, 0, 0, stall, 0, 0)


def state(name: str, *, target: int = 0, balloon: int | None = None, alive: bool = True,
          rep: PressureReport | bool | None = True, t: float = 100.0) -> GuestSample:
    r = report(name) if rep is True else (rep or None)
    return GuestSample(name, RAM, target if balloon is None else balloon, target, report=r,
                       report_time=t if r is not None else None, alive=alive)


class Fixed:
    """A test policy: returns what it is told, records what it saw."""

    name = "fixed"

    def __init__(self, out: dict[str, int] | Exception) -> None:
        self.out = out
        self.seen: list[tuple[HostSample, list[GuestSample]]] = []

    def decide(self, host: HostSample, guests: Sequence[GuestSample],
               now: float) -> list[Decision]:
        self.seen.append((host, list(guests)))
        if isinstance(self.out, Exception):
            raise self.out
        return [Decision(g, p, "told so", {"x": 1.0}) for g, p in self.out.items()]


def core(policy: Fixed, **settings: GuestSettings) -> ManagerCore:
    return ManagerCore(policy, settings, budget_pages=100_000,
                       hysteresis=Hysteresis(hold_s=10.0, report_max_age_s=5.0))


def test_plain_decision_becomes_an_action_with_its_inputs() -> None:
    p = Fixed({"a": 1000})
    c = core(p)
    acts = c.step(101.0, {"a": state("a")}, 123 * PAGE_SIZE)
    assert acts == [Action("a", 0, 1000, "told so", {"x": 1.0}, "policy")]
    host, guests = p.seen[0]
    assert host.resident_pages == 123 and host.budget_pages == 100_000
    assert guests[0].report_age_s(101.0) == 1.0 and guests[0].size_pages == RAM
    rec = acts[0].record()
    assert rec["new_bytes"] == 1000 * PAGE_SIZE and rec["old_pages"] == 0


def test_policy_error_holds_every_target_and_the_loop_goes_on() -> None:
    p = Fixed(RuntimeError("boom"))
    c = core(p)
    assert c.step(101.0, {"a": state("a", target=500)}, 0) == []
    assert c.counters["policy_error"] == 1
    ev = c.drain_events()
    assert ev[0].kind == "policy_error" and "boom" in ev[0].detail
    p.out = {"a": 5000}
    assert [a.new_pages for a in c.step(102.0, {"a": state("a", target=500)}, 0)] == [5000]


def test_floor_and_ceiling_are_enforced_again() -> None:
    s = GuestSettings(min_pages=40000, max_pages=60000)
    c = core(Fixed({"a": RAM}), a=s)  # the policy wants the whole guest
    (a,) = c.step(101.0, {"a": state("a", target=10000)}, 0)
    assert a.new_pages == RAM - 40000 and c.counters["clamped"] == 1
    assert a.inputs["policy_pages"] == RAM


def test_target_outside_limits_is_corrected_without_a_decision() -> None:
    c = core(Fixed({}), a=GuestSettings(max_pages=60000))
    (a,) = c.step(101.0, {"a": state("a", target=0)}, 0)
    assert (a.kind, a.new_pages) == ("correction", RAM - 60000)


def test_dead_guest_is_never_asked() -> None:
    c = core(Fixed({"a": 1000, "b": 0}))
    acts = c.step(101.0, {"a": state("a", alive=False), "b": state("b", target=5000,
                                                                     alive=False)}, 0)
    assert acts == []


def test_no_recent_report_no_inflation_but_deflation_allowed() -> None:
    c = core(Fixed({"a": 5000, "b": 0, "c": 5000}))
    states = {"a": state("a", rep=False), "b": state("b", target=5000, rep=False),
              "c": state("c", t=0.0)}  # c's report is 101 s old
    acts = c.step(101.0, states, 0)
    assert [(a.guest, a.new_pages) for a in acts] == [("b", 0)]
    assert c.counters["skip_inflate_no_report"] == 2


def test_small_changes_are_ignored() -> None:
    c = core(Fixed({"a": 1100}))
    assert c.step(101.0, {"a": state("a", target=1000)}, 0) == []
    assert c.counters["skip_small_change"] == 1


def test_no_reversal_within_hold_unless_under_pressure() -> None:
    p = Fixed({"a": 8000})
    c = core(p)
    assert c.step(100.0, {"a": state("a")}, 0)[0].new_pages == 8000
    p.out = {"a": 2000}  # back down within the hold time, guest calm: refused
    assert c.step(105.0, {"a": state("a", target=8000, t=105.0)}, 0) == []
    assert c.counters["skip_reversal"] == 1
    pressed = state("a", target=8000, rep=report("a", stall=30.0), t=105.0)
    assert c.step(105.5, {"a": pressed}, 0)[0].new_pages == 2000  # pressure: at once
    p.out = {"a": 9000}  # and no re-inflation within the hold, pressure or not
    assert c.step(106.0, {"a": state("a", target=2000, t=106.0)}, 0) == []
    assert c.step(120.0, {"a": state("a", target=2000, t=120.0)}, 0)[0].new_pages == 9000


def test_manual_target_pins_and_clamps() -> None:
    p = Fixed({"a": 3000})
    c = core(p, a=GuestSettings(min_pages=RAM - 10000))
    a = c.set_manual(100.0, state("a"), 20000, force=True)
    assert (a.kind, a.new_pages) == ("manual", 10000) and "clamped" in a.reason
    assert c.step(101.0, {"a": state("a", target=10000)}, 0) == []  # policy ignored
    (again,) = c.step(102.0, {"a": state("a", target=0)}, 0)  # backend lost it: re-asked
    assert again.new_pages == 10000
    assert c.clear_manual("a")
    assert c.step(200.0, {"a": state("a", target=10000, t=200.0)}, 0)[0].new_pages == 3000


def test_shutdown_deflates_to_ceiling() -> None:
    c = core(Fixed({}), b=GuestSettings(max_pages=RAM - 100))
    acts = c.shutdown_actions({"a": state("a", target=9000), "b": state("b", target=9000),
                               "d": state("d", target=5, alive=False)})
    assert {(a.guest, a.new_pages) for a in acts} == {("a", 0), ("b", 100)}
    assert all(a.kind == "shutdown" for a in acts)


def test_bad_decisions_are_dropped_and_counted() -> None:
    class Bad(Fixed):
        def decide(self, host: HostSample, guests: Sequence[GuestSample],
                   now: float) -> list[Decision]:
            return [Decision("ghost", 5, "x"), Decision("a", float("nan"), "x"),  # type: ignore[arg-type]
                    "junk"]  # type: ignore[list-item]

    c = core(Bad({}))
    assert c.step(101.0, {"a": state("a")}, 0) == []
    assert c.counters["policy_unknown_guest"] == 2 and c.counters["policy_bad_target"] == 1


@given(st.lists(st.tuples(st.integers(-10**9, 10**9), st.booleans(), st.booleans(),
                          st.integers(0, 30000), st.integers(0, 30000)), min_size=1,
                max_size=5), st.floats(0, 50))
def test_actions_always_respect_limits_and_liveness(
        guests: list[tuple[int, bool, bool, int, int]], now: float) -> None:
    settings = {f"g{i}": GuestSettings(min_pages=lo, max_pages=lo + hi)
                for i, (_, _, _, lo, hi) in enumerate(guests)}
    out = {f"g{i}": want for i, (want, _, _, _, _) in enumerate(guests)}
    states = {f"g{i}": state(f"g{i}", alive=alive, rep=has_rep, t=now)
              for i, (_, alive, has_rep, _, _) in enumerate(guests)}
    c = ManagerCore(Fixed(out), settings, 1000)
    for a in c.step(now, states, 0):
        s = states[a.guest]
        assert s.alive
        size = RAM - a.new_pages
        assert settings[a.guest].min_pages <= size or a.new_pages == 0
        mx = settings[a.guest].max_pages
        assert mx is None or size <= max(mx, settings[a.guest].min_pages)
        if a.new_pages > s.target_pages and a.kind == "policy":
            assert s.report is not None


def test_rising_major_faults_count_as_pressure_for_a_reversal() -> None:
    p = Fixed({"a": 8000})
    c = core(p)
    c.step(100.0, {"a": state("a")}, 0)
    p.out = {"a": 2000}
    calm = report("a")
    c.step(101.0, {"a": state("a", target=8000, rep=calm, t=101.0)}, 0)  # refused: calm
    faulting = PressureReport("a", 2.0, RAM * PAGE_SIZE, 128 << 20, 128 << 20, 1 << 20,
                              1 << 20, 0, 0, 0, 50, 0, 0, 0.0, 0, 0)  # 50 new major faults
    (a,) = c.step(102.0, {"a": state("a", target=8000, rep=faulting, t=102.0)}, 0)
    assert a.new_pages == 2000 and c.counters["skip_reversal"] == 1


def test_an_urgent_decision_is_not_held_back_as_a_reversal() -> None:
    # a budget reclaim right after a deflation must go through (the host budget comes first)
    class Flip:
        name = "flip"

        def __init__(self) -> None:
            self.calls = 0

        def decide(self, host, guests, now):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 1:
                return [Decision("a", 0, "deflate")]
            return [Decision("a", RAM // 2, "host over budget", urgent=self.calls == 3)]

    core = ManagerCore(Flip(), {"a": GuestSettings()}, budget_pages=RAM * 4)
    first = core.step(100.0, {"a": state("a", target=RAM // 4)}, 0)
    assert [a.new_pages for a in first] == [0]
    held = core.step(101.0, {"a": state("a", target=0, t=101.0)}, 0)
    assert held == []  # an ordinary reversal within the hold time is refused
    urgent = core.step(102.0, {"a": state("a", target=0, t=102.0)}, 0)
    assert [a.new_pages for a in urgent] == [RAM // 2]


def test_snapshot_restores_pins_and_holds_on_another_clock() -> None:
    # a restarted daemon's core keeps the manual pin and still refuses an early reversal,
    # though its clock has another origin: the snapshot stores ages, not clock readings
    core1 = core(Fixed({"a": 1000}))
    core1.step(100.0, {"a": state("a", t=100.0)}, 0)  # inflate a to 1000
    core1.set_manual(100.0, state("b", t=100.0), 500)
    snap = core1.snapshot(104.0)
    assert snap.version == 1 and snap.manual == {"b": 500}
    assert snap.last_change_age_s == {"a": 4.0, "b": 4.0} and snap.last_direction["a"] == 1
    again = CoreSnapshot.from_json(snap.to_json())
    assert again == snap
    core2 = core(Fixed({"a": 0, "b": 0}))
    core2.restore(again, 7.0)  # a new process: its clock reads 7 s
    acts = core2.step(10.0, {"a": state("a", target=1000, balloon=1000, t=10.0),
                             "b": state("b", target=500, balloon=500, t=10.0)}, 0)
    assert acts == []  # a's deflation is a reversal 7 s after the change; b is pinned
    assert core2.counters["skip_reversal"] == 1
    later = core2.step(20.0, {"a": state("a", target=1000, balloon=1000, t=20.0),
                              "b": state("b", target=500, balloon=500, t=20.0)}, 0)
    assert [(a.guest, a.new_pages) for a in later] == [("a", 0)]


def test_a_bad_snapshot_is_refused_with_a_config_error_naming_the_field() -> None:
    import pytest

    from memballoon.model.errors import ConfigError

    for doc, field in (('{"version": 2}', "version"), ('{"manual": {"a": -1}}', "manual.a"),
                       ('{"last_direction": {"a": 0}}', "last_direction.a"),
                       ('{"last_change_age_s": {"a": NaN}}', "last_change_age_s.a"),
                       ('{"extra": 1}', "extra"), ("[1]", "(root)"), ("{", "(root)")):
        with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
            CoreSnapshot.from_json(doc)


def test_the_budget_shrinks_with_the_hosts_own_memory() -> None:
    from memballoon.manager.port import HostMemory

    mem = HostMemory(total_bytes=1000 * PAGE_SIZE, available_bytes=300 * PAGE_SIZE, psi=None,
                     source="test")
    fixed = ManagerCore(Fixed({}), {}, budget_pages=10_000, reserve_pages=100)
    h = fixed.host_sample(500 * PAGE_SIZE, mem)
    # the guests hold 500 and the host can spare 200 more beyond its reserve: 700, not 10000
    assert (h.budget_pages, h.available_pages, h.reserve_pages, h.short_pages) == (700, 300,
                                                                                   100, 0)
    assert fixed.host_sample(500 * PAGE_SIZE, None).budget_pages == 10_000
    auto = ManagerCore(Fixed({}), {}, budget_pages=None, reserve_pages=400)
    short = auto.host_sample(500 * PAGE_SIZE, mem)
    assert short.budget_pages == 400 and short.short_pages == 100 and short.total_pages == 1000
    held = auto.host_sample(500 * PAGE_SIZE, None)  # auto, but no reading: hold them
    assert held.budget_pages == 500 and auto.counters["host_memory_missing"] == 1


def test_a_balloon_beyond_the_guests_ram_is_clamped_and_hurts_only_that_guest() -> None:
    # a virtio guest writing actual = 0xFFFFFFFF: the host must not look over budget by it
    p = Fixed({})
    c = core(p)
    liar = GuestSample("liar", RAM, 0xFFFFFFFF, 0, report=report("liar"), report_time=100.0)
    c.step(100.0, {"liar": liar, "a": state("a")}, 10 * PAGE_SIZE)
    _, guests = p.seen[0]
    seen = {g.name: g for g in guests}
    assert seen["liar"].balloon_pages == RAM and seen["liar"].size_pages == 0
    assert seen["a"] == c.sample(state("a"))
    assert c.counters["sample_out_of_range"] == 1


def test_a_manual_size_under_the_safety_floor_is_refused_unless_forced() -> None:
    # seed 003: "administrators often accidentally over-shrink their domains and effectively
    # kill them"; `set GUEST 0B` must not be one keystroke away
    import pytest

    from memballoon.manager.core import MANUAL_MARGIN_PAGES, MANUAL_MIN_PAGES
    from memballoon.model.errors import ConfigError

    c = core(Fixed({}))
    g = state("a")  # its report: 128 MiB available of 256 MiB, so a working set of 32768
    floor, why = c.safety_floor(c.sample(g))
    assert floor == 32768 + MANUAL_MARGIN_PAGES and "working set of 32768 pages" in why
    with pytest.raises(ConfigError, match=f"safety floor of {floor} pages"):
        c.set_manual(100.0, g, RAM)  # size 0: the whole RAM ballooned
    assert c.counters["manual_refused"] == 1 and "a" not in c.manual
    a = c.set_manual(100.0, g, RAM - floor)  # at the floor: fine
    assert a.new_pages == RAM - floor
    assert c.set_manual(101.0, g, RAM, force=True).new_pages == RAM  # forced
    blind = state("b", rep=None)
    assert c.safety_floor(c.sample(blind))[0] == MANUAL_MIN_PAGES
    mins = core(Fixed({}), c=GuestSettings(min_pages=60000))
    assert mins.safety_floor(mins.sample(state("c")))[0] == 60000


LIMITS = st.sampled_from([GuestSettings(), GuestSettings(min_pages=40000),
                          GuestSettings(max_pages=60000),
                          GuestSettings(min_pages=20000, max_pages=50000)])


@given(st.lists(st.tuples(st.integers(-10, RAM + 10), LIMITS, st.booleans(),
                          st.one_of(st.none(), st.integers(0, RAM)), st.booleans()),
                min_size=1, max_size=8))
def test_step_looks_only_at_guests_with_something_to_do(
    guests: list[tuple[int, GuestSettings, bool, int | None, bool]],
) -> None:
    """Only the guests decided for, pinned or outside their limits are looked at: the actions
    are still, in the guests' order, those of a look at every guest (a correction wherever no
    decision moved a live guest whose target breaks its limits)."""
    names = [f"g{i}" for i in range(len(guests))]
    decided = {n: d for n, (_, _, _, d, _) in zip(names, guests, strict=True) if d is not None}
    c = ManagerCore(Fixed(decided), {n: g[1] for n, g in zip(names, guests, strict=True)},
                    budget_pages=100_000, hysteresis=Hysteresis(min_change_pages=0,
                                                                min_change_fraction=0.0))
    for n, (_, _, _, _, pinned) in zip(names, guests, strict=True):
        if pinned:
            c.manual[n] = 30000
    states = {n: state(n, target=t, alive=alive)
              for n, (t, _, alive, _, _) in zip(names, guests, strict=True)}
    acts = c.step(101.0, states, 0)
    want: list[tuple[str, str, int]] = []
    for n, (_, _, alive, d, pinned) in zip(names, guests, strict=True):
        s = c.last_samples[n]
        if not alive:
            continue
        if pinned:
            if clamp_balloon(s, 30000) != s.target_pages:
                want.append((n, "manual", clamp_balloon(s, 30000)))
            continue
        if d is not None and clamp_balloon(s, d) != s.target_pages:
            forced = clamp_balloon(s, s.target_pages) != s.target_pages
            want.append((n, "correction" if forced else "policy", clamp_balloon(s, d)))
        elif clamp_balloon(s, s.target_pages) != s.target_pages:
            want.append((n, "correction", clamp_balloon(s, s.target_pages)))
    assert [(a.guest, a.kind, a.new_pages) for a in acts] == want
    assert c.counters["sample_out_of_range"] == sum(1 for t, *_ in guests if not 0 <= t <= RAM)


def test_a_sample_handed_over_again_gives_what_it_gave_and_settings_still_apply() -> None:
    # the simulator keeps a guest's sample object while nothing of it changes: the core's
    # shortcut for it must answer as a new object with the same figures would
    p = Fixed({})
    c = core(p)
    a, b = state("a", target=70_000 - 5000), state("b", target=1000, balloon=-5)
    seen = []
    for _ in range(2):
        c.step(101.0, {"a": a, "b": b}, 0)
        seen.append(p.seen[-1][1])
    assert seen[0] == seen[1] and seen[1][0] is seen[0][0]
    # b's balloon out of range is clamped, and counted, each time it comes
    assert seen[1][1].balloon_pages == 0 and c.counters["sample_out_of_range"] == 2
    # new settings for the same object take effect at once: a's target is now above its ceiling
    c.settings["a"] = GuestSettings(min_pages=RAM - 1000)
    acts = c.step(102.0, {"a": a, "b": b}, 0)
    assert p.seen[-1][1][0].settings.min_pages == RAM - 1000
    assert [(x.guest, x.new_pages, x.kind) for x in acts] == [("a", 1000, "correction")]
