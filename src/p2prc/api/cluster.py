"""Owner-only routes for Dask clusters: create (NDJSON progress), list, show, scale, remove."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from .._aio import Report
from ..cluster.models import ClusterCreate, ClusterEvent, ClusterScale, ClusterView, WorkerView
from ..errors import NodeError, P2PRCError
from ._stream import task_stream
from .auth import Owner

__all__ = ["ClusterNode", "Clusters", "router"]

Progress = Callable[[str], Awaitable[None]]

_ACCEPTED = ClusterEvent(event="progress", message="accepted")


class Clusters(Protocol):
    """What these routes call on the node's ``clusters`` (``cluster.service.ClusterService``)."""

    async def create(
        self, spec: ClusterCreate, progress: Progress | None = None
    ) -> ClusterView: ...
    def list(self) -> builtins.list[ClusterView]: ...
    def get(self, cluster: str) -> ClusterView: ...
    async def scale(
        self, cluster: str, workers: int, progress: Progress | None = None
    ) -> ClusterView: ...
    async def add_worker(self, cluster: str, progress: Progress | None = None) -> WorkerView: ...
    async def remove_worker(self, cluster: str, worker: str) -> ClusterView: ...
    async def remove(self, cluster: str) -> ClusterView: ...


class ClusterNode(Protocol):
    """What these routes need from a node (its ``clusters`` is read per call)."""

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def router(node: ClusterNode) -> APIRouter:
    """Routes under /clusters (all for the node's owner)."""
    routes = APIRouter(tags=["clusters"])

    def clusters() -> Clusters:
        try:
            service = getattr(node, "clusters", None)
        except RuntimeError:
            service = None
        if service is None:
            raise NodeError("this node runs no cluster service")
        return cast(Clusters, service)

    @routes.post("/clusters", response_model=ClusterEvent)
    async def create(body: ClusterCreate, caller: Owner) -> StreamingResponse:
        """Start a Dask cluster; answers NDJSON progress lines, then the cluster (or the error)."""
        service = clusters()

        async def work(report: Report[ClusterEvent]) -> None:
            async def progress(message: str) -> None:
                report(ClusterEvent(event="progress", message=message))

            try:
                view = await service.create(body, progress)
            except P2PRCError as exc:
                report(ClusterEvent(event="error", error=exc.to_body()["error"]))
            else:
                report(ClusterEvent(event="created", cluster=view))

        return task_stream(node.spawn, work, name="cluster-create", first=_ACCEPTED)

    @routes.get("/clusters")
    async def list_clusters(caller: Owner) -> list[ClusterView]:
        """Every cluster of this node, oldest first."""
        return clusters().list()

    @routes.get("/clusters/{cluster}")
    async def show(cluster: str, caller: Owner) -> ClusterView:
        """One cluster (id, unique prefix or name): state, addresses, workers."""
        return clusters().get(cluster)

    @routes.post("/clusters/{cluster}/scale")
    async def scale(cluster: str, body: ClusterScale, caller: Owner) -> ClusterView:
        """Add or remove workers (newest first) until the cluster has ``workers``."""
        return await clusters().scale(cluster, body.workers)

    @routes.post("/clusters/{cluster}/workers")
    async def add_worker(cluster: str, caller: Owner) -> WorkerView:
        """One more worker; answers when it runs."""
        return await clusters().add_worker(cluster)

    @routes.delete("/clusters/{cluster}/workers/{worker}")
    async def remove_worker(cluster: str, worker: str, caller: Owner) -> ClusterView:
        """Remove one worker and its container."""
        return await clusters().remove_worker(cluster, worker)

    @routes.delete("/clusters/{cluster}")
    async def remove(cluster: str, caller: Owner) -> ClusterView:
        """Close the cluster: every container removed."""
        return await clusters().remove(cluster)

    return routes
