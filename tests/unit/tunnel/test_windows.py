"""Stream windows grow to the tunnel's bandwidth-delay product, within a cap and a budget."""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.mux import GROWTH_BUDGET, MAX_WINDOW, WINDOW, Mux, MuxStream, RoundTrip
from p2prc.tunnel.protocol import Abort, Data
from p2prc.tunnel.relay import RelayServer
from p2prc.tunnel.streams import FramedStream, close_quietly

from ._delay import DelayLine

RELAY, CLIENT = Identity.generate(), Identity.generate()
RTT = 0.05


class _Control:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def try_send(self, message: object) -> bool:
        self.sent.append(message)
        return True


def _mux(rtt: float | None = RTT) -> Mux:
    mux = Mux(cast(FramedStream, _Control()))
    mux.round_trip.rtt = rtt
    return mux


def _fast_windows(mux: Mux, stream: MuxStream, count: int, now: float = 0.0) -> float:
    """Write out ``count`` whole windows, each within one round trip; the time after."""
    for _ in range(count):
        mux.consumed(stream, stream.window, now)
        now += RTT
    return now


def test_a_window_written_out_within_two_round_trips_doubles() -> None:
    mux = _mux()
    stream = mux.open(1)
    assert mux.consumed(stream, WINDOW // 2, 0.0) == 0
    assert mux.consumed(stream, WINDOW // 2, 0.06) == WINDOW  # one window in 60 ms
    assert stream.window == 2 * WINDOW
    mux.dispatch(Data(1, b"x" * (2 * WINDOW)))  # the grown window is what it may send
    assert not stream.aborted
    assert stream.queued == 2 * WINDOW


def test_slow_or_unmeasured_streams_keep_their_window() -> None:
    slow, unmeasured = _mux(), _mux(rtt=None)
    stream = slow.open(1)
    slow.consumed(stream, 1, 0.0)
    for tick in range(1, 10):  # a window every 200 ms: 4 round trips, the reader is the limit
        assert slow.consumed(stream, WINDOW, tick * 0.2) == 0
    assert stream.window == WINDOW
    other = unmeasured.open(1)
    _fast_windows(unmeasured, other, 5)
    assert other.window == WINDOW


def test_windows_stop_at_the_cap() -> None:
    mux = _mux()
    stream = mux.open(1)
    _fast_windows(mux, stream, 20)
    assert stream.window == MAX_WINDOW
    assert mux.consumed(stream, MAX_WINDOW, 100.0) == 0


def test_all_streams_of_a_tunnel_grow_within_the_budget() -> None:
    mux = _mux()
    streams = [mux.open(sid) for sid in range(1, 11)]
    for stream in streams:
        _fast_windows(mux, stream, 20)
    assert mux.grown <= GROWTH_BUDGET
    assert [s.window for s in streams[:4]] == [MAX_WINDOW] * 4
    assert all(s.window < MAX_WINDOW for s in streams[5:])
    late = mux.open(11)
    _fast_windows(mux, late, 20)
    assert late.window == WINDOW  # nothing left: it keeps the first window
    for stream in streams[:4]:
        del mux.streams[stream.sid]  # closed streams give their growth back
    _fast_windows(mux, late, 20)
    assert late.window == MAX_WINDOW


def test_a_stalled_stream_never_grows_and_is_held_to_its_window() -> None:
    mux = _mux()
    fast, stalled = mux.open(1), mux.open(2)
    mux.dispatch(Data(2, b"s" * WINDOW))  # its reader never writes any of it out
    _fast_windows(mux, fast, 6)
    assert fast.window == 32 * WINDOW
    assert stalled.window == WINDOW
    assert not stalled.aborted
    mux.dispatch(Data(2, b"s"))
    assert stalled.aborted
    assert not fast.aborted
    assert cast(_Control, mux._control).sent == [Abort(2)]


async def test_round_trip_is_the_shortest_and_ignores_unasked_pongs() -> None:
    round_trip = RoundTrip()
    round_trip.pong()
    assert round_trip.rtt is None
    assert not round_trip.waiting
    round_trip.ping()
    assert round_trip.waiting
    await asyncio.sleep(0.02)
    round_trip.pong()
    first = round_trip.rtt
    assert first is not None
    assert 0.015 < first < 1.0
    round_trip.ping()
    await asyncio.sleep(0.04)  # a ping that waited behind queued data
    round_trip.pong()
    assert round_trip.rtt == first
    round_trip.ping()
    round_trip.pong()
    assert round_trip.rtt < first


# Through a relay and a tunnel client on loopback, with the delay line on the tunnel's leg.


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(1 << 20):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _send(port: int, size: int) -> float:
    """Send ``size`` bytes to a sink; seconds until it counted them all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(1 << 20)
    start = time.perf_counter()
    for _ in range(size >> 20):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    assert int(await asyncio.wait_for(reader.read(), 60)) == size
    writer.close()
    return time.perf_counter() - start


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A local service that sends SOURCE bytes to whoever connects."""
    chunk = os.urandom(1 << 20)
    for _ in range(SOURCE >> 20):
        writer.write(chunk)
        await writer.drain()
    await close_quietly(writer)


SOURCE = 48 << 20


@pytest.fixture
async def far_tunnel(tmp_path: Path) -> AsyncIterator[tuple[TunnelClient, int]]:
    """A client 50 ms from its relay, and the client's sink's public port."""
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    relay = RelayServer(RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1")
    async with relay, DelayLine(relay.port, RTT) as line:
        client = TunnelClient(CLIENT, "127.0.0.1", line.port, RELAY.node_id)
        async with client:
            public = await client.expose(sink.sockets[0].getsockname()[1])
            yield client, public
    sink.close()
    await sink.wait_closed()


async def test_one_stream_fills_more_than_the_first_window_per_round_trip(
    far_tunnel: tuple[TunnelClient, int],
) -> None:
    _, public = far_tunnel
    size = 48 << 20
    seconds = await _send(public, size)
    assert size / seconds > 2 * WINDOW / RTT, f"{size / seconds / 2**20:.1f} MiB/s"


async def test_streams_towards_the_relay_grow_too(
    far_tunnel: tuple[TunnelClient, int],
) -> None:
    """The relay times its own pings: a download from the NAT'd node's service."""
    client, _ = far_tunnel
    source = await asyncio.start_server(_source, "127.0.0.1", 0)
    public = await client.expose(source.sockets[0].getsockname()[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", public)
    start, total = time.perf_counter(), 0
    while data := await asyncio.wait_for(reader.read(1 << 20), 30):
        total += len(data)
    seconds = time.perf_counter() - start
    await close_quietly(writer)
    source.close()
    await source.wait_closed()
    assert total == SOURCE
    assert total / seconds > 2 * WINDOW / RTT, f"{total / seconds / 2**20:.1f} MiB/s"


async def test_a_stalled_stream_beside_a_fast_one_far_away(
    far_tunnel: tuple[TunnelClient, int],
) -> None:
    client, public = far_tunnel
    held: list[asyncio.StreamWriter] = []

    async def never_read(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    stalled_sink = await asyncio.start_server(never_read, "127.0.0.1", 0)
    stalled_public = await client.expose(stalled_sink.sockets[0].getsockname()[1])
    _, stalled = await asyncio.open_connection("127.0.0.1", stalled_public)
    stalled.write(os.urandom(24 << 20))  # the local service never reads it
    await asyncio.sleep(1.0)  # the kernel's socket buffers take a few MiB, then it stalls
    assert client._mux is not None
    (stream,) = client._mux.streams.values()
    window = stream.window
    await _send(public, 32 << 20)
    assert list(client._mux.streams.values()) == [stream]  # the fast one is done and gone
    assert stream.window == window  # a stalled stream does not grow
    assert 0 < stream.queued <= stream.window
    await close_quietly(stalled, *held)
    stalled_sink.close()
    await stalled_sink.wait_closed()
