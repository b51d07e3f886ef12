"""Trust in one command: invite tokens, the invites a node gave out, and the client side.

A token is ``p2prc1`` and the base64url of: a version byte, the inviter's node id (16
bytes: the pin), a 16-byte one-time secret, then the inviter's API addresses joined by
``,``. Only the secret is secret; the inviter keeps its SHA-256, never the secret.
``join`` redeems a token from the joiner's home: the call is signed with the joiner's key
for the pinned node id, and the inviter's answer must carry the key of that node id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from .._client_async import AsyncClient, peer_url
from ..config import Home, load, set_value, split_address
from ..errors import InvalidRequest, NotTrusted, P2PRCError, PeerProtocolError
from ..identity import b64decode, b64encode, node_id_of, parse_public_key
from ..models import SyncResult

__all__ = [
    "Invitation",
    "InviteCreate",
    "InviteStore",
    "InviteToken",
    "JoinResult",
    "RedeemAnswer",
    "RedeemRequest",
    "TrustAPI",
    "TrustEntry",
    "TrustRequest",
    "decode_token",
    "encode_token",
    "join",
]

TOKEN_PREFIX = "p2prc1"
_VERSION = 1
_SECRET_BYTES = 16
_ID_BYTES = 16
_MAX_ADDRESSES = 4
_MAX_TOKEN = 600
# Live invites a node keeps at most: an owner who makes more must wait for some to end.
MAX_LIVE_INVITES = 1000
MAX_TTL = 30 * 86400.0
MAX_USES = 1000
_REDEEM_TIMEOUT = 15.0


Role = Literal["containers", "relay", "map-port"]  # config.TRUST_ROLES


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class TrustRequest(_Body):
    """A peer to trust or look up: name, node id prefix, address, or a literal public key."""

    peer: str = Field(min_length=1, max_length=600)
    roles: list[Role] | None = Field(
        default=None,
        max_length=3,
        description="POST /trust: roles to add to the key's (trust.roles); none: all roles",
    )


class TrustEntry(_Answer):
    """One key this node trusts (or would), with what the table knows of it."""

    public_key: str = Field(description="OpenSSH line")
    node_id: str
    name: str = Field(default="", description="From the peer's signed record; empty: unknown")
    fingerprint: str = Field(description="SHA256:..., as ssh-keygen -l prints it")
    added: bool = Field(default=False, description="POST /trust: whether it was new")
    roles: list[str] = Field(
        default_factory=list, description="What the key may do here; empty: not trusted yet"
    )


class InviteCreate(_Body):
    """``POST /invites``: how long the token lives and how many nodes may use it."""

    ttl: float = Field(default=3600.0, gt=0, le=MAX_TTL, description="Seconds")
    uses: int = Field(default=1, ge=1, le=MAX_USES)
    roles: list[Role] | None = Field(
        default=None, max_length=3, description="Roles the redeemer gets (trust.roles); none: all"
    )


class Invitation(_Answer):
    """A new invite: the token to hand over (shown once), its expiry and uses."""

    token: str
    expires_at: float
    uses: int


class RedeemRequest(_Body):
    """``POST /invites/redeem``: the token's secret (base64url)."""

    secret: str = Field(min_length=1, max_length=64)


class RedeemAnswer(_Answer):
    """The inviter, after it trusted the caller's key."""

    node_id: str
    name: str
    public_key: str = Field(description="OpenSSH line; its hash must be node_id")


class JoinResult(_Answer):
    """What ``p2prc join`` did."""

    node_id: str
    name: str
    api: str
    fingerprint: str
    learned: int = Field(description="Records the first exchange with the inviter changed")


@dataclass(frozen=True, slots=True)
class InviteToken:
    """The parts of a token: where the inviter listens, who it is, the one-time secret."""

    addresses: tuple[str, ...]
    node_id: str
    secret: bytes


def encode_token(token: InviteToken) -> str:
    """The text form of ``token``."""
    addresses = ",".join(token.addresses).encode()
    raw = bytes([_VERSION]) + bytes.fromhex(token.node_id) + token.secret + addresses
    return TOKEN_PREFIX + b64encode(raw)


def decode_token(text: str) -> InviteToken:
    """Parse a token; ``InvalidRequest`` (one line) for anything malformed."""
    text = text.strip()
    bad = "not an invite token (it starts with 'p2prc1'; copy it whole from 'p2prc invite')"
    if not text.startswith(TOKEN_PREFIX) or len(text) > _MAX_TOKEN:
        raise InvalidRequest(bad)
    try:
        raw = b64decode(text[len(TOKEN_PREFIX) :])
    except ValueError:
        raise InvalidRequest(bad) from None
    head = 1 + _ID_BYTES + _SECRET_BYTES
    if len(raw) <= head or raw[0] != _VERSION:
        raise InvalidRequest(bad)
    try:
        addresses = tuple(raw[head:].decode("ascii").split(","))
        if len(addresses) > _MAX_ADDRESSES:
            raise ValueError("too many addresses")
        for address in addresses:
            peer_url(address)
    except (ValueError, P2PRCError):
        raise InvalidRequest(f"{bad}: its addresses do not parse") from None
    secret = raw[1 + _ID_BYTES : head]
    return InviteToken(addresses, raw[1 : 1 + _ID_BYTES].hex(), secret)


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


class InviteStore:
    """The invites this node gave out, in its SQLite state: only each secret's SHA-256."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<InviteStore [{self.live()} live]>"

    def live(self, now: float | None = None) -> int:
        """How many invites may still be redeemed."""
        now = time.time() if now is None else now
        query = "SELECT COUNT(*) FROM invites WHERE expires_at > ? AND uses_left > 0"
        return int(self._db.execute(query, (now,)).fetchone()[0])

    def create(
        self,
        ttl: float,
        uses: int,
        now: float | None = None,
        *,
        roles: Sequence[str] | None = None,
    ) -> tuple[bytes, float]:
        """A new secret and its expiry; ``InvalidRequest`` when too many are live."""
        now = time.time() if now is None else now
        secret = secrets.token_bytes(_SECRET_BYTES)
        given = None if roles is None else json.dumps(list(roles))
        with self._lock:
            self._db.execute("DELETE FROM invites WHERE expires_at <= ? OR uses_left <= 0", (now,))
            if self.live(now) >= MAX_LIVE_INVITES:
                raise InvalidRequest(f"{MAX_LIVE_INVITES} invites are live; wait for some to end")
            self._db.execute(
                "INSERT INTO invites (digest, created_at, expires_at, uses_left, roles)"
                " VALUES (?, ?, ?, ?, ?)",
                (_digest(secret), now, now + ttl, uses, given),
            )
        return secret, now + ttl

    def redeem(self, secret: bytes, node_id: str, now: float | None = None) -> list[str] | None:
        """Spend one use of the invite ``secret`` opens: its roles (``None``: all).

        ``NotTrusted`` when none is left.
        """
        now = time.time() if now is None else now
        digest = _digest(secret)
        with self._lock:
            row = self._db.execute(
                "SELECT digest, expires_at, uses_left, roles FROM invites WHERE digest = ?",
                (digest,),
            ).fetchone()
            # The lookup is by a hash of a 128-bit secret; the comparison is constant time.
            if row is None or not hmac.compare_digest(str(row[0]), digest):
                raise NotTrusted("this invite token is not one this node gave out")
            if row[1] <= now:
                raise NotTrusted("this invite token has expired; ask for a new one")
            if row[2] <= 0:
                raise NotTrusted("this invite token was already used; ask for a new one")
            self._db.execute(
                "UPDATE invites SET uses_left = uses_left - 1, redeemed_by = ? WHERE digest = ?",
                (node_id, digest),
            )
        roles: list[str] | None = None if row[3] is None else json.loads(row[3])
        return roles


class TrustAPI:
    """The trust and invite routes of the node ``client`` talks to (owner-signed)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def lookup(self, peer: str) -> TrustEntry:
        """``POST /trust/lookup``: who ``peer`` is, without trusting it."""
        body = TrustRequest(peer=peer).model_dump()
        return await self._client._call("POST", "/trust/lookup", TrustEntry, body)

    async def add(self, peer: str, roles: Sequence[str] | None = None) -> TrustEntry:
        """``POST /trust``: trust ``peer`` now and in ``config.toml`` (``roles``: not all)."""
        try:
            request = TrustRequest.model_validate({"peer": peer, "roles": roles})
        except ValueError as exc:
            raise InvalidRequest(f"--role: {exc}") from None
        body = request.model_dump(exclude_none=True)
        return await self._client._call("POST", "/trust", TrustEntry, body)

    async def list(self) -> list[TrustEntry]:
        """``GET /trust``: the keys in ``trust.allow``."""
        response = await self._client._request("GET", "/trust", signed=True)
        return _entries(response.json(), self._client.base_url)

    async def remove(self, peer: str) -> TrustEntry:
        """``DELETE /trust/PEER`` (a node id prefix, a name or the key); the entry removed."""
        if peer.strip().startswith("ssh-ed25519 "):
            try:
                peer = node_id_of(parse_public_key(peer))
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        path = f"/trust/{quote(peer, safe='')}"
        return await self._client._call("DELETE", path, TrustEntry)

    async def invite(
        self, ttl: float = 3600.0, uses: int = 1, roles: Sequence[str] | None = None
    ) -> Invitation:
        """``POST /invites``: a token for a new node (``roles``: what it may do; all)."""
        try:
            request = InviteCreate.model_validate({"ttl": ttl, "uses": uses, "roles": roles})
        except ValueError as exc:
            raise InvalidRequest(f"--role: {exc}") from None
        body = request.model_dump(exclude_none=True)
        return await self._client._call("POST", "/invites", Invitation, body)

    async def redeem(self, secret: bytes) -> RedeemAnswer:
        """``POST /invites/redeem`` on the inviter: present an invite's secret."""
        body = RedeemRequest(secret=b64encode(secret)).model_dump()
        return await self._client._call("POST", "/invites/redeem", RedeemAnswer, body)


def _entries(data: Any, where: str) -> list[TrustEntry]:
    try:
        return [TrustEntry.model_validate(item) for item in data]
    except (ValueError, TypeError) as exc:
        raise PeerProtocolError(f"{where}/trust: {exc}") from None


async def join(token: str, local: AsyncClient) -> JoinResult:
    """Redeem ``token`` at the inviter, then trust it and exchange tables with it locally.

    ``local`` talks to the joiner's running node; the redeem call is signed with the same
    home's key, for the node id the token pins.
    """
    parsed = decode_token(token)
    await local.status()  # the local node must run: it keeps the inviter afterwards
    failures: list[str] = []
    for address in parsed.addresses:
        try:
            async with AsyncClient(
                address, home=local._home, audience=parsed.node_id, timeout=_REDEEM_TIMEOUT
            ) as inviter:
                answer = await TrustAPI(inviter).redeem(parsed.secret)
        except (NotTrusted, InvalidRequest):
            raise
        except P2PRCError as exc:
            failures.append(f"{address}: {exc}")
            continue
        _check_pin(answer, parsed.node_id, address)
        trusted = await TrustAPI(local).add(answer.public_key)
        synced: SyncResult = await local.add_peer(address)
        await asyncio.to_thread(_keep_bootstrap, local._home, address)
        return JoinResult(
            node_id=answer.node_id,
            name=answer.name,
            api=peer_url(address),
            fingerprint=trusted.fingerprint,
            learned=synced.changed,
        )
    raise PeerProtocolError("no inviter address answered: " + "; ".join(failures))


def _keep_bootstrap(home: Home, address: str) -> None:
    """Add the inviter to ``bootstrap`` in config.toml, so a restart finds it again."""
    try:
        split_address(address)
    except ValueError:
        return  # a URL (an API on a relay) is no bootstrap address; the table keeps it
    known = load(home).bootstrap
    if address not in known:
        set_value(home, "bootstrap", json.dumps([*known, address]))


def _check_pin(answer: RedeemAnswer, pin: str, address: str) -> None:
    try:
        key = parse_public_key(answer.public_key)
    except ValueError as exc:
        raise PeerProtocolError(f"{address}: the inviter's key does not parse: {exc}") from None
    if node_id_of(key) != pin or answer.node_id != pin:
        raise PeerProtocolError(f"{address} answered with another node's key than the token's")
