"""Framed messages over asyncio streams, and the pumps between plain and framed sides."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from ..errors import P2PRCError, TunnelProtocolError
from .frames import FrameDecoder, encode

__all__ = [
    "CHUNK",
    "FramedStream",
    "close_quietly",
    "pipe",
    "relay_frames_to_plain",
    "relay_plain_to_frames",
    "splice",
]

# Bytes per data frame: one frame (with its 4-byte length and msgpack overhead) fits in
# one 16 KiB TLS record, which keeps OpenSSL's buffers small on idle connections.
CHUNK = 32 * 1024


class FramedStream:
    """Send and receive tunnel messages on one connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        self.reader, self.writer, self._decoder = reader, writer, decoder
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = asyncio.Lock()
        self.on_close: asyncio.Future[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        """Write one frame, waiting while the peer is slow (backpressure)."""
        async with self._lock:
            self.writer.write(encode(message))
            await self.writer.drain()

    def try_send(self, message: dict[str, Any], limit: int = 1 << 20) -> bool:
        """Write one frame now unless ``limit`` bytes already wait (datagrams: dropped then)."""
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > limit:
            return False
        self.writer.write(encode(message))
        return True

    async def receive(self) -> dict[str, Any]:
        """The next message; ``IncompleteReadError`` when the connection ended."""
        while not self._queue:
            data = await self.reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            self._queue.extend(self._decoder.feed(data))
        return self._queue.popleft()

    def closed(self) -> None:
        if self.on_close is not None and not self.on_close.done():
            self.on_close.set_result(None)


async def relay_plain_to_frames(reader: asyncio.StreamReader, framed: FramedStream) -> None:
    """Plain bytes into ``d`` frames; end-of-stream becomes an ``e`` frame."""
    while data := await reader.read(CHUNK):
        await framed.send({"type": "d", "b": data})
        del data  # not kept alive while the next read waits (memory per idle connection)
    await framed.send({"type": "e"})


async def relay_frames_to_plain(framed: FramedStream, writer: asyncio.StreamWriter) -> None:
    """``d`` frames into plain bytes; an ``e`` frame half-closes the plain side."""
    while True:
        message = await framed.receive()
        if message["type"] == "e":
            if writer.can_write_eof():
                writer.write_eof()
            return
        payload = message.get("b")
        if message["type"] != "d" or not isinstance(payload, bytes):
            raise TunnelProtocolError("expected a data frame")
        writer.write(payload)
        del message, payload
        await writer.drain()


async def splice(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: FramedStream
) -> None:
    """Plain socket <-> framed data connection, both directions, then close both."""
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(relay_plain_to_frames(reader, data))
            group.create_task(relay_frames_to_plain(data, writer))
    except* (OSError, P2PRCError, asyncio.IncompleteReadError):
        pass
    finally:
        await close_quietly(writer, data.writer)
        data.closed()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    far_reader: asyncio.StreamReader,
    far_writer: asyncio.StreamWriter,
) -> None:
    """Plain socket <-> plain socket, both directions with half-close, then close both."""
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_copy(reader, far_writer))
            group.create_task(_copy(far_reader, writer))
    except* OSError:
        pass
    finally:
        await close_quietly(writer, far_writer)


async def close_quietly(*writers: asyncio.StreamWriter) -> None:
    """Close every writer, ignoring the errors of connections already gone."""
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
