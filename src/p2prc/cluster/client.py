"""The library side of Dask clusters: ``client.clusters`` (a ``ClustersAPI``) over ``/clusters``.

Usage::

    async with AsyncClient(home=home) as client:
        cluster = await client.clusters.create(workers=3, progress=print)
        await client.clusters.scale(cluster.id, 5)
        await client.clusters.remove(cluster.id)

``Client.clusters`` gives the blocking twin, ``BlockingClustersAPI``: the same calls, each
run on the sync client's private event loop. ``p2prc.dask.P2PRCCluster`` builds on these.
"""

from __future__ import annotations

import builtins
import inspect
import re
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from .._client_async import (
    AsyncClient,
    ProgressCallback,
    _model_of,
    _raise_for_error,
    _validate,
    _validate_list,
)
from ..errors import InvalidRequest, PeerProtocolError, error_class, validation_message
from ..jobs.client import _blocking, _Twin
from .models import ClusterCreate, ClusterEvent, ClusterScale, ClusterView, WorkerView

__all__ = ["BlockingClustersAPI", "ClusterEvent", "ClustersAPI", "client_line"]

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# Starting workers takes as long as their containers do: the node bounds it (spec.timeout),
# so reads wait; connecting still gives up soon.
_SLOW = httpx.Timeout(30.0, read=None)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def client_line(view: ClusterView) -> str:
    """The Python line that connects a ``distributed.Client`` to the cluster ``view``."""
    if view.security is None:
        return f"from distributed import Client; client = Client({view.scheduler_address!r})"
    files = view.security
    return (
        "from distributed import Client, Security; "
        f"client = Client({view.scheduler_address!r}, security=Security("
        f"tls_ca_file={files.ca_file!r}, tls_client_cert={files.cert_file!r}, "
        f"tls_client_key={files.key_file!r}, require_encryption=True))"
    )


def _cluster_path(cluster: str, *rest: str) -> str:
    for part in (cluster, *rest):
        if not _NAME.match(part):
            raise InvalidRequest(f"{part!r} is not a cluster or worker id or name")
    return "/".join(["/clusters", cluster, *rest])


class ClustersAPI:
    """Dask clusters of the node ``client`` talks to (its owner's key signs every call)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        /,
        spec: ClusterCreate | None = None,
        *,
        progress: ProgressCallback | None = None,
        **fields: Any,
    ) -> ClusterView:
        """``POST /clusters``: returns once the scheduler and the asked workers run.

        ``spec`` or its fields as keywords (``workers=3, threads=2``); ``progress`` gets each
        step as a line of text (a plain or a coroutine function).
        """
        spec = _model_of(ClusterCreate, spec, fields)
        body = spec.model_dump(mode="json", exclude_none=True)
        client = self._client
        with client._transport_errors():
            async with client._http.stream("POST", "/clusters", json=body, timeout=_SLOW) as answer:
                if answer.status_code >= 400:
                    await answer.aread()
                    _raise_for_error(answer)
                async for line in answer.aiter_lines():
                    if line.strip() and (view := await _event(line, progress)) is not None:
                        return view
        raise PeerProtocolError(f"{client.base_url}/clusters: the answer ended without a cluster")

    async def list(self) -> builtins.list[ClusterView]:
        """``GET /clusters``: every cluster of the node, oldest first."""
        response = await self._client._request("GET", "/clusters", signed=True)
        return _validate_list(ClusterView, response, self._client.base_url)

    async def get(self, cluster: str) -> ClusterView:
        """``GET /clusters/ID`` (an id, a unique prefix of one, or a name)."""
        path = _cluster_path(cluster)
        response = await self._client._request("GET", path, signed=True)
        return _validate(ClusterView, response, f"{self._client.base_url}{path}")

    async def scale(self, cluster: str, workers: int) -> ClusterView:
        """``POST /clusters/ID/scale``: add workers, or remove the newest, up to ``workers``."""
        try:
            body = ClusterScale(workers=workers).model_dump()
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        return await self._send("POST", _cluster_path(cluster, "scale"), ClusterView, body)

    async def add_worker(self, cluster: str) -> WorkerView:
        """``POST /clusters/ID/workers``: one more worker; returns when it runs."""
        return await self._send("POST", _cluster_path(cluster, "workers"), WorkerView)

    async def remove_worker(self, cluster: str, worker: str) -> ClusterView:
        """``DELETE /clusters/ID/workers/NAME``: one worker and its container."""
        path = _cluster_path(cluster, "workers", worker)
        return await self._send("DELETE", path, ClusterView)

    async def remove(self, cluster: str) -> ClusterView:
        """``DELETE /clusters/ID``: close the cluster, every container removed."""
        return await self._send("DELETE", _cluster_path(cluster), ClusterView)

    async def _send(
        self, method: str, path: str, model: type[_ModelT], body: Any = None
    ) -> _ModelT:
        return await self._client._call(method, path, model, body, signed=True, http_timeout=_SLOW)


class BlockingClustersAPI(_Twin["ClustersAPI"]):
    """The blocking twin of ``ClustersAPI`` (``Client.clusters``)."""

    create = _blocking(ClustersAPI.create)
    list = _blocking(ClustersAPI.list)
    get = _blocking(ClustersAPI.get)
    scale = _blocking(ClustersAPI.scale)
    add_worker = _blocking(ClustersAPI.add_worker)
    remove_worker = _blocking(ClustersAPI.remove_worker)
    remove = _blocking(ClustersAPI.remove)


async def _event(line: str, progress: ProgressCallback | None) -> ClusterView | None:
    try:
        event = ClusterEvent.model_validate_json(line)
    except ValidationError as exc:
        raise PeerProtocolError(f"bad cluster progress line: {validation_message(exc)}") from None
    if event.event == "progress" and event.message and progress is not None:
        result = progress(event.message)
        if inspect.isawaitable(result):
            await result
    elif event.event == "error":
        error = event.error or {}
        raise error_class(error.get("code", ""))(error.get("message", "the cluster failed"))
    elif event.event == "created" and event.cluster is not None:
        return event.cluster
    return None
