"""Verification of signed requests and the node's trust policy."""

from __future__ import annotations

import re
import time

from starlette.requests import Request

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
from ..trust import TrustPolicy

__all__ = ["RequestVerifier"]

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
# Live nonces kept for replay protection; past this the node refuses signed calls.
_NONCE_LIMIT = 100_000


class RequestVerifier:
    """Checks a request's signature, freshness and nonce, then the trust policy."""

    def __init__(self, identity: Identity, trust: TrustConfig, state: State) -> None:
        self._identity = identity
        self._trust = trust
        self._state = state
        self.policy = TrustPolicy(trust, identity.public_key)

    async def peer(self, request: Request) -> CallerInfo:
        """FastAPI dependency: any caller the trust policy accepts."""
        caller = await self._authenticate(request)
        if self.policy.allows_key(parse_public_key(request.headers[HEADER_KEY])):
            return caller
        raise NotTrusted(f"node {caller.node_id} is not in this node's trust.allow list")

    async def authenticated(self, request: Request) -> CallerInfo:
        """FastAPI dependency: any caller with a valid signature, trusted or not."""
        return await self._authenticate(request)

    async def owner(self, request: Request) -> CallerInfo:
        """FastAPI dependency: only the node's own key."""
        caller = await self._authenticate(request)
        if caller.role != "owner":
            raise OwnerOnly("only this node's own key may do this")
        return caller

    async def _authenticate(self, request: Request) -> CallerInfo:
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
        body = await request.body()
        message = signing_message(
            request.method, _target(request), headers[HEADER_AUDIENCE], timestamp, nonce, body
        )
        verify_signature(public_key, signature, message)
        try:
            fresh = self._state.remember_nonce(nonce, int(timestamp) + skew, _NONCE_LIMIT)
        except OverflowError as exc:
            raise RateLimited(str(exc)) from None
        if not fresh:
            raise RequestReplayed("this request was already received")
        role = "owner" if public_key == self._identity.public_key else "peer"
        return CallerInfo(
            node_id=node_id_of(public_key), role=role, public_key=b64encode(public_key)
        )


def _target(request: Request) -> str:
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string", b"")
    target = raw_path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target
