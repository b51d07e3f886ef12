"""Real Docker daemon and the real default image; skipped only when they are truly absent."""

from __future__ import annotations

import contextlib
import gc
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.containers.images import DEFAULT_IMAGE

pytestmark = pytest.mark.docker


def _docker() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        reason = str(exc)
    else:
        return client
    # docker-py leaks the socket of the client it could not hand back; collect it quietly
    # (else its ResourceWarning fails the whole run where Docker is absent).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    pytest.skip(f"no Docker daemon: {reason}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = _docker()
    try:
        client.images.get(DEFAULT_IMAGE)
    except Exception:
        pytest.skip(f"{DEFAULT_IMAGE} is not built; run 'p2prc images bootstrap'")
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client (openssh-client)")
    yield client
    client.close()


@pytest.fixture
def node_factory(tmp_path: Path, docker_client: Any) -> Iterator[Any]:
    """Start real nodes with the Docker runtime; remove every container they made."""
    node_ids: list[str] = []

    @contextlib.asynccontextmanager
    async def make(name: str, **config: Any) -> AsyncIterator[Node]:
        home = Home(tmp_path / name)
        config.setdefault("trust", TrustConfig(mode="open"))
        node_config, identity = init_home(home, NodeConfig(name=name, **config))
        node_ids.append(identity.node_id)
        async with Node(node_config, home, identity=identity, host="127.0.0.1", port=0) as node:
            yield node

    yield make
    for node_id in node_ids:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"p2prc.node={node_id}"}
        ):
            container.remove(force=True)
    remove_idle_tenant_networks(docker_client)


def remove_idle_tenant_networks(docker_client: Any) -> None:
    """Tenant networks a failed test left behind (the runtime removes them with their last
    container)."""
    for network in docker_client.networks.list(filters={"label": "p2prc.tenant"}):
        network.reload()
        if not network.attrs.get("Containers"):
            with contextlib.suppress(Exception):
                network.remove()


def ssh(
    home: Path, port: int, command: str, user: str = "p2prc"
) -> subprocess.CompletedProcess[str]:
    """Log in with the home's node key using the system ssh client."""
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(home / "identity" / "id_ed25519"),
            "-p",
            str(port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            f"{user}@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
