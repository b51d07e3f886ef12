"""``Gossip``: the node's membership component (UDP SWIM + HTTP push-pull + SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack
import psutil

from .._aio import CrashHandler, TaskSet, log_crash
from ..config import NodeConfig
from ..errors import P2PRCError, PeerProtocolError
from ..identity import Identity
from ..state import State
from .records import Claim, PeerRecord, claim_from_fields, record_from_fields
from .store import PeerStore
from .swim import Outgoing, Swim, SwimSettings
from .table import Member, MemberState, PeerTable

__all__ = ["MAX_EXCHANGE_BYTES", "Gossip"]

log = logging.getLogger(__name__)

MAX_EXCHANGE_BYTES = 4 * 1024 * 1024
_TICK = 0.05
_RTT_WEIGHT = 0.2
_BOOTSTRAP_RETRY = 2.0


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gossip: Gossip) -> None:
        self._gossip = gossip

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._gossip.datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket error: %s", exc)


class Gossip:
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
    ) -> None:
        self._relay_port = relay_port
        self._relay, self._public_api = "", ""
        configured = config.behind_nat
        self._behind_nat: bool | None = None if configured == "auto" else bool(configured)
        # Set once whether this node is behind NAT is known (configured or detected).
        self.nat_known = asyncio.Event()
        if self._behind_nat is not None:
            self.nat_known.set()
        self._identity = identity
        self._config = config
        self._settings = config.gossip
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
        host = "::" if any(":" in a for a in self._addresses) else "0.0.0.0"
        wanted = self._settings.port if self._settings.port is not None else self._api_port
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, wanted)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        table = PeerTable(self._sign_record(self._metadata()))
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
            with contextlib.suppress(OSError):
                self._send(self.swim.tick(asyncio.get_running_loop().time() + 3600))
        await self._tasks.cancel_all()
        if self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> Gossip:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # Public operations ----------------------------------------------------------------

    def set_metadata(self, text: str, custom: dict[str, str] | None = None) -> PeerRecord:
        """Change this node's metadata (the original --amd); it spreads to every node."""
        current = self._metadata()
        metadata = {"text": text, "custom": current["custom"] if custom is None else custom}
        record = self._sign_record(metadata)
        self._state.set_meta("metadata", msgpack.packb(metadata).hex())
        self._replace_me(record)
        return record

    def set_behind_nat(self, behind_nat: bool) -> None:
        """Record what NAT detection found; the new record spreads by gossip."""
        if self.table.me.behind_nat is not behind_nat:
            self._behind_nat = behind_nat
            self._replace_me(self._sign_record(self._metadata()))
        self.nat_known.set()

    def set_relay(self, relay: str, public_api: str) -> None:
        """Record the relay this node tunnels through and its API's address there."""
        if (self.table.me.relay, self.table.me.public_api) != (relay, public_api):
            self._relay, self._public_api = relay, public_api
            self._replace_me(self._sign_record(self._metadata()))

    def export(self) -> bytes:
        """Everything we know, for a push-pull exchange."""
        table = self.table
        records = [table.me.encode(), *(m.record.encode() for m in table.members.values())]
        claims = [claim.encode() for claim in table.claims()]
        return bytes(msgpack.packb([records, claims], use_bin_type=True))

    def merge(self, data: bytes) -> int:
        """Apply a push-pull payload; returns how many entries were accepted or changed."""
        if len(data) > MAX_EXCHANGE_BYTES:
            raise PeerProtocolError("exchange payload too large")
        try:
            records, claims = msgpack.unpackb(data, raw=False, max_bin_len=MAX_EXCHANGE_BYTES)
        except Exception:
            raise PeerProtocolError("undecodable exchange payload") from None
        if not isinstance(records, list) or not isinstance(claims, list):
            raise PeerProtocolError("malformed exchange payload")
        swim, now, before = self._swim(), asyncio.get_running_loop().time(), self.table.snapshot()
        for raw, build in [(r, record_from_fields) for r in records] + [
            (c, claim_from_fields) for c in claims
        ]:
            try:
                item = build(msgpack.unpackb(raw, raw=False)) if isinstance(raw, bytes) else None
            except (PeerProtocolError, ValueError, TypeError, msgpack.UnpackException):
                item = None
            if isinstance(item, PeerRecord):
                swim.apply_record(item, now)
            elif isinstance(item, Claim):
                swim.apply_claim(item, now)
            else:
                self.table.rejected["malformed"] += 1
        after = self.table.snapshot()
        return sum(1 for key, value in after.items() if before.get(key) != value)

    async def push_pull(self, address: str, audience: str | None = None) -> int:
        """Exchange tables with the node at ``address`` over its API.

        Signed for ``audience``, else for the alive member whose signed record publishes
        that address; only an address no record names (a root node) is asked who it is.
        """
        from ..client import AsyncClient

        audience = audience or self.member_at(address)
        async with AsyncClient(
            address, identity=self._identity, audience=audience, timeout=10
        ) as client:
            answer = await client.exchange(self.export())
        return self.merge(answer)

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
        members = self.table.alive()
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
        if self._transport is None:
            return
        for item in outgoing:
            self._transport.sendto(item.data, item.address)

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._send(self._swim().tick(loop.time()))
            await asyncio.sleep(_TICK)

    async def _push_pull_loop(self) -> None:
        await self._bootstrap()
        while True:
            await asyncio.sleep(self._settings.push_pull_interval * random.uniform(0.75, 1.25))
            alive = self.table.alive()
            if alive:
                member = random.choice(alive)
                with contextlib.suppress(P2PRCError):
                    await self.push_pull(self.api_url(member), member.record.node_id)

    async def _bootstrap(self) -> None:
        """Exchange with the configured root nodes until one answers (bounded retries)."""
        addresses = list(self._config.bootstrap)
        for _ in range(30):
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
            table.apply_record(record)
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
        self._replace_me(self._sign_record(self._metadata(), at_least=doubted + 1))

    def _replace_me(self, record: PeerRecord) -> None:
        self.table.me = record
        self._swim().broadcast_record(record)

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
        version = max(int(time.time() * 1000), last + 1, at_least)
        self._state.set_meta("record_version", str(version))
        behind_nat = self._behind_nat
        record = PeerRecord(
            node_id=self._identity.node_id,
            public_key=self._identity.public_key,
            name=self._config.name,
            version=version,
            addresses=tuple(self._addresses),
            api_port=self._api_port,
            gossip_port=self.port,
            relay_port=self._relay_port,
            behind_nat=behind_nat,
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
