"""The API's HTTP server: uvicorn inside the node's loop, with bounds a stranger cannot lift."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from ..errors import AddressInUse, NodeError

__all__ = ["ApiServer", "api_server", "bind_api"]

# Bounds on the API server (uvicorn): connections and requests in flight, the listen
# backlog, and seconds an idle keep-alive connection stays open.
_API_CONCURRENCY = 256
_API_BACKLOG = 1024
_API_KEEP_ALIVE = 5
# Seconds a connection may take to send a request's head (method, path, headers), so
# idle or trickling connections cannot hold the concurrency limit.
_API_HEAD_TIMEOUT = 10.0


class ApiServer(uvicorn.Server):
    """uvicorn inside our loop: the node, not uvicorn, owns signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(app: FastAPI, *, shutdown: float) -> ApiServer:
    """A server for ``app`` with the node's bounds; ``shutdown`` seconds to finish requests."""
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=int(shutdown),
        # Every relayed caller connects from loopback: never take X-Forwarded-For's word.
        proxy_headers=False,
        # Connections and requests at once (idle keep-alives included): past this uvicorn
        # answers 503, well before the usual 1,024 file descriptors run out.
        limit_concurrency=_API_CONCURRENCY,
        backlog=_API_BACKLOG,
        timeout_keep_alive=_API_KEEP_ALIVE,
        http=_http_protocol(),
    )
    return ApiServer(config)


def bind_api(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port`` (dual stack for an IPv6 host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every keep-alive request after the first waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(_API_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{where} is already in use; choose another with --port") from None
        raise NodeError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def _http_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline on every request head."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools (a bare install): uvicorn's own choice, no deadline
        return "auto"

    class HeadDeadline(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(_API_HEAD_TIMEOUT, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline
