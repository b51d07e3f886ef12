"""The attach listener's handshake (``attach/gateway.py``, ``attach/proxy.py``). Sans-IO,
except ``read_frame``, which reads exactly one frame and not a byte more.

Inside TLS (the client pins the gateway's node id), frames are ``tunnel/frames.py``'s (a
4-byte big-endian length, then a msgpack map with a string ``type``), at most
``MAX_HANDSHAKE_FRAME`` bytes each:

- gateway: ``{"type": "challenge", "nonce": <32 hex>}``
- client: ``{"type": "connect", "key": <32 raw bytes>, "name": .., "port": ..,
  "signature": <64 raw bytes>}``, signed over ``connect_message(...)``
- gateway: ``{"type": "ok"}``, after which the connection carries the raw bytes of the
  attached host's port both ways; or ``{"type": "error", "code": .., "message": ..}``, then
  it closes.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import TunnelProtocolError
from ..identity import verify_signature

__all__ = [
    "CONTEXT",
    "HANDSHAKE_TIMEOUT",
    "MAX_HANDSHAKE_FRAME",
    "Connect",
    "answer_of",
    "challenge",
    "connect_frame",
    "connect_message",
    "decode_frame",
    "encode_frame",
    "error",
    "is_node_id",
    "new_nonce",
    "ok",
    "parse_challenge",
    "parse_connect",
    "read_frame",
]

CONTEXT = b"p2prc-attach-v1\n"
MAX_HANDSHAKE_FRAME = 4096
# Seconds a client has from its TCP connection to its connect frame (TLS included).
HANDSHAKE_TIMEOUT = 10.0

_HEADER = struct.Struct(">I")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_NODE_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CODE = re.compile(r"^[a-z_]{1,40}$")
_MAX_MESSAGE = 512  # characters of an error's message a client shows


@dataclass(frozen=True, slots=True)
class Connect:
    """A client's request: reach ``port`` of the attached host ``name`` as ``key``."""

    key: bytes
    name: str
    port: int
    signature: bytes

    def verify(self, nonce: str, gateway: str) -> None:
        """``SignatureInvalid`` unless the signature covers this request for this nonce and
        this gateway (a signature for another gateway or another port is no use)."""
        message = connect_message(nonce, gateway, self.name, self.port)
        verify_signature(self.key, self.signature, message)


def new_nonce() -> str:
    return secrets.token_hex(16)


def connect_message(nonce: str, gateway: str, name: str, port: int) -> bytes:
    """The exact bytes a connect request's signature covers."""
    return CONTEXT + "\n".join([nonce, gateway, name, str(port)]).encode()


def encode_frame(message: dict[str, Any]) -> bytes:
    """One handshake frame (``ValueError`` over ``MAX_HANDSHAKE_FRAME``)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_HANDSHAKE_FRAME:
        raise ValueError(f"handshake frame of {len(body)} bytes")
    return _HEADER.pack(len(body)) + body


def challenge(nonce: str) -> bytes:
    return encode_frame({"type": "challenge", "nonce": nonce})


def decode_frame(body: bytes) -> dict[str, Any]:
    """A frame's map; ``TunnelProtocolError`` for anything else."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:
        raise TunnelProtocolError("undecodable handshake frame") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise TunnelProtocolError("a handshake frame must be a map with a string 'type'")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Exactly one frame from ``reader``: what follows it (raw bytes after ``ok``) stays
    in the reader. ``TunnelProtocolError`` for an oversized or undecodable frame,
    ``asyncio.IncompleteReadError`` when the connection ends first."""
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > MAX_HANDSHAKE_FRAME:
        raise TunnelProtocolError(f"handshake frame of {length} bytes (at most 4 KiB)")
    return decode_frame(await reader.readexactly(length))


def parse_connect(message: dict[str, Any]) -> Connect:
    """A client's connect frame, every field checked for type and size."""
    if message.get("type") != "connect":
        raise TunnelProtocolError(f"expected a connect frame, got {str(message['type'])[:40]!r}")
    if set(message) != {"type", "key", "name", "port", "signature"}:
        raise TunnelProtocolError("a connect frame has exactly key, name, port and signature")
    key, name, port, signature = (message[k] for k in ("key", "name", "port", "signature"))
    if not isinstance(key, bytes) or len(key) != 32:
        raise TunnelProtocolError("key must be 32 raw bytes (an Ed25519 public key)")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TunnelProtocolError("name must be an attached host's name")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise TunnelProtocolError("port must be a TCP port (1-65535)")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise TunnelProtocolError("signature must be 64 raw bytes (Ed25519)")
    return Connect(key, name, port, signature)


def parse_challenge(message: dict[str, Any]) -> str:
    """The gateway's nonce from its challenge frame."""
    nonce = message.get("nonce")
    if message.get("type") != "challenge" or not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise TunnelProtocolError("expected a challenge frame with a 32-hex nonce")
    return nonce


def connect_frame(identity_key: bytes, signature: bytes, name: str, port: int) -> bytes:
    message = {"type": "connect", "key": identity_key, "name": name, "port": port}
    return encode_frame({**message, "signature": signature})


def ok() -> bytes:
    return encode_frame({"type": "ok"})


def error(code: str, message: str) -> bytes:
    return encode_frame({"type": "error", "code": code, "message": message[:_MAX_MESSAGE]})


def answer_of(message: dict[str, Any]) -> tuple[str, str] | None:
    """``None`` for the gateway's ``ok``; else its refusal as (code, message), checked."""
    kind = message.get("type")
    if kind == "ok" and len(message) == 1:
        return None
    code, text = message.get("code"), message.get("message")
    if kind != "error" or not isinstance(code, str) or not isinstance(text, str):
        raise TunnelProtocolError("expected ok or an error from the gateway")
    if not _CODE.match(code):
        raise TunnelProtocolError("the gateway's error code is malformed")
    printable = "".join(c if c.isprintable() else "?" for c in text[:_MAX_MESSAGE])
    return code, printable


def is_node_id(text: str) -> bool:
    return bool(_NODE_ID.match(text))
