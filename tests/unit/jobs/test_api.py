"""The /jobs routes and JobsAPI against a fake node: submit, fail clearly, list, logs,
owner only, and placement that skips peers that refuse (no Docker, no SSH)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.errors import InvalidRequest, JobNotFound, NotFound, NotTrusted, OwnerOnly, QuotaExceeded
from p2prc.identity import Identity
from p2prc.jobs.client import Job, JobsAPI
from p2prc.jobs.models import JobState
from p2prc.jobs.service import JobService, for_node
from p2prc.jobs.store import JobStore
from p2prc.jobs.task import Task, parse_task
from p2prc.models import ContainerView, CreateContainer
from tests.conftest import FakeNode


@pytest.fixture
async def jobs(fake_node: FakeNode) -> AsyncIterator[JobService]:
    async with for_node(fake_node) as service:
        setattr(fake_node, "jobs", service)  # noqa: B010 (the node's hook, faked)
        yield service


@pytest.fixture
def api(api_client: AsyncClient, jobs: JobService) -> JobsAPI:
    return JobsAPI(api_client)


async def test_a_job_without_peers_fails_with_the_reason(api: JobsAPI) -> None:
    job = await api.run(parse_task({"run": ["echo", "hi"]}))
    final = await asyncio.wait_for(job.wait(), 10)
    assert final.state is JobState.FAILED
    assert "no peer could take rank 0" in final.reason
    lines = [line.line async for line in job.logs(follow=False)]
    assert lines[0] == "submitted: 1 rank(s)"
    assert lines[-1].startswith("failed: ")
    assert [j.id for j in await api.list()] == [job.id]
    assert (await api.get(job.id[:8])).state is JobState.FAILED
    # Cancelling a finished job changes nothing.
    assert (await api.cancel(job.id)).state is JobState.FAILED


async def test_the_client_runs_jobs(api_client: AsyncClient, jobs: JobService) -> None:
    assert isinstance(api_client.jobs, JobsAPI)
    job = await api_client.run(parse_task({"run": "true"}))
    assert isinstance(job, Job)
    assert (await asyncio.wait_for(job.wait(), 10)).state is JobState.FAILED
    assert [j.id for j in await api_client.jobs.list()] == [job.id]


async def test_unknown_jobs_and_bad_ids(api: JobsAPI) -> None:
    with pytest.raises(JobNotFound):
        await api.get("jobffffffffffff")
    with pytest.raises(InvalidRequest):
        await api.get("../etc")
    with pytest.raises(JobNotFound):
        await api.results("jobffffffffffff")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"run": "x", "bogus": 1}, "bogus"),
        ({"run": []}, "run"),
        ({"run": "x", "resources": {"cpus": -1}}, "cpus"),
        ({"run": "x", "outputs": ["../x"]}, "outputs"),
        ({"run": "x", "workdir": "relative/dir"}, "absolute"),
    ],
)
async def test_bad_tasks_start_nothing(
    api_client: AsyncClient, jobs: JobService, body: dict[str, object], key: str
) -> None:
    with pytest.raises(InvalidRequest, match=key):
        await api_client._call("POST", "/jobs", Task, body)
    assert jobs.list() == []


async def test_a_workdir_with_a_link_out_is_refused_by_the_node(
    api_client: AsyncClient, jobs: JobService, tmp_path: Path
) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "key").symlink_to("/etc/shadow")
    body = {"run": "x", "workdir": str(tmp_path / "w")}
    with pytest.raises(InvalidRequest, match="links outside it"):
        await api_client._call("POST", "/jobs", Task, body)
    assert jobs.list() == []


async def test_jobs_are_owner_only(fake_node: FakeNode, jobs: JobService, tmp_path: Path) -> None:
    transport = httpx.ASGITransport(app=create_app(fake_node))
    async with AsyncClient(
        "http://node.test", home=tmp_path / "x", identity=Identity.generate(), transport=transport
    ) as stranger:
        with pytest.raises(OwnerOnly):
            await JobsAPI(stranger).list()
        with pytest.raises(OwnerOnly):
            await JobsAPI(stranger).submit(parse_task({"run": "x"}))


async def test_result_paths_stay_inside(
    api_client: AsyncClient, api: JobsAPI, jobs: JobService
) -> None:
    job = await api.run(parse_task({"run": "x"}))
    await asyncio.wait_for(job.wait(), 10)
    results = jobs.store.results_dir(job.id)
    (results / "sub").mkdir(parents=True)
    (results / "sub" / "a.txt").write_text("A")
    (results / "link").symlink_to("/etc/passwd")
    assert [(f.path, f.size) for f in await api.results(job.id)] == [("sub/a.txt", 1)]
    for bad in ("link", "sub/../../state-0.db", "sub", "nope"):
        with pytest.raises((InvalidRequest, NotFound)):
            await api_client._request("GET", f"/jobs/{job.id}/results/{bad}", signed=True)
    written = await job.results(results.parent / "out")
    assert [p.read_text() for p in written] == ["A"]


class _RefusingHost:
    """Peers that each refuse in their own way."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: object = None
    ) -> ContainerView:
        self.asked.append(peer)
        if peer == "carol":
            raise QuotaExceeded("carol is full")
        raise NotTrusted("dave does not know us")

    async def remove(self, container: str) -> str:
        raise AssertionError("nothing was created")


async def test_placement_skips_peers_that_refuse(tmp_path: Path, fake_node: FakeNode) -> None:
    host = _RefusingHost()
    store = JobStore(fake_node.state.connection, tmp_path / "jobs")
    service = JobService(store, host, tmp_path / "key", lambda task: ([], []))
    async with service:
        job = await service.submit(parse_task({"run": "x", "peers": ["carol", "dave"]}))
        final = await asyncio.wait_for(service.wait(job.id), 10)
    assert host.asked == ["carol", "dave"]
    assert final.state is JobState.FAILED
    assert "carol: quota_exceeded: carol is full" in final.reason
    assert "dave: not_trusted" in final.reason


class _SlowHost:
    """A peer that takes its time to create a container, then makes it anyway."""

    def __init__(self, view: ContainerView) -> None:
        self.view = view
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.removed: list[str] = []

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: object = None
    ) -> ContainerView:
        self.asked.set()
        await self.release.wait()
        return self.view

    async def remove(self, container: str) -> str:
        self.removed.append(container)
        return container


async def test_a_cancel_while_placing_removes_the_container_the_peer_made(
    tmp_path: Path, fake_node: FakeNode
) -> None:
    view = ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": "a" * 32, "image": "p2prc/sshd:latest",
            "ssh": {"host": "127.0.0.1", "port": 2222, "user": "p2prc"}, "ports": [],
            "gpu": False, "cpus": 1, "memory": 1, "owner": "b" * 32, "created_at": 0,
        }
    )  # fmt: skip
    host = _SlowHost(view)
    store = JobStore(fake_node.state.connection, tmp_path / "jobs")
    async with JobService(store, host, tmp_path / "key", lambda task: ([], [])) as service:
        job = await service.submit(parse_task({"run": "x", "peers": ["bob"]}))
        await asyncio.wait_for(host.asked.wait(), 5)
        cancelling = asyncio.ensure_future(service.cancel(job.id))
        await asyncio.sleep(0.05)
        assert not cancelling.done()  # waits for the peer's answer
        host.release.set()
        final = await asyncio.wait_for(cancelling, 5)
    assert final.state is JobState.CANCELLED
    assert host.removed == ["0123456789ab"]


def test_a_node_naming_results_outside_is_refused(tmp_path: Path) -> None:
    from p2prc.errors import PeerProtocolError
    from p2prc.jobs.client import _local

    assert _local(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    for bad in ("../x", "/etc/passwd", "a/../../x", "", "."):
        with pytest.raises(PeerProtocolError):
            _local(tmp_path, bad)
