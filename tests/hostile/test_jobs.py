"""Jobs against hostile peers: SSH hosts the peer does not publish, results without end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from p2prc.errors import JobError
from p2prc.identity import Identity
from p2prc.jobs.models import JobState
from p2prc.jobs.remote import RankSession, ResultBudget
from p2prc.jobs.service import JobService, published_hosts
from p2prc.jobs.store import JobStore
from p2prc.jobs.task import parse_task
from p2prc.models import ContainerView, CreateContainer
from p2prc.peers.records import PeerRecord
from tests.conftest import FakeNode

_PEER = "a" * 32
_KEY = Identity.generate().openssh_public_key("container")


def _view(host: str, host_key: str = "") -> ContainerView:
    return ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": _PEER, "image": "p2prc/sshd:latest",
            "ssh": {"host": host, "port": 2222, "user": "p2prc", "host_key": host_key},
            "ports": [], "gpu": False, "cpus": 1, "memory": 1, "owner": "b" * 32,
            "created_at": 0,
        }
    )  # fmt: skip


class _Host:
    """A peer that makes a container whose SSH host is whatever it likes."""

    def __init__(self, view: ContainerView) -> None:
        self.view = view
        self.removed: list[str] = []

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: object = None
    ) -> ContainerView:
        return self.view

    async def remove(self, container: str) -> str:
        self.removed.append(container)
        return container


async def _run_job(
    tmp_path: Path, fake_node: FakeNode, host: _Host, peers: list[str], hosts: set[str] | None
) -> Any:
    store = JobStore(fake_node.state.connection, tmp_path / "jobs")
    service = JobService(
        store, host, tmp_path / "key", lambda task: ([], []), ssh_hosts=lambda node_id: hosts
    )
    async with service:
        job = await service.submit(parse_task({"run": "x", "peers": peers}))
        return await asyncio.wait_for(service.wait(job.id), 10)


async def test_an_ssh_host_the_peer_does_not_publish_is_never_connected_to(
    tmp_path: Path, fake_node: FakeNode
) -> None:
    host = _Host(_view("203.0.113.9", host_key=_KEY))
    final = await _run_job(tmp_path, fake_node, host, ["bob"], {"192.0.2.7"})
    assert final.state is JobState.FAILED
    assert "bob: peer_protocol_error" in final.reason
    assert "SSH host 203.0.113.9 is not an address it publishes" in final.reason
    assert host.removed == ["0123456789ab"]  # its container does not stay behind
    assert final.placements[0].container is None


async def test_an_unknown_peer_gets_no_ssh_host_at_all(tmp_path: Path, fake_node: FakeNode) -> None:
    host = _Host(_view("192.0.2.7", host_key=_KEY))
    final = await _run_job(tmp_path, fake_node, host, ["bob"], None)
    assert "is not an address it publishes" in final.reason
    assert host.removed == ["0123456789ab"]


@pytest.mark.parametrize(
    ("peers", "hosts", "ssh_host"),
    [
        (["bob"], {"192.0.2.7"}, "192.0.2.7"),
        (["bob"], {"2001:db8::1"}, "2001:DB8:0::1"),
        (["192.0.2.7:8088"], None, "192.0.2.7"),  # pinned by address, no record
        (["http://[2001:db8::2]:8088"], None, "2001:db8::2"),
    ],
)
async def test_a_published_ssh_host_passes_the_check(
    tmp_path: Path,
    fake_node: FakeNode,
    peers: list[str],
    hosts: set[str] | None,
    ssh_host: str,
) -> None:
    host = _Host(_view(ssh_host))  # no host key: the login is refused after the check
    final = await _run_job(tmp_path, fake_node, host, peers, hosts)
    assert final.state is JobState.FAILED
    assert "came without an SSH host key" in final.reason
    assert final.placements[0].container is not None


def _record(node_id: str, **fields: Any) -> PeerRecord:
    return PeerRecord(node_id=node_id, public_key=b"k", name=node_id[:4], version=1, **fields)


def test_published_hosts_are_the_records_and_the_relays() -> None:
    relay = _record("r" * 32, addresses=("198.51.100.4",))
    peer = _record(
        _PEER,
        addresses=("10.0.0.5", "2001:DB8::5"),
        relay=relay.node_id,
        public_api="[2001:db8::9]:443",
    )
    assert published_hosts(peer, relay) == {
        "10.0.0.5",
        "2001:db8::5",
        "2001:db8::9",
        "198.51.100.4",
    }
    assert published_hosts(_record(_PEER, public_api="relay.example:443"), None) == {
        "relay.example"
    }


def test_the_result_budget_counts_every_rank() -> None:
    budget = ResultBudget(100)
    budget.take(60, "a")
    budget.take(40, "b")
    with pytest.raises(JobError, match=r"limit of .* GiB at c"):
        budget.take(1, "c")


class _Attrs:
    def __init__(self, mode: int, size: int) -> None:
        self.permissions = mode
        self.size = size


class _LyingSftp:
    """Says a file is small, then sends far more than it said."""

    def __init__(self, stated: int, sent: int) -> None:
        self.stated = stated
        self.sent = sent

    async def lstat(self, path: str) -> _Attrs:
        return _Attrs(0o100644, self.stated)

    async def get(self, remote: str, local: str, **options: Any) -> None:
        _send(remote, local, self.sent, options["progress_handler"])


def _send(remote: str, local: str, size: int, handler: Any) -> None:
    with open(local, "wb") as file:
        for copied in range(1024, size + 1, 1024):
            file.write(b"x" * 1024)
            handler(remote.encode(), local.encode(), copied, size)


async def _download(tmp_path: Path, sftp: _LyingSftp, budget: ResultBudget) -> list[str]:
    session = RankSession(_view("192.0.2.7", host_key=_KEY), tmp_path / "key")
    session._sftp = sftp  # type: ignore[assignment]
    notes: list[str] = []
    await session.download(["out.bin"], tmp_path / "results", notes.append, budget)
    return notes


async def test_results_past_the_limit_are_cut_and_removed(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    with pytest.raises(JobError, match=r"limit of .* GiB at out\.bin"):
        await _download(tmp_path, _LyingSftp(stated=1024, sent=1024 * 1024), ResultBudget(65536))
    assert not (tmp_path / "results" / "out.bin").exists()


async def test_a_stated_size_past_the_limit_fetches_nothing(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    with pytest.raises(JobError):
        await _download(tmp_path, _LyingSftp(stated=10**12, sent=0), ResultBudget(65536))
    assert list((tmp_path / "results").iterdir()) == []


async def test_results_within_the_limit_come_back(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    budget = ResultBudget(65536)
    await _download(tmp_path, _LyingSftp(stated=4096, sent=4096), budget)
    assert (tmp_path / "results" / "out.bin").is_file()
    assert budget.left == 65536 - 4096
