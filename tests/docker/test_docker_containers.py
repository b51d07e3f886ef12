"""Containers on the real Docker daemon: create, SSH in, limits, ownership, faults."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient, Home, Node, NodeConfig, init_home
from p2prc.containers.docker import DockerRuntime
from p2prc.containers.runtime import ContainerSpec
from p2prc.errors import (
    ContainerNotFound,
    GpuUnavailable,
    InvalidRequest,
    RuntimeUnavailable,
)
from p2prc.models import CreateContainer
from tests.docker.conftest import ssh

pytestmark = pytest.mark.docker


async def test_create_ssh_limits_remove(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    async with (
        node_factory("alice") as _alice,
        node_factory("bob") as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        view = await client.create_on_peer(
            bob.api_url, CreateContainer(ports=2, cpus=0.5, memory="256MiB", name="job")
        )
        assert len(view.ports) == 2
        result = ssh(tmp_path / "alice", view.ssh.port, "id -un; python3 -c 'print(6*7)'")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["p2prc", "42"]
        attrs = docker_client.containers.get(view.id).attrs
        host = attrs["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 256 * 1024**2
        assert host["PidsLimit"] == 512
        assert not host["Privileged"]
        assert attrs["Mounts"] == []
        published = attrs["NetworkSettings"]["Ports"]
        assert {f"{p.container_port}/tcp" for p in view.ports} <= set(published)
        await client.remove_tracked(view.id)
        assert docker_client.containers.list(all=True, filters={"id": view.id}) == []


async def test_logins_that_must_fail(node_factory: Any, tmp_path: Path) -> None:
    async with (
        node_factory("alice") as _alice,
        node_factory("mallory") as _mallory,
        node_factory("bob") as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        view = await client.create_on_peer(bob.api_url)
        assert ssh(tmp_path / "mallory", view.ssh.port, "true").returncode != 0
        assert ssh(tmp_path / "alice", view.ssh.port, "true", user="root").returncode != 0
        async with AsyncClient(bob.api_url, home=tmp_path / "mallory") as mallory:
            with pytest.raises(ContainerNotFound):
                await mallory.remove_container(view.id)
        assert ssh(tmp_path / "alice", view.ssh.port, "true").returncode == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "a;touch /tmp/p2prc-pwned"},
        {"image": "p2prc/sshd:latest;touch /tmp/p2prc-pwned"},
        {"memory": "$(touch /tmp/p2prc-pwned)"},
        {"authorized_keys": ["ssh-ed25519 AAAA\ntouch /tmp/p2prc-pwned"]},
    ],
)
async def test_injection_attempts_run_nothing(
    node_factory: Any, docker_client: Any, tmp_path: Path, body: dict[str, Any]
) -> None:
    async with node_factory("bob") as bob, node_factory("eve") as _eve:
        before = len(docker_client.containers.list(all=True))
        async with AsyncClient(bob.api_url, home=tmp_path / "eve") as eve:
            response = await eve._http.post("/containers", json=body)
        assert response.status_code == 422
        assert len(docker_client.containers.list(all=True)) == before
    assert not await asyncio.to_thread(Path("/tmp/p2prc-pwned").exists)


async def test_gpu_on_a_node_without_gpu_leaves_nothing(docker_client: Any) -> None:
    runtime = DockerRuntime()
    before = len(docker_client.containers.list(all=True))
    networks = len(docker_client.networks.list())
    spec = ContainerSpec(
        name="p2prc-gpu-test",
        image="p2prc/sshd:latest",
        cpus=0.5,
        memory=256 * 1024**2,
        pids=64,
        ports=(),
        gpus=1,
        authorized_keys=(),
        labels={"p2prc.node": "test"},
    )
    try:
        with pytest.raises(GpuUnavailable):
            await runtime.create(spec)
    finally:
        await runtime.aclose()
    assert len(docker_client.containers.list(all=True)) == before
    assert len(docker_client.networks.list()) == networks


async def test_docker_down_is_clear_and_node_keeps_serving(tmp_path: Path) -> None:
    home = Home(tmp_path / "nodocker")
    config, identity = init_home(home, NodeConfig(name="nodocker"))
    runtime = DockerRuntime(base_url="unix:///nonexistent/docker.sock")
    async with (
        Node(config, home, identity=identity, host="127.0.0.1", port=0, runtime=runtime) as node,
        AsyncClient(home=home) as client,
    ):
        with pytest.raises(RuntimeUnavailable, match="unavailable"):
            await client.create_container()
        assert (await client.status()).node_id == node.identity.node_id


async def test_restart_reconciles_and_lease_expires(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    async with node_factory("bob") as bob, AsyncClient(home=tmp_path / "bob") as client:
        gone = await client.create_container()
        leased = await client.create_container(CreateContainer(ttl="1"))
        kept = await client.create_container()
    docker_client.containers.get(gone.id).remove(force=True)
    async with node_factory("bob") as bob:
        hosted = {view.id for view in bob.container_store.hosted()}
        assert gone.id not in hosted
        assert {kept.id, leased.id} <= hosted
        await asyncio.sleep(1.2)
        assert await bob.containers.expire() == [leased.id]
        assert docker_client.containers.list(all=True, filters={"id": leased.id}) == []
        with pytest.raises(InvalidRequest):
            await bob.containers.validate(
                CreateContainer(name=kept.name[len("p2prc-") :]), _owner(bob)
            )


def _owner(node: Node) -> Any:
    from p2prc.models import CallerInfo

    return CallerInfo(
        node_id=node.identity.node_id, role="owner", public_key=node.identity.public_key_b64
    )


async def test_ssh_into_a_container_on_a_nat_node_through_its_relay(
    node_factory: Any, tmp_path: Path
) -> None:
    """A real container on a node that is behind NAT (configured), a real SSH login to it
    through the relay's public port; the relay is another node on this machine."""
    from p2prc.config import RelayConfig

    relay_config = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    async with node_factory("relay", relay=relay_config, behind_nat=False) as relay:
        boot = [relay.api_url.removeprefix("http://")]
        # The NAT'd node tunnels only through relays its owner named (or trusts).
        use = RelayConfig(use=[relay.identity.node_id])
        async with (
            node_factory("home", behind_nat=True, bootstrap=boot, relay=use) as home,
            AsyncClient(home=tmp_path / "relay") as client,
        ):
            api = ""
            for _ in range(100):
                found = [v for v in await client.peers() if v.node_id == home.identity.node_id]
                if found and found[0].public_api:
                    api = found[0].api
                    break
                await asyncio.sleep(0.1)
            assert api, "the NAT'd node's API never appeared on the relay"
            view = await client.create_on_peer(api, CreateContainer(name="natjob"))
            local = [v for v in home.container_store.hosted() if v.id == view.id]
            assert local
            assert view.ssh.port != local[0].ssh.port  # the relay's port
            # In a thread: the relay and the tunnel run on this test's event loop.
            result = await asyncio.to_thread(ssh, tmp_path / "relay", view.ssh.port, "id -un")
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == ["p2prc"]
            await client.remove_tracked(view.id)
