"""Routes under /trust (the owner's) and /invites: trust a peer in one command, or by token."""

import asyncio
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import httpx
from fastapi import APIRouter

from .._client_async import AsyncClient
from .._match import unique_prefix
from ..config import Home, NodeConfig, join_address, load, set_value
from ..errors import InvalidRequest, NotFound, P2PRCError, PeerNotFound, PeerProtocolError
from ..identity import Identity, b64decode, node_id_of, parse_public_key
from ..peers.gossip import Gossip
from ..peers.invites import (
    Invitation,
    InviteCreate,
    InviteStore,
    InviteToken,
    RedeemAnswer,
    RedeemRequest,
    TrustEntry,
    TrustRequest,
    encode_token,
)
from ..peers.link import resolve_peer
from ..peers.table import PeerTable
from ..state import State
from ..trust import ROLES, TrustPolicy, fingerprint, openssh_line
from .auth import KeyRate, Owner, RequestVerifier, Signed

__all__ = ["TrustNode", "router"]

# Redeem attempts: per calling key, and for all callers together (a key costs nothing).
_REDEEM_PER_KEY = (5, 60.0)
_REDEEM_ALL = (60, 60.0)
_COMMENT = re.compile(r"[^A-Za-z0-9._-]")


# Twin of app.NodeView's first five (each router's Protocol lists what its code reads).
class TrustNode(Protocol):
    @property
    def identity(self) -> Identity: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def state(self) -> State: ...
    @property
    def home_path(self) -> Path: ...
    @property
    def port(self) -> int: ...
    @property
    def gossip(self) -> Gossip: ...


def router(node: TrustNode, verifier: RequestVerifier) -> APIRouter:
    """Routes under /trust and /invites; every change to trust.allow goes through ``_Allow``."""
    routes = APIRouter(tags=["trust"])
    verifier.name = node.config.name
    allow = _Allow(node, verifier)
    invites = InviteStore(node.state.connection)
    per_key, everyone = KeyRate(*_REDEEM_PER_KEY), KeyRate(*_REDEEM_ALL, max_keys=1)

    @routes.post("/trust/lookup")
    async def lookup(body: TrustRequest, caller: Owner) -> TrustEntry:
        """Who a peer (name, node id prefix, address or key) is, without trusting it."""
        key, name = await allow.resolve(body.peer)
        return allow.entry(key, name)

    @routes.post("/trust")
    async def add(body: TrustRequest, caller: Owner) -> TrustEntry:
        """Trust a peer now and in config.toml (trust.allow; roles given: trust.roles)."""
        key, name = await allow.resolve(body.peer)
        return await allow.add(key, name, body.roles)

    @routes.get("/trust")
    async def entries(caller: Owner) -> list[TrustEntry]:
        """The keys in trust.allow, with the name each peer's record gives and their roles."""
        return allow.entries()

    @routes.delete("/trust/{peer}")
    async def remove(peer: str, caller: Owner) -> TrustEntry:
        """Stop trusting a peer (a node id prefix, or its name); config.toml too (its roles)."""
        return await allow.remove(peer)

    @routes.post("/invites")
    async def create_invite(body: InviteCreate, caller: Owner) -> Invitation:
        """A token for a new node: 'p2prc join TOKEN' there trusts it both ways."""
        secret, expires = invites.create(body.ttl, body.uses, roles=body.roles)
        token = InviteToken(_addresses(node), node.identity.node_id, secret)
        return Invitation(token=encode_token(token), expires_at=expires, uses=body.uses)

    @routes.post("/invites/redeem")
    async def redeem(body: RedeemRequest, caller: Signed) -> RedeemAnswer:
        """Present an invite's secret: the caller's key is trusted (any signed caller)."""
        if caller.role == "owner":
            raise InvalidRequest("this invite is this node's own; run 'p2prc join' elsewhere")
        now = time.monotonic()
        everyone.hit("*", now)
        per_key.hit(caller.node_id, now)
        try:
            secret = b64decode(body.secret)
        except ValueError:
            secret = b""
        if len(secret) != 16:
            raise InvalidRequest("not an invite secret")
        roles = invites.redeem(secret, caller.node_id)
        key = b64decode(caller.public_key)
        await allow.add(key, allow.name_of(node_id_of(key)), roles)
        return RedeemAnswer(
            node_id=node.identity.node_id,
            name=node.config.name,
            public_key=node.identity.openssh_public_key(node.config.name),
        )

    return routes


class _Allow:
    """trust.allow: written to config.toml as 'p2prc config set' does, then every policy
    of the running node takes it, so nothing needs a restart."""

    def __init__(self, node: TrustNode, verifier: RequestVerifier) -> None:
        self._node = node
        self._verifier = verifier
        self._home = Home(node.home_path)
        self._lock = asyncio.Lock()

    def name_of(self, node_id: str) -> str:
        table = self._table()
        member = None if table is None else table.get(node_id)
        return "" if member is None else member.record.name

    def entries(self, lines: list[str] | None = None) -> list[TrustEntry]:
        """``lines`` (by default the running policy's) with names: the table's, else the
        comment the line was written with."""
        result = []
        for line in self._verifier.policy.allowed if lines is None else lines:
            key, parts = parse_public_key(line), line.split()
            comment = parts[2] if len(parts) > 2 else ""
            result.append(self.entry(key, self.name_of(node_id_of(key)) or comment))
        return result

    def entry(self, key: bytes, name: str, *, added: bool = False) -> TrustEntry:
        """``key`` as the API shows it, with the roles the running policy gives it."""
        policy, node_id = self._verifier.policy, node_id_of(key)
        roles = list(policy.roles_of(node_id)) if policy.listed(node_id) else []
        return _entry(key, name, added=added, roles=roles)

    async def resolve(self, typed: str) -> tuple[bytes, str]:
        """The key and name ``typed`` names: a key, or a peer from the signed table."""
        text = typed.strip()
        if text.startswith("ssh-ed25519 "):
            try:
                key = parse_public_key(text)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            return key, self.name_of(node_id_of(key))
        table = self._table()
        members = table.alive() if table is not None else []
        me = self._node.identity.node_id
        try:
            target = resolve_peer(text, members, me)
        except PeerNotFound as exc:
            raise PeerNotFound(
                f"{exc}, or give its key: 'p2prc id' on that node prints it"
            ) from None
        if target.node_id is not None:
            member = table.get(target.node_id) if table is not None else None
            if member is not None:
                return member.record.public_key, member.record.name
        return await self._ask_status(target.url)

    async def add(self, key: bytes, name: str, roles: Sequence[str] | None = None) -> TrustEntry:
        """Trust ``key``; ``roles`` adds to what it may do (none: all, for a new key)."""
        if key == self._node.identity.public_key:
            raise InvalidRequest("this is this node's own key; it is always trusted")
        node_id = node_id_of(key)
        async with self._lock:
            current, given = await self._on_disk()
            known = any(parse_public_key(line) == key for line in current)
            if known and roles is None:
                return self.entry(key, name)
            had = given.get(node_id, list(ROLES) if known else [])
            wanted = [r for r in ROLES if roles is None or r in roles or r in had]
            kept = {k: v for k, v in given.items() if k != node_id}
            # All roles need no entry; roles go first, so a new key never briefly has more.
            if kept != given or len(wanted) < len(ROLES):
                await self._write_roles(
                    kept if len(wanted) == len(ROLES) else {**kept, node_id: wanted}
                )
            if not known:
                line = openssh_line(key, _COMMENT.sub("", name)[:64])
                await self._write([*current, line])
        return self.entry(key, name, added=not known)

    async def remove(self, typed: str) -> TrustEntry:
        async with self._lock:
            current, given = await self._on_disk()
            found = unique_prefix(
                typed,
                self.entries(current),
                ident=lambda entry: entry.node_id,
                name=lambda entry: entry.name or None,
                what="trusted key",
                missing=NotFound,
                see="p2prc trust list",
            )
            kept = [line for line in current if node_id_of(parse_public_key(line)) != found.node_id]
            await self._write(kept)
            if found.node_id in given:
                await self._write_roles({k: v for k, v in given.items() if k != found.node_id})
        return found

    async def _on_disk(self) -> tuple[list[str], dict[str, list[str]]]:
        # The file, not the running policy: an edit made by 'p2prc config set' is kept.
        config = await asyncio.to_thread(load, self._home)
        return list(config.trust.allow), dict(config.trust.roles)

    async def _write(self, allow: list[str]) -> None:
        # The same path as 'p2prc config set trust.allow': the whole file validates first.
        config = await asyncio.to_thread(set_value, self._home, "trust.allow", json.dumps(allow))
        for policy in self._policies():
            policy.reload(config.trust)

    async def _write_roles(self, roles: dict[str, list[str]]) -> None:
        # TOML's inline table (node ids are bare keys); the config validates each role.
        text = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in roles.items()) + "}"
        config = await asyncio.to_thread(set_value, self._home, "trust.roles", text)
        for policy in self._policies():
            policy.reload(config.trust)

    def _policies(self) -> list[TrustPolicy]:
        policies = [self._verifier.policy]
        try:
            own: object = getattr(self._node, "trust", None)
        except RuntimeError:  # the node has not started its checks (yet)
            own = None
        if isinstance(own, TrustPolicy) and own is not self._verifier.policy:
            policies.append(own)
        return policies

    def _table(self) -> PeerTable | None:
        try:
            return self._node.gossip.table
        except RuntimeError:  # gossip is off, or not running yet
            return None

    async def _ask_status(self, url: str) -> tuple[bytes, str]:
        """An address no record publishes: ask the node there who it is (shown to confirm)."""
        timeouts = self._node.config.timeouts
        timeout = httpx.Timeout(timeouts.request, connect=timeouts.connect)
        try:
            async with AsyncClient(url, identity=self._node.identity, timeout=timeout) as peer:
                status = await peer.status()
            key = parse_public_key(status.public_key)
        except ValueError as exc:
            raise PeerProtocolError(f"{url}: its key does not parse: {exc}") from None
        except P2PRCError as exc:
            raise type(exc)(f"{exc} (asked who is at {url})") from None
        if node_id_of(key) != status.node_id:
            raise PeerProtocolError(f"{url}: its key is not its node id's")
        return key, status.name


def _entry(key: bytes, name: str, *, added: bool = False, roles: list[str]) -> TrustEntry:
    return TrustEntry(
        public_key=openssh_line(key),
        node_id=node_id_of(key),
        name=name,
        fingerprint=fingerprint(key),
        added=added,
        roles=roles,
    )


def _addresses(node: TrustNode) -> tuple[str, ...]:
    """Where a joiner reaches this node: its record's API address(es), else its listen port."""
    try:
        me = node.gossip.me
    except RuntimeError:
        return (join_address("127.0.0.1", node.port),)
    direct = join_address(me.host, me.api_port) if me.host else ""
    found = [me.api_url] if me.public_api else []
    return (*found, direct) if direct else tuple(found)
