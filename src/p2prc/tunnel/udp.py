"""UDP through a tunnel: datagrams ride the control connection as ``u`` frames.

The relay binds a UDP port per mapping and sends each datagram to the tunnel client as
``{"type": "u", "p": public_port, "a": [host, port], "b": payload}``; the client keeps one
connected UDP socket per remote address (a session) towards the local port and sends the
answers back the same way. The relay sends a datagram only to an address that sent to that
public port recently, so a client cannot make it a reflector. Datagrams are dropped, never
queued without bound, when the control connection is backed up; idle sessions close.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

__all__ = ["MAX_PAYLOAD", "SESSION_IDLE", "Datagrams", "RecentPeers", "datagram_frame", "parse"]

# A datagram payload larger than this is dropped (a frame holds at most 64 KiB).
MAX_PAYLOAD = 60_000
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


def datagram_frame(public_port: int, address: tuple[str, int], data: bytes) -> dict[str, Any]:
    return {"type": "u", "p": public_port, "a": [address[0], address[1]], "b": data}


def parse(message: dict[str, Any]) -> tuple[int, tuple[str, int], bytes] | None:
    """``(public_port, address, payload)`` of a ``u`` frame, or None when malformed."""
    port, address, data = message.get("p"), message.get("a"), message.get("b")
    if not isinstance(port, int) or not isinstance(data, bytes) or len(data) > MAX_PAYLOAD:
        return None
    if not isinstance(address, list) or len(address) != 2:
        return None
    host, remote_port = address
    if not isinstance(host, str) or not isinstance(remote_port, int) or len(host) > 64:
        return None
    return port, (host, remote_port), data
