"""Container routes: peers create and remove containers here; the owner tracks its own."""

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .._aio import Report
from ..cluster.image import dask_image_tag
from ..cluster.remote_image import DaskImageEvent, DaskImageRequest
from ..containers.service import ContainerService, Progress
from ..containers.tracked import TrackedContainers
from ..errors import ImageNotFound, P2PRCError
from ..models import (
    ContainerView,
    CreateContainer,
    CreateEvent,
    ImageList,
    RemoteCreate,
    TrackedContainer,
)
from ._stream import ndjson, task_stream
from .auth import ContainerUser, Owner

__all__ = ["ContainerNode", "router"]

_ACCEPTED = CreateEvent(event="progress", message="accepted")


class ContainerNode(Protocol):
    """What these routes need from a node."""

    @property
    def containers(self) -> ContainerService: ...
    @property
    def tracked(self) -> TrackedContainers: ...
    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def router(node: ContainerNode) -> APIRouter:
    """Routes under /containers, /images (and /images/dask) and /tracked."""
    routes = APIRouter(tags=["containers"])

    @routes.get("/images")
    async def images() -> ImageList:
        """Images this node offers (the original /ShowImages)."""
        return await node.containers.images()

    @routes.post("/images/dask", response_model=DaskImageEvent)
    async def dask_image(body: DaskImageRequest, caller: ContainerUser) -> StreamingResponse:
        """Have the Dask image of these versions here, for the caller's cluster workers;
        answers NDJSON progress, then its tag (at once when it is here)."""
        if not node.containers.offers(dask_image_tag(body.versions)):
            raise ImageNotFound("this node offers no Dask images (containers.dask is off)")
        dask = node.containers.dask_images
        prepared = await dask.prepare(body.versions)
        if prepared.ready:
            return ndjson(_nothing(), first=DaskImageEvent(event="ready", tag=prepared.tag))

        async def work(report: Report[DaskImageEvent]) -> None:
            def progress(message: str) -> None:
                report(DaskImageEvent(event="progress", message=message))

            try:
                report(DaskImageEvent(event="ready", tag=await dask.ensure(prepared, progress)))
            except P2PRCError as exc:
                report(DaskImageEvent(event="error", error=exc.to_body()["error"]))

        first = DaskImageEvent(event="progress", message=f"building {prepared.tag}")
        return task_stream(node.spawn, work, name="dask-image", first=first)

    @routes.post("/containers", response_model=CreateEvent)
    async def create(
        body: CreateContainer, request: Request, caller: ContainerUser
    ) -> StreamingResponse:
        """Create a container for the caller; answers NDJSON progress, then the container."""
        plan = await node.containers.validate(body, caller)
        host = request.url.hostname or "127.0.0.1"

        async def work(report: Report[CreateEvent]) -> None:
            await _created(report, node.containers.create(plan, caller, host, _progress(report)))

        return task_stream(node.spawn, work, name="container-create", first=_ACCEPTED)

    @routes.get("/containers")
    async def list_containers(caller: ContainerUser) -> list[ContainerView]:
        """The caller's containers on this node (all of them for the owner)."""
        return node.containers.owned_by(caller)

    @routes.delete("/containers/{container_id}")
    async def remove(container_id: str, caller: ContainerUser) -> dict[str, str]:
        """Remove one of the caller's containers (the owner may remove any)."""
        await node.containers.remove(container_id, caller)
        return {"removed": container_id}

    @routes.post("/tracked", response_model=CreateEvent)
    async def create_on_peer(body: RemoteCreate, caller: Owner) -> StreamingResponse:
        """Create a container on a peer for this node's owner, and track it."""
        # Resolved before the answer starts: an unknown peer is a plain 404.
        target = node.tracked.resolve(body.peer)

        async def work(report: Report[CreateEvent]) -> None:
            creating = node.tracked.create_on_peer(target, body.spec, _progress(report))
            await _created(report, creating)

        return task_stream(node.spawn, work, name="container-create", first=_ACCEPTED)

    @routes.get("/tracked")
    async def tracked(caller: Owner) -> list[TrackedContainer]:
        """Containers this node created on peers (the original --tc); expired leases drop out."""
        return node.tracked.list()

    @routes.delete("/tracked/{container_id}")
    async def remove_on_peer(container_id: str, caller: Owner) -> dict[str, str]:
        """Remove a tracked container on its peer, then forget it."""
        return {"removed": await node.tracked.remove(container_id)}

    return routes


async def _nothing() -> AsyncIterator[DaskImageEvent]:
    return
    yield


def _progress(report: Report[CreateEvent]) -> Progress:
    """Progress messages of a create, reported as 'progress' events."""

    async def progress(message: str) -> None:
        report(CreateEvent(event="progress", message=message))

    return progress


async def _created(report: Report[CreateEvent], create: Coroutine[Any, Any, ContainerView]) -> None:
    """Report the container ``create`` made, or the error it met, as the last event."""
    try:
        report(CreateEvent(event="created", container=await create))
    except P2PRCError as exc:
        report(CreateEvent(event="error", error=exc.to_body()["error"]))
