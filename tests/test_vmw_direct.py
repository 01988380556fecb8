"""The VMware driver and device in one process: commands as messages, not frames.

``VmwBalloonDevice.answer`` takes a request as the message its frame decodes to and gives the
response ``handle``'s reply frame decodes to; a driver whose port is a ``DirectBackdoor``
(the simulator's link, once the pair's tap offers ``answer``) sends its commands that way.
These tests hold the direct path to the frame path: the same answers, and the same guest,
driver, device and host state after any run, with refusals, resets, busy spells, rate
limits and 2 MiB pages.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.guest.vmw_driver import DirectBackdoor
from memballoon.guest.workload import Demand
from memballoon.harness.pair import BackdoorTap, VmwPair, check_pair, vmw_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.host.ram import NullRam
from memballoon.host.vmw_device import VmwBalloonDevice
from memballoon.model.units import PageState
from memballoon.protocol.vmw import (
    Capability,
    Command,
    Request,
    Response,
    batch_request,
    decode_response,
    encode_request,
    scalar_request,
)

SMALL = 16384  # 64 MiB


class DirectTap(BackdoorTap):
    """The pair's tap with ``answer``: the message straight to the device, unless tapped."""

    answered = 0  # commands answered as messages

    def answer(self, request: Request) -> Response | None:
        if self.tapped:
            return None
        self.answered += 1
        return self.device.answer(request)


class FramesTap(BackdoorTap):
    """The pair's tap that declines every message: each command goes as a frame."""

    def answer(self, request: Request) -> Response | None:
        return None


def _direct(pair: VmwPair) -> VmwPair:
    pair.port = pair.driver.port = DirectTap(pair.device)  # type: ignore[misc]
    return pair


def _frames(pair: VmwPair) -> VmwPair:
    pair.port = pair.driver.port = FramesTap(pair.device)  # type: ignore[misc]
    return pair


def _state(pair: VmwPair) -> object:
    """Everything the pair holds but the link itself."""
    drv = {k: v for k, v in vars(pair.driver).items() if k not in ("port", "cond_resched")}
    return state_of((pair.mem, pair.ram, pair.device, drv, pair.yields, pair.now))


_MODES = {"v2": {}, "batched": {"batched": True, "huge_pages": False},
          "2m": {"batched": True}}


def _pair(mode: str, direct: bool, swap: int) -> VmwPair:
    # a direct pair does not load through the frames: its START and GUEST_ID go direct too
    p = vmw_pair(SMALL, load=False, swap_pages=swap, **_MODES[mode])  # type: ignore[arg-type]
    _direct(p) if direct else _frames(p)
    p.driver.load(p.now)
    return p


class _FramesOnly:
    """A port that only carries frames (a real link)."""

    def call(self, request: bytes) -> bytes:
        return request


def test_a_direct_tap_is_a_direct_backdoor_and_a_link_of_frames_is_not() -> None:
    assert isinstance(DirectTap(VmwBalloonDevice(NullRam(SMALL))), DirectBackdoor)
    assert not isinstance(_FramesOnly(), DirectBackdoor)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(list(_MODES)),
    st.integers(0, 2**16),
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 0.95), st.floats(0.0, 0.6),
                       st.sampled_from(["none", "pinned", "busy", "reset", "slow", "defer"])),
             min_size=1, max_size=6),
    st.sampled_from([0, 3000]),
)
def test_a_direct_pair_ends_as_a_pair_of_frames(
        mode: str, seed: int, plan: list[tuple[int, float, float, str]], swap: int) -> None:
    # the same runs on a pair whose commands go as frames and on a direct one: after every
    # period the same guest (allocations, reclaim), driver (stats, rates, lists, target),
    # device (locked frames, counters, session) and host (released memory)
    frames, direct = _pair(mode, False, swap), _pair(mode, True, swap)
    rng = np.random.default_rng(seed)
    free = np.flatnonzero(frames.mem.state == PageState.FREE)
    pinned = np.sort(rng.choice(free, 40, replace=False))
    for periods, target, used, trouble in plan:
        demand = Demand(int(used * SMALL * 0.6), int(used * SMALL * 0.3), int(used * SMALL),
                        int(used * SMALL * 0.2), 0.02)
        for pair in (frames, direct):
            pair.set_target(int(target * SMALL))
            match trouble:
                case "pinned":
                    pair.device.set_pinned(pinned)
                case "busy":
                    pair.device.busy_next(2)
                case "reset":
                    pair.device.request_reset()
                case "slow":
                    pair.driver.slow_allocation_cycles = 3
                case "defer":  # the local host's: a batch's release waits for the next command
                    pair.device.defer_release = True
            for _ in range(periods):
                pair.now += 1.0
                pair.mem.step(pair.now, 1.0, demand)
                pair.driver.work(pair.now)
        assert state_diff(_state(frames), _state(direct)) == []
    direct.device.flush_release()
    assert check_pair(direct) == []
    assert isinstance(direct.port, DirectTap) and direct.port.answered >= 3  # START, ...
    assert direct.device.counters.total() == frames.device.counters.total()
    assert frames.driver.seed_stats.target == direct.driver.seed_stats.target > 0


def test_a_tapped_direct_pair_sends_every_command_as_a_frame() -> None:
    p = _direct(vmw_pair(SMALL, batched=True, load=False))
    p.port.log = []
    p.driver.load(p.now)
    p.set_target(SMALL // 2)
    p.driver.work(p.now)
    assert isinstance(p.port, DirectTap) and p.port.answered == 0
    cmds = p.port.commands()
    assert cmds[:3] == [Command.START, Command.GUEST_ID, Command.GET_TARGET]
    assert Command.BATCHED_2M_LOCK in cmds and p.driver.balloon_pages == SMALL // 2


_REQUESTS = st.one_of(
    st.builds(scalar_request, st.sampled_from([Command.GET_TARGET, Command.LOCK, Command.UNLOCK,
                                               Command.GUEST_ID]), st.integers(0, SMALL + 600)),
    st.builds(scalar_request, st.just(Command.START),
              st.sampled_from([2, int(Capability.BASIC_CMDS | Capability.BATCHED_CMDS),
                               int(Capability.BASIC_CMDS | Capability.BATCHED_CMDS
                                   | Capability.BATCHED_2M_CMDS)])),
    st.builds(batch_request, st.sampled_from([Command.BATCHED_LOCK, Command.BATCHED_UNLOCK]),
              st.lists(st.integers(0, SMALL + 600), max_size=40)),
    st.builds(batch_request, st.sampled_from([Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK]),
              st.lists(st.sampled_from([0, 512, 1024, 1536, 700, SMALL - 512, SMALL]),
                       max_size=8)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_REQUESTS, st.sampled_from(["", "target", "busy", "reset", "pin"]),
                          st.integers(0, SMALL)), max_size=30),
       st.booleans(), st.booleans())
def test_answer_is_the_reply_frame_decoded(
        steps: list[tuple[Request, str, int]], supports_2m: bool, defer: bool) -> None:
    # command by command, in any session state: answer(request) equals the decoded reply to
    # the request's frame, and both devices end in the same state
    devs = [VmwBalloonDevice(NullRam(SMALL), supports_2m=supports_2m, defer_release=defer)
            for _ in range(2)]
    for req, event, arg in steps:
        for dev in devs:
            match event:
                case "target":
                    dev.set_target(arg)
                case "busy":
                    dev.busy_next(1 + arg % 2)
                case "reset":
                    dev.request_reset()
                case "pin":
                    dev.set_pinned([arg % SMALL, (arg * 7) % SMALL])
        by_frame = decode_response(devs[0].handle(encode_request(req)), req)
        assert devs[1].answer(req) == by_frame
        assert state_diff(state_of(devs[0]), state_of(devs[1])) == []
