"""Tunnel control frames: a 4-byte big-endian length, then a msgpack map. Sans-IO.

``encode(message)`` gives the bytes of one frame (``encode_data``: a ``d`` frame, with one
copy of its bytes); ``FrameDecoder.feed(data)`` takes bytes
in any chunking and returns the complete messages. Every message is a map with a string
``type``; frames above ``MAX_FRAME`` bytes or that do not decode raise
``TunnelProtocolError`` and the decoder refuses further input (the connection is done).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ..errors import TunnelProtocolError

__all__ = ["MAX_FRAME", "FrameDecoder", "encode", "encode_data"]

MAX_FRAME = 64 * 1024
_HEADER = struct.Struct(">I")
# msgpack of {"type": "d", "s": ...} up to the stream id, and the "b" key after it.
_DATA, _B = b"\x83\xa4type\xa1d\xa1s", b"\xa1b"
_BIN8, _BIN16 = struct.Struct(">BB"), struct.Struct(">BH")


def encode(message: dict[str, Any]) -> bytes:
    """One frame for ``message`` (which must have a string ``type``)."""
    if not isinstance(message.get("type"), str):
        raise TypeError("a tunnel message needs a string 'type'")
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes is over {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def encode_data(sid: int, data: bytes | memoryview) -> bytes:
    """The frame of ``{"type": "d", "s": sid, "b": data}``, byte for byte what ``encode``
    gives, but ``data`` copied once (not into msgpack's buffer, its bytes, then the frame)."""
    size = len(data)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over {MAX_FRAME}")
    head = _BIN8.pack(0xC4, size) if size < 256 else _BIN16.pack(0xC5, size)
    head = _DATA + msgpack.packb(sid) + _B + head
    if len(head) + size > MAX_FRAME:
        raise ValueError(f"frame of {len(head) + size} bytes is over {MAX_FRAME}")
    return b"".join((_HEADER.pack(len(head) + size), head, data))


class FrameDecoder:
    """Reassembles frames from a byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False

    def __repr__(self) -> str:
        return f"<FrameDecoder [{len(self._buffer)} bytes buffered]>"

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every message now complete, in order."""
        if self._failed:
            raise TunnelProtocolError("the stream already failed")
        self._buffer += data
        messages = []
        start, size = 0, len(self._buffer)
        # Frames are decoded in place and the buffer cut once: no copy per frame.
        with memoryview(self._buffer) as view:
            while size - start >= _HEADER.size:
                (length,) = _HEADER.unpack_from(view, start)
                if length > MAX_FRAME:
                    self._failed = True
                    raise TunnelProtocolError(f"frame of {length} bytes is over {MAX_FRAME}")
                end = start + _HEADER.size + length
                if size < end:
                    break
                messages.append(self._decode(view[start + _HEADER.size : end]))
                start = end
        del self._buffer[:start]
        return messages

    def _decode(self, body: memoryview) -> dict[str, Any]:
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception:
            self._failed = True
            raise TunnelProtocolError("undecodable frame") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._failed = True
            raise TunnelProtocolError("a frame must be a map with a string 'type'")
        return message
