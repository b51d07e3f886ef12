"""An httpx transport whose connections are streams of a direct path (target ``api``).

The direct path is TLS pinned to the peer's node id and proves this node's key to it, so
requests go over it as plain HTTP to the peer's plain API, with no TLS inside the TLS: a
``https://<node id>@relay:port`` URL is sent as ``http`` (the signed part of a request is
its method, path, audience and body, none of which changes). Requests are signed as
everywhere else; the peer's API checks them as it checks every request.
"""

# httpcore's network interface takes ``timeout`` arguments: they are its signature.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import ssl
import typing

import httpcore
import httpx

from ..errors import TunnelProtocolError
from ..tunnel.streams import write
from .link import DirectLink

__all__ = ["DirectTransport"]


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("the direct path did not answer in time") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                write(self._writer, buffer)
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("the direct path took no more bytes in time") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1):
                await self._writer.wait_closed()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no TLS inside a direct path")

    def get_extra_info(self, info: str) -> typing.Any:
        return None


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, link: DirectLink) -> None:
        self._link = link

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            return _Stream(*await self._link.open_stream("api"))
        except (TunnelProtocolError, OSError) as exc:
            raise httpcore.ConnectError(str(exc)) from None

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a direct path carries TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class DirectTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (its error mapping, HTTP/1.1), connecting over ``link``."""

    def __init__(self, link: DirectLink) -> None:
        super().__init__(verify=False)  # no CA bundle loaded: nothing here speaks TLS
        # The pool httpx built, replaced by one on the direct path (httpx takes no backend).
        self._pool = httpcore.AsyncConnectionPool(network_backend=_Backend(link))
        self.link = link

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            request.url = request.url.copy_with(scheme="http")
        return await super().handle_async_request(request)
