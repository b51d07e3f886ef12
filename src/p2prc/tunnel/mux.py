"""Streams multiplexed over a tunnel's one TLS connection, with per-stream flow control.

Both ends run a ``Mux`` over the control connection. The relay opens a stream for every
connection to a public port (``open`` with a stream id and the local port); bytes travel
as ``d`` frames, end-of-stream (half-close) as ``e``, an abort as ``x``, and credit as
``w``: a side may have at most ``WINDOW`` bytes of a stream in flight that the other side
has not yet written to its socket, so a stream whose reader is slow stops only itself,
memory per stream is bounded, and the other streams keep flowing. The owner's receive
loop hands every stream message to ``dispatch``, which never blocks, and a malformed one
to ``reject``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from ..errors import P2PRCError, TunnelProtocolError
from .protocol import WINDOW, Abort, Credit, Data, End, StreamMessage
from .streams import CHUNK, FramedStream, close_quietly

__all__ = ["WINDOW", "Mux", "MuxStream"]


class MuxStream:
    """One multiplexed connection: what arrived for it, and how much it may still send."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.credit = WINDOW
        self.queued = 0
        self.inbound: deque[bytes | None] = deque()  # None: the other side's end-of-stream
        self.arrived = asyncio.Event()
        self.may_send = asyncio.Event()
        self.may_send.set()
        self.aborted = False

    def __repr__(self) -> str:
        return f"<MuxStream {self.sid} [credit {self.credit}, queued {self.queued}]>"

    def abort(self) -> None:
        self.aborted = True
        self.arrived.set()
        self.may_send.set()


class Mux:
    """The streams of one control connection."""

    def __init__(self, control: FramedStream) -> None:
        self._control = control
        self.streams: dict[int, MuxStream] = {}
        self._next = 1
        self.closed = False

    def __repr__(self) -> str:
        return f"<Mux [{len(self.streams)} streams]>"

    def new_id(self) -> int:
        sid, self._next = self._next, self._next + 1
        return sid

    def open(self, sid: int) -> MuxStream:
        if self.closed:
            raise TunnelProtocolError("the tunnel is closed")
        if sid in self.streams:
            raise TunnelProtocolError(f"stream {sid} is already open")
        stream = self.streams[sid] = MuxStream(sid)
        return stream

    def dispatch(self, message: StreamMessage) -> None:
        """Apply one stream message; messages for unknown (already closed) streams are
        ignored, a stream that overruns its window is aborted."""
        stream = self.streams.get(message.s)
        if stream is None:
            return
        if isinstance(message, Data):
            if stream.queued + len(message.b) > WINDOW:
                self._abort(stream)
                return
            stream.inbound.append(message.b)
            stream.queued += len(message.b)
            stream.arrived.set()
        elif isinstance(message, Credit):
            stream.credit += message.n
            stream.may_send.set()
        elif isinstance(message, Abort):
            stream.abort()
        else:
            stream.inbound.append(None)
            stream.arrived.set()

    def reject(self, sid: int | None) -> None:
        """A malformed message for stream ``sid``: abort it, if it is open."""
        stream = None if sid is None else self.streams.get(sid)
        if stream is not None:
            self._abort(stream)

    async def pump(
        self, stream: MuxStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Socket <-> stream, both directions with half-close; then close and forget it."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._outbound(stream, reader))
                group.create_task(self._inbound(stream, writer))
        except* (OSError, P2PRCError, asyncio.IncompleteReadError):
            if not stream.aborted:
                stream.abort()
                with contextlib.suppress(OSError, P2PRCError):
                    await self._control.send(Abort(stream.sid))
        finally:
            self.streams.pop(stream.sid, None)
            await close_quietly(writer)

    def abort_all(self) -> None:
        """The connection under the streams is gone: end every stream, open no more."""
        self.closed = True
        for stream in self.streams.values():
            stream.abort()

    def _abort(self, stream: MuxStream) -> None:
        stream.abort()
        self._control.try_send(Abort(stream.sid))

    async def _outbound(self, stream: MuxStream, reader: asyncio.StreamReader) -> None:
        while True:
            while stream.credit <= 0 and not stream.aborted:
                stream.may_send.clear()
                await stream.may_send.wait()
            if stream.aborted:
                return
            # Never more than the credit: the other side refuses a stream over its window.
            data = await reader.read(min(CHUNK, stream.credit))
            if not data:
                break
            stream.credit -= len(data)
            await self._control.send(Data(stream.sid, data))
            del data  # not kept alive while the next read waits
        if not stream.aborted:
            await self._control.send(End(stream.sid))

    async def _inbound(self, stream: MuxStream, writer: asyncio.StreamWriter) -> None:
        unacked = 0
        while True:
            while not stream.inbound and not stream.aborted:
                stream.arrived.clear()
                await stream.arrived.wait()
            if stream.aborted:
                raise TunnelProtocolError("stream aborted")
            data = stream.inbound.popleft()
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            size = len(data)
            del data
            await writer.drain()
            stream.queued -= size
            unacked += size
            # Credit goes back a quarter window at a time: the sender, with a whole window,
            # never waits while this side keeps writing, and small messages cost no frame.
            if unacked >= WINDOW // 4:
                await self._control.send(Credit(stream.sid, unacked))
                unacked = 0
