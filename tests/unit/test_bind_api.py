"""The API's listening socket: connections accepted from it get TCP_NODELAY from asyncio."""

from __future__ import annotations

import asyncio
import socket

from p2prc.api._server import bind_api
from p2prc.errors import P2PRCError


async def test_accepted_connections_do_not_wait_for_delayed_acks() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose proto says TCP; a proto-0 listener made
    # every keep-alive request after the first wait ~40 ms on asyncio's own loop.
    sock = bind_api("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 10) != 0
        writer.close()
        await writer.wait_closed()


def test_an_ipv6_listener_is_dual_stack_and_tcp() -> None:
    try:
        sock = bind_api("::", 0)
    except (OSError, P2PRCError):  # no IPv6 here
        return
    with sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
