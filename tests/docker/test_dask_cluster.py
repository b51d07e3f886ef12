"""P2PRCCluster on real nodes, real containers and real Dask: three workers on two nodes, an
array reduction over 300 MiB, 1000 tasks whose results move between workers, scale up and
down, a worker's container killed mid-computation, TLS only, nothing left after close."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
np = pytest.importorskip("numpy")

from distributed import Client, Security  # noqa: E402

from p2prc import ContainerConfig, Home, Node, NodeConfig, TrustConfig, init_home  # noqa: E402
from p2prc.client import Client as NodeClient  # noqa: E402
from p2prc.cluster.certs import ClusterCA  # noqa: E402
from p2prc.cluster.image import ensure_dask_image  # noqa: E402
from p2prc.config import GossipConfig  # noqa: E402
from p2prc.dask import P2PRCCluster  # noqa: E402

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.timeout(400),
    # The image's Python is Debian's 3.11.x; Dask warns about a different patch release.
    pytest.mark.filterwarnings("ignore::distributed.versions.VersionMismatchWarning"),
]

N = 300 * 1024 * 1024 // 8  # int64 / float64 elements: 300 MiB


@pytest.fixture(scope="module")
def dask_image() -> str:
    return ensure_dask_image()


@contextlib.asynccontextmanager
async def _node(
    home: Path, docker_client: Any, host: str | None, image: str, join: Node | None = None
) -> AsyncIterator[Node]:
    offers = ContainerConfig(images=["p2prc/sshd:latest", image])  # peers offer the Dask image
    bootstrap = [] if join is None else [f"127.0.0.1:{join.port}"]
    config, identity = init_home(
        Home(home),
        NodeConfig(
            name=home.name,
            trust=TrustConfig(mode="open"),
            containers=offers,
            bootstrap=bootstrap,
            gossip=GossipConfig(lan_discovery=False),  # no multicast here; loopback bootstrap
        ),
    )
    try:
        async with Node(config, Home(home), identity=identity, host=host, port=0) as node:
            yield node
    finally:
        for container in _containers(docker_client, identity.node_id):
            container.remove(force=True)


async def _knows(node: Node, other: Node) -> None:
    for _ in range(300):
        if other.identity.node_id in {m.record.node_id for m in node.gossip.table.alive()}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{node.config.name} never learnt of {other.config.name}")


def _containers(docker_client: Any, node_id: str) -> list[Any]:
    found: list[Any] = docker_client.containers.list(
        all=True, filters={"label": f"p2prc.node={node_id}"}
    )
    return found


def _until(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)


def _scenario(home: Path, image: str, docker_client: Any) -> None:
    """What a user does, with the blocking API (the nodes run on the test's loop)."""

    # Local functions travel by value: the workers cannot import this test module.
    def _pairwise(x: Any, y: Any) -> int:
        return int(x.sum() + y.sum())

    def _slow_square(i: int) -> int:
        time.sleep(0.05)
        return i * i

    with (
        P2PRCCluster(workers=3, threads=2, image=image, home=home) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        view = cluster.view
        assert view is not None
        assert cluster.dashboard_link == view.dashboard_link
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        client.wait_for_workers(3, timeout=60)
        with NodeClient(home=home) as node:
            placed = node.clusters.get(view.id).workers
        spread = {w.peer for w in placed}
        assert len(spread) == 2, [(w.name, w.peer, w.skipped) for w in placed]  # two nodes

        # A reduction over 300 MiB with a known answer; the reversal moves chunks around.
        chunk = N // 24
        assert da.ones((N,), chunks=chunk).sum().compute() == N
        x = da.arange(N, chunks=chunk, dtype="int64")
        assert (x + x[::-1]).sum().compute() == N * (N - 1)

        # 1000 tasks, then 1000 that each need two results, most from another worker.
        made = client.map(np.full, [1000] * 1000, range(1000))
        paired = client.map(_pairwise, made, made[::-1])
        assert sum(client.gather(paired)) == 1000 * 1000 * 999

        # TLS only: plain TCP, and a client whose certificate another CA signed, get nowhere.
        port = cluster.scheduler_address.rsplit(":", 1)[1]
        with pytest.raises((OSError, TimeoutError)):
            Client(f"tcp://127.0.0.1:{port}", timeout=3)  # type: ignore[no-untyped-call]
        assert view.security is not None
        with pytest.raises((OSError, TimeoutError)):
            Client(  # type: ignore[no-untyped-call]
                cluster.scheduler_address,
                security=_stranger(home, view.security.ca_file),
                timeout=3,
            )

        cluster.scale(4)
        client.wait_for_workers(4, timeout=120)
        cluster.scale(2)
        _until(lambda: len(client.scheduler_info()["workers"]) == 2)
        with NodeClient(home=home) as node:
            _until(lambda: len(node.clusters.get(view.id).workers) == 2)  # containers removed
        named = docker_client.containers.list(filters={"name": view.id})
        assert len(named) == 3, [c.name for c in named]  # the scheduler and two workers

        # Kill one worker's container mid-computation: Dask recomputes what it held.
        futures = client.map(_slow_square, range(400))
        _until(lambda: sum(f.done() for f in futures) > 20)
        known = set(client.scheduler_info()["workers"])
        with NodeClient(home=home) as node:
            workers = node.clusters.get(view.id).workers
        victim = next(w for w in workers if w.container and w.address in known)
        assert victim.container is not None
        docker_client.containers.get(victim.container.id).kill()
        assert sum(client.gather(futures)) == sum(i * i for i in range(400))
        with NodeClient(home=home) as node:
            _until(lambda: _state(node, view.id, victim.name) == "lost")
    with NodeClient(home=home) as node:
        assert node.clusters.get(view.id).state.value == "closed"


def _stranger(home: Path, ca_file: str) -> Security:
    """A client certificate of another cluster's CA (the right CA file to check the server)."""
    issued = ClusterCA.create("clffffffffffff").issue("client")
    (home / "stranger.pem").write_bytes(issued.cert_pem)
    (home / "stranger-key.pem").write_bytes(issued.key_pem)
    return Security(  # type: ignore[no-untyped-call]
        tls_ca_file=ca_file,
        tls_client_cert=str(home / "stranger.pem"),
        tls_client_key=str(home / "stranger-key.pem"),
        require_encryption=True,
    )


def _state(node: NodeClient, cluster: str, worker: str) -> str:
    workers = {w.name: w for w in node.clusters.get(cluster).workers}
    return workers[worker].state.value if worker in workers else "lost"


async def test_three_workers_on_two_nodes(
    docker_client: Any, dask_image: str, tmp_path: Path
) -> None:
    async with (
        _node(tmp_path / "bob", docker_client, "127.0.0.1", dask_image) as bob,
        _node(tmp_path / "alice", docker_client, "127.0.0.1", dask_image, join=bob) as alice,
    ):
        await _knows(alice, bob)  # workers are placed from alice's table: alice and bob
        await asyncio.to_thread(_scenario, tmp_path / "alice", dask_image, docker_client)
        for node in (alice, bob):
            assert _containers(docker_client, node.identity.node_id) == []


async def test_nodes_on_the_default_host(
    docker_client: Any, dask_image: str, tmp_path: Path
) -> None:
    """Nodes listening on 0.0.0.0 (the default): the cluster works the same, async mode."""
    async with (
        _node(tmp_path / "dave", docker_client, None, dask_image) as dave,
        _node(tmp_path / "carol", docker_client, None, dask_image, join=dave) as carol,
    ):
        await _knows(carol, dave)
        async with (
            P2PRCCluster(
                workers=2,
                image=dask_image,
                home=tmp_path / "carol",
                asynchronous=True,
            ) as cluster,
            Client(cluster, asynchronous=True) as client,  # type: ignore[no-untyped-call]
        ):
            total = await client.compute(da.ones((1 << 20,), chunks=1 << 17).sum())
            assert total == 1 << 20
            assert _containers(docker_client, dave.identity.node_id) != []
        for node in (carol, dave):
            assert _containers(docker_client, node.identity.node_id) == []
