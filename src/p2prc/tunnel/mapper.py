"""``PortMapper``: publish local ports, on this node when it is public, else via a relay.

A relay is chosen from the peer table: alive nodes the owner vouched for (a key in
``trust.allow``, or an entry of ``relay.use``; open trust mode does not make strangers
relays) whose signed record offers a relay port and does not say they are behind NAT,
lowest RTT first; its node id, from that signed record, is what the TLS connection pins.
Mappings persist in the state and are restored when the node starts again.

Who may map what: the owner any local port and any domain. A trusted peer only a TCP port
of its own containers here that listens beyond loopback, and never a domain that another
caller mapped (``DomainTaken``); every mapping remembers who asked for it. A peer's refusal
reads the same whether the port is not its own or nothing listens, so it scans nothing.

Behind NAT, the node's own API is published through the relay too, as soon as NAT
detection says so, and the relay's address for it goes into the node's signed record
(``public_api``). That address is always TLS, terminated here with the node's own
certificate, so callers pin the node id and the relay can neither read nor change it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Collection
from pathlib import Path

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..config import NodeConfig, join_address
from ..errors import DomainTaken, InvalidRequest, NotFound, OwnerOnly, P2PRCError, RelayUnavailable
from ..identity import Identity
from ..models import MappedPort
from ..peers.gossip import Gossip
from ..peers.table import Member
from ..trust import TrustPolicy
from .client import TunnelClient
from .domains import normalize_domain
from .listeners import loopback_only, read_listening
from .nat import NatState
from .relay import RelayServer
from .streams import close_quietly, connects, pipe
from .tls import server_context

__all__ = ["PortMapper"]

_COLUMNS = "port, public_host, public_port, relay, domain, udp, owner"
# Seconds a map request waits for NAT detection when behind_nat is "auto" (a few rounds
# of dial-backs by trusted peers); still unknown after that, it maps as a public node.
_NAT_WAIT = 15.0
# Seconds before publishing through a relay again after a failure, doubling to the most.
_RETRY_FIRST, _RETRY_MOST = 1.0, 30.0

log = logging.getLogger(__name__)


class PortMapper(Component):
    """The node's published ports."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        db: sqlite3.Connection,
        gossip: Gossip | None,
        addresses: list[str],
        api_port: int = 0,
        relay: RelayServer | None = None,
        api_host: str = "127.0.0.1",
        on_crash: CrashHandler = log_crash,
        *,
        trust: TrustPolicy | None = None,
        tls_dir: Path | None = None,
        nat: NatState | None = None,
    ) -> None:
        self._identity, self._config, self._db = identity, config, db
        self._gossip, self._addresses = gossip, addresses
        self._api_port, self._api_host = api_port, api_host
        self._last_api: tuple[str, int] = ("", 0)  # (relay, public port) of the API
        self._tls_dir = tls_dir
        # The node's one NAT state (gossip's too): who is trusted, whether behind NAT.
        self._nat = nat or NatState(config, trust)
        self._timeouts = config.timeouts
        # The API's TLS listener (behind NAT): what the relay publishes for the API.
        self._api_tls: asyncio.Server | None = None
        self._api_conns: set[asyncio.StreamWriter] = set()
        # The node's host ports of a node id's containers here: what that peer may map.
        self.peer_ports: Callable[[str], Collection[int]] = lambda node_id: ()
        self._own_relay = relay
        # Ports the node publishes for itself (containers), by port: the host they are on.
        self._system: dict[int, str] = {}
        self._client: TunnelClient | None = None
        self._relay_id = ""
        self._relay_host = ""
        self._lock = asyncio.Lock()
        self._on_crash = on_crash
        # port-restore and relay-watch; a tunnel client's own tasks report to the same handler.
        self._tasks = TaskSet(on_crash)

    def __repr__(self) -> str:
        return f"<PortMapper [{len(self.mappings())} ports | relay {self._relay_id[:8] or '-'}]>"

    async def start(self) -> None:
        if self.mappings() or (self._api_port and self._gossip is not None):
            self._tasks.spawn(self._restore_all(), "port-restore")

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        if self._client is not None:
            await self._client.aclose()
        if self._api_tls is not None:
            self._api_tls.close()
        await close_quietly(*self._api_conns)
        self._api_conns.clear()

    @property
    def behind_nat(self) -> bool:
        """Configured, else what NAT detection found (unknown counts as public)."""
        return self._nat.behind_nat

    def trusts(self, node_id: str) -> bool:
        """Whether this node takes ``node_id`` as a relay and believes its NAT answers:
        a key the owner listed in ``trust.allow``, or an entry of ``relay.use``."""
        return self._nat.trusts(node_id)

    def mappings(self) -> list[MappedPort]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM port_mappings ORDER BY port, udp")
        return [_mapped(*row[:5], udp=bool(row[5])) for row in rows]

    async def map(
        self, port: int, domain: str | None = None, *, udp: bool = False, by: str = ""
    ) -> MappedPort:
        """Publish TCP (or UDP) ``port``, and route ``domain`` to it, for the owner (``by``
        empty) or for the peer ``by``; a clear error when nothing listens on a TCP port
        (UDP cannot be checked), the same one for a peer whatever the reason."""
        if domain is not None:
            if udp:
                raise InvalidRequest("domains route HTTP and TLS, which are TCP: map without --udp")
            domain = normalize_domain(domain)
        if by:
            if udp or not await self._peer_may_use(by, port):
                raise NotFound(
                    f"local port {port} is not a TCP port of your containers on this node"
                    " that listens beyond loopback"
                )
        elif not udp and not await connects("127.0.0.1", port, self._timeouts.connect):
            raise InvalidRequest(f"nothing listens on local port {port}")
        await self._nat_settled()
        async with self._lock:
            if by and self._owner(port, udp) not in (None, by):
                raise OwnerOnly(f"local port {port} was mapped by the node's owner or another peer")
            return await self._publish_mapping(port, domain, udp, by)

    async def _peer_may_use(self, node_id: str, port: int) -> bool:
        """A port of the peer's own containers, listening beyond loopback (Linux's tables;
        elsewhere peers map nothing). A port that connects with no listening socket at all
        is Docker's NAT (no userland proxy): a container's, not a local service's."""
        if port not in self.peer_ports(node_id):
            return False
        addresses = await asyncio.to_thread(read_listening, port)
        if addresses is None or loopback_only(addresses):
            return False
        return await connects("127.0.0.1", port, self._timeouts.connect)

    def _owner(self, port: int, udp: bool) -> str | None:
        """Who mapped ``port`` ('' for the owner), ``None`` when it is not mapped."""
        row = self._db.execute(
            "SELECT owner FROM port_mappings WHERE port = ? AND udp = ?", (port, int(udp))
        ).fetchone()
        return None if row is None else str(row[0])

    def _domain_elsewhere(self, domain: str, port: int, udp: bool, by: str) -> list[int]:
        """The other mappings (ports) routing ``domain``; ``DomainTaken`` when a peer asks
        for a domain that another caller mapped."""
        rows = self._db.execute(
            "SELECT port, owner FROM port_mappings WHERE domain = ? AND NOT (port = ? AND udp = ?)",
            (domain, port, int(udp)),
        ).fetchall()
        if by and any(owner != by for _, owner in rows):
            raise DomainTaken(f"{domain} is already mapped on this node by another caller")
        return [other for other, _ in rows]

    async def _publish_mapping(
        self, port: int, domain: str | None, udp: bool, by: str
    ) -> MappedPort:
        """Publish and store one mapping for ``by`` ('' the owner), whose authority over
        ``port`` is checked (the lock held); a mapping belongs to whoever last made it."""
        before = self._mapping(port, udp)
        if domain is None and before is not None:
            domain = before.domain  # mapping again keeps the domain; unmap drops it
        moved = [] if domain is None else self._domain_elsewhere(domain, port, udp, by)
        if self.behind_nat:
            client = await self._tunnel()
            # Ask for the same public port again when it was on this relay.
            wanted = before.port_no if before and before.relay == self._relay_id else None
            exposed = client.udp_exposed if udp else client.exposed
            public_port = exposed.get(port) or await client.expose(port, wanted, udp=udp)
            if domain is not None and client.routed.get(domain) != port:
                await client.route(domain, port)
            host, relay = self._relay_host, self._relay_id
        else:
            if domain is not None:
                self._route_here(domain, port)
            host, public_port, relay = self._public_address(), port, ""
        if before is not None and before.domain and before.domain != domain:
            await self._unroute(before.domain)
        for other in moved:  # the owner (or the same peer) points the domain here now
            self._db.execute(
                "UPDATE port_mappings SET domain = NULL WHERE port = ? AND domain = ?",
                (other, domain),
            )
        self._db.execute(
            "INSERT OR REPLACE INTO port_mappings (port, udp, public_host, public_port,"
            " relay, domain, owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (port, int(udp), host, public_port, relay, domain, by),
        )
        return _mapped(port, host, public_port, relay, domain, udp=udp)

    async def publish(self, host: str, port: int) -> tuple[str, int] | None:
        """Publish a port the node itself serves (a container's SSH or extra port) through
        the relay; ``None`` when the node is public and the port needs no relay."""
        await self._nat_settled()
        if not self.behind_nat:
            return None
        async with self._lock:
            client = await self._tunnel()
            self._system[port] = host
            public = client.exposed.get(port) or await client.expose(port, local_host=host)
            return self._relay_host, public

    async def withdraw(self, port: int) -> None:
        """Stop publishing a port given to ``publish`` (its container is going away); a
        peer's mapping of it goes too: the right to the port went with the container."""
        if self._system.pop(port, None) is not None and self._client is not None:
            await self._client.unexpose(port)
        if self._owner(port, False):
            log.info("dropping the mapping of port %d: its container is gone", port)
            await self.unmap(port)

    @property
    def observed(self) -> tuple[str, int] | None:
        """This node's address as its relay sees it (its NAT's public side), while a tunnel
        is up and the relay says (hole punching starts from it)."""
        client = self._client
        return client.observed if client is not None else None

    @property
    def keeps_ports(self) -> bool | None:
        """Whether this node's NAT kept the source port of the tunnel's connection (what
        hole punching assumes of the direct port); None while unknown."""
        client = self._client
        if client is None or client.observed is None or not client.local_port:
            return None
        return client.observed[1] == client.local_port

    def public_address(self, port: int) -> tuple[str, int] | None:
        """Where a port given to ``publish`` is reachable now (it moves with the relay)."""
        client = self._client
        public = client.exposed.get(port) if client is not None else None
        return (self._relay_host, public) if public and port in self._system else None

    async def _nat_settled(self) -> None:
        if self._gossip is not None:  # without gossip nothing detects: public
            await self._nat.settled(_NAT_WAIT, self._gossip.table.alive())

    async def unmap(self, port: int, *, udp: bool = False) -> None:
        mapping = self._mapping(port, udp)
        if mapping is None:
            raise NotFound(f"{'UDP' if udp else 'TCP'} port {port} is not mapped")
        if self._client is not None:
            await self._client.unexpose(port, udp=udp)
        if mapping.domain:
            await self._unroute(mapping.domain)
        self._db.execute("DELETE FROM port_mappings WHERE port = ? AND udp = ?", (port, int(udp)))

    def _to_restore(self) -> list[tuple[int, str | None, bool, str]]:
        """(port, domain, udp, owner) of the mappings that need publishing again."""
        rows = self._db.execute(
            "SELECT port, domain, udp, owner, relay FROM port_mappings ORDER BY port, udp"
        ).fetchall()
        return [
            (int(port), domain, bool(udp), str(owner))
            for port, domain, udp, owner, relay in rows
            if relay or domain or self.behind_nat
        ]

    def _mapping(self, port: int, udp: bool = False) -> MappedPort | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM port_mappings WHERE port = ? AND udp = ?", (port, int(udp))
        ).fetchone()
        return None if row is None else _mapped(*row[:5], udp=bool(row[5]))

    def _route_here(self, domain: str, port: int) -> None:
        relay = self._own_relay
        if relay is None or not relay.routes_domains:
            raise InvalidRequest(
                "a public node routes domains with its relay's HTTP/HTTPS ports: set"
                " relay.enabled = true and relay.http_port / relay.https_port (80 / 443)"
            )
        relay.route_local(domain, port)

    async def _unroute(self, domain: str) -> None:
        if self._client is not None:
            await self._client.unroute(domain)
        if self._own_relay is not None:
            self._own_relay.unroute(domain)

    def _public_address(self) -> str:
        return self._addresses[0] if self._addresses else "127.0.0.1"

    async def _tunnel(self) -> TunnelClient:
        if self._client is not None:
            return self._client
        refusals: list[str] = []
        for member in self._relays():
            record = member.record
            client = TunnelClient(
                self._identity,
                record.host,
                record.relay_port,
                record.node_id,
                on_crash=self._on_crash,
                connect_timeout=self._timeouts.connect,
            )
            try:
                await client.start()
            except P2PRCError as exc:
                log.info("relay %s not usable: %s", record.name, exc)
                refusals.append(f"{record.name} ({record.node_id[:8]}): {exc}")
                await client.aclose()
                continue
            if self._api_port and self._gossip is not None and self._tls_dir is not None:
                # Back on the same relay: ask for the API's previous public port.
                last_relay, last_port = self._last_api
                wanted = last_port if last_relay == record.node_id else None
                try:
                    public_api = await client.expose(await self._api_endpoint(), wanted)
                except (P2PRCError, OSError, TimeoutError) as exc:
                    log.info("relay %s does not publish our API: %s", record.name, exc)
                    refusals.append(f"{record.name} ({record.node_id[:8]}): {exc}")
                    await client.aclose()
                    continue
                self._gossip.set_relay(record.node_id, join_address(record.host, public_api))
                self._last_api = (record.node_id, public_api)
            for port, host in list(self._system.items()):
                try:
                    await client.expose(port, local_host=host)
                except P2PRCError as exc:
                    log.warning("relay %s does not publish port %d: %s", record.name, port, exc)
            self._client, self._relay_id, self._relay_host = client, record.node_id, record.host
            log.info("tunnel through relay %s (%s)", record.name, record.host)
            self._tasks.spawn(self._failover(client), "relay-watch")
            return client
        if refusals:  # say what each relay answered: the reason is not only in its log
            raise RelayUnavailable("no relay took this node: " + "; ".join(refusals))
        raise RelayUnavailable(
            "no reachable relay among trusted peers (a public node in trust.allow or relay.use"
            " that enables relay)"
        )

    async def _api_endpoint(self) -> int:
        """The local port of the API's TLS listener (started on first use)."""
        if self._api_tls is None:
            assert self._tls_dir is not None
            context = server_context(self._identity, self._tls_dir)
            handshake = self._timeouts.connect
            self._api_tls = await asyncio.start_server(
                self._serve_api_tls, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=handshake
            )
        return int(self._api_tls.sockets[0].getsockname()[1])

    async def _serve_api_tls(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A TLS connection from the relay: decrypted here, then to the plain local API."""
        self._api_conns.add(writer)
        far: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            async with asyncio.timeout(self._timeouts.connect):
                far = await asyncio.open_connection(self._api_host, self._api_port)
            self._api_conns.add(far[1])
            await pipe(reader, writer, *far)
        except (OSError, TimeoutError) as exc:
            log.info("API over TLS: %s", exc or type(exc).__name__)
        finally:
            self._api_conns.discard(writer)
            if far is not None:
                self._api_conns.discard(far[1])
                await close_quietly(far[1])
            await close_quietly(writer)

    def _relays(self) -> list[Member]:
        if self._gossip is None:
            return []
        candidates = [
            m
            for m in self._gossip.table.alive()
            if m.record.relay_port
            and m.record.behind_nat is not True
            and m.record.host
            and self.trusts(m.record.node_id)
        ]
        return sorted(candidates, key=lambda m: (m.rtt_ms is None, m.rtt_ms or 0.0))

    async def _failover(self, client: TunnelClient) -> None:
        """When the relay goes away, publish every mapping again through the next one."""
        await client.closed.wait()
        log.info("relay %s lost; moving the tunnels", self._relay_id[:8])
        async with self._lock:
            if self._client is client:
                self._client, self._relay_id = None, ""
                if self._gossip is not None:
                    self._gossip.set_relay("", "")
        await client.aclose()
        self._tasks.spawn(self._restore_all(), "port-restore")

    async def _restore_all(self) -> None:
        """Publish again what was published (and the API, behind NAT), until it works."""
        if self._gossip is not None:
            await self._nat.known.wait()
        delay = _RETRY_FIRST
        while True:
            try:
                if self.behind_nat and self._api_port:
                    async with self._lock:
                        await self._tunnel()
                for port, domain, udp, owner in self._to_restore():
                    if not owner:
                        await self.map(port, domain, udp=udp)
                    elif port in self.peer_ports(owner):
                        async with self._lock:
                            await self._publish_mapping(port, domain, udp, owner)
                    else:  # the peer's container is gone: so is its right to the port
                        log.info("dropping the mapping of port %d: no longer %s's", port, owner)
                        await self.unmap(port, udp=udp)
                return
            except (P2PRCError, OSError, EOFError) as exc:  # a relay lost mid-publish: retry
                log.info("publishing through a relay: %r; again in %.0f s", exc, delay)
                if isinstance(exc, RelayUnavailable) and self._gossip is not None:
                    await self._gossip.refresh()  # learn of relays we do not know yet
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MOST)


def _mapped(
    port: int, host: str, public_port: int, relay: str, domain: str | None, *, udp: bool = False
) -> MappedPort:
    return MappedPort(
        IPAddress=host,
        PortNo=public_port,
        EntireAddress=join_address(host, public_port),
        local_port=port,
        relay=relay,
        domain=domain,
        udp=udp,
    )
