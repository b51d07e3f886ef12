"""``AttachGateway``: the gateway's TLS listener that forwards to its attached hosts' ports.

A client (``attach/proxy.py``) connects with TLS 1.3, pinning this node's id; the gateway
sends a nonce, the client signs it with its node key together with this gateway's id, the
attached host's name and the port (``attach/handshake.py``). The gateway checks the
signature, then asks the attach service whether that key may reach that host
(``allows``) and where the port is on the LAN (``target``: only the host's SSH port or one
of its attached ports, never anything else on the LAN). Both refusals read the same, so
the listener scans nothing. Only then does it dial the host and answer ``ok``; from there
it splices raw bytes both ways: SSH stays end to end between the client and the host, the
gateway never holds the session and never sees its plaintext.

Bounds: 10 s from TCP connect to the connect frame (TLS included), 4 KiB a handshake
frame, ``MAX_PER_KEY`` streams per key and ``MAX_TOTAL`` connections in all (handshakes
included); splicing waits for the slower side (drain), never buffering more than the
transports' own limits.

Behind NAT the listener is published through the node's relay (``PortMapper.publish``);
``endpoint()`` is then the relay's public address, and a change (the relay moved) calls
``on_endpoint`` so the signed records follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..api._server import bind_api
from ..config import join_address
from ..errors import P2PRCError, SignatureInvalid, TunnelProtocolError
from ..identity import Identity
from ..tunnel.streams import CHUNK, close_quietly, pipe, write
from ..tunnel.tls import server_context
from . import handshake

__all__ = [
    "MAX_PER_KEY",
    "MAX_TOTAL",
    "REFUSED",
    "AttachGateway",
    "AttachPolicy",
    "Publisher",
]

log = logging.getLogger(__name__)

MAX_PER_KEY = 32
MAX_TOTAL = 256
# Seconds between looks at the relay's address for the listener (it moves with the relay).
_WATCH = 2.0
_RETRY_FIRST, _RETRY_MOST = 1.0, 30.0
# The one answer for "this key may not" and "that host or port is not attached here".
REFUSED = "not allowed: no such attached host and port for this key on this gateway"


class AttachPolicy(Protocol):
    """What the listener asks the attach service (``node.attached``)."""

    def allows(self, name: str, public_key: bytes) -> bool: ...
    def target(self, name: str, port: int) -> tuple[str, int] | None: ...
    def own(self) -> Sequence[object]: ...


class Publisher(Protocol):
    """The node's port mapper, as far as the listener uses it."""

    @property
    def behind_nat(self) -> bool: ...
    async def publish(self, host: str, port: int) -> tuple[str, int] | None: ...
    def public_address(self, port: int) -> tuple[str, int] | None: ...
    async def withdraw(self, port: int) -> None: ...


class AttachGateway(Component):
    """The attach listener of one node."""

    def __init__(
        self,
        identity: Identity,
        tls_dir: Path,
        policy: Callable[[], AttachPolicy],
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        addresses: list[str] | None = None,
        publisher: Publisher | None = None,
        on_endpoint: Callable[[], None] | None = None,
        connect_timeout: float = 5.0,
        handshake_timeout: float = handshake.HANDSHAKE_TIMEOUT,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._identity, self._tls_dir, self._policy = identity, tls_dir, policy
        self._host, self._requested = host, port
        self._addresses = addresses or []
        self._publisher, self._on_endpoint = publisher, on_endpoint
        self._connect_timeout, self._handshake_timeout = connect_timeout, handshake_timeout
        self._server: asyncio.Server | None = None
        self._port = 0
        self._public: tuple[str, int] | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._per_key: Counter[bytes] = Counter()
        self._tasks = TaskSet(on_crash)
        self._handlers = TaskSet(log_crash)
        self.streams_served = 0

    def __repr__(self) -> str:
        return f"<AttachGateway {self.endpoint() or '-'} [{len(self._conns)} connections]>"

    @property
    def port(self) -> int:
        """The local port the listener is bound to."""
        return self._port

    @property
    def local_host(self) -> str:
        """Where this machine reaches the listener (loopback for a wildcard)."""
        if self._host in ("0.0.0.0", ""):
            return "127.0.0.1"
        return "::1" if self._host == "::" else self._host

    def endpoint(self) -> str:
        """``host:port`` where other nodes reach the listener: the relay's public address
        when published there (behind NAT), else this node's first advertised address."""
        if self._public is not None:
            return join_address(*self._public)
        if not self._port:
            return ""
        host = self._addresses[0] if self._addresses else self.local_host
        return join_address(host, self._port)

    async def start(self) -> None:
        sock = bind_api(self._host, self._requested)
        context = server_context(self._identity, self._tls_dir)
        try:
            self._server = await asyncio.start_server(
                self._accept,
                sock=sock,
                ssl=context,
                ssl_handshake_timeout=self._handshake_timeout,
                limit=CHUNK,
            )
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        if self._publisher is not None:
            self._tasks.spawn(self._watch(self._publisher), "attach-publish")
        log.info("attach listener on %s", join_address(self._host, self._port))

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        if self._server is not None:
            self._server.close()
        await self._handlers.cancel_all()
        await close_quietly(*self._conns)
        self._conns.clear()

    # -- publishing ------------------------------------------------------------------------

    async def ensure_published(self) -> str:
        """Publish the listener through the relay now if this node is behind NAT (the
        attach service calls it before signing a record); the endpoint either way."""
        publisher = self._publisher
        if publisher is not None and self._public is None and self._port:
            await self._publish(publisher)
        return self.endpoint()

    async def _publish(self, publisher: Publisher) -> None:
        public = await publisher.publish(self.local_host, self._port)
        await self._moved(public)

    async def _moved(self, public: tuple[str, int] | None) -> None:
        if public == self._public:
            return
        self._public = public
        log.info("attach listener reachable at %s", self.endpoint())
        if self._on_endpoint is not None:
            try:
                self._on_endpoint()
            except RuntimeError:  # the attach service is not running: it signs at start
                log.debug("attach listener moved while the attach service is not running")

    async def _watch(self, publisher: Publisher) -> None:
        """Keep the listener published through the relay while this node has attached
        hosts and is behind NAT; follow the relay's address when it moves."""
        delay = _RETRY_FIRST
        while True:
            try:
                if self._public is not None:
                    moved = publisher.public_address(self._port)
                    if moved is not None:
                        await self._moved(moved)
                elif self._policy().own() and publisher.behind_nat:
                    await self._publish(publisher)
                delay = _RETRY_FIRST
                await asyncio.sleep(_WATCH)
            except (P2PRCError, OSError, RuntimeError) as exc:
                # RuntimeError: the attach service is not running (yet, or any more).
                log.info("attach listener not published: %s; again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MOST)

    # -- serving ---------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of ours, not asyncio's: closing the gateway ends every stream.
        self._handlers.spawn(self._serve(reader, writer), "attach-stream")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_TOTAL:
            await self._refuse(writer, "rate_limited", "this gateway is at its connection limit")
            return
        self._conns.add(writer)
        key: bytes | None = None
        far: asyncio.StreamWriter | None = None
        try:
            opened = await self._handshake(reader, writer)
            if opened is None:
                return
            key, (far_reader, far) = opened
            self._conns.add(far)
            self.streams_served += 1
            await pipe(reader, writer, far_reader, far)
        finally:
            self._conns.discard(writer)
            if far is not None:
                self._conns.discard(far)
            if key is not None:
                self._per_key[key] -= 1
                if self._per_key[key] <= 0:
                    del self._per_key[key]
            await close_quietly(writer, *([far] if far is not None else []))

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bytes, tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None:
        """Challenge, connect, checks, dial; ``None`` once refused (answered already). The
        key's stream is counted when this returns one."""
        nonce = handshake.new_nonce()
        try:
            async with asyncio.timeout(self._handshake_timeout):
                write(writer, handshake.challenge(nonce))
                await writer.drain()
                request = handshake.parse_connect(await handshake.read_frame(reader))
        except TunnelProtocolError as exc:
            await self._refuse(writer, exc.code, str(exc))
            return None
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("attach handshake ended: %r", exc)
            return None
        try:
            request.verify(nonce, self._identity.node_id)
        except SignatureInvalid as exc:
            await self._refuse(writer, exc.code, "the connect signature does not verify")
            return None
        try:
            policy = self._policy()
            target = policy.target(request.name, request.port)
            allowed = policy.allows(request.name, request.key)
        except RuntimeError:  # the attach service is not running
            await self._refuse(writer, "attach_refused", REFUSED)
            return None
        if target is None or not allowed:
            await self._refuse(writer, "attach_refused", REFUSED)
            return None
        if self._per_key[request.key] >= MAX_PER_KEY:
            await self._refuse(writer, "rate_limited", f"at most {MAX_PER_KEY} streams per key")
            return None
        self._per_key[request.key] += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                far = await asyncio.open_connection(*target, limit=CHUNK)
        except (OSError, TimeoutError) as exc:
            self._per_key[request.key] -= 1
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else exc.strerror
            message = f"{request.name} port {request.port} does not answer the gateway: {reason}"
            await self._refuse(writer, "attach_failed", message)
            return None
        try:
            write(writer, handshake.ok())
            await writer.drain()
        except OSError:
            self._per_key[request.key] -= 1
            await close_quietly(far[1])
            return None
        _nodelay(far[1])
        return request.key, far

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        """Answer an error frame (best effort) and close."""
        with contextlib.suppress(OSError):
            write(writer, handshake.error(code, message))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await writer.drain()
        await close_quietly(writer)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
