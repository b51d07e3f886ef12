"""The node's overview: peers, containers, jobs, mappings and relay load, read in one go.

The dashboard (``/ui/api/overview``, with its session cookie) and ``p2prc status`` (the
owner's signed ``GET /overview``) both read :func:`overview`. Times are wall clock
(seconds since the epoch); the gossip's monotonic times are converted once, here.
"""

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..containers.service import ContainerService
from ..containers.tracked import TrackedContainers
from ..identity import Identity, b64encode
from ..jobs.models import JobView
from ..jobs.service import JobService
from ..models import CallerInfo, ContainerView, MappedPort, PeerView, TrackedContainer
from ..peers.gossip import Gossip
from ..peers.link import PeerLink
from ..peers.table import Member
from ..tunnel.mapper import PortMapper
from ..tunnel.relay import RelayServer
from .auth import Owner
from .peers import view_of

__all__ = [
    "LastCall",
    "Overview",
    "OverviewPeer",
    "RelayLoad",
    "RelayTunnel",
    "overview",
    "router",
]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class LastCall(_Answer):
    """How the last signed call this node made to a peer ended."""

    ok: bool
    error: str = Field(description="The error's code (not_trusted, peer_timeout, ...); empty: ok")
    at: float = Field(description="When it ended (seconds since the epoch)")


class OverviewPeer(PeerView):
    """A peer with what this node last heard from it and how its last call to it ended."""

    last_heard: float | None = Field(
        default=None,
        description="When this node last heard from it, directly or by a newer record of it "
        "(seconds since the epoch); null: not since this node started",
    )
    last_call: LastCall | None = Field(
        default=None, description="The last signed call this node made to it; null: none yet"
    )


class RelayTunnel(_Answer):
    """One node tunnelling through this relay."""

    node_id: str
    ports: int
    streams: int


class RelayLoad(_Answer):
    """What this node's relay carries now."""

    port: int
    tunnels: list[RelayTunnel]
    streams: int
    forwarded_bytes: int | None


class Overview(_Answer):
    """Everything the dashboard shows, read in one go."""

    me: PeerView | None
    peers: list[OverviewPeer]
    hosted: list[ContainerView]
    tracked: list[TrackedContainer]
    jobs: list[JobView]
    mappings: list[MappedPort]
    behind_nat: bool | None
    relay: RelayLoad | None
    at: float


def _part(node: object, name: str, kind: type[Any]) -> Any:
    """The node's running ``name`` when it has one of type ``kind``, else None."""
    try:
        part = getattr(node, name, None)
    except RuntimeError:  # a Node's parts raise while it is not running
        return None
    return part if isinstance(part, kind) else None


def _peers(
    gossip: Gossip | None, link: PeerLink | None, wall: float
) -> tuple[PeerView | None, list[OverviewPeer]]:
    if gossip is None:
        return None, []
    members = sorted(gossip.table.members.values(), key=lambda m: m.record.node_id)
    # The gossip dates what it hears by the event loop's clock (monotonic).
    try:
        clock = asyncio.get_running_loop().time()
    except RuntimeError:
        clock = time.monotonic()
    return view_of(gossip, gossip.me, None), [
        _peer(gossip, member, link, wall - clock) for member in members
    ]


def _peer(gossip: Gossip, member: Member, link: PeerLink | None, offset: float) -> OverviewPeer:
    """A member's view, with when it was last heard and how our last call to it ended."""
    fields = view_of(gossip, member.record, member).model_dump()
    call = link.last_call(member.record.node_id) if link is not None else None
    return OverviewPeer(
        **fields,
        last_heard=None if member.heard is None else member.heard + offset,
        last_call=None if call is None else LastCall(ok=call.ok, error=call.code, at=call.at),
    )


def _relay(relay: RelayServer | None) -> RelayLoad | None:
    if relay is None:
        return None
    rows = [
        RelayTunnel(node_id=load.node_id, ports=load.ports, streams=load.streams)
        for load in relay.load()
    ]
    forwarded = getattr(relay, "bytes_forwarded", None)
    return RelayLoad(
        port=relay.port,
        tunnels=rows,
        streams=sum(row.streams for row in rows),
        forwarded_bytes=forwarded if isinstance(forwarded, int) else None,
    )


def overview(node: object) -> Overview:
    """What the node runs now; parts the node does not run are empty."""
    at = time.time()
    me, peers = _peers(_part(node, "gossip", Gossip), _part(node, "link", PeerLink), at)
    hosted: list[ContainerView] = []
    containers: ContainerService | None = _part(node, "containers", ContainerService)
    identity: Identity | None = _part(node, "identity", Identity)
    if containers is not None and identity is not None:
        owner = CallerInfo(
            node_id=identity.node_id, role="owner", public_key=b64encode(identity.public_key)
        )
        hosted = containers.owned_by(owner)
    tracked: TrackedContainers | None = _part(node, "tracked", TrackedContainers)
    jobs: JobService | None = _part(node, "jobs", JobService)
    mapper: PortMapper | None = _part(node, "mapper", PortMapper)
    return Overview(
        me=me,
        peers=peers,
        hosted=hosted,
        tracked=tracked.list() if tracked is not None else [],
        jobs=jobs.list() if jobs is not None else [],
        mappings=mapper.mappings() if mapper is not None else [],
        behind_nat=mapper.behind_nat if mapper is not None else None,
        relay=_relay(_part(node, "relay", RelayServer)),
        at=at,
    )


def router(node: object) -> APIRouter:
    """``GET /overview``: the owner's one-call view of the node (``p2prc status``)."""
    routes = APIRouter(tags=["signed"])

    @routes.get("/overview")
    async def read_overview(caller: Owner) -> Overview:
        """Peers, hosted and tracked containers, jobs, mappings, NAT verdict and relay
        load, in one answer (owner only; a GET signed with the node's key)."""
        return overview(node)

    return routes
