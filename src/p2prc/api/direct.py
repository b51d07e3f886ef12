"""Direct paths, the owner's: ``GET /paths`` (how this node reaches each peer: direct,
relay via X, public) and ``POST /paths/forward`` (a local port of this node that reaches a
port of a peer by the best path, for as long as the caller reads the answer)."""

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable
from typing import Literal, Protocol

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..config import join_address, split_address
from ..containers.tracked import TrackedContainers
from ..direct.forward import PeerForward
from ..direct.models import ForwardEvent, ForwardRequest, PathInfo
from ..direct.paths import Paths
from ..errors import InvalidRequest, PeerNotFound
from ..models import TrackedContainer
from ..peers.gossip import Gossip
from ..peers.link import PeerLink
from ..peers.records import PeerRecord
from ._stream import ndjson
from .auth import Owner

__all__ = ["DirectNode", "fallback_address", "router"]

# Seconds between the forward answer's beats (a caller gone is noticed at the next one).
_BEAT = 10.0


class DirectNode(Protocol):
    @property
    def paths(self) -> Paths: ...
    @property
    def link(self) -> PeerLink: ...
    @property
    def tracked(self) -> TrackedContainers: ...
    @property
    def gossip(self) -> Gossip: ...


def fallback_address(
    tracked: Iterable[TrackedContainer], record: PeerRecord | None, node_id: str, port: int
) -> tuple[str, int] | None:
    """Where ``port`` of ``node_id`` is without a direct path: a tracked container's SSH
    (its view's address: the relay's for a NAT'd peer) or extra port on the relay, else the
    peer's own address when it is public (``record``); ``None``: no way known."""
    for item in tracked:
        if item.container.peer != node_id:
            continue
        ssh = item.container.ssh
        if ssh.port == port:  # a container's SSH, as its view says (``direct.ssh``)
            return (ssh.host, ssh.port)
        for mapping in item.container.ports:
            if mapping.host_port == port and mapping.public:
                return split_address(mapping.public)
    if record is not None and record.behind_nat is not True and record.host:
        return (record.host, port)
    return None


def router(node: DirectNode) -> APIRouter:
    """Routes under /paths."""
    routes = APIRouter(tags=["direct"])

    @routes.get("/paths")
    async def paths(caller: Owner) -> list[PathInfo]:
        """Each alive peer's path: the kind in use, its round trip, direct attempts and the
        last error; the owner's only (it tells who this node talks to)."""
        return node.paths.paths()

    @routes.post("/paths/forward")
    async def forward(body: ForwardRequest, caller: Owner) -> StreamingResponse:
        """Listen on ``bind:local`` here; each connection reaches ``port`` of ``peer`` over
        the direct path when one is up, else the usual way. NDJSON: ``listening`` at once,
        then a ``beat`` every 10 s; the port closes when the caller stops reading."""
        try:
            ipaddress.ip_address(body.bind)
        except ValueError:
            raise InvalidRequest(f"bind {body.bind!r} is not an IP address") from None
        target = node.link.resolve(body.peer)
        if target.node_id is None:
            raise PeerNotFound(f"no peer publishes {body.peer}")
        node_id, port = target.node_id, body.port
        node.paths.touch(node_id)

        def fallback() -> tuple[str, int] | None:
            member = node.gossip.table.get(node_id)
            record = member.record if member is not None else None
            return fallback_address(node.tracked.list(), record, node_id, port)

        forwarding = PeerForward(
            node.paths, node_id, port, fallback, bind=body.bind, local=body.local
        )
        await forwarding.start()

        def event(kind: Literal["listening", "beat"]) -> ForwardEvent:
            path = node.paths.path(node_id)
            return ForwardEvent(
                event=kind,
                local=join_address(body.bind, forwarding.local_port),
                peer=node_id,
                port=port,
                path=path.kind,
                via=path.via,
                connections=forwarding.connections,
            )

        async def events() -> AsyncIterator[ForwardEvent]:
            try:
                yield event("listening")
                while True:
                    await asyncio.sleep(_BEAT)
                    node.paths.touch(node_id)  # a path that died is tried again
                    yield event("beat")
            finally:
                await forwarding.aclose()

        return ndjson(events())

    return routes
