"""The service layer in process: peer link, tracked containers, plugin runs, NDJSON streams."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc._aio import Report, reported
from p2prc.api import create_app
from p2prc.api._stream import task_stream
from p2prc.config import Home, NodeConfig, Timeouts, TrustConfig
from p2prc.containers import hostkeys
from p2prc.containers.service import ContainerService
from p2prc.containers.tracked import TrackedContainers
from p2prc.errors import ContainerNotFound, InvalidRequest, NotFound, PeerNotFound, PluginError
from p2prc.identity import Identity
from p2prc.models import (
    CreateContainer,
    CreateEvent,
    PluginEvent,
    PluginInfo,
    PluginRun,
    PluginRunRequest,
    TrackedContainer,
)
from p2prc.peers.link import PeerLink, PeerTarget
from p2prc.peers.table import Member, PeerTable
from p2prc.plugins.service import PluginRuns
from tests.conftest import FakeNode
from tests.unit.peers.sim import make_record

HOST_URL = "http://host.test"


def _hosting(make_fake_node: Any) -> FakeNode:
    node = make_fake_node(NodeConfig(name="host", trust=TrustConfig(mode="open")))
    assert isinstance(node, FakeNode)
    return node


def _link(owner: FakeNode, host: FakeNode, table: PeerTable | None = None) -> PeerLink:
    transport = httpx.ASGITransport(app=create_app(host))
    reader = (lambda: table) if table is not None else None
    return PeerLink(owner.identity, reader, owner.config.timeouts, transport=transport)


def _tracked(owner: FakeNode, link: PeerLink, clock: Any = None) -> TrackedContainers:
    known_hosts = owner.home_path / "known_hosts"
    if clock is None:
        return TrackedContainers(link, owner.state.connection, known_hosts)
    return TrackedContainers(link, owner.state.connection, known_hosts, clock=clock)


def _table(me: Identity, *peers: tuple[Identity, str, int]) -> PeerTable:
    """A table of ``me`` and each (identity, host, api port), named n1, n2 ..."""
    table = PeerTable(make_record(me, 0))
    for index, (peer, host, port) in enumerate(peers, 1):
        record = make_record(peer, index, addresses=(host,), api_port=port)
        table.members[peer.node_id] = Member(record)
    return table


# Peer link --------------------------------------------------------------------------------


def test_link_without_gossip_resolves_only_addresses() -> None:
    link = PeerLink(Identity.generate(), None, Timeouts())
    assert link.resolve("10.0.0.9:8001") == PeerTarget("http://10.0.0.9:8001", None)
    assert link.audience_at("10.0.0.9:8001") is None
    with pytest.raises(PeerNotFound):
        link.resolve("bob")


def test_link_while_gossip_is_not_running_is_like_no_gossip() -> None:
    def stopped() -> PeerTable:
        raise RuntimeError("Gossip runs only while the node runs")

    link = PeerLink(Identity.generate(), stopped, Timeouts())
    with pytest.raises(PeerNotFound):
        link.resolve("bob")


def test_link_resolves_names_and_audiences_from_the_table() -> None:
    me, bob = Identity.generate(), Identity.generate()
    table = _table(me, (bob, "10.0.0.1", 8001))
    link = PeerLink(me, lambda: table, Timeouts())
    target = link.resolve("n1")
    assert target == PeerTarget("http://10.0.0.1:8001", bob.node_id)
    assert link.audience_at("10.0.0.1:8001") == bob.node_id
    with pytest.raises(PeerNotFound):
        link.resolve("n0")  # this node itself is no peer


async def test_link_applies_the_configured_timeouts() -> None:
    link = PeerLink(Identity.generate(), None, Timeouts(connect=1.5, request=7))
    async with link.connect(PeerTarget("http://10.0.0.9:8001", "a" * 32)) as client:
        timeout = client._http.timeout
        assert client.audience == "a" * 32
    assert (timeout.connect, timeout.read, timeout.write) == (1.5, 7, 7)


# Tracked containers -----------------------------------------------------------------------


async def test_create_on_peer_tracks_pins_and_removes(make_fake_node: Any) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    tracked = _tracked(owner, _link(owner, host))
    progress: list[str] = []

    async def note(message: str) -> None:
        progress.append(message)

    view = await tracked.create_on_peer(HOST_URL, CreateContainer(name="web"), note)
    assert view.peer == host.identity.node_id
    assert progress[-1] == "publishing ports"
    assert [item.container for item in tracked.list()] == [view]
    assert tracked.list()[0].peer_address == HOST_URL
    known_hosts = owner.home_path / "known_hosts"
    assert hostkeys.is_pinned(known_hosts, hostkeys.alias(view.id), view.ssh.host_key)
    group = owner.plugin_runs.create_group()
    owner.plugin_runs.add_member(group.id, "p2prc-web")

    assert await tracked.remove("p2prc-web") == view.id
    assert tracked.list() == []
    assert host.container_store.hosted() == []
    assert owner.plugin_runs.group(group.id).containers == []
    assert not hostkeys.is_pinned(known_hosts, hostkeys.alias(view.id), view.ssh.host_key)
    with pytest.raises(ContainerNotFound):
        await tracked.remove(view.id)


async def test_create_on_peer_by_name_signs_for_the_record(make_fake_node: Any) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    table = _table(owner.identity, (host.identity, "host.test", 80))
    tracked = _tracked(owner, _link(owner, host, table))
    view = await tracked.create_on_peer("n1")
    assert view.peer == host.identity.node_id
    assert tracked.list()[0].peer_address == "http://host.test:80"
    with pytest.raises(PeerNotFound):
        await tracked.create_on_peer("carol")
    assert len(tracked.list()) == 1


async def test_a_container_gone_on_its_peer_is_forgotten(make_fake_node: Any) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    tracked = _tracked(owner, _link(owner, host))
    view = await tracked.create_on_peer(HOST_URL)
    await host.containers.remove(view.id, _owner_of(host))
    assert await tracked.remove(view.id) == view.id
    assert tracked.list() == []


class _Recording(httpx.AsyncBaseTransport):
    """The host's app, remembering each URL it was called at."""

    def __init__(self, host: FakeNode) -> None:
        self.urls: list[str] = []
        self._app = httpx.ASGITransport(app=create_app(host))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return await self._app.handle_async_request(request)


async def test_its_own_container_is_removed_where_the_node_listens_now(
    make_fake_node: Any,
) -> None:
    # Before: removed at the address it was made at, gone once the node restarted elsewhere.
    node, peer = _hosting(make_fake_node), _hosting(make_fake_node)
    transport = _Recording(node)
    link = PeerLink(node.identity, None, node.config.timeouts, transport=transport)
    now = PeerTarget("http://127.0.0.1:9002", node.identity.node_id)
    known_hosts = node.home_path / "known_hosts"
    tracked = TrackedContainers(link, node.state.connection, known_hosts, me=lambda: now)
    own = await tracked.create_on_peer("127.0.0.1:9001")
    assert own.peer == node.identity.node_id
    assert tracked.get(own.id).peer_address == "http://127.0.0.1:9001"
    transport.urls.clear()
    assert await tracked.remove(own.id) == own.id
    assert transport.urls == [f"http://127.0.0.1:9002/containers/{own.id}"]
    assert node.container_store.hosted() == []

    # A peer's container is still removed at the address it was made at.
    transport = _Recording(peer)
    link = PeerLink(node.identity, None, node.config.timeouts, transport=transport)
    tracked = TrackedContainers(link, node.state.connection, known_hosts, me=lambda: now)
    other = await tracked.create_on_peer(HOST_URL)
    transport.urls.clear()
    await tracked.remove(other.id)
    assert transport.urls[-1] == f"{HOST_URL}/containers/{other.id}"
    assert all(url.startswith(HOST_URL) for url in transport.urls)


async def test_list_prunes_expired_leases(make_fake_node: Any) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    now = [time.time()]  # the hosting node's clock sets the lease
    tracked = _tracked(owner, _link(owner, host), clock=lambda: now[0])
    await tracked.create_on_peer(HOST_URL, CreateContainer(ttl="1h"))
    assert len(tracked.list()) == 1
    now[0] += 2 * 3600
    assert tracked.list() == []


async def test_peer_error_tracks_nothing(make_fake_node: Any) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    tracked = _tracked(owner, _link(owner, host))
    with pytest.raises(Exception, match="not offered"):
        await tracked.create_on_peer(HOST_URL, CreateContainer(image="nope:1"))
    assert tracked.list() == []


async def test_a_create_is_validated_once_on_the_hosting_node(
    make_fake_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, owner = _hosting(make_fake_node), make_fake_node()
    plans: list[CreateContainer] = []
    real = ContainerService._plan

    def counted(self: ContainerService, request: CreateContainer, caller: Any) -> Any:
        plans.append(request)
        return real(self, request, caller)

    monkeypatch.setattr(ContainerService, "_plan", counted)
    await _tracked(owner, _link(owner, host)).create_on_peer(HOST_URL, CreateContainer(ports=1))
    assert len(plans) == 1


def _owner_of(node: FakeNode) -> Any:
    from p2prc.identity import b64encode
    from p2prc.models import CallerInfo

    key = b64encode(node.identity.public_key)
    return CallerInfo(node_id=node.identity.node_id, role="owner", public_key=key)


# Plugin runs ------------------------------------------------------------------------------


def _plugin_home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "plugin-home")
    project = home.plugins_dir / "probe"
    project.mkdir(parents=True)
    (project / "site.yml").write_text("- hosts: all\n  tasks: []\n")
    return home


class _Runner:
    """Stands in for ansible-runner: reports one event per host, or fails."""

    def __init__(self, error: Exception | None = None, gate: Any = None) -> None:
        self.error = error
        self.gate = gate
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self, plugin: PluginInfo, items: list[TrackedContainer], variables: dict[str, str],
        **options: Any,
    ) -> PluginRun:  # fmt: skip
        self.calls.append({"items": items, "variables": variables, **options})
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        for item in items:
            options["on_event"](f"c-{item.container.id}", "ping", "ok")
        return PluginRun(
            id=options["run_id"], plugin=plugin.name, target=options["target"],
            started_at=0, finished_at=1, ok=True,
        )  # fmt: skip


async def _with_container(make_fake_node: Any) -> tuple[FakeNode, str]:
    host, owner = _hosting(make_fake_node), make_fake_node()
    view = await _tracked(owner, _link(owner, host)).create_on_peer(HOST_URL)
    return owner, view.id


def _runs(owner: FakeNode, home: Home, runner: Any) -> PluginRuns:
    return PluginRuns(owner.state.connection, home, spawn=owner.spawn, runner=runner)


async def _drain(events: AsyncIterator[PluginEvent]) -> list[PluginEvent]:
    return [event async for event in events]


async def test_plugin_run_reports_progress_then_the_saved_run(
    make_fake_node: Any, tmp_path: Path
) -> None:
    owner, container = await _with_container(make_fake_node)
    home, runner = _plugin_home(tmp_path), _Runner()
    runs = _runs(owner, home, runner)
    assert [plugin.name for plugin in runs.plugins()] == ["probe"]
    request = PluginRunRequest(target=container, variables={"x": "1"})
    events = await _drain(await runs.run("probe", request))
    assert [event.event for event in events] == ["progress", "finished"]
    assert events[0].host == f"c-{container}"
    assert events[1].run is not None
    assert events[1].run.ok
    assert runs.runs() == [events[1].run]
    call = runner.calls[0]
    assert call["key"] == home.identity_dir / "id_ed25519"
    assert call["known_hosts"] == home.path / "known_hosts"
    assert call["variables"] == {"x": "1"}


async def test_plugin_run_on_a_group(make_fake_node: Any, tmp_path: Path) -> None:
    owner, container = await _with_container(make_fake_node)
    runs = _runs(owner, _plugin_home(tmp_path), _Runner())
    group = runs.create_group()
    with pytest.raises(InvalidRequest, match="no containers"):
        await runs.run("probe", PluginRunRequest(target=group.id))
    runs.add_member(group.id, container)
    events = await _drain(await runs.run("probe", PluginRunRequest(target=group.id)))
    assert events[-1].run is not None
    assert events[-1].run.target == group.id
    runs.remove_member(group.id, container)
    runs.delete_group(group.id)
    assert runs.groups() == []


async def test_a_failed_run_is_recorded(make_fake_node: Any, tmp_path: Path) -> None:
    owner, container = await _with_container(make_fake_node)
    for error, output in [
        (PluginError("ansible-runner is not installed"), "ansible-runner is not installed"),
        (ValueError("boom"), "internal error: ValueError('boom')"),
    ]:
        runs = _runs(owner, _plugin_home(tmp_path / output[:8]), _Runner(error))
        [finished] = await _drain(await runs.run("probe", PluginRunRequest(target=container)))
        assert finished.run is not None
        assert (finished.run.ok, finished.run.output) == (False, output)
        assert runs.runs()[-1] == finished.run


async def test_unknown_plugin_or_target_raises_before_anything_runs(
    make_fake_node: Any, tmp_path: Path
) -> None:
    owner, container = await _with_container(make_fake_node)
    runner = _Runner()
    runs = _runs(owner, _plugin_home(tmp_path), runner)
    with pytest.raises(NotFound):
        await runs.run("nope", PluginRunRequest(target=container))
    with pytest.raises(ContainerNotFound):
        await runs.run("probe", PluginRunRequest(target="ffffffffffff"))
    assert runner.calls == []
    assert owner.tasks == set()


async def test_a_run_finishes_and_is_saved_when_its_caller_leaves(
    make_fake_node: Any, tmp_path: Path
) -> None:
    owner, container = await _with_container(make_fake_node)
    gate = threading.Event()
    runs = _runs(owner, _plugin_home(tmp_path), _Runner(gate=gate))
    events = await runs.run("probe", PluginRunRequest(target=container))
    await events.aclose()  # type: ignore[attr-defined]  # the caller went away
    gate.set()
    await asyncio.wait_for(asyncio.gather(*owner.tasks), 10)
    assert [run.ok for run in runs.runs()] == [True]


async def test_plugin_source_is_checked(make_fake_node: Any, tmp_path: Path) -> None:
    runs = _runs(make_fake_node(), _plugin_home(tmp_path), _Runner())
    for source in ("", "x" * 1001):
        with pytest.raises(InvalidRequest, match="source"):
            await runs.pull(source)


# NDJSON stream ----------------------------------------------------------------------------


async def test_task_stream_sends_first_then_each_event(fake_node: FakeNode) -> None:
    async def work(report: Report[CreateEvent]) -> None:
        report(CreateEvent(event="progress", message="one"))
        await asyncio.to_thread(report, CreateEvent(event="progress", message="two"))

    first = CreateEvent(event="progress", message="accepted")
    response = task_stream(fake_node.spawn, work, name="test", first=first)
    assert response.media_type == "application/x-ndjson"
    lines = [json.loads(chunk) async for chunk in response.body_iterator]  # type: ignore[arg-type]
    assert [line["message"] for line in lines] == ["accepted", "one", "two"]
    assert all("error" not in line for line in lines)


async def test_reported_task_runs_on_when_nobody_reads(fake_node: FakeNode) -> None:
    done = asyncio.Event()

    async def work(report: Report[CreateEvent]) -> None:
        for index in range(3):
            report(CreateEvent(event="progress", message=str(index)))
            await asyncio.sleep(0)
        done.set()

    events = reported(fake_node.spawn, work, name="test")
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(done.wait(), 5)
