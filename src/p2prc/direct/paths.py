"""``node.paths``: a direct path to each peer this node talks to, beside the relay.

Every call to a peer (``PeerLink.connect``) ``touch``-es it: when no direct path is up and
the last attempt is older than ``[direct] retry``, an attempt starts in the background
while the call goes the usual way (relay, or the plain API). An attempt dials a peer whose
signed record says public (``behind_nat`` not true, addresses, and a direct port in the
reserved custom key ``p2prc.direct``); a NAT'd node calling a public one dials it, so the
public one never needs to reach it; two NAT'd nodes punch (``direct/punch.py``, when there).
A checked connection (``adopt``, or one accepted on the direct port) becomes the peer's
path; new calls and streams use it; when it dies (``[direct] stale`` without a reply, or
the connection breaks) its streams break and new ones go the usual way again until the
next attempt (a punch waits ``REOPEN_AFTER`` from the close). When both ends dial each
other at once, both keep the connection whose TLS client is the lower node id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..config import DirectConfig
from ..errors import P2PRCError, TunnelProtocolError
from ..identity import Identity
from ..peers.gossip import Gossip
from ..peers.link import PeerTarget
from ..peers.records import PeerRecord
from ..peers.table import Member, MemberState, PeerTable
from ..trust import TrustPolicy
from ..tunnel.mapper import PortMapper
from ..tunnel.tls import server_context
from . import punch as punch_module
from .link import DirectLink, Targets, Wire, handshake
from .listener import DirectListener
from .models import PathInfo
from .transport import DirectTransport

__all__ = ["DIRECT_KEY", "REOPEN_AFTER", "Paths", "container_port", "direct_port", "for_node"]

# The reserved custom key of a node's signed record that holds its direct port.
DIRECT_KEY = "p2prc.direct"
# Seconds one dial (all of a record's addresses at once) may take.
DIAL_TIMEOUT = 3.0
# Addresses of a record dialled at most.
_MAX_ADDRESSES = 4
# Peers remembered without a path (attempts, errors); the oldest are forgotten first.
_MAX_PEERS = 1024
# Direct paths at most (a node that talks to more peers reaches the rest the usual way).
MAX_PATHS = 256
# Seconds a path without streams is kept after its last stream opened; then it closes
# (gossip's exchanges touch peers at random: idle paths to all of them would add up).
IDLE_CLOSE = 300.0
# Seconds after a punched path closed before the next punch to that peer: NATs keep the
# closed flow's state for a while (Linux conntrack: 10 s after a reset), and a punch on the
# same ports meanwhile can connect through that stale state and then carry nothing (seen
# in the test bed: the handshake timed out). A dial uses a new source port: no wait.
REOPEN_AFTER = 15.0

log = logging.getLogger(__name__)

Punch = Callable[[Member], Awaitable[socket.socket | None]]
Measure = Callable[[Member], Awaitable[float | None]]


def direct_port(record: PeerRecord) -> int | None:
    """The direct port a signed record publishes, if a valid one."""
    text = record.custom.get(DIRECT_KEY, "")
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


@dataclass(slots=True)
class _Peer:
    """What this node knows of its direct path to one peer."""

    link: DirectLink | None = None
    attempt: asyncio.Task[None] | None = None
    attempts: int = 0
    tried: float = -math.inf  # loop time of the last attempt (or of the path's end)
    closed: float = -math.inf  # loop time the last path closed
    last_error: str = ""
    since: float | None = None  # wall clock the current path came up (or went)
    relay_rtt_ms: float | None = None


class Paths(Component):
    """Finds, adopts and keeps one direct path per peer; see the module's text."""

    def __init__(
        self,
        identity: Identity,
        config: DirectConfig,
        tls_dir: Path,
        *,
        host: str,
        table: Callable[[], PeerTable | None],
        allowed: Callable[[str], bool],
        targets: Targets,
        punch: Punch | None = None,
        measure: Measure | None = None,
        announce: Callable[[int | None], None] | None = None,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._identity, self._config = identity, config
        self._tls_dir, self._host = tls_dir, host
        self._table, self._allowed, self._targets = table, allowed, targets
        self._punch, self._measure, self._announce = punch, measure, announce
        self._on_crash = on_crash
        self._tasks = TaskSet(on_crash)
        self._peers: dict[str, _Peer] = {}
        self._listener: DirectListener | None = None
        self._context: ssl.SSLContext | None = None
        self._port = 0
        self.punch_available = punch is not None

    def __repr__(self) -> str:
        up = sum(1 for peer in self._peers.values() if peer.link is not None)
        return f"<Paths :{self.port} [{up} direct]>"

    @property
    def port(self) -> int:
        """The direct port (0 while not listening)."""
        return self._port

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    async def start(self) -> None:
        if not self._config.enabled:
            if self._announce is not None:
                self._announce(None)
            return
        self._context = server_context(self._identity, self._tls_dir)
        listener = DirectListener(self._host, self._config.port, self._accepted)
        await listener.start()
        self._listener, self._port = listener, listener.port
        self._tasks.spawn(self._sweep(), "direct-sweep")
        if self._announce is not None:
            self._announce(listener.port)

    async def aclose(self) -> None:
        listener, self._listener = self._listener, None  # touch() starts nothing now
        if listener is not None:
            await listener.aclose()
        await self._tasks.cancel_all()
        for peer in self._peers.values():
            if peer.link is not None:
                await peer.link.aclose("this node stopped")
        await self._tasks.cancel_all()

    # What callers use ---------------------------------------------------------------

    def link(self, node_id: str) -> DirectLink | None:
        """The peer's direct path, when one is up."""
        peer = self._peers.get(node_id)
        if peer is None or peer.link is None or not peer.link.alive:
            return None
        return peer.link

    def touch(self, node_id: str) -> None:
        """This node talks to ``node_id``: try a direct path unless one is up or was tried
        within ``retry`` seconds (in the background; the caller goes on)."""
        if not self._config.enabled or self._listener is None:
            return
        if node_id == self._identity.node_id:
            return
        peer = self._peer(node_id)
        if peer.link is not None or peer.attempt is not None:
            return
        if sum(1 for p in self._peers.values() if p.link is not None) >= MAX_PATHS:
            return
        now = asyncio.get_running_loop().time()
        if now - peer.tried < self._config.retry:
            return
        if now - peer.closed < REOPEN_AFTER and self._punches(node_id):
            return
        peer.attempt = self._tasks.spawn(self._attempt(node_id, peer), "direct-attempt")

    def _punches(self, node_id: str) -> bool:
        """Whether an attempt to ``node_id`` would punch (both behind NAT), as ``_try``."""
        table = self._table()
        member = table.get(node_id) if table is not None else None
        if table is None or member is None:
            return False
        return not _dialled(member.record) and table.me.behind_nat is True

    def transport(self, node_id: str) -> DirectTransport | None:
        """An httpx transport over the peer's direct path, or ``None`` (no path now)."""
        link = self.link(node_id)
        return None if link is None else DirectTransport(link)

    async def open_stream(
        self, node_id: str, target: str, port: int = 0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to ``target`` (``api``, or ``port`` and ``port``) on the peer over
        its direct path; ``None`` when there is none now (the caller uses the relay)."""
        link = self.link(node_id)
        if link is None:
            return None
        try:
            return await link.open_stream(target, port)
        except TunnelProtocolError:
            return None

    async def open_socket(self, node_id: str, target: str, port: int = 0) -> socket.socket | None:
        """``open_stream``, the caller's end a plain socket (what asyncssh's ``sock=``
        takes); ``None`` when there is no direct path now."""
        link = self.link(node_id)
        if link is None:
            return None
        try:
            return await link.open_socket(target, port)
        except (TunnelProtocolError, OSError):
            return None

    def path(self, node_id: str) -> PathInfo:
        """How this node reaches ``node_id`` now."""
        table = self._table()
        member = table.get(node_id) if table is not None else None
        peer = self._peers.get(node_id) or _Peer()
        link = self.link(node_id)
        record = member.record if member is not None else None
        info: dict[str, Any] = {
            "node_id": node_id,
            "name": record.name if record is not None else "",
            "direct_rtt_ms": link.rtt_ms if link is not None else None,
            "relay_rtt_ms": peer.relay_rtt_ms,
            "since": peer.since,
            "attempts": peer.attempts,
            "last_error": "" if link is not None else peer.last_error,
            "streams": len(link.mux.streams) if link is not None else 0,
        }
        if link is not None:
            return PathInfo(kind="direct", rtt_ms=link.rtt_ms, **info)
        if record is not None and record.public_api:
            return PathInfo(kind="relay", via=record.relay, rtt_ms=peer.relay_rtt_ms, **info)
        if record is not None and record.api_port and record.addresses:
            rtt = peer.relay_rtt_ms if peer.relay_rtt_ms is not None else member_rtt(member)
            return PathInfo(kind="public", rtt_ms=rtt, **info)
        return PathInfo(kind="none", **info)

    def paths(self) -> list[PathInfo]:
        """Every alive member's path, and any other peer with a direct path, by name."""
        table = self._table()
        ids = {m.record.node_id for m in table.alive()} if table is not None else set()
        ids.discard(self._identity.node_id)
        ids.update(node_id for node_id in self._peers if self.link(node_id) is not None)
        return sorted((self.path(node_id) for node_id in ids), key=lambda p: (p.name, p.node_id))

    async def adopt(self, sock: socket.socket, node_id: str, initiator: bool) -> bool:
        """Check a connected socket (a dial's, a hole punch's) and make it ``node_id``'s
        direct path: ``initiator`` is the TLS client. False (the reason in the peer's
        ``last_error``) when it does not check out; the socket is closed then."""
        peer = self._peer(node_id)
        if self._context is None:
            sock.close()
            peer.last_error = "direct paths are off"
            return False
        try:
            wire, found = await handshake(
                sock,
                self._identity,
                client=initiator,
                server_context=self._context,
                expected=node_id,
                allowed=self._may_connect,
            )
        except P2PRCError as exc:
            peer.last_error = str(exc)
            log.info("direct path to %s refused: %s", node_id, exc)
            return False
        return self._install(wire, found, client=initiator)

    # Inside -------------------------------------------------------------------------

    def _peer(self, node_id: str) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            if len(self._peers) >= _MAX_PEERS:
                idle = [k for k, p in self._peers.items() if p.link is None and p.attempt is None]
                for key in idle[: len(idle) // 2 or 1]:
                    del self._peers[key]
            peer = self._peers[node_id] = _Peer()
        return peer

    def _may_connect(self, node_id: str) -> bool:
        """A direct path only with an alive member this node's trust policy allows."""
        table = self._table()
        member = table.get(node_id) if table is not None else None
        alive = member is not None and member.state == MemberState.ALIVE
        return alive and self._allowed(node_id)

    async def _accepted(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """A peer dialled the direct port: it is the TLS client; learn who it is."""
        if self._context is None:
            sock.close()
            return
        try:
            wire, found = await handshake(
                sock,
                self._identity,
                client=False,
                server_context=self._context,
                expected=None,
                allowed=self._may_connect,
            )
        except P2PRCError as exc:
            log.info("direct connection from %s refused: %s", address[0], exc)
            return
        self._install(wire, found, client=False)

    def _install(self, wire: Wire, found: str, *, client: bool) -> bool:
        """Make the checked connection ``wire`` to ``found`` its peer's path; False when it
        is not kept."""
        link = DirectLink(
            wire,
            found,
            client=client,
            targets=self._targets,
            heartbeat=self._config.heartbeat,
            stale=self._config.stale,
            on_crash=self._on_crash,
        )
        peer = self._peer(link.peer_id)
        old = peer.link
        paths = sum(1 for p in self._peers.values() if p.link is not None)
        if old is None and paths >= MAX_PATHS:
            peer.last_error = f"this node keeps at most {MAX_PATHS} direct paths"
            self._tasks.spawn(link.aclose("too many direct paths"), "direct-close")
            return False
        if old is not None and old.alive and old.client != link.client:
            # Both dialled: keep the connection whose TLS client is the lower node id.
            lower_is_me = self._identity.node_id < link.peer_id
            if old.client == lower_is_me:
                self._tasks.spawn(link.aclose("a crossed connection"), "direct-close")
                return True  # the peer has its path: the one kept
        if old is not None:
            self._tasks.spawn(old.aclose("replaced by a newer connection"), "direct-close")
        peer.link = link
        peer.since = time.time()
        peer.last_error = ""
        link.start()
        self._tasks.spawn(self._watch(peer, link), "direct-watch")
        log.info("direct path to %s is up", link.peer_id)
        return True

    async def _sweep(self) -> None:
        """Close paths idle for ``IDLE_CLOSE`` (no stream open, none opened since)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(30.0, IDLE_CLOSE / 2))
            for peer in list(self._peers.values()):
                link = peer.link
                if link is None or link.mux.streams or loop.time() - link.used < IDLE_CLOSE:
                    continue
                peer.link = None
                peer.last_error = "closed while idle"
                peer.since = time.time()
                peer.tried = -math.inf  # the next call tries again (a punch: REOPEN_AFTER)
                peer.closed = loop.time()
                await link.aclose("idle")

    async def _watch(self, peer: _Peer, link: DirectLink) -> None:
        await link.closed.wait()
        if peer.link is link:
            peer.link = None
            peer.last_error = link.reason
            peer.since = time.time()
            peer.tried = peer.closed = asyncio.get_running_loop().time()  # after retry
            log.info("direct path to %s is down: %s", link.peer_id, link.reason)
        await link.aclose()

    async def _attempt(self, node_id: str, peer: _Peer) -> None:
        peer.attempts += 1
        peer.tried = asyncio.get_running_loop().time()
        measuring = None
        try:
            table = self._table()
            member = table.get(node_id) if table is not None else None
            if table is None or member is None or member.state != MemberState.ALIVE:
                peer.last_error = "not an alive member"
                return
            if self._measure is not None:
                measuring = self._tasks.spawn(self._measure_relay(member, peer), "direct-rtt")
            error = await self._try(member, table.me)
            if error:
                peer.last_error = error
        except P2PRCError as exc:
            peer.last_error = str(exc)
        finally:
            peer.attempt = None
            if measuring is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await measuring

    async def _measure_relay(self, member: Member, peer: _Peer) -> None:
        assert self._measure is not None
        try:
            rtt = await self._measure(member)
        except (P2PRCError, OSError, TimeoutError) as exc:
            log.debug("round trip to %s: %s", member.record.node_id, exc)
            return
        if rtt is not None:
            peer.relay_rtt_ms = rtt

    async def _try(self, member: Member, me: PeerRecord) -> str:
        """One attempt; an error text, or "" (a path is up, or ``adopt`` said why not)."""
        record = member.record
        port = direct_port(record)
        if port is None:
            return "its record has no direct port (direct paths off, or an older version)"
        if _dialled(record):
            sock = await self._dial(record.addresses[:_MAX_ADDRESSES], port)
            await self.adopt(sock, record.node_id, initiator=True)
            return ""
        if me.behind_nat is not True:
            return "it is behind NAT: it dials this node when it calls"
        if self._punch is None:
            return "both nodes are behind NAT and this node cannot punch holes"
        try:
            punched = await self._punch(member)
        except P2PRCError:
            raise
        except Exception as exc:  # another module's bug: this attempt fails, not the node
            log.exception("hole punch to %s failed", record.node_id)
            return f"hole punching failed: {type(exc).__name__}: {exc}"
        if punched is None:
            return "hole punching found no way through"
        lower = self._identity.node_id < record.node_id
        await self.adopt(punched, record.node_id, initiator=lower)
        return ""

    async def _dial(self, addresses: tuple[str, ...], port: int) -> socket.socket:
        """The first of ``addresses`` that connects (all tried at once), within the bound."""
        tasks = [asyncio.ensure_future(_connect(address, port)) for address in addresses]
        errors: list[str] = []
        winner: socket.socket | None = None
        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                for next_done in asyncio.as_completed(tasks):
                    try:
                        winner = await next_done
                        break
                    except OSError as exc:
                        errors.append(exc.strerror or type(exc).__name__)
        except TimeoutError:
            errors.append(f"no answer within {DIAL_TIMEOUT:g} s")
        finally:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, socket.socket) and result is not winner:
                    result.close()
        if winner is None:
            where = ", ".join(addresses)
            raise TunnelProtocolError(f"cannot dial {where} port {port}: {'; '.join(errors)}")
        return winner


def _dialled(record: PeerRecord) -> bool:
    """Whether a direct path to the peer of ``record`` is dialled (it says it is public
    and has addresses) rather than punched or left to the peer."""
    return record.behind_nat is not True and bool(record.addresses)


def container_port(
    ports: Collection[int], public: Callable[[int], tuple[str, int] | None], port: int
) -> int | None:
    """The host port of a peer's container that ``port`` names: one of ``ports`` itself,
    else the one whose address on this node's relay (``public``) has that port: a NAT'd
    node's container views give its creator the relay's ports, and the creator asks for
    what its view says. ``None``: no container port of that peer."""
    if port in ports:
        return port
    for local in ports:
        address = public(local)
        if address is not None and address[1] == port:
            return local
    return None


def member_rtt(member: Member | None) -> float | None:
    return None if member is None else member.rtt_ms


async def _connect(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


# The node as for_node reads it (node.py's Node): what punching needs, and more.
class _Node(punch_module.PunchNode, Protocol):
    @property
    def port(self) -> int: ...
    @property
    def gossip(self) -> Gossip: ...
    @property
    def mapper(self) -> PortMapper: ...
    @property
    def trust(self) -> TrustPolicy: ...


def for_node(
    node: _Node,
    *,
    listen_host: str,
    api_host: str,
    tls_dir: Path,
    on_crash: CrashHandler = log_crash,
) -> Paths:
    """The node's ``Paths``, wired to its gossip, trust, API, containers and peer link:
    ``listen_host`` is the API's listen address (the direct port listens there too),
    ``api_host`` where this machine reaches the API."""
    config = node.config

    def table() -> PeerTable | None:
        if not config.gossip.enabled:
            return None
        try:
            return node.gossip.table
        except RuntimeError:
            return None

    publish = config.containers.publish_host
    container_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(publish, publish)

    def targets(peer_id: str, target: str, port: int) -> tuple[str, int] | None:
        """``api``: the plain API; ``port N``: a port of the peer's containers here, or one
        this node publishes (map-port: public anyway); nothing else."""
        if target == "api":
            return (api_host, node.port)
        mapper = node.mapper
        local = container_port(mapper.peer_ports(peer_id), mapper.public_address, port)
        if local is not None:
            return (container_host, local)
        if any(m.local_port == port and not m.udp for m in node.mapper.mappings()):
            return ("127.0.0.1", port)
        return None

    def announce(port: int | None) -> None:
        if config.gossip.enabled:
            node.gossip.set_reserved(DIRECT_KEY, None if port is None else str(port))

    async def punched(member: Member) -> socket.socket | None:
        return await punch_module.punch(node, member)

    async def measure(member: Member) -> float | None:
        target = PeerTarget(member.record.api_url, member.record.node_id)
        async with node.link.connect(target, direct=False) as client:
            await client.health()  # the connection (TCP, TLS) is made: time the next
            started = time.perf_counter()
            await client.health()
            return (time.perf_counter() - started) * 1000

    return Paths(
        node.identity,
        config.direct,
        tls_dir,
        host=listen_host,
        table=table,
        allowed=node.trust.allows_node,
        targets=targets,
        punch=punched,
        measure=measure,
        announce=announce,
        on_crash=on_crash,
    )
