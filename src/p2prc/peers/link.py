"""The peer link: the one way this node calls another node.

A peer name, a unique node id prefix, ``host:port`` or a URL becomes the API URL to call
and the node id to sign for (the audience), both from the peer's signed record. A name
is never looked up in DNS: a name no record holds is ``PeerNotFound``. Only an address
no record publishes is called as typed, its audience learned from its ``/status``.
Every call gets the config's ``[timeouts] connect`` and ``request``, and its outcome (ok,
or the error's code) is kept per peer node id for ``p2prc status``, for members only.
With ``paths`` set (``node.paths``), each call touches the peer's direct path and goes
over it when one is up (``direct/paths.py``), else the usual way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import httpx

from .._client_async import AsyncClient, is_address, peer_url
from .._match import unique_peer
from ..config import Timeouts
from ..errors import P2PRCError, PeerTimeout
from ..identity import Identity
from .table import Member, PeerTable

__all__ = ["CallOutcome", "DirectPaths", "PeerLink", "PeerTarget", "resolve_peer"]


class DirectPaths(Protocol):
    """What the link asks of ``node.paths``."""

    def touch(self, node_id: str) -> None: ...
    def transport(self, node_id: str) -> httpx.AsyncBaseTransport | None: ...


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """Where to call a peer, and which node must answer (``None``: ask it)."""

    url: str
    node_id: str | None


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How the last call this node made to a peer ended: ``code`` is empty when it worked."""

    code: str
    at: float  # wall clock

    @property
    def ok(self) -> bool:
        return not self.code


def resolve_peer(typed: str, members: Iterable[Member], me: str = "") -> PeerTarget:
    """Resolve ``typed`` against ``members`` (alive, signed records), leaving out ``me``."""
    others = [m for m in members if m.record.node_id != me]
    text = typed.strip()
    if is_address(text) or ":" in text:  # no name or id has a colon: a (bad) address
        url = peer_url(text)
        for member in others:
            if member.record.api_url == url:
                return PeerTarget(url, member.record.node_id)
        return PeerTarget(url, None)
    member = unique_peer(
        text, others, ident=lambda m: m.record.node_id, name=lambda m: m.record.name
    )
    return PeerTarget(member.record.api_url, member.record.node_id)


class PeerLink:
    """Calls other nodes: resolves what was typed, signs for the right node, bounds the time.

    ``table`` reads the gossip table (``None`` when gossip is off; it may raise
    ``RuntimeError`` while gossip is not running): without one only addresses resolve.
    """

    def __init__(
        self,
        identity: Identity,
        table: Callable[[], PeerTable] | None,
        timeouts: Timeouts,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._identity = identity
        self._table = table
        self._timeouts = timeouts
        self._transport = transport
        # Node id -> the last call's outcome; only members of the table are kept.
        self._calls: dict[str, CallOutcome] = {}
        self.paths: DirectPaths | None = None

    def __repr__(self) -> str:
        return f"<PeerLink {self._identity.node_id} [{len(self._members())} peers]>"

    def resolve(self, typed: str) -> PeerTarget:
        """The peer ``typed`` names: a name, a unique node id prefix or an address."""
        return resolve_peer(typed, self._members(), self._me())

    def audience_at(self, address: str) -> str | None:
        """The node id whose signed record publishes ``address`` as its API, if one does."""
        url = peer_url(address)
        for member in self._members():
            if member.record.api_url == url:
                return member.record.node_id
        return None

    @contextlib.asynccontextmanager
    async def connect(
        self, target: PeerTarget | str, *, direct: bool = True
    ) -> AsyncIterator[AsyncClient]:
        """A client signed for ``target`` (a resolved peer, or an address as stored); over
        the peer's direct path when one is up, unless ``direct`` is false."""
        if isinstance(target, str):
            target = PeerTarget(peer_url(target), self.audience_at(target))
        timeouts = self._timeouts
        transport = self._transport
        if transport is None and self.paths is not None and target.node_id is not None:
            self.paths.touch(target.node_id)
            if direct:
                transport = self.paths.transport(target.node_id)
        client = AsyncClient(
            target.url,
            identity=self._identity,
            audience=target.node_id,
            transport=transport,
            timeout=httpx.Timeout(timeouts.request, connect=timeouts.connect),
        )
        try:
            async with client:
                yield client
        except P2PRCError as exc:
            self._record(target, client, exc.code)
            raise
        except TimeoutError:  # a caller's own deadline ran out during the call
            self._record(target, client, PeerTimeout.code)
            raise
        self._record(target, client, "")

    def last_call(self, node_id: str) -> CallOutcome | None:
        """How the last call to ``node_id`` through this link ended, if one was made."""
        return self._calls.get(node_id)

    def _record(self, target: PeerTarget, client: AsyncClient, code: str) -> None:
        # A root node called by address is known by the record it answered with, if any.
        node_id = target.node_id or client.audience or self.audience_at(target.url)
        table = self._read_table()
        if node_id is None or table is None or node_id not in table.members:
            return
        self._calls[node_id] = CallOutcome(code, time.time())
        if len(self._calls) > len(table.members):  # forget peers the table dropped
            self._calls = {k: v for k, v in self._calls.items() if k in table.members}

    def _members(self) -> list[Member]:
        table = self._read_table()
        return table.alive() if table is not None else []

    def _me(self) -> str:
        table = self._read_table()
        return table.me.node_id if table is not None else ""

    def _read_table(self) -> PeerTable | None:
        if self._table is None:
            return None
        try:
            return self._table()
        except RuntimeError:  # gossip is not running (yet, or any more)
            return None
