"""Jobs: submit -> first log line, and 1 GiB up and down, against ssh/docker exec and scp.

Two real nodes in this process on loopback (Docker runtime, image cached): a submitter and
a host. Interleaved, ``--runs`` times each:
  latency:  submit a job running ``echo MARKER`` -> the line arrives on the job's log
            (container create, SSH login, start, follow), against ``ssh`` with the node key
            into a kept container of the same image on the same peer running the same
            command, and ``docker exec`` of it there (time to the line on stdout);
  transfer: the job layer's own SFTP upload and download (RankSession, asyncssh) of a file
            of 1 GiB of random bytes to and from that kept container, against plain
            ``scp`` (OpenSSH defaults) and ``scp -c aes128-gcm@openssh.com`` to it.
One whole job uploading and bringing back the 1 GiB file is run too; its own log lines
("uploaded ... in", "downloaded ... in") are reported. Every container and every 1 GiB file
is removed afterwards. Not a test: it prints and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from _common import print_table, write_result

from p2prc import Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.containers.images import DEFAULT_IMAGE
from p2prc.jobs.models import JobState, JobView
from p2prc.jobs.remote import RankSession, ResultBudget
from p2prc.jobs.service import JobService
from p2prc.jobs.task import parse_task
from p2prc.models import ContainerView

MARKER = "p2prc-bench-first-line"
GIB = 1024**3
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]  # fmt: skip


@asynccontextmanager
async def node(root: Path, name: str) -> AsyncIterator[Node]:
    config, identity = init_home(
        Home(root / name), NodeConfig(name=name, trust=TrustConfig(mode="open"))
    )
    async with Node(config, Home(root / name), identity=identity, host="127.0.0.1", port=0) as n:
        yield n


async def first_line(jobs: JobService, peer: str) -> tuple[float, float]:
    """Seconds from submit to the job's first line of output as its follower sees it, and
    as the job's log stored it (without the follower's poll); then waits for the end."""
    wall, start = time.time(), time.perf_counter()
    job = await jobs.submit(parse_task({"run": f"echo {MARKER}", "peers": [peer]}))
    took = stored = 0.0
    async for event in jobs.events(job.id, follow=True):
        if event.log is not None and event.log.line == MARKER:
            took, stored = time.perf_counter() - start, event.log.time - wall
            break
    done = await asyncio.wait_for(jobs.wait(job.id), 120)
    if not took or done.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"job {job.id}: {done.state} {done.reason}")
    return took, stored


def until_line(command: list[str]) -> float:
    """Seconds from starting ``command`` to MARKER on its stdout."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.strip() == MARKER:
                return time.perf_counter() - start
    finally:
        process.wait(timeout=30)
    raise RuntimeError(f"{command[0]} never printed the marker (exit {process.returncode})")


def ssh(key: Path, view: ContainerView, command: str) -> list[str]:
    return ["ssh", "-i", str(key), "-p", str(view.ssh.port), *SSH_OPTIONS,
            f"{view.ssh.user}@{view.ssh.host}", command]  # fmt: skip


def scp(key: Path, view: ContainerView, source: str, target: str, cipher: str | None) -> float:
    extra = ["-c", cipher] if cipher else []
    start = time.perf_counter()
    subprocess.run(
        ["scp", "-q", "-i", str(key), "-P", str(view.ssh.port), *SSH_OPTIONS, *extra,
         source, target], check=True, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - start


def scp_both(key: Path, view: ContainerView, big: Path, cipher: str | None) -> tuple[float, float]:
    """Seconds for ``scp`` of ``big`` to the container, then back (deleted again)."""
    there = f"{view.ssh.user}@{view.ssh.host}:scp.bin"
    back = big.with_name("scp.bin")
    try:
        return scp(key, view, str(big), there, cipher), scp(key, view, there, str(back), cipher)
    finally:
        back.unlink(missing_ok=True)


def remove_containers(hosts: list[str]) -> None:
    """The kept container, and any a failed run left."""
    for host in hosts:
        listed = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=p2prc.node={host}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        for container in listed.stdout.split():
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


async def ours_up_down(
    view: ContainerView, key: Path, upload: Path, into: Path
) -> tuple[float, float]:
    """The job layer's own SFTP upload of ``upload`` (a directory) and download of big.bin."""
    async with RankSession(view, key) as session:
        start = time.perf_counter()
        await session.upload(str(upload))
        up = time.perf_counter() - start
        start = time.perf_counter()
        budget = ResultBudget(64 * GIB)  # the job layer's result limit, never reached here
        count = await session.download(["big.bin"], into, lambda _line: None, budget)
        down = time.perf_counter() - start
    if count != 1:
        raise RuntimeError("the download brought back nothing")
    return up, down


def gbit(seconds: list[float], size: int) -> float:
    return round(size * 8 / statistics.median(seconds) / 1e9, 3)


async def job_transfer(jobs: JobService, peer: str, upload: Path) -> dict[str, Any]:
    """One whole job with the 1 GiB file: its own log's upload and download times."""
    task = parse_task({"run": "true", "workdir": str(upload), "outputs": ["big.bin"],
                       "peers": [peer]})  # fmt: skip
    start = time.perf_counter()
    job = await jobs.submit(task)
    done: JobView = await asyncio.wait_for(jobs.wait(job.id), 900)
    total = time.perf_counter() - start
    lines = [e.log.line async for e in jobs.events(job.id) if e.log is not None]
    if done.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"{done.state} {done.reason}: {lines[-5:]}")
    same = sha256(jobs.results_dir(job.id) / "big.bin") == sha256(upload / "big.bin")
    shutil.rmtree(jobs.results_dir(job.id))

    def seconds(pattern: str) -> float | None:
        found = [m for line in lines if (m := re.search(pattern, line))]
        return float(found[-1].group(1)) if found else None

    return {"job_total_s": round(total, 2), "byte_exact": same,
            "log_upload_s": seconds(r"uploaded .* in ([\d.]+) s"),
            "log_download_s": seconds(r"downloaded .* in ([\d.]+) s")}  # fmt: skip


async def main(runs: int, size: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="p2prc-bench-jobs-"))
    hosts: list[str] = []
    try:
        async with AsyncExitStack() as stack:
            alice = await stack.enter_async_context(node(tmp, "alice"))
            bob = await stack.enter_async_context(node(tmp, "bob"))
            hosts.append(bob.identity.node_id)
            jobs, peer = alice.jobs, bob.api_url
            key = tmp / "alice" / "identity" / "id_ed25519"
            await first_line(jobs, peer)  # warm-up: docker-py's first connection, the image
            keep = await jobs.submit(parse_task({"run": "true", "keep": True, "peers": [peer]}))
            done = await asyncio.wait_for(jobs.wait(keep.id), 120)
            view = done.placements[0].container
            assert view is not None, done.reason
            docker = ["docker", "exec", "-u", view.ssh.user, view.id, "sh", "-c", f"echo {MARKER}"]
            ours, stored, via_ssh, via_exec = [], [], [], []
            for _ in range(runs):
                seen, kept = await first_line(jobs, peer)
                ours.append(seen)
                stored.append(kept)
                via_ssh.append(
                    await asyncio.to_thread(until_line, ssh(key, view, f"echo {MARKER}"))
                )
                via_exec.append(await asyncio.to_thread(until_line, docker))

            upload = tmp / "upload"
            upload.mkdir()
            big = upload / "big.bin"
            with big.open("wb") as file:
                for _ in range(size // (16 * 1024 * 1024)):
                    file.write(os.urandom(16 * 1024 * 1024))
            size = big.stat().st_size
            digest = sha256(big)
            wipe = ssh(key, view, "rm -rf work scp.bin")
            times: dict[str, list[float]] = {k: [] for k in
                ("ours_up", "ours_down", "scp_up", "scp_down", "gcm_up", "gcm_down")}  # fmt: skip
            exact = True
            for index in range(runs):
                await asyncio.to_thread(subprocess.run, wipe, check=True, timeout=60)
                into = tmp / f"down-{index}"
                into.mkdir()
                up, down = await ours_up_down(view, key, upload, into)
                times["ours_up"].append(up)
                times["ours_down"].append(down)
                exact = exact and sha256(into / "big.bin") == digest
                shutil.rmtree(into)
                for label, cipher in (("scp", None), ("gcm", "aes128-gcm@openssh.com")):
                    up, down = await asyncio.to_thread(scp_both, key, view, big, cipher)
                    times[f"{label}_up"].append(up)
                    times[f"{label}_down"].append(down)
            await asyncio.to_thread(subprocess.run, wipe, check=True, timeout=60)
            whole = await job_transfer(jobs, peer, upload)
            big.unlink()
    finally:
        await asyncio.to_thread(remove_containers, hosts)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rates = {
        direction: {
            "ours": gbit(times[f"ours_{direction}"], size),
            "scp": gbit(times[f"scp_{direction}"], size),
            "scp_aes128_gcm": gbit(times[f"gcm_{direction}"], size),
        }
        for direction in ("up", "down")
    }
    samples = {
        "first_line": ours,
        "line_stored": stored,
        "ssh": via_ssh,
        "docker_exec": via_exec,
        **times,
    }
    return {
        "runs": runs,
        "image": DEFAULT_IMAGE,
        "load_1min": round(os.getloadavg()[0], 2),
        "submit_to_first_line_median_s": round(statistics.median(ours), 3),
        "submit_to_first_line_max_s": round(max(ours), 3),
        "submit_to_line_stored_median_s": round(statistics.median(stored), 3),
        "ssh_to_first_line_median_s": round(statistics.median(via_ssh), 3),
        "docker_exec_to_first_line_median_s": round(statistics.median(via_exec), 3),
        "first_line_ratio_to_ssh": round(statistics.median(ours) / statistics.median(via_ssh), 2),
        "first_line_ratio_to_docker_exec": round(
            statistics.median(ours) / statistics.median(via_exec), 2
        ),
        "target_first_line_s": 2.0,
        "transfer_bytes": size,
        "byte_exact": exact,
        "upload_gbit_s": rates["up"],
        "download_gbit_s": rates["down"],
        "upload_ratio_to_scp": round(med["scp_up"] / med["ours_up"], 2),
        "download_ratio_to_scp": round(med["scp_down"] / med["ours_down"], 2),
        "upload_ratio_to_scp_aes128_gcm": round(med["gcm_up"] / med["ours_up"], 2),
        "download_ratio_to_scp_aes128_gcm": round(med["gcm_down"] / med["ours_down"], 2),
        "target_ratio_to_scp": 0.8,
        "whole_job_1gib": whole,
        "seconds": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024, help="size of the transferred file")
    args = parser.parse_args()
    result = asyncio.run(main(args.runs, args.mib * 1024 * 1024))
    rows: list[tuple[str, object, object]] = [
        ("submit -> first line (s, median)", result["submit_to_first_line_median_s"],
         result["ssh_to_first_line_median_s"]),
        ("  vs docker exec (s, median)", result["submit_to_first_line_median_s"],
         result["docker_exec_to_first_line_median_s"]),
        ("upload (Gbit/s)", result["upload_gbit_s"]["ours"], result["upload_gbit_s"]["scp"]),
        ("download (Gbit/s)", result["download_gbit_s"]["ours"], result["download_gbit_s"]["scp"]),
    ]  # fmt: skip
    print_table(rows, ("measure", "p2prc", "ssh/scp"))
    for name in ("first_line_ratio_to_ssh", "first_line_ratio_to_docker_exec",
                 "upload_ratio_to_scp", "download_ratio_to_scp", "byte_exact"):  # fmt: skip
        print(f"{name:40} {result[name]!s:>14}")
    print(f"whole job, 1 GiB: {result['whole_job_1gib']}")
    write_result("jobs", result)
