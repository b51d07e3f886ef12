"""The relay and tunnel client on loopback: byte-exact, half-close, isolation, faults."""

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2prc.errors import TunnelError, WrongNode
from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayLimits, RelayServer
from tests.integration.conftest import round_trip

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
    return await round_trip(port, payload)


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
        with pytest.raises(TunnelError, match="does not trust your node"):
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


class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait((data, addr))
        if self.echo and self.transport is not None:
            self.transport.sendto(b"echo:" + data, addr)

    echo = False


async def _udp(echo: bool = False) -> tuple[asyncio.DatagramTransport, _Collect]:
    loop = asyncio.get_running_loop()
    protocol = _Collect()
    protocol.echo = echo
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, local_addr=("127.0.0.1", 0)
    )
    return transport, protocol


async def test_udp_through_the_relay_keeps_senders_apart(relay: RelayServer) -> None:
    server, _ = await _udp(echo=True)
    local = server.get_extra_info("sockname")[1]
    senders = [await _udp() for _ in range(3)]
    try:
        async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
            public = await client.expose(local, udp=True)
            for round_ in range(5):
                for index, (transport, _) in enumerate(senders):
                    transport.sendto(b"%d-%d" % (index, round_), ("127.0.0.1", public))
            for index, (_, protocol) in enumerate(senders):
                answers = [(await asyncio.wait_for(protocol.got.get(), 10))[0] for _ in range(5)]
                assert sorted(answers) == [b"echo:%d-%d" % (index, r) for r in range(5)]
            big = os.urandom(59_000)  # the echo adds 5 bytes; 60,000 is the most that travels
            senders[0][0].sendto(big, ("127.0.0.1", public))
            assert (await asyncio.wait_for(senders[0][1].got.get(), 10))[0] == b"echo:" + big
    finally:
        server.close()
        for transport, _ in senders:
            transport.close()


async def test_the_relay_is_no_udp_reflector(relay: RelayServer) -> None:
    """A tunnel client cannot make the relay send datagrams to an address that never
    wrote to that public port."""
    from p2prc.tunnel.protocol import Datagram

    server, inbox = await _udp()
    victim, seen = await _udp()
    victim_address = victim.get_extra_info("sockname")
    try:
        async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
            public = await client.expose(server.get_extra_info("sockname")[1], udp=True)
            control = client._control
            assert control is not None
            for _ in range(10):
                await control.send(Datagram(public, tuple(victim_address), b"attack").to_map())
            await control.send({"type": "u", "p": "x", "a": "garbage", "b": 1})
            await asyncio.sleep(0.5)
            assert seen.got.empty()
            # The relay still serves UDP for real senders after that garbage.
            sender, _ = await _udp()
            sender.sendto(b"hello", ("127.0.0.1", public))
            assert (await asyncio.wait_for(inbox.got.get(), 10))[0] == b"hello"
            sender.close()
    finally:
        server.close()
        victim.close()


def _flood_size(wanted: int = 5000) -> int:
    """Connections the flood test can open: both ends live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 3 * wanted if hard == resource.RLIM_INFINITY else min(hard, 3 * wanted)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
    return max(100, min(wanted, soft // 2 - 200))


async def test_a_connection_flood_is_capped_and_others_keep_working(
    tmp_path: Path, echo_port: int
) -> None:
    """One client's public port gets 5,000 connections that never finish; the relay caps
    them (closing the excess cleanly) and another client's port still echoes."""
    limits = RelayLimits(connections_per_client=32)
    server = RelayServer(RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1", limits=limits)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept and never answer

    sink = await asyncio.start_server(hold, "127.0.0.1", 0)
    other = Identity.generate()
    async with (
        server,
        TunnelClient(CLIENT, "127.0.0.1", server.port, RELAY.node_id) as flooded,
        TunnelClient(other, "127.0.0.1", server.port, RELAY.node_id) as fine,
    ):
        public = await flooded.expose(sink.sockets[0].getsockname()[1])
        opened = []
        for _ in range(_flood_size()):
            reader, writer = await asyncio.open_connection("127.0.0.1", public)
            opened.append((reader, writer))
        closed = 0
        for reader, _writer in opened:
            with contextlib.suppress(TimeoutError, ConnectionError):
                if await asyncio.wait_for(reader.read(), 0.05) == b"":
                    closed += 1
        assert closed >= len(opened) - 32  # the excess was closed, not left hanging
        assert len(held) <= 32
        good = await fine.expose(echo_port)
        assert await _round_trip(good, b"still fine") == b"still fine"
        for _, writer in opened:
            writer.close()
    for writer in held:
        writer.close()
    sink.close()


async def test_a_relay_that_vanishes_mid_transfer(tmp_path: Path) -> None:
    """The transfer ends (no hang), the tunnel client notices, nothing crashes."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = os.urandom(64 * 1024)
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):  # bounded: about 6 GiB, far more than the test reads
                writer.write(chunk)
                await writer.drain()

    source = await asyncio.start_server(endless, "127.0.0.1", 0)
    relay = RelayServer(RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1")
    await relay.start()
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        public = await client.expose(source.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", public)
        received = len(await reader.readexactly(1024 * 1024))
        await relay.aclose()  # the relay goes away mid-transfer
        with contextlib.suppress(ConnectionError):
            while data := await asyncio.wait_for(reader.read(1 << 20), 10):
                received += len(data)
        assert received >= 1024 * 1024
        await asyncio.wait_for(client.closed.wait(), 15)
        writer.close()
    source.close()


async def test_a_stalled_stream_stops_only_itself(relay: RelayServer, echo_port: int) -> None:
    """Per-stream flow control: a local server that stops reading holds back its own
    stream (its window fills, nothing is dropped or aborted), while another stream on the
    same tunnel finishes at once; then the stalled one completes byte-exact."""
    got = bytearray()
    release = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        while data := await reader.read(1 << 20):
            got.extend(data)
        writer.write(b"%d" % len(got))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as client:
        stalled_public = await client.expose(server.sockets[0].getsockname()[1])
        fast_public = await client.expose(echo_port)
        payload = os.urandom(24 * 1024 * 1024)  # more than the kernel buffers and the window
        stalled_task = asyncio.create_task(_round_trip(stalled_public, payload))
        await asyncio.sleep(1)  # the stalled stream fills its buffers and its window
        quick = os.urandom(256 * 1024)
        assert await asyncio.wait_for(_round_trip(fast_public, quick), 10) == quick
        assert not stalled_task.done()
        release.set()
        assert await asyncio.wait_for(stalled_task, 60) == b"%d" % len(payload)
        assert bytes(got) == payload
    server.close()


async def test_a_reconnecting_client_keeps_its_public_ports(
    relay: RelayServer, echo_port: int
) -> None:
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as first:
        public = await first.expose(echo_port)
    # The tunnel dropped; the same node connects again and asks for the same port.
    async with TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id) as again:
        for _ in range(50):  # the relay closes the old port as it notices the drop
            try:
                assert await again.expose(echo_port, public) == public
                break
            except AssertionError:
                await again.unexpose(echo_port)
                await asyncio.sleep(0.05)
        assert again.exposed[echo_port] == public
        assert await _round_trip(public, b"same port") == b"same port"


async def test_a_silent_relay_is_noticed_by_heartbeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that welcomes the client, then neither answers nor closes (a frozen
    process): the client gives up after three heartbeat periods."""
    import p2prc.tunnel.client as client_module
    from p2prc.tunnel.frames import FrameDecoder
    from p2prc.tunnel.streams import FramedStream
    from p2prc.tunnel.tls import server_context

    monkeypatch.setattr(client_module, "_HEARTBEAT", 0.1)
    writers: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        stream = FramedStream(reader, writer, FrameDecoder())
        await stream.send({"type": "challenge", "nonce": "n", "relay": RELAY.node_id})
        await stream.receive()
        await stream.send({"type": "welcome", "node_id": CLIENT.node_id})
        # ... and nothing more: pings go unanswered, the connection stays open.

    server = await asyncio.start_server(frozen, "127.0.0.1", 0, ssl=server_context(RELAY, tmp_path))
    port = server.sockets[0].getsockname()[1]
    async with TunnelClient(CLIENT, "127.0.0.1", port, RELAY.node_id) as client:
        await asyncio.wait_for(client.closed.wait(), 5)
    for writer in writers:
        writer.close()
    server.close()


async def test_a_local_server_that_resets_mid_transfer_ends_only_its_stream(
    relay: RelayServer, echo_port: int
) -> None:
    """The local server behind the tunnel resets its connections while the relay still
    delivers bytes to them (as iperf3 does at the end of a test): each such stream ends,
    the tunnel and its other streams go on, and no task of the client crashes (uvloop
    raises RuntimeError on a write to a transport already lost, which once crashed the
    stream's task and so the node)."""
    import socket
    import struct

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    crashes: list[BaseException] = []
    server = await asyncio.start_server(resetting, "127.0.0.1", 0)
    client = TunnelClient(
        CLIENT, "127.0.0.1", relay.port, RELAY.node_id,
        on_crash=lambda _task, exc: crashes.append(exc),
    )  # fmt: skip
    async with client:
        resets_public = await client.expose(server.sockets[0].getsockname()[1])
        echo_public = await client.expose(echo_port)

        async def flood() -> None:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", resets_public)
                chunk = os.urandom(1 << 20)
                for _ in range(32):
                    writer.write(chunk)
                    await writer.drain()
                writer.close()

        await asyncio.wait_for(asyncio.gather(*(flood() for _ in range(8))), 60)
        await asyncio.sleep(0.5)
        assert not crashes, crashes
        assert not client.closed.is_set()
        assert await _round_trip(echo_public, b"still here") == b"still here"
    server.close()
