"""The peer link's lookup: what the user typed, resolved from this node's signed table.

A peer name, a unique node id prefix, ``host:port`` or a URL becomes the API URL to call
and the node id to sign for (the audience), both from the peer's signed record. A name
is never looked up in DNS: a name no record holds is ``PeerNotFound``. Only an address
no record publishes is called as typed, its audience learned from its ``/status``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InvalidRequest, PeerNotFound
from .table import Member

__all__ = ["PeerTarget", "resolve_peer"]


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """Where to call a peer, and which node must answer (``None``: ask it)."""

    url: str
    node_id: str | None


def resolve_peer(typed: str, members: Iterable[Member], me: str = "") -> PeerTarget:
    """Resolve ``typed`` against ``members`` (alive, signed records), leaving out ``me``."""
    from .._client_async import is_address, peer_url

    others = [m for m in members if m.record.node_id != me]
    text = typed.strip()
    if is_address(text) or ":" in text:  # no name or id has a colon: a (bad) address
        url = peer_url(text)
        for member in others:
            if member.record.api_url == url:
                return PeerTarget(url, member.record.node_id)
        return PeerTarget(url, None)
    if not text:
        raise PeerNotFound("no peer given")
    matches = [m for m in others if m.record.name == text]
    if not matches:
        prefix = text.lower()
        matches = [m for m in others if m.record.node_id.startswith(prefix)]
    if len(matches) > 1:
        raise InvalidRequest(f"{typed!r} matches {len(matches)} peers; give more of the node id")
    if not matches:
        raise PeerNotFound(f"no peer named {typed!r} or with that id; see 'p2prc peers list'")
    record = matches[0].record
    return PeerTarget(record.api_url, record.node_id)
