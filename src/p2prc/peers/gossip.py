"""``Gossip``: the node's membership component (UDP SWIM + HTTP push-pull + SQLite).

One UDP socket serves both families: an IPv6 socket with ``IPV6_V6ONLY`` off, bound to
``::``, sending to IPv4 peers as ``::ffff:a.b.c.d`` (and reading such sources back as
IPv4); where IPv6 is unavailable, an IPv4 socket that skips IPv6 peers. A datagram that
cannot be sent is counted in ``swim.stats.unsent`` and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack
import psutil

from .._aio import CrashHandler, TaskSet, log_crash
from .._client_async import peer_url
from .._closing import Component
from ..config import NodeConfig
from ..errors import InvalidRequest, P2PRCError, PeerProtocolError
from ..identity import Identity
from ..state import State
from ..trust import TrustPolicy
from ..tunnel.nat import NatState
from . import exchange
from .exchange import MAX_EXCHANGE_BYTES
from .link import PeerLink, PeerTarget
from .records import (
    MAX_ADDRESSES,
    VERSION_BOUND,
    Claim,
    PeerRecord,
    ip_literal,
    parse_claim,
    parse_record,
    plausible_version,
)
from .store import PeerStore
from .swim import Outgoing, Swim, SwimSettings
from .table import STORED, Member, MemberState, PeerTable

__all__ = ["MAX_EXCHANGE_BYTES", "RESERVED_PREFIX", "Gossip"]

# Custom keys the node sets itself (``p2prc.attached``: its attached set's version).
RESERVED_PREFIX = "p2prc."

log = logging.getLogger(__name__)

# Seconds between SWIM clock ticks: its probe, suspicion and broadcast timers run on them.
_TICK = 0.05
# Push-pull rounds with one node (each moves at most a page of records each way).
_ROUNDS = 4
# New members one introducer may add a minute (listed keys are not limited).
_NEW_PER_MINUTE = 64
_RTT_WEIGHT = 0.2
# Rounds over the root nodes, and seconds between them, until one answers (a minute).
_BOOTSTRAP_ROUNDS = 30
_BOOTSTRAP_RETRY = 2.0
# A tick this far ahead starts a protocol period at once: the leave claim goes out now.
_FLUSH_AHEAD = 3600.0


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gossip: Gossip) -> None:
        self._gossip = gossip

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._gossip.datagram(data, (_unmapped(str(addr[0])), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket error: %s", exc)


class Gossip(Component):
    """Knows the network: who is there, whether they are alive, and how far away."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        state: State,
        *,
        api_port: int,
        addresses: list[str],
        gpus: Callable[[], int] = lambda: 0,
        relay_port: int = 0,
        on_crash: CrashHandler = log_crash,
        trust: TrustPolicy | None = None,
        nat: NatState | None = None,
        link: PeerLink | None = None,
    ) -> None:
        self._trust = trust or TrustPolicy(config.trust, identity.public_key)
        # The node's one NAT state (the mapper reads it too); a change re-signs the record.
        self.nat = nat or NatState(config, self._trust)
        self.nat.on_change(self._nat_changed)
        self._ipv6 = False
        self._relay_port = relay_port
        self._relay, self._public_api = "", ""
        self._identity = identity
        self._config = config
        self._settings = config.gossip
        self._timeouts = config.timeouts
        # The one way this node calls another (signed, bounded by [timeouts]).
        self._link = link or PeerLink(identity, lambda: self.table, config.timeouts)
        self._state = state
        self._store = PeerStore(state.connection)
        self._api_port = api_port
        self._addresses = addresses
        self._gpus = gpus
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks = TaskSet(on_crash)
        self.swim: Swim | None = None
        self.port = 0

    def __repr__(self) -> str:
        members = len(self.swim.table) if self.swim else 0
        return f"<Gossip [udp {self.port} | {members} members]>"

    @property
    def table(self) -> PeerTable:
        if self.swim is None:
            raise RuntimeError("Gossip runs only between start() and aclose().")
        return self.swim.table

    @property
    def me(self) -> PeerRecord:
        return self.table.me

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = self._settings.port if self._settings.port is not None else self._api_port
        sock, self._ipv6 = _udp_socket(wanted)
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        try:
            self._start_membership()
        except BaseException:
            # Entered with an exit stack: a failed start gets no aclose(), so close here.
            self._transport.close()
            self._transport = None
            raise

    def _start_membership(self) -> None:
        assert self._transport is not None
        self.port = self._transport.get_extra_info("sockname")[1]
        self._recover_version()
        table = PeerTable(
            self._sign_record(self._metadata()),
            max_members=self._settings.max_members,
            new_per_minute=_NEW_PER_MINUTE,
            listed=self._trust.listed,
            skew=self._config.trust.clock_skew,
        )
        table.on_evict = self._store.delete
        settings = SwimSettings(
            period=self._settings.interval,
            probe_timeout=self._settings.interval / 2,
            indirect=self._settings.indirect_checks,
            fanout=self._settings.fanout,
            suspicion_mult=self._settings.suspicion_mult,
        )
        self.swim = Swim(self._identity, table, settings, random.Random())
        self.swim.on_refute = self._refute
        self.swim.on_change = self._persist
        self.swim.on_rtt = self._rtt
        self._load()
        self.swim.broadcast_record(table.me)
        self._tasks.spawn(self._tick_loop(), "gossip-tick")
        self._tasks.spawn(self._push_pull_loop(), "gossip-push-pull")

    async def aclose(self) -> None:
        if self.swim is not None and self._transport is not None:
            leave = Claim("left", self.me.node_id, self.me.version, "").signed(self._identity)
            self.swim.broadcast_claim(leave)
            self._send(self.swim.tick(asyncio.get_running_loop().time() + _FLUSH_AHEAD))
        await self._tasks.cancel_all()
        if self._transport is not None:
            self._transport.close()

    # Public operations ----------------------------------------------------------------

    def set_metadata(self, text: str, custom: dict[str, str] | None = None) -> PeerRecord:
        """Change this node's metadata (the original --amd); it spreads to every node.

        Custom keys starting with ``p2prc.`` are the node's own (refused here, kept as set).
        """
        current = self._metadata()
        kept = dict(current.get("custom") or {})
        if custom is not None:
            if any(str(key).startswith(RESERVED_PREFIX) for key in custom):
                raise InvalidRequest(f"custom keys starting with {RESERVED_PREFIX!r} are reserved")
            reserved = {k: v for k, v in kept.items() if str(k).startswith(RESERVED_PREFIX)}
            kept = {**custom, **reserved}
        metadata = {"text": text, "custom": kept}
        record = self._sign_record(metadata)
        self._state.set_meta("metadata", msgpack.packb(metadata).hex())
        self._replace_me(record)
        return record

    def set_reserved(self, key: str, value: str | None) -> None:
        """Set (``None``: remove) one of the node's own ``p2prc.`` custom keys; re-signs."""
        if not key.startswith(RESERVED_PREFIX):
            raise ValueError(f"{key!r} is not a reserved key")
        metadata = self._metadata()
        custom = dict(metadata.get("custom") or {})
        if custom.get(key) == value:
            return
        if value is None:
            custom.pop(key, None)
        else:
            custom[key] = value
        metadata["custom"] = custom
        self._state.set_meta("metadata", msgpack.packb(metadata).hex())
        if self.swim is not None:
            self._replace_me(self._sign_record(metadata))

    def set_relay(self, relay: str, public_api: str) -> None:
        """Record the relay this node tunnels through and its API's address there."""
        if (self.table.me.relay, self.table.me.public_api) != (relay, public_api):
            self._relay, self._public_api = relay, public_api
            self._replace_me(self._sign_record(self._metadata()))

    def exchange(self, body: bytes, caller: str) -> bytes:
        """Answer a push-pull post from ``caller`` (a node id, the signed sender).

        Merges what it pushed (introduced by ``caller``) and answers one bounded page of
        what its digest lacks plus the ids we want; see :mod:`p2prc.peers.exchange`.
        """
        request = exchange.decode_request(body)
        self._merge(request.records, request.claims, caller)
        if request.legacy:
            answer = exchange.plan(self.table, {})
            return exchange.Answer(answer.records, answer.claims, legacy=True).encode()
        if request.digest is None:
            return exchange.Answer().encode()
        return exchange.plan(self.table, request.digest).encode()

    async def push_pull(
        self, address: str, audience: str | None = None, *, trusted: bool = False
    ) -> int:
        """Exchange tables with the node at ``address`` over its API: digests first, then
        only what either side lacks, a page at a time; returns how many entries changed.

        Signed for ``audience``, else for the alive member whose signed record publishes
        that address; only an address no record names (a root node) is asked who it is.
        What it answers counts against that member's share of new members, unless it is
        a root node or ``trusted`` (an address the owner gave).
        """
        audience = audience or self.member_at(address)
        rooted = trusted or address in self._config.bootstrap
        introducer = None if rooted else (audience or f"address:{address}")
        # Joining (a root node, an address the owner gave): our record rides the first
        # post, so the other side spreads it while the rest of the exchange goes on.
        mine = [self.me.encode()] if rooted else []
        request = exchange.Request(exchange.digest(self.table), records=mine)
        changed = 0
        async with self._link.connect(PeerTarget(peer_url(address), audience)) as client:
            for round_ in range(_ROUNDS):
                answer = exchange.decode_answer(await client.exchange(request.encode()))
                changed += self._merge(answer.records, answer.claims, introducer)
                if answer.legacy or not (answer.want or answer.more):
                    break
                request = exchange.pushed(self.table, answer.want)
                if answer.more and round_ < _ROUNDS - 2:
                    request.digest = exchange.digest(self.table)
                if not (request.records or request.claims or request.digest):
                    break
        return changed

    def _merge(self, records: list[bytes], claims: list[bytes], introducer: str | None) -> int:
        """Apply pushed records, then claims; returns how many entries changed."""
        swim, now, before = self._swim(), asyncio.get_running_loop().time(), self.table.snapshot()
        for raw in records:
            try:
                swim.apply_record(parse_record(raw), now, introducer)
            except PeerProtocolError:
                self.table.rejected["malformed"] += 1
        for raw in claims:
            try:
                swim.apply_claim(parse_claim(raw), now)
            except PeerProtocolError:
                self.table.rejected["malformed"] += 1
        after = self.table.snapshot()
        self._send(swim.push(now))  # what changed spreads now, not at the next round
        return sum(1 for key, value in after.items() if before.get(key) != value)

    def member_at(self, address: str) -> str | None:
        """The node id of the alive member whose signed record has this API address."""
        from ..client import peer_url

        url = peer_url(address)
        for member in self.table.alive():
            if self.api_url(member) == url:
                return member.record.node_id
        return None

    async def refresh(self, count: int = 3) -> int:
        """Exchange tables now with a few alive members and the root nodes (for a node
        that needs something it does not know of, like another relay); returns how many
        answered."""
        members = self.reachable()
        targets = [self.api_url(m) for m in random.sample(members, min(count, len(members)))]
        answered = 0
        for address in dict.fromkeys([*targets, *self.bootstrap_addresses()]):
            with contextlib.suppress(P2PRCError):
                await self.push_pull(address)
                answered += 1
        return answered

    def bootstrap_addresses(self) -> list[str]:
        return list(self._config.bootstrap)

    def forget(self, node_id: str) -> bool:
        self._store.delete(node_id)
        return self.table.forget(node_id)

    def api_url(self, member: Member) -> str:
        return member.record.api_url

    def reachable(self) -> list[Member]:
        """Alive members that proved their address: the only ones we start exchanges with."""
        swim = self._swim()
        return [m for m in self.table.alive() if swim.proven(m.record.node_id)]

    # Internals ------------------------------------------------------------------------

    def datagram(self, data: bytes, source: tuple[str, int] | None = None) -> None:
        if self.swim is not None:
            now = asyncio.get_running_loop().time()
            self._send(self.swim.receive(data, now, source))

    def _swim(self) -> Swim:
        if self.swim is None:
            raise RuntimeError("Gossip is not running.")
        return self.swim

    def _send(self, outgoing: list[Outgoing]) -> None:
        """Send each datagram; one that cannot go (family, route) is counted, not fatal."""
        if self._transport is None:
            return
        for item in outgoing:
            address = self._wire_address(item.address)
            if address is None:
                self._swim().stats.unsent["address family"] += 1
                continue
            try:
                self._transport.sendto(item.data, address)
            except (OSError, ValueError) as exc:
                self._swim().stats.unsent[type(exc).__name__] += 1
                log.debug("gossip datagram to %s not sent: %s", item.address, exc)

    def _wire_address(self, address: tuple[str, int]) -> tuple[str, int] | None:
        """The destination as our socket's family writes it, or None if it cannot reach it."""
        try:
            ip = ipaddress.ip_address(address[0])
        except ValueError:
            return None
        if self._ipv6:
            return (f"::ffff:{ip}" if ip.version == 4 else str(ip), address[1])
        if ip.version == 6:
            mapped = ip.ipv4_mapped
            return None if mapped is None else (str(mapped), address[1])
        return (str(ip), address[1])

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._send(self._swim().tick(loop.time()))
            await asyncio.sleep(_TICK)

    async def _push_pull_loop(self) -> None:
        await self._bootstrap()
        while True:
            await asyncio.sleep(self._settings.push_pull_interval * random.uniform(0.75, 1.25))
            alive = self.reachable()
            if alive:
                member = random.choice(alive)
                with contextlib.suppress(P2PRCError):
                    await self.push_pull(self.api_url(member), member.record.node_id)

    async def _bootstrap(self) -> None:
        """Exchange with the configured root nodes until one answers (bounded retries)."""
        addresses = list(self._config.bootstrap)
        for _ in range(_BOOTSTRAP_ROUNDS):
            if not addresses:
                return
            for address in addresses:
                try:
                    await self.push_pull(address)
                    log.info("joined through %s", address)
                    return
                except P2PRCError as exc:
                    log.info("bootstrap %s not answering: %s", address, exc)
            await asyncio.sleep(_BOOTSTRAP_RETRY)

    def _load(self) -> None:
        table = self.table
        for record, claim, rtt in self._store.load():
            table.apply_record(record, introducer=STORED)
            if claim is not None:
                table.apply_claim(claim)
            member = table.get(record.node_id)
            if member is not None:
                member.rtt_ms = rtt

    def _persist(self, node_id: str) -> None:
        member = self.table.get(node_id)
        if member is not None:
            self._store.save(member)

    def _rtt(self, node_id: str, sample_ms: float) -> None:
        member = self.table.get(node_id)
        if member is None:
            return
        previous = member.rtt_ms
        member.rtt_ms = (
            sample_ms if previous is None else previous + _RTT_WEIGHT * (sample_ms - previous)
        )

    def _refute(self, doubted: int) -> None:
        """Someone doubts us or holds a newer record of us: sign a newer one."""
        if not plausible_version(doubted + 1, time.time(), self._config.trust.clock_skew):
            log.warning("not refuting a claim dated in the future (version %d)", doubted)
            return
        self._replace_me(self._sign_record(self._metadata(), at_least=doubted + 1), push=False)

    def _recover_version(self) -> None:
        """A saved version at the codec's bound or in the future is poisoned: start over."""
        saved = self._state.get_meta("record_version") or "0"
        last = int(saved) if saved.isdigit() else VERSION_BOUND
        if not plausible_version(last, time.time(), self._config.trust.clock_skew):
            log.warning("saved record version %s is in the future; resetting it to now", saved)
            self._state.set_meta("record_version", str(int(time.time() * 1000)))

    def _nat_changed(self) -> None:
        """NAT detection found something new: the new record spreads by gossip."""
        if self.swim is not None and self.table.me.behind_nat is not self.nat.value:
            self._replace_me(self._sign_record(self._metadata()))

    def _replace_me(self, record: PeerRecord, *, push: bool = True) -> None:
        self.table.me = record
        swim = self._swim()
        swim.broadcast_record(record)
        if push:  # a refutation is sent by the receive or tick that asked for it
            with contextlib.suppress(RuntimeError):  # no loop: the next tick sends it
                self._send(swim.push(asyncio.get_running_loop().time()))

    def _metadata(self) -> dict[str, Any]:
        stored = self._state.get_meta("metadata")
        if stored:
            with contextlib.suppress(ValueError, msgpack.UnpackException):
                value = msgpack.unpackb(bytes.fromhex(stored), raw=False)
                if isinstance(value, dict):
                    return value
        return {"text": "", "custom": {}}

    def _sign_record(self, metadata: dict[str, Any], at_least: int = 0) -> PeerRecord:
        # Millisecond versions, strictly increasing even across restarts and clock skew.
        last = int(self._state.get_meta("record_version") or 0)
        now = int(time.time() * 1000)
        version = max(now, last + 1, at_least)
        if not plausible_version(version, time.time(), self._config.trust.clock_skew):
            version = max(now, last + 1)  # never sign (or save) a version from the future
        self._state.set_meta("record_version", str(version))
        record = PeerRecord(
            node_id=self._identity.node_id,
            public_key=self._identity.public_key,
            name=self._config.name,
            version=version,
            addresses=_advertisable(self._addresses),
            api_port=self._api_port,
            gossip_port=self.port,
            relay_port=self._relay_port,
            behind_nat=self.nat.value,
            relay=self._relay,
            public_api=self._public_api,
            user=_user(),
            cores=os.cpu_count() or 1,
            memory=psutil.virtual_memory().total,
            gpus=self._gpus(),
            metadata=str(metadata.get("text", "")),
            custom={str(k): str(v) for k, v in dict(metadata.get("custom") or {}).items()},
        )
        return record.signed(self._identity)


def _user() -> str:
    try:
        return getpass.getuser()[:64]
    except (KeyError, OSError):
        return ""


def member_state(member: Member) -> str:
    return MemberState(member.state).name.lower()


def _udp_socket(port: int) -> tuple[socket.socket, bool]:
    """A UDP socket on ``port`` for both families (IPv4 mapped), else IPv4 only."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        except OSError:
            sock.close()
        else:
            sock.setblocking(False)
            return sock, True
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, False


def _advertisable(addresses: list[str]) -> tuple[str, ...]:
    """The addresses a record may carry: unicast IP literals, at most as many as decoders
    take (a machine with many interfaces, like a Docker host, has more)."""
    usable = []
    for address in addresses:
        with contextlib.suppress(PeerProtocolError):
            usable.append(ip_literal(address))
    return tuple(dict.fromkeys(usable))[:MAX_ADDRESSES]


def _unmapped(host: str) -> str:
    """``::ffff:a.b.c.d`` as ``a.b.c.d``; anything else unchanged."""
    if host.startswith("::ffff:"):
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
            if mapped is not None:
                return str(mapped)
    return host
