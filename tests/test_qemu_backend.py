"""QemuBackend: fake QEMUs on unix sockets for the hostile cases, then real TCG guests.

The fakes (test_qmp.FakeQmp) misbehave on purpose: malformed, late and missing replies, a
DeviceNotActive device, a balloon that never moves, an agent that floods garbage, a socket
that drops and comes back. Each time the other guests of the same backend must go on.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import memballoon.qemu.backend as backend_mod
from memballoon.host.cgroup import detect
from memballoon.manager.port import Backend
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB, PAGE_SIZE
from memballoon.qemu.backend import QemuBackend, qemu_pid_of
from memballoon.qemu.errors import GuestGoneError
from memballoon.qemu.image import build_guest_image
from memballoon.qemu.launch import QemuGuest
from test_qmp import RAM, FakeQmp, Handler, balloon_handler, reply

AGENT_LINE = (
    '{"v":1,"t":11.47,"meminfo":{"MemTotal":996624,"MemFree":855028,"MemAvailable":788300,'
    '"Cached":104700,"SwapTotal":0,"SwapFree":0},"psi":{"some_avg10":1.50,"some_total":42,'
    '"full_avg10":0.00,"full_total":0},"vmstat":{"pswpin":0,"pswpout":0,"pgmajfault":3,'
    '"oom_kill":0}}\n'
)


async def agent_server(path: Path, chunks: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        await reader.read()

    return await asyncio.start_unix_server(handle, path=str(path))


@asynccontextmanager
async def fake_world(
    tmp_path: Path, handlers: dict[str, Handler], agents: dict[str, list[bytes]] | None = None,
    *, timeout_s: float = 0.3,
) -> AsyncIterator[tuple[QemuBackend, dict[str, FakeQmp]]]:
    backend = QemuBackend(counters=Counters(), qmp_timeout_s=timeout_s)
    fakes: dict[str, FakeQmp] = {}
    servers: list[asyncio.Server] = []
    try:
        for name, handler in handlers.items():
            fakes[name] = await FakeQmp(tmp_path / f"{name}.qmp", handler).start()
            agent_path = None
            if agents and name in agents:
                agent_path = tmp_path / f"{name}.agent"
                servers.append(await agent_server(agent_path, agents[name]))
            await backend.attach(name, fakes[name].path, agent_path, RAM)
        yield backend, fakes
    finally:
        await backend.close()
        for f in fakes.values():
            if f.server is not None and f.server.is_serving():
                await f.stop()
        for s in servers:
            s.close()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_is_a_backend_and_converts_pages_to_logical_bytes(tmp_path: Path) -> None:
    async def main() -> None:
        state: dict[str, Any] = {"actual": RAM}
        async with fake_world(tmp_path, {"g1": balloon_handler(state)},
                              {"g1": [AGENT_LINE.encode()]}) as (b, fakes):
            backend: Backend = b
            assert backend.name == "qemu"
            assert qemu_pid_of(fakes["g1"].path) == os.getpid()  # the fake runs in-process
            assert backend.set_target("g1", 1000)  # the port queues it ...
            assert not any(c[0] == "balloon" for c in fakes["g1"].calls)
            await b.flush()  # ... and the async shell sends it after the step
            assert ("balloon", {"value": RAM - 1000 * PAGE_SIZE}) in fakes["g1"].calls
            for _ in range(50):
                st = (await backend.poll())["g1"]
                if st.report is not None:
                    break
                await asyncio.sleep(0.02)
            assert st.alive and st.ram_pages == RAM // PAGE_SIZE
            assert st.balloon_pages == 1000 and st.target_pages == 1000
            assert st.report is not None and st.report.guest == "g1"
            assert st.report.total_bytes == 996624 * 1024 and st.report.stall_pct == 1.5
            # the line arrived before the balloon moved: it is paired with the balloon then
            assert st.report.balloon_actual_pages == 0 and st.report_time is not None
            assert st.resident_bytes is not None and st.resident_bytes > 0
            assert backend.host_resident_bytes() > 0
            # Out of range or unknown: refused and counted, never sent.
            assert not await backend.apply_target("g1", RAM // PAGE_SIZE)
            assert not await backend.apply_target("g1", -1)
            assert not await backend.apply_target("nope", 1)
            assert not backend.set_target("g1", -1) and not backend.set_target("nope", 1)
            assert backend.counters["qemu_target_out_of_range"] == 3
            assert backend.counters["qemu_unknown_guest"] == 2
            with pytest.raises(ConfigError):
                await b.attach("g1", fakes["g1"].path, None, RAM)

    run(main)


def test_bad_qmp_replies_mark_only_that_guest(tmp_path: Path) -> None:
    async def garbage(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        if cmd == "query-balloon":
            return reply({"actual": "lots"}, msg_id)
        return reply({}, msg_id)

    silent_state = {"mute": False}

    async def late(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        if silent_state["mute"]:
            await asyncio.sleep(5)
        return reply({"actual": RAM}, msg_id)

    async def hangup(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        if cmd == "query-balloon" and silent_state["mute"]:
            return b"CLOSE"
        return reply({"actual": RAM}, msg_id)

    async def main() -> None:
        good: dict[str, Any] = {"actual": RAM}
        handlers = {"good": balloon_handler(good), "garbage": late, "late": late,
                    "hangup": hangup}
        async with fake_world(tmp_path, handlers) as (b, fakes):
            fakes["garbage"].handler = garbage
            silent_state["mute"] = True
            for i in range(backend_mod.MAX_POLL_FAILURES):
                snap = await b.poll()
                assert snap["good"].alive
                assert await b.apply_target("good", 100 + i)
            snap = await b.poll()
            assert snap["good"].alive and snap["good"].balloon_pages == 100 + i
            assert not snap["garbage"].alive and not snap["late"].alive
            assert not snap["hangup"].alive
            assert not await b.apply_target("late", 10)
            assert b.counters["qmp_bad_reply"] >= 3 and b.counters["qmp_timeout"] >= 3
            assert b.counters["qemu_guest_gone"] == 3
            assert "polls failed" in b.gone_reason("garbage")

    run(main)


def test_device_not_active_and_stuck_balloon_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_mod, "BALLOON_STUCK_S", 0.1)

    async def inactive(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        if cmd == "balloon":
            return json.dumps({"error": {"class": "DeviceNotActive", "desc": "No balloon"},
                               "id": msg_id}).encode() + b"\n"
        return reply({"actual": RAM}, msg_id)

    async def inhibited(cmd: str, args: dict[str, Any], msg_id: object) -> bytes:
        return reply({} if cmd == "balloon" else {"actual": RAM}, msg_id)  # never moves

    async def main() -> None:
        async with fake_world(tmp_path, {"na": inactive, "stuck": inhibited}) as (b, _):
            assert not await b.apply_target("na", 10)
            assert b.counters["qemu_device_not_active"] == 1
            assert await b.apply_target("stuck", 50_000)
            await b.poll()
            assert b.stuck() == frozenset()
            await asyncio.sleep(0.2)
            snap = await b.poll()
            await b.poll()
            assert b.stuck() == {"stuck"} and b.counters["qemu_balloon_stuck"] == 1
            assert snap["stuck"].alive and snap["stuck"].balloon_pages == 0
            assert snap["stuck"].target_pages == 50_000
            assert await b.apply_target("stuck", 0)  # a reachable target clears it
            await b.poll()
            assert b.stuck() == frozenset()

    run(main)


def test_flooding_garbage_agent_costs_nothing_but_counters(tmp_path: Path) -> None:
    flood = [b"\x00\xff garbage\n", b"A" * 200_000 + b"\n", b'{"v":2}\n'] * 20
    flood.append(AGENT_LINE.encode())

    async def main() -> None:
        handlers = {"noisy": balloon_handler({"actual": RAM}),
                    "calm": balloon_handler({"actual": RAM})}
        async with fake_world(tmp_path, handlers,
                              {"noisy": flood, "calm": [AGENT_LINE.encode()]}) as (b, _):
            for _ in range(100):
                snap = await b.poll()
                if snap["noisy"].report is not None and snap["calm"].report is not None:
                    break
                await asyncio.sleep(0.02)
            assert snap["noisy"].report is not None and snap["calm"].report is not None
            assert snap["noisy"].report.total_bytes == 996624 * 1024
            assert b.counters["agent_line_too_long"] == 20
            assert b.counters["agent_bad_json"] == 20
            assert b.counters["agent_bad_version"] == 20

    run(main)


def test_socket_drop_marks_gone_then_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_mod, "RECONNECT_INTERVAL_S", 0.0)

    async def main() -> None:
        state: dict[str, Any] = {"actual": RAM - 4 * MIB}
        async with fake_world(tmp_path, {"g": balloon_handler(state),
                                         "other": balloon_handler({"actual": RAM})}) as (b, f):
            await f["g"].stop()  # QEMU's monitor goes away
            snap = await b.poll()
            assert not snap["g"].alive and snap["other"].alive
            assert not await b.apply_target("g", 1)
            assert b.counters["qemu_guest_gone"] == 1
            snap = await b.poll()  # still nobody listening: an attempt, no luck
            assert not snap["g"].alive and b.counters["qemu_reconnect_attempt"] >= 1
            f["g"] = await FakeQmp(f["g"].path, balloon_handler(state)).start()
            snap = await b.poll()
            assert snap["g"].alive and snap["g"].balloon_pages == 1024
            assert b.counters["qemu_reconnected"] == 1
            assert await b.apply_target("g", 0)

    run(main)


def test_attach_to_nothing_is_guest_gone(tmp_path: Path) -> None:
    async def main() -> None:
        b = QemuBackend()
        with pytest.raises(GuestGoneError):
            await b.attach("x", tmp_path / "none.sock", None, RAM)
        with pytest.raises(ConfigError):
            await b.attach("x", tmp_path / "none.sock", None, 1000)
        assert await b.poll() == {}
        assert b.host_resident_bytes() == 0

    run(main)


# --- real guests ---------------------------------------------------------------------


@pytest.mark.qemu
def test_two_real_guests_one_killed_mid_run(tmp_path: Path) -> None:
    """(c) of issue 5, through the backend: QEMU killed, the other guest goes on."""
    image = build_guest_image()
    cg_usable = detect().usable

    async def main() -> None:
        specs = [QemuGuest("bk-a", max_mib=512, accel="tcg"),
                 QemuGuest("bk-b", max_mib=512, start_mib=384, accel="tcg")]
        async with await QemuBackend.create(
            specs, run_dir=tmp_path, budget_bytes=2048 * MIB, image=image,
            cgroup_name=f"mb-test-{os.getpid()}",
        ) as b:
            assert b.budget is not None and b.budget.enforced == cg_usable
            procs = {n: b.process(n) for n in ("bk-a", "bk-b")}
            if b.budget.cgroup is not None:
                assert sorted(b.budget.cgroup.pids()) == sorted(
                    p.pid for p in procs.values() if p is not None)
            for _ in range(150):
                snap = await b.poll()
                if all(s.report is not None for s in snap.values()) and \
                        abs(snap["bk-b"].balloon_pages - 128 * MIB // PAGE_SIZE) <= 256:
                    break
                await asyncio.sleep(0.1)
            assert snap["bk-b"].target_pages == 128 * MIB // PAGE_SIZE
            assert abs(snap["bk-b"].balloon_pages - 128 * MIB // PAGE_SIZE) <= 256
            for s in snap.values():
                assert s.alive and s.report is not None and s.report.oom_kills == 0
                assert s.report.total_bytes > 0 and s.resident_bytes is not None
            assert b.host_resident_bytes() >= sum(s.resident_bytes or 0 for s in snap.values())

            proc_b = procs["bk-b"]
            assert proc_b is not None
            proc_b.kill()
            assert await b.apply_target("bk-a", 256 * MIB // PAGE_SIZE)
            for _ in range(150):
                snap = await b.poll()
                if abs(snap["bk-a"].balloon_pages - 256 * MIB // PAGE_SIZE) <= 256:
                    break
                await asyncio.sleep(0.1)
            assert not snap["bk-b"].alive and "exited" in b.gone_reason("bk-b")
            assert snap["bk-a"].alive
            assert abs(snap["bk-a"].balloon_pages - 256 * MIB // PAGE_SIZE) <= 256
            assert not await b.apply_target("bk-b", 0)
            assert b.counters["qemu_guest_gone"] == 1
            assert b.stuck() == frozenset()

    asyncio.run(main())


@pytest.mark.qemu
def test_reports_carry_the_balloon_the_guest_saw(tmp_path: Path) -> None:
    """Issue 13, found on two QEMU guests: a report paired with the balloon polled after it
    was written read as a working-set jump. With deflate-on-oom off the guest's MemTotal
    shrinks by what the balloon holds, so MemTotal + balloon is the same in every report
    that is paired with the balloon of its own moment, however fast the balloon moves."""
    image = build_guest_image()

    async def main() -> None:
        async with await QemuBackend.create(
            [QemuGuest("seen", max_mib=768, accel="tcg")], run_dir=tmp_path,
            budget_bytes=None, image=image,
        ) as b:
            reports = []
            targets = [0, 256, 0, 384, 64, 0, 320, 0]  # MiB of balloon, moved every ~0.8 s
            for i in range(120):
                if i % 7 == 0 and targets:
                    b.set_target("seen", targets.pop(0) * MIB // PAGE_SIZE)
                    await b.flush()
                r = (await b.poll())["seen"].report
                if r is not None and (not reports or r is not reports[-1]):
                    reports.append(r)
                await asyncio.sleep(0.1)
            agent = b.agent("seen")
            assert agent is not None and agent.latest is not None
            assert agent.latest.guest_balloon_pages is not None  # the guest says it
            sums = [r.total_bytes + r.balloon_actual_pages * PAGE_SIZE for r in reports]
            assert len(reports) >= 8 and {r.balloon_actual_pages for r in reports} != {0}
            # the agent reads vmstat right before meminfo: a balloon moving at ~1 GiB/s
            # moves at most a few MiB between the two (seen: 0 to 5 MiB; reading meminfo
            # first: up to 40 MiB; a report paired with a later poll: whole moves)
            assert max(sums) - min(sums) <= 32 * MIB, [
                (r.total_bytes // MIB, r.balloon_actual_pages * PAGE_SIZE // MIB)
                for r in reports]

    asyncio.run(main())


@pytest.mark.qemu
def test_attach_names_what_to_do_and_waits_for_the_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU attach: a QMP path with nothing behind it, or something that is not QEMU, is
    kept as a gone guest saying what to do; a real VM started later joins; the backend never
    kills what it attached."""
    image = build_guest_image()

    async def not_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp.example.com ESMTP\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        from memballoon.qemu.launch import launch

        monkeypatch.setattr(backend_mod, "ATTACH_RETRY_S", 0.0)  # try again at every poll
        b = QemuBackend(counters=Counters(), qmp_timeout_s=0.5)
        fake = await asyncio.start_unix_server(not_qemu, path=str(tmp_path / "smtp.sock"))
        proc = None
        try:
            why = await b.adopt("later", tmp_path / "vm" / "qmp.sock", None, None)
            assert why is not None and "no QMP socket" in why and "-qmp unix:" in why
            why = await b.adopt("smtp", tmp_path / "smtp.sock", None, None)
            assert why is not None and "is it QEMU's -qmp socket" in why
            snap = await b.poll()
            assert not snap["later"].alive and not snap["smtp"].alive
            assert "not attached" in b.notes()["later"]
            assert b.counters["qemu_attach_failed"] >= 2
            proc = await asyncio.to_thread(launch, QemuGuest("later", max_mib=512, accel="tcg"),
                                           image, tmp_path / "vm")
            for _ in range(100):
                snap = await b.poll()
                if snap["later"].alive:
                    break
                await asyncio.sleep(0.1)
            assert snap["later"].alive and snap["later"].ram_pages == 512 * MIB // PAGE_SIZE
            assert b.accels()["later"] == "tcg"
            await b.close()
            assert proc.alive()  # attached, never killed from here
        finally:
            fake.close()
            if proc is not None:
                await asyncio.to_thread(proc.close)

    asyncio.run(main())


def test_an_attached_guest_target_follows_its_balloon_until_set(tmp_path: Path) -> None:
    """QMP tells the balloon, never the target someone else asked for: until memballoon sets
    one, an attached guest's target is its balloon (not the size it had when attached)."""
    async def main() -> None:
        state: dict[str, Any] = {"actual": RAM}
        async with fake_world(tmp_path, {"g": balloon_handler(state)}) as (b, _):
            state["actual"] = RAM - 256 * MIB  # `vm start --mib` pre-inflation lands
            s = (await b.poll())["g"]
            assert s.balloon_pages == s.target_pages == 256 * MIB // PAGE_SIZE
            assert await b.apply_target("g", 100)
            state["actual"] = RAM - 50 * PAGE_SIZE  # on its way
            s = (await b.poll())["g"]
            assert s.balloon_pages == 50 and s.target_pages == 100

    run(main)
