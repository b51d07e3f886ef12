"""``p2prc container cp`` against a real container on a real node (Docker)."""

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient, Home
from p2prc.config import RelayConfig
from p2prc.containers.copy import download, upload
from p2prc.models import CreateContainer
from tests.integration.conftest import NodeProcess, close, p2prc, start_node

pytestmark = pytest.mark.docker


@pytest.fixture
def container(tmp_path: Path, docker_client: Any) -> Iterator[tuple[NodeProcess, str]]:
    """A node on loopback and a container it created on itself."""
    home = tmp_path / "node"
    node = start_node(home, "--port", "0", "--host", "127.0.0.1")
    address = node.api.removeprefix("http://")
    try:
        created = json.loads(p2prc(home, "--json", "container", "create", address).stdout)
        yield node, created["id"]
        p2prc(home, "container", "rm", created["id"], check=False)
    finally:
        close(node)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_big_file_in_and_out_byte_exact(tmp_path: Path, container: tuple[NodeProcess, str]) -> None:
    node, cid = container
    big = tmp_path / "big.bin"
    with big.open("wb") as file:
        for _ in range(64):
            file.write(os.urandom(1 << 20))
    sent = json.loads(p2prc(node.home, "--json", "container", "cp", str(big), f"{cid[:8]}:").stdout)
    assert sent["files"] == 1
    assert sent["bytes"] == 64 << 20
    assert sent["target"].endswith("/big.bin")
    inside = p2prc(node.home, "container", "ssh", cid, "--", "sha256sum", "big.bin").stdout
    assert inside.split()[0] == _digest(big)
    back = tmp_path / "back.bin"
    p2prc(node.home, "--json", "container", "cp", f"{cid}:big.bin", str(back))
    assert back.stat().st_size == 64 << 20
    assert _digest(back) == _digest(big)


def test_directory_in_and_out(tmp_path: Path, container: tuple[NodeProcess, str]) -> None:
    node, cid = container
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "a" / "b" / "deep.txt").write_text("deep\n")
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "a" / "to-top").symlink_to("../top.txt")
    p2prc(node.home, "container", "cp", str(tree), f"{cid}:")
    ran = p2prc(node.home, "container", "ssh", cid, "--", "tree/run.sh").stdout
    assert ran.strip() == "ran"
    listed = p2prc(node.home, "container", "ssh", cid, "--", "cat", "tree/a/to-top").stdout
    assert listed == "top\n"
    into = tmp_path / "down"
    into.mkdir()
    result = json.loads(
        p2prc(node.home, "--json", "container", "cp", f"{cid}:tree", str(into)).stdout
    )
    assert (result["files"], result["dirs"], result["links"]) == (3, 3, 1)
    back = into / "tree"
    assert (back / "a" / "b" / "deep.txt").read_text() == "deep\n"
    assert os.readlink(back / "a" / "to-top") == "../top.txt"
    assert os.access(back / "run.sh", os.X_OK)


def test_paths_out_of_reach_are_one_line_errors(
    tmp_path: Path, container: tuple[NodeProcess, str]
) -> None:
    node, cid = container
    small = tmp_path / "small.txt"
    small.write_text("x\n")
    cases = [
        ((str(small), f"{cid}:/root/small.txt"), "InvalidRequest:", "permission denied"),
        ((f"{cid}:/etc/shadow", str(tmp_path / "s")), "InvalidRequest:", "permission denied"),
        ((f"{cid}:/no/such/file", str(tmp_path / "n")), "NotFound:", "no such file"),
        ((str(small), str(tmp_path / "x")), "InvalidRequest:", "exactly one of SRC and DST"),
    ]
    for args, kind, words in cases:
        failed = p2prc(node.home, "container", "cp", *args, check=False)
        assert failed.returncode == 1, failed
        # Progress lines come first; the error is the one last line.
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith(kind), failed.stderr
        assert words in last, failed.stderr
        assert "Traceback" not in failed.stderr
    # A link that leaves the copied tree is refused before anything is written.
    p2prc(node.home, "container", "ssh", cid, "--", "mkdir -p evil && ln -s /etc evil/out")
    refused = p2prc(node.home, "container", "cp", f"{cid}:evil", str(tmp_path), check=False)
    assert refused.returncode == 1
    assert "outside" in refused.stderr
    assert "refusing" in refused.stderr
    assert not (tmp_path / "evil").exists()


async def test_big_file_through_a_relay(node_factory: Any, tmp_path: Path) -> None:
    """A container on a node behind NAT (configured), reached at the relay's public port."""
    relay_config = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    async with node_factory("relay", relay=relay_config, behind_nat=False) as relay:
        boot = [relay.api_url.removeprefix("http://")]
        use = RelayConfig(use=[relay.identity.node_id])
        async with (
            node_factory("home", behind_nat=True, bootstrap=boot, relay=use) as home,
            AsyncClient(home=tmp_path / "relay") as client,
        ):
            api = ""
            for _ in range(100):
                found = [v for v in await client.peers() if v.node_id == home.identity.node_id]
                if found and found[0].public_api:
                    api = found[0].api
                    break
                await asyncio.sleep(0.1)
            assert api, "the NAT'd node's API never appeared on the relay"
            view = await client.create_on_peer(api, CreateContainer(name="cp-relay"))
            hosted = [v for v in home.container_store.hosted() if v.id == view.id]
            assert view.ssh.port != hosted[0].ssh.port  # the relay's port, not Docker's
            big = tmp_path / "big.bin"
            with big.open("wb") as file:
                for _ in range(64):
                    file.write(os.urandom(1 << 20))
            key = Home(tmp_path / "relay").identity_key
            sent = await upload(view, key, big, "")
            assert sent.bytes == 64 << 20
            back = tmp_path / "back.bin"
            await download(view, key, "big.bin", back)
            assert _digest(back) == _digest(big)
            await client.remove_tracked(view.id)
