"""Jobs on real nodes and real containers: files there and back, ranks, cancel."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from p2prc.jobs.models import JobState, JobView
from p2prc.jobs.service import JobService, for_node
from p2prc.jobs.task import parse_task

pytestmark = pytest.mark.docker


async def _log(jobs: JobService, job_id: str) -> list[str]:
    return [e.log.line async for e in jobs.events(job_id) if e.log is not None]


async def _finished(jobs: JobService, job: JobView) -> JobView:
    done = await asyncio.wait_for(jobs.wait(job.id), 180)
    assert done.final
    return done


def _containers(docker_client: Any, job: JobView) -> list[Any]:
    ids = [p.container.id for p in job.placements if p.container is not None]
    return [c for i in ids for c in docker_client.containers.list(all=True, filters={"id": i})]


async def test_a_job_uploads_runs_and_brings_files_back(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    blob = os.urandom(3 * 1024 * 1024 + 17)
    (work / "in" / "data.bin").write_bytes(blob)
    (work / "in" / "note.txt").write_text("héllo\n")
    command = (
        "mkdir -p out/deep && cp in/data.bin out/copy.bin && cp in/note.txt out/deep/ "
        "&& ln -s /etc/passwd out/passwd && echo hello from rank $P2PRC_NODE_RANK of "
        "$P2PRC_NUM_NODES in $P2PRC_JOB_ID && echo $GREETING >&2"
    )
    async with node_factory("alice") as alice, node_factory("bob") as bob:
        task = parse_task(
            {
                "run": command,
                "workdir": str(work),
                "outputs": ["out", "missing.txt"],
                "env": {"GREETING": "it's $(not run)"},
                "peers": [bob.api_url],
            }
        )
        async with for_node(alice) as jobs:
            job = jobs.submit(task)
            done = await _finished(jobs, job)
            log = await _log(jobs, job.id)
            assert done.state is JobState.SUCCEEDED, (done.reason, log)
            results = jobs.results_dir(job.id)
            assert (results / "out" / "copy.bin").read_bytes() == blob
            assert (results / "out" / "deep" / "note.txt").read_text() == "héllo\n"
            assert not (results / "out" / "passwd").exists()
            assert not (results / "out" / "passwd").is_symlink()
            assert f"hello from rank 0 of 1 in {job.id}" in log
            assert "it's $(not run)" in log
            assert any("symbolic link" in line for line in log)
            assert any("missing.txt does not exist" in line for line in log)
            assert done.placements[0].container is not None
            assert done.placements[0].exit_code is None or done.placements[0].exit_code == 0
            assert _containers(docker_client, done) == []
