"""A user-space delay line: a TCP proxy on loopback that holds every chunk for a while.

The kernel here has no ``netem``; this stands in for distance. Each direction delivers
what it read ``rtt / 2`` seconds later, and stops reading while ``limit`` bytes wait (it
buffers, then pushes back on the sender as a slow link would). Used by the tunnel tests
and ``bench/distance.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["DelayLine"]

# Bytes one direction holds before it stops reading: more than 1 Gbit/s for 100 ms.
LIMIT = 32 * 1024 * 1024


class _Half(asyncio.Protocol):
    """One socket of a proxied connection; what it reads goes, late, to ``peer``."""

    def __init__(self, delay: float, limit: int) -> None:
        self.delay, self.limit = delay, limit
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.held: deque[tuple[float, bytes]] = deque()
        self.held_bytes = 0
        self.eof = False
        self.paused = False
        self.peer_full = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.held.append((loop.time() + self.delay, data))
        self.held_bytes += len(data)
        if self.held_bytes > self.limit and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        if self.timer is None:
            self._schedule()

    def eof_received(self) -> bool:
        self.eof = True
        if self.timer is None:
            self._schedule()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_full = True

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_full = False
            self.peer._deliver()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        when = self.held[0][0] if self.held else loop.time() + self.delay
        self.timer = loop.call_at(when, self._deliver)

    def _deliver(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        peer = self.peer.transport if self.peer is not None else None
        if peer is None or peer.is_closing():
            return
        now = asyncio.get_running_loop().time()
        while self.held and self.held[0][0] <= now and not self.peer_full:
            _, data = self.held.popleft()
            self.held_bytes -= len(data)
            peer.write(data)
        if self.paused and self.held_bytes <= self.limit // 2 and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
        if self.held:
            if not self.peer_full:
                self._schedule()
        elif self.eof:
            with contextlib.suppress(OSError):
                peer.write_eof()


class DelayLine:
    """``async with DelayLine(target_port, rtt) as line``: connect to ``line.port``."""

    def __init__(
        self,
        target_port: int,
        rtt: float,
        limit: int = LIMIT,
        *,
        host: str = "127.0.0.1",
        target_host: str = "127.0.0.1",
    ) -> None:
        self.target_port, self.rtt, self.limit = target_port, rtt, limit
        self.host, self.target_host = host, target_host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._connecting: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> DelayLine:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accepted, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _accepted(self) -> _Half:
        near = _Half(self.rtt / 2, self.limit)
        task = asyncio.ensure_future(self._connect(near))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return near

    async def _connect(self, near: _Half) -> None:
        loop = asyncio.get_running_loop()
        far = _Half(self.rtt / 2, self.limit)
        near.peer, far.peer = far, near
        try:
            await loop.create_connection(lambda: far, self.target_host, self.target_port)
        except OSError:
            if near.transport is not None:
                near.transport.close()
            return
        for half in (near, far):
            assert half.transport is not None
            self._transports.add(half.transport)
        if near.held and near.timer is None:  # bytes that came before the far side was up
            near._schedule()
