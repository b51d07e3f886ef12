"""The job store: create, look up by prefix, state transitions, placements and the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2prc.errors import InvalidRequest, JobNotFound
from p2prc.jobs.models import FINAL_STATES, JobState, RankPlacement
from p2prc.jobs.store import JobStore, allowed, check_job_id
from p2prc.jobs.task import parse_task
from p2prc.state import State


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    state = State(tmp_path / "state.db")
    return JobStore(state.connection, tmp_path / "jobs")


def test_create_and_get(store: JobStore) -> None:
    job = store.create(parse_task({"run": "echo hi", "nodes": 2}))
    assert job.state is JobState.PENDING
    assert [p.rank for p in job.placements] == [0, 1]
    assert store.get(job.id) == job
    assert store.get(job.id[:6]) == job
    assert store.all() == [job]
    assert store.unfinished() == [job]
    assert store.job_dir(job.id).is_dir()


def test_lookups_that_fail(store: JobStore) -> None:
    store.create(parse_task({"run": "x"}))
    store.create(parse_task({"run": "x"}))
    with pytest.raises(InvalidRequest, match="matches 2 jobs"):
        store.get("job")
    with pytest.raises(JobNotFound):
        store.get("jobffffffffffff")
    for bad in ("../x", "job%", "", "a" * 40):
        with pytest.raises(InvalidRequest):
            store.get(bad)
    with pytest.raises(InvalidRequest):
        check_job_id("job1/../../etc")


def test_the_lifecycle(store: JobStore) -> None:
    job = store.create(parse_task({"run": "x"}))
    assert store.set_state(job.id, JobState.SUCCEEDED) is None  # not from pending
    assert store.set_state(job.id, JobState.PLACING) is not None
    assert store.set_state(job.id, JobState.RUNNING) is not None
    done = store.set_state(job.id, JobState.OOM, "rank 0 ran out of memory")
    assert done is not None
    assert done.finished_at is not None
    assert store.get(job.id).reason == "rank 0 ran out of memory"
    # A cancel that comes after the end changes nothing.
    assert store.set_state(job.id, JobState.CANCELLED) is None
    assert store.get(job.id).state is JobState.OOM
    assert store.unfinished() == []


def test_nothing_leaves_a_final_state() -> None:
    for final in FINAL_STATES:
        assert not any(allowed(final, state) for state in JobState)
    assert allowed(JobState.RUNNING, JobState.PLACING)  # a retry
    assert not allowed(JobState.PENDING, JobState.RUNNING)


def test_placements_are_kept(store: JobStore) -> None:
    job = store.create(parse_task({"run": "x", "nodes": 2}))
    store.set_placement(job.id, RankPlacement(rank=1, peer="bob", skipped=["carol: not_trusted"]))
    placements = store.get(job.id).placements
    assert placements[0] == RankPlacement(rank=0)
    assert placements[1].peer == "bob"
    assert placements[1].skipped == ["carol: not_trusted"]


def test_the_log_reads_from_an_offset(store: JobStore) -> None:
    job = store.create(parse_task({"run": "x"}))
    assert store.read_log(job.id) == ([], 0)
    store.append_log(job.id, 0, "hello")
    store.append_log(job.id, None, "placed")
    lines, offset = store.read_log(job.id)
    assert [(line.rank, line.line) for line in lines] == [(0, "hello"), (None, "placed")]
    with store.log_file(job.id).open("ab") as file:
        file.write(b'{"rank": 0, "li')  # a line still being written
    assert store.read_log(job.id, offset) == ([], offset)


def test_a_job_keeps_a_bounded_log(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2prc.jobs import runner

    monkeypatch.setattr(runner, "MAX_LOG", 400)
    job = store.create(parse_task({"run": "x"}))
    jobs = runner.JobRunner(store, job.id, None, Path("key"), lambda task: ([], []))  # type: ignore[arg-type]
    for number in range(20):
        jobs._keep_line(0, f"line {number}")
    lines = [line.line for line in store.read_log(job.id)[0]]
    assert lines[0] == "line 0"
    assert lines[-1] == "the log passed 0 MiB; further lines are not kept"
    assert 2 < len(lines) < 20


def test_the_log_reads_in_bounded_chunks(store: JobStore) -> None:
    job = store.create(parse_task({"run": "x"}))
    for number in range(100):
        store.append_log(job.id, 0, f"{number:04d}" * 20)
    seen, offset = [], 0
    while True:
        lines, offset = store.read_log(job.id, offset, limit=1000)
        if not lines:
            break
        assert len(lines) < 20
        seen += lines
    assert [line.line[:4] for line in seen] == [f"{n:04d}" for n in range(100)]
