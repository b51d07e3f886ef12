"""``P2PRCCluster``: a Dask cluster on the p2prc pool, run by the node of this home.

Usage::

    from distributed import Client
    from p2prc.dask import P2PRCCluster

    with P2PRCCluster(workers=3) as cluster, Client(cluster) as client:
        print(client.submit(sum, [1, 2, 3]).result())
        cluster.scale(5)

The node owns the cluster (``p2prc cluster list`` shows it); every Dask connection goes
through it over SSH and TLS, so nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

try:
    from distributed import Security
    from distributed.core import Status
    from distributed.deploy.spec import ProcessInterface, SpecCluster
    from distributed.versions import VersionMismatchWarning
except ImportError as exc:  # pragma: no cover (the test environment has Dask)
    raise ImportError(
        f"p2prc.dask needs Dask ({exc}); install it with: pip install 'p2prc[dask]'"
    ) from exc

from ._client_async import AsyncClient
from .cluster.client import ClustersAPI, client_line
from .cluster.models import ClusterCreate, ClusterView
from .config import Home
from .errors import ClusterError, InvalidRequest, validation_message
from .jobs.task import Resources

__all__ = ["P2PRCCluster", "client_line"]

# The image's Python is Debian 12's 3.11.x; the node checks every package and the Python
# minor before a cluster starts, so Dask's table when only Python's patch release differs
# (and nothing else) tells the user nothing. Any other difference still warns.
_PATCH_ONLY = (
    r"Mismatched versions found\n\n\+[-+]+\n\| Package +\| Client +\| Scheduler +\| Workers +\|\n"
    r"\+[-+]+\n\| python +\| (3\.\d+)\.\d+\S* +\| \1\.\d+\S* +\| \1\.\d+\S* +\|\n\+[-+]+\Z"
)
warnings.filterwarnings("ignore", message=_PATCH_ONLY, category=VersionMismatchWarning)

# A worker's graceful retirement (its results moved to others) before its container goes.
_RETIRE_TIMEOUT = 30.0


def _security_of(view: ClusterView) -> Security:
    """The client's TLS settings for the cluster ``view``."""
    if view.security is None:
        raise ClusterError(f"the node gave cluster {view.name} no client certificate")
    files = view.security
    return Security(  # type: ignore[no-untyped-call]
        tls_ca_file=files.ca_file,
        tls_client_cert=files.cert_file,
        tls_client_key=files.key_file,
        require_encryption=True,
    )


class _Node:
    """What the cluster and its workers share: the node's API and the cluster's id."""

    def __init__(self, api: ClustersAPI, cluster: str) -> None:
        self.api = api
        self.cluster = cluster
        # The node names each worker; SpecCluster knows it by its own spec name.
        self.spec_names: dict[str, object] = {}


class _Scheduler(ProcessInterface):
    """The cluster's scheduler, already running in its container: only its address."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.address = address

    async def start(self) -> None:
        self.status = Status.running

    async def close(self) -> None:
        self.status = Status.closed
        self._event_finished.set()


class _Worker(ProcessInterface):
    """One worker: ``start`` asks the node for a container, ``close`` removes it."""

    def __init__(self, scheduler: str, name: object, node: _Node, **kwargs: Any) -> None:
        super().__init__(scheduler=scheduler, name=name)  # type: ignore[no-untyped-call]
        self.name = name
        self.node = node
        self.worker = ""  # the node's name for it, once started
        self._cluster: weakref.ref[P2PRCCluster] | None = None

    async def start(self) -> None:
        view = await self.node.api.add_worker(self.node.cluster)
        self.worker, self.address = view.name, view.address
        self.node.spec_names[view.name] = self.name
        self.status = Status.running

    async def close(self) -> None:
        try:
            if self.worker:
                await self._retire()
                with contextlib.suppress(Exception):  # a cluster already removed keeps nothing
                    await self.node.api.remove_worker(self.node.cluster, self.worker)
                self.node.spec_names.pop(self.worker, None)
        finally:
            self.status = Status.closed
            self._event_finished.set()

    async def _retire(self) -> None:
        """Let the scheduler move what the worker holds to the others first (best effort)."""
        cluster = self._cluster() if self._cluster is not None else None
        if cluster is None or cluster.status != Status.running or cluster.scheduler_comm is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_RETIRE_TIMEOUT):
                await cluster.scheduler_comm.retire_workers(workers=[self.address])


class P2PRCCluster(SpecCluster):
    """A Dask cluster whose scheduler and workers are containers on the pool.

    ``workers``: started at once; ``worker_cpus``, ``worker_memory`` ("4GiB"),
    ``worker_gpus``: each worker's container; ``threads``: per worker; ``peers``: where
    workers may go (default: any trusted peer that fits, this node too);
    ``scheduler_peer``: where the scheduler runs (default: this node's host); ``home``:
    the node's home (default: ``$P2PRC_HOME``, as for the CLI). Other keywords go to
    ``SpecCluster`` (``asynchronous``, ``silence_logs``, ...).
    """

    def __init__(
        self,
        workers: int = 0,
        worker_cpus: float | None = None,
        worker_memory: str | None = None,
        worker_gpus: int = 0,
        threads: int | None = None,
        peers: Iterable[str] | None = None,
        scheduler_peer: str | None = None,
        home: Home | Path | str | None = None,
        asynchronous: bool = False,
        *,
        name: str | None = None,
        image: str | None = None,
        timeout: float = 180.0,
        **kwargs: Any,
    ) -> None:
        # Validated here, before any thread or container: bad input is one clear error.
        try:
            self._spec = ClusterCreate(
                workers=0,
                worker=Resources(cpus=worker_cpus, memory=worker_memory, gpus=worker_gpus),
                threads=threads,
                peers=list(peers or ()),
                scheduler_peer=scheduler_peer,
                name=name,
                image=image,
                timeout=timeout,
            )
            self._n_workers = ClusterCreate(workers=workers).workers
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        self._home = home
        self._client: AsyncClient | None = None
        self._node: _Node | None = None
        self._view: ClusterView | None = None
        try:
            super().__init__(asynchronous=asynchronous, name=name, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            if not asynchronous:
                with contextlib.suppress(Exception):
                    self._loop_runner.stop()  # type: ignore[no-untyped-call]
            raise

    @property
    def view(self) -> ClusterView | None:
        """The cluster as the node last described it (None before it started)."""
        return self._view

    @property
    def dashboard_link(self) -> str:
        """The scheduler's dashboard, forwarded by the node to this host."""
        return self._view.dashboard_link if self._view is not None else ""

    async def _start(self) -> None:
        if self.status in (Status.starting, Status.running, Status.closed) or self._view:
            await super()._start()  # type: ignore[no-untyped-call]
            return
        self._client = AsyncClient(home=self._home)
        try:
            self._view = await self._client.clusters.create(self._spec)
        except BaseException:
            await self._client.aclose()
            self._client = None
            self.status = Status.closed  # nothing was made: nothing to close
            raise
        self._node = _Node(self._client.clusters, self._view.id)
        self.security = _security_of(self._view)
        self.scheduler_spec = {
            "cls": _Scheduler,
            "options": {"address": self._view.scheduler_address},
        }
        options: dict[str, Any] = {"node": self._node}
        if self._spec.threads is not None:
            options["nthreads"] = self._spec.threads
        if self._spec.worker.memory is not None:
            options["memory_limit"] = self._spec.worker.memory
        self.new_spec = {"cls": _Worker, "options": options}
        self.worker_spec = {self._new_worker_name(i): self.new_spec for i in range(self._n_workers)}
        await super()._start()  # type: ignore[no-untyped-call]

    def scale(self, n: int = 0, memory: str | int | None = None, cores: int | None = None) -> Any:
        """Ask for ``n`` workers (or enough for ``memory`` or ``cores``); awaitable if async."""
        return super().scale(n, memory=memory, cores=cores)  # type: ignore[no-untyped-call]

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self._view.name if self._view else 'worker'}-{worker_number}"

    async def scale_down(self, workers: Iterable[object]) -> None:
        """Remove these workers (Dask's names for them, which the node gave, or spec names)."""
        names = self._node.spec_names if self._node is not None else {}
        await super().scale_down({names.get(str(w), w) for w in workers})  # type: ignore[no-untyped-call]

    async def _close(self) -> None:
        try:
            await super()._close()  # type: ignore[no-untyped-call]
        finally:
            client, self._client = self._client, None
            if client is not None:
                try:
                    if self._view is not None:
                        self._view = await client.clusters.remove(self._view.id)
                finally:
                    await client.aclose()
