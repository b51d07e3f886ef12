"""Framed messages over asyncio streams, a pipe between two plain sockets, and a probe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import deque
from collections.abc import Coroutine
from typing import Any

from ..errors import P2PRCError
from .frames import FrameDecoder, encode, encode_data
from .protocol import Message, parse

__all__ = [
    "CHUNK",
    "CLOSE_WAIT",
    "FramedStream",
    "close_quietly",
    "connects",
    "pipe",
    "proxy_main",
    "stdio_pipe",
    "write",
    "write_eof",
]

# Bytes per data frame: well under MAX_FRAME with the msgpack overhead.
CHUNK = 60 * 1024
# Seconds close_quietly waits for connections to close: a TLS peer that is gone or silent
# can hold a close for its whole shutdown timeout (30 s), and a closed relay must not wait.
CLOSE_WAIT = 2.0


def write(writer: asyncio.StreamWriter, data: bytes | memoryview) -> None:
    """``writer.write(data)``, or ``ConnectionResetError`` when the connection is already
    lost or closing. asyncio's own loop drops such a write (and logs it); uvloop raises
    ``RuntimeError``, which no handler of connection errors expects: it once crashed a
    relayed stream's task, and with it the node, when a local server reset its end."""
    if writer.is_closing():
        raise ConnectionResetError("the connection is closed")
    writer.write(data)


def write_eof(writer: asyncio.StreamWriter) -> bool:
    """A half-close where the connection takes one and is still open (see ``write``):
    whether one was written."""
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()
        return True
    return False


class FramedStream:
    """Send and receive tunnel messages (``tunnel/protocol.py``) on one connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        self.reader, self.writer, self._decoder = reader, writer, decoder
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = asyncio.Lock()

    async def send(self, message: Message | dict[str, Any]) -> None:
        """Write one frame, waiting while the peer is slow (backpressure); a raw map is
        sent as it is (tests play peers that break the protocol)."""
        frame = encode(message) if isinstance(message, dict) else message.encode()
        async with self._lock:
            write(self.writer, frame)
            await self.writer.drain()

    async def send_data(self, sid: int, data: bytes) -> None:
        """Stream ``sid``'s ``data`` as ``d`` frames of at most ``CHUNK`` bytes, written
        together with one wait for the peer: one drain a read, not one a frame."""
        async with self._lock:
            with memoryview(data) as view:
                for start in range(0, len(data), CHUNK):
                    write(self.writer, encode_data(sid, view[start : start + CHUNK]))
            await self.writer.drain()

    def try_send(self, message: Message | dict[str, Any], limit: int = 1 << 20) -> bool:
        """Write one frame now unless ``limit`` bytes already wait (datagrams: dropped then)."""
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > limit:
            return False
        self.writer.write(encode(message) if isinstance(message, dict) else message.encode())
        return True

    async def receive(self) -> Message:
        """The next message; ``IncompleteReadError`` when the connection ended,
        ``TunnelProtocolError`` when it broke framing (it is done), ``MessageError`` for one
        frame that is no valid message (the next ``receive`` goes on)."""
        while not self._queue:
            data = await self.reader.read(256 * 1024)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            self._queue.extend(self._decoder.feed(data))
        return parse(self._queue.popleft())


async def _copy(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> bool:
    """Copy until EOF, waiting on the slower side; ``True`` when the target was half-closed
    (the other direction goes on), ``False`` when the whole connection should end."""
    try:
        while data := await source.read(CHUNK):
            write(target, data)
            await target.drain()
        if write_eof(target):
            return True
    except OSError:
        pass
    return False


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    far_reader: asyncio.StreamReader,
    far_writer: asyncio.StreamWriter,
) -> None:
    """Bytes both ways between two connections until both directions end.

    An EOF is passed on as a half-close where the target can take one (TCP, pipes); a TLS
    connection cannot, so an EOF towards it, or any error, ends both. Closes both.
    """
    tasks = {
        asyncio.create_task(_copy(reader, far_writer)),
        asyncio.create_task(_copy(far_reader, writer)),
    }
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and all(task.result() for task in done):
            await asyncio.wait(pending)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_quietly(writer, far_writer)


async def stdio_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b""
) -> None:
    """A ProxyCommand's splice: this process's stdin and stdout with a stream (``first``
    written to stdout before the rest) until both directions end.

    The process keeps no other copy of the two descriptors (0 and 1 become /dev/null):
    when the far end closes, closing the stdout pipe ends ssh's connection, and ssh quits
    instead of waiting on a stream that is gone."""
    loop = asyncio.get_running_loop()
    stdin_fd, stdout_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    stdin = asyncio.StreamReader(limit=CHUNK)
    in_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(stdin_fd, "rb", buffering=0)
    )
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    out_transport, _ = await loop.connect_write_pipe(
        lambda: protocol, os.fdopen(stdout_fd, "wb", buffering=0)
    )
    stdout = asyncio.StreamWriter(out_transport, protocol, None, loop)
    try:
        if first:
            stdout.write(first)
        await pipe(stdin, stdout, reader, writer)
    finally:
        in_transport.close()
        with contextlib.suppress(OSError):
            out_transport.close()


def proxy_main(work: Coroutine[Any, Any, object]) -> int:
    """Run a ProxyCommand's ``work``: its exit status, and a ``P2PRCError`` as one line on
    stderr (ssh shows it), never a traceback."""
    try:
        asyncio.run(work)
    except P2PRCError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def close_quietly(*writers: asyncio.StreamWriter) -> None:
    """Close every writer and wait (``CLOSE_WAIT`` in all, not each) for them, ignoring the
    errors of connections already gone; cancelling the caller still cancels it."""
    for writer in writers:
        writer.close()
    if not writers:
        return
    waits = [asyncio.ensure_future(writer.wait_closed()) for writer in writers]
    try:
        await asyncio.wait(waits, timeout=CLOSE_WAIT)
    finally:
        for wait in waits:
            if not wait.done():
                wait.cancel()
            elif not wait.cancelled():
                wait.exception()  # retrieved: OSError, SSL errors of a connection gone anyway


async def connects(host: str, port: int, within: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``within`` seconds."""
    if not host:
        return False
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    await close_quietly(writer)
    return True
