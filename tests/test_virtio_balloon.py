"""virtio-balloon constants, queue numbering, config space and stats codecs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memballoon.model.counters import Counters
from memballoon.model.errors import DeviceConfigError, StatsError
from memballoon.protocol import virtio_balloon as vb
from memballoon.protocol.virtio_balloon import (
    BalloonConfig,
    BalloonQueue,
    StatTag,
    decode_stats,
    encode_stats,
    features_of,
    queue_indices,
)

U32 = st.integers(0, 0xFFFF_FFFF)


def test_spec_constants() -> None:
    assert vb.VIRTIO_ID_BALLOON == 5
    assert (
        vb.VIRTIO_BALLOON_F_MUST_TELL_HOST,
        vb.VIRTIO_BALLOON_F_STATS_VQ,
        vb.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        vb.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        vb.VIRTIO_BALLOON_F_PAGE_POISON,
        vb.VIRTIO_BALLOON_F_REPORTING,
    ) == (0, 1, 2, 3, 4, 5)
    assert vb.VIRTIO_F_VERSION_1 == 32 and vb.VIRTIO_F_INDIRECT_DESC == 28
    assert vb.VIRTIO_BALLOON_PFN_SHIFT == 12
    assert vb.VIRTIO_BALLOON_ARRAY_PFNS_MAX == 256
    assert vb.VIRTIO_BALLOON_OOM_NR_PAGES == 256
    assert vb.VIRTIO_BALLOON_CMD_ID_STOP == 0 and vb.VIRTIO_BALLOON_CMD_ID_DONE == 1


def test_private_bits_clash_with_nothing() -> None:
    private = {vb.VIRTIO_BALLOON_X_F_HOST_REFUSE, vb.VIRTIO_BALLOON_X_F_HOST_RESET}
    assert private == {22, 23}
    upstream = set(range(0, 6)) | {6, 8}  # Linux balloon bits, crosvm's private ones
    assert not private & upstream
    assert all(b < 24 for b in private)  # device-type range, below the transport bits 24..49
    assert vb.VIRTIO_BALLOON_X_STATUS_TAKEN != vb.VIRTIO_BALLOON_X_STATUS_REFUSED


def test_stat_tags_and_names() -> None:
    assert [t.value for t in StatTag] == list(range(16)) == list(range(vb.VIRTIO_BALLOON_S_NR))
    assert vb.VIRTIO_BALLOON_S_SWAP_IN == 0 and vb.VIRTIO_BALLOON_S_DIRECT_RECLAIM == 15
    assert vb.VIRTIO_BALLOON_S_MEMFREE == 4 and vb.VIRTIO_BALLOON_S_CACHES == 7
    assert vb.VIRTIO_BALLOON_S_OOM_KILL == 10 and vb.VIRTIO_BALLOON_S_ALLOC_STALL == 11
    assert len(vb.VIRTIO_BALLOON_S_NAMES) == 16
    assert vb.stat_name(StatTag.MEMTOT) == "total-memory"
    assert vb.stat_name(StatTag.DIRECT_RECLAIM) == "direct-reclaims"


def test_queue_indices_compact_like_linux() -> None:
    q = BalloonQueue
    assert queue_indices(0) == {q.INFLATEQ: 0, q.DEFLATEQ: 1}
    stats = features_of(vb.VIRTIO_BALLOON_F_STATS_VQ)
    rep = features_of(vb.VIRTIO_BALLOON_F_REPORTING)
    hint = features_of(vb.VIRTIO_BALLOON_F_FREE_PAGE_HINT)
    assert queue_indices(stats)[q.STATSQ] == 2
    assert queue_indices(rep) == {q.INFLATEQ: 0, q.DEFLATEQ: 1, q.REPORTING_VQ: 2}
    assert queue_indices(stats | rep)[q.REPORTING_VQ] == 3
    assert queue_indices(stats | hint | rep) == {
        q.INFLATEQ: 0, q.DEFLATEQ: 1, q.STATSQ: 2, q.FREE_PAGE_VQ: 3, q.REPORTING_VQ: 4,
    }


@given(U32, U32, U32, U32, U32, U32, st.booleans())
def test_config_round_trip(a: int, b: int, c: int, d: int, e: int, f: int, ext: bool) -> None:
    cfg = BalloonConfig(a, b, c, d, e if ext else 0, f if ext else 0)
    data = cfg.encode(extended=ext)
    assert len(data) == (vb.CONFIG_X_BYTES if ext else vb.CONFIG_BYTES)
    assert BalloonConfig.decode(data) == cfg
    # the device's encode without an object, and decodes remembered or not, agree
    assert vb.encode_config(a, b, c, d, e if ext else 0, f if ext else 0, extended=ext) == data
    assert BalloonConfig.decode(data) == BalloonConfig.decode(bytearray(data)) == cfg


def test_config_layout_is_little_endian_u32s() -> None:
    data = BalloonConfig(1, 2, 3, 4, 5, 6).encode(extended=True)
    assert data[vb.OFFSET_NUM_PAGES] == 1 and data[vb.OFFSET_ACTUAL] == 2
    assert data[vb.OFFSET_FREE_PAGE_HINT_CMD_ID] == 3 and data[vb.OFFSET_POISON_VAL] == 4
    assert data[vb.OFFSET_X_RESET_GENERATION] == 5 and data[vb.OFFSET_X_RESET_ACK] == 6
    assert vb.encode_u32(0x01020304) == b"\x04\x03\x02\x01"
    assert vb.decode_u32(b"\x04\x03\x02\x01") == 0x01020304


@pytest.mark.parametrize("n", [0, 4, 15, 17, 23, 25, 64])
def test_config_of_wrong_size_is_a_peer_error(n: int) -> None:
    with pytest.raises(DeviceConfigError):
        BalloonConfig.decode(bytes(n))
    with pytest.raises(DeviceConfigError):  # a remembered decode raises every time
        BalloonConfig.decode(bytes(n))
    with pytest.raises(DeviceConfigError):
        vb.decode_u32(bytes(3))


@given(st.dictionaries(st.integers(0, 15), st.integers(0, 2**64 - 1)))
def test_stats_round_trip(stats: dict[int, int]) -> None:
    data = encode_stats(stats)
    assert len(data) == vb.STAT_ENTRY_BYTES * len(stats)
    assert decode_stats(data, strict=True) == stats


def test_stats_entry_is_packed_10_bytes() -> None:
    assert encode_stats([(StatTag.MEMFREE, 0x0102)]) == b"\x04\x00\x02\x01" + bytes(6)


def test_unknown_tag_and_truncated_entry() -> None:
    data = encode_stats([(4, 100), (99, 7), (5, 200)]) + b"\x01\x00\x02"
    with pytest.raises(StatsError):
        decode_stats(data, strict=True)
    with pytest.raises(StatsError):
        decode_stats(encode_stats([(16, 1)]), strict=True)
    c = Counters()
    assert decode_stats(data, counters=c) == {4: 100, 5: 200}
    assert c["stats_unknown_tag"] == 1 and c["stats_truncated"] == 1


@given(st.binary(max_size=200))
def test_any_stats_bytes_decode_or_raise_stats_error(data: bytes) -> None:
    c = Counters()
    out = decode_stats(data, counters=c)
    assert all(0 <= t < 16 for t in out)
    try:
        decode_stats(data, strict=True)
    except StatsError:
        assert c.total() > 0


# fuzz properties (the long form: `memballoon bench fuzz --target virtio_stats
# --target virtio_config`)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2**64 - 1)), max_size=20),
       st.binary(max_size=9))
def test_strict_takes_exactly_what_lenient_takes_without_counting(
        entries: list[tuple[int, int]], tail: bytes) -> None:
    data = encode_stats(entries) + tail
    c = Counters()
    lenient = decode_stats(data, counters=c)
    assert lenient == {t: v for t, v in entries if t < 16}  # a later entry for a tag wins
    try:
        assert decode_stats(data, strict=True) == lenient and c.total() == 0
    except StatsError:
        assert c.total() > 0
    assert decode_stats(encode_stats(lenient), strict=True) == lenient


@given(st.binary(max_size=40))
def test_a_config_space_decodes_to_exactly_its_bytes_or_is_refused(data: bytes) -> None:
    try:
        cfg = BalloonConfig.decode(data)
    except DeviceConfigError:
        assert len(data) not in (16, 24)
        return
    assert cfg.encode(extended=len(data) == 24) == data
