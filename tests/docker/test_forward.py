"""``p2prc forward`` against a real container on a real node (Docker): an HTTP server started
in the container over SSH, fetched through the forwarded local port."""

from __future__ import annotations

import asyncio
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

import httpx
import pytest

from p2prc import AsyncClient, Home
from p2prc.config import RelayConfig
from p2prc.containers.forward import forward
from p2prc.containers.sftp import login
from p2prc.models import ContainerView, CreateContainer
from tests.docker.test_container_cp import _digest, container
from tests.integration.conftest import NodeProcess, p2prc

pytestmark = pytest.mark.docker

__all__ = ["container"]  # test_container_cp's fixture: a node and a container it created

_BLOB = 32 << 20
_WEB = 8000


@pytest.fixture
def serving(container: tuple[NodeProcess, str]) -> tuple[NodeProcess, str, str]:
    """The container serving ``www/blob`` (random bytes) on 127.0.0.1:8000, and its digest."""
    node, cid = container
    digest = p2prc(node.home, "container", "ssh", cid, "--", _start_server()).stdout.split()[0]
    return node, cid, digest


def _start_server() -> str:
    """A shell line: write ``www/blob``, serve ``www`` detached, print the blob's digest."""
    return (
        f"mkdir -p www && head -c {_BLOB} /dev/urandom > www/blob && "
        f"(setsid python3 -m http.server {_WEB} --bind 127.0.0.1 --directory www "
        ">/dev/null 2>&1 < /dev/null &) && sha256sum www/blob"
    )


@pytest.fixture
def forwarding(serving: tuple[NodeProcess, str, str]) -> Iterator[tuple[Any, ...]]:
    """``p2prc --json forward CID 0:8000`` running, its first line read."""
    node, cid, digest = serving
    process = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "--json", "forward", cid[:8], f"0:{_WEB}"],
        env={**os.environ, "P2PRC_HOME": str(node.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.communicate(timeout=15)
        yield node, cid, digest, process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=15)


def _fetch(url: str) -> bytes:
    for _ in range(100):  # the server may still be starting inside the container
        try:
            answer = httpx.get(url, timeout=30)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        answer.raise_for_status()
        return answer.content
    raise AssertionError(f"{url} never answered")


def test_a_file_over_http_through_the_forwarded_port_byte_exact(
    tmp_path: Path, forwarding: tuple[Any, ...]
) -> None:
    _node, cid, digest, process, line = forwarding
    assert line["remote"].endswith(f":{_WEB}")
    assert line["container"] == cid
    host, _, port = line["local"].rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) == line["local_port"] > 0
    blob = tmp_path / "blob"
    blob.write_bytes(_fetch(f"http://127.0.0.1:{port}/blob"))
    assert blob.stat().st_size == _BLOB
    assert _digest(blob) == digest
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert "stopped forwarding" in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/blob", timeout=5)


def test_a_lost_container_ends_the_command_with_one_line(
    docker_client: Any, forwarding: tuple[Any, ...]
) -> None:
    _node, cid, _digest, process, line = forwarding
    assert _fetch(f"http://{line['local']}/")  # the listing: it works before
    docker_client.containers.get(cid).kill()
    _, stderr = process.communicate(timeout=90)  # keepalive: 4 x 15 s at worst
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("PeerUnreachable:"), stderr
    assert "dropped" in last
    assert "Traceback" not in stderr


def test_a_port_in_use_and_an_unknown_container(serving: tuple[NodeProcess, str, str]) -> None:
    node, cid, _ = serving
    unknown = p2prc(node.home, "forward", "no-such-container", "80", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().startswith("ContainerNotFound:"), unknown.stderr
    assert "no container or peer named" in unknown.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = p2prc(node.home, "forward", cid, str(_WEB), "--local", str(port), check=False)
    assert busy.returncode == 1
    assert (
        busy.stderr.strip() == f"AddressInUse: 127.0.0.1:{port} is already in use on this machine"
    )


@pytest.fixture
async def relayed(node_factory: Any, tmp_path: Path) -> AsyncIterator[tuple[ContainerView, Path]]:
    """A container on a node behind NAT (configured) that the relay node created: its SSH
    endpoint is the relay's public port; and the relay node's key."""
    relay_config = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    async with node_factory("relay", relay=relay_config, behind_nat=False) as relay:
        boot = [relay.api_url.removeprefix("http://")]
        use = RelayConfig(use=[relay.identity.node_id])
        async with (
            node_factory("home", behind_nat=True, bootstrap=boot, relay=use) as home,
            AsyncClient(home=tmp_path / "relay") as client,
        ):
            for _ in range(100):
                if api := await _public_api(client, home.identity.node_id):
                    break
                await asyncio.sleep(0.1)
            assert api, "the NAT'd node's API never appeared on the relay"
            view = await client.create_on_peer(api, CreateContainer(name="fwd-relay"))
            hosted = [v for v in home.container_store.hosted() if v.id == view.id]
            assert view.ssh.port != hosted[0].ssh.port  # the relay's port, not Docker's
            yield view, Home(tmp_path / "relay").identity_key
            await client.remove_tracked(view.id)


async def _public_api(client: AsyncClient, node_id: str) -> str:
    """The peer's API, once the relay has given it a public address."""
    found = [v for v in await client.peers() if v.node_id == node_id]
    return found[0].api if found and found[0].public_api else ""


async def test_through_a_relay(relayed: tuple[ContainerView, Path], tmp_path: Path) -> None:
    view, key = relayed
    conn = await login(view, key)
    async with conn:
        started = await conn.run(_start_server(), check=True)
    digest = str(started.stdout).split()[0]
    async with forward(view, _WEB, key_file=key) as fwd, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{fwd.local_port}/blob"
        async with asyncio.timeout(20):
            while True:
                try:
                    answer = await http.get(url, timeout=30)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
    assert answer.status_code == 200
    assert hashlib.sha256(answer.content).hexdigest() == digest
