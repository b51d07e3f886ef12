"""A Dask cluster on a real node and real containers: TLS only, every connection through
the node's SSH hub, nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from p2prc import Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.cluster.certs import ClusterCA
from p2prc.cluster.image import ensure_dask_image
from p2prc.cluster.models import ClusterCreate, ClusterState, ClusterView, WorkerState
from p2prc.config import ContainerConfig
from p2prc.containers.images import DEFAULT_IMAGE
from p2prc.errors import P2PRCError
from p2prc.identity import Identity
from p2prc.jobs.task import Resources

# The image's Python is Debian's 3.11.2: Dask warns of any patch-level difference (the
# cluster service itself refuses a different minor version or package version).
pytestmark = [pytest.mark.docker, pytest.mark.filterwarnings("ignore:Mismatched versions found")]

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_image(docker_client: Any) -> str:
    """This environment's Dask image (built when missing; the cluster service finds it)."""
    try:
        return ensure_dask_image()
    except P2PRCError as exc:
        pytest.skip(f"no Dask image: {exc}")


def _security(view: ClusterView) -> Any:
    assert view.security is not None
    files = view.security
    return distributed.Security(
        tls_ca_file=files.ca_file,
        tls_client_cert=files.cert_file,
        tls_client_key=files.key_file,
        require_encryption=True,
    )


async def _tls_refusal(view: ClusterView, *, certificate: bool) -> str:
    """How the scheduler's TLS port treats a raw TLS client with or without the client's
    certificate: "open" while it keeps the connection, else the error that ended it."""
    assert view.security is not None
    context = ssl.create_default_context(cafile=view.security.ca_file)
    context.check_hostname = False
    if certificate:
        context.load_cert_chain(view.security.cert_file, view.security.key_file)
    host, port = view.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
        try:
            data = await asyncio.wait_for(reader.read(1), 2)
        finally:
            writer.close()
    except TimeoutError:
        return "open"
    except (OSError, ssl.SSLError) as exc:
        return repr(exc)
    return "closed" if not data else "open"


def _foreign_security(folder: Path) -> Any:
    """A client certificate signed by another cluster's CA."""
    ca = ClusterCA.create("cl000000000000")
    issued = ca.issue("client")
    files = {"ca.pem": ca.cert_pem, "c.pem": issued.cert_pem, "k.pem": issued.key_pem}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return distributed.Security(
        tls_ca_file=str(folder / "ca.pem"),
        tls_client_cert=str(folder / "c.pem"),
        tls_client_key=str(folder / "k.pem"),
        require_encryption=True,
    )


def _containers(docker_client: Any, node_id: str) -> list[Any]:
    found = docker_client.containers.list(all=True, filters={"label": f"p2prc.node={node_id}"})
    return list(found)


async def test_two_workers_compute_over_tls_through_the_hub(
    node_factory: Callable[..., Any], docker_client: Any, dask_image: str, tmp_path: Path
) -> None:
    offer = ContainerConfig(images=[DEFAULT_IMAGE, dask_image])
    async with node_factory("alice", containers=offer) as alice:
        said: list[str] = []

        async def progress(line: str) -> None:
            said.append(line)

        started = time.monotonic()
        spec = ClusterCreate(workers=2, worker=Resources(cpus=1, memory="1GiB"))
        view = await alice.clusters.create(spec, progress)
        took = time.monotonic() - started
        print(f"create with 2 workers: {took:.1f} s")
        assert view.state is ClusterState.RUNNING, (view.reason, said)
        assert [w.state for w in view.workers] == [WorkerState.RUNNING] * 2
        assert view.scheduler_address.startswith("tls://127.0.0.1:")
        assert view.versions["distributed"] == distributed.__version__
        assert alice.clusters.get(view.name).id == view.id
        assert len(_containers(docker_client, alice.identity.node_id)) == 3

        async with distributed.Client(
            view.scheduler_address, security=_security(view), asynchronous=True, timeout=30
        ) as client:
            info = await client.scheduler.identity(n_workers=-1)
            assert len(info["workers"]) == 2
            assert {w["name"] for w in info["workers"].values()} == {"w1", "w2"}
            squares = client.map(lambda x: x * x, range(200))
            total = await client.submit(sum, squares)
            assert total == sum(x * x for x in range(200))

        with pytest.raises((OSError, TimeoutError)):
            await distributed.Client(
                view.scheduler_address.replace("tls://", "tcp://"), asynchronous=True, timeout=5
            )
        assert await _tls_refusal(view, certificate=True) == "open"
        refused = await _tls_refusal(view, certificate=False)
        assert refused != "open"
        print(f"a TLS client without a certificate: {refused}")
        with pytest.raises((OSError, TimeoutError)):
            await distributed.Client(
                view.scheduler_address,
                security=_foreign_security(tmp_path),
                asynchronous=True,
                timeout=5,
            )

        closed = await alice.clusters.remove(view.id)
        assert closed.state is ClusterState.CLOSED
        assert _containers(docker_client, alice.identity.node_id) == []
        assert view.security is not None
        assert not Path(view.security.ca_file).parent.exists()


async def _until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _node_on(home: Path, port: int, image: str) -> AsyncIterator[Node]:
    """A node on a fixed port, as a deployed one is (its own containers are tracked at
    its API's address, which a restart on another port would lose)."""
    offer = ContainerConfig(images=[DEFAULT_IMAGE, image])
    config, identity = init_home(
        Home(home), NodeConfig(name=home.name, trust=TrustConfig(mode="open"), containers=offer)
    )
    async with Node(config, Home(home), identity=identity, host="127.0.0.1", port=port) as node:
        yield node


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_scale_a_lost_worker_and_a_restart(
    docker_client: Any, dask_image: str, tmp_path: Path
) -> None:
    port = _free_port()
    try:
        await _scale_lose_and_restart(docker_client, dask_image, tmp_path / "alice", port)
    finally:
        node_id = Identity.load(tmp_path / "alice" / "identity").node_id
        for container in _containers(docker_client, node_id):
            container.remove(force=True)


async def _scale_lose_and_restart(
    docker_client: Any, dask_image: str, home: Path, port: int
) -> None:
    async with _node_on(home, port, dask_image) as alice:
        node_id = alice.identity.node_id
        view = await alice.clusters.create(ClusterCreate(workers=1, image=dask_image))
        view = await alice.clusters.scale(view.id, 3)
        assert [(w.name, w.state) for w in view.workers] == [
            (name, WorkerState.RUNNING) for name in ("w1", "w2", "w3")
        ]
        victim = view.workers[1].container
        assert victim is not None
        docker_client.containers.get(victim.id).kill()

        def lost() -> bool:
            return alice.clusters.get(view.id).workers[1].state is WorkerState.LOST

        await _until(lost)
        view = alice.clusters.get(view.id)
        assert view.state is ClusterState.RUNNING
        assert view.workers[1].reason
        view = await alice.clusters.scale(view.id, 1)
        assert [(w.name, w.state) for w in view.workers] == [
            ("w1", WorkerState.RUNNING),
            ("w2", WorkerState.LOST),
        ]
        await _until(lambda: len(_containers(docker_client, node_id)) == 2)
        async with distributed.Client(
            view.scheduler_address, security=_security(view), asynchronous=True, timeout=30
        ) as client:
            assert await client.submit(lambda: 6 * 7) == 42
            info = await client.scheduler.identity(n_workers=-1)
            assert [w["name"] for w in info["workers"].values()] == ["w1"]
        worker = await alice.clusters.add_worker(view.id)
        assert worker.name == "w4"
        assert worker.state is WorkerState.RUNNING
    # The node stopped without removing the cluster: its stop fails it and removes its
    # containers (what a stop cannot remove, its next start does: "the node restarted").
    assert _containers(docker_client, node_id) == []
    async with _node_on(home, port, dask_image) as alice:
        again = alice.clusters.get(view.id)
        assert again.state is ClusterState.FAILED
        restarted = "the node restarted; its containers are removed"
        assert again.reason in ("the node stopped", restarted)
        await _until(lambda: _containers(docker_client, node_id) == [])


async def test_workers_on_a_peer_and_a_lost_scheduler(
    node_factory: Callable[..., Any], docker_client: Any, dask_image: str
) -> None:
    offer = ContainerConfig(images=[DEFAULT_IMAGE, dask_image])
    async with (
        node_factory("alice", containers=offer) as alice,
        node_factory("bob", containers=offer) as bob,
    ):
        spec = ClusterCreate(workers=2, peers=[bob.api_url])
        view = await alice.clusters.create(spec)
        assert view.scheduler is not None
        assert view.scheduler.peer == alice.identity.node_id
        assert {w.container.peer for w in view.workers if w.container} == {bob.identity.node_id}
        async with distributed.Client(
            view.scheduler_address, security=_security(view), asynchronous=True, timeout=30
        ) as client:
            # Each task's result moves to another worker: worker to worker, through the hub.
            first = client.map(lambda x: bytes(x % 251 for _ in range(4096)), range(40))
            total = await client.submit(lambda parts: sum(map(len, parts)), first)
            assert total == 40 * 4096
        docker_client.containers.get(view.scheduler.id).kill()

        def failed() -> bool:
            return alice.clusters.get(view.id).state is ClusterState.FAILED

        await _until(failed)
        assert "the scheduler was lost" in alice.clusters.get(view.id).reason
        await _until(lambda: _containers(docker_client, bob.identity.node_id) == [])
        await _until(lambda: _containers(docker_client, alice.identity.node_id) == [])
