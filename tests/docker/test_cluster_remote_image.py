"""A cluster worker on a peer of DEFAULT container config: the peer offers Dask images
itself and the owner asks it for the image before the worker's container (two real nodes
sharing this machine's Docker, so the image is there and the peer answers at once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from p2prc.cluster.image import ensure_dask_image, image_versions, local_versions
from p2prc.cluster.models import ClusterCreate, ClusterState, WorkerState
from p2prc.cluster.remote_image import ensure_on_peer
from p2prc.errors import ImageNotFound, P2PRCError
from p2prc.jobs.task import Resources

pytestmark = [pytest.mark.docker, pytest.mark.filterwarnings("ignore:Mismatched versions found")]

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_image(docker_client: Any) -> str:
    try:
        return ensure_dask_image()
    except P2PRCError as exc:
        pytest.skip(f"no Dask image: {exc}")


async def test_a_worker_lands_on_a_default_peer(
    node_factory: Callable[..., Any],
    docker_client: Any,
    dask_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with node_factory("alice") as alice, node_factory("bob") as bob:
        assert list(bob.config.containers.images) == ["p2prc/sshd:latest"]
        said: list[str] = []

        async def progress(line: str) -> None:
            said.append(line)

        spec = ClusterCreate(workers=1, peers=[bob.api_url], worker=Resources(memory="1GiB"))
        view = await alice.clusters.create(spec, progress)
        assert view.state is ClusterState.RUNNING, (view.reason, said)
        worker = view.workers[0]
        assert worker.state is WorkerState.RUNNING
        assert worker.container is not None
        assert worker.container.peer == bob.identity.node_id
        assert worker.container.image == dask_image
        assert f"{bob.api_url}: making sure it has {dask_image}" in said, said
        security = view.security
        assert security is not None
        async with distributed.Client(
            view.scheduler_address,
            security=distributed.Security(
                tls_ca_file=security.ca_file,
                tls_client_cert=security.cert_file,
                tls_client_key=security.key_file,
                require_encryption=True,
            ),
            asynchronous=True,
            timeout=30,
        ) as client:
            assert await client.submit(lambda: 6 * 7) == 42
        await alice.clusters.remove(view.id)

        # Versions no index has (and none allowed: nothing is downloaded) are refused
        # cleanly, and the image of that tag stays as it was.
        before = docker_client.images.get(dask_image).id
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        wanted = {**local_versions(), "numpy": "0.0.1"}
        with pytest.raises(ImageNotFound, match=r"pip download.*bootstrap --dask") as refused:
            await ensure_on_peer(alice.link, bob.api_url, "bob", wanted, progress)
        print(f"refused: {refused.value}")
        assert docker_client.images.get(dask_image).id == before
        assert image_versions(dask_image) == local_versions()
        assert bob.containers.dask_images._building is None
