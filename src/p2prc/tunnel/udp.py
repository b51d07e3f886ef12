"""UDP through a tunnel: datagrams ride the control connection as ``protocol.Datagram``.

The relay binds a UDP port per mapping and sends each datagram to the tunnel client as a
``Datagram`` message (public port, remote address, payload); the client keeps one
connected UDP socket per remote address (a session) towards the local port and sends the
answers back the same way. The relay sends a datagram only to an address that sent to that
public port recently, so a client cannot make it a reflector. Datagrams are dropped, never
queued without bound, when the control connection is backed up; idle sessions close.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from .protocol import MAX_DATAGRAM

__all__ = ["MAX_PAYLOAD", "SESSION_IDLE", "Datagrams", "RecentPeers"]

# A datagram payload larger than this is dropped (the message decoder's own bound).
MAX_PAYLOAD = MAX_DATAGRAM
# Seconds without traffic after which a session (client) or a peer (relay) is forgotten.
SESSION_IDLE = 60.0


class Datagrams(asyncio.DatagramProtocol):
    """Calls ``on_datagram(data, address)`` for every datagram that arrives."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) <= MAX_PAYLOAD:
            self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and such
        pass


class RecentPeers:
    """Addresses that sent to a public UDP port lately (bounded, least recent dropped)."""

    def __init__(self, limit: int = 1024) -> None:
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._limit = limit

    def saw(self, address: tuple[str, int], now: float) -> None:
        self._seen[address] = now
        self._seen.move_to_end(address)
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def allows(self, address: tuple[str, int], now: float) -> bool:
        seen = self._seen.get(address)
        return seen is not None and now - seen < SESSION_IDLE
