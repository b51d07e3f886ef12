"""The node's overview: peers, containers, jobs, mappings and relay load, read in one go.

The dashboard (``/ui/api/overview``, with its session cookie) and ``p2prc status`` (the
owner's signed ``GET /overview``) both read :func:`overview`.
"""

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from ..containers.service import ContainerService
from ..containers.tracked import TrackedContainers
from ..identity import Identity, b64encode
from ..jobs.models import JobView
from ..jobs.service import JobService
from ..models import CallerInfo, ContainerView, MappedPort, PeerView, TrackedContainer
from ..peers.gossip import Gossip
from ..tunnel.mapper import PortMapper
from ..tunnel.relay import RelayServer
from .auth import Owner
from .peers import view_of

__all__ = ["Overview", "RelayLoad", "RelayTunnel", "overview", "router"]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


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
    peers: list[PeerView]
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


def _peers(gossip: Gossip | None) -> tuple[PeerView | None, list[PeerView]]:
    if gossip is None:
        return None, []
    members = sorted(gossip.table.members.values(), key=lambda m: m.record.node_id)
    return view_of(gossip, gossip.me, None), [view_of(gossip, m.record, m) for m in members]


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
    me, peers = _peers(_part(node, "gossip", Gossip))
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
        at=time.time(),
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
