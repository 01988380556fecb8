"""The local host with real guest processes and real memory; hostile guests among them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.host.cgroup import detect
from memballoon.host.hugepages import HUGETLB_DIR, SYSFS, read_hugetlb_pool
from memballoon.host.virtio_device import MAX_PFN_BUFFER_BYTES
from memballoon.local.fairness import WorkLimits
from memballoon.local.host import (
    CHUNK_CHAINS,
    GuestSpec,
    LocalHost,
    hello_matches,
    peer_json_object,
    signal_child,
)
from memballoon.manager.port import ManualClock
from memballoon.model.errors import ConfigError, HostResourceError, UsageError
from memballoon.model.units import MIB, PAGE_SIZE, RamKind
from memballoon.policy.sample import GuestSample

MIB_GUEST = 128
HALF = MIB_GUEST * MIB // PAGE_SIZE // 2

HOSTILE = textwrap.dedent('''
    import argparse, json, os, socket, struct, sys, time
    import numpy as np
    from memballoon.host.memfd import MemfdRam
    from memballoon.local.guest_main import add_arguments
    from memballoon.local.link import GuestLink
    from memballoon.local.transport_virtio import LocalVirtioTransport
    from memballoon.model.counters import Counters
    from memballoon.protocol.virtqueue import DriverQueue, GuestRamView, QueueLayout
    from memballoon.protocol.wire import Kind, encode

    mode = sys.argv[1]
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(sys.argv[2:])
    sock = socket.socket(fileno=a.sock_fd)
    hello = {"v": 1, "guest": a.name, "protocol": a.protocol, "pages": a.pages,
             "pid": os.getpid()}
    sock.sendall(encode(Kind.HELLO, json.dumps(hello).encode()))

    def vmw_session(touch):
        """START a batched 2 MiB session, touch ``touch`` pages from frame 8192, and wait
        until the host targets that many; returns the link and the request call."""
        from memballoon.protocol.vmw import (
            Command, Request, decode_response, encode_request)
        ram = MemfdRam.attach(a.mem_fd, a.pages)
        ram.touch(np.arange(8192, 8192 + touch), 0)
        link = GuestLink(sock)
        call = lambda req: link.request(Kind.VMW, encode_request(req), Kind.VMW)
        call(Request(Command.START, 2 | 4 | 8))
        get = Request(Command.GET_TARGET, a.pages)
        end = time.monotonic() + 20
        while decode_response(call(get), get).result < touch and time.monotonic() < end:
            time.sleep(0.05)  # until the host sets our target
        return link, call

    if mode == "garbage":
        sock.sendall(encode(Kind.STATUS, b"{not json") + encode(Kind.VMW, b"junk"))
        time.sleep(0.2)
        sock.sendall(os.urandom(64) + b"\\xff\\xff\\xff\\xff")
    elif mode == "bad_2m":
        from memballoon.protocol.vmw import Command, batch_request
        link, call = vmw_session(512)
        # past the end, straddling it, unaligned, far outside; then one 2 MiB page of our own
        heads = [a.pages, a.pages - 512 + 256, 511, 1 << 40, 8192]
        call(batch_request(Command.BATCHED_2M_LOCK, heads))
        call(batch_request(Command.BATCHED_2M_UNLOCK, [0, 8192 + 1]))
        big = struct.pack("<IIQI", 0x456C6D6F, 8, 600, 600) + bytes(8 * 600)
        link.request(Kind.VMW, big, Kind.VMW)
    elif mode == "deaf":  # reads nothing more: the host's next send fails (a config push)
        sock.shutdown(socket.SHUT_RD)
        sock.sendall(encode(Kind.BYE))  # says it is deaf now
    elif mode == "deaf_vmw":  # LOCKs, then reads nothing: the host cannot send the replies
        from memballoon.protocol.vmw import Command, batch_request, encode_request
        vmw_session(2048)
        sock.shutdown(socket.SHUT_RD)
        sock.sendall(b"".join(encode(Kind.VMW, encode_request(
            batch_request(Command.BATCHED_2M_LOCK, [8192 + 512 * k]))) for k in range(4)))
    elif mode == "storm":  # a fresh round of large chains behind every doorbell, without end
        ram = MemfdRam.attach(a.mem_fd, a.pages)
        link = GuestLink(sock)
        view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
        t = LocalVirtioTransport(link, view, a.kick_fds, a.irq_fds)
        t.set_driver_features(1)  # MUST_TELL_HOST only: plain PFN arrays
        lay = QueueLayout.packed(1 << 20, 128)
        t.setup_queue(0, lay)
        buf = 2 << 20  # 64 KiB of PFNs (its own frames) in 128 descriptors of 512 bytes
        view.write(buf, np.arange(8192, 8192 + 16384, dtype="<u4").tobytes())
        for i in range(128):
            view.write(lay.desc_gpa + 16 * i, struct.pack(
                "<QIHH", buf + 512 * i, 512, 1 if i < 127 else 0, i + 1 if i < 127 else 0))
        bells = encode(Kind.NOTIFY, struct.pack("<H", 0)) * 64
        while True:  # every avail slot names head 0: 128 chains of 128 descriptors a round
            used = view.read_u16(lay.used_gpa + 2)
            view.write_u16(lay.avail_gpa + 2, (used + 128) & 0xFFFF)
            t.notify(0)
            sock.sendall(bells)
    else:
        ram = MemfdRam.attach(a.mem_fd, a.pages)
        link = GuestLink(sock)
        view = GuestRamView(ram.mapping, base_gpa=0, guest_bytes=ram.size_bytes)
        t = LocalVirtioTransport(link, view, a.kick_fds, a.irq_fds)
        t.set_driver_features(1)  # MUST_TELL_HOST only: plain PFN arrays
        lay = QueueLayout.packed(1 << 20, 16)
        t.setup_queue(0, lay)
        q = DriverQueue(view, lay, Counters())
        ram.touch(np.arange(8192, 8192 + 4096), 0)
        if mode == "bad_pfns":
            pfns = np.array([a.pages, a.pages + 7, 2**32 - 1, 9000], dtype="<u4")
            view.write(2 << 20, pfns.tobytes())
            q.add([(2 << 20, pfns.nbytes, False)])
            q.add([(a.pages * 4096 - 8, 4096, False)])
            q.publish()
            t.notify(0)
        else:  # flood
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for _ in range(1000):
                    t.notify(0)
                link.send(Kind.NOTIFY, struct.pack("<H", 9))
                link.send(Kind.VIRTIO, b"\\x63")
    while True:
        time.sleep(1)
''')


def _hostile(tmp_path: Path, name: str, mode: str, protocol: str = "virtio") -> GuestSpec:
    # the script on the command line: a guest's private uid cannot read pytest's tmp_path
    return GuestSpec(name, MIB_GUEST, protocol, "idle",
                     program=(sys.executable, "-c", HOSTILE, mode))


def _ok(v: GuestSample) -> bool:
    return v.alive and v.report is not None


async def _inflate_deflate_other(host: LocalHost, name: str) -> None:
    """A well-behaved guest still gets served: inflate, check memory returned, deflate."""
    before = host.guests()[name].resident_bytes
    host.set_target(name, HALF)
    assert await host.wait_until(lambda s: s[name].balloon_pages == HALF, 20)
    assert before - host.guests()[name].resident_bytes == HALF * PAGE_SIZE
    host.set_target(name, 0)
    assert await host.wait_until(lambda s: s[name].balloon_pages == 0, 20)


def test_two_guests_inflate_returns_host_memory_and_data_stays_intact() -> None:
    async def main() -> None:
        specs = [GuestSpec("v", MIB_GUEST, "virtio", "idle", prefault=True, period_s=0.2),
                 GuestSpec("b", MIB_GUEST, "vmw-batched", "idle", prefault=True, period_s=0.2)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert host.budget is None
            assert await host.wait_until(lambda s: all(map(_ok, s.values())), 30)
            await asyncio.sleep(0.3)  # let the first steps settle
            before = {n: v.resident_bytes for n, v in host.guests().items()}
            for n in before:
                host.set_target(n, HALF)
            assert await host.wait_until(
                lambda s: all(v.balloon_pages == HALF for v in s.values()), 30)
            snap = host.guests()
            for n, v in snap.items():
                assert before[n] - v.resident_bytes == HALF * PAGE_SIZE, n
                assert v.target_pages == HALF
            assert host.resident_bytes() == sum(v.resident_bytes or 0 for v in snap.values())
            assert await host.wait_until(
                lambda s: all(v.report is not None and v.report.balloon_actual_pages == HALF
                              for v in s.values()), 10)
            for n in before:
                host.set_target(n, 0)
            assert await host.wait_until(
                lambda s: all(v.balloon_pages == 0 for v in s.values()), 30)
            # touched, the deflated pages are the host's memory again; a free page reporting
            # pass (every 2 s) may release just-deflated free blocks after a touch: once
            # reported they stay so, and the next touch brings them back for good
            for _ in range(3):
                for n in before:
                    touched = await host.control(n, "touch_free")
                    assert touched["touched_pages"] >= HALF
                    check = await host.control(n, "verify")
                    assert check["lost_pages"] == 0 and check["checked_pages"] > 0
                    assert check["invariant_errors"] == []
                after = {n: v.resident_bytes for n, v in host.guests().items()}
                if all(after[n] >= before[n] for n in before):
                    break
                await asyncio.sleep(2.5)
            stats = {n: (await host.control(n, "stats"))["driver"] for n in before}
            assert all(after[n] >= before[n] for n in before), (before, after, stats)
            assert not host.set_target("v", MIB_GUEST * MIB)  # past its RAM: refused
            assert not host.set_target("nobody", 1)
            assert host.counters["set_target_refused"] == 2
        snap = host.guests()
        assert all(not v.alive and host.exit_code(n) == 0 for n, v in snap.items())
        assert all(v.resident_bytes == 0 for v in snap.values())

    asyncio.run(main())


def test_guest_killed_mid_inflate_is_noticed_and_the_other_goes_on() -> None:
    async def main() -> None:
        specs = [GuestSpec("legacy", MIB_GUEST, "vmw", "idle", prefault=True, period_s=0.5),
                 GuestSpec("v", MIB_GUEST, "virtio", "idle", prefault=True)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert await host.wait_until(lambda s: all(map(_ok, s.values())), 30)
            host.set_target("legacy", HALF)  # 16385 pages a cycle: takes cycles
            assert await host.wait_until(lambda s: s["legacy"].balloon_pages > 0, 20, 0.001)
            pid = host.pid("legacy")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await host.wait_until(lambda s: not s["legacy"].alive, 10)
            dead = host.guests()["legacy"]
            assert 0 < dead.balloon_pages < HALF
            at_exit = host.resident_at_exit_bytes("legacy")
            assert at_exit is not None and at_exit > 0
            assert dead.resident_bytes == 0
            assert host.exit_code("legacy") != 0
            assert host.freed_at_exit_bytes == at_exit
            assert not host.set_target("legacy", 0)
            await _inflate_deflate_other(host, "v")

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["garbage", "bad_pfns", "flood", "bad_2m"])
def test_hostile_guest_cannot_hurt_the_host_or_the_others(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        protocol = "vmw-batched" if mode == "bad_2m" else "virtio"
        specs = [_hostile(tmp_path, "evil", mode, protocol),
                 GuestSpec("good", MIB_GUEST, "virtio", "idle", prefault=True)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert await host.wait_until(lambda s: _ok(s["good"]), 30)
            host.set_target("evil", 1000)
            if mode == "garbage":
                assert await host.wait_until(lambda s: not s["evil"].alive, 10)
                c = host.counters_of("evil")
                assert c["frame_error"] == 1 and c["died_garbage"] == 1
                assert c["report_not_json"] == 1
            elif mode == "bad_pfns":
                assert await host.wait_until(
                    lambda s: host.counters_of("evil").get("inflateq_bad_descriptor", 0) == 1, 10)
                c = host.counters_of("evil")
                assert c["inflate_pfn_outside_guest"] == 3
                assert c["inflated_pages"] == 1  # PFN 9000, its own
                assert host.guests()["evil"].alive
            elif mode == "bad_2m":
                assert await host.wait_until(
                    lambda s: host.counters_of("evil").get("frame_count_over_max", 0) == 1, 10)
                c = host.counters_of("evil")
                assert c["error_ppn_invalid"] == 4 + 1  # four bad heads; then an unaligned one
                assert c["error_ppn_unlocked"] == 1  # a page it never locked
                evil = host.guests()["evil"]
                assert evil.alive and evil.balloon_pages == 512  # its own 2 MiB page only
                assert evil.resident_bytes == 0  # the one page it had touched is released
            else:
                assert await host.wait_until(
                    lambda s: host.counters_of("evil").get("virtio_request_malformed", 0) > 10, 10)
                c = host.counters_of("evil")
                assert c["doorbells"] > 0 and c["notify_dead_queue"] > 0
            await _inflate_deflate_other(host, "good")
            evil = host.guests()["evil"]
            if evil.alive:
                assert evil.resident_bytes <= MIB_GUEST * MIB

    asyncio.run(main())


@pytest.mark.skipif(not detect().usable, reason="needs root and a memory cgroup")
def test_budget_is_enforced_by_a_cgroup_the_guests_joined_first() -> None:
    async def main() -> None:
        specs = [GuestSpec("a", MIB_GUEST, "virtio", "idle", prefault=True)]
        async with LocalHost(specs, budget_bytes=512 * MIB) as host:
            b = host.budget
            assert b is not None and b.enforced and b.cgroup is not None
            assert "enforced" in b.describe()
            assert await host.wait_until(lambda s: _ok(s["a"]), 30)
            own = host.guest_cgroup("a")
            assert own is not None and own.path.parent == b.cgroup.path  # inside the budget's
            assert host.pid("a") in own.pids()
            # the prefaulted RAM is charged to the guests' cgroup
            assert b.cgroup.usage_bytes() >= host.resident_bytes() // 2
            path = b.cgroup.path
        assert not path.exists()

    asyncio.run(main())


def test_specs_are_checked() -> None:
    with pytest.raises(ConfigError):
        GuestSpec("x", 8, "virtio", "idle")
    with pytest.raises(ConfigError, match=r"32 MiB is too small to run.*at least 33 MiB"):
        GuestSpec("x", 32, "virtio", "idle")  # exited at start: its kernel's 16 MiB is half
    for period in (float("inf"), float("nan"), -1.0, 0.0, 1e9):
        with pytest.raises(ConfigError, match="period_s"):
            GuestSpec("x", 64, "virtio", "idle", period_s=period)
    with pytest.raises(ConfigError):
        GuestSpec("x", 64, "carrier-pigeon", "idle")
    with pytest.raises(ConfigError):
        GuestSpec("a/b", 64, "virtio", "idle")
    with pytest.raises(ConfigError):
        LocalHost([GuestSpec("x", 64, "vmw", "idle")] * 2, budget_bytes=None)
    with pytest.raises(ConfigError, match="ram"):
        GuestSpec("x", 64, "virtio", "idle", ram="1g")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="whole 2 MiB"):
        GuestSpec("x", 65, "virtio", "idle", ram=RamKind.THP)
    assert GuestSpec("x", 64, "virtio", "idle", ram="thp").ram is RamKind.THP  # type: ignore[arg-type]


HugeHost = Callable[[RamKind, int], None]  # the huge_host fixture (conftest.py)


def test_a_host_not_set_up_for_huge_pages_is_refused_with_what_to_set(
        huge_host: HugeHost) -> None:
    pool = read_hugetlb_pool()  # the fixture's lock: no other test changes it meanwhile
    mib = 2 * (pool.available + 17)  # more than the pool has free, and a guest that runs

    async def main() -> None:
        async with LocalHost([GuestSpec("h", mib, "virtio", "idle", ram=RamKind.HUGETLB)],
                             budget_bytes=None):
            pass

    with pytest.raises(HostResourceError, match=r"nr_hugepages.*--setup-hugepages"):
        asyncio.run(main())


def test_a_hugetlb_pool_run_dry_mid_run_leaves_the_guests_running_on_what_they_have(
        huge_host: HugeHost) -> None:
    mib = 64
    huge_host(RamKind.HUGETLB, 2 * mib // 2)
    half = mib * MIB // PAGE_SIZE // 2
    nr = SYSFS / HUGETLB_DIR / "nr_hugepages"

    async def main() -> None:
        specs = [GuestSpec("v", mib, "virtio", "idle", prefault=True, period_s=0.2,
                           ram=RamKind.HUGETLB),
                 GuestSpec("b", mib, "vmw-batched", "idle", prefault=True, period_s=0.2,
                           ram=RamKind.HUGETLB)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert await host.wait_until(lambda s: all(map(_ok, s.values())), 30)
            for n in ("v", "b"):
                host.set_target(n, half)
            assert await host.wait_until(
                lambda s: all(v.balloon_pages == half for v in s.values()), 30)
            assert all(host.partial_huge_pages(n) == 0 for n in ("v", "b"))
            # someone else takes the pages the balloons gave back: the pool runs dry
            total = read_hugetlb_pool().total
            nr.write_text(str(total - read_hugetlb_pool().available))
            try:
                for n in ("v", "b"):
                    host.set_target(n, 0)
                await asyncio.sleep(2.0)
                snap = host.guests()
                for n, v in snap.items():
                    assert v.alive, n
                    assert "hugetlb" in (host.host_memory_error(n) or ""), n
                    assert host.counters_of(n)["readmit_unbacked_pages"] > 0, n
                # the frames stay in the balloon: the VMware driver keeps them, the virtio
                # device holds the deflates (the driver counts them in flight, not ballooned)
                assert snap["b"].balloon_pages > 0
                assert host.counters_of("v")["deflate_held"] > 0
                assert host.counters_of("v").get("deflated_pages", 0) < half
                assert host.counters_of("b")["error_busy"] > 0
                seen = {n: v.report_time for n, v in snap.items()}
                await asyncio.sleep(1.0)  # the guests keep stepping and reporting
                assert all((host.guests()[n].report_time or 0) > (t or 0)
                           for n, t in seen.items())
            finally:
                nr.write_text(str(total))  # memory is back
            assert await host.wait_until(
                lambda s: all(v.balloon_pages == 0 for v in s.values()), 30)
            for n in ("v", "b"):
                await host.control(n, "touch_free")
                check = await host.control(n, "verify")
                assert check["lost_pages"] == 0 and check["invariant_errors"] == []

    asyncio.run(main())


def test_deflate_on_oom_saves_a_growing_guest_over_the_real_transport() -> None:
    # a ramp grows into its balloon: the driver deflates on OOM (waiting for the host each
    # time, as Linux's tell_host does) instead of an OOM kill, and stays deflated
    async def main() -> None:
        spec = GuestSpec(name="g", mib=128, protocol="virtio",
                         workload="ramp:start=0.05,peak=0.6,file=0.02,rate=0.3,at=1")
        async with LocalHost([spec], budget_bytes=None) as host:
            host.set_target("g", 100 * MIB // PAGE_SIZE)
            grown = await host.wait_until(
                lambda s: s["g"].report is not None
                and s["g"].report.anon_bytes >= 70 * MIB, timeout_s=30.0)
            v = host.guests()["g"]
            assert grown, v
            assert v.report is not None and v.report.oom_kills == 0
            assert host.counters_of("g").get("deflated_pages", 0) > 0
            assert v.balloon_pages < v.target_pages  # it did not go back by itself

    asyncio.run(main())


def test_local_host_is_the_manager_backend() -> None:
    # report times are the host clock's when the STATUS arrived; the ESX sample rides along
    async def go() -> None:
        spec = GuestSpec("g", 64, "virtio", "steady", period_s=0.2)
        clock = ManualClock(100.0)
        async with LocalHost([spec], budget_bytes=None, clock=clock) as host:
            assert host.name == "local"
            assert await host.wait_until(lambda s: s["g"].report is not None, 20.0)
            st = host.guests()["g"]
            assert st.alive and st.ram_pages == spec.pages and st.report_time == 100.0
            assert st.active_sampled == 100 and 0 <= st.active_touched <= 100  # ESX sample
            clock.advance(5.0)
            assert host.guests()["g"].report_time == 100.0  # same report, same time
            assert await host.wait_until(lambda s: s["g"].report_time == 105.0, 20.0)
            assert host.set_target("g", 1024)
            assert await host.wait_until(lambda s: s["g"].balloon_pages == 1024, 20.0)
            st = host.guests()["g"]
            assert (st.target_pages, st.balloon_pages) == (1024, 1024)
            assert host.host_resident_bytes() == host.resident_bytes() > 0

    asyncio.run(go())


def test_a_hello_nested_past_the_recursion_limit_is_a_mismatch_not_an_exception() -> None:
    # found by `memballoon bench fuzz` (target hello): json.loads' RecursionError escaped
    # ``_hello`` (and ``_control_reply``) to the event loop
    want = {"v": 1, "guest": "g", "protocol": "virtio", "pages": 4096, "pid": 7}
    deep = b"[" * 100_000 + b"]" * 100_000
    assert peer_json_object(deep) is None and not hello_matches(deep, want)
    assert hello_matches(json.dumps(want).encode(), want)
    assert not hello_matches(json.dumps({**want, "pages": 4097}).encode(), want)
    assert not hello_matches(b"[1, 2]", want) and not hello_matches(b"\xff", want)
    assert peer_json_object(b'{"ok": true}') == {"ok": True}


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.sampled_from(["v", "guest", "protocol", "pages", "pid"])
                                       | st.text(max_size=4), kids, max_size=5), max_leaves=10)


# fuzz property (the long form: `memballoon bench fuzz --target hello`)
@settings(max_examples=200)
@given(_json.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=64)
       | st.integers(1, 5000).map(lambda d: b"{\"v\": " + b"[" * d + b"]" * d + b"}"))
def test_any_hello_is_matched_or_not_never_raised(payload: bytes) -> None:
    want = {"v": 1, "guest": "g", "protocol": "virtio", "pages": 4096, "pid": 7}
    doc = peer_json_object(payload)
    assert doc is None or isinstance(doc, dict)
    assert hello_matches(payload, want) == (doc is not None and all(
        doc.get(k) == v for k, v in want.items()))


# ------------------------------------------------------------------ confinement (issue 11 item 2)
#: A guest that reports where it is from its first statement, then tries what a hostile guest
#: would against the others, its own RAM and the host, and leaves a child behind (stderr: JSON).
PROBE = textwrap.dedent('''
    import os
    first = {"cgroup": open("/proc/self/cgroup").read(), "ids": os.getresuid()}
    import argparse, errno, fcntl, json, socket, sys, time
    from memballoon.local.guest_main import add_arguments
    from memballoon.protocol.wire import Kind, encode

    def err(f):
        try:
            f()
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "ok"

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(sys.argv[1:])
    sock = socket.socket(fileno=a.sock_fd)
    hello = {"v": 1, "guest": a.name, "protocol": a.protocol, "pages": a.pages,
             "pid": os.getpid()}
    sock.sendall(encode(Kind.HELLO, json.dumps(hello).encode()))
    other = None
    while other is None:  # the other guest, by its command line (world-readable)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                continue
            if b"memballoon.local.guest_main" in argv and b"--name" in argv \\
                    and argv[argv.index(b"--name") + 1] == b"a":
                other = (int(pid), int(argv[argv.index(b"--mem-fd") + 1]))
        time.sleep(0.05)
    time.sleep(1.0)  # past its start-up
    opid, ofd = other
    host = os.getppid()
    got = dict(first, other_pid=opid,
               other_memfd=err(lambda: os.open(f"/proc/{opid}/fd/{ofd}", os.O_RDWR)),
               host_fds=err(lambda: os.listdir(f"/proc/{host}/fd")),
               signal_other=err(lambda: os.kill(opid, 0)),
               shrink=err(lambda: os.ftruncate(a.mem_fd, 0)),
               grow=err(lambda: os.ftruncate(a.mem_fd, a.pages * 8192)),
               unseal=err(lambda: fcntl.fcntl(a.mem_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)))
    child = os.fork()
    if child == 0:
        os.setsid()  # out of the guest's process group, as a child hiding from its kill
        time.sleep(600)
        os._exit(0)
    got["child"] = child
    sys.stderr.write(json.dumps(got) + "\\n")
    sys.stderr.flush()
    while True:
        time.sleep(1)
''')


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


async def _probe_report(err: Path, host: LocalHost) -> dict[str, object]:
    ok = await host.wait_until(lambda s: b"child" in err.read_bytes(), 30)
    assert ok, err.read_text()
    return dict(json.loads(err.read_text().strip().splitlines()[-1]))


@pytest.mark.skipif(os.geteuid() != 0 or not detect().usable,
                    reason="needs root and a memory cgroup")
def test_a_guest_is_confined_from_its_first_instruction_and_cannot_reach_the_others(
        tmp_path: Path) -> None:
    err = tmp_path / "probe.err"

    async def main() -> None:
        specs = [GuestSpec("a", MIB_GUEST, "virtio", "idle", prefault=True, period_s=0.2),
                 GuestSpec("b", MIB_GUEST, "virtio", "idle",
                           program=(sys.executable, "-c", PROBE))]
        with err.open("wb") as f:
            async with LocalHost(specs, budget_bytes=1024 * MIB, guest_stderr=f.fileno()) as host:
                assert "guests confined" in host.confinement, host.confinement
                assert host.counters["guests_unconfined"] == 0
                got = await _probe_report(err, host)
                cg_b = host.guest_cgroup("b")
                assert cg_b is not None and host.budget is not None \
                    and host.budget.cgroup is not None
                # in its own cgroup, inside the budget's, and as its own uid, from the start
                rel = "/" + str(cg_b.path.relative_to(cg_b.root))
                assert f":memory:{rel}\n" in str(got["cgroup"]), got["cgroup"]
                uid_b = host.guest_uid("b")
                assert uid_b is not None and uid_b != 0 and got["ids"] == [uid_b] * 3
                assert host.guest_uid("a") not in (None, 0, uid_b)
                # another guest's memfd, the host's fds, signals: refused
                assert got["other_pid"] == host.pid("a")
                assert got["other_memfd"] == "EACCES" and got["host_fds"] == "EACCES"
                assert got["signal_other"] == "EPERM"
                # its own RAM cannot be resized, nor its seals changed
                assert got["shrink"] == got["grow"] == got["unseal"] == "EPERM"
                # memballoon's guest made itself non-dumpable: its /proc files are root's
                a_pid = host.pid("a")
                assert a_pid is not None and os.stat(f"/proc/{a_pid}/fd").st_uid == 0
                assert f"Uid:\t{host.guest_uid('a')}" in Path(f"/proc/{a_pid}/status").read_text()
                # the guest dies: the child it hid in a session of its own dies with it
                child = int(str(got["child"]))
                assert not _gone(child) and child in cg_b.pids()
                b_pid = host.pid("b")
                assert b_pid is not None
                os.kill(b_pid, signal.SIGKILL)
                assert await host.wait_until(lambda s: not s["b"].alive, 10)
                assert await host.wait_until(lambda s: _gone(child), 10)
                assert await host.wait_until(lambda s: not cg_b.path.exists(), 10)
                assert host.counters_of("b")["guest_procs_killed"] >= 1
                assert host.guests()["a"].alive  # the other goes on, its balloon served
                await _inflate_deflate_other(host, "a")

    asyncio.run(main())


def test_unconfined_guests_are_said_once_and_counted_and_their_group_is_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root and no cgroup (simulated where we are root): what is not confined is said once,
    each guest counted, and a dead guest's process group killed."""
    from memballoon.host import cgroup
    from memballoon.local import host as host_mod

    monkeypatch.setattr(host_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host_mod, "detect", lambda: cgroup.CgroupSupport(
        cgroup.Hierarchy.NONE, None, False, "no memory cgroup is mounted"))
    err = tmp_path / "probe.err"
    script = PROBE.replace("os.setsid()  #", "pass  #")  # the child stays in the group

    async def main() -> None:
        specs = [GuestSpec("a", MIB_GUEST, "virtio", "idle"),
                 GuestSpec("b", MIB_GUEST, "virtio", "idle",
                           program=(sys.executable, "-c", script))]
        with err.open("wb") as f:
            async with LocalHost(specs, budget_bytes=None, guest_stderr=f.fileno()) as host:
                assert host.confinement.startswith("guests NOT confined: ")
                assert "no private uid (not root)" in host.confinement
                assert "no cgroup of their own" in host.confinement
                assert host.counters["guests_unconfined"] == 2
                assert host.guest_cgroup("b") is None and host.guest_uid("b") is None
                got = await _probe_report(err, host)
                child = int(str(got["child"]))
                b_pid = host.pid("b")
                assert b_pid is not None and not _gone(child)
                os.kill(b_pid, signal.SIGKILL)
                assert await host.wait_until(lambda s: _gone(child), 10)

    asyncio.run(main())


@pytest.mark.skipif(not detect().usable, reason="needs root and a memory cgroup")
def test_a_stale_cgroup_of_a_dead_daemon_is_removed_at_start() -> None:
    dead = subprocess.Popen(["true"])  # a pid that is no more
    dead.wait()
    root = detect().root
    assert root is not None
    stale = root / f"memballoon-{dead.pid}-dead"
    stale.mkdir()
    (stale / "guest-x").mkdir()

    async def main() -> None:
        async with LocalHost([GuestSpec("a", MIB_GUEST, "virtio", "idle")],
                             budget_bytes=None) as host:
            assert str(stale) in host.stale_cgroups.removed
            assert not stale.exists()

    try:
        asyncio.run(main())
    finally:
        for d in (stale / "guest-x", stale):
            if d.exists():
                d.rmdir()


def test_a_vmw_guest_that_cannot_be_answered_raises_nothing_in_the_host(tmp_path: Path) -> None:
    # issue 11: a send failing during a VMware reply killed the guest, then the host went on
    # with the reply's after-work on the dead guest's RAM (an exception in its dispatch)
    async def main() -> None:
        async with LocalHost([_hostile(tmp_path, "deaf", "deaf_vmw", "vmw-batched")],
                             budget_bytes=None) as host:
            host.set_target("deaf", 2048)
            assert await host.wait_until(lambda s: not s["deaf"].alive, 30)
            c = host.counters_of("deaf")
            assert c["died_send_failed"] == 1
            assert not [k for k in c if k.startswith("error_")], c

    asyncio.run(main())


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_guest_dead_during_a_config_push_leaves_no_fd_and_no_mapping(tmp_path: Path) -> None:
    # issue 11: a guest that died while the host pushed it a config change left its memfd and
    # the host's mapping of it open for good (the device's view was still on the stack)
    async def main() -> None:
        await asyncio.sleep(0)
        before = _fds()
        async with LocalHost([_hostile(tmp_path, "deaf", "deaf")], budget_bytes=None) as host:
            assert await host.wait_until(
                lambda s: host.counters_of("deaf").get("bye_received", 0) == 1, 10)
            assert _fds() > before
            host.set_target("deaf", 1000)  # its config push cannot be sent: it dies under it
            assert not host.guests()["deaf"].alive
            await asyncio.sleep(0.1)  # a turn of the loop
            assert host.counters_of("deaf")["died_send_failed"] == 1
            assert _fds() == before
            assert "memballoon-deaf" not in Path("/proc/self/maps").read_text()
            assert host.ram("deaf").closed
        assert host.counters["ram_close_deferred"] == 0

    asyncio.run(main())


def test_a_flooding_guest_is_throttled_and_the_others_keep_being_served(tmp_path: Path) -> None:
    # issue 11: a backlog of doorbells, each finding a fresh round of 128 chains of 128
    # descriptors, froze the host's loop (40+ s) and slowed another guest's inflate 100-fold
    async def main() -> None:
        specs = [_hostile(tmp_path, "evil", "storm"),
                 GuestSpec("good", MIB_GUEST, "virtio", "idle", prefault=True)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert await host.wait_until(lambda s: _ok(s["good"]), 30)
            assert await host.wait_until(
                lambda s: host.counters_of("evil").get("throttled", 0) >= 2, 30)
            await _inflate_deflate_other(host, "good")
            evil, good = host.work_of("evil"), host.work_of("good")
            lim = WorkLimits.for_guest(MIB_GUEST * MIB // PAGE_SIZE)
            chain_bytes = MAX_PFN_BUFFER_BYTES + 16 * 128
            assert evil["max_turn_chains"] <= lim.turn_chains
            assert evil["max_turn_bytes"] <= lim.turn_bytes + CHUNK_CHAINS * chain_bytes
            # a period's share, never more (one chunk of slack at the period's edge)
            assert evil["chains"] <= evil["periods"] * lim.period_chains + CHUNK_CHAINS
            assert evil["bytes"] <= evil["periods"] * (lim.period_bytes
                                                       + CHUNK_CHAINS * chain_bytes)
            assert host.counters_of("evil")["turns_cut"] > 0
            assert "throttled" not in host.counters_of("good")
            assert good["chains"] > 0 and host.guests()["evil"].alive

    asyncio.run(main())


def test_a_dead_guest_restarts_afresh_and_is_served() -> None:
    async def main() -> None:
        specs = [GuestSpec("g", 64, "virtio", "idle", prefault=True)]
        async with LocalHost(specs, budget_bytes=None) as host:
            assert await host.wait_until(lambda s: _ok(s["g"]), 30)
            with pytest.raises(UsageError):
                await host.restart("g")  # alive
            first = host.pid("g")
            assert first is not None
            os.kill(first, signal.SIGKILL)
            assert await host.wait_until(lambda s: not s["g"].alive, 10)
            assert await host.restart("g")
            assert host.pid("g") != first and host.guests()["g"].alive
            assert host.set_target("g", 2048)
            assert await host.wait_until(lambda s: s["g"].balloon_pages == 2048, 20)
            assert (await host.control("g", "verify"))["lost_pages"] == 0

    asyncio.run(main())


def test_a_child_is_signalled_without_being_reaped_under_the_watcher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``signal_child`` goes around ``Popen.send_signal``, whose poll (``waitpid``) can reap a
    just-dead guest under asyncio's child watcher (which then logs "Unknown child process pid"
    and reports 255): the watcher alone reaps, and sees the signal."""
    polled: list[int] = []
    real = subprocess.Popen.send_signal

    def send_signal(self: subprocess.Popen[bytes], sig: int) -> None:
        polled.append(sig)
        real(self, sig)

    monkeypatch.setattr(subprocess.Popen, "send_signal", send_signal)

    async def run() -> int:
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        signal_child(proc, signal.SIGKILL)
        rc = await asyncio.wait_for(proc.wait(), 10)
        signal_child(proc, signal.SIGKILL)  # reaped: nothing to signal, nothing raised
        return rc

    assert asyncio.run(run()) == -signal.SIGKILL
    assert polled == []
