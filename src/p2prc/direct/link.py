"""One direct path: a TCP connection between two nodes, TLS 1.3 with node certificates.

Handshake (``handshake``), bounded by ``HANDSHAKE_TIMEOUT``: the TLS client pins the
server's node id during the TLS handshake (``tls.pinned_context``); the server sends a
``Challenge`` (a nonce and its own id), the client answers ``Hello`` (its key and its
signature of ``challenge_message``, whose context differs from the relay's, so neither
signature is any use for the other), the server checks the key, that it is the node it
expected (when it expected one) and that it is allowed, and answers ``Welcome`` or
``Error``. A dialler is always the TLS client; after a hole punch, the lower node id.

Then both run a ``tunnel.mux.Mux`` over the connection (the relay's framing, windows and
flow control), where EITHER side opens streams: ``DirectOpen`` (type ``dopen``) names a
target on the other side, ``api`` or ``port N``; the receiver asks its ``Targets`` where
that is, refusing (``x``) what the opener may not reach. The TLS client's stream ids are
odd, the server's even, so the two never collide. Both sides ping every ``heartbeat``
seconds and answer pings; a path that hears nothing for ``stale`` seconds is dead: its
streams abort (their connections break like a TCP reset) and it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .._aio import CrashHandler, TaskSet, log_crash
from ..errors import NotTrusted, P2PRCError, TunnelProtocolError, WrongNode
from ..identity import Identity, node_id_of, verify_signature
from ..tunnel.frames import FrameDecoder
from ..tunnel.mux import Mux, MuxStream
from ..tunnel.protocol import (
    STREAM_TYPES,
    Abort,
    Challenge,
    Credit,
    Data,
    End,
    Error,
    Hello,
    Message,
    MessageError,
    Ping,
    Pong,
    Welcome,
    parse,
)
from ..tunnel.streams import FramedStream, close_quietly
from ..tunnel.tls import pinned_context

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_STREAMS",
    "DirectLink",
    "DirectOpen",
    "Targets",
    "Wire",
    "challenge_message",
    "handshake",
    "on_shared_port",
]

# Seconds from a connected socket to a checked peer, both ways.
HANDSHAKE_TIMEOUT = 10.0
# Streams one path carries at most, both sides' together.
MAX_STREAMS = 1024
# What a stream may be opened to.
TARGETS = ("api", "port")
_DOPEN = "dopen"
_MAX_STREAM_ID = 2**63 - 1
_READ = 256 * 1024
# SO_LINGER on, 0 seconds: close() resets the connection, leaving no TIME_WAIT.
_RESET = struct.pack("ii", 1, 0)

log = logging.getLogger(__name__)


def on_shared_port(sock: socket.socket) -> bool:
    """Whether ``sock`` is on a port other sockets share (``SO_REUSEPORT``): a hole punch's
    (``punch._bound``), or one accepted on the direct port; not a dialled one's own port."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except (OSError, AttributeError):  # no such option here, or not a socket
        return False


def challenge_message(nonce: str, server_id: str) -> bytes:
    """What the TLS client of a direct path signs to prove its key to the server."""
    return f"p2prc-direct-v1\n{nonce}\n{server_id}".encode()


@dataclass(frozen=True, slots=True)
class DirectOpen:
    """Stream ``s`` is a connection to ``target`` (``api``, or ``port`` with ``port``)."""

    s: int
    target: str
    port: int = 0

    def to_map(self) -> dict[str, object]:
        return {"type": _DOPEN, "s": self.s, "t": self.target, "p": self.port}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> DirectOpen:
        sid, target, port = data.get("s"), data.get("t"), data.get("p", 0)
        if type(sid) is not int or not 0 < sid <= _MAX_STREAM_ID:
            raise MessageError("dopen: bad stream id", _DOPEN)
        if target not in TARGETS:
            raise MessageError("dopen: unknown target", _DOPEN, sid)
        if type(port) is not int or not (1 <= port <= 65535 if target == "port" else port == 0):
            raise MessageError("dopen: bad port", _DOPEN, sid)
        return cls(sid, str(target), port)


# Where this side connects a stream the peer opened (peer id, target, port), or ``None``:
# not for that peer.
Targets = Callable[[str, str, int], tuple[str, int] | None]


class Wire:
    """Frames in and out of one TLS connection: sent through a ``FramedStream`` (the mux
    needs one), received here so direct messages and the relay's parse side by side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.out = FramedStream(reader, writer, FrameDecoder())
        self._decoder = FrameDecoder()
        self._queue: list[dict[str, object]] = []  # newest first: popped from the end
        # Seconds of the handshake's one round trip (the path's RTT until pings measure it).
        self.rtt: float | None = None

    async def receive_map(self) -> dict[str, object]:
        """The next decoded frame; ``IncompleteReadError`` at the end, ``TunnelProtocolError``
        when framing broke (the connection is done)."""
        while not self._queue:
            data = await self.reader.read(_READ)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            self._queue.extend(self._decoder.feed(data))
            self._queue.reverse()
        return self._queue.pop()

    async def receive(self) -> Message:
        return parse(await self.receive_map())


async def handshake(
    sock: socket.socket,
    identity: Identity,
    *,
    client: bool,
    server_context: ssl.SSLContext,
    expected: str | None,
    allowed: Callable[[str], bool],
) -> tuple[Wire, str]:
    """TLS and the challenge on a connected socket: its frames, and the checked peer's id.

    The client must name ``expected`` (it pins it); the server may (after a hole punch) or
    may not (an accepted dial). ``allowed`` is the trust policy (and membership) check.
    Raises ``WrongNode``, ``NotTrusted``, ``SignatureInvalid`` or ``TunnelProtocolError``; the
    socket is closed then.
    """
    if client and expected is None:
        raise ValueError("a direct path's TLS client pins the node it dials")
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # asyncio sets this only on sockets made with proto IPPROTO_TCP, and a socket
        # accepted from one made with proto 0 has 0: without it, Nagle holds a small
        # frame (a ping, a request) behind an unacknowledged one for a delayed ACK.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wire: Wire | None = None
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            if client:
                assert expected is not None  # checked above
                wire = Wire(*await _tls_client(sock, expected))
                await _prove(wire, identity, expected)
                peer = expected
            else:
                wire = Wire(*await _tls_server(sock, server_context))
                peer = await _check(wire, identity, expected)
            if not allowed(peer):
                raise NotTrusted(f"node {peer} may not use a direct path to this node")
    except BaseException as exc:
        if wire is not None:
            if not client and isinstance(exc, P2PRCError):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(wire.out.send(Error(str(exc)[:500], exc.code)), 1)
            await close_quietly(wire.writer)
        else:
            sock.close()
        if isinstance(exc, TimeoutError):
            raise TunnelProtocolError(
                f"direct path handshake not done within {HANDSHAKE_TIMEOUT:g} s"
            ) from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise WrongNode(str(exc.args[0] if exc.args else exc)) from None
        if isinstance(exc, ssl.SSLError | OSError | asyncio.IncompleteReadError):
            raise TunnelProtocolError(f"direct path handshake failed: {exc}") from None
        if isinstance(exc, MessageError):
            raise TunnelProtocolError(f"direct path handshake: {exc}") from None
        raise
    if not client:
        await wire.out.send(Welcome(peer))
    return wire, peer


async def _tls_client(
    sock: socket.socket, expected: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        sock=sock, ssl=pinned_context(expected), server_hostname="", limit=2**20
    )


async def _tls_server(
    sock: socket.socket, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=context)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _prove(wire: Wire, identity: Identity, server_id: str) -> None:
    """Client: sign the server's challenge, wait to be welcome."""
    challenge = await wire.receive()
    if not isinstance(challenge, Challenge) or challenge.relay != server_id:
        raise TunnelProtocolError("the far end sent no challenge of its own")
    signature = identity.sign(challenge_message(challenge.nonce, server_id))
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await wire.out.send(Hello(identity.public_key, signature))
    answer = await wire.receive()
    wire.rtt = loop.time() - sent
    if isinstance(answer, Error):
        raise TunnelProtocolError(f"node {server_id} refused the direct path: {answer.message}")
    if not isinstance(answer, Welcome) or answer.node_id != identity.node_id:
        raise TunnelProtocolError(f"node {server_id} did not welcome this node")


async def _check(wire: Wire, identity: Identity, expected: str | None) -> str:
    """Server: challenge the client; its node id once its signature checks out."""
    nonce = secrets.token_hex(16)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await wire.out.send(Challenge(nonce, identity.node_id))
    hello = await wire.receive()
    wire.rtt = loop.time() - sent
    if not isinstance(hello, Hello):
        raise TunnelProtocolError("expected hello")
    verify_signature(hello.key, hello.signature, challenge_message(nonce, identity.node_id))
    peer = node_id_of(hello.key)
    if expected is not None and peer != expected:
        raise WrongNode(f"expected node {expected}, the far end is {peer}")
    if peer == identity.node_id:
        raise WrongNode("a direct path to this node itself")
    return peer


class DirectLink:
    """The streams of one checked direct connection; ``closed`` is set when it is gone."""

    def __init__(
        self,
        wire: Wire,
        peer_id: str,
        *,
        client: bool,
        targets: Targets,
        heartbeat: float = 3.0,
        stale: float = 6.5,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self.peer_id, self.client = peer_id, client
        self._wire = wire
        # On the direct port it closes with a reset (``_close``).
        self._shared = on_shared_port(wire.writer.get_extra_info("socket"))
        self.mux = Mux(self._wire.out)
        self._targets = targets
        self._heartbeat, self._stale = heartbeat, stale
        self._tasks = TaskSet(on_crash)
        self._next = 1 if client else 2
        self.closed = asyncio.Event()
        self.reason = ""
        loop = asyncio.get_running_loop()
        self.since = loop.time()
        self.used = loop.time()  # when a stream last opened, either way
        self._last_heard = loop.time()

    def __repr__(self) -> str:
        side = "client" if self.client else "server"
        return f"<DirectLink {self.peer_id} [{side} | {len(self.mux.streams)} streams]>"

    @property
    def rtt_ms(self) -> float | None:
        rtt = self.mux.round_trip.rtt
        if rtt is None:  # no ping answered yet: the handshake's round trip
            rtt = self._wire.rtt
        return None if rtt is None else rtt * 1000

    @property
    def alive(self) -> bool:
        return not self.closed.is_set() and not self.mux.closed

    def start(self) -> None:
        self._tasks.spawn(self._receive_loop(), f"direct-{self.peer_id[:8]}-receive")
        self._tasks.spawn(self._beat(), f"direct-{self.peer_id[:8]}-heartbeat")
        self.mux.round_trip.ping()  # the first round trip sizes the windows: at once
        self._wire.out.try_send(Ping())

    async def aclose(self, reason: str = "closed") -> None:
        if not self.reason:
            self.reason = reason
        self.mux.abort_all()
        self.closed.set()
        if self._close():  # the reset is sent when the loop runs the transport's close
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._wire.writer.wait_closed(), 1.0)
        else:
            await close_quietly(self._wire.writer)
        await self._tasks.cancel_all()

    def _lost(self, reason: str) -> None:
        """The connection is gone (from one of its own tasks): end everything on it."""
        if not self.reason:
            self.reason = reason
        self.mux.abort_all()
        self.closed.set()
        if not self._close():
            self._wire.writer.close()

    def _close(self) -> bool:
        """A path on the direct port (a hole punch's) closes at once, with a reset: a TLS
        close waits up to 30 s for a gone peer's answer and a TCP close leaves TIME_WAIT,
        and either holds the port and peer address the next punch must use for as long.
        Its streams are aborted already. False for any other path (closed gracefully)."""
        if not self._shared:
            return False
        with contextlib.suppress(OSError, AttributeError):
            sock = self._wire.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self._wire.writer.transport.abort()
        return True

    async def pump(
        self, target: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Carry one local connection to ``target`` on the peer until it ends."""
        if not self.alive or len(self.mux.streams) >= MAX_STREAMS:
            await close_quietly(writer)
            raise TunnelProtocolError(f"no room for a stream on the direct path to {self.peer_id}")
        sid, self._next = self._next, self._next + 2
        stream = self.mux.open(sid)
        self.used = asyncio.get_running_loop().time()
        try:
            await self._wire.out.send(DirectOpen(sid, target, port).to_map())
        except (OSError, P2PRCError):
            self.mux.streams.pop(sid, None)
            await close_quietly(writer)
            raise TunnelProtocolError(f"the direct path to {self.peer_id} broke") from None
        await self.mux.pump(stream, reader, writer)

    async def open_socket(self, target: str, port: int = 0) -> socket.socket:
        """A local socket whose far end is ``target`` on the peer (a socket pair, the other
        end pumped over the path by a task of this link); what asyncssh's ``sock=`` takes.
        A stream the peer refuses ends the socket (end of file) at once."""
        if not self.alive or len(self.mux.streams) >= MAX_STREAMS:
            raise TunnelProtocolError(f"no room for a stream on the direct path to {self.peer_id}")
        mine, theirs = socket.socketpair()
        try:
            far_reader, far_writer = await asyncio.open_connection(sock=theirs)
        except OSError:
            mine.close()
            theirs.close()
            raise

        async def carry() -> None:
            with contextlib.suppress(P2PRCError):
                await self.pump(target, port, far_reader, far_writer)

        self._tasks.spawn(carry(), f"direct-{self.peer_id[:8]}-stream", contained=True)
        return mine

    async def open_stream(
        self, target: str, port: int = 0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``open_socket`` as asyncio streams."""
        return await asyncio.open_connection(sock=await self.open_socket(target, port), limit=2**20)

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while self.alive:  # the first ping at once: the path's round trip is known early
            if not self.mux.round_trip.waiting:
                self.mux.round_trip.ping()
            self._wire.out.try_send(Ping())
            await asyncio.sleep(self._heartbeat)
            if loop.time() - self._last_heard > self._stale:
                log.info("direct path to %s: no answer for %.1f s", self.peer_id, self._stale)
                self._lost(f"no answer for {self._stale:g} s")
                return

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        reason = "the connection closed"
        try:
            while True:
                raw = await self._wire.receive_map()
                self._last_heard = loop.time()
                self._handle(raw)
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError):
            pass
        except TunnelProtocolError as exc:
            reason = f"broken framing: {exc}"
        finally:
            self._lost(reason)

    def _handle(self, raw: dict[str, object]) -> None:
        if raw.get("type") == _DOPEN:
            try:
                self._opened(DirectOpen.from_map(raw))
            except MessageError as exc:
                if exc.stream is not None:
                    self._wire.out.try_send(Abort(exc.stream))
            return
        try:
            message = parse(raw)
        except MessageError as exc:
            if exc.kind in STREAM_TYPES:
                self.mux.reject(exc.stream)
            return  # anything else: a newer version's message, dropped
        if isinstance(message, Data | End | Abort | Credit):
            self.mux.dispatch(message)
        elif isinstance(message, Ping):
            self._wire.out.try_send(Pong())
        elif isinstance(message, Pong):
            self.mux.round_trip.pong()

    def _opened(self, message: DirectOpen) -> None:
        """The peer opens a stream: only with its own parity, within the bound, and to a
        target the peer may reach."""
        sid = message.s
        theirs = sid % 2 == (0 if self.client else 1)
        where = self._targets(self.peer_id, message.target, message.port) if theirs else None
        if where is None or len(self.mux.streams) >= MAX_STREAMS or sid in self.mux.streams:
            self._wire.out.try_send(Abort(sid))
            return
        stream = self.mux.open(sid)
        self.used = asyncio.get_running_loop().time()
        serve = self._serve(stream, *where)
        self._tasks.spawn(serve, f"direct-{self.peer_id[:8]}-serve", contained=True)

    async def _serve(self, stream: MuxStream, host: str, port: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            log.info("direct stream to %s:%d: %s", host, port, exc)
            self.mux.streams.pop(stream.sid, None)
            self._wire.out.try_send(Abort(stream.sid))
            return
        await self.mux.pump(stream, reader, writer)
