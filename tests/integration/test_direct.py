"""Direct paths between real node processes on loopback: one call makes one (GET /paths says
direct within 2 s), traffic goes over it, killing its connection mid-transfer breaks that
transfer only, new connections go the usual way, and a new attempt brings it back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient, Home, NodeConfig, TrustConfig, init_home
from p2prc.config import DirectConfig, GossipConfig, RelayConfig, join_address, split_address
from tests.integration.conftest import NodeProcess, close, free_port, p2prc, round_trip, start_node


def _home(path: Path, name: str, **config: Any) -> Path:
    defaults: dict[str, Any] = {
        "trust": TrustConfig(mode="open"),
        "behind_nat": False,
        "gossip": GossipConfig(advertise=["127.0.0.1"], lan_discovery=False),
        "direct": DirectConfig(retry=2.0),
    }
    init_home(Home(path / name), NodeConfig(name=name, **{**defaults, **config}))
    return path / name


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        close(node)


async def _paths(home: Path) -> list[dict[str, Any]]:
    async with AsyncClient(home=home) as client:
        response = await client._request("GET", "/paths", signed=True)
    items = response.json()
    assert isinstance(items, list)
    return items


async def _path_to(home: Path, node_id: str) -> dict[str, Any] | None:
    return next((p for p in await _paths(home) if p["node_id"] == node_id), None)


async def _wait_path(home: Path, node_id: str, kind: str, within: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        path = await _path_to(home, node_id)
        if path is not None and path["kind"] == kind:
            return path
        if loop.time() > deadline:
            raise AssertionError(f"no {kind} path to {node_id} within {within} s: {path}")
        await asyncio.sleep(0.05)


async def _wait_member(home: Path, node_id: str) -> None:
    """Until ``node_id`` is an alive member whose record names its direct port."""
    async with AsyncClient(home=home) as client:
        for _ in range(200):
            views = await client.peers()
            if any(v.node_id == node_id and v.state == "alive" for v in views):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{node_id} never became an alive member")


@contextlib.asynccontextmanager
async def _echo() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def _forward(home: Path, peer: str, port: int, bind: str = "127.0.0.1") -> AsyncIterator[int]:
    """``POST /paths/forward`` on ``home``'s node while the block runs: the local port
    (its ``local`` is ``bind:port``, an IPv6 ``bind`` in brackets)."""
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        async with AsyncClient(home=home) as client:
            body = {"peer": peer, "port": port, "bind": bind}
            async for line in client.post_ndjson("/paths/forward", body, unbounded=True):
                event = json.loads(line)
                if event["event"] == "listening" and not listening.done():
                    _, local = split_address(event["local"])
                    assert event["local"] == join_address(bind, local)
                    listening.set_result(local)

    task = asyncio.ensure_future(run())
    try:
        yield await asyncio.wait_for(asyncio.shield(listening), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _echoed(port: int, payload: bytes) -> bytes:
    return await round_trip(port, payload)


def _kill_connections(port: int) -> None:
    """Kill the TCP connections to or from ``port`` (a direct path), as a reset would."""
    subprocess.run(
        ["ss", "-K", "(", "dport", "=", f":{port}", "or", "sport", "=", f":{port}", ")"],
        check=True,
        capture_output=True,
    )


async def test_a_direct_path_carries_calls_and_falls_back_when_killed(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a_home = _home(tmp_path, "a")
    nodes.append(start_node(a_home, "--host", "127.0.0.1", "--port", "0"))
    a = nodes[0]
    boot = a.api.removeprefix("http://")
    nodes.append(start_node(_home(tmp_path, "b", bootstrap=[boot]), "--port", "0"))
    b = nodes[1]  # on the default host, 0.0.0.0: its direct port listens dual stack
    b_home = b.home
    await _wait_member(b_home, a.node_id)
    await _wait_member(a_home, b.node_id)

    async with _echo() as echo_port, AsyncClient(home=a_home) as a_client:
        await a_client.map_port(echo_port)  # a publishes it: b may reach it over the path
        # One call (an exchange of tables) makes the direct path within 2 s.
        async with AsyncClient(home=b_home) as b_client:
            started = time.monotonic()
            await b_client.sync_peers()
        up = await _wait_path(b_home, a.node_id, "direct", 2.0)
        assert time.monotonic() - started < 2.0
        assert up["direct_rtt_ms"] is not None
        assert up["attempts"] >= 1 or (await _path_to(a_home, b.node_id) or {})["kind"] == "direct"

        async with _forward(b_home, a.node_id, echo_port) as local:
            payload = os.urandom(3 * 1024 * 1024)
            assert await _echoed(local, payload) == payload
            # The stream went over the direct path: a sees it while one is open.
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            on_a = await _wait_path(a_home, b.node_id, "direct", 2.0)
            assert on_a["streams"] >= 1
            # Kill the direct connection mid-transfer: this transfer breaks ...
            direct_port = await _direct_port(a_home)
            writer.write(os.urandom(1024 * 1024))
            _kill_connections(direct_port)
            got = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
                    got += chunk
            assert len(got) < 4 + 1024 * 1024  # ended early: the stream broke like a reset
            writer.close()
            # ... new connections go the usual way at once (a is public: its own address) ...
            after = await _wait_path(b_home, a.node_id, "public", 3.0)
            assert after["last_error"]
            again = os.urandom(200_000)
            assert hashlib.sha256(await _echoed(local, again)).digest() == (
                hashlib.sha256(again).digest()
            )
            # ... and a new attempt, after [direct] retry (2 s), brings the direct path back.
            await asyncio.sleep(2.1)
            async with AsyncClient(home=b_home) as b_client:
                await b_client.sync_peers()
            back = await _wait_path(b_home, a.node_id, "direct", 3.0)
            assert back["since"] > up["since"]
            assert await _echoed(local, b"over the new path") == b"over the new path"

        # A port a neither publishes nor hosts for b is refused over the path: closed at once.
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            async with _forward(b_home, a.node_id, unused.getsockname()[1]) as refused:
                assert await _refused(refused)

        # On IPv6 loopback: the local address in brackets, the bytes through.
        async with _forward(b_home, a.node_id, echo_port, bind="::1") as local6:
            reader, writer = await asyncio.open_connection("::1", local6)
            writer.write(b"over ipv6")
            assert await reader.readexactly(9) == b"over ipv6"
            writer.close()

        # The command: p2prc forward PEER PORT --local LPORT, until SIGTERM.
        await _cli_forward(b_home, "a", echo_port)
        # status and peers list show the direct path and its round trip.
        status = json.loads(p2prc(b_home, "--json", "status").stdout)
        row = next(peer for peer in status["peers"] if peer["node_id"] == a.node_id)
        assert row["path"].startswith("direct")
        assert row["direct_rtt_ms"] is not None
        listed = json.loads(p2prc(b_home, "--json", "peers", "list").stdout)
        entry = next(item for item in listed if item.get("node_id") == a.node_id)
        assert entry["path"]["kind"] == "direct"


async def _refused(port: int) -> bool:
    """Whether a connection to ``port`` ends without one byte of answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with contextlib.suppress(OSError):
        writer.write(b"anyone there?")
        await writer.drain()
    try:
        got = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        got = b""
    writer.close()
    return got == b""


async def _listens(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _cli_forward(home: Path, peer: str, port: int) -> None:
    local = free_port()
    env = {**os.environ, "P2PRC_HOME": str(home)}
    command = [sys.executable, "-m", "p2prc", "--json", "forward", peer, str(port)]
    process = await asyncio.create_subprocess_exec(
        *command, "--local", str(local), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        shown = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        assert shown["local"] == f"127.0.0.1:{local}"
        assert shown["port"] == port
        payload = os.urandom(500_000)
        assert await _echoed(local, payload) == payload
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    for _ in range(50):  # the node closes the local port with the command
        if not await _listens(local):
            break
        await asyncio.sleep(0.1)
    assert not await _listens(local)


async def _direct_port(home: Path) -> int:
    """The direct port in the node's own signed record."""
    async with AsyncClient(home=home) as client:
        me = next(view for view in await client.peers() if view.me)
    return int(me.reserved["p2prc.direct"])


async def test_a_natted_node_dials_the_public_one(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    relay = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    nodes.append(
        start_node(_home(tmp_path, "pub", relay=relay), "--host", "127.0.0.1", "--port", "0")
    )
    pub = nodes[0]
    boot = pub.api.removeprefix("http://")
    natted = _home(
        tmp_path, "home", behind_nat=True, bootstrap=[boot], relay=RelayConfig(use=[pub.node_id])
    )
    nodes.append(start_node(natted, "--host", "127.0.0.1", "--port", "0"))
    home = nodes[1]
    await _wait_member(pub.home, home.node_id)
    # The public node cannot reach the NAT'd one: its attempt says so, calls use the relay.
    for _ in range(200):
        path = await _path_to(pub.home, home.node_id)
        if path is not None and path["kind"] == "relay":
            break
        await asyncio.sleep(0.1)
    assert path is not None
    assert path["via"] == pub.node_id
    # The NAT'd node calls: it dials the public one, and both sides use that path.
    async with AsyncClient(home=home.home) as client:
        await client.sync_peers()
    await _wait_path(home.home, pub.node_id, "direct", 2.0)
    await _wait_path(pub.home, home.node_id, "direct", 2.0)
