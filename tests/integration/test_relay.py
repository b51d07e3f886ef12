"""The relay and tunnel client on loopback: byte-exact, half-close, isolation, faults."""

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2prc.errors import TunnelError, WrongNode
from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayLimits, RelayServer

RELAY, CLIENT = Identity.generate(), Identity.generate()


async def _echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read until the client half-closes, then answer everything back and close."""
    data = await reader.read()
    writer.write(data)
    await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo_after_eof, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    server = RelayServer(
        RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1",
        limits=RelayLimits(ports_per_client=2),
    )  # fmt: skip
    async with server:
        yield server


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


async def test_byte_exact_half_close_and_isolation(relay: RelayServer, echo_port: int) -> None:
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        public = await client.expose(echo_port)
        big = os.urandom(4 * 1024 * 1024)
        assert await _round_trip(public, big) == big
        payloads = [os.urandom(50_000 + i * 997) for i in range(10)]
        answers = await asyncio.gather(*(_round_trip(public, p) for p in payloads))
        assert answers == payloads
        assert await _round_trip(public, b"") == b""


async def test_wrong_relay_key_is_refused(relay: RelayServer) -> None:
    impostor = TunnelClient(CLIENT, "127.0.0.1", relay.port, Identity.generate().node_id)
    with pytest.raises(WrongNode):
        await impostor.start()


async def test_relay_refuses_nodes_it_does_not_allow(tmp_path: Path) -> None:
    closed = RelayServer(RELAY, tmp_path, host="127.0.0.1", allowed=lambda node_id: False)
    async with closed:
        client = TunnelClient(CLIENT, "127.0.0.1", closed.port, RELAY.node_id)
        with pytest.raises(TunnelError, match="may not use"):
            await client.start()
        await client.aclose()


async def test_port_quota(relay: RelayServer, echo_port: int) -> None:
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        await client.expose(echo_port)
        await client.expose(echo_port)
        with pytest.raises(TunnelError, match="quota"):
            await client.expose(echo_port)


async def test_garbage_on_the_relay_port(relay: RelayServer, echo_port: int) -> None:
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(3000), b""):
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(junk)
        await writer.drain()
        writer.close()
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        public = await client.expose(echo_port)
        assert await _round_trip(public, b"still serving") == b"still serving"


async def test_nothing_listening_behind_the_tunnel(relay: RelayServer) -> None:
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        public = await client.expose(1)  # nothing listens on port 1
        reader, writer = await asyncio.open_connection("127.0.0.1", public)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
