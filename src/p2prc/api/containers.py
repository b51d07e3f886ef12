"""Container routes: peers create and remove containers here; the owner tracks its own."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..containers import hostkeys
from ..containers.groups import GroupStore
from ..containers.service import ContainerService
from ..containers.store import ContainerStore
from ..errors import ContainerNotFound, P2PRCError
from ..identity import Identity
from ..models import (
    CallerInfo,
    ContainerView,
    CreateContainer,
    CreateEvent,
    ImageList,
    RemoteCreate,
    TrackedContainer,
)
from ..peers.gossip import Gossip
from ..peers.link import PeerTarget, resolve_peer
from ..state import State
from .auth import RequestVerifier

__all__ = ["router"]

log = logging.getLogger(__name__)

_NDJSON = "application/x-ndjson"


class ContainerNode(Protocol):
    """What these routes need from a node."""

    @property
    def identity(self) -> Identity: ...
    @property
    def containers(self) -> ContainerService: ...
    @property
    def container_store(self) -> ContainerStore: ...
    @property
    def state(self) -> State: ...
    @property
    def gossip(self) -> Gossip: ...
    @property
    def home_path(self) -> Path: ...
    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


Work = Callable[[Callable[[str], Awaitable[None]]], Awaitable[ContainerView]]


def _event_stream(node: ContainerNode, work: Work) -> StreamingResponse:
    """Run ``work`` as a node task and stream its progress as NDJSON lines.

    The work runs to the end even if the caller disconnects, so a container is never
    left half-created; it is then listed by ``GET /containers``.
    """
    queue: asyncio.Queue[CreateEvent | None] = asyncio.Queue()

    async def progress(message: str) -> None:
        await queue.put(CreateEvent(event="progress", message=message))

    async def run() -> None:
        try:
            view = await work(progress)
            await queue.put(CreateEvent(event="created", container=view))
        except P2PRCError as exc:
            await queue.put(CreateEvent(event="error", error=exc.to_body()["error"]))
        finally:
            await queue.put(None)

    node.spawn(run(), name="container-create")

    async def lines() -> AsyncIterator[bytes]:
        yield CreateEvent(event="progress", message="accepted").model_dump_json().encode() + b"\n"
        while (event := await queue.get()) is not None:
            yield event.model_dump_json(exclude_none=True).encode() + b"\n"

    return StreamingResponse(lines(), media_type=_NDJSON)


def router(node: ContainerNode, verifier: RequestVerifier) -> APIRouter:
    """Routes under /containers, /images and /tracked."""
    routes = APIRouter(tags=["containers"])
    Peer = Annotated[CallerInfo, Depends(verifier.peer)]
    Owner = Annotated[CallerInfo, Depends(verifier.owner)]

    @routes.get("/images")
    async def images() -> ImageList:
        """Images this node offers (the original /ShowImages)."""
        return await node.containers.images()

    @routes.post("/containers", response_model=CreateEvent)
    async def create(body: CreateContainer, request: Request, caller: Peer) -> StreamingResponse:
        """Create a container for the caller; answers NDJSON progress, then the container."""
        await node.containers.validate(body, caller)
        host = request.url.hostname or "127.0.0.1"
        return _event_stream(
            node, lambda progress: node.containers.create(body, caller, host, progress)
        )

    @routes.get("/containers")
    async def list_containers(caller: Peer) -> list[ContainerView]:
        """The caller's containers on this node (all of them for the owner)."""
        return node.containers.owned_by(caller)

    @routes.delete("/containers/{container_id}")
    async def remove(container_id: str, caller: Peer) -> dict[str, str]:
        """Remove one of the caller's containers (the owner may remove any)."""
        await node.containers.remove(container_id, caller)
        return {"removed": container_id}

    @routes.post("/tracked", response_model=CreateEvent)
    async def create_on_peer(body: RemoteCreate, caller: Owner) -> StreamingResponse:
        """Create a container on a peer for this node's owner, and track it."""
        from ..client import AsyncClient

        # A name or id prefix comes from the signed table, never from DNS; unknown is 404.
        target = _target(node, body.peer)
        address = target.url

        async def work(progress: Callable[[str], Awaitable[None]]) -> ContainerView:
            async with AsyncClient(
                address, identity=node.identity, audience=target.node_id
            ) as peer:
                # Keyed by the node we asked: its signed record's id, else its own word.
                asked = peer.audience or (await peer.status()).node_id
                view = await peer.create_container(body.spec, progress=progress)
            # A refused view is not removed on the peer: a signed DELETE for an id the
            # peer chose is just what a liar would want from us.
            _track(node, TrackedContainer(container=view, peer_address=address), asked)
            return view

        return _event_stream(node, work)

    @routes.get("/tracked")
    async def tracked(caller: Owner) -> list[TrackedContainer]:
        """Containers this node created on peers (the original --tc); expired leases drop out."""
        node.container_store.prune_tracked(time.time())
        return node.container_store.tracked()

    @routes.delete("/tracked/{container_id}")
    async def remove_on_peer(container_id: str, caller: Owner) -> dict[str, str]:
        """Remove a tracked container on its peer, then forget it."""
        from ..client import AsyncClient

        item = node.container_store.one_tracked(container_id)
        view = item.container
        address = item.peer_address
        audience = _audience(node, address)
        async with AsyncClient(address, identity=node.identity, audience=audience) as peer:
            try:
                await peer.remove_container(view.id)
            except ContainerNotFound:
                log.info("container %s was already gone on its peer", view.id)
        node.container_store.remove_tracked(view.peer, view.id)
        GroupStore(node.state.connection).forget_container(view.peer, view.id)
        hostkeys.unpin(node.home_path / "known_hosts", hostkeys.alias(view.id))
        return {"removed": view.id}

    return routes


def _target(node: ContainerNode, typed: str) -> PeerTarget:
    """The peer the owner named: a name, an id prefix or an address (see peers.link)."""
    try:
        gossip = node.gossip
    except RuntimeError:  # gossip is off: only addresses can be called
        return resolve_peer(typed, [])
    return resolve_peer(typed, gossip.table.alive(), gossip.me.node_id)


def _audience(node: ContainerNode, address: str) -> str | None:
    """The node id whose signed peer record publishes ``address``, if one does."""
    try:
        gossip = node.gossip
    except RuntimeError:  # gossip is off: no signed records to go by
        return None
    return gossip.member_at(address)


def _track(node: ContainerNode, tracked: TrackedContainer, asked: str) -> None:
    """Check and store a container the peer ``asked`` made for us; pin its SSH host key."""
    node.container_store.add_tracked(tracked, peer=asked)
    view = tracked.container
    if view.ssh.host_key:
        known_hosts = node.home_path / "known_hosts"
        hostkeys.pin(known_hosts, hostkeys.alias(view.id), view.ssh.host_key)
