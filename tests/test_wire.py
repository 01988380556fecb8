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
