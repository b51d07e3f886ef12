"""Verification of signed requests and the node's trust policy."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from .._rate import SlidingWindow
from ..config import TrustConfig
from ..errors import (
    AuthError,
    NotTrusted,
    OwnerOnly,
    RateLimited,
    RequestReplayed,
    SignatureExpired,
    SignatureInvalid,
    WrongAudience,
)
from ..identity import (
    HEADER_AUDIENCE,
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Identity,
    b64decode,
    b64encode,
    node_id_of,
    parse_public_key,
    signing_message,
    verify_signature,
)
from ..models import CallerInfo
from ..state import State
from ..trust import TrustPolicy, missing_role_message, not_trusted_message

__all__ = [
    "ContainerUser",
    "KeyRate",
    "Owner",
    "Peer",
    "PortMapUser",
    "RequestVerifier",
    "Signed",
    "not_trusted_message",
]

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
# Live nonces (each lives up to twice trust.clock_skew) kept for replay protection, as
# (per key, whole pool). The owner has a pool of its own, so no other key can use up its
# room; keys in trust.allow share a second; every other key (any key costs nothing to
# make) shares the third, and each of those keys has a small budget of its own.
_OWNER_NONCES = 100_000
_LISTED_NONCES = (5_000, 200_000)
_STRANGER_NONCES = (1_000, 20_000)


@dataclass(frozen=True, slots=True)
class _Signed:
    """A request whose signature verified; its nonce is not recorded yet."""

    caller: CallerInfo
    public_key: bytes
    nonce: str
    expires: float


class RequestVerifier:
    """Checks a request's signature and freshness, then the trust policy, then its nonce.

    The nonce is recorded last, so a key the policy refuses never takes room in the
    replay table.
    """

    def __init__(self, identity: Identity, trust: TrustConfig, state: State) -> None:
        self._identity = identity
        self._trust = trust
        self._state = state
        self.policy = TrustPolicy(trust, identity.public_key)
        self.name = ""  # this node's name, for the errors it answers (set by the app)

    async def peer(self, request: Request) -> CallerInfo:
        """FastAPI dependency: any caller the trust policy accepts."""
        signed = await self._verify(request)
        if not self.policy.allows_key(signed.public_key):
            me = self._identity.node_id
            refused_by = f"{self.name} ({me})" if self.name else me
            raise NotTrusted(not_trusted_message(refused_by, signed.caller.node_id))
        return self._remember(signed)

    async def peer_for(self, request: Request, role: str) -> CallerInfo:
        """FastAPI dependency: a caller the trust policy accepts for ``role``."""
        signed = await self._verify(request)
        node_id = signed.caller.node_id
        if not self.policy.allows(node_id, role):
            me = self._identity.node_id
            refused_by = f"{self.name} ({me})" if self.name else me
            if self.policy.allows_key(signed.public_key):
                raise NotTrusted(missing_role_message(refused_by, node_id, role))
            raise NotTrusted(not_trusted_message(refused_by, node_id))
        return self._remember(signed)

    async def authenticated(self, request: Request) -> CallerInfo:
        """FastAPI dependency: any caller with a valid signature, trusted or not."""
        return self._remember(await self._verify(request))

    async def owner(self, request: Request) -> CallerInfo:
        """FastAPI dependency: only the node's own key."""
        signed = await self._verify(request)
        if signed.caller.role != "owner":
            raise OwnerOnly("only this node's own key may do this")
        return self._remember(signed)

    def _remember(self, signed: _Signed) -> CallerInfo:
        """Record the nonce in the caller's budget; refuses a replay or a spent budget."""
        node_id = signed.caller.node_id
        if signed.caller.role == "owner":
            pool, (key_limit, limit) = "owner", (None, _OWNER_NONCES)
        elif self.policy.listed(node_id):
            pool, (key_limit, limit) = "listed", _LISTED_NONCES
        else:
            pool, (key_limit, limit) = "other", _STRANGER_NONCES
        try:
            fresh = self._state.remember_nonce(
                signed.nonce, signed.expires, limit, key=node_id, pool=pool, key_limit=key_limit
            )
        except OverflowError as exc:
            raise RateLimited(f"{exc}; try again later") from None
        if not fresh:
            raise RequestReplayed("this request was already received")
        return signed.caller

    async def _verify(self, request: Request) -> _Signed:
        headers = request.headers
        names = (HEADER_KEY, HEADER_AUDIENCE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
        missing = [name for name in names if name not in headers]
        if missing:
            raise AuthError(f"request is not signed (missing {', '.join(missing)})")
        try:
            public_key = parse_public_key(headers[HEADER_KEY])
            signature = b64decode(headers[HEADER_SIGNATURE])
        except ValueError as exc:
            raise SignatureInvalid(f"malformed signature headers: {exc}") from None
        timestamp, nonce = headers[HEADER_TIMESTAMP], headers[HEADER_NONCE]
        if not _TIMESTAMP.match(timestamp) or not _NONCE.match(nonce):
            raise SignatureInvalid("malformed timestamp or nonce")
        skew = self._trust.clock_skew
        if abs(time.time() - int(timestamp)) > skew:
            raise SignatureExpired(f"timestamp is more than {skew:g} s from this node's clock")
        if headers[HEADER_AUDIENCE] != self._identity.node_id:
            raise WrongAudience("request was signed for another node")
        # The body limit middleware has already bounded what this reads.
        body = await request.body()
        message = signing_message(
            request.method, _target(request), headers[HEADER_AUDIENCE], timestamp, nonce, body
        )
        verify_signature(public_key, signature, message)
        role = "owner" if self.policy.is_owner(public_key) else "peer"
        caller = CallerInfo(
            node_id=node_id_of(public_key), role=role, public_key=b64encode(public_key)
        )
        return _Signed(caller, public_key, nonce, int(timestamp) + skew)


class KeyRate(SlidingWindow):
    """At most ``limit`` events per key in any ``window`` seconds (in memory, bounded)."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 4096) -> None:
        super().__init__(limit, window, max_keys=max_keys)

    def hit(self, key: str, now: float | None = None) -> None:
        """Count one event for ``key``; ``RateLimited`` when it is over its limit."""
        now = time.monotonic() if now is None else now
        if not self.has_room(key, now):
            raise RateLimited("too many callers right now; try again later")
        if not self.take(key, now):
            raise RateLimited(f"at most {self.limit} of these per {self.window:g} s; try later")


def _verifier(request: Request) -> RequestVerifier:
    verifier: RequestVerifier = request.app.state.verifier  # set by create_app
    return verifier


async def _signed(request: Request) -> CallerInfo:
    return await _verifier(request).authenticated(request)


async def _peer(request: Request) -> CallerInfo:
    return await _verifier(request).peer(request)


async def _owner(request: Request) -> CallerInfo:
    return await _verifier(request).owner(request)


def _peer_for(role: str) -> Callable[[Request], Awaitable[CallerInfo]]:
    async def dependency(request: Request) -> CallerInfo:
        return await _verifier(request).peer_for(request, role)

    return dependency


# The callers a route may ask for, checked by the app's RequestVerifier (app.state.verifier).
Signed = Annotated[CallerInfo, Depends(_signed)]
Peer = Annotated[CallerInfo, Depends(_peer)]
Owner = Annotated[CallerInfo, Depends(_owner)]
# A caller the trust policy accepts for one role (trust.roles), by route.
ContainerUser = Annotated[CallerInfo, Depends(_peer_for("containers"))]
PortMapUser = Annotated[CallerInfo, Depends(_peer_for("map-port"))]


def _target(request: Request) -> str:
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string", b"")
    target = raw_path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target
