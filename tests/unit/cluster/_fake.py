"""A fake ``ClusterService``: the interface of ``cluster.service`` without Docker, SSH or Dask."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from p2prc.cluster.models import (
    ClusterCreate,
    ClusterSecurity,
    ClusterState,
    ClusterView,
    WorkerState,
    WorkerView,
)
from p2prc.errors import ClusterError, ClusterNotFound

Progress = Callable[[str], Awaitable[None]]


class FakeClusters:
    """Keeps clusters in a dict; each worker gets the next fake port."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or Path("/nonexistent")
        self.clusters: dict[str, ClusterView] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail_create: str | None = None
        self._port = 40000
        self._names = 0

    def _next_port(self) -> int:
        self._port += 1
        return self._port

    def _worker(self) -> WorkerView:
        self._names += 1
        return WorkerView(
            name=f"w{self._names}",
            peer="peer-a",
            state=WorkerState.RUNNING,
            address=f"tls://127.0.0.1:{self._next_port()}",
        )

    async def create(self, spec: ClusterCreate, progress: Progress | None = None) -> ClusterView:
        self.calls.append(("create", str(spec.workers)))
        if progress is not None:
            await progress("scheduler starting")
        if self.fail_create:
            raise ClusterError(self.fail_create)
        cluster_id = "cl" + secrets.token_hex(6)
        folder = self.home / "clusters" / cluster_id
        workers = []
        for _ in range(spec.workers):
            if progress is not None:
                await progress("worker starting")
            workers.append(self._worker())
        view = ClusterView(
            id=cluster_id,
            name=spec.name or cluster_id,
            state=ClusterState.RUNNING,
            scheduler_address=f"tls://127.0.0.1:{self._next_port()}",
            dashboard_link=f"http://127.0.0.1:{self._next_port()}/status",
            security=ClusterSecurity(
                ca_file=str(folder / "ca.pem"),
                cert_file=str(folder / "client.pem"),
                key_file=str(folder / "client-key.pem"),
            ),
            workers=workers,
            created_at=time.time(),
        )
        self.clusters[cluster_id] = view
        return view

    def list(self) -> list[ClusterView]:
        return list(self.clusters.values())

    def get(self, cluster: str) -> ClusterView:
        for view in self.clusters.values():
            if cluster in (view.id, view.name) or view.id.startswith(cluster):
                return view
        raise ClusterNotFound(f"no cluster {cluster!r}")

    def _set(self, view: ClusterView, **changes: object) -> ClusterView:
        new = view.model_copy(update=changes)
        self.clusters[view.id] = new
        return new

    async def scale(
        self, cluster: str, workers: int, progress: Progress | None = None
    ) -> ClusterView:
        view = self.get(cluster)
        self.calls.append(("scale", view.id, str(workers)))
        now = list(view.workers)
        while len(now) < workers:
            now.append(self._worker())
        return self._set(view, workers=now[:workers])

    async def add_worker(self, cluster: str, progress: Progress | None = None) -> WorkerView:
        view = self.get(cluster)
        self.calls.append(("add_worker", view.id))
        await asyncio.sleep(0)
        worker = self._worker()
        self._set(view, workers=[*view.workers, worker])
        return worker

    async def remove_worker(self, cluster: str, worker: str) -> ClusterView:
        view = self.get(cluster)
        self.calls.append(("remove_worker", view.id, worker))
        if worker not in {w.name for w in view.workers}:
            raise ClusterNotFound(f"cluster {view.name} has no worker {worker!r}")
        return self._set(view, workers=[w for w in view.workers if w.name != worker])

    async def remove(self, cluster: str) -> ClusterView:
        view = self.get(cluster)
        self.calls.append(("remove", view.id))
        return self._set(view, state=ClusterState.CLOSED, workers=[], closed_at=time.time())
