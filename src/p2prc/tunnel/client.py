"""``TunnelClient``: a node behind NAT keeps one connection to a relay and serves through it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..errors import P2PRCError, RelayUnavailable, TunnelError, TunnelProtocolError, error_class
from ..identity import Identity
from .frames import FrameDecoder
from .mux import Mux, MuxStream
from .protocol import (
    STREAM_TYPES,
    Abort,
    Challenge,
    Datagram,
    Error,
    Expose,
    Exposed,
    Hello,
    MessageError,
    MessageType,
    Open,
    Ping,
    Pong,
    Route,
    Routed,
    StreamMessage,
    Unexpose,
    Unroute,
    Welcome,
    challenge_message,
)
from .streams import FramedStream, close_quietly
from .tls import client_context, verify_peer
from .udp import SESSION_IDLE, Datagrams

# UDP sessions (remote addresses) one client keeps open at most.
_MAX_SESSIONS = 1024
# Seconds the relay has to answer a request: it binds a port or claims a name, so an answer
# later than this is a relay in trouble (the mapper then tries again or fails over).
_ANSWER_TIMEOUT = 10.0
# Seconds to connect and pass the handshake unless the caller says (``[timeouts] connect``).
CONNECT_TIMEOUT = 10.0

__all__ = ["CONNECT_TIMEOUT", "TunnelClient"]

_Answer = TypeVar("_Answer", Exposed, Routed)
# A handler of one message type from the relay; the table's key says which class it gets.
_Handler = Callable[[FramedStream, Mux, Any], Awaitable[None]]
# What answers a request (``_ask``).
_ANSWERS = frozenset({MessageType.EXPOSED, MessageType.ROUTED, MessageType.ERROR})


@dataclass(slots=True)
class _Session:
    """A remote UDP address's socket towards the local port, and when it was last used."""

    transport: asyncio.DatagramTransport
    used: float


# Seconds between heartbeats on the control connection.
_HEARTBEAT = 3.0

log = logging.getLogger(__name__)


class TunnelClient(Component):
    """Exposes local TCP ports on a relay's public ports."""

    def __init__(
        self,
        identity: Identity,
        relay_host: str,
        relay_port: int,
        relay_node_id: str,
        *,
        on_crash: CrashHandler = log_crash,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._identity = identity
        self._host, self._port, self._relay_id = relay_host, relay_port, relay_node_id
        self._connect_timeout = connect_timeout
        self._control: FramedStream | None = None
        self._mux: Mux | None = None  # the current connection's streams
        self._answers: asyncio.Queue[Exposed | Routed | Error] = asyncio.Queue()
        self._tasks = TaskSet(on_crash)
        self.exposed: dict[int, int] = {}
        self.routed: dict[str, int] = {}
        self._local_hosts: dict[int, str] = {}
        self.udp_exposed: dict[int, int] = {}
        self._udp_targets: dict[int, tuple[str, int]] = {}
        self._sessions: dict[tuple[int, tuple[str, int]], _Session] = {}
        self._asking = asyncio.Lock()
        self.closed = asyncio.Event()
        self._last_heard = 0.0
        # Where the relay saw our control connection come from (a newer relay says).
        self.observed: tuple[str, int] | None = None
        self.local_port = 0  # the control connection's own source port
        # What the relay may send once we are welcome; other messages are ignored.
        self._handlers: dict[MessageType, _Handler] = {
            **dict.fromkeys(STREAM_TYPES, self._stream),
            **dict.fromkeys(_ANSWERS, self._answer),
            MessageType.OPEN: self._open,
            MessageType.DATAGRAM: self._datagram_in,
            MessageType.PING: self._ping,
            MessageType.PONG: self._pong,
        }

    def __repr__(self) -> str:
        return f"<TunnelClient {self._host}:{self._port} [{len(self.exposed)} ports]>"

    async def start(self) -> None:
        self._control = await self._connect()
        try:
            # A relay that hangs up or stays silent mid-handshake is unavailable, not a crash.
            async with asyncio.timeout(self._connect_timeout):
                challenge = await self._control.receive()
                if not isinstance(challenge, Challenge):
                    raise MessageError(f"expected a challenge, got {challenge.TYPE}")
                message = challenge_message(challenge.nonce, self._relay_id)
                signature = self._identity.sign(message)
                await self._control.send(Hello(self._identity.public_key, signature))
                answer = await self._control.receive()
        except (OSError, TimeoutError, EOFError, MessageError) as exc:
            await close_quietly(self._control.writer)
            reason = type(exc).__name__ if isinstance(exc, EOFError) else exc
            raise RelayUnavailable(f"relay {self._host}:{self._port}: {reason}") from None
        if not isinstance(answer, Welcome):
            await close_quietly(self._control.writer)
            text = answer.message if isinstance(answer, Error) else answer.TYPE
            raise TunnelError(f"relay refused: {text}")
        self.observed = answer.observed
        sockname = self._control.writer.get_extra_info("sockname")
        self.local_port = int(sockname[1]) if isinstance(sockname, tuple) else 0
        self._last_heard = asyncio.get_running_loop().time()
        mux = self._mux = Mux(self._control)
        self._tasks.spawn(self._control_loop(self._control, mux), "tunnel-control")
        self._tasks.spawn(self._heartbeat(self._control, mux), "tunnel-heartbeat")

    async def expose(
        self,
        local_port: int,
        public_port: int | None = None,
        local_host: str = "127.0.0.1",
        *,
        udp: bool = False,
    ) -> int:
        """Publish ``local_host:local_port`` (TCP, or UDP); returns the relay's public port."""
        answer = await self._ask(Expose(local_port, public_port, udp), Exposed)
        public = answer.public_port
        if udp:
            self.udp_exposed[local_port] = public
            self._udp_targets[public] = (local_host, local_port)
        else:
            self._local_hosts[local_port] = local_host
            self.exposed[local_port] = public
        return public

    async def route(self, domain: str, local_port: int) -> None:
        """Have the relay send ``domain``'s HTTP and TLS connections to ``local_port``."""
        await self._ask(Route(domain, local_port), Routed)
        self.routed[domain] = local_port
        self._local_hosts.setdefault(local_port, "127.0.0.1")

    async def unroute(self, domain: str) -> None:
        if self.routed.pop(domain, None) is not None and self._control is not None:
            await self._control.send(Unroute(domain))

    async def _ask(self, message: Expose | Route, expected: type[_Answer]) -> _Answer:
        """Send a request on the control connection; its answer, or the relay's error."""
        if self._control is None:
            raise RuntimeError("Call start() first.")
        async with self._asking:
            while not self._answers.empty():  # late or unasked answers answer nothing now
                self._answers.get_nowait()
            await self._control.send(message)
            try:
                answer = await asyncio.wait_for(self._answers.get(), _ANSWER_TIMEOUT)
            except TimeoutError:
                raise TunnelError("the relay did not answer") from None
            mux = self._mux
            if mux is not None and mux.round_trip.rtt is None and not mux.round_trip.waiting:
                mux.round_trip.ping()  # the first round trip sizes the windows: before streams
                await self._control.send(Ping())
        if isinstance(answer, expected):
            return answer
        if isinstance(answer, Error):
            text = f"relay refused: {answer.message}"
            raise (TunnelError if answer.code is None else error_class(answer.code))(text)
        raise TunnelError(f"relay answered {answer.TYPE} to {message.TYPE}")

    async def unexpose(self, local_port: int, *, udp: bool = False) -> None:
        """Stop publishing ``local_port``."""
        public = (self.udp_exposed if udp else self.exposed).pop(local_port, None)
        if udp and public is not None:
            self._udp_targets.pop(public, None)
            for key in [key for key in self._sessions if key[0] == public]:
                self._sessions.pop(key).transport.close()
        if public is not None and self._control is not None:
            await self._control.send(Unexpose(public))

    async def aclose(self) -> None:
        for session in self._sessions.values():
            session.transport.close()
        self._sessions.clear()
        await self._tasks.cancel_all()
        if self._control is not None:
            await close_quietly(self._control.writer)

    async def _connect(self) -> FramedStream:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=client_context(), limit=2**20),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RelayUnavailable(f"relay {self._host}:{self._port}: {exc}") from None
        try:
            verify_peer(writer.get_extra_info("ssl_object"), self._relay_id)
        except P2PRCError:
            await close_quietly(writer)
            raise
        return FramedStream(reader, writer, FrameDecoder())

    async def _heartbeat(self, control: FramedStream, mux: Mux) -> None:
        """Ping every few seconds; a relay silent for three periods is gone."""
        loop = asyncio.get_running_loop()
        while not self.closed.is_set():
            await asyncio.sleep(_HEARTBEAT)
            self._expire_sessions()
            if loop.time() - self._last_heard > 3 * _HEARTBEAT:
                log.info("relay %s:%d stopped answering", self._host, self._port)
                self.closed.set()  # now: a silent peer can hold a TLS close for 30 s
                await close_quietly(control.writer)
                return
            with contextlib.suppress(OSError):
                if not mux.round_trip.waiting:
                    mux.round_trip.ping()
                await control.send(Ping())

    async def _control_loop(self, control: FramedStream, mux: Mux) -> None:
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, OSError, TunnelProtocolError):
                while True:
                    try:
                        message = await control.receive()
                    except MessageError as exc:
                        self._last_heard = loop.time()
                        self._malformed(control, mux, exc)
                        continue
                    self._last_heard = loop.time()
                    handler = self._handlers.get(message.TYPE)
                    if handler is not None:
                        await handler(control, mux, message)
            log.info("relay control connection closed")
        finally:  # whatever ended the loop, the tunnel is done: the mapper moves on
            mux.abort_all()
            self.closed.set()

    def _malformed(self, control: FramedStream, mux: Mux, exc: MessageError) -> None:
        """A message that does not validate: an open is refused, a stream aborted, anything
        else (a datagram, a newer version's message) dropped."""
        if exc.kind == MessageType.OPEN:
            control.try_send(Abort(exc.stream or 0))
        elif exc.kind in STREAM_TYPES:
            mux.reject(exc.stream)
        else:
            log.debug("dropped a message from the relay: %s", exc)

    async def _stream(self, control: FramedStream, mux: Mux, message: StreamMessage) -> None:
        mux.dispatch(message)

    async def _ping(self, control: FramedStream, mux: Mux, message: Ping) -> None:
        """The relay measures its round trip too (its windows towards us)."""
        control.try_send(Pong())

    async def _pong(self, control: FramedStream, mux: Mux, message: Pong) -> None:
        mux.round_trip.pong()

    async def _answer(
        self, control: FramedStream, mux: Mux, message: Exposed | Routed | Error
    ) -> None:
        await self._answers.put(message)

    async def _open(self, control: FramedStream, mux: Mux, message: Open) -> None:
        """The relay opens a stream: only to a port we exposed (a relay picks no others)."""
        if message.local_port not in self._local_hosts:
            control.try_send(Abort(message.s))
            return
        try:
            stream = mux.open(message.s)
        except TunnelProtocolError:
            return  # a duplicate id: the first stream keeps it
        host, port = self._local_hosts[message.local_port], message.local_port
        serve = self._serve(control, mux, stream, host, port)
        self._tasks.spawn(serve, "tunnel-stream", contained=True)

    async def _datagram_in(self, control: FramedStream, mux: Mux, message: Datagram) -> None:
        """A datagram from the relay: into the session of its remote address."""
        if message.p not in self._udp_targets:
            return
        public, address, data = message.p, message.a, message.b
        key = (public, address)
        loop = asyncio.get_running_loop()
        session = self._sessions.get(key)
        if session is None:
            if len(self._sessions) >= _MAX_SESSIONS:
                return

            def answer(reply: bytes, _source: tuple[str, int]) -> None:
                control.try_send(Datagram(public, address, reply))
                if (entry := self._sessions.get(key)) is not None:
                    entry.used = loop.time()

            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: Datagrams(answer), remote_addr=self._udp_targets[public]
                )
            except OSError as exc:
                log.info("cannot open a UDP session to local port: %s", exc)
                return
            session = self._sessions[key] = _Session(transport, loop.time())
        session.used = loop.time()
        session.transport.sendto(data)

    def _expire_sessions(self) -> None:
        now = asyncio.get_running_loop().time()
        for key, session in list(self._sessions.items()):
            if now - session.used > SESSION_IDLE:
                session.transport.close()
                del self._sessions[key]

    async def _serve(
        self, control: FramedStream, mux: Mux, stream: MuxStream, host: str, local_port: int
    ) -> None:
        """One forwarded connection: a stream <-> the local port."""
        try:
            reader, writer = await asyncio.open_connection(host, local_port)
        except OSError as exc:
            log.info("nothing listens on local port %d: %s", local_port, exc)
            mux.streams.pop(stream.sid, None)
            with contextlib.suppress(OSError, P2PRCError):
                await control.send(Abort(stream.sid))
            return
        await mux.pump(stream, reader, writer)
