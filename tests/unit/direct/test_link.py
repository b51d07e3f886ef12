"""One direct path over real loopback sockets: the handshake's checks, streams both ways,
the target rule, garbage, staleness."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from p2prc.direct import link as link_module
from p2prc.direct.link import DirectLink, DirectOpen, Wire, challenge_message, handshake
from p2prc.errors import NotTrusted, P2PRCError, SignatureInvalid, TunnelProtocolError, WrongNode
from p2prc.identity import Identity
from p2prc.tunnel.frames import encode
from p2prc.tunnel.protocol import Challenge, Hello, MessageError
from p2prc.tunnel.tls import server_context


def _pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        dialled = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return dialled, accepted


def _everyone(node_id: str) -> bool:
    return True


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _shake(
    tmp_path: Path,
    client_id: Identity,
    server_id: Identity,
    *,
    pin: str | None = None,
    expected: str | None = None,
    server_allows: Callable[[str], bool] = _everyone,
    client_allows: Callable[[str], bool] = _everyone,
) -> tuple[tuple[Wire, str], tuple[Wire, str]]:
    dialled, accepted = _pair()
    context = server_context(server_id, tmp_path / "server")
    client = handshake(
        dialled,
        client_id,
        client=True,
        server_context=context,
        expected=pin or server_id.node_id,
        allowed=client_allows,
    )
    server = handshake(
        accepted,
        server_id,
        client=False,
        server_context=context,
        expected=expected,
        allowed=server_allows,
    )
    results = await asyncio.gather(client, server, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            for other in results:
                if isinstance(other, tuple):
                    other[0].writer.close()
            raise result
    return results[0], results[1]  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _links(
    tmp_path: Path,
    client_targets: link_module.Targets,
    server_targets: link_module.Targets,
    *,
    start_right: bool = True,
    heartbeat: float = 3.0,
    stale: float = 6.5,
) -> AsyncIterator[tuple[DirectLink, DirectLink, Identity, Identity]]:
    a, b = Identity.generate(), Identity.generate()
    tmp_path.joinpath("server").mkdir(exist_ok=True)
    (wire_a, peer_a), (wire_b, peer_b) = await _shake(tmp_path, a, b)
    assert (peer_a, peer_b) == (b.node_id, a.node_id)
    left = DirectLink(
        wire_a, peer_a, client=True, targets=client_targets, heartbeat=heartbeat, stale=stale
    )
    right = DirectLink(
        wire_b, peer_b, client=False, targets=server_targets, heartbeat=heartbeat, stale=stale
    )
    left.start()
    if start_right:
        right.start()
    try:
        yield left, right, a, b
    finally:
        await left.aclose()
        await right.aclose()


async def test_a_new_path_knows_its_round_trip_from_the_handshake(tmp_path: Path) -> None:
    async with _links(tmp_path, _to(1), _to(1), start_right=False) as (left, right, _, _):
        # No ping answered (the server side reads nothing): each knows the handshake's.
        assert left.mux.round_trip.rtt is None
        assert right.mux.round_trip.rtt is None
        for link in (left, right):
            assert link.rtt_ms is not None
            assert 0 < link.rtt_ms < 10_000


async def test_handshake_proves_both_nodes(tmp_path: Path) -> None:
    a, b = Identity.generate(), Identity.generate()
    tmp_path.joinpath("server").mkdir()
    (wire_a, peer_a), (wire_b, peer_b) = await _shake(tmp_path, a, b, expected=a.node_id)
    assert peer_a == b.node_id
    assert peer_b == a.node_id
    assert wire_a.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    for wire in (wire_a, wire_b):  # no Nagle delay for small frames, either side
        sock = wire.writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    wire_a.writer.close()
    wire_b.writer.close()


async def test_a_server_holding_another_key_is_refused_before_any_byte(tmp_path: Path) -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    tmp_path.joinpath("server").mkdir()
    with pytest.raises(WrongNode, match=c.node_id):
        await _shake(tmp_path, a, b, pin=c.node_id)


async def test_a_client_that_is_not_the_expected_node_is_refused(tmp_path: Path) -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    tmp_path.joinpath("server").mkdir()
    with pytest.raises(P2PRCError) as caught:
        await _shake(tmp_path, a, b, expected=c.node_id)
    # the server says wrong node; the client hears it refused
    assert isinstance(caught.value, WrongNode | TunnelProtocolError)


@pytest.mark.parametrize("side", ["server", "client"])
async def test_a_key_the_trust_policy_refuses_is_refused(tmp_path: Path, side: str) -> None:
    a, b = Identity.generate(), Identity.generate()
    tmp_path.joinpath("server").mkdir()
    nobody: Callable[[str], bool] = lambda node_id: False  # noqa: E731
    kwargs = {"server_allows": nobody} if side == "server" else {"client_allows": nobody}
    with pytest.raises((NotTrusted, TunnelProtocolError), match="direct path"):
        await _shake(tmp_path, a, b, **kwargs)  # type: ignore[arg-type]


async def test_a_signature_for_the_relay_is_no_proof_here(tmp_path: Path) -> None:
    """A client that signs the relay's challenge text (or any other) is refused."""
    b, mallory = Identity.generate(), Identity.generate()
    dialled, accepted = _pair()
    context = server_context(b, tmp_path)
    server = asyncio.ensure_future(
        handshake(
            accepted, b, client=False, server_context=context, expected=None, allowed=_everyone
        )
    )
    from p2prc.tunnel.protocol import challenge_message as relay_message
    from p2prc.tunnel.tls import pinned_context

    reader, writer = await asyncio.open_connection(
        sock=dialled, ssl=pinned_context(b.node_id), server_hostname=""
    )
    wire = Wire(reader, writer)
    challenge = await wire.receive()
    assert isinstance(challenge, Challenge)
    signature = mallory.sign(relay_message(challenge.nonce, b.node_id))
    await wire.out.send(Hello(mallory.public_key, signature))
    with pytest.raises(SignatureInvalid):
        await server
    writer.close()
    assert challenge_message("n", "x") != relay_message("n", "x")


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # plain text where TLS is expected
        b"\x16\x03\x01\x00\x05hello",  # a broken TLS record
        b"",  # connects, says nothing, hangs up
    ],
)
async def test_garbage_on_the_socket_is_refused(tmp_path: Path, garbage: bytes) -> None:
    b = Identity.generate()
    dialled, accepted = _pair()
    context = server_context(b, tmp_path)
    dialled.sendall(garbage)
    dialled.shutdown(socket.SHUT_WR)
    with pytest.raises(TunnelProtocolError):
        await handshake(
            accepted, b, client=False, server_context=context, expected=None, allowed=_everyone
        )
    dialled.close()


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xff\xff\xff\xff"],  # a frame over MAX_FRAME
        [encode({"type": "hello", "key": "AA", "signature": "BB"})],  # malformed hello
        [encode({"type": "ping"})],  # something else than hello
    ],
)
async def test_garbage_inside_tls_is_refused(tmp_path: Path, frames: list[bytes]) -> None:
    b = Identity.generate()
    dialled, accepted = _pair()
    context = server_context(b, tmp_path)
    server = asyncio.ensure_future(
        handshake(
            accepted, b, client=False, server_context=context, expected=None, allowed=_everyone
        )
    )
    from p2prc.tunnel.tls import pinned_context

    reader, writer = await asyncio.open_connection(
        sock=dialled, ssl=pinned_context(b.node_id), server_hostname=""
    )
    await Wire(reader, writer).receive()  # the challenge
    for frame in frames:
        writer.write(frame)
    await writer.drain()
    with pytest.raises((TunnelProtocolError, MessageError)):
        await server
    writer.close()


async def test_silence_is_refused_within_the_handshake_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "HANDSHAKE_TIMEOUT", 0.5)
    b = Identity.generate()
    dialled, accepted = _pair()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TunnelProtocolError, match="within"):
        await handshake(
            accepted,
            b,
            client=False,
            server_context=server_context(b, tmp_path),
            expected=None,
            allowed=_everyone,
        )
    assert loop.time() - started < 2
    dialled.close()


def _to(port: int) -> link_module.Targets:
    def targets(peer_id: str, target: str, wanted: int) -> tuple[str, int] | None:
        if target == "api":
            return ("127.0.0.1", port)
        return ("127.0.0.1", wanted) if wanted == port else None

    return targets


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> str:
    payload = os.urandom(size)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    received = await reader.readexactly(size)
    assert await reader.read() == b""
    writer.close()
    return hashlib.sha256(received).hexdigest() + ("" if received == payload else " (differs)")


async def test_streams_both_ways_are_byte_exact(tmp_path: Path) -> None:
    server_a, port_a = await _echo_server()
    server_b, port_b = await _echo_server()
    async with _links(tmp_path, _to(port_a), _to(port_b)) as (left, right, _, _):
        size = 8 * 1024 * 1024 + 17
        results = await asyncio.gather(
            _round_trip(*await left.open_stream("api"), size),
            _round_trip(*await right.open_stream("api"), size),
            _round_trip(*await left.open_stream("port", port_b), 100_000),
            _round_trip(*await right.open_stream("port", port_a), 1),
        )
        assert not any("differs" in result for result in results)
        assert left.rtt_ms is not None
        assert right.rtt_ms is not None
    server_a.close()
    server_b.close()


async def test_a_port_the_opener_may_not_reach_is_refused(tmp_path: Path) -> None:
    server_b, port_b = await _echo_server()
    async with _links(tmp_path, _to(0), _to(port_b)) as (left, right, _, _):
        reader, writer = await left.open_stream("port", port_b + 1)
        writer.write(b"x" * 1000)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # aborted: closed, no echo
        writer.close()
        # the path itself is fine
        assert await _round_trip(*await left.open_stream("port", port_b), 10)
        assert left.alive
        assert right.alive
    server_b.close()


async def test_bad_opens_and_frames_abort_one_stream_not_the_path(tmp_path: Path) -> None:
    server_b, port_b = await _echo_server()
    async with _links(tmp_path, _to(0), _to(port_b)) as (left, right, _, _):
        out = left._wire.out
        # the server's parity, a bad target, a bad port, a port for api, an undecodable data
        for raw in (
            DirectOpen(2, "api").to_map(),
            {"type": "dopen", "s": 3, "t": "shell", "p": 0},
            {"type": "dopen", "s": 5, "t": "port", "p": 70000},
            {"type": "dopen", "s": 7, "t": "api", "p": 22},
            {"type": "dopen", "s": "9", "t": "api"},
            {"type": "d", "s": 1, "b": "not bytes"},
            {"type": "from-the-future"},
        ):
            await out.send(raw)
        await asyncio.sleep(0.2)
        assert right.mux.streams == {}
        assert right.alive
        assert await _round_trip(*await left.open_stream("api"), 1000)
    server_b.close()


async def test_broken_framing_ends_the_path(tmp_path: Path) -> None:
    async with _links(tmp_path, _to(0), _to(0)) as (left, right, _, _):
        left._wire.writer.write(b"\xff\xff\xff\xff")
        await asyncio.wait_for(right.closed.wait(), 5)
        assert "framing" in right.reason


async def test_a_silent_path_is_dead_after_stale_and_its_streams_break(tmp_path: Path) -> None:
    """The right side never reads nor answers (a peer gone without a FIN)."""
    async with _links(
        tmp_path, _to(0), _to(0), start_right=False, heartbeat=0.1, stale=0.4
    ) as links:
        left, _right, _, _ = links
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await left.open_stream("api")
        writer.write(b"hello")
        await asyncio.wait_for(left.closed.wait(), 3)
        assert 0.3 < loop.time() - started < 1.5
        assert "no answer" in left.reason
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 3) == b""
        with pytest.raises(TunnelProtocolError):
            await left.open_stream("api")
        writer.close()


async def test_too_many_streams_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "MAX_STREAMS", 2)
    server_b, port_b = await _echo_server()
    async with _links(tmp_path, _to(0), _to(port_b)) as (left, _right, _, _):
        kept = [await left.open_stream("api") for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(TunnelProtocolError, match="no room"):
            await left.open_stream("api")
        for _, writer in kept:
            writer.close()
    server_b.close()


def test_the_client_must_pin() -> None:
    a = Identity.generate()
    sock = socket.socket()
    with pytest.raises(ValueError, match="pins"):
        asyncio.run(
            handshake(
                sock,
                a,
                client=True,
                server_context=ssl.create_default_context(),
                expected=None,
                allowed=_everyone,
            )
        )
    sock.close()
