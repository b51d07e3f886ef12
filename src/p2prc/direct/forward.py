"""A local port that reaches a port of a peer by the best path (``p2prc forward PEER PORT``).

Each connection to the local port goes over the peer's direct path when one is up (a
stream to ``port N``: the peer lets this node reach only its containers' ports there and
the ports its owner published), else the usual way: the port's public address on the
peer's relay (a container of this node's there), or the peer's own address when it is
public. The path is chosen per connection, so a connection made after the direct path
died goes the usual way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .._closing import Component
from ..config import join_address
from ..errors import AddressInUse, NodeError, P2PRCError
from ..tunnel.streams import close_quietly, pipe
from .paths import Paths

__all__ = ["PeerForward"]

log = logging.getLogger(__name__)

# Where the port is reachable without a direct path, or None.
Fallback = Callable[[], tuple[str, int] | None]


class PeerForward(Component):
    """Listens on ``bind:local`` and carries each connection to ``port`` of ``node_id``."""

    def __init__(
        self,
        paths: Paths,
        node_id: str,
        port: int,
        fallback: Fallback,
        *,
        bind: str = "127.0.0.1",
        local: int = 0,
    ) -> None:
        self._paths, self._node_id, self._port = paths, node_id, port
        self._fallback = fallback
        self._bind, self._local = bind, local
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # closed with the forward
        self.local_port = 0
        self.connections = 0
        self.last_path = ""

    def __repr__(self) -> str:
        return f"<PeerForward :{self.local_port} -> {self._node_id[:8]}:{self._port}>"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._bind, self._local)
        except OSError as exc:
            where = join_address(self._bind, self._local)
            if exc.errno == 98:
                raise AddressInUse(f"{where} is already in use; choose another --local") from None
            raise NodeError(f"cannot listen on {where}: {exc.strerror}") from None
        self.local_port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        await close_quietly(*self._open)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        try:
            await self._carry(reader, writer)
        finally:
            self._open.discard(writer)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = self._paths.link(self._node_id)
        if link is not None:
            self.last_path = "direct"
            with contextlib.suppress(P2PRCError):  # a broken path closes the connection
                await link.pump("port", self._port, reader, writer)
            return
        where = self._fallback()
        if where is None:
            log.info("forward to %s:%d: no path", self._node_id, self._port)
            await close_quietly(writer)
            return
        self.last_path = "fallback"
        try:
            far = await asyncio.wait_for(asyncio.open_connection(*where), 10)
        except (OSError, TimeoutError) as exc:
            log.info("forward to %s:%d: %s", where[0], where[1], exc)
            await close_quietly(writer)
            return
        await pipe(reader, writer, *far)
