"""The sync ``Client`` is derived from ``AsyncClient``: every operation has a twin."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, assert_type

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient, Client
from p2prc.errors import JobNotFound
from p2prc.jobs.client import BlockingJob
from p2prc.jobs.models import JobState
from p2prc.jobs.service import for_node
from p2prc.jobs.task import parse_task
from p2prc.models import ContainerView, NodeStatus, PeerView
from tests.conftest import FakeNode

# Async methods whose sync twin has another name.
_RENAMED = {"aclose": "close"}
# Async methods whose sync twin is written out: it answers a blocking handle.
_EXPLICIT = {"run"}


def _async_operations() -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(AsyncClient, inspect.iscoroutinefunction)
        if not name.startswith("_")
    )


def test_there_are_operations_to_check() -> None:
    assert {"health", "peers", "create_container", "run_plugin", "aclose"} <= set(
        _async_operations()
    )


@pytest.mark.parametrize("name", _async_operations())
def test_every_async_method_has_a_sync_twin(name: str) -> None:
    twin_name = _RENAMED.get(name, name)
    method = getattr(AsyncClient, name)
    twin = getattr(Client, twin_name, None)
    assert twin is not None, f"Client has no {twin_name}() for AsyncClient.{name}()"
    assert not inspect.iscoroutinefunction(twin)
    if name in _RENAMED:
        return  # an explicit method: its own parameters and docstring
    if name in _EXPLICIT:
        assert list(inspect.signature(twin).parameters) == list(
            inspect.signature(method).parameters
        )
        assert inspect.getdoc(twin) == inspect.getdoc(method)
        return
    assert twin.__name__ == name
    assert inspect.signature(twin) == inspect.signature(method)
    assert inspect.getdoc(twin) == inspect.getdoc(method)
    assert inspect.getdoc(twin), f"AsyncClient.{name}() has no docstring"


def test_bound_twin_drops_self() -> None:
    bound = inspect.signature(Client.map_port).parameters
    assert list(bound) == ["self", "port", "domain", "udp"]


def _client(fake_node: FakeNode, tmp_path: Path) -> Client:
    transport = httpx.ASGITransport(app=create_app(fake_node))
    return Client(
        "http://node.test", home=tmp_path / "none", identity=fake_node.identity, transport=transport
    )


def test_sync_client_runs_the_async_operation(fake_node: FakeNode, tmp_path: Path) -> None:
    with _client(fake_node, tmp_path) as client:
        assert list(inspect.signature(client.peers).parameters) == []
        assert client.status().node_id == fake_node.identity.node_id
        assert client.specs().cpu.cores >= 1
        assert client.whoami().node_id == fake_node.identity.node_id
        assert client.containers() == []


def test_sync_client_refuses_a_running_loop(fake_node: FakeNode, tmp_path: Path) -> None:
    client = _client(fake_node, tmp_path)
    try:

        async def inside() -> None:
            with pytest.raises(RuntimeError, match="running event loop"):
                client.health()

        asyncio.run(inside())
        assert client.health().status
    finally:
        client.close()


def test_sync_client_runs_a_job(fake_node: FakeNode, tmp_path: Path) -> None:
    setattr(fake_node, "jobs", for_node(fake_node))  # noqa: B010 (the node's hook, faked)
    with _client(fake_node, tmp_path) as client:
        job = client.run(parse_task({"run": ["echo", "hi"]}))
        assert isinstance(job, BlockingJob)
        final = job.wait()
        assert final.state is JobState.FAILED
        assert "no peer could take rank 0" in final.reason
        lines = [line.line for line in job.logs(follow=False)]
        assert lines[0] == "submitted: 1 rank(s)"
        assert [j.id for j in client.jobs.list()] == [job.id]
        again = client.jobs.job(job.id[:8])
        assert again.id == job.id
        assert again.view.state is JobState.FAILED
        assert again.cancel().state is JobState.FAILED
        with pytest.raises(JobNotFound):
            client.jobs.get("jobffffffffffff")


if TYPE_CHECKING:  # checked by mypy, never run: the twins keep the async types

    def _typed(client: Client) -> None:
        assert_type(client.peers(), list[PeerView])
        assert_type(client.status(), NodeStatus)
        assert_type(client.create_container(progress=print), ContainerView)
        assert_type(client.shutdown(), None)
        client.map_port(8080, "example.test", udp=True)
        client.map_port("8080")  # type: ignore[arg-type]
        client.peers(1)  # type: ignore[call-arg]


def test_every_job_call_has_a_blocking_twin() -> None:
    from p2prc.jobs.client import BlockingJobsAPI, Job, JobsAPI

    for async_class, twin in ((JobsAPI, BlockingJobsAPI), (Job, BlockingJob)):
        for name, member in vars(async_class).items():
            if name.startswith("_") or not callable(member):
                continue
            assert hasattr(twin, name), f"{twin.__name__} has no {name}"
            if inspect.iscoroutinefunction(member):
                assert getattr(twin, name).__doc__ == member.__doc__ or name in ("run",)
