"""Container SSH by the best path (#18) between real node processes on loopback and a real
container: with a direct path up, ``p2prc container ssh`` and ``container cp`` reach the
container's sshd from the HOSTING node's process (a ``port`` stream over the path), not from
this machine's ssh; with the path killed (``ss -K``) the next login goes to the container's
address as before, and the direct path comes back for the one after."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient
from tests.integration.conftest import NodeProcess, close, p2prc, start_node
from tests.integration.test_direct import (
    _direct_port,
    _home,
    _kill_connections,
    _wait_member,
    _wait_path,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def pair(
    tmp_path: Path, docker_client: Any
) -> Iterator[tuple[NodeProcess, NodeProcess, dict[str, Any]]]:
    """Node a hosts, node b creates a container on a: (a, b, the container's view)."""
    started: list[NodeProcess] = []
    created = ""
    try:
        a = start_node(_home(tmp_path, "a"), "--host", "127.0.0.1", "--port", "0")
        started.append(a)
        boot = a.api.removeprefix("http://")
        b_home = _home(tmp_path, "b", bootstrap=[boot])
        b = start_node(b_home, "--host", "127.0.0.1", "--port", "0")
        started.append(b)
        asyncio.run(_wait_member(b.home, a.node_id))
        asyncio.run(_wait_member(a.home, b.node_id))
        view = json.loads(p2prc(b.home, "--json", "container", "create", boot).stdout)
        created = view["id"]
        yield a, b, view
    finally:
        if created:
            p2prc(started[1].home, "container", "rm", created, check=False)
        for node in started:
            close(node)


def _ssh_owners(port: int) -> set[int]:
    """The pids that hold an established TCP connection to ``port`` on this machine."""
    listed = subprocess.run(
        ["ss", "-Htnp", "state", "established", "(", "dport", "=", f":{port}", ")"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", listed)}


def _owner_while(
    home: Path, port: int, args: list[str], within: float = 30
) -> tuple[set[int], subprocess.CompletedProcess[str]]:
    """Run ``p2prc ARGS`` and note who connects to the container's SSH port meanwhile."""
    env = {**os.environ, "P2PRC_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "p2prc", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    owners: set[int] = set()
    deadline = time.monotonic() + within
    while process.poll() is None and time.monotonic() < deadline:
        owners |= _ssh_owners(port)
        time.sleep(0.05)
    out, err = process.communicate(timeout=within)
    return owners, subprocess.CompletedProcess(args, process.returncode, out, err)


async def _banner(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def _sync(home: Path) -> None:
    async with AsyncClient(home=home) as client:
        await client.sync_peers()


async def _streams(home: Path, node_id: str) -> int:
    async with AsyncClient(home=home) as client:
        response = await client._request("GET", "/paths", signed=True)
    return next(int(p["streams"]) for p in response.json() if p["node_id"] == node_id)


def test_container_ssh_and_cp_take_the_direct_path_and_fall_back_when_it_dies(
    tmp_path: Path, pair: tuple[NodeProcess, NodeProcess, dict[str, Any]]
) -> None:
    a, b, view = pair
    cid = view["id"]
    port = view["ssh"]["port"]  # a is public: its own host port
    assert view["peer"] == a.node_id

    # The first call to a peer starts a direct attempt: b has its path within seconds.
    asyncio.run(_wait_path(b.home, a.node_id, "direct", 10.0))

    # ssh: the container's sshd is reached by a's node process, over the path.
    owners, done = _owner_while(
        b.home, port, ["container", "ssh", cid, "--", "sleep 1; cat /etc/hostname"]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert owners == {a.process.pid}, (owners, a.process.pid)

    # cp (asyncssh through the same ProxyCommand): the same way, byte exact.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 << 20))
    owners, done = _owner_while(b.home, port, ["--json", "container", "cp", str(big), f"{cid}:"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"] == 24 << 20
    assert owners == {a.process.pid}, (owners, a.process.pid)
    inside = p2prc(b.home, "container", "ssh", cid, "--", "sha256sum", "big.bin").stdout
    assert inside.split()[0] == hashlib.sha256(big.read_bytes()).hexdigest()

    # forward CONTAINER (asyncssh's -L through the ProxyCommand): the same way.
    forwarding = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "--json", "forward", cid, "0:22"],
        env={**os.environ, "P2PRC_HOME": str(b.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forwarding.stdout is not None
        shown = json.loads(forwarding.stdout.readline())
        banner = asyncio.run(_banner(int(shown["local_port"])))
        assert banner.startswith(b"SSH-2.0-")  # the container's own sshd, inside it
        assert _ssh_owners(port) == {a.process.pid}
    finally:
        forwarding.terminate()
        forwarding.communicate(timeout=20)

    # While a session is open, a counts its stream on b's path.
    env = {**os.environ, "P2PRC_HOME": str(b.home)}
    session = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "container", "ssh", cid, "--", "sleep 4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            seen = asyncio.run(_streams(a.home, b.node_id))
            time.sleep(0.1)
        assert seen >= 1
        # Kill the direct path: the open session breaks with it ...
        _kill_connections(asyncio.run(_direct_port(a.home)))
        assert session.wait(timeout=20) != 0
    finally:
        if session.poll() is None:
            session.kill()
        session.wait(timeout=10)
        if session.stderr is not None:
            session.stderr.close()
    # ... and the next login goes to the container's address (b's own ssh, no node between).
    asyncio.run(_wait_path(b.home, a.node_id, "public", 5.0))
    owners, done = _owner_while(b.home, port, ["container", "ssh", cid, "--", "sleep 1; true"])
    assert done.returncode == 0, done.stderr
    assert owners
    assert a.process.pid not in owners
    assert b.process.pid not in owners
    # After [direct] retry (2 s) the next call to a makes a new path, and logins take it.
    time.sleep(2.1)
    asyncio.run(_sync(b.home))
    asyncio.run(_wait_path(b.home, a.node_id, "direct", 10.0))
    owners, done = _owner_while(b.home, port, ["container", "ssh", cid, "--", "sleep 1; true"])
    assert done.returncode == 0, done.stderr
    assert owners == {a.process.pid}, (owners, a.process.pid)


def test_a_jobs_login_from_the_node_takes_the_direct_path(
    pair: tuple[NodeProcess, NodeProcess, dict[str, Any]],
) -> None:
    a, b, _ = pair
    asyncio.run(_wait_path(b.home, a.node_id, "direct", 10.0))
    env = {**os.environ, "P2PRC_HOME": str(b.home)}
    where = a.api.removeprefix("http://")
    command = [sys.executable, "-m", "p2prc", "run", "--peer", where, "--", "sh", "-c"]
    job = subprocess.Popen(
        [*command, "sleep 4; echo ran"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = 0
        deadline = time.monotonic() + 90
        while not port and time.monotonic() < deadline and job.poll() is None:
            listed = json.loads(p2prc(b.home, "--json", "jobs", "list").stdout)
            views = [p["container"] for j in listed for p in j["placements"] if p["container"]]
            port = views[0]["ssh"]["port"] if views else 0
            time.sleep(0.2)
        assert port, "the job got no container"
        owners: set[int] = set()
        while job.poll() is None and time.monotonic() < deadline:
            owners |= _ssh_owners(port)
            time.sleep(0.05)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate(timeout=10)
    assert job.returncode == 0, err
    assert "ran" in out + err
    # b's node logs in to the rank's container: over the path, a's process reaches sshd.
    assert owners == {a.process.pid}, (owners, a.process.pid, b.process.pid)
