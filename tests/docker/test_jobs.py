"""Jobs on real nodes and real containers: files there and back, ranks, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.cli import main
from p2prc.jobs.client import JobsAPI
from p2prc.jobs.models import JobState, JobView
from p2prc.jobs.service import JobService
from p2prc.jobs.task import parse_task

pytestmark = pytest.mark.docker


@contextlib.asynccontextmanager
async def _jobs(node: Node) -> AsyncIterator[JobService]:
    """The node's own job service."""
    yield node.jobs


@contextlib.asynccontextmanager
async def _submitter(home: Path) -> AsyncIterator[Node]:
    config, identity = init_home(
        Home(home), NodeConfig(name=home.name, trust=TrustConfig(mode="open"))
    )
    async with Node(config, Home(home), identity=identity, host="127.0.0.1", port=0) as node:
        yield node


def _cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


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
        async with _jobs(alice) as jobs:
            job = await jobs.submit(task)
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


async def test_three_ranks_on_two_peers_see_each_other(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    command = (
        'mkdir -p out && printf "%s|%s|%s|%s" "$P2PRC_NODE_RANK" "$P2PRC_NUM_NODES" '
        '"$P2PRC_JOB_ID" "$P2PRC_NODE_ADDRS" > "out/rank-$P2PRC_NODE_RANK.txt"'
    )
    async with (
        node_factory("alice") as alice,
        node_factory("bob") as bob,
        node_factory("carol") as carol,
    ):
        task = parse_task(
            {
                "run": command,
                "nodes": 3,
                "ports": 1,
                "outputs": ["out"],
                "peers": [bob.api_url, carol.api_url],
            }
        )
        async with _jobs(alice) as jobs:
            job = await jobs.submit(task)
            done = await _finished(jobs, job)
            assert done.state is JobState.SUCCEEDED, (done.reason, await _log(jobs, job.id))
            hosts = [p.container.peer for p in done.placements if p.container is not None]
            assert hosts == [bob.identity.node_id, carol.identity.node_id, bob.identity.node_id]
            addresses = []
            for placement in done.placements:
                assert placement.container is not None
                port = placement.container.ports[0].host_port
                addresses.append(f"{placement.container.ssh.host}:{port}")
            results = jobs.results_dir(job.id) / "out"
            for rank in range(3):
                seen = (results / f"rank-{rank}.txt").read_text().split("|")
                assert seen == [str(rank), "3", job.id, "\n".join(addresses)]
            assert [p.exit_code for p in done.placements] == [0, 0, 0]
            assert _containers(docker_client, done) == []


async def _until_running(jobs: JobService, job: JobView) -> JobView:
    for _ in range(600):
        current = jobs.get(job.id)
        if current.state is JobState.RUNNING and any(
            "started" in line for line in await _log(jobs, job.id)
        ):
            return current
        assert not current.final, current.reason
        await asyncio.sleep(0.1)
    raise AssertionError("the job never ran")


async def test_cancel_stops_every_rank_and_removes_the_containers(
    node_factory: Any, docker_client: Any
) -> None:
    async with node_factory("alice") as alice, node_factory("bob") as bob:
        task = parse_task({"run": "echo started; sleep 600", "nodes": 2, "peers": [bob.api_url]})
        async with _jobs(alice) as jobs:
            job = await _until_running(jobs, await jobs.submit(task))
            assert len(_containers(docker_client, job)) == 2
            cancelled = await asyncio.wait_for(jobs.cancel(job.id), 60)
            assert cancelled.state is JobState.CANCELLED
            assert _containers(docker_client, job) == []


async def test_time_limit_and_out_of_memory_have_their_own_states(
    node_factory: Any, docker_client: Any
) -> None:
    async with node_factory("alice") as alice, node_factory("bob") as bob:
        slow = parse_task(
            {"run": "echo started; sleep 600", "time_limit": 8, "peers": [bob.api_url]}
        )
        hungry = parse_task(
            {
                "run": ["python3", "-c", "x = bytearray(512 * 1024 * 1024)"],
                "resources": {"memory": "64MiB"},
                "peers": [bob.api_url],
            }
        )
        async with _jobs(alice) as jobs:
            slow_job, hungry_job = await jobs.submit(slow), await jobs.submit(hungry)
            timed_out = await _finished(jobs, slow_job)
            oom = await _finished(jobs, hungry_job)
            assert timed_out.state is JobState.TIMED_OUT, timed_out.reason
            assert "time limit of 8 s" in timed_out.reason
            assert oom.state is JobState.OOM, (oom.reason, await _log(jobs, hungry_job.id))
            assert "rank 0 ran out of memory (64MiB)" in oom.reason
            assert _containers(docker_client, timed_out) == []
            assert _containers(docker_client, oom) == []


async def test_the_cli_and_the_library_on_a_real_node(
    node_factory: Any, docker_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "upload"
    work.mkdir()
    (work / "input.txt").write_text("abc\n")
    here = tmp_path / "here"
    async with _submitter(tmp_path / "alice"), node_factory("bob") as bob:
        home = str(tmp_path / "alice")
        code = await asyncio.to_thread(
            _cli, "--home", home, "run", "--peer", bob.api_url, "--upload", str(work),
            "--download", "out", "--to", str(here), "--",
            "sh", "-c", "mkdir out && tr a-z A-Z < input.txt > out/upper.txt && echo done -ls",
        )  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured
        assert "(0) done -ls" in captured.out
        assert (here / "out" / "upper.txt").read_text() == "ABC\n"
        assert await asyncio.to_thread(_cli, "--home", home, "jobs", "list", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert [job["state"] for job in listed] == ["succeeded"]
        job_id = listed[0]["id"]
        assert await asyncio.to_thread(_cli, "--home", home, "jobs", "logs", job_id) == 0
        assert "(0) done -ls" in capsys.readouterr().out
        assert await asyncio.to_thread(_cli, "--home", home, "jobs", "show", job_id[:7]) == 0
        shown = capsys.readouterr().out
        assert f"{job_id}  succeeded" in shown
        assert "rank 0: " in shown
        again = tmp_path / "again"
        code = await asyncio.to_thread(
            _cli, "--home", home, "jobs", "results", job_id, "--to", str(again)
        )
        assert code == 0
        assert (again / "out" / "upper.txt").read_text() == "ABC\n"
        assert await asyncio.to_thread(_cli, "--home", home, "jobs", "cancel", job_id) == 0
        assert f"{job_id} succeeded" in capsys.readouterr().out  # a finished job stays so
        code = await asyncio.to_thread(
            _cli, "--home", home, "run", "--detach", "--peer", bob.api_url, "--", "sleep", "600"
        )
        detached = capsys.readouterr().out.strip()
        assert code == 0
        assert detached.startswith("job")
        assert await asyncio.to_thread(_cli, "--home", home, "jobs", "cancel", detached) == 0
        assert f"{detached} cancelled" in capsys.readouterr().out
        failing = await asyncio.to_thread(
            _cli, "--home", home, "run", "--peer", bob.api_url, "--", "sh", "-c", "exit 3"
        )
        assert failing == 1
        assert "rank 0 exited with code 3" in capsys.readouterr().err

        task_file = tmp_path / "task.toml"
        task_file.write_text(
            f'workdir = "upload"\nnodes = 2\noutputs = ["out"]\npeers = ["{bob.api_url}"]\n'
            'run = "mkdir out && cp input.txt out/from-$P2PRC_NODE_RANK.txt"\n'
        )
        code = await asyncio.to_thread(
            _cli, "--home", home, "run", str(task_file), "--to", str(tmp_path / "there")
        )
        assert code == 0, capsys.readouterr()
        for rank in (0, 1):
            assert (tmp_path / "there" / "out" / f"from-{rank}.txt").read_text() == "abc\n"

        async with AsyncClient(home=home) as client:
            job = await JobsAPI(client).run(
                parse_task({"run": "echo one; echo two", "peers": [bob.api_url]})
            )
            lines = [line.line async for line in job.logs() if line.rank == 0]
            assert lines == ["one", "two"]
            assert (await job.wait()).state is JobState.SUCCEEDED


async def test_a_restarted_submitter_reattaches(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    command = "echo started; sleep 4; mkdir out; echo later > out/x; echo finished"
    async with node_factory("bob") as bob:
        task = parse_task({"run": command, "outputs": ["out"], "peers": [bob.api_url]})
        async with _submitter(tmp_path / "alice") as alice:
            job = await _until_running(alice.jobs, await alice.jobs.submit(task))
        assert len(_containers(docker_client, job)) == 1  # left running for the next start
        async with _submitter(tmp_path / "alice") as alice:
            done = await _finished(alice.jobs, job)
            log = await _log(alice.jobs, job.id)
            assert done.state is JobState.SUCCEEDED, (done.reason, log)
            assert log.count("started") == 1
            assert "finished" in log
            assert any("reattaching" in line for line in log)
            assert (alice.jobs.results_dir(job.id) / "out" / "x").read_text() == "later\n"
            assert _containers(docker_client, done) == []


async def test_a_rank_whose_container_dies_is_retried_on_another_peer(
    node_factory: Any, docker_client: Any
) -> None:
    command = "echo started; sleep 3; mkdir -p out; hostname > out/where"
    async with (
        node_factory("alice") as alice,
        node_factory("bob") as bob,
        node_factory("carol") as carol,
    ):
        peers = [bob.api_url, carol.api_url]
        task = parse_task({"run": command, "outputs": ["out"], "peers": peers, "retries": 1})
        once = parse_task({"run": "echo started; sleep 30", "peers": peers})
        async with _jobs(alice) as jobs:
            job = await _until_running(jobs, await jobs.submit(task))
            first = job.placements[0].container
            assert first is not None
            assert first.peer == bob.identity.node_id
            docker_client.containers.get(first.id).remove(force=True)
            done = await _finished(jobs, job)
            log = await _log(jobs, job.id)
            assert done.state is JobState.SUCCEEDED, (done.reason, log)
            placement = done.placements[0]
            assert placement.container is not None
            assert placement.container.peer == carol.identity.node_id
            assert placement.attempt == 1
            assert any("retrying elsewhere" in line for line in log)
            assert _containers(docker_client, done) == []

            # Without retries left, the job fails and says why.
            job = await _until_running(jobs, await jobs.submit(once))
            view = job.placements[0].container
            assert view is not None
            docker_client.containers.get(view.id).remove(force=True)
            failed = await _finished(jobs, job)
            assert failed.state is JobState.FAILED
            assert "rank 0 lost its peer" in failed.reason


async def test_placement_from_the_table_and_a_peer_that_leaves(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    command = "echo started; sleep 4; mkdir -p out; echo ok > out/done"
    async with node_factory("bob") as bob:
        roots = [f"127.0.0.1:{bob.port}"]
        async with (
            node_factory("carol", bootstrap=roots) as carol,
            node_factory("alice", bootstrap=roots) as alice,
        ):
            wanted = {bob.identity.node_id, carol.identity.node_id}
            for _ in range(300):
                if {m.record.node_id for m in alice.gossip.table.alive()} >= wanted:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("alice never learnt of bob and carol")
            big = parse_task({"run": "true", "resources": {"cpus": 1000}})
            task = parse_task({"run": command, "outputs": ["out"], "retries": 1})
            async with _jobs(alice) as jobs:
                refused = await _finished(jobs, await jobs.submit(big))
                assert refused.state is JobState.FAILED
                assert "bob: " in refused.reason
                assert "cores < 1000" in refused.reason
                job = await _until_running(jobs, await jobs.submit(task))
                first = job.placements[0]
                assert first.container is not None
                host = bob if first.container.peer == bob.identity.node_id else carol
                other = carol if host is bob else bob
                await host.aclose()  # leaves the membership: its rank moves
                done = await _finished(jobs, job)
                log = await _log(jobs, job.id)
                states = {m.record.name: m.state for m in alice.gossip.table.members.values()}
                assert done.state is JobState.SUCCEEDED, (done.reason, log, states)
                placement = done.placements[0]
                assert placement.container is not None
                assert placement.container.peer == other.identity.node_id
                assert any("membership declared" in line for line in log)


async def test_a_rank_lost_while_the_submitter_was_down_is_retried(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    command = "echo started; sleep 3; echo finished"
    async with node_factory("bob") as bob, node_factory("carol") as carol:
        peers = [bob.api_url, carol.api_url]
        task = parse_task({"run": command, "peers": peers, "retries": 1})
        async with _submitter(tmp_path / "alice") as alice:
            job = await _until_running(alice.jobs, await alice.jobs.submit(task))
        first = job.placements[0].container
        assert first is not None
        docker_client.containers.get(first.id).remove(force=True)
        async with _submitter(tmp_path / "alice") as alice:
            done = await _finished(alice.jobs, job)
            log = await _log(alice.jobs, job.id)
            assert done.state is JobState.SUCCEEDED, (done.reason, log)
            placement = done.placements[0]
            assert placement.container is not None
            assert placement.container.peer == carol.identity.node_id
            assert "finished" in log


async def test_a_failed_rank_stops_the_others(node_factory: Any, docker_client: Any) -> None:
    command = 'if [ "$P2PRC_NODE_RANK" = 1 ]; then exit 3; fi; echo started; sleep 600'
    async with node_factory("alice") as alice, node_factory("bob") as bob:
        task = parse_task({"run": command, "nodes": 2, "peers": [bob.api_url]})
        async with _jobs(alice) as jobs:
            done = await asyncio.wait_for(jobs.wait((await jobs.submit(task)).id), 60)
            assert done.state is JobState.FAILED
            assert done.reason == "rank 1 exited with code 3"
            assert any("stopping ranks 0" in line for line in await _log(jobs, done.id))
            assert _containers(docker_client, done) == []


async def test_a_container_is_entered_only_with_its_pinned_host_key(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    from p2prc.errors import PeerUnreachable
    from p2prc.identity import Identity
    from p2prc.jobs.remote import RankSession

    async with node_factory("alice") as alice, node_factory("bob") as bob:
        task = parse_task({"run": "true", "peers": [bob.api_url], "keep": True})
        async with _jobs(alice) as jobs:
            done = await _finished(jobs, await jobs.submit(task))
        view = done.placements[0].container
        assert view is not None
        assert len(_containers(docker_client, done)) == 1  # kept
        key = tmp_path / "alice" / "identity" / "id_ed25519"
        async with RankSession(view, key) as session:
            assert await session.exit_code() == (0, False)
        other = Identity.generate().openssh_public_key("x")
        forged = view.model_copy(update={"ssh": view.ssh.model_copy(update={"host_key": other})})
        with pytest.raises(PeerUnreachable, match="cannot log in"):
            await RankSession(forged, key).connect()
        blind = view.model_copy(update={"ssh": view.ssh.model_copy(update={"host_key": ""})})
        with pytest.raises(PeerUnreachable, match="without an SSH host key"):
            RankSession(blind, key)
        await alice.tracked.remove(view.id)
