import pytest
from hypothesis import given
from hypothesis import strategies as st

from memballoon.model.errors import FrameError
from memballoon.protocol.wire import MAX_FRAME, Decoder, Kind, Message, encode

msgs = st.lists(st.tuples(st.sampled_from(list(Kind)), st.binary(max_size=300)), max_size=12)


@given(msgs)
def test_byte_by_byte_and_all_at_once_decode_the_same(items: list[tuple[Kind, bytes]]) -> None:
    stream = b"".join(encode(k, p) for k, p in items)
    want = [Message(k, p) for k, p in items]
    assert Decoder().messages(stream) == want
    d = Decoder()
    got: list[Message] = []
    for i in range(len(stream)):
        got.extend(d.messages(stream[i : i + 1]))
    assert got == want
    assert d.pending == 0


@given(st.binary(max_size=200))
def test_garbage_raises_only_frame_errors(data: bytes) -> None:
    d = Decoder()
    try:
        d.messages(data)
    except FrameError:
        assert d.broken
        with pytest.raises(FrameError):
            d.feed(b"x")


def test_oversized_and_unknown_frames_are_refused() -> None:
    with pytest.raises(FrameError, match="length"):
        Decoder().messages((MAX_FRAME + 1).to_bytes(4, "little") + b"\x01")
    with pytest.raises(FrameError, match="kind"):
        Decoder().messages((1).to_bytes(4, "little") + b"\x63")
    with pytest.raises(FrameError):
        encode(Kind.VMW, b"\0" * MAX_FRAME)


# fuzz property (the long form: `memballoon bench fuzz --target wire`)
@given(msgs, st.binary(max_size=40), st.integers(1, 9))
def test_good_frames_then_garbage_in_pieces_decode_as_at_once(
        items: list[tuple[Kind, bytes]], garbage: bytes, step: int) -> None:
    stream = b"".join(encode(k, p) for k, p in items) + garbage

    def run(chunks: list[bytes]) -> tuple[list[Message], bool, int]:
        d, out = Decoder(), []
        try:
            for c in chunks:
                d.feed(c)
                while (m := d.next()) is not None:
                    out.append(m)
        except FrameError:
            return out, True, d.pending
        return out, False, d.pending

    whole = run([stream])
    pieces = run([stream[i : i + step] for i in range(0, len(stream), step)])
    assert whole[:2] == pieces[:2]  # the same messages, the same verdict on the rest
    got, failed, pending = pieces
    assert got[: len(items)] == [Message(k, p) for k, p in items]
    used = b"".join(encode(m.kind, m.payload) for m in got)
    assert stream.startswith(used) and (failed or pending == len(stream) - len(used))
