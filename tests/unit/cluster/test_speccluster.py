"""P2PRCCluster (a SpecCluster) against a fake node whose service runs a real in-process Dask
scheduler and workers over TLS: start, compute, scale, adapt's scale_down by the node's worker
names, dashboard link, close removes the cluster; sync and async modes; no Docker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

distributed = pytest.importorskip("distributed")

from distributed import Client, Scheduler, Security, Worker  # noqa: E402

import p2prc.dask as p2prc_dask  # noqa: E402
from p2prc.api import create_app  # noqa: E402
from p2prc.client import AsyncClient  # noqa: E402
from p2prc.cluster.certs import ClusterCA  # noqa: E402
from p2prc.cluster.models import (  # noqa: E402
    ClusterCreate,
    ClusterState,
    ClusterView,
    WorkerState,
    WorkerView,
)
from p2prc.dask import P2PRCCluster, client_line  # noqa: E402
from p2prc.errors import ClusterError, InvalidRequest  # noqa: E402
from tests.conftest import FakeNode  # noqa: E402
from tests.unit.cluster._fake import FakeClusters, Progress  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _security(folder: Path, ca: ClusterCA, role: str) -> Security:
    issued = ca.issue(role)
    (folder / f"{role}.pem").write_bytes(issued.cert_pem)
    (folder / f"{role}-key.pem").write_bytes(issued.key_pem)
    kind = "scheduler" if role == "scheduler" else "worker"
    return Security(  # type: ignore[no-untyped-call]
        tls_ca_file=str(folder / "ca.pem"),
        require_encryption=True,
        **{f"tls_{kind}_cert": str(folder / f"{role}.pem")},
        **{f"tls_{kind}_key": str(folder / f"{role}-key.pem")},
    )


class DaskClusters(FakeClusters):
    """The fake service with real Dask: a TLS scheduler and workers in this process."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.scheduler: Any = None
        self.workers: dict[str, Any] = {}
        self.folder = home

    async def create(self, spec: ClusterCreate, progress: Progress | None = None) -> ClusterView:
        view = await super().create(spec.model_copy(update={"workers": 0}), progress)
        folder = self.home / "clusters" / view.id
        folder.mkdir(parents=True)
        ca = ClusterCA.create(view.id)
        (folder / "ca.pem").write_bytes(ca.cert_pem)
        client = ca.issue("client")
        (folder / "client.pem").write_bytes(client.cert_pem)
        (folder / "client-key.pem").write_bytes(client.key_pem)
        self.ca, self.folder = ca, folder
        self.scheduler = Scheduler(
            host="127.0.0.1",
            protocol="tls",
            security=_security(folder, ca, "scheduler"),
            dashboard_address="127.0.0.1:0",
        )
        await self.scheduler
        port = self.scheduler.services["dashboard"].port
        return self._set(
            view,
            scheduler_address=self.scheduler.address,
            dashboard_link=f"http://127.0.0.1:{port}/status",
        )

    async def add_worker(self, cluster: str, progress: Progress | None = None) -> WorkerView:
        view = self.get(cluster)
        self.calls.append(("add_worker", view.id))
        self._names += 1
        name = f"w{self._names}"
        worker = Worker(
            self.scheduler.address,
            name=name,
            nthreads=1,
            host="127.0.0.1",
            security=_security(self.folder, self.ca, f"worker-{name}"),
            dashboard=False,
        )
        await worker
        self.workers[name] = worker
        made = WorkerView(name=name, peer="me", state=WorkerState.RUNNING, address=worker.address)
        self._set(view, workers=[*self.get(view.id).workers, made])
        return made

    async def remove_worker(self, cluster: str, worker: str) -> ClusterView:
        view = await super().remove_worker(cluster, worker)
        await self.workers.pop(worker).close()
        return view

    async def remove(self, cluster: str) -> ClusterView:
        view = await super().remove(cluster)
        for worker in list(self.workers.values()):
            await worker.close()
        self.workers.clear()
        if self.scheduler is not None:
            await self.scheduler.close()
        return view


@pytest.fixture
def service(fake_node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DaskClusters:
    fake = DaskClusters(tmp_path)
    setattr(fake_node, "clusters", fake)  # noqa: B010 (the node's hook, faked)
    app = create_app(fake_node)
    homes: list[object] = []

    def client(*, home: object = None) -> AsyncClient:
        homes.append(home)
        return AsyncClient(
            "http://node.test",
            home=tmp_path / "x",
            identity=fake_node.identity,
            transport=httpx.ASGITransport(app=app),
        )

    monkeypatch.setattr(p2prc_dask, "AsyncClient", client)
    fake.homes = homes  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def cluster(service: DaskClusters) -> AsyncIterator[P2PRCCluster]:
    async with P2PRCCluster(workers=2, asynchronous=True, name="lab", home="/h") as made:
        yield made


async def test_starts_computes_and_closes(service: DaskClusters) -> None:
    async with P2PRCCluster(workers=2, threads=1, asynchronous=True, home="/h") as cluster:
        assert service.homes == ["/h"]  # type: ignore[attr-defined]
        view = cluster.view
        assert view is not None
        assert cluster.scheduler_address == view.scheduler_address
        assert cluster.dashboard_link == view.dashboard_link
        assert cluster.security.require_encryption
        assert len(service.workers) == 2
        async with Client(cluster, asynchronous=True) as client:  # type: ignore[no-untyped-call]
            total = await client.submit(sum, range(101))
            assert total == 5050
            assert len((await client.scheduler.identity())["workers"]) == 2
        cluster_id = view.id
    assert service.clusters[cluster_id].state is ClusterState.CLOSED
    assert service.workers == {}
    assert ("remove", cluster_id) in service.calls


async def test_scale_up_and_down(cluster: P2PRCCluster, service: DaskClusters) -> None:
    cluster.scale(4)
    await cluster
    assert len(service.workers) == 4
    cluster.scale(1)
    await cluster
    assert len(service.workers) == 1
    assert [c for c in service.calls if c[0] == "remove_worker"].__len__() == 3


async def test_scale_down_by_the_names_dask_knows(
    cluster: P2PRCCluster, service: DaskClusters
) -> None:
    """Adaptive asks to close workers by their Dask names, which the node gave them."""
    node_name = next(iter(service.workers))
    await cluster.scale_down([node_name])
    assert node_name not in service.workers
    assert len(service.workers) == 1
    assert len(cluster.worker_spec) == 1


async def test_adapt_scales_down_idle_workers(cluster: P2PRCCluster, service: DaskClusters) -> None:
    cluster.adapt(minimum=1, maximum=3, interval="50ms", wait_count=1)
    for _ in range(200):
        if len(service.workers) == 1 and len(cluster.workers) == 1:
            break
        await asyncio.sleep(0.05)
    assert len(service.workers) == 1, service.calls
    assert ("remove_worker", next(iter(service.clusters))) in [c[:2] for c in service.calls]


async def test_a_refused_create_is_the_node_error(service: DaskClusters) -> None:
    service.fail_create = "image p2prc/dask:1 has dask 1.0, here 2.0"
    with pytest.raises(ClusterError, match="has dask"):
        await P2PRCCluster(workers=1, asynchronous=True)


def test_bad_input_is_refused_before_anything(service: DaskClusters) -> None:
    with pytest.raises(InvalidRequest, match="workers: Input should be less than or equal to 64"):
        P2PRCCluster(workers=100)
    with pytest.raises(InvalidRequest, match="memory: 'lots' is not a positive size"):
        P2PRCCluster(worker_memory="lots")
    assert service.calls == []


def test_the_blocking_mode(service: DaskClusters) -> None:
    with P2PRCCluster(workers=1) as cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
        assert client.submit(lambda x: x + 1, 1).result() == 2
        cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert cluster.view is not None
        cluster_id = cluster.view.id
    deadline = time.monotonic() + 10
    while service.clusters[cluster_id].state is not ClusterState.CLOSED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert service.workers == {}


def test_the_client_line_connects(service: DaskClusters) -> None:
    async def main() -> None:
        async with P2PRCCluster(workers=1, asynchronous=True) as cluster:
            assert cluster.view is not None
            line = client_line(cluster.view)
            assert "require_encryption=True" in line
            scope: dict[str, Any] = {}
            await asyncio.to_thread(_connect, line, scope)

    asyncio.run(main())


def _connect(line: str, scope: dict[str, Any]) -> None:
    exec(line, scope)
    client = scope["client"]
    try:
        assert client.submit(pow, 2, 10).result() == 1024
    finally:
        client.close()


def test_without_dask_the_import_says_what_to_install() -> None:
    code = "import sys; sys.modules['distributed'] = None; import p2prc.dask"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "pip install 'p2prc[dask]'" in result.stderr.strip().splitlines()[-1]
