"""``p2prc forward`` against a real container on a real node (Docker): an HTTP server started
in the container over SSH, fetched through the forwarded local port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    start = (
        f"mkdir -p www && head -c {_BLOB} /dev/urandom > www/blob && "
        f"(setsid python3 -m http.server {_WEB} --bind 127.0.0.1 --directory www "
        ">/dev/null 2>&1 < /dev/null &) && sha256sum www/blob"
    )
    digest = p2prc(node.home, "container", "ssh", cid, "--", start).stdout.split()[0]
    return node, cid, digest


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
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = p2prc(node.home, "forward", cid, str(_WEB), "--local", str(port), check=False)
    assert busy.returncode == 1
    assert (
        busy.stderr.strip() == f"AddressInUse: 127.0.0.1:{port} is already in use on this machine"
    )
