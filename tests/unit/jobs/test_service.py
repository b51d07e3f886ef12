"""The job service in process: followers wake on each new line at once, a stopping
service takes no new work, and a node's cancel is never swallowed by a rank's cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2prc.errors import ContainerError, NodeNotRunning
from p2prc.jobs import runner as runner_module
from p2prc.jobs.models import JobEvent, JobState
from p2prc.jobs.runner import JobRunner
from p2prc.jobs.service import JobService
from p2prc.jobs.store import JobStore
from p2prc.jobs.task import parse_task
from p2prc.models import ContainerView, CreateContainer
from tests.conftest import FakeNode

_TASK = {"run": "true", "peers": ["bob"]}


class _Refusing:
    """A peer that refuses each container once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: object = None
    ) -> ContainerView:
        await self.release.wait()
        raise ContainerError("no room")

    async def remove(self, container: str) -> str:
        return container


def _service(fake_node: FakeNode, tmp_path: Path, host: Any) -> JobService:
    store = JobStore(fake_node.state.connection, tmp_path / "jobs")
    return JobService(store, host, tmp_path / "key", lambda task: ([], []))


async def _turns(count: int = 50) -> None:
    """Let the loop run ``count`` turns without any time passing."""
    for _ in range(count):
        await asyncio.sleep(0)


async def _rest(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    return [event async for event in events]


async def test_a_follower_wakes_at_once_on_a_new_line(fake_node: FakeNode, tmp_path: Path) -> None:
    # Before: followers looked every 0.2 s; here no time passes at all.
    host = _Refusing()
    async with _service(fake_node, tmp_path, host) as service:
        job = await service.submit(parse_task(_TASK))
        events = service.events(job.id, follow=True)
        first = await anext(events)
        assert first.log is not None
        assert first.log.line == "submitted: 1 rank(s)"
        await _turns()
        following = asyncio.ensure_future(anext(events))
        await _turns()
        assert not following.done()  # nothing new: it waits
        host.release.set()
        await _turns()
        assert following.done()
        line = following.result().log
        assert line is not None
        assert line.line.startswith("rank 0: skipped bob")
        rest = await asyncio.wait_for(_rest(events), 5)
        assert rest[-1].event == "finished"
        assert rest[-1].job is not None
        assert rest[-1].job.state is JobState.FAILED
        assert not service._followers  # a follower that ended is forgotten


async def test_every_follower_sees_every_line_and_the_end(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    # One event per follower: one clearing it cannot make another miss the last change.
    host = _Refusing()
    async with _service(fake_node, tmp_path, host) as service:
        job = await service.submit(parse_task(_TASK))
        readers = [asyncio.ensure_future(_rest(service.events(job.id, follow=True)))]
        await _turns()
        readers.append(asyncio.ensure_future(_rest(service.events(job.id, follow=True))))
        await _turns()
        host.release.set()
        seen = await asyncio.wait_for(asyncio.gather(*readers), 5)
    lines = [[e.log.line for e in events if e.log is not None] for events in seen]
    assert lines[0] == lines[1]
    assert lines[0][-1].startswith("failed: no peer could take rank 0")
    assert [events[-1].event for events in seen] == ["finished", "finished"]


async def test_a_stopped_service_takes_no_new_job(fake_node: FakeNode, tmp_path: Path) -> None:
    # It stays reachable while the node stops (its API stops after it): a job submitted
    # then would run with nothing left to stop it, a cancel would leave its containers.
    service = _service(fake_node, tmp_path, _Refusing())
    async with service:
        job = await service.submit(parse_task(_TASK))
    with pytest.raises(NodeNotRunning, match="stopping"):
        await service.submit(parse_task(_TASK))
    with pytest.raises(NodeNotRunning):
        await service.cancel(job.id)
    assert [j.id for j in service.list()] == [job.id]


async def test_a_cancel_while_a_rank_winds_down_is_not_swallowed(
    fake_node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the node's cancel arriving while a lost rank's follower was being stopped
    # was suppressed with the follower's own, and the rank was placed again elsewhere.
    monkeypatch.setattr(runner_module, "_WATCH_EVERY", 0.01)
    store = JobStore(fake_node.state.connection, tmp_path / "jobs")
    job = store.create(parse_task(_TASK))
    runner = JobRunner(store, job.id, _Refusing(), tmp_path / "key", lambda task: ([], []))
    runner._views[0] = ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": "a" * 32, "image": "p2prc/sshd:latest",
            "ssh": {"host": "192.0.2.7", "port": 2222, "user": "p2prc", "host_key": ""},
            "ports": [], "gpu": False, "cpus": 1, "memory": 1, "owner": "b" * 32,
            "created_at": 0,
        }
    )  # fmt: skip
    runner._gone = lambda node_id: True
    winding_down = asyncio.Event()

    async def follow() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.sleep(5)  # closing its SSH channel, say
            raise

    watched = asyncio.ensure_future(runner._watched(0, follow()))
    await asyncio.wait_for(winding_down.wait(), 5)
    watched.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(watched, 5)


class _Table:
    def __init__(self, members: dict[str, Any]) -> None:
        self.members = members

    def get(self, node_id: str) -> Any:
        return self.members.get(node_id)


class _Gossiping:
    def __init__(self, table: _Table | None) -> None:
        self._table = table

    @property
    def gossip(self) -> Any:
        if self._table is None:
            raise RuntimeError("gossip is off")
        return type("G", (), {"table": self._table})()


def test_peer_hosts_reads_the_table_when_asked() -> None:
    from p2prc.jobs.service import peer_hosts
    from p2prc.peers.records import PeerRecord
    from p2prc.peers.table import Member

    record = PeerRecord(
        node_id="a" * 32, public_key=b"k", name="bob", version=1, addresses=("10.0.0.5",)
    )
    table = _Table({})
    hosts = peer_hosts(_Gossiping(table))  # type: ignore[arg-type]
    assert hosts("a" * 32) is None  # no record of it (yet)
    table.members["a" * 32] = Member(record)
    assert hosts("a" * 32) == {"10.0.0.5"}
    assert peer_hosts(_Gossiping(None))("a" * 32) is None  # type: ignore[arg-type]


async def test_checked_ssh_host_removes_a_container_at_a_host_not_published() -> None:
    from p2prc.errors import PeerProtocolError
    from p2prc.jobs.runner import checked_ssh_host

    removed: list[str] = []

    class Host(_Refusing):
        async def remove(self, container: str) -> str:
            removed.append(container)
            return container

    view = ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": "a" * 32, "image": "p2prc/sshd:latest",
            "ssh": {"host": "192.0.2.7", "port": 2222, "user": "p2prc", "host_key": ""},
            "ports": [], "gpu": False, "cpus": 1, "memory": 1, "owner": "b" * 32,
            "created_at": 0,
        }
    )  # fmt: skip
    assert await checked_ssh_host(Host(), lambda n: {"192.0.2.7"}, "bob", view) is view
    assert await checked_ssh_host(Host(), lambda n: None, "192.0.2.7:8088", view) is view
    with pytest.raises(PeerProtocolError, match="not an address it publishes"):
        await checked_ssh_host(Host(), lambda n: {"192.0.2.8"}, "bob", view)
    assert removed == ["0123456789ab"]
