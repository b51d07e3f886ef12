"""Create, track and remove a container on a peer through the local node, over real sockets."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.errors import ContainerNotFound, NotTrusted
from p2prc.models import CreateContainer


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: object) -> AsyncIterator[Node]:
    home = Home(path / name)
    init_home(home, NodeConfig(name=name, **config))  # type: ignore[arg-type]
    config_, identity = init_home(home)
    async with Node(
        config_,
        home,
        identity=identity,
        host="127.0.0.1",
        port=0,
        runtime=FakeRuntime(ssh_banner=True),
    ) as node:
        yield node


async def test_create_track_and_remove_on_peer(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        progress: list[str] = []
        view = await client.create_on_peer(
            bob.api_url, CreateContainer(ports=2, name="job"), progress=progress.append
        )
        assert "waiting for sshd" in progress
        assert view.peer == bob.identity.node_id
        assert view.owner == alice.identity.node_id
        assert view.ssh.host == "127.0.0.1"
        assert len(view.ports) == 2
        tracked = await client.tracked()
        assert [item.container.id for item in tracked] == [view.id]
        assert tracked[0].peer_address == bob.api_url
        known_hosts = alice.home_path / "known_hosts"
        assert view.ssh.host_key.startswith("ssh-ed25519 ")
        assert known_hosts.read_text() == f"p2prc-{view.id} {view.ssh.host_key}\n"
        await client.remove_tracked(view.id[:6])
        assert await client.tracked() == []
        assert known_hosts.read_text() == ""
        assert await bob.containers.runtime.list_containers({}) == []


async def test_peer_trust_is_enforced_and_nothing_is_tracked(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "bob") as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        with pytest.raises(NotTrusted):
            await client.create_on_peer(bob.api_url)
        assert await client.tracked() == []
        with pytest.raises(ContainerNotFound):
            await client.remove_tracked("nope")


async def test_other_requester_cannot_remove(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "mallory") as _mallory,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as alice_client,
        AsyncClient(bob.api_url, home=tmp_path / "mallory") as mallory_to_bob,
    ):
        view = await alice_client.create_on_peer(bob.api_url)
        with pytest.raises(ContainerNotFound):
            await mallory_to_bob.remove_container(view.id)
        assert [c.id for c in await bob.containers.runtime.list_containers({})] == [view.id]


async def test_expired_lease_leaves_the_tracked_list(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        leased = await client.create_on_peer(bob.api_url, CreateContainer(ttl="1"))
        kept = await client.create_on_peer(bob.api_url)
        assert len(await client.tracked()) == 2
        await asyncio.sleep(1.1)
        assert [item.container.id for item in await client.tracked()] == [kept.id]
        assert await bob.containers.expire() == [leased.id]
