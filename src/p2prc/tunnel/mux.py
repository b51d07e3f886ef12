"""Streams multiplexed over a tunnel's one TLS connection, with per-stream flow control.

Both ends run a ``Mux`` over the control connection. The relay opens a stream for every
connection to a public port (``open`` with a stream id and the local port); bytes travel
as ``d`` frames, end-of-stream (half-close) as ``e``, an abort as ``x``, and credit as
``w``: a side may have at most a window of a stream in flight that the other side has not
yet written to its socket, so a stream whose reader is slow stops only itself, memory per
stream is bounded, and the other streams keep flowing. The owner's receive loop hands
every stream message to ``dispatch``, which never blocks, and a malformed one to
``reject``.

Windows start at ``WINDOW`` and grow towards the tunnel's bandwidth-delay product: when a
stream's receiver writes out a whole window within ``GROW_RTTS`` round trips (``rtt``,
measured by the owner's pings), the sender was held back by the window, so the receiver
doubles it (up to ``MAX_WINDOW``) and sends the extra credit. The growth of all a
tunnel's streams together stays within ``GROWTH_BUDGET``; an idle or stalled stream never
grows. Extra credit goes as ``w`` frames of at most ``WINDOW`` each, which every version
accepts, so the wire format did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from ..errors import P2PRCError, TunnelProtocolError
from .protocol import WINDOW, Abort, Credit, Data, End, StreamMessage
from .streams import CHUNK, FramedStream, close_quietly, write, write_eof

__all__ = [
    "GROWTH_BUDGET",
    "GROW_RTTS",
    "MAX_WINDOW",
    "READ",
    "WINDOW",
    "Mux",
    "MuxStream",
    "RoundTrip",
]

# The most a stream's window grows to: 16 MiB fills 1.3 Gbit/s at 100 ms.
MAX_WINDOW = 16 * 1024 * 1024
# What all of one tunnel's streams may have grown beyond WINDOW together: the most a peer
# can make this side hold beyond today's WINDOW per open stream.
GROWTH_BUDGET = 64 * 1024 * 1024
# A window written out within this many round trips held its sender back: it doubles.
GROW_RTTS = 2.0
# Bytes a stream reads from its socket at most at a time, sent as frames of CHUNK and one
# wait for the control connection: the cost of a read, a lock and a drain per 240 KiB.
READ = 4 * CHUNK
# Seconds after which an unanswered ping counts as lost (a pong may be dropped when the
# connection is backed up) and the next one is timed instead.
_PING_LOST = 10.0


class RoundTrip:
    """The shortest round trip of a control connection, from ping and pong times: a ping
    waits behind the data queued on the same connection, and a window sized by that wait
    would grow the queue it measures."""

    def __init__(self) -> None:
        self.rtt: float | None = None
        self._sent: float | None = None

    def __repr__(self) -> str:
        return f"<RoundTrip {self.rtt}>"

    @property
    def waiting(self) -> bool:
        """Whether a ping is unanswered (and not yet given up as lost)."""
        if self._sent is None:
            return False
        return asyncio.get_running_loop().time() - self._sent < _PING_LOST

    def ping(self) -> None:
        """A ping goes out now."""
        self._sent = asyncio.get_running_loop().time()

    def pong(self) -> None:
        """Its pong arrived (an unasked pong is ignored)."""
        if self._sent is None:
            return
        sample = asyncio.get_running_loop().time() - self._sent
        self._sent = None
        self.rtt = sample if self.rtt is None else min(self.rtt, sample)


class MuxStream:
    """One multiplexed connection: what arrived for it, and how much it may still send."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.credit = WINDOW
        self.window = WINDOW  # what this side lets the other have in flight
        self.queued = 0
        self.inbound: deque[bytes | None] = deque()  # None: the other side's end-of-stream
        self.arrived = asyncio.Event()
        self.may_send = asyncio.Event()
        self.may_send.set()
        self.aborted = False
        # Bytes written out since ``written_since`` (loop time), towards the next window.
        self.written = 0
        self.written_since: float | None = None

    def __repr__(self) -> str:
        return (
            f"<MuxStream {self.sid} [credit {self.credit}, window {self.window},"
            f" queued {self.queued}]>"
        )

    def abort(self) -> None:
        self.aborted = True
        self.arrived.set()
        self.may_send.set()


class Mux:
    """The streams of one control connection."""

    def __init__(self, control: FramedStream, round_trip: RoundTrip | None = None) -> None:
        self._control = control
        self.round_trip = round_trip or RoundTrip()
        self.streams: dict[int, MuxStream] = {}
        self._next = 1
        self.closed = False

    def __repr__(self) -> str:
        return f"<Mux [{len(self.streams)} streams]>"

    @property
    def grown(self) -> int:
        """Bytes the open streams' windows have grown beyond ``WINDOW``, together."""
        return sum(stream.window - WINDOW for stream in self.streams.values())

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
            if stream.queued + len(message.b) > stream.window:
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

    def consumed(self, stream: MuxStream, size: int, now: float) -> int:
        """``size`` more bytes of ``stream`` were written out at loop time ``now``: how much
        its window grows (0 or more), already applied to ``stream.window``."""
        if stream.written_since is None:
            stream.written_since = now
        stream.written += size
        if stream.written < stream.window:
            return 0
        rtt = self.round_trip.rtt
        quick = rtt is not None and now - stream.written_since < GROW_RTTS * rtt
        stream.written, stream.written_since = 0, now
        if not quick:
            return 0
        room = GROWTH_BUDGET - self.grown
        grow = max(0, min(stream.window, MAX_WINDOW - stream.window, room))
        stream.window += grow
        return grow

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
            data = await reader.read(min(READ, stream.credit))
            if not data:
                break
            stream.credit -= len(data)
            await self._control.send_data(stream.sid, data)
            del data  # not kept alive while the next read waits
        if not stream.aborted:
            await self._control.send(End(stream.sid))

    async def _inbound(self, stream: MuxStream, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        unacked = 0
        while True:
            while not stream.inbound and not stream.aborted:
                stream.arrived.clear()
                await stream.arrived.wait()
            if stream.aborted:
                raise TunnelProtocolError("stream aborted")
            # Everything that arrived goes out together, with one wait for the socket.
            size = 0
            while stream.inbound and (data := stream.inbound[0]) is not None:
                stream.inbound.popleft()
                write(writer, data)
                size += len(data)
            data = None
            if size:
                await writer.drain()
                stream.queued -= size
                unacked += size + self.consumed(stream, size, loop.time())
            # Credit goes back a quarter window at a time: the sender, with a whole window,
            # never waits while this side keeps writing, and small messages cost no frame.
            # At most WINDOW a frame: what every version's receiver accepts.
            if unacked >= min(stream.window // 4, WINDOW):
                while unacked > 0:
                    await self._control.send(Credit(stream.sid, min(unacked, WINDOW)))
                    unacked -= WINDOW
                unacked = 0
            if stream.inbound and stream.inbound[0] is None:  # the other side's end
                write_eof(writer)
                return
