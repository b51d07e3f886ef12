"""``RelayServer``: public ports on a reachable node for tunnel clients behind NAT.

A tunnel client opens one TLS connection (it pins the relay's node key), proves its own
key by signing the relay's nonce, and asks to ``expose`` ports. Every connection to a
public port becomes a stream multiplexed over that one connection, with per-stream flow
control (``tunnel/mux.py``); UDP datagrams ride it too (``tunnel/udp.py``). One process
serves every tunnel; limits cap ports, connections and domains per client, and
connections in all.

Domains: a client may ``route`` a domain to one of its local ports. On the relay's HTTP
port, requests go to the tunnel that routes their ``Host``; on its HTTPS port, connections
go by the ClientHello's server name, passed through undecrypted (the node holds the
certificate). A domain belongs to one node: while its tunnel is connected, for a grace
period after it drops (so a reconnect keeps it), and only while the relay allows that node.
The relay's own node routes domains to its local ports with ``route_local``.

Claims are first come, first served: the relay checks no proof that a node owns a domain
(no DNS or ACME challenge), so on a relay shared by many users a free name goes to whoever
asks first; a relay operator who hands out names should allow only the nodes it knows. Which
of a node's callers may point its domains where is the node's decision (``PortMapper``).

Public ports: the client may ask for one (a reconnect keeps its port), but never a
privileged one (below 1024) unless the operator's ``port_range`` includes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..errors import DomainTaken, InvalidRequest, P2PRCError, TunnelProtocolError
from ..identity import Identity, node_id_of, verify_signature
from ..trust import not_trusted_message
from .domains import MAX_HEAD, normalize_domain, request_host
from .frames import FrameDecoder
from .mux import Mux
from .protocol import (
    STREAM_TYPES,
    Challenge,
    Data,
    Datagram,
    Error,
    Expose,
    Exposed,
    Hello,
    MessageError,
    MessageType,
    Open,
    Ping,
    Pong,
    Route,
    Routed,
    StreamMessage,
    Unexpose,
    Unroute,
    Welcome,
    challenge_message,
)
from .sni import MAX_HELLO, NeedMore, server_name
from .streams import FramedStream, close_quietly, pipe, write
from .tls import server_context
from .udp import Datagrams, RecentPeers

__all__ = ["RelayLimits", "RelayServer", "TunnelLoad"]

_Bound = TypeVar("_Bound")
# A handler of one message type; the table's key says which message class it gets.
_Handler = Callable[["_Tunnel", Any], Awaitable[None]]
# Below this, ports are privileged: a client asks for one only inside an explicit range.
_UNPRIVILEGED = 1024
# Requests a malformed message of which is answered with an error (others are dropped).
_REQUESTS = frozenset({MessageType.EXPOSE, MessageType.ROUTE})

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """What one client may use."""

    ports_per_client: int = 16
    connections_per_client: int = 1024
    max_connections: int = 4096  # all clients together
    connect_timeout: float = 10.0
    port_range: tuple[int, int] = (0, 0)  # (0, 0): any free port from 1024 up
    domains_per_client: int = 16
    domain_grace: float = 300.0


@dataclass
class _Tunnel:
    node_id: str
    control: FramedStream
    mux: Mux
    # Where the client's control connection came from (its NAT's public side), if known.
    observed: tuple[str, int] | None = None
    servers: dict[int, asyncio.Server] = field(default_factory=dict)
    udp: dict[int, tuple[asyncio.DatagramTransport, RecentPeers]] = field(default_factory=dict)

    @property
    def ports(self) -> int:
        return len(self.servers) + len(self.udp)


@dataclass(frozen=True, slots=True)
class TunnelLoad:
    """One tunnel client's share of the relay: public ports and open streams."""

    node_id: str
    ports: int
    streams: int


@dataclass(slots=True)
class _Route:
    """A domain's owner and port; ``released``: loop time its tunnel went away."""

    node_id: str
    local_port: int
    released: float | None = None


class RelayServer(Component):
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
        http_port: int | None = None,
        https_port: int | None = None,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._identity = identity
        self._tls = server_context(identity, tls_dir)
        self._host, self._port, self._public_host = host, port, public_host
        self._allowed = allowed
        self.limits = limits or RelayLimits()
        self._server: asyncio.Server | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._tasks = TaskSet(on_crash)
        self._wanted_http, self._wanted_https = http_port, https_port
        self._routes: dict[str, _Route] = {}
        # The public sockets of connections being forwarded: closing the relay ends them.
        self._open: set[asyncio.StreamWriter] = set()
        self._web: list[asyncio.Server] = []
        self.port = 0
        self.http_port = 0
        self.https_port = 0
        # What a tunnel client may send once welcome; other messages are ignored.
        self._handlers: dict[MessageType, _Handler] = {
            **dict.fromkeys(STREAM_TYPES, self._stream),
            MessageType.EXPOSE: self._expose,
            MessageType.UNEXPOSE: self._unexpose,
            MessageType.ROUTE: self._route_request,
            MessageType.UNROUTE: self._unroute_request,
            MessageType.DATAGRAM: self._datagram_out,
            MessageType.PING: self._ping,
            MessageType.PONG: self._pong,
        }

    def __repr__(self) -> str:
        return f"<RelayServer [:{self.port} | {len(self._tunnels)} tunnels]>"

    def load(self) -> list[TunnelLoad]:
        """Every connected tunnel client with its public ports and open streams, by id."""
        return [
            TunnelLoad(node_id, tunnel.ports, len(tunnel.mux.streams))
            for node_id, tunnel in sorted(self._tunnels.items())
        ]

    @property
    def routes_domains(self) -> bool:
        """Whether this relay serves an HTTP or HTTPS port for domains."""
        return bool(self.http_port or self.https_port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, ssl=self._tls, limit=2**20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        host = self._public_host
        if self._wanted_http is not None:
            web = await asyncio.start_server(self._http, host, self._wanted_http, limit=MAX_HEAD)
            self.http_port = web.sockets[0].getsockname()[1]
            self._web.append(web)
        if self._wanted_https is not None:
            web = await asyncio.start_server(self._https, host, self._wanted_https)
            self.https_port = web.sockets[0].getsockname()[1]
            self._web.append(web)

    def route_local(self, domain: str, local_port: int) -> None:
        """Route ``domain`` to a port of this relay's own node."""
        self._claim(normalize_domain(domain), self._identity.node_id, local_port)

    def unroute(self, domain: str, node_id: str | None = None) -> None:
        """Release ``domain`` if ``node_id`` (default: this relay's node) holds it."""
        route = self._routes.get(domain)
        if route is not None and route.node_id == (node_id or self._identity.node_id):
            del self._routes[domain]

    async def aclose(self) -> None:
        for web in self._web:
            web.close()
        if self._server is not None:
            self._server.close()
        for tunnel in list(self._tunnels.values()):
            await self._drop(tunnel)
        await close_quietly(*self._open)  # connections being forwarded end with the relay
        self._open.clear()
        await self._tasks.cancel_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, FrameDecoder())
        try:
            nonce = secrets.token_hex(16)
            await stream.send(Challenge(nonce, self._identity.node_id))
            try:
                first = await asyncio.wait_for(stream.receive(), self.limits.connect_timeout)
            except MessageError as exc:
                raise TunnelProtocolError(f"malformed hello: {exc}") from None
            node_id = self._authenticate(first, nonce)
            tunnel = _Tunnel(node_id, stream, Mux(stream), observed=_observed(writer))
            await self._serve_tunnel(tunnel)
        except asyncio.IncompleteReadError:  # what FramedStream.receive raises at EOF
            log.info("relay connection closed by the peer")
            await close_quietly(writer)
        except (P2PRCError, OSError, TimeoutError) as exc:
            log.info("relay connection closed: %s", exc or type(exc).__name__)
            if not writer.is_closing():
                with contextlib.suppress(Exception):  # the peer may be gone mid-write
                    await stream.send(Error(str(exc)[:500]))
            await close_quietly(writer)

    def _authenticate(self, hello: object, nonce: str) -> str:
        if not isinstance(hello, Hello):
            raise TunnelProtocolError("expected hello")
        message = challenge_message(nonce, self._identity.node_id)
        verify_signature(hello.key, hello.signature, message)
        node_id = node_id_of(hello.key)
        if not self._allowed(node_id):
            refused_by = f"relay {self._identity.node_id}"
            raise TunnelProtocolError(not_trusted_message(refused_by, node_id, role="relay"))
        return node_id

    async def _serve_tunnel(self, tunnel: _Tunnel) -> None:
        previous = self._tunnels.pop(tunnel.node_id, None)
        if previous is not None:
            await self._drop(previous)
        self._tunnels[tunnel.node_id] = tunnel
        await tunnel.control.send(Welcome(tunnel.node_id, tunnel.observed))
        try:
            while True:
                try:
                    message = await tunnel.control.receive()
                except MessageError as exc:
                    await self._malformed(tunnel, exc)
                    continue
                handler = self._handlers.get(message.TYPE)
                if handler is not None:
                    await handler(tunnel, message)
        finally:
            if self._tunnels.get(tunnel.node_id) is tunnel:
                del self._tunnels[tunnel.node_id]
                now = asyncio.get_running_loop().time()
                for route in self._routes.values():
                    if route.node_id == tunnel.node_id:
                        route.released = now
            await self._drop(tunnel)

    async def _malformed(self, tunnel: _Tunnel, exc: MessageError) -> None:
        """A message that does not validate: a request gets an error, a stream is aborted,
        anything else (a datagram, a newer version's message) is dropped."""
        if exc.kind in _REQUESTS:
            await tunnel.control.send(Error(str(exc), InvalidRequest.code))
        elif exc.kind in STREAM_TYPES:
            tunnel.mux.reject(exc.stream)
        else:
            log.debug("dropped a message from %s: %s", tunnel.node_id, exc)

    async def _stream(self, tunnel: _Tunnel, message: StreamMessage) -> None:
        tunnel.mux.dispatch(message)

    async def _ping(self, tunnel: _Tunnel, message: Ping) -> None:
        """Answer, and measure our own round trip on the client's beat (it sizes the
        windows of streams towards the relay; a client that never answers keeps WINDOW)."""
        await tunnel.control.send(Pong())
        if not tunnel.mux.round_trip.waiting:
            tunnel.mux.round_trip.ping()
            await tunnel.control.send(Ping())

    async def _pong(self, tunnel: _Tunnel, message: Pong) -> None:
        tunnel.mux.round_trip.pong()

    async def _unexpose(self, tunnel: _Tunnel, message: Unexpose) -> None:
        server = tunnel.servers.pop(message.public_port, None)
        if server is not None:
            server.close()
        udp = tunnel.udp.pop(message.public_port, None)
        if udp is not None:
            udp[0].close()

    async def _unroute_request(self, tunnel: _Tunnel, message: Unroute) -> None:
        self.unroute(message.domain, tunnel.node_id)

    async def _route_request(self, tunnel: _Tunnel, message: Route) -> None:
        try:
            if not self.routes_domains:
                raise InvalidRequest("this relay does not route domains (no HTTP/HTTPS port)")
            domain = normalize_domain(message.domain)
            owned = sum(1 for r in self._routes.values() if r.node_id == tunnel.node_id)
            if domain not in self._routes and owned >= self.limits.domains_per_client:
                raise InvalidRequest("domain quota exceeded")
            self._claim(domain, tunnel.node_id, message.local_port)
        except P2PRCError as exc:
            await tunnel.control.send(Error(str(exc), exc.code))
            return
        await tunnel.control.send(Routed(domain, message.local_port))

    def _claim(self, domain: str, node_id: str, local_port: int) -> None:
        route = self._routes.get(domain)
        if route is not None and route.node_id != node_id and self._holds(route):
            raise DomainTaken(f"{domain} is already routed to another node on this relay")
        self._routes[domain] = _Route(node_id, local_port)

    def _holds(self, route: _Route) -> bool:
        """Whether the route's node still owns it."""
        if route.node_id == self._identity.node_id:
            return True
        if not self._allowed(route.node_id):
            return False
        if route.node_id in self._tunnels:
            return True
        now = asyncio.get_running_loop().time()
        return route.released is not None and now - route.released < self.limits.domain_grace

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A request on the HTTP port: route it by its Host header."""
        try:
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), self.limits.connect_timeout
            )
            domain = request_host(head)
        except (
            asyncio.LimitOverrunError,  # a head over MAX_HEAD
            asyncio.IncompleteReadError,
            OSError,
            TimeoutError,
            P2PRCError,
        ):
            await _http_error(writer, 400, "Bad Request", "not an HTTP/1 request with a Host")
            return
        await self._route(domain, reader, writer, head, http=True)

    async def _https(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection on the HTTPS port: route it by the TLS server name, undecrypted."""
        data = b""
        domain: str | None = None
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                while len(data) <= MAX_HELLO + 64:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    data += chunk
                    with contextlib.suppress(NeedMore):
                        domain = server_name(data) or ""
                        break
        except (OSError, TimeoutError, P2PRCError) as exc:
            log.info("HTTPS connection without a usable ClientHello: %s", exc)
        if not domain:
            await close_quietly(writer)
            return
        await self._route(domain, reader, writer, data, http=False)

    async def _route(
        self,
        domain: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes,
        *,
        http: bool,
    ) -> None:
        route = self._routes.get(domain)
        if route is not None and not self._holds(route):
            del self._routes[domain]
            route = None
        tunnel = None if route is None else self._tunnels.get(route.node_id)
        if route is not None and route.node_id == self._identity.node_id:
            try:
                far = await asyncio.open_connection("127.0.0.1", route.local_port)
            except OSError:
                if http:
                    await _http_error(writer, 502, "Bad Gateway", f"{domain} is not answering")
                await close_quietly(writer)
                return
            self._open.update((writer, far[1]))
            with contextlib.suppress(OSError):  # pipe ends both when the far end is gone
                write(far[1], initial)
            try:
                await pipe(reader, writer, *far)
            finally:
                self._open.difference_update((writer, far[1]))
        elif route is not None and tunnel is not None:
            await self._forward(tunnel, route.local_port, reader, writer, initial)
        elif http:
            reason = "is not routed here" if route is None else "has no connected node"
            status, phrase = (404, "Not Found") if route is None else (502, "Bad Gateway")
            await _http_error(writer, status, phrase, f"{domain} {reason}")
        else:
            await close_quietly(writer)

    async def _expose(self, tunnel: _Tunnel, message: Expose) -> None:
        local = message.local_port
        if tunnel.ports >= self.limits.ports_per_client:
            await tunnel.control.send(Error("port quota exceeded"))
            return
        if message.udp:
            await self._expose_udp(tunnel, local, message)
            return

        async def public(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._forward(tunnel, local, reader, writer)

        async def listen(port: int) -> asyncio.Server:
            return await asyncio.start_server(public, self._public_host, port)

        server = await self._bind_public(tunnel, message, listen)
        if server is None:
            return
        public_port = server.sockets[0].getsockname()[1]
        tunnel.servers[public_port] = server
        await tunnel.control.send(Exposed(local, public_port))

    async def _expose_udp(self, tunnel: _Tunnel, local: int, message: Expose) -> None:
        loop = asyncio.get_running_loop()
        peers = RecentPeers()
        public = 0

        def inbound(data: bytes, address: tuple[str, int]) -> None:
            peers.saw(address, loop.time())
            tunnel.control.try_send(Datagram(public, address, data))  # else dropped

        async def listen(port: int) -> asyncio.DatagramTransport:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Datagrams(inbound), local_addr=(self._public_host, port)
            )
            return transport

        transport = await self._bind_public(tunnel, message, listen)
        if transport is None:
            return
        public = transport.get_extra_info("sockname")[1]
        tunnel.udp[public] = (transport, peers)
        await tunnel.control.send(Exposed(local, public, udp=True))

    async def _datagram_out(self, tunnel: _Tunnel, message: Datagram) -> None:
        """An answer from the tunnel: only to an address that wrote to that port lately."""
        entry = tunnel.udp.get(message.p)
        if entry is not None and entry[1].allows(message.a, asyncio.get_running_loop().time()):
            entry[0].sendto(message.b, message.a)

    async def _bind_public(
        self,
        tunnel: _Tunnel,
        message: Expose,
        listen: Callable[[int], Awaitable[_Bound]],
    ) -> _Bound | None:
        """Listen on the first free public port (TCP or UDP); tell the client when none is."""
        for port in self._public_ports(message.public_port):
            with contextlib.suppress(OSError):  # taken: try the next one
                return await listen(port)
        await tunnel.control.send(Error("no free public port"))
        return None

    def _public_ports(self, wanted: int | None) -> list[int]:
        """Ports to try: the one asked for (a reconnect keeps its port), then the range."""
        low, high = self.limits.port_range
        ports = list(range(low, high + 1)) if low else [0]
        if wanted is not None and (
            low <= wanted <= high if low else _UNPRIVILEGED <= wanted < 65536
        ):
            ports.insert(0, wanted)
        return ports

    async def _forward(
        self,
        tunnel: _Tunnel,
        local: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes = b"",
    ) -> None:
        busy = len(tunnel.mux.streams) >= self.limits.connections_per_client
        if busy or len(self._open) >= self.limits.max_connections:
            await close_quietly(writer)
            return
        mux = tunnel.mux
        try:
            stream = mux.open(mux.new_id())
        except TunnelProtocolError:  # its tunnel just went away
            await close_quietly(writer)
            return
        self._open.add(writer)
        try:
            await tunnel.control.send(Open(stream.sid, local))
            if initial:  # bytes read to route it (an HTTP head, a ClientHello): under WINDOW
                stream.credit -= len(initial)
                await tunnel.control.send(Data(stream.sid, initial))
        except (OSError, P2PRCError):
            mux.streams.pop(stream.sid, None)
            self._open.discard(writer)
            await close_quietly(writer)
            return
        try:
            await mux.pump(stream, reader, writer)
        finally:
            self._open.discard(writer)

    async def _drop(self, tunnel: _Tunnel) -> None:
        for server in tunnel.servers.values():
            server.close()
        tunnel.servers.clear()
        for transport, _ in tunnel.udp.values():
            transport.close()
        tunnel.udp.clear()
        tunnel.mux.abort_all()  # its streams' public sockets close as their pumps end
        await close_quietly(tunnel.control.writer)


async def _http_error(writer: asyncio.StreamWriter, status: int, reason: str, text: str) -> None:
    body = f"{text}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        write(writer, head.encode() + body)
    await close_quietly(writer)


def _observed(writer: asyncio.StreamWriter) -> tuple[str, int] | None:
    """The peer address of a connection as an (IP, port) pair; an IPv4-mapped IPv6
    address as its IPv4 one; None when the transport does not say."""
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    port = peer[1]
    return (address.compressed, port) if isinstance(port, int) and 0 < port < 65536 else None
