"""``RelayServer``: public ports on a reachable node for tunnel clients behind NAT.

Control: a tunnel client opens one TLS connection (it pins the relay's node key), proves
its own key by signing the relay's nonce, and asks to ``expose`` ports. For every
connection to a public port the relay sends ``connect`` with a one-time token; the client
opens a data connection (TLS) that starts with ``data``+token, and the relay joins the two.
Bytes on data connections travel as ``d`` frames and end with ``e`` (TLS cannot half-close,
so end-of-stream is a frame). One process serves every tunnel; limits cap tunnels per
client, ports per tunnel and pending connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._aio import TaskSet
from ..errors import P2PRCError, TunnelProtocolError
from ..identity import Identity, b64decode, node_id_of, verify_signature
from .frames import FrameDecoder
from .streams import FramedStream, close_quietly, splice
from .tls import server_context

__all__ = ["RelayLimits", "RelayServer", "challenge_message"]

log = logging.getLogger(__name__)


def challenge_message(nonce: str, relay_id: str) -> bytes:
    """What a tunnel client signs to prove its key to a relay."""
    return f"p2prc-relay-v1\n{nonce}\n{relay_id}".encode()


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """What one client may use."""

    ports_per_client: int = 16
    pending_connections: int = 256
    connect_timeout: float = 10.0
    port_range: tuple[int, int] = (0, 0)  # (0, 0): any free port


@dataclass
class _Tunnel:
    node_id: str
    control: FramedStream
    servers: dict[int, asyncio.Server] = field(default_factory=dict)


class RelayServer:
    """Accepts tunnel clients and serves their public ports."""

    def __init__(
        self,
        identity: Identity,
        tls_dir: Path,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        public_host: str = "0.0.0.0",
        allowed: Callable[[str], bool] = lambda node_id: True,
        limits: RelayLimits | None = None,
    ) -> None:
        self._identity = identity
        self._tls = server_context(identity, tls_dir)
        self._host, self._port, self._public_host = host, port, public_host
        self._allowed = allowed
        self.limits = limits or RelayLimits()
        self._server: asyncio.Server | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._pending: dict[str, asyncio.Future[FramedStream]] = {}
        self._tasks = TaskSet()
        self.port = 0

    def __repr__(self) -> str:
        return f"<RelayServer [:{self.port} | {len(self._tunnels)} tunnels]>"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, ssl=self._tls, limit=2**20
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for tunnel in list(self._tunnels.values()):
            await self._drop(tunnel)
        await self._tasks.cancel_all()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, FrameDecoder())
        try:
            nonce = secrets.token_hex(16)
            await stream.send(
                {"type": "challenge", "nonce": nonce, "relay": self._identity.node_id}
            )
            first = await asyncio.wait_for(stream.receive(), self.limits.connect_timeout)
            if first["type"] == "data":
                await self._attach_data(stream, first)
                return
            node_id = self._authenticate(first, nonce)
            await self._serve_tunnel(_Tunnel(node_id, stream))
        except (P2PRCError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.info("relay connection closed: %s", exc or type(exc).__name__)
            if not writer.is_closing():
                with contextlib.suppress(Exception):  # the peer may be gone mid-write
                    await stream.send({"type": "error", "message": str(exc)[:200]})
            await close_quietly(writer)

    def _authenticate(self, hello: dict[str, Any], nonce: str) -> str:
        if hello.get("type") != "hello":
            raise TunnelProtocolError("expected hello")
        try:
            key = b64decode(str(hello["key"]))
            signature = b64decode(str(hello["signature"]))
        except (KeyError, ValueError):
            raise TunnelProtocolError("malformed hello") from None
        if len(key) != 32:
            raise TunnelProtocolError("malformed hello")
        verify_signature(key, signature, challenge_message(nonce, self._identity.node_id))
        node_id = node_id_of(key)
        if not self._allowed(node_id):
            raise TunnelProtocolError(f"node {node_id} may not use this relay")
        return node_id

    async def _serve_tunnel(self, tunnel: _Tunnel) -> None:
        previous = self._tunnels.pop(tunnel.node_id, None)
        if previous is not None:
            await self._drop(previous)
        self._tunnels[tunnel.node_id] = tunnel
        await tunnel.control.send({"type": "welcome", "node_id": tunnel.node_id})
        try:
            while True:
                message = await tunnel.control.receive()
                if message["type"] == "expose":
                    await self._expose(tunnel, message)
                elif message["type"] == "unexpose":
                    server = tunnel.servers.pop(int(message.get("public_port", 0)), None)
                    if server is not None:
                        server.close()
                elif message["type"] == "ping":
                    await tunnel.control.send({"type": "pong"})
                elif message["type"] == "refused":
                    waiter = self._pending.get(str(message.get("token", "")))
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(TunnelProtocolError("nothing listens there"))
        finally:
            if self._tunnels.get(tunnel.node_id) is tunnel:
                del self._tunnels[tunnel.node_id]
            await self._drop(tunnel)

    async def _expose(self, tunnel: _Tunnel, message: dict[str, Any]) -> None:
        local = message.get("local_port")
        if not isinstance(local, int) or not 1 <= local <= 65535:
            await tunnel.control.send({"type": "error", "message": "local_port must be 1-65535"})
            return
        if len(tunnel.servers) >= self.limits.ports_per_client:
            await tunnel.control.send({"type": "error", "message": "port quota exceeded"})
            return

        async def public(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._forward(tunnel, local, reader, writer)

        server = await asyncio.start_server(public, self._public_host, self._public_port(message))
        public_port = server.sockets[0].getsockname()[1]
        tunnel.servers[public_port] = server
        await tunnel.control.send(
            {"type": "exposed", "local_port": local, "public_port": public_port}
        )

    def _public_port(self, message: dict[str, Any]) -> int:
        wanted = message.get("public_port")
        low, high = self.limits.port_range
        if isinstance(wanted, int) and (low == high == 0 or low <= wanted <= high):
            return wanted
        return low if low else 0

    async def _forward(
        self,
        tunnel: _Tunnel,
        local: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if len(self._pending) >= self.limits.pending_connections:
            await close_quietly(writer)
            return
        token = secrets.token_hex(16)
        waiter: asyncio.Future[FramedStream] = asyncio.get_running_loop().create_future()
        self._pending[token] = waiter
        try:
            await tunnel.control.send({"type": "connect", "token": token, "local_port": local})
            data = await asyncio.wait_for(waiter, self.limits.connect_timeout)
        except (OSError, TimeoutError, P2PRCError):
            await close_quietly(writer)
            return
        finally:
            self._pending.pop(token, None)
        await splice(reader, writer, data)

    async def _attach_data(self, stream: FramedStream, message: dict[str, Any]) -> None:
        waiter = self._pending.get(str(message.get("token", "")))
        if waiter is None or waiter.done():
            raise TunnelProtocolError("unknown or used token")
        done = asyncio.get_running_loop().create_future()
        stream.on_close = done
        waiter.set_result(stream)
        await done  # the forwarding side owns the stream now; keep this handler alive

    async def _drop(self, tunnel: _Tunnel) -> None:
        for server in tunnel.servers.values():
            server.close()
        tunnel.servers.clear()
        await close_quietly(tunnel.control.writer)
