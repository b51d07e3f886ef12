"""``PortMapper``: publish local ports, on this node when it is public, else via a relay.

A relay is chosen from the peer table: alive nodes whose signed record offers a relay
port and does not say they are behind NAT, lowest RTT first; its node id, from that signed
record, is what the TLS connection pins. Mappings persist in the state and are restored
when the node starts again.

Behind NAT, the node's own API port is published through the relay too, as soon as NAT
detection says so, and the relay's address for it goes into the node's signed record
(``public_api``), so peers reach the node's API with no extra steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from .._aio import CrashHandler, TaskSet, log_crash
from ..config import NodeConfig, join_address
from ..errors import InvalidRequest, NotFound, P2PRCError, RelayUnavailable
from ..identity import Identity
from ..models import MappedPort
from ..peers.gossip import Gossip
from ..peers.table import Member
from .client import TunnelClient
from .domains import normalize_domain
from .relay import RelayServer

__all__ = ["PortMapper"]

_COLUMNS = "port, public_host, public_port, relay, domain, udp"
# Seconds a map request waits for NAT detection when behind_nat is "auto".
_NAT_WAIT = 15.0

log = logging.getLogger(__name__)


class PortMapper:
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
    ) -> None:
        self._identity, self._config, self._db = identity, config, db
        self._gossip, self._addresses = gossip, addresses
        self._api_port, self._api_host = api_port, api_host
        self._last_api: tuple[str, int] = ("", 0)  # (relay, public port) of the API
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

    async def __aenter__(self) -> PortMapper:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def behind_nat(self) -> bool:
        """Configured, else what NAT detection found (unknown counts as public)."""
        if self._config.behind_nat != "auto":
            return bool(self._config.behind_nat)
        return bool(self._gossip and self._gossip.table.me.behind_nat)

    def mappings(self) -> list[MappedPort]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM port_mappings ORDER BY port, udp")
        return [_mapped(*row[:5], udp=bool(row[5])) for row in rows]

    async def map(self, port: int, domain: str | None = None, *, udp: bool = False) -> MappedPort:
        """Publish TCP (or UDP) ``port``, and route ``domain`` to it; a clear error when
        nothing listens on a TCP port (UDP cannot be checked)."""
        if domain is not None:
            if udp:
                raise InvalidRequest("domains route HTTP and TLS, which are TCP: map without --udp")
            domain = normalize_domain(domain)
        if not udp and not await _listening(port):
            raise InvalidRequest(f"nothing listens on local port {port}")
        await self._nat_settled()
        async with self._lock:
            before = self._mapping(port, udp)
            if domain is None and before is not None:
                domain = before.domain  # mapping again keeps the domain; unmap drops it
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
            self._db.execute(
                "INSERT OR REPLACE INTO port_mappings"
                " (port, udp, public_host, public_port, relay, domain) VALUES (?, ?, ?, ?, ?, ?)",
                (port, int(udp), host, public_port, relay, domain),
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
        """Stop publishing a port given to ``publish``."""
        if self._system.pop(port, None) is not None and self._client is not None:
            await self._client.unexpose(port)

    def public_address(self, port: int) -> tuple[str, int] | None:
        """Where a port given to ``publish`` is reachable now (it moves with the relay)."""
        client = self._client
        public = client.exposed.get(port) if client is not None else None
        return (self._relay_host, public) if public and port in self._system else None

    async def _nat_settled(self) -> None:
        gossip = self._gossip
        expects_peers = bool(self._config.bootstrap) or bool(gossip and gossip.table.alive())
        if gossip is not None and not gossip.nat_known.is_set() and expects_peers:
            # Detection needs peers; a node that has none and expects none maps as public.
            with contextlib.suppress(TimeoutError):  # undetected after that: treat as public
                await asyncio.wait_for(gossip.nat_known.wait(), _NAT_WAIT)

    async def unmap(self, port: int, *, udp: bool = False) -> None:
        mapping = self._mapping(port, udp)
        if mapping is None:
            raise NotFound(f"{'UDP' if udp else 'TCP'} port {port} is not mapped")
        if self._client is not None:
            await self._client.unexpose(port, udp=udp)
        if mapping.domain:
            await self._unroute(mapping.domain)
        self._db.execute("DELETE FROM port_mappings WHERE port = ? AND udp = ?", (port, int(udp)))

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
        for member in self._relays():
            record = member.record
            client = TunnelClient(
                self._identity,
                record.host,
                record.relay_port,
                record.node_id,
                on_crash=self._on_crash,
            )
            try:
                await client.start()
            except P2PRCError as exc:
                log.info("relay %s not usable: %s", record.name, exc)
                await client.aclose()
                continue
            if self._api_port and self._gossip is not None:
                # Back on the same relay: ask for the API's previous public port.
                last_relay, last_port = self._last_api
                wanted = last_port if last_relay == record.node_id else None
                try:
                    public_api = await client.expose(
                        self._api_port, wanted, local_host=self._api_host
                    )
                except (P2PRCError, OSError, TimeoutError) as exc:
                    log.info("relay %s does not publish our API: %s", record.name, exc)
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
        raise RelayUnavailable("no reachable relay among known peers (a public peer enables relay)")

    def _relays(self) -> list[Member]:
        if self._gossip is None:
            return []
        candidates = [
            m
            for m in self._gossip.table.alive()
            if m.record.relay_port and m.record.behind_nat is not True and m.record.host
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
        if self._gossip is not None and not self._gossip.nat_known.is_set():
            await self._gossip.nat_known.wait()
        delay = 1.0
        while True:
            try:
                if self.behind_nat and self._api_port:
                    async with self._lock:
                        await self._tunnel()
                pending = [m for m in self.mappings() if m.relay or m.domain or self.behind_nat]
                for mapping in pending:
                    await self.map(mapping.local_port, mapping.domain, udp=mapping.udp)
                return
            except P2PRCError as exc:
                log.info("publishing through a relay: %s; again in %.0f s", exc, delay)
                if isinstance(exc, RelayUnavailable) and self._gossip is not None:
                    await self._gossip.refresh()  # learn of relays we do not know yet
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


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
