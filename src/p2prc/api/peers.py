"""Peer routes: the table (open), push-pull (signed), and the owner's membership changes."""

import os
from dataclasses import fields
from typing import Annotated, Protocol

from fastapi import APIRouter, Query, Request, Response

from ..errors import InvalidRequest, NotFound, P2PRCError, PeerProtocolError
from ..models import MetadataUpdate, PeerAddress, PeerView, SyncResult
from ..peers.gossip import MAX_EXCHANGE_BYTES, RESERVED_PREFIX, Gossip, member_state
from ..peers.records import PeerRecord
from ..peers.table import Member
from .auth import Owner, Peer, Signed

__all__ = ["router", "view_of"]

_MSGPACK = "application/msgpack"
MAX_SPEEDTEST_BYTES = 64 * 1024 * 1024
PEERS_PAGE = 256
MAX_PEERS_PAGE = 1024


class PeerNode(Protocol):
    @property
    def gossip(self) -> Gossip: ...


# The fields a view shares with its record, copied as they are (these two are converted).
_SHARED = sorted(set(PeerView.model_fields) & {f.name for f in fields(PeerRecord)})
_COPIED = [name for name in _SHARED if name not in ("addresses", "custom")]


def view_of(gossip: Gossip, record: PeerRecord, member: Member | None) -> PeerView:
    """The API shape of a record and its membership state."""
    return PeerView(
        **{name: getattr(record, name) for name in _COPIED},
        me=member is None,
        state="alive" if member is None else member_state(member),
        rtt_ms=None if member is None or member.rtt_ms is None else round(member.rtt_ms, 3),
        addresses=list(record.addresses),
        api=record.api_url,
        custom={k: v for k, v in record.custom.items() if not k.startswith(RESERVED_PREFIX)},
        reserved={k: v for k, v in record.custom.items() if k.startswith(RESERVED_PREFIX)},
    )


def router(node: PeerNode) -> APIRouter:
    """Routes under /peers and /meta."""
    routes = APIRouter(tags=["peers"])

    @routes.get("/peers")
    async def peers(
        limit: Annotated[int, Query(ge=1, le=MAX_PEERS_PAGE)] = PEERS_PAGE,
        after: Annotated[str, Query(max_length=64)] = "",
    ) -> list[PeerView]:
        """The nodes this node knows, a page at a time (the original --ls): itself first,
        then members by node id; ``after`` is the last node id of the previous page."""
        gossip = node.gossip
        views = [] if after else [view_of(gossip, gossip.me, None)]
        start = "" if after == gossip.me.node_id else after
        members = sorted(
            (m for node_id, m in gossip.table.members.items() if node_id > start),
            key=lambda m: m.record.node_id,
        )
        room = limit - len(views)
        return views + [view_of(gossip, m.record, m) for m in members[:room]]

    @routes.get("/peers/stats")
    async def stats() -> dict[str, object]:
        """Gossip counters: rejected updates and dropped datagrams by reason, traffic sent."""
        gossip = node.gossip
        swim = gossip.swim
        return {
            "members": len(gossip.table),
            "rejected": dict(gossip.table.rejected),
            "dropped_datagrams": dict(swim.stats.dropped) if swim else {},
            "datagrams_sent": swim.stats.sent if swim else 0,
            "bytes_sent": swim.stats.bytes_sent if swim else 0,
            "unsent_datagrams": dict(swim.stats.unsent) if swim else {},
            "max_members": gossip.table.max_members,
            "local_health": swim.awareness if swim else 0,
        }

    @routes.post("/peers/exchange", response_class=Response)
    async def exchange(request: Request, caller: Signed) -> Response:
        """Push-pull anti-entropy (msgpack): merge what the caller pushed, answer one
        bounded page of what its digest lacks and the ids we want from it."""
        body = await request.body()
        if len(body) > MAX_EXCHANGE_BYTES:
            raise InvalidRequest("exchange payload too large")
        try:
            answer = node.gossip.exchange(body, caller.node_id)
        except PeerProtocolError as exc:
            raise InvalidRequest(f"bad exchange payload: {exc}") from None
        return Response(answer, media_type=_MSGPACK)

    @routes.post("/peers")
    async def add(body: PeerAddress, caller: Owner) -> SyncResult:
        """Exchange tables with a node now (bootstrap; the original --as / --arn)."""
        return await _sync(node.gossip, [body.address], trusted=True)

    @routes.post("/peers/sync")
    async def sync(caller: Owner) -> SyncResult:
        """Exchange tables with a few known nodes now (the original --us)."""
        gossip = node.gossip
        targets = [gossip.api_url(m) for m in gossip.reachable()[:3]]
        return await _sync(gossip, targets or list(gossip.bootstrap_addresses()))

    @routes.delete("/peers/{node_id}")
    async def remove(node_id: str, caller: Owner) -> dict[str, str]:
        """Forget a node (it comes back if it is alive and gossips again)."""
        if not node.gossip.forget(node_id):
            raise NotFound(f"no peer {node_id}")
        return {"removed": node_id}

    @routes.post("/meta")
    async def meta(body: MetadataUpdate, caller: Owner) -> PeerView:
        """Set this node's metadata; it reaches every node by gossip (the original --amd)."""
        record = node.gossip.set_metadata(body.text, body.custom)
        return view_of(node.gossip, record, None)

    @routes.get("/peers/speedtest", response_class=Response)
    async def speedtest(
        caller: Peer, size: Annotated[int, Query(ge=1, le=MAX_SPEEDTEST_BYTES)] = 8 * 1024 * 1024
    ) -> Response:
        """``size`` random bytes, for a bounded bandwidth test between two nodes."""
        return Response(os.urandom(size), media_type="application/octet-stream")

    return routes


async def _sync(gossip: Gossip, addresses: list[str], *, trusted: bool = False) -> SyncResult:
    changed, contacted, failed = 0, [], []
    for address in addresses:
        try:
            changed += await gossip.push_pull(address, trusted=trusted)
            contacted.append(address)
        except P2PRCError as exc:
            failed.append(f"{address}: {exc}")
    return SyncResult(contacted=contacted, changed=changed, failed=failed)
