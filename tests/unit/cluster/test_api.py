"""The /clusters routes and ClustersAPI against a fake service: create with progress, list,
show, scale, workers, remove; owner only, 404 for unknown clusters, one-line errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient, Client
from p2prc.cluster.client import BlockingClustersAPI, ClustersAPI
from p2prc.cluster.models import ClusterCreate, ClusterState
from p2prc.errors import (
    ClusterError,
    ClusterNotFound,
    InvalidRequest,
    NodeError,
    NotFound,
    OwnerOnly,
)
from p2prc.identity import Identity
from tests.conftest import FakeNode
from tests.unit.cluster._fake import FakeClusters


@pytest.fixture
def service(fake_node: FakeNode, tmp_path: Path) -> FakeClusters:
    fake = FakeClusters(tmp_path)
    setattr(fake_node, "clusters", fake)  # noqa: B010 (the node's hook, faked)
    return fake


@pytest.fixture
def api(api_client: AsyncClient, service: FakeClusters) -> ClustersAPI:
    return api_client.clusters


async def test_create_reports_progress_then_the_cluster(
    api: ClustersAPI, service: FakeClusters
) -> None:
    seen: list[str] = []
    view = await api.create(workers=2, name="lab", progress=seen.append)
    assert seen == ["accepted", "scheduler starting", "worker starting", "worker starting"]
    assert view.state is ClusterState.RUNNING
    assert view.name == "lab"
    assert len(view.workers) == 2
    assert view.scheduler_address.startswith("tls://127.0.0.1:")

    async def slow(message: str) -> None:
        seen.append(message)

    again = await api.create(ClusterCreate(workers=0), progress=slow)
    assert [c.id for c in await api.list()] == [view.id, again.id]
    assert (await api.get("lab")).id == view.id
    assert (await api.get(view.id[:6])).id == view.id


async def test_scale_workers_and_remove(api: ClustersAPI, service: FakeClusters) -> None:
    view = await api.create(workers=1)
    assert len((await api.scale(view.id, 3)).workers) == 3
    worker = await api.add_worker(view.id)
    assert worker.address.startswith("tls://")
    after = await api.remove_worker(view.id, worker.name)
    assert worker.name not in {w.name for w in after.workers}
    closed = await api.remove(view.name)
    assert closed.state is ClusterState.CLOSED
    assert closed.workers == []
    assert ("remove", view.id) in service.calls


async def test_a_failed_create_is_the_service_error(
    api: ClustersAPI, service: FakeClusters
) -> None:
    service.fail_create = "image p2prc/dask:1 has dask 1.0, this environment 2.0"
    with pytest.raises(ClusterError, match=r"has dask 1\.0"):
        await api.create(workers=1)
    assert service.clusters == {}


async def test_unknown_clusters_are_404(api: ClustersAPI, service: FakeClusters) -> None:
    for call in (
        api.get("nope"),
        api.scale("nope", 2),
        api.add_worker("nope"),
        api.remove_worker("nope", "w1"),
        api.remove("nope"),
    ):
        with pytest.raises(ClusterNotFound):
            await call
    view = await api.create(workers=1)
    with pytest.raises(NotFound, match="no worker"):
        await api.remove_worker(view.id, "w99")


async def test_bad_input_is_one_line_and_starts_nothing(
    api_client: AsyncClient, api: ClustersAPI, service: FakeClusters
) -> None:
    with pytest.raises(InvalidRequest, match="workers") as caught:
        await api.create(workers=-1)
    assert "\n" not in str(caught.value)
    with pytest.raises(InvalidRequest, match="not both"):
        await api.create(ClusterCreate(), workers=2)
    with pytest.raises(InvalidRequest, match="workers"):
        await api.scale("x", 100000)
    with pytest.raises(InvalidRequest, match="not a cluster"):
        await api.get("../etc")
    # What the node itself answers to a bad body: 422, one line.
    for body in ({"workers": 65}, {"bogus": 1}, {"worker": {"cpus": -1}}, {"name": "a b"}):
        with pytest.raises(InvalidRequest) as caught:
            await api_client._call("POST", "/clusters", ClusterCreate, body)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidRequest, match="workers"):
        await api_client._call("POST", "/clusters/x/scale", ClusterCreate, {"workers": "many"})
    assert service.calls == []


async def test_clusters_are_owner_only(
    fake_node: FakeNode, service: FakeClusters, tmp_path: Path
) -> None:
    transport = httpx.ASGITransport(app=create_app(fake_node))
    async with AsyncClient(
        "http://node.test", home=tmp_path / "x", identity=Identity.generate(), transport=transport
    ) as stranger:
        for call in (
            stranger.clusters.list(),
            stranger.clusters.get("x"),
            stranger.clusters.create(workers=1),
            stranger.clusters.scale("x", 1),
            stranger.clusters.add_worker("x"),
            stranger.clusters.remove("x"),
        ):
            with pytest.raises(OwnerOnly):
                await call
    assert service.calls == []


async def test_a_node_without_the_service_says_so(api_client: AsyncClient) -> None:
    with pytest.raises(NodeError, match="no cluster service"):
        await api_client.clusters.list()


def test_the_blocking_twin_has_every_call() -> None:
    public = {name for name in vars(ClustersAPI) if not name.startswith("_")}
    assert public <= set(vars(BlockingClustersAPI))
    assert BlockingClustersAPI.create.__doc__ == ClustersAPI.create.__doc__


def test_the_blocking_client_creates_and_removes(
    fake_node: FakeNode, service: FakeClusters, tmp_path: Path
) -> None:
    transport = httpx.ASGITransport(app=create_app(fake_node))
    with Client(
        "http://node.test", home=tmp_path / "x", identity=fake_node.identity, transport=transport
    ) as client:
        seen: list[str] = []
        view = client.clusters.create(workers=1, progress=seen.append)
        assert "worker starting" in seen
        assert [c.id for c in client.clusters.list()] == [view.id]
        assert client.clusters.remove(view.id).state is ClusterState.CLOSED
