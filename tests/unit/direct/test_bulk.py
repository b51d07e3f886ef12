"""Bulk data on a direct path (and the relay's mux): ``d`` frames built with one copy are
the codec's own bytes; a read of many frames goes out whole and in order; what arrived for
a stream is written out together, its end after it."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from p2prc.tunnel.frames import MAX_FRAME, FrameDecoder, encode, encode_data
from p2prc.tunnel.mux import READ, WINDOW, Mux
from p2prc.tunnel.protocol import Credit, Data, End, parse
from p2prc.tunnel.streams import CHUNK, FramedStream, close_quietly


@pytest.mark.parametrize("size", [0, 1, 255, 256, 4096, CHUNK])
@pytest.mark.parametrize("sid", [1, 127, 128, 255, 65536, 2**40, 2**63 - 1])
def test_a_data_frame_is_what_the_codec_makes(size: int, sid: int) -> None:
    data = os.urandom(size)
    frame = encode_data(sid, memoryview(data))
    assert frame == encode(Data(sid, data).to_map())
    assert [parse(m) for m in FrameDecoder().feed(frame)] == [Data(sid, data)]


def test_a_data_frame_over_the_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="over"):
        encode_data(1, bytes(MAX_FRAME + 1))
    with pytest.raises(ValueError, match="over"):
        encode_data(2**63 - 1, bytes(MAX_FRAME - 8))  # the head pushes it over


async def _framed() -> tuple[FramedStream, FramedStream]:
    left, right = socket.socketpair()
    a = FramedStream(*await asyncio.open_connection(sock=left), FrameDecoder())
    b = FramedStream(*await asyncio.open_connection(sock=right), FrameDecoder())
    return a, b


async def test_a_long_read_goes_as_frames_of_a_chunk_in_order() -> None:
    sender, receiver = await _framed()
    data = os.urandom(READ + 5)
    await sender.send_data(7, data)
    await sender.send(End(7))
    got: list[Data] = []
    while not isinstance(message := await receiver.receive(), End):
        assert isinstance(message, Data)
        got.append(message)
    assert [len(m.b) for m in got] == [CHUNK] * (READ // CHUNK) + [5]
    assert {m.s for m in got} == {7}
    assert b"".join(m.b for m in got) == data
    await close_quietly(sender.writer, receiver.writer)


async def test_what_arrived_is_written_together_then_the_end() -> None:
    control, peer = await _framed()
    mux = Mux(control)
    stream = mux.open(3)
    parts = [os.urandom(n) for n in (1, CHUNK, 77, CHUNK, WINDOW // 4)]
    for part in parts:  # all queued before the pump looks: written out in one go
        mux.dispatch(Data(3, part))
    mux.dispatch(End(3))
    near, far = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=near)
    far_reader, far_writer = await asyncio.open_connection(sock=far)
    pump = asyncio.ensure_future(mux._inbound(stream, writer))
    received = await asyncio.wait_for(far_reader.read(), 5)  # to the end: the half-close
    await asyncio.wait_for(pump, 5)
    assert received == b"".join(parts)
    assert stream.queued == 0
    credit = await asyncio.wait_for(peer.receive(), 5)  # a quarter window was written out
    assert credit == Credit(3, sum(map(len, parts)))
    await close_quietly(writer, far_writer, control.writer, peer.writer)
