"""``TunnelClient``: a node behind NAT keeps one connection to a relay and serves through it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .._aio import CrashHandler, TaskSet, log_crash
from ..errors import P2PRCError, RelayUnavailable, TunnelError, TunnelProtocolError, error_class
from ..identity import Identity, b64encode
from .frames import FrameDecoder
from .mux import STREAM_FRAMES, Mux, MuxStream
from .relay import challenge_message
from .streams import FramedStream, close_quietly
from .tls import client_context, verify_peer
from .udp import SESSION_IDLE, Datagrams, datagram_frame, parse

# UDP sessions (remote addresses) one client keeps open at most.
_MAX_SESSIONS = 1024

__all__ = ["TunnelClient"]


@dataclass(slots=True)
class _Session:
    """A remote UDP address's socket towards the local port, and when it was last used."""

    transport: asyncio.DatagramTransport
    used: float


# Seconds between heartbeats on the control connection.
_HEARTBEAT = 3.0

log = logging.getLogger(__name__)


class TunnelClient:
    """Exposes local TCP ports on a relay's public ports."""

    def __init__(
        self,
        identity: Identity,
        relay_host: str,
        relay_port: int,
        relay_node_id: str,
        *,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._identity = identity
        self._host, self._port, self._relay_id = relay_host, relay_port, relay_node_id
        self._control: FramedStream | None = None
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
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

    def __repr__(self) -> str:
        return f"<TunnelClient {self._host}:{self._port} [{len(self.exposed)} ports]>"

    async def start(self) -> None:
        self._control = await self._connect()
        try:
            # A relay that hangs up or stays silent mid-handshake is unavailable, not a crash.
            async with asyncio.timeout(10):
                challenge = await self._control.receive()
                nonce = str(challenge["nonce"])
                signature = self._identity.sign(challenge_message(nonce, self._relay_id))
                await self._control.send(
                    {
                        "type": "hello",
                        "key": self._identity.public_key_b64,
                        "signature": b64encode(signature),
                    }
                )
                answer = await self._control.receive()
        except (OSError, TimeoutError, EOFError, KeyError) as exc:
            await close_quietly(self._control.writer)
            reason = type(exc).__name__ if isinstance(exc, EOFError | KeyError) else exc
            raise RelayUnavailable(f"relay {self._host}:{self._port}: {reason}") from None
        if answer["type"] != "welcome":
            raise TunnelError(f"relay refused: {answer.get('message', answer['type'])}")
        self._last_heard = asyncio.get_running_loop().time()
        self._tasks.spawn(self._control_loop(self._control, Mux(self._control)), "tunnel-control")
        self._tasks.spawn(self._heartbeat(self._control), "tunnel-heartbeat")

    async def expose(
        self,
        local_port: int,
        public_port: int | None = None,
        local_host: str = "127.0.0.1",
        *,
        udp: bool = False,
    ) -> int:
        """Publish ``local_host:local_port`` (TCP, or UDP); returns the relay's public port."""
        message: dict[str, Any] = {"type": "expose", "local_port": local_port}
        if public_port:
            message["public_port"] = public_port
        if udp:
            message["udp"] = True
        answer = await self._ask(message, "exposed")
        public = int(answer["public_port"])
        if udp:
            self.udp_exposed[local_port] = public
            self._udp_targets[public] = (local_host, local_port)
        else:
            self._local_hosts[local_port] = local_host
            self.exposed[local_port] = public
        return public

    async def route(self, domain: str, local_port: int) -> None:
        """Have the relay send ``domain``'s HTTP and TLS connections to ``local_port``."""
        await self._ask({"type": "route", "domain": domain, "local_port": local_port}, "routed")
        self.routed[domain] = local_port
        self._local_hosts.setdefault(local_port, "127.0.0.1")

    async def unroute(self, domain: str) -> None:
        if self.routed.pop(domain, None) is not None and self._control is not None:
            await self._control.send({"type": "unroute", "domain": domain})

    async def _ask(self, message: dict[str, Any], expected: str) -> dict[str, Any]:
        """Send a request on the control connection; its answer, or the relay's error."""
        if self._control is None:
            raise RuntimeError("Call start() first.")
        async with self._asking:
            await self._control.send(message)
            try:
                answer = await asyncio.wait_for(self._answers.get(), 10)
            except TimeoutError:
                raise TunnelError("the relay did not answer") from None
        if answer["type"] != expected:
            text = f"relay refused: {answer.get('message', answer['type'])}"
            code = answer.get("code")
            raise (error_class(code) if isinstance(code, str) else TunnelError)(text)
        return answer

    async def unexpose(self, local_port: int, *, udp: bool = False) -> None:
        """Stop publishing ``local_port``."""
        public = (self.udp_exposed if udp else self.exposed).pop(local_port, None)
        if udp and public is not None:
            self._udp_targets.pop(public, None)
            for key in [key for key in self._sessions if key[0] == public]:
                self._sessions.pop(key).transport.close()
        if public is not None and self._control is not None:
            await self._control.send({"type": "unexpose", "public_port": public})

    async def aclose(self) -> None:
        for session in self._sessions.values():
            session.transport.close()
        self._sessions.clear()
        await self._tasks.cancel_all()
        if self._control is not None:
            await close_quietly(self._control.writer)

    async def __aenter__(self) -> TunnelClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _connect(self) -> FramedStream:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=client_context(), limit=2**20),
                10,
            )
        except (OSError, TimeoutError) as exc:
            raise RelayUnavailable(f"relay {self._host}:{self._port}: {exc}") from None
        try:
            verify_peer(writer.get_extra_info("ssl_object"), self._relay_id)
        except P2PRCError:
            await close_quietly(writer)
            raise
        return FramedStream(reader, writer, FrameDecoder())

    async def _heartbeat(self, control: FramedStream) -> None:
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
                await control.send({"type": "ping"})

    async def _control_loop(self, control: FramedStream, mux: Mux) -> None:
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, OSError, TunnelProtocolError):
                while True:
                    message = await control.receive()
                    self._last_heard = loop.time()
                    if message["type"] in STREAM_FRAMES:
                        mux.dispatch(message)
                    elif message["type"] == "u":
                        await self._datagram_in(control, message)
                    elif message["type"] == "open":
                        self._open(control, mux, message)
                    elif message["type"] in ("exposed", "routed", "error"):
                        await self._answers.put(message)
            log.info("relay control connection closed")
        finally:  # whatever ended the loop, the tunnel is done: the mapper moves on
            mux.abort_all()
            self.closed.set()

    def _open(self, control: FramedStream, mux: Mux, message: dict[str, Any]) -> None:
        """The relay opens a stream: only to a port we exposed (a relay picks no others)."""
        sid, port = message.get("s"), message.get("local_port")
        # isinstance first: 8000.0 would match the key 8000 of _local_hosts.
        if not isinstance(sid, int) or not isinstance(port, int) or port not in self._local_hosts:
            control.try_send({"type": "x", "s": sid if isinstance(sid, int) else 0})
            return
        try:
            stream = mux.open(sid)
        except TunnelProtocolError:
            return  # a duplicate id: the first stream keeps it
        self._tasks.spawn(
            self._serve(control, mux, stream, self._local_hosts[port], port), "tunnel-stream"
        )

    async def _datagram_in(self, control: FramedStream, message: dict[str, Any]) -> None:
        """A datagram from the relay: into the session of its remote address."""
        parsed = parse(message)
        if parsed is None or parsed[0] not in self._udp_targets:
            return
        public, address, data = parsed
        key = (public, address)
        loop = asyncio.get_running_loop()
        session = self._sessions.get(key)
        if session is None:
            if len(self._sessions) >= _MAX_SESSIONS:
                return

            def answer(reply: bytes, _source: tuple[str, int]) -> None:
                control.try_send(datagram_frame(public, address, reply))
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
                await control.send({"type": "x", "s": stream.sid})
            return
        await mux.pump(stream, reader, writer)
