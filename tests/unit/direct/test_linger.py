"""A direct path on the shared direct port (a hole punch's socket) closes with a reset, at
once: neither its port's TIME_WAIT nor a TLS close waiting for a silent peer blocks the
next punch from the same port to the same peer; a dialled path (an ephemeral port) still
closes gracefully."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from p2prc.direct import link as link_module
from p2prc.direct.link import DirectLink, handshake
from p2prc.identity import Identity
from p2prc.tunnel.tls import server_context


def _bound_to(port: int) -> socket.socket:
    """A socket on ``port`` shared the way the direct port is (``punch._bound``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def _connect_from(port: int, far: tuple[str, int]) -> socket.socket:
    sock = _bound_to(port)
    try:
        sock.connect(far)
    except OSError:
        sock.close()
        raise
    return sock


async def _links(
    tmp_path: Path, dialled: socket.socket, accepted: socket.socket
) -> tuple[DirectLink, DirectLink]:
    client_id, server_id = Identity.generate(), Identity.generate()
    context = server_context(server_id, tmp_path / "server")
    (client_wire, _), (server_wire, _) = await asyncio.gather(
        handshake(
            dialled,
            client_id,
            client=True,
            server_context=context,
            expected=server_id.node_id,
            allowed=lambda node_id: True,
        ),
        handshake(
            accepted,
            server_id,
            client=False,
            server_context=context,
            expected=None,
            allowed=lambda node_id: True,
        ),
    )
    links = (
        DirectLink(client_wire, server_id.node_id, client=True, targets=lambda *_: None),
        DirectLink(server_wire, client_id.node_id, client=False, targets=lambda *_: None),
    )
    for link in links:
        link.start()
    return links


@pytest.mark.parametrize("how", ["closed", "lost while the peer is silent", "peer closed"])
async def test_a_punched_path_closed_leaves_its_port_free_for_the_next_punch(
    tmp_path: Path, how: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as far:
        with _bound_to(0) as free:
            port = free.getsockname()[1]  # a free port, for "the direct port"
        for _ in range(2):  # close, then punch again from the same port to the same peer
            dialled = _connect_from(port, far.getsockname())
            accepted, _ = far.accept()
            mine, theirs = await _links(tmp_path, dialled, accepted)
            if how == "peer closed":
                await theirs.aclose()
                await asyncio.wait_for(mine.closed.wait(), 5)
                assert mine.reason == "the connection closed"
            elif how == "closed":
                await mine.aclose("idle")
            else:  # the peer reads nothing more: a TLS close would wait for its answer
                transport = theirs._wire.writer.transport
                assert isinstance(transport, asyncio.ReadTransport)
                transport.pause_reading()
                mine._lost("no answer for 6.5 s")
                await asyncio.sleep(0)
            start = asyncio.get_running_loop().time()
            # At once: TIME_WAIT (or a TLS close waiting for the silent peer) would hold
            # the same 4-tuple, and this connect would fail with EADDRNOTAVAIL.
            _connect_from(port, far.getsockname()).close()
            assert asyncio.get_running_loop().time() - start < 1
            far.accept()[0].close()
            await mine.aclose()
            await theirs.aclose()


async def test_only_a_socket_on_a_shared_port_is_reset() -> None:
    with socket.create_server(("127.0.0.1", 0)) as far:
        with _bound_to(0) as free:
            port = free.getsockname()[1]
        with (
            socket.create_connection(far.getsockname()) as dialled,
            _connect_from(port, far.getsockname()) as punched,
        ):
            assert not link_module.on_shared_port(dialled)
            assert link_module.on_shared_port(punched)
            far.accept()[0].close()
            far.accept()[0].close()
