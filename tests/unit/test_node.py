"""The node's lifecycle in process (loopback only): what calls its own API starts after
the API and stops before it; its own containers follow it to another port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2prc import FakeRuntime, Home, Node, NodeConfig, init_home
from p2prc._closing import Component
from p2prc.cluster import service as cluster_service
from p2prc.config import GossipConfig
from p2prc.models import ContainerView


def _node(home: Path, runtime: FakeRuntime) -> Node:
    config = NodeConfig(name=home.name, gossip=GossipConfig(lan_discovery=False))
    settings, identity = init_home(Home(home), config)
    return Node(settings, Home(home), identity=identity, host="127.0.0.1", port=0, runtime=runtime)


class _OwnContainer(Component):
    """A service over the API, like the cluster service: it makes a container on its own
    node when it starts and removes it when it closes, both through the node's API."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.view: ContainerView | None = None
        self.removed = ""

    async def start(self) -> None:
        self.view = await self.node.tracked.create_on_peer(self.node.api_url)

    async def aclose(self) -> None:
        assert self.view is not None
        self.removed = await self.node.tracked.remove(self.view.id)


async def test_services_over_the_api_call_it_while_starting_and_stopping(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # Before: the API stopped first, so the cluster service's own containers stayed until
    # the node's next start.
    made: list[_OwnContainer] = []

    def service(node: Node, **_: Any) -> _OwnContainer:
        made.append(_OwnContainer(node))
        return made[-1]

    monkeypatch.setattr(cluster_service, "for_node", service)
    runtime = FakeRuntime(ssh_banner=True)
    async with _node(tmp_path / "alice", runtime) as node:
        assert made[0].view is not None
        assert set(runtime.containers) == {made[0].view.id}
        assert node.component_health()["clusters"] == "ok"
    assert made[0].removed == made[0].view.id
    assert runtime.containers == {}


async def test_its_own_container_is_removed_after_a_restart_on_another_port(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(ssh_banner=True)
    async with _node(tmp_path / "alice", runtime) as node:
        view = await node.tracked.create_on_peer(node.api_url)
        first = node.port
    async with _node(tmp_path / "alice", runtime) as node:
        assert node.port != first
        assert await node.tracked.remove(view.id) == view.id
        assert node.tracked.list() == []
    assert runtime.containers == {}
