"""Split virtqueues: layout, driver/device round trips (the harness's queue pair, checked after
every step), wrap-around, hostile rings."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memballoon.harness.pair import QueuePair, queue_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.model.errors import DescriptorError, GuestAddressError, PeerError, UsageError
from memballoon.protocol import virtqueue
from memballoon.protocol.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    DeviceQueue,
    GuestRamView,
    QueueLayout,
    avail_ring_bytes,
    complete_rounds,
    desc_table_bytes,
    used_ring_bytes,
)

BASE = 0x10000
GUEST = 1 << 24  # 16 MiB guest
DATA = BASE + 0x8000  # buffers the chains point at


def make_view(size: int = 0x10000) -> GuestRamView:
    return GuestRamView(bytearray(size), base_gpa=BASE, guest_bytes=GUEST)


def make_pair(size: int = 8, *, start: int = 0, indirect: bool = False) -> QueuePair:
    """The harness's queue pair: both ends of a queue of ``size`` packed at BASE."""
    return queue_pair(make_view(), BASE, size, start_index=start, indirect=indirect)


def write_desc(view: GuestRamView, table: int, i: int, addr: int, n: int, flags: int, nxt: int):
    view.write(table + 16 * i, struct.pack("<QIHH", addr, n, flags, nxt))


def make_avail(view: GuestRamView, layout: QueueLayout, heads: list[int], idx: int) -> None:
    for k, h in enumerate(heads):
        view.write_u16(layout.avail_gpa + 4 + 2 * (k % layout.size), h)
    view.write_u16(layout.avail_gpa + 2, idx)


# ---------------------------------------------------------------- GuestRamView
def test_view_reads_and_writes_inside_its_window() -> None:
    v = make_view(0x1000)
    v.write(BASE + 8, b"abc")
    assert v.read(BASE + 8, 3) == b"abc"
    v.write_u16(BASE, 0x1234)
    assert v.read(BASE, 2) == b"\x34\x12"
    assert v.read_u16(BASE) == 0x1234


def test_ring_indices_are_single_16_bit_accesses(monkeypatch: pytest.MonkeyPatch) -> None:
    # struct's "<H" reads and writes byte by byte: a peer on another CPU could see a torn
    # index (0x00FF -> 0x0100 read as 0x0000 or 0x01FF). Aligned indices must not use it.
    import memballoon.protocol.virtqueue as vq

    class Bytewise:
        def unpack_from(self, *a: object) -> None:
            raise AssertionError("aligned u16 read went bytewise")

        def pack_into(self, *a: object) -> None:
            raise AssertionError("aligned u16 write went bytewise")

    v = make_view(0x1000)
    monkeypatch.setattr(vq, "_U16S", Bytewise())
    v.write_u16(BASE + 2, 0x0100)
    assert v.read_u16(BASE + 2) == 0x0100 and v.read(BASE + 2, 2) == b"\x00\x01"
    monkeypatch.undo()
    v.write_u16(BASE + 5, 0xBEEF)  # misaligned (a hostile layout): still correct, bytewise
    assert v.read_u16(BASE + 5) == 0xBEEF


@pytest.mark.parametrize(
    ("gpa", "n"), [(-1, 1), (GUEST - 1, 2), (GUEST, 0), (0, -1), (BASE - 1, 2), (BASE + 0x1000, 1)]
)
def test_view_rejects_outside_guest_or_unmapped(gpa: int, n: int) -> None:
    v = make_view(0x1000)
    with pytest.raises(GuestAddressError):
        v.read(gpa, n)
    if n > 0:
        with pytest.raises(GuestAddressError):
            v.write(gpa, b"\0" * n)


def test_view_check_guest_accepts_unmapped_guest_memory() -> None:
    v = make_view(0x1000)
    v.check_guest(GUEST - 4096, 4096)  # inside the guest, not in the window: fine
    with pytest.raises(GuestAddressError):
        v.check_guest(GUEST - 4096, 4097)


def test_view_needs_a_writable_buffer_inside_the_guest() -> None:
    with pytest.raises(UsageError):
        GuestRamView(bytes(16), base_gpa=0, guest_bytes=4096)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        GuestRamView(bytearray(16), base_gpa=4090, guest_bytes=4096)


# ---------------------------------------------------------------- layout
def test_packed_layout_sizes_and_alignment() -> None:
    lay = QueueLayout.packed(0x1000, 128)
    assert lay.avail_gpa == 0x1000 + desc_table_bytes(128) == 0x1000 + 2048
    assert lay.used_gpa % 4 == 0 and lay.used_gpa >= lay.avail_gpa + avail_ring_bytes(128)
    assert lay.end_gpa == lay.used_gpa + used_ring_bytes(128)
    assert desc_table_bytes(1) == 16 and avail_ring_bytes(4) == 14 and used_ring_bytes(4) == 38


@pytest.mark.parametrize("size", [0, 3, 12, VIRTQ_MAX_SIZE * 2])
def test_layout_size_must_be_power_of_two_up_to_32768(size: int) -> None:
    with pytest.raises(DescriptorError):
        QueueLayout(size, 0, 16 * max(size, 1), 0x100000).check_shape()


def test_layout_alignment_checked() -> None:
    with pytest.raises(DescriptorError):
        QueueLayout(4, 8, 0x100, 0x200).check_shape()  # table not 16-aligned
    with pytest.raises(DescriptorError):
        QueueLayout(4, 0, 0x101, 0x200).check_shape()
    with pytest.raises(DescriptorError):
        QueueLayout(4, 0, 0x100, 0x202).check_shape()
    with pytest.raises(GuestAddressError):
        QueueLayout.packed(BASE + 0x10000, 4).check(make_view())  # not mapped


# ---------------------------------------------------------------- round trips
def test_chain_round_trip() -> None:
    q = make_pair()
    view, drv, dev = q.view, q.driver, q.device
    view.write(DATA, b"hello")
    head = drv.add([(DATA, 5, False), (DATA + 64, 3, True)])
    assert dev.pending() == 0  # not published yet
    assert q.check() == []
    drv.publish()
    assert q.check() == []
    chain = dev.pop()
    assert chain is not None and chain.head == head
    assert q.check() == []
    assert chain.readable == [(DATA, 5)] and chain.writable == [(DATA + 64, 3)]
    assert chain.read_all(view, 100) == b"hello"
    assert chain.write_all(view, b"xyz") == 3
    dev.push_used(chain.head, 3)
    assert q.check() == []
    assert dev.pop() is None
    assert drv.collect()[0].head == head
    assert q.check() == []
    assert view.read(DATA + 64, 3) == b"xyz"
    assert drv.num_free == 8 and drv.in_flight == 0


def test_driver_runs_out_of_descriptors() -> None:
    q = make_pair(4)
    drv = q.driver
    drv.add([(DATA, 1, False)] * 3)
    with pytest.raises(UsageError):
        drv.add([(DATA, 1, False)] * 2)
    with pytest.raises(UsageError):
        drv.add([])
    with pytest.raises(UsageError):
        drv.add([(DATA, 1, True), (DATA, 1, False)])  # readable after writable


bufs_st = st.lists(
    st.tuples(st.integers(0, 0x7FF), st.integers(0, 64), st.booleans()), min_size=1, max_size=4
).map(lambda bs: sorted(((DATA + a, n, w) for a, n, w in bs), key=lambda b: b[2]))


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 0xFFFF),
    size=st.sampled_from([4, 8, 16]),
    rounds=st.lists(st.lists(bufs_st, min_size=1, max_size=4), min_size=1, max_size=12),
)
def test_random_legal_chains_round_trip_across_wrap(
    start: int, size: int, rounds: list[list[list[tuple[int, int, bool]]]]
) -> None:
    q = make_pair(size, start=(start | 0xFFF0) if start % 2 else start)
    drv, dev = q.driver, q.device
    for batch in rounds:
        heads = {}
        for bufs in batch:
            if drv.num_free < len(bufs):
                break
            heads[drv.add(bufs)] = bufs
        drv.publish()
        assert q.check() == []
        got = []
        while (chain := dev.pop()) is not None:
            want = heads[chain.head]
            assert chain.readable == [(a, n) for a, n, w in want if not w]
            assert chain.writable == [(a, n) for a, n, w in want if w]
            got.append(chain.head)
            assert q.check() == []
        assert sorted(got) == sorted(heads)
        for h in reversed(got):  # out of order completion is legal
            dev.push_used(h, sum(n for _, n, w in heads[h] if w))
            assert q.check() == []
        used = drv.collect()
        assert q.check() == []
        assert [u.head for u in used] == list(reversed(got))
        assert drv.num_free == size and drv.in_flight == 0


long_bufs_st = st.lists(
    st.tuples(st.integers(0, 0x7FF), st.integers(0, 64), st.booleans()), min_size=1, max_size=24
).map(lambda bs: sorted(((DATA + a, n, w) for a, n, w in bs), key=lambda b: b[2]))


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 0xFFFF), size=st.sampled_from([32, 64]),
       rounds=st.lists(st.lists(long_bufs_st, min_size=1, max_size=3), min_size=1, max_size=6))
def test_long_chains_written_as_one_array_end_as_buffer_by_buffer(
        start: int, size: int, rounds: list[list[list[tuple[int, int, bool]]]]) -> None:
    # a chain of _ADD_ARRAY_MIN buffers or more (a free page report) is written in one array
    # write: both ends and the rings' guest memory end as with a struct write per buffer
    one, bulk = make_pair(size, start=start), make_pair(size, start=start)
    for batch in rounds:
        for q in (one, bulk):
            saved = virtqueue._ADD_ARRAY_MIN
            if q is one:
                virtqueue._ADD_ARRAY_MIN = 1 << 30  # never the array path
            try:
                for bufs in batch:
                    if q.driver.num_free >= len(bufs):
                        q.driver.add(bufs)
            finally:
                virtqueue._ADD_ARRAY_MIN = saved
            q.driver.publish()
            while (chain := q.device.pop()) is not None:
                q.device.push_used(chain.head, chain.writable_bytes)
            q.driver.collect()
        assert state_diff(state_of(one), state_of(bulk)) == []
        assert bulk.check() == []


# ---------------------------------------------------------------- hostile rings
def test_loop_in_chain_is_rejected() -> None:
    q = make_pair(4)
    view, dev = q.view, q.device
    t = dev.layout.desc_gpa
    write_desc(view, t, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    write_desc(view, t, 1, DATA, 4, VIRTQ_DESC_F_NEXT, 0)
    make_avail(view, dev.layout, [0], 1)
    with pytest.raises(DescriptorError, match="loops"):
        dev.pop()
    assert dev.failed_head == 0  # the caller can return it used


def test_head_and_next_out_of_range() -> None:
    q = make_pair(4)
    view, dev = q.view, q.device
    t = dev.layout.desc_gpa
    write_desc(view, t, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 9)
    make_avail(view, dev.layout, [7, 0], 2)
    with pytest.raises(DescriptorError, match="head index"):
        dev.pop()
    assert dev.failed_head is None
    with pytest.raises(DescriptorError, match="out of range"):
        dev.pop()


def test_buffer_outside_guest() -> None:
    q = make_pair(4)
    view, dev = q.view, q.device
    write_desc(view, dev.layout.desc_gpa, 0, GUEST - 8, 16, 0, 0)
    make_avail(view, dev.layout, [0], 1)
    with pytest.raises(GuestAddressError):
        dev.pop()


def test_direction_checked_for_the_queue_use() -> None:
    view = make_view()
    lay = QueueLayout.packed(BASE, 4)
    out_only = DeviceQueue(view, lay, writable=False)
    write_desc(view, lay.desc_gpa, 0, DATA, 4, VIRTQ_DESC_F_WRITE, 0)
    make_avail(view, lay, [0], 1)
    with pytest.raises(DescriptorError, match="writable"):
        out_only.pop()
    in_only = DeviceQueue(view, lay, readable=False)
    write_desc(view, lay.desc_gpa, 0, DATA, 4, 0, 0)
    with pytest.raises(DescriptorError, match="readable"):
        in_only.pop()


def test_indirect_only_when_negotiated() -> None:
    q = make_pair(4)
    view, dev = q.view, q.device
    table = DATA + 0x100
    write_desc(view, table, 0, DATA, 8, VIRTQ_DESC_F_NEXT, 1)
    write_desc(view, table, 1, DATA + 8, 8, VIRTQ_DESC_F_WRITE, 0)
    write_desc(view, dev.layout.desc_gpa, 0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    make_avail(view, dev.layout, [0, 0], 2)
    with pytest.raises(DescriptorError, match="INDIRECT"):
        dev.pop()
    dev.indirect = True
    chain = dev.pop()
    assert chain is not None
    assert chain.readable == [(DATA, 8)] and chain.writable == [(DATA + 8, 8)]


def test_indirect_with_next_or_nested_is_rejected() -> None:
    q = make_pair(4, indirect=True)
    view, dev = q.view, q.device
    table = DATA + 0x100
    write_desc(view, table, 0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    write_desc(view, dev.layout.desc_gpa, 0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    write_desc(view, dev.layout.desc_gpa, 1, table, 16, VIRTQ_DESC_F_INDIRECT | 1, 0)
    make_avail(view, dev.layout, [0, 1], 2)
    with pytest.raises(DescriptorError, match="nested"):
        dev.pop()
    with pytest.raises(DescriptorError, match="NEXT"):
        dev.pop()


def test_avail_idx_running_ahead_breaks_the_queue() -> None:
    q = make_pair(4)
    view, dev = q.view, q.device
    view.write_u16(dev.layout.avail_gpa + 2, 5)
    with pytest.raises(DescriptorError, match=r"avail\.idx"):
        dev.pop()
    assert dev.broken


def test_driver_survives_a_hostile_used_ring() -> None:
    q = make_pair(4)
    view, drv, dev = q.view, q.driver, q.device
    h = drv.add([(DATA, 4, True)])
    drv.publish()
    assert dev.pop() is not None
    # the device returns an id it was never given, then a too-long length for the real one
    view.write(dev.layout.used_gpa + 4, struct.pack("<II", 3, 0))
    view.write(dev.layout.used_gpa + 12, struct.pack("<II", h, 999))
    view.write_u16(dev.layout.used_gpa + 2, 2)
    with pytest.raises(DescriptorError):  # 2 used with 1 in flight: the ring lies
        drv.collect()
    assert drv.broken and drv.counters["used_idx_jump"] == 1
    assert drv.collect() == []

    q = make_pair(4)
    view, drv, dev = q.view, q.driver, q.device
    h1 = drv.add([(DATA, 4, True)])
    drv.add([(DATA, 4, True)])
    drv.publish()
    view.write(dev.layout.used_gpa + 4, struct.pack("<II", 3, 0))
    view.write(dev.layout.used_gpa + 12, struct.pack("<II", h1, 999))
    view.write_u16(dev.layout.used_gpa + 2, 2)
    used = drv.collect()
    assert [(u.head, u.length) for u in used] == [(h1, 4)]  # clamped to what it could write
    assert drv.counters["used_unknown_head"] == 1 and drv.counters["used_len_too_long"] == 1


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8, 16]),
    table=st.binary(min_size=256, max_size=256),
    ring=st.binary(min_size=40, max_size=40),
    indirect=st.booleans(),
    writable=st.booleans(),
    start=st.integers(0, 0xFFFF),
    blob=st.binary(min_size=0, max_size=512),
)
def test_hostile_descriptor_tables_raise_only_peer_errors(
    size: int,
    table: bytes,
    ring: bytes,
    indirect: bool,
    writable: bool,
    start: int,
    blob: bytes,
) -> None:
    view = make_view()
    lay = QueueLayout.packed(BASE, size)
    dev = DeviceQueue(view, lay, indirect=indirect, writable=writable, start_index=start)
    view.write(lay.desc_gpa, table[: 16 * size])
    view.write(lay.avail_gpa, ring[: 6 + 2 * size])
    view.write(DATA, blob)  # indirect tables may point here
    for _ in range(size + 2):
        try:
            chain = dev.pop()
        except PeerError:
            if dev.broken:
                break
            continue
        if chain is None:
            break
        for gpa, n in chain.readable + chain.writable:
            assert gpa >= 0 and gpa + n <= GUEST
        dev.push_used(chain.head, 0)


# fuzz property (the long form: `memballoon bench fuzz --target virtqueue_used`)
@settings(max_examples=100, deadline=None)
@given(size=st.sampled_from([1, 2, 4, 8]), start=st.integers(0, 0xFFFF),
       rounds=st.lists(st.tuples(st.lists(st.integers(1, 64), max_size=4),
                                 st.binary(min_size=4, max_size=4 + 8 * 8)), max_size=4))
def test_hostile_used_rings_give_the_driver_only_chains_it_has_in_flight(
        size: int, start: int, rounds: list[tuple[list[int], bytes]]) -> None:
    q = make_pair(size, start=start)
    view, drv = q.view, q.driver
    flight: dict[int, int] = {}
    for lengths, used in rounds:
        for n in lengths[: drv.num_free]:
            flight[drv.add([(DATA, n, True)])] = n
        drv.publish()
        view.write(q.device.layout.used_gpa + 2, used[: 2 + 8 * size])  # idx, then entries
        try:
            got = drv.collect()
        except DescriptorError:
            assert drv.broken and drv.collect() == []
            return
        for u in got:
            assert 0 <= u.length <= flight.pop(u.head)  # in flight, and no more than it gave
        assert drv.in_flight == len(flight) and drv.num_free + len(flight) == size


# ---------------------------------------------------------------- rounds in bulk
chain_shapes = st.lists(st.lists(st.booleans(), min_size=1, max_size=3).map(sorted),
                        min_size=1, max_size=4)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 0xFFFF), st.sampled_from([4, 8, 16, 128]), chain_shapes, st.integers(1, 200),
       st.integers(0, 3))
def test_complete_rounds_ends_where_honest_round_trips_end(
        start: int, size: int, shapes: list[list[bool]], rounds: int, warmup: int) -> None:
    # the simulator's bulk path: both ends, the free list and the rings' guest memory as that
    # many add/publish/pop/push_used/collect round trips leave them (across the 16-bit wrap;
    # rounds past a ring of slots, which the bulk path skips to their indices and free list)
    chains = [[(DATA + 0x100 * i + 0x10 * j, 8 + j, w) for j, w in enumerate(shape)]
              for i, shape in enumerate(shapes)]
    if sum(map(len, chains)) > size:
        return
    lengths = [sum(n for _, n, w in c if w) for c in chains]
    honest, bulk = make_pair(size, start=start), make_pair(size, start=start)

    def round_trip(q: QueuePair) -> None:
        length_of = {q.driver.add(bufs): n for bufs, n in zip(chains, lengths, strict=True)}
        q.driver.publish()
        while (chain := q.device.pop()) is not None:
            q.device.push_used(chain.head, length_of[chain.head])
        q.driver.collect()

    for q in (honest, bulk):
        for _ in range(warmup):
            round_trip(q)
    for _ in range(rounds):
        round_trip(honest)
    complete_rounds(bulk.driver, bulk.device, chains, lengths, rounds)
    assert state_diff(state_of(honest), state_of(bulk)) == []
    assert bulk.check() == []


def test_complete_rounds_refuses_queues_in_use() -> None:
    q = make_pair(8)
    q.driver.add([(DATA, 8, False)])
    with pytest.raises(UsageError, match="in flight"):
        complete_rounds(q.driver, q.device, [[(DATA, 8, False)]], [0], 1)
    q2 = make_pair(8)
    with pytest.raises(UsageError, match="bad chains"):
        complete_rounds(q2.driver, q2.device, [[(DATA, 8, False)] * 9], [0], 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 0xFFFF), st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_take_known_ends_where_pop_ends(start: int, lens: list[int]) -> None:
    # the simulator's bulk report: the chain a driver in this process just published, taken
    # without its walk, leaves the device's end as pop leaves it (then the same used entry)
    honest, bulk = make_pair(8, start=start), make_pair(8, start=start)
    for n in lens:
        bufs = [(DATA + 0x100 * j, 16, True) for j in range(n)]
        for q in (honest, bulk):
            head = q.driver.add(bufs)
            q.driver.publish()
            if q is honest:
                chain = q.device.pop()
                assert chain is not None and chain.head == head
            else:
                assert q.device.take_known(head, n)
            q.device.push_used(head, 0)
            q.driver.collect()
        assert state_diff(state_of(honest), state_of(bulk)) == []
        assert bulk.check() == []


def test_take_known_takes_only_the_one_chain_available() -> None:
    q = make_pair(8)
    assert not q.device.take_known(0, 1)  # nothing available
    a = q.driver.add([(DATA, 8, True)])
    b = q.driver.add([(DATA + 8, 8, True)])
    q.driver.publish()
    assert not q.device.take_known(a, 1)  # two available: the device walks them
    chain = q.device.pop()
    assert chain is not None and chain.head == a
    assert not q.device.take_known(a, 1)  # the one available is another head
    assert q.device.take_known(b, 1) and q.device.pending() == 0
    q.device.broken = True
    assert not q.device.take_known(b, 1)


@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377])
def test_complete_rounds_plans_are_reused_across_numbers_of_rounds(rounds: int) -> None:
    # a plan is cached by the rounds' class (past a ring's worth, the permutation's period):
    # the same chains at many numbers of rounds, one after another on the same queues
    chains = [[(DATA, 16, False), (DATA + 0x40, 4, True)], [(DATA + 0x80, 8, False)],
              [(DATA + 0x100, 8, False), (DATA + 0x140, 2, True), (DATA + 0x180, 1, True)]]
    lengths = [4, 0, 3]
    honest, bulk = make_pair(16, start=0xFFF0), make_pair(16, start=0xFFF0)
    for r in (rounds, rounds + 7, 3 * rounds):
        for _ in range(r):
            length_of = {honest.driver.add(bufs): n for bufs, n in zip(chains, lengths,
                                                                       strict=True)}
            honest.driver.publish()
            while (chain := honest.device.pop()) is not None:
                honest.device.push_used(chain.head, length_of[chain.head])
            honest.driver.collect()
        complete_rounds(bulk.driver, bulk.device, chains, lengths, r)
        assert state_diff(state_of(honest), state_of(bulk)) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 0x7FFF), min_size=1, max_size=8),
                          st.integers(0, 4096), st.booleans()), min_size=1, max_size=12))
def test_add_uniform_adds_what_add_adds(chains: list[tuple[list[int], int, bool]]) -> None:
    # a free page report's chain: the same descriptors, ring slot, free list and chain in
    # flight as add of the list, short chains and long ones (the array write)
    listed, uniform = make_pair(8), make_pair(8)
    for offsets, length, w in chains:
        gpas = [DATA + 8 * o for o in offsets]
        head = listed.driver.add([(g, length, w) for g in gpas])
        assert uniform.driver.add_uniform(np.array(gpas, dtype=np.int64), length, w) == head
        for q in (listed, uniform):
            q.driver.publish()
            chain = q.device.pop()
            assert chain is not None and chain.head == head
            q.device.push_used(head, 0)
            assert [e.head for e in q.driver.collect()] == [head]
        assert state_diff(state_of(listed), state_of(uniform)) == []
