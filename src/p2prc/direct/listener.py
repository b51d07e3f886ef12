"""The direct port: where peers dial this node's direct paths.

One listening socket with ``SO_REUSEADDR`` and ``SO_REUSEPORT``, so a hole punch
(``direct/punch.py``) can bind the same port for its outgoing connections. On a wildcard
host it listens dual stack (``::`` with IPv6-only off) where the machine has IPv6, so
peers reach it at any address the node's record advertises. Accepted sockets go to
``accept``, at most ``MAX_PENDING`` at a time: more are closed at once (a flood costs
this node nothing but the accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..errors import AddressInUse, NodeError

__all__ = ["MAX_PENDING", "DirectListener", "bind_direct"]

# Connections in their handshake at once.
MAX_PENDING = 64

log = logging.getLogger(__name__)

Accept = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]


def bind_direct(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket for direct paths (reusable port, dual stack on a
    wildcard host when IPv6 works)."""
    wildcard = host in ("0.0.0.0", "::", "")
    family = socket.AF_INET6 if ":" in host or (wildcard and socket.has_ipv6) else socket.AF_INET
    try:
        return _bind(family, "::" if wildcard and family == socket.AF_INET6 else host, port)
    except OSError as exc:
        if wildcard and family == socket.AF_INET6 and exc.errno != errno.EADDRINUSE:
            with contextlib.suppress(OSError):
                return _bind(socket.AF_INET, "0.0.0.0", port)  # no IPv6 here
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            message = f"direct port {where} is already in use; set another in [direct] port"
            raise AddressInUse(message) from None
        raise NodeError(f"cannot listen for direct paths on {where}: {exc.strerror}") from None


def _bind(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DirectListener(Component):
    """Accepts direct connections and hands each socket to ``accept``."""

    def __init__(
        self, host: str, port: int, accept: Accept, *, on_crash: CrashHandler = log_crash
    ) -> None:
        self._host, self._wanted = host, port
        self._accept = accept
        self._tasks = TaskSet(on_crash)
        self._sock: socket.socket | None = None
        self._pending = 0
        self.port = 0

    def __repr__(self) -> str:
        return f"<DirectListener :{self.port} [{self._pending} in handshake]>"

    async def start(self) -> None:
        self._sock = bind_direct(self._host, self._wanted)
        self.port = self._sock.getsockname()[1]
        self._tasks.spawn(self._accept_loop(self._sock), "direct-accept")

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        if self._sock is not None:
            self._sock.close()

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, say: wait, do not spin
                log.warning("direct port: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if self._pending >= MAX_PENDING:
                sock.close()
                continue
            self._pending += 1
            handle = self._handle(sock, (str(address[0]), int(address[1])))
            self._tasks.spawn(handle, "direct-in", contained=True)

    async def _handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            await self._accept(sock, address)
        finally:
            self._pending -= 1
