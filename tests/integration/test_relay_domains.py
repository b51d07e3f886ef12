"""Domains on the relay: HTTP by Host, TLS by SNI (passed through), one owner per domain."""

import asyncio
import functools
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2prc.errors import DomainTaken, InvalidRequest
from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayLimits, RelayServer

RELAY, ALICE, BOB = Identity.generate(), Identity.generate(), Identity.generate()


async def _named(name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one HTTP request with the server's name and what it received."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0] or 0)
    body = name + b"|" + (await reader.readexactly(length) if length else b"")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    writer.write(body)
    await writer.drain()
    writer.close()


@pytest.fixture
async def web() -> AsyncIterator[dict[str, int]]:
    ports, servers = {}, []
    for name in ("alice", "bob", "relay-own"):
        server = await asyncio.start_server(
            functools.partial(_named, name.encode()), "127.0.0.1", 0
        )
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    yield ports
    for server in servers:
        server.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    allowed = {RELAY.node_id, ALICE.node_id, BOB.node_id}
    server = RelayServer(
        RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1", http_port=0, https_port=0,
        allowed=lambda node_id: node_id in allowed, limits=RelayLimits(domain_grace=0.5),
    )  # fmt: skip
    server.allowed_set = allowed  # type: ignore[attr-defined]
    async with server:
        yield server


async def _get(port: int, host: str, body: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    method = b"POST" if body else b"GET"
    writer.write(
        b"%s / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (method, host.encode(), len(body), body)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return answer


async def test_http_goes_to_the_tunnel_that_routed_the_host(
    relay: RelayServer, web: dict[str, int]
) -> None:
    async with (
        TunnelClient(ALICE, "127.0.0.1", relay.port, RELAY.node_id) as alice,
        TunnelClient(BOB, "127.0.0.1", relay.port, RELAY.node_id) as bob,
    ):
        await alice.route("alice.example.org", web["alice"])
        await bob.route("Bob.Example.org.", web["bob"])
        relay.route_local("own.example.org", web["relay-own"])
        big = bytes(range(256)) * 4096
        answers = await asyncio.gather(
            _get(relay.http_port, "alice.example.org", big),
            _get(relay.http_port, "bob.example.org:80"),
            _get(relay.http_port, "OWN.example.org"),
            *(_get(relay.http_port, "alice.example.org", b"x%d" % i) for i in range(20)),
        )
        assert answers[0].endswith(b"\r\n\r\nalice|" + big)
        assert answers[1].endswith(b"\r\n\r\nbob|")
        assert answers[2].endswith(b"\r\n\r\nrelay-own|")
        for i, answer in enumerate(answers[3:]):
            assert answer.endswith(b"alice|x%d" % i)
        unknown = await _get(relay.http_port, "nobody.example.org")
        assert unknown.startswith(b"HTTP/1.1 404 ")


async def test_a_domain_has_one_owner(relay: RelayServer, web: dict[str, int]) -> None:
    async with TunnelClient(ALICE, "127.0.0.1", relay.port, RELAY.node_id) as alice:
        await alice.route("app.example.org", web["alice"])
        async with TunnelClient(BOB, "127.0.0.1", relay.port, RELAY.node_id) as bob:
            with pytest.raises(DomainTaken):
                await bob.route("app.example.org", web["bob"])
            with pytest.raises(InvalidRequest):
                await bob.route("not a domain", web["bob"])
            with pytest.raises(DomainTaken):
                relay.route_local("app.example.org", web["relay-own"])
            # The relay stops allowing alice: her claim lapses and bob may take it.
            relay.allowed_set.discard(ALICE.node_id)  # type: ignore[attr-defined]
            await bob.route("app.example.org", web["bob"])
            assert (await _get(relay.http_port, "app.example.org")).endswith(b"bob|")


async def test_a_claim_survives_a_reconnect_then_lapses(
    relay: RelayServer, web: dict[str, int]
) -> None:
    async with TunnelClient(ALICE, "127.0.0.1", relay.port, RELAY.node_id) as alice:
        await alice.route("app.example.org", web["alice"])
    await asyncio.sleep(0.1)
    async with TunnelClient(BOB, "127.0.0.1", relay.port, RELAY.node_id) as bob:
        with pytest.raises(DomainTaken):  # inside alice's grace period
            await bob.route("app.example.org", web["bob"])
        down = await _get(relay.http_port, "app.example.org")
        assert down.startswith(b"HTTP/1.1 502 ")
        await asyncio.sleep(0.6)
        await bob.route("app.example.org", web["bob"])


async def test_bad_requests_on_the_http_port(relay: RelayServer) -> None:
    for junk in (b"\x16\x03\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"A" * 20000):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
        writer.write(junk)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:40]
        writer.close()


def _certificate(directory: Path, name: str) -> ssl.SSLContext:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_is_passed_through_by_server_name(relay: RelayServer, tmp_path: Path) -> None:
    """The node holds the certificate; the relay only reads the name and forwards bytes."""
    context = _certificate(tmp_path, "secure.example.org")

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"tls says " + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with TunnelClient(ALICE, "127.0.0.1", relay.port, RELAY.node_id) as alice:
        await alice.route("secure.example.org", port)
        trust = ssl.create_default_context(cafile=str(tmp_path / "secure.example.org.crt"))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.https_port, ssl=trust, server_hostname="secure.example.org"
        )
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"tls says hello\n"
        writer.close()
        # No name, or a name nobody routes: the connection is closed, nothing leaks.
        for name in (None, "other.example.org"):
            plain = ssl.create_default_context()
            plain.check_hostname, plain.verify_mode = False, ssl.CERT_NONE
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", relay.https_port, ssl=plain, server_hostname=name
                    ),
                    10,
                )
    server.close()
