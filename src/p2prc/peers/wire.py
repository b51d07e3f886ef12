"""The gossip datagram: ``P2G1 + msgpack([sender, kind, seq, target, updates]) + Ed25519``.

At most ``MAX_DATAGRAM`` bytes; whoever opens one checks its shape before its signature
and its signature before anything in it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import PeerProtocolError
from ..identity import Identity, verify_signature

__all__ = ["MAX_DATAGRAM", "SIGNATURE", "open_datagram", "seal"]

MAX_DATAGRAM = 1400
SIGNATURE = 64
_MAGIC = b"P2G1"
_MAX_UPDATES = 64


def seal(identity: Identity, body: list[Any]) -> bytes:
    """The signed datagram carrying ``body``."""
    payload: bytes = _MAGIC + msgpack.packb(body, use_bin_type=True)
    return payload + identity.sign(payload)


def open_datagram(
    data: bytes, public_key: Callable[[str], bytes | None]
) -> tuple[str, str, int, str, list[Any]]:
    """``(sender, kind, seq, target, updates)`` of a datagram signed by a known sender."""
    if len(data) > MAX_DATAGRAM or len(data) < len(_MAGIC) + SIGNATURE:
        raise PeerProtocolError("not a p2prc gossip datagram")
    if not data.startswith(_MAGIC):
        raise PeerProtocolError("not a p2prc gossip datagram")
    payload, signature = data[:-SIGNATURE], data[-SIGNATURE:]
    try:
        body = msgpack.unpackb(payload[len(_MAGIC) :], raw=False, max_bin_len=MAX_DATAGRAM)
    except Exception:
        raise PeerProtocolError("undecodable datagram") from None
    if not isinstance(body, list) or len(body) != 5:
        raise PeerProtocolError("malformed datagram")
    sender, kind, seq, target, updates = body
    if not (isinstance(sender, str) and isinstance(kind, str) and isinstance(seq, int)):
        raise PeerProtocolError("malformed datagram")
    if not isinstance(target, str) or not isinstance(updates, list):
        raise PeerProtocolError("malformed datagram")
    if len(updates) > _MAX_UPDATES:
        raise PeerProtocolError("malformed datagram")
    key = public_key(sender)
    if key is None:
        raise PeerProtocolError("unknown sender")
    try:
        verify_signature(key, signature, payload)
    except Exception:
        raise PeerProtocolError("forged datagram") from None
    return sender, kind, seq, target, updates
