"""bench fuzz: every target fuzzed briefly (the suite's short form of the long run), its seeds
reaching deep into the code they feed, and the bench telling a crash, a hang and a broken
promise from a typed error; the CLI end to end with worker processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time

import numpy as np
import pytest

from memballoon.bench import fuzz
from memballoon.bench.fuzz import (
    TARGETS,
    BrokenPromise,
    Seen,
    Target,
    fuzz_in_process,
    resolve_engine,
    run_fuzz,
)
from memballoon.cli import main
from memballoon.model.errors import ConfigError, FrameError, HostResourceError

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_survives_a_short_fuzz(name: str) -> None:
    target = TARGETS[name]()
    try:
        # a number of inputs, not a time: the same inputs on a loaded machine as on a quiet one
        # (with a 0.6 s budget it failed once under load, never reproduced); the seconds only
        # bound a run that hangs
        tally = fuzz_in_process(target, seconds=30, seed=3, max_inputs=200)
    finally:
        if target.close is not None:
            target.close()
    r = tally.as_dict("hypothesis", done=True)
    assert r["crashes"] == 0, r["crash_samples"]
    assert r["inputs"] > len(target.seeds)
    # the inputs were neither all refused nor all accepted: both sides of the decoder ran
    assert r["error_classes"] or r["counters"]
    assert r["accepted"] > 0 or r["reach"] != "guest" or r["error_classes"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_seed_is_taken_without_a_crash(name: str) -> None:
    target = TARGETS[name]()
    try:
        assert target.seeds, "atheris starts from the seeds"
        tally = fuzz.Tally(target)
        for s in target.seeds:
            assert len(s) <= target.max_len
            tally.one(s)
    finally:
        if target.close is not None:
            target.close()
    assert tally.crashes == 0, tally.samples
    assert tally.accepted > 0, tally.seen.errors  # at least one seed is what it should be


def _seen_from_seeds(name: str) -> Seen:
    target = TARGETS[name]()
    seen = Seen()
    for s in target.seeds:
        target.run(s, seen)
    return seen


def test_the_device_seeds_drive_whole_sessions() -> None:
    # the op formats really reach the balloons: pages taken, given back, reported, refused
    # (one virtio session over 4 KiB host pages, one over 2 MiB; three VMware sessions)
    v = _seen_from_seeds("virtio_device").counters
    assert (v["inflated_pages"], v["deflated_pages"], v["report_buffers"]) == (16, 8, 2)
    assert v["report_partial_frames"] == 1  # a 4 KiB report cannot free a 2 MiB host page
    w = _seen_from_seeds("vmw_device").counters
    assert w["cmd_start"] == 3 and w["cmd_lock"] == 6 and w["cmd_unlock"] == 1
    assert w["cmd_batched_lock"] == 2 and w["cmd_batched_2m_lock"] == 2
    assert w["huge_pages_released"] == 2 and w["reset"] == 1


def test_the_ring_seeds_pop_whole_chains() -> None:
    seen = _seen_from_seeds("virtqueue")
    assert not seen.errors  # a plain chain and an indirect one, both valid
    assert _seen_from_seeds("qmp").counters["qmp_event_balloon_change"] == 2


def _toy(run: fuzz.Runner) -> Target:
    return Target("toy", "guest", "a decoder for the bench's own tests", run, (FrameError,),
                  (b"ok",))


def test_typed_errors_are_classes_seen_and_anything_else_is_a_crash() -> None:
    def run(data: bytes, seen: Seen) -> None:
        if data.startswith(b"\x01"):
            raise FrameError("refused, as documented")
        if data.startswith(b"\x02"):
            _ = 1 // (len(data) - len(data))
        if data.startswith(b"\x03"):
            raise BrokenPromise("a PFN outside the guest")

    tally = fuzz.Tally(_toy(run))
    for data in (b"ok", b"\x01", b"\x01a", b"\x02", b"\x02b", b"\x03"):
        tally.one(data)
    r = tally.as_dict("hypothesis", done=True)
    assert r["inputs"] == 6 and r["accepted"] == 1
    assert r["error_classes"] == {"FrameError": 2}
    assert r["crashes"] == 3
    assert r["crash_classes"] == {"ZeroDivisionError": 2, "BrokenPromise": 1}
    # one sample per class and place, with the input that did it
    assert [s["class"] for s in r["crash_samples"]] == ["ZeroDivisionError", "BrokenPromise"]
    assert r["crash_samples"][0]["input_hex"] == "02"
    assert "test_fuzz.py" in str(r["crash_samples"][0]["where"])


def test_an_input_that_hangs_is_interrupted_and_counted() -> None:
    def run(data: bytes, seen: Seen) -> None:
        if data == b"loop":
            while True:
                with contextlib.suppress(Exception):  # a catch-all must not hide the hang
                    sum(range(1000))
        if data == b"waits":  # off the CPU (a loaded machine, a nice level): no hang
            time.sleep(0.6)

    tally = fuzz.Tally(_toy(run), hang_s=0.3)
    with fuzz._Watchdog(tally):
        tally.one(b"loop")
        tally.one(b"fine")
        tally.one(b"waits")
    assert tally.crash_classes == {"Hang": 1} and tally.accepted == 2


def test_hypothesis_runs_until_its_time_or_inputs_are_spent() -> None:
    seen: list[bytes] = []
    target = _toy(lambda data, s: seen.append(data))
    t0 = time.monotonic()
    tally = fuzz_in_process(target, seconds=30, max_inputs=300)
    assert tally.inputs == 300 and time.monotonic() - t0 < 20
    assert len(set(seen)) > 100  # generated, not one input repeated


def test_the_ledger_ram_catches_a_device_that_loses_track() -> None:
    ram = fuzz._LedgerRam(1024, host_page_frames=512, pool=0)
    ram.release(np.array([[512, 1024]]))
    with pytest.raises(BrokenPromise, match="released twice"):
        ram.release(np.array([[512, 1024]]))
    with pytest.raises(BrokenPromise, match="outside"):
        ram.release(np.array([[1024, 1536]]))
    with pytest.raises(BrokenPromise, match="whole host pages"):
        ram.release(np.array([[0, 4]]))
    with pytest.raises(BrokenPromise, match="never released"):
        ram.readmit(np.array([[0, 512]]))
    assert ram.pool == 1
    assert ram.readmit(np.array([[512, 1024]])) == 512 and ram.pool == 0
    ram.release(np.array([[0, 1024]]))
    ram.pool = 1  # others took a page from the pool meanwhile
    with pytest.raises(HostResourceError) as exc:
        ram.readmit(np.array([[0, 1024]]))
    assert exc.value.unbacked == ((512, 1024),)  # the page it could not back stays released
    assert not ram.released[:512].any() and ram.released[512:].all()


def test_engines_resolve_to_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_engine("auto") == ("atheris" if HAVE_ATHERIS else "hypothesis")
    assert resolve_engine("hypothesis") == "hypothesis"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "atheris" else real(name, *a))
    assert resolve_engine("auto") == "hypothesis"
    with pytest.raises(ConfigError, match=r"memballoon\[fuzz\]"):
        resolve_engine("atheris")
    with pytest.raises(ConfigError, match="unknown fuzz target"):
        run_fuzz(["vmw_frame", "nope"], seconds=1)


def test_bench_fuzz_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    # worker processes, two at once, with whichever engine is installed
    assert main(["bench", "fuzz", "--seconds", "1", "--target", "wire", "--target", "hello",
                 "--jobs", "2", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["crashes"] == 0 and doc["engine"] in ("atheris", "hypothesis")
    assert list(doc["targets"]) == ["wire", "hello"]
    for r in doc["targets"].values():
        assert r["inputs"] > 0 and r["crashes"] == 0 and r["reach"] == "guest"
        assert r["error_classes"]
    assert doc["inputs"] == sum(r["inputs"] for r in doc["targets"].values())
    assert doc["guest_facing_min_inputs"] == min(r["inputs"] for r in doc["targets"].values())
    assert "bench fuzz: wire:" in out.err  # progress on stderr


def test_the_hypothesis_engine_runs_in_a_worker_too(capsys: pytest.CaptureFixture[str]) -> None:
    res = run_fuzz(["virtio_config"], seconds=60, engine="hypothesis", max_inputs=200)
    r = res["targets"]["virtio_config"]
    assert res["engine"] == "hypothesis" and r["engine"] == "hypothesis"
    assert r["inputs"] == 200 and r["crashes"] == 0 and "DeviceConfigError" in r["error_classes"]


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is the optional fuzz extra")
def test_atheris_finds_its_way_past_the_magic() -> None:
    # coverage guidance and the dictionary get random bytes to whole frames quickly
    res = run_fuzz(["vmw_frame"], seconds=3, engine="atheris")
    r = res["targets"]["vmw_frame"]
    assert r["crashes"] == 0 and r["inputs"] > 10_000 and r["accepted"] > 0


def test_a_worker_that_overruns_is_killed_and_counted_as_a_hang(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuzz, "_WORKER_GRACE_S", -100.0)  # every worker is overdue at once
    res = run_fuzz(["virtio_config"], seconds=5, engine="hypothesis")
    r = res["targets"]["virtio_config"]
    assert res["crashes"] == 1 and r["crash_classes"] == {"Hang": 1}
    assert "killed" in r["crash_samples"][-1]["message"]


@pytest.mark.parametrize("argv, needle", [
    (["bench", "fuzz", "--target", "nope"], "invalid choice"),
    (["bench", "fuzz", "--seconds", "0"], "must be positive"),
    (["bench", "fuzz", "--engine", "afl"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv: list[str], needle: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
