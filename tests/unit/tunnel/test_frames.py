"""The tunnel frame codec: any chunking decodes the same; junk is a protocol error."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.errors import TunnelProtocolError
from p2prc.tunnel.frames import MAX_FRAME, FrameDecoder, encode

messages = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["hello", "expose", "connect", "data"])},
        optional={
            "port": st.integers(0, 65535),
            "token": st.binary(max_size=64),
            "text": st.text(max_size=200),
        },
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_any_chunking_decodes_the_same(batch: list[dict[str, object]], cuts: list[int]) -> None:
    stream = b"".join(encode(message) for message in batch)
    decoder, decoded, position, index = FrameDecoder(), [], 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        decoded += decoder.feed(stream[position : position + size])
        position += size
        index += 1
    assert decoded == batch


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_junk_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(TunnelProtocolError):
        FrameDecoder().feed(data)


def test_oversized_frame_and_poisoned_decoder() -> None:
    decoder = FrameDecoder()
    with pytest.raises(TunnelProtocolError, match="over"):
        decoder.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(TunnelProtocolError, match="already failed"):
        decoder.feed(encode({"type": "hello"}))


def test_messages_need_a_type() -> None:
    with pytest.raises(TypeError):
        encode({"port": 1})
    body = b"\x81\xa4port\x01"  # msgpack {"port": 1}
    with pytest.raises(TunnelProtocolError, match="type"):
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)
