"""``AttachService`` (``node.attached``): the hosts this gateway attached, and those of others.

Attaching checks, in order, each failure a clear ``P2PRCError`` with nothing stored or
published: the name (peer-name rules, no peer's name, no other host's name unless the host
key matches), the ports, the allow list, the address (an IP literal, or a DNS name resolved
now), a TCP connection, an SSH banner, the host key (pinned from then on); then, optionally,
specs read over SSH logging in with this node's key (a refused login leaves them unknown).

Every own record is signed with one version, the set's, bumped on each change; the set's
version is announced in this node's peer record (custom key ``p2prc.attached``). A node that
sees a member announce a newer set than it holds pulls ``GET /attached/records`` from it
(through ``node.link``), verifies every record against that member's key, and replaces the
member's set. Pulls are bounded (records, bytes, all foreign records), one at a time per
gateway, and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from .._match import unique_peer
from ..config import NodeConfig
from ..errors import (
    AttachedNotFound,
    AttachFailed,
    InvalidRequest,
    NameTaken,
    P2PRCError,
    PeerProtocolError,
)
from ..identity import Identity, node_id_of, parse_public_key
from ..peers.link import PeerLink, PeerTarget
from ..peers.records import plausible_version
from ..peers.table import Member, MemberState, PeerTable
from . import probe
from .client import MAX_RECORDS, AttachedAPI
from .models import (
    MAX_ALLOW,
    AttachedGateway,
    AttachedHost,
    AttachedLocal,
    AttachRequest,
    GatewayState,
)
from .records import AttachedRecord, decode_attached
from .store import AttachedRow, AttachStore

__all__ = ["ATTACHED_KEY", "MAX_FOREIGN", "AttachService", "for_node", "merge"]

log = logging.getLogger(__name__)

ATTACHED_KEY = "p2prc.attached"
MAX_FOREIGN = 1024
_BANNER_TIMEOUT = 5.0
_RESOLVE_TIMEOUT = 5.0
_SPECS_TIMEOUT = 10.0
# Seconds an attach waits for its listener to be published through the relay.
_PUBLISH_WAIT = 15.0
_POLL = 0.5
_PULLS_AT_ONCE = 4
_MIN_PULL_GAP = 1.0
_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 60.0
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")
_NODE_ID = re.compile(r"^[0-9a-f]{32}$")
_SPECS = "uname -m; uname -s; nproc; awk '/^MemTotal:/ {print $2}' /proc/meminfo"
_STATES: dict[MemberState, GatewayState] = {
    MemberState.ALIVE: "alive",
    MemberState.SUSPECT: "suspect",
    MemberState.DEAD: "dead",
    MemberState.LEFT: "dead",
}
_ORDER = {"self": 0, "alive": 1, "suspect": 2, "dead": 3}


class _Publish(Protocol):
    def __call__(self, key: str, value: str | None) -> None: ...


def merge(
    records: list[AttachedRecord],
    gateway: Callable[[AttachedRecord], AttachedGateway],
) -> list[AttachedHost]:
    """One host per name: the records of the oldest version's host key are its gateways,
    any other host key for the name is a conflict (listed, never routed to). By name."""
    by_name: dict[str, list[AttachedRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    hosts = []
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda r: (r.version, r.gateway))
        first = group[0]
        same = [r for r in group if r.host_key == first.host_key]
        others = [r for r in group if r.host_key != first.host_key]
        known = next((r for r in same if r.cores or r.arch), first)
        gateways = sorted(
            (gateway(r) for r in same),
            key=lambda g: (_ORDER[g.state], g.rtt_ms if g.rtt_ms is not None else 1e9, g.node_id),
        )
        hosts.append(
            AttachedHost(
                name=name,
                host_key=first.host_key,
                ssh_port=first.ssh_port,
                user=first.user,
                ports=list(first.ports),
                cores=known.cores,
                memory=known.memory,
                arch=known.arch,
                os=known.os,
                gateways=gateways,
                conflicts=[gateway(r) for r in others],
            )
        )
    return hosts


class AttachService(Component):
    """Attached hosts: this gateway's (stored, signed, announced) and the network's (pulled)."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        store: AttachStore,
        *,
        link: PeerLink,
        table: Callable[[], PeerTable | None] = lambda: None,
        publish: _Publish | None = None,
        endpoint: Callable[[], str] = lambda: "",
        publish_endpoint: Callable[[], Awaitable[object]] | None = None,
        version: Callable[[], int] = lambda: 0,
        save_version: Callable[[int], None] = lambda version: None,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._identity = identity
        self._config = config
        self._store = store
        self._link = link
        self._table = table
        self._publish = publish
        self._endpoint, self._publish_endpoint = endpoint, publish_endpoint
        self._last_version = version
        self._save_version = save_version
        self._tasks = TaskSet(on_crash)
        self._lock = asyncio.Lock()
        self._own: dict[str, AttachedRecord] = {}
        self._signed_endpoint = ""
        self._version = 0
        # Other gateways: the set version held, pulls under way, when to try again.
        self._held: dict[str, int] = {}
        self._foreign: dict[tuple[str, str], AttachedRecord] = {}
        self._pulling: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}
        self._pulls = asyncio.Semaphore(_PULLS_AT_ONCE)
        self.pulls = 0  # pulls done (for tests and status)

    def __repr__(self) -> str:
        return f"<AttachService [{len(self._own)} own | {len(self._held)} gateways]>"

    async def start(self) -> None:
        self._held = self._store.gateways()
        self._foreign = {(r.gateway, r.name): r for r in self._store.foreign()}
        self._sign_all()
        self._tasks.spawn(self._watch(), "attach-watch")

    async def aclose(self) -> None:
        await self._tasks.cancel_all()

    # The gateway's own hosts ------------------------------------------------------------

    async def attach(self, request: AttachRequest) -> AttachedHost:
        """Attach ``request.host`` under ``request.name`` (owner only; see the module)."""
        async with self._lock:
            name = request.name
            self._check_name(name, request.same_as)
            if len(self._own) >= MAX_RECORDS:
                raise InvalidRequest(f"a gateway attaches at most {MAX_RECORDS} hosts")
            ports = tuple(sorted(set(request.ports) - {request.ssh_port}))
            allow = self._resolve_allow(request.allow)
            addresses, timeouts = await probe.resolve_host(request.host), self._config.timeouts
            address = await probe.reachable(addresses, request.ssh_port, timeouts.connect)
            host_key = await probe.host_key(
                address, request.ssh_port, self._config.timeouts.connect
            )
            self._check_key(name, host_key, request.same_as)
            specs = await self._specs(address, request.ssh_port, request.user, host_key)
            row = AttachedRow(
                name=name,
                address=address,
                ssh_port=request.ssh_port,
                host_key=host_key,
                created=time.time(),
                version=0,
                user=request.user,
                ports=ports,
                allow=allow,
                **specs,
            )
            await self._endpoint_ready()
            self._store.add(row)
            try:
                self._sign_all()
            except InvalidRequest:
                self._store.remove(name)  # nothing stored when it cannot be announced
                with contextlib.suppress(InvalidRequest):
                    self._sign_all()
                raise
            log.info("attached %s at %s:%d", name, address, request.ssh_port)
            return self._local_view(name)

    async def detach(self, name: str) -> None:
        """Stop reaching ``name``: its row and maps are removed, the new set announced."""
        async with self._lock:
            if not self._store.remove(name):
                raise AttachedNotFound(f"this node attached no host named {name!r}")
            self._sign_all()
            log.info("detached %s", name)

    async def set_allow(self, name: str, add: list[str], remove: list[str]) -> AttachedHost:
        """Add keys to, and remove keys from, the host's allow list (resolved to node ids)."""
        async with self._lock:
            row = self._own_row(name)
            added, removed = self._resolve_allow(add), set(self._resolve_allow(remove, known=False))
            allow = tuple(e for e in dict.fromkeys([*row.allow, *added]) if e not in removed)
            if len(allow) > MAX_ALLOW:
                raise InvalidRequest(f"an allow list holds at most {MAX_ALLOW} keys")
            self._store.set_allow(name, allow)
            return self._local_view(name)

    def own(self) -> list[AttachedHost]:
        """This gateway's hosts, each with its LAN row."""
        return [self._local_view(row.name) for row in self._store.rows()]

    def known(self) -> list[AttachedHost]:
        """Every attached host this node knows (its own included), merged over gateways."""
        me = self._identity.node_id
        foreign = [r for r in self._foreign.values() if r.gateway != me]
        return merge([*self._own.values(), *foreign], self._gateway_of)

    def get(self, name: str) -> AttachedHost:
        for host in self.known():
            if host.name == name:
                return host
        raise AttachedNotFound(f"no attached host named {name!r}; see 'p2prc attached'")

    def records(self) -> list[bytes]:
        """This gateway's signed records, encoded (``GET /attached/records``)."""
        return [record.encode() for record in self._own.values()]

    def allows(self, name: str, public_key: bytes) -> bool:
        """Whether ``public_key`` may reach ``name`` through this gateway: the node's own key
        always; else its node id must be in the host's allow list."""
        row = self._store.row(name)
        if row is None:
            return False
        if public_key == self._identity.public_key:
            return True
        return len(public_key) == 32 and node_id_of(public_key) in row.allow

    def target(self, name: str, port: int) -> tuple[str, int] | None:
        """The LAN address and port to dial for ``name``: only its SSH port or an attached
        port; anything else is ``None`` (the gateway is no subnet router)."""
        row = self._store.row(name)
        if row is None or not (port == row.ssh_port or port in row.ports):
            return None
        return row.address, port

    def republish(self) -> None:
        """Re-sign the own records (the attach listener's endpoint changed) and announce."""
        self._sign_all()

    # Checks -------------------------------------------------------------------------------

    def _check_name(self, name: str, same_as: str | None) -> None:
        if same_as is not None and same_as != name:
            raise InvalidRequest(
                f"--same-as {same_as!r}: a second gateway attaches the host under its own "
                f"name ({same_as!r}), so that both records make one host"
            )
        table = self._table()
        peers = [] if table is None else [table.me, *(m.record for m in table.members.values())]
        if name == self._config.name or any(record.name == name for record in peers):
            raise NameTaken(f"{name!r} is a peer's name; choose another name for the host")
        if self._store.row(name) is not None:
            raise NameTaken(f"this node already attached {name!r}; 'p2prc detach {name}' first")
        if same_as is not None and not any(host.name == same_as for host in self.known()):
            raise AttachedNotFound(f"--same-as {same_as!r}: no attached host has that name")

    def _check_key(self, name: str, host_key: str, same_as: str | None) -> None:
        for host in self.known():
            if host.name == name and host.host_key != host_key:
                if same_as is not None:
                    raise AttachFailed(
                        f"host key mismatch: the host answers with another key than "
                        f"{same_as!r} has ({host_key.split()[0]}); not the same host"
                    )
                owners = ", ".join(g.name for g in host.gateways) or "another gateway"
                raise NameTaken(
                    f"{name!r} is attached through {owners} with another host key; "
                    "choose another name"
                )

    def _resolve_allow(self, entries: list[str], *, known: bool = True) -> tuple[str, ...]:
        """Node ids for peer names, node ids and Ed25519 public key lines."""
        ids = []
        for entry in entries:
            text = entry.strip()
            if _NODE_ID.match(text):
                ids.append(text)
            elif text.startswith("ssh-"):
                try:
                    ids.append(node_id_of(parse_public_key(text)))
                except ValueError:
                    raise InvalidRequest(
                        f"{text[:40]!r}: only Ed25519 (node) keys can be allowed"
                    ) from None
            elif known:
                ids.append(self._peer_id(text))
            else:
                with contextlib.suppress(P2PRCError):
                    ids.append(self._peer_id(text))
        if len(ids) > MAX_ALLOW:
            raise InvalidRequest(f"an allow list holds at most {MAX_ALLOW} keys")
        return tuple(dict.fromkeys(ids))

    def _peer_id(self, typed: str) -> str:
        table = self._table()
        members = [] if table is None else list(table.members.values())
        member = unique_peer(
            typed, members, ident=lambda m: m.record.node_id, name=lambda m: m.record.name
        )
        return member.record.node_id

    async def _specs(self, address: str, port: int, user: str, host_key: str) -> dict[str, Any]:
        return await probe.read_specs(
            self._identity, address, port, user, host_key, self._config.timeouts.connect
        )

    # Signing and announcing ---------------------------------------------------------------

    def _sign_all(self) -> None:
        """Sign every own row at a new set version and announce it (none: no key)."""
        rows = self._store.rows()
        endpoint = self._current_endpoint()
        now = int(time.time() * 1000)
        version = max(now, self._last_version() + 1, self._version + 1)
        if not plausible_version(version, time.time(), self._config.trust.clock_skew):
            version = max(now, self._version + 1)  # a saved version from the future: not again
        me = self._identity
        own = {}
        for row in rows:
            record = AttachedRecord(
                name=row.name,
                gateway=me.node_id,
                gateway_key=me.public_key,
                version=version,
                host_key=row.host_key,
                ssh_port=row.ssh_port,
                user=row.user,
                ports=row.ports,
                endpoint=endpoint,
                cores=row.cores,
                memory=row.memory,
                arch=row.arch,
                os=row.os,
            )
            own[row.name] = record.signed(me)
        self._version = version
        self._save_version(version)
        self._store.set_version(version)
        self._own, self._signed_endpoint = own, endpoint
        if self._publish is not None:
            try:
                self._publish(ATTACHED_KEY, str(version) if own else None)
            except RuntimeError:  # gossip is not running (off, or stopping)
                log.debug("attached set %d not announced: gossip is not running", version)
            except ValueError as exc:  # the node's own record has no room for the key
                raise InvalidRequest(f"cannot announce attached hosts: {exc}") from None

    async def _endpoint_ready(self) -> None:
        """Publish the attach listener through the relay (behind NAT) before a record first
        names it, so that no client is handed the listener's LAN address; if the relay does
        not answer in time, the records are signed with what there is and re-signed by the
        watcher once the listener is published."""
        if self._publish_endpoint is None:
            return
        try:
            await asyncio.wait_for(self._publish_endpoint(), _PUBLISH_WAIT)
        except (P2PRCError, OSError, RuntimeError, TimeoutError) as exc:
            log.info("attach listener not published yet (%s); the records follow it", exc)

    def _current_endpoint(self) -> str:
        try:
            return self._endpoint()
        except (AttributeError, RuntimeError):
            return ""

    # Other gateways -----------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            if self._own and self._current_endpoint() != self._signed_endpoint:
                async with self._lock:
                    self._sign_all()
            self.sync_once()
            await asyncio.sleep(_POLL)

    def sync_once(self) -> None:
        """Start pulls of newer sets and drop the sets of gateways gone or announcing none."""
        table = self._table()
        if table is None:
            return
        me, now = self._identity.node_id, time.monotonic()
        skew = self._config.trust.clock_skew
        for gateway in [g for g in self._held if g not in table.members or g == me]:
            self._drop(gateway, "it left the peer table")
        for node_id, member in table.members.items():
            if node_id == me:
                continue
            announced = _announced(member)
            if announced is not None and not plausible_version(announced, time.time(), skew):
                announced = None  # dated in the future: no set we would ever pull
            if announced is None:
                if node_id in self._held:
                    self._drop(node_id, "it announces no attached hosts")
                continue
            if member.state is not MemberState.ALIVE:  # kept as they are; pulled once back
                continue
            if announced <= self._held.get(node_id, -1) or node_id in self._pulling:
                continue
            if now < self._retry.get(node_id, (0.0, 0.0))[0]:
                continue
            self._pulling.add(node_id)
            self._tasks.spawn(self._pull(member, announced), f"attach-pull-{node_id[:8]}")

    def _drop(self, gateway: str, why: str) -> None:
        self._held.pop(gateway, None)
        self._retry.pop(gateway, None)
        self._foreign = {k: r for k, r in self._foreign.items() if r.gateway != gateway}
        if self._store.drop_gateway(gateway):
            log.info("dropped the attached hosts of %s: %s", gateway[:8], why)

    async def _pull(self, member: Member, announced: int) -> None:
        gateway = member.record.node_id
        try:
            async with self._pulls:
                target = PeerTarget(member.record.api_url, gateway)
                async with self._link.connect(target) as client:
                    raw = await AttachedAPI(client).records()
                records = self._verified(member, raw)
            table = self._table()
            if table is None or gateway not in table.members:
                return
            self._store.replace_gateway(gateway, records)
            kept = {k: r for k, r in self._foreign.items() if r.gateway != gateway}
            self._foreign = kept | {(gateway, r.name): r for r in records}
            self._held[gateway] = announced
            # A gateway re-announcing at once waits a little: at most a pull a second each.
            self._retry[gateway] = (time.monotonic() + _MIN_PULL_GAP, _BACKOFF_FIRST / 2)
            self.pulls += 1
        except (P2PRCError, TimeoutError, OSError) as exc:
            delay = min(_BACKOFF_MAX, self._retry.get(gateway, (0.0, _BACKOFF_FIRST / 2))[1] * 2)
            self._retry[gateway] = (time.monotonic() + delay, delay)
            log.info("pulling attached hosts of %s failed (%s); again in %.0f s", gateway[:8],
                     exc or type(exc).__name__, delay)  # fmt: skip
        finally:
            self._pulling.discard(gateway)

    def _verified(self, member: Member, raw: list[bytes]) -> list[AttachedRecord]:
        """Each record decoded and signed by ``member``; bounded; names unique."""
        gateway, skew = member.record.node_id, self._config.trust.clock_skew
        records: dict[str, AttachedRecord] = {}
        for data in raw[:MAX_RECORDS]:
            record = decode_attached(data)
            if record.gateway != gateway or record.gateway_key != member.record.public_key:
                raise PeerProtocolError(f"{gateway[:8]} answered a record of another gateway")
            if not plausible_version(record.version, time.time(), skew):
                raise PeerProtocolError(f"{gateway[:8]} answered a record dated in the future")
            if record.name in records:
                raise PeerProtocolError(f"{gateway[:8]} answered {record.name!r} twice")
            records[record.name] = record
        room = MAX_FOREIGN - sum(1 for r in self._foreign.values() if r.gateway != gateway)
        if len(records) > room:
            log.warning("holding only %d of %s's attached hosts (at most %d in all)",
                        max(room, 0), gateway[:8], MAX_FOREIGN)  # fmt: skip
        return list(records.values())[: max(room, 0)]

    # Views --------------------------------------------------------------------------------

    def _own_row(self, name: str) -> AttachedRow:
        row = self._store.row(name)
        if row is None:
            raise AttachedNotFound(f"this node attached no host named {name!r}")
        return row

    def _local_view(self, name: str) -> AttachedHost:
        row = self._own_row(name)
        host = next((h for h in self.known() if h.name == name), None)
        if host is None:  # not signable (never: rows are checked before they are stored)
            raise AttachedNotFound(f"{name!r} has no signed record")
        local = AttachedLocal(address=row.address, allow=list(row.allow), created=row.created)
        return host.model_copy(update={"local": local})

    def _gateway_of(self, record: AttachedRecord) -> AttachedGateway:
        me = self._identity.node_id
        if record.gateway == me:
            return AttachedGateway(
                node_id=me,
                name=self._config.name,
                endpoint=record.endpoint,
                state="self",
                version=record.version,
            )
        table = self._table()
        member = None if table is None else table.members.get(record.gateway)
        return AttachedGateway(
            node_id=record.gateway,
            name=member.record.name if member else record.gateway[:8],
            endpoint=record.endpoint,
            state=_STATES[member.state] if member else "dead",
            version=record.version,
            rtt_ms=member.rtt_ms if member else None,
        )


def _announced(member: Member) -> int | None:
    text = member.record.custom.get(ATTACHED_KEY)
    if text is None or not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def for_node(node: Any, *, on_crash: CrashHandler = log_crash) -> AttachService:
    """The service of a running ``Node`` (its gossip, link, state and attach listener)."""

    def table() -> PeerTable | None:
        try:
            return node.gossip.table  # type: ignore[no-any-return]
        except RuntimeError:
            return None

    def publish(key: str, value: str | None) -> None:
        node.gossip.set_reserved(key, value)

    def endpoint() -> str:
        gateway = getattr(node, "attach_gateway", None)
        return "" if gateway is None else str(gateway.endpoint())

    async def publish_endpoint() -> object:
        gateway = getattr(node, "attach_gateway", None)
        return "" if gateway is None else await gateway.ensure_published()

    state = node.state

    def version() -> int:
        saved = state.get_meta("attached_version") or "0"
        return int(saved) if saved.isdigit() else 0

    return AttachService(
        node.identity,
        node.config,
        AttachStore(state.connection),
        link=node.link,
        table=table,
        publish=publish,
        endpoint=endpoint,
        publish_endpoint=publish_endpoint,
        version=version,
        save_version=lambda v: state.set_meta("attached_version", str(v)),
        on_crash=on_crash,
    )
