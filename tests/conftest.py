"""Fixtures shared by every test layer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.config import Home, NodeConfig
from p2prc.containers.runtime import FakeRuntime
from p2prc.containers.service import ContainerService
from p2prc.containers.store import ContainerStore
from p2prc.containers.tracked import TrackedContainers
from p2prc.direct.paths import Paths
from p2prc.direct.punch import PunchSlots
from p2prc.identity import Identity
from p2prc.node import init_home
from p2prc.peers.gossip import Gossip
from p2prc.peers.link import PeerLink
from p2prc.plugins.service import PluginRuns
from p2prc.state import State
from p2prc.tunnel.mapper import PortMapper


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's P2PRC_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("P2PRC"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """An initialised node home in a temporary directory."""
    home = Home(tmp_path / "home")
    init_home(home)
    return home


@dataclass
class FakeNode:
    """Just enough of a node for the API, without sockets."""

    identity: Identity
    config: NodeConfig
    state: State
    home_path: Path
    runtime: FakeRuntime
    containers: ContainerService
    port: int = 8088
    started_at: float = field(default_factory=time.time)
    closed: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    punches: PunchSlots = field(default_factory=PunchSlots)

    @property
    def container_store(self) -> ContainerStore:
        return ContainerStore(self.state.connection)

    @property
    def gossip(self) -> Gossip:
        raise RuntimeError("the fake node has no gossip; use a real Node")

    @property
    def link(self) -> PeerLink:
        return PeerLink(self.identity, None, self.config.timeouts)  # no gossip: addresses only

    @property
    def tracked(self) -> TrackedContainers:
        return TrackedContainers(self.link, self.state.connection, self.home_path / "known_hosts")

    @property
    def plugin_runs(self) -> PluginRuns:
        home, path = Home(self.home_path), self.config.plugin_path
        return PluginRuns(self.state.connection, home, path, spawn=self.spawn)

    @property
    def mapper(self) -> PortMapper:
        raise RuntimeError("the fake node maps no ports; use a real Node")

    @property
    def paths(self) -> Paths:
        raise RuntimeError("the fake node has no direct paths; use a real Node")

    def close(self) -> None:
        self.closed = True

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def component_health(self) -> dict[str, str]:
        return {"containers": "ok"}


async def _ssh_answers(host: str, port: int) -> bool:
    return True


@pytest.fixture
def make_fake_node(tmp_path: Path) -> Iterator[object]:
    states: list[State] = []

    def make(
        config: NodeConfig | None = None,
        identity: Identity | None = None,
        runtime: FakeRuntime | None = None,
    ) -> FakeNode:
        state = State(tmp_path / f"state-{len(states)}.db")
        states.append(state)
        identity = identity or Identity.generate()
        config = config or NodeConfig(name="fake")
        runtime = runtime or FakeRuntime()
        service = ContainerService(
            config,
            identity.node_id,
            ContainerStore(state.connection),
            runtime,
            ssh_probe=_ssh_answers,
        )
        return FakeNode(
            identity=identity,
            config=config,
            state=state,
            home_path=tmp_path,
            runtime=runtime,
            containers=service,
        )

    yield make
    for state in states:
        state.close()


@pytest.fixture
def fake_node(make_fake_node: object) -> FakeNode:
    assert callable(make_fake_node)
    node = make_fake_node()
    assert isinstance(node, FakeNode)
    return node


@pytest.fixture
async def api_client(fake_node: FakeNode, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """An AsyncClient signed with the fake node's own key, talking ASGI to its app."""
    transport = httpx.ASGITransport(app=create_app(fake_node))
    async with AsyncClient(
        "http://node.test", home=tmp_path / "none", identity=fake_node.identity, transport=transport
    ) as client:
        yield client
