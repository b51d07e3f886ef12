"""Clusters kept in the state database, the client's files, and placement with this node."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc.cluster.models import ClusterCreate, ClusterState, WorkerState, WorkerView
from p2prc.cluster.store import ClusterStore, check_cluster_id
from p2prc.errors import ClusterNotFound, InvalidRequest
from p2prc.jobs.placement import candidates
from p2prc.jobs.task import Resources
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member
from p2prc.state import State


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClusterStore]:
    with State(tmp_path / "state.db") as state:
        yield ClusterStore(state.connection, tmp_path / "clusters")


def test_create_get_update_and_workers_in_order(store: ClusterStore) -> None:
    view = store.create(ClusterCreate(workers=2, name="etl"))
    assert check_cluster_id(view.id) == view.id
    assert view.state is ClusterState.STARTING
    assert store.get("etl").id == view.id
    assert store.get(view.id[:5]).id == view.id
    store.set_worker(view.id, WorkerView(name="w2"))
    store.set_worker(view.id, WorkerView(name="w1"))
    store.set_worker(view.id, WorkerView(name="w2", state=WorkerState.RUNNING))
    running = store.update(view.id, state=ClusterState.RUNNING, scheduler_address="tls://x:1")
    assert running.scheduler_address == "tls://x:1"
    found = store.get(view.id)
    assert [(w.name, w.state) for w in found.workers] == [
        ("w2", WorkerState.RUNNING),
        ("w1", WorkerState.STARTING),
    ]
    store.forget_worker(view.id, "w2")
    assert [w.name for w in store.get(view.id).workers] == ["w1"]
    assert store.spec(view.id).workers == 2


def test_final_states_stay_final_and_record_when(store: ClusterStore) -> None:
    view = store.create(ClusterCreate())
    failed = store.update(view.id, state=ClusterState.FAILED, reason="boom")
    assert failed.closed_at is not None
    assert store.update(view.id, state=ClusterState.RUNNING).state is ClusterState.FAILED
    assert store.unfinished() == []


def test_names_are_unique_among_live_clusters(store: ClusterStore) -> None:
    first = store.create(ClusterCreate(name="a"))
    with pytest.raises(InvalidRequest, match="already named"):
        store.create(ClusterCreate(name="a"))
    store.update(first.id, state=ClusterState.CLOSED)
    second = store.create(ClusterCreate(name="a"))
    assert store.get("a").id == second.id


def test_unknown_clusters_and_bad_ids(store: ClusterStore) -> None:
    with pytest.raises(ClusterNotFound):
        store.get("nothing")
    with pytest.raises(InvalidRequest):
        store.cluster_dir("../etc")


def test_client_files_are_private(store: ClusterStore) -> None:
    view = store.create(ClusterCreate())
    security = store.write_security(view.id, b"ca", b"cert", b"key")
    assert Path(security.key_file).read_bytes() == b"key"
    folder = store.cluster_dir(view.id)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    store.remove_files(view.id)
    assert not folder.exists()


def _member(name: str, rtt: float, cores: int = 8) -> Member:
    record = PeerRecord(
        node_id=name * 32, public_key=b"", name=name, version=1, cores=cores, memory=8 << 30
    )
    return Member(record=record, rtt_ms=rtt)


def test_placement_takes_this_node_only_when_asked() -> None:
    members = [_member("m", 0.0), _member("a", 3.0), _member("b", 1.0, cores=1)]
    needs = Resources(cpus=2)
    found, unfit = candidates(needs, members, "m" * 32)
    assert [c.name for c in found] == ["a"]
    found, unfit = candidates(needs, members, "m" * 32, include_me=True)
    assert [c.name for c in found] == ["m", "a"]
    assert unfit == ["b: 1 cores < 2"]
