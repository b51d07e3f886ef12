"""Read the server name from the start of a TLS connection (SNI), without decrypting. Sans-IO.

``server_name(data)`` takes the first bytes a TLS client sent and returns the host name of
its ClientHello, ``None`` when there is none, or raises ``NeedMore`` when the hello is not
complete yet; anything that is not a TLS ClientHello raises ``TunnelProtocolError``.
"""

from __future__ import annotations

import struct

from ..errors import TunnelProtocolError

__all__ = ["MAX_HELLO", "NeedMore", "server_name"]

# A ClientHello larger than this is refused (post-quantum key shares make ~1.8 KiB ones).
MAX_HELLO = 16 * 1024
_HANDSHAKE, _CLIENT_HELLO, _SERVER_NAME, _HOST_NAME = 22, 1, 0, 0


class NeedMore(Exception):
    """The ClientHello is not complete yet: read more bytes."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise TunnelProtocolError("truncated ClientHello")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Reader:
        return _Reader(self.take(self.number(length_size)))

    @property
    def left(self) -> int:
        return len(self._data) - self._at


def _handshake_bytes(data: bytes) -> bytes:
    """Concatenate handshake records until the ClientHello is whole (it may span records)."""
    body, at = b"", 0
    while True:
        if len(data) - at < 5:
            raise NeedMore
        kind, _version, length = struct.unpack_from(">BHH", data, at)
        if kind != _HANDSHAKE or length == 0 or length > MAX_HELLO:
            raise TunnelProtocolError("not a TLS handshake")
        if len(data) - at - 5 < length:
            raise NeedMore
        body += data[at + 5 : at + 5 + length]
        at += 5 + length
        if len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                raise TunnelProtocolError("not a TLS ClientHello")
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > MAX_HELLO:
                raise TunnelProtocolError("ClientHello too large")
            if len(body) >= needed:
                return body[4:needed]


def server_name(data: bytes) -> str | None:
    """The SNI host name of the ClientHello at the start of ``data`` (lower-cased)."""
    hello = _Reader(_handshake_bytes(data))
    hello.take(2 + 32)  # legacy version, random
    hello.vector(1)  # session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    if hello.left == 0:
        return None  # no extensions at all
    extensions = hello.vector(2)
    while extensions.left:
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = body.vector(2)
        while names.left:
            name_type = names.number(1)
            name = names.take(names.number(2))
            if name_type == _HOST_NAME:
                try:
                    return name.decode("ascii").lower()
                except UnicodeDecodeError:
                    raise TunnelProtocolError("server name is not ASCII") from None
    return None
