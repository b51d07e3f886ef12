"""TLS 1.3 with node-key certificates, pinned by node id, over real loopback sockets."""

import asyncio
import ssl
from pathlib import Path

import pytest

from p2prc.errors import WrongNode
from p2prc.identity import Identity
from p2prc.tunnel.tls import client_context, ensure_certificate, server_context, verify_peer


async def _handshake(server_id: Identity, tmp_path: Path, expected: str) -> str:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=server_context(server_id, tmp_path)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
            verify_peer(ssl_object, expected)
            return (await reader.read(2)).decode()
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_pinned_handshake(tmp_path: Path) -> None:
    node = Identity.generate()
    assert await _handshake(node, tmp_path, node.node_id) == "hi"


async def test_wrong_node_is_refused(tmp_path: Path) -> None:
    node, other = Identity.generate(), Identity.generate()
    with pytest.raises(WrongNode, match=other.node_id):
        await _handshake(node, tmp_path, other.node_id)


def test_certificate_is_kept_and_replaced_for_another_identity(tmp_path: Path) -> None:
    first = Identity.generate()
    cert, key = ensure_certificate(first, tmp_path)
    assert key.stat().st_mode & 0o777 == 0o600
    before = cert.read_bytes()
    ensure_certificate(first, tmp_path)
    assert cert.read_bytes() == before
    ensure_certificate(Identity.generate(), tmp_path)
    assert cert.read_bytes() != before


def test_client_context_is_tls13_only() -> None:
    assert client_context().minimum_version is ssl.TLSVersion.TLSv1_3


async def test_a_pinned_context_checks_the_key_during_the_handshake(tmp_path: Path) -> None:
    from p2prc.tunnel.tls import pinned_context

    node, impostor = Identity.generate(), Identity.generate()
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=server_context(impostor, tmp_path)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pinned_context(impostor.node_id)
        )
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError, match="expected node"):
            await asyncio.open_connection("127.0.0.1", port, ssl=pinned_context(node.node_id))
    finally:
        server.close()
        await server.wait_closed()
    assert b"".join(received) == b""
