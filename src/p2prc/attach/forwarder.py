"""``RemoteMaps``: ``p2prc map-port PORT --remote NAME`` on the gateway of an attached host.

The socat-style binding of the original sketch: a TCP listener on the gateway whose every
connection is spliced to ``PORT`` of the attached host on the LAN, published like a local
port (through the node's relay when it is behind NAT, at its own address when public).

Who may map: the gateway's owner, or a key the host's allow list lets in (``allows``), and
only the host's SSH port or an attached port (``target``); every refusal reads the same as
the listener's. Each connection asks ``target`` again, so a host detached (or a port no
longer attached) stops being forwarded at once; its maps are closed within ``_WATCH`` s.
Maps persist in ``attached_maps`` and are opened again when the node starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..api._server import bind_api
from ..config import join_address
from ..errors import AttachRefused, LimitExceeded, NotFound, P2PRCError
from ..models import MappedPort
from ..tunnel.streams import CHUNK, close_quietly, pipe
from .gateway import REFUSED, AttachPolicy, Publisher
from .store import AttachedMap

__all__ = ["MAX_CONNECTIONS", "MAX_MAPS", "MapStore", "RemoteMaps"]

log = logging.getLogger(__name__)

MAX_MAPS = 64
MAX_CONNECTIONS = 256  # forwarded connections at once, every map together
_WATCH = 5.0


class MapStore(Protocol):
    """The ``attached_maps`` rows (``AttachStore``)."""

    def maps(self, name: str | None = None) -> list[AttachedMap]: ...
    def save_map(self, entry: AttachedMap) -> None: ...
    def delete_map(self, name: str, port: int) -> bool: ...


class RemoteMaps(Component):
    """The gateway's forwarded ports of attached hosts."""

    def __init__(
        self,
        store: MapStore,
        policy: Callable[[], AttachPolicy],
        *,
        host: str = "0.0.0.0",
        addresses: list[str] | None = None,
        publisher: Publisher | None = None,
        connect_timeout: float = 5.0,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._store, self._policy = store, policy
        self._host, self._addresses = host, addresses or []
        self._publisher, self._connect_timeout = publisher, connect_timeout
        self._servers: dict[tuple[str, int], asyncio.Server] = {}
        self._conns: set[asyncio.StreamWriter] = set()
        self._lock = asyncio.Lock()
        self._tasks = TaskSet(on_crash)
        self._handlers = TaskSet(log_crash)

    def __repr__(self) -> str:
        return f"<RemoteMaps [{len(self._servers)} maps | {len(self._conns)} connections]>"

    @property
    def _local_host(self) -> str:
        if self._host in ("0.0.0.0", ""):
            return "127.0.0.1"
        return "::1" if self._host == "::" else self._host

    async def start(self) -> None:
        self._tasks.spawn(self._watch(), "attach-maps")

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        await self._handlers.cancel_all()
        await close_quietly(*self._conns)
        self._conns.clear()

    def check(self, name: str, port: int, public_key: bytes) -> None:
        """``AttachRefused`` unless ``public_key`` may reach ``port`` of ``name`` here."""
        policy = self._policy()
        if policy.target(name, port) is None or not policy.allows(name, public_key):
            raise AttachRefused(REFUSED)

    async def map(self, name: str, port: int, public_key: bytes) -> MappedPort:
        """Forward and publish ``port`` of the attached host ``name`` (idempotent)."""
        self.check(name, port, public_key)
        async with self._lock:
            existing = {(m.name, m.port): m for m in self._store.maps(name)}.get((name, port))
            if (name, port) in self._servers and existing is not None:
                return await self._published(existing)
            if len(self._servers) >= MAX_MAPS:
                raise LimitExceeded(f"at most {MAX_MAPS} forwarded ports on this gateway")
            listen_port = existing.listen_port if existing is not None else 0
            entry = await self._open(name, port, listen_port)
            return await self._published(entry)

    async def unmap(self, name: str, port: int, public_key: bytes) -> None:
        self.check(name, port, public_key)
        async with self._lock:
            if not await self._close(name, port):
                raise NotFound(f"port {port} of {name} is not mapped on this gateway")

    async def _open(self, name: str, port: int, listen_port: int) -> AttachedMap:
        try:
            sock = bind_api(self._host, listen_port)
        except P2PRCError:
            if not listen_port:
                raise
            sock = bind_api(self._host, 0)  # the old port is taken now: another one

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._handlers.spawn(self._forward(name, port, reader, writer), "attach-forward")

        try:
            server = await asyncio.start_server(accept, sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise
        self._servers[(name, port)] = server
        entry = AttachedMap(name, port, int(sock.getsockname()[1]))
        self._store.save_map(entry)
        log.info("forwarding port %d to %s:%d", entry.listen_port, name, port)
        return entry

    async def _published(self, entry: AttachedMap) -> MappedPort:
        """Publish the listener (through the relay when behind NAT); its public address."""
        public = None
        if self._publisher is not None:
            public = await self._publisher.publish(self._local_host, entry.listen_port)
        if public is None:
            host = self._addresses[0] if self._addresses else self._local_host
            public = (host, entry.listen_port)
        saved = AttachedMap(entry.name, entry.port, entry.listen_port, *public)
        self._store.save_map(saved)
        return MappedPort(
            IPAddress=public[0],
            PortNo=public[1],
            EntireAddress=join_address(*public),
            local_port=entry.listen_port,
            relay="",
        )

    async def _close(self, name: str, port: int) -> bool:
        server = self._servers.pop((name, port), None)
        entries = [m for m in self._store.maps(name) if m.port == port]
        if server is not None:
            server.close()
        for entry in entries:
            if self._publisher is not None:
                with contextlib.suppress(P2PRCError, OSError):
                    await self._publisher.withdraw(entry.listen_port)
        deleted = self._store.delete_map(name, port)
        return server is not None or deleted

    async def _forward(
        self, name: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            await close_quietly(writer)
            return
        self._conns.add(writer)
        far: asyncio.StreamWriter | None = None
        try:
            try:
                target = self._policy().target(name, port)
            except RuntimeError:
                target = None
            if target is None:  # detached, or the port no longer attached
                return
            try:
                async with asyncio.timeout(self._connect_timeout):
                    far_reader, far = await asyncio.open_connection(*target, limit=CHUNK)
            except (OSError, TimeoutError) as exc:
                log.info("%s port %d does not answer: %r", name, port, exc)
                return
            self._conns.add(far)
            await pipe(reader, writer, far_reader, far)
        finally:
            self._conns.discard(writer)
            if far is not None:
                self._conns.discard(far)
            await close_quietly(writer, *([far] if far is not None else []))

    async def _watch(self) -> None:
        """Open the stored maps again (a restart), and close those whose host or port is
        gone (detached) or whose rows were removed."""
        while True:
            try:
                await self._reconcile()
            except (P2PRCError, OSError) as exc:
                log.info("forwarded ports of attached hosts: %s", exc)
            await asyncio.sleep(_WATCH)

    async def _reconcile(self) -> None:
        async with self._lock:
            try:
                policy = self._policy()
            except RuntimeError:  # the attach service is not running (yet)
                return
            stored = {(m.name, m.port): m for m in self._store.maps()}
            for key in list(self._servers):
                if key not in stored or policy.target(*key) is None:
                    await self._close(*key)
            for key, entry in stored.items():
                if policy.target(*key) is None:
                    await self._close(*key)
                elif key not in self._servers:
                    await self._published(await self._open(*key, entry.listen_port))
