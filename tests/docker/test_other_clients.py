"""The README's Python example and the TypeScript client, against real nodes on Docker."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import p2prc
from tests.integration.conftest import close, start_node
from tests.integration.conftest import p2prc as run_cli

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "typescript"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


@pytest.mark.timeout(300)
def test_readme_dask_example(tmp_path: Path, docker_client: Any) -> None:
    """The README's P2PRCCluster example, as written, on a node of its own."""
    pytest.importorskip("distributed")
    [script] = [b for b in _python_blocks() if "P2PRCCluster" in b]
    home = tmp_path / "me"
    mine = start_node(home, "--host", "127.0.0.1", "--port", "0")
    try:
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", script],
            env={**os.environ, "P2PRC_HOME": str(home)},
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert abs(float(result.stdout.split()[0]) - 0.5) < 0.01
        mine_only = {"label": f"p2prc.node={mine.node_id}"}
        left = docker_client.containers.list(all=True, filters=mine_only)
        assert left == [], "the cluster's containers outlived its close()"
    finally:
        close(mine)


def test_readme_python_example(tmp_path: Path, docker_client: Any) -> None:
    blocks = [b for b in _python_blocks() if "192.0.2.7:8088" in b]  # "From Python"
    assert len(blocks) == 1
    peer_home, home = tmp_path / "peer", tmp_path / "me"
    peer = start_node(peer_home, "--host", "127.0.0.1", "--port", "0")
    run_cli(
        peer_home,
        "config",
        "set",
        "trust.allow",
        p2prc.init_home(p2prc.Home(home))[1].openssh_public_key(),
    )
    close(peer)
    peer = start_node(peer_home, "--host", "127.0.0.1", "--port", "0")
    mine = start_node(home, "--host", "127.0.0.1", "--port", "0")
    script = blocks[0].replace("192.0.2.7:8088", peer.api.removeprefix("http://"))
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "P2PRC_HOME": str(home)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert mine.node_id in result.stdout
    finally:
        close(peer)
        close(mine)


def test_typescript_client_creates_a_container(tmp_path: Path, docker_client: Any) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    if not (CLIENT / "node_modules" / ".bin" / "tsc").exists():
        installed = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                                   cwd=CLIENT, capture_output=True, text=True, timeout=300,
                                   check=False)  # fmt: skip
        assert installed.returncode == 0, installed.stderr
    subprocess.run(["npm", "run", "--silent", "build"], cwd=CLIENT, check=True, timeout=300)
    node = start_node(tmp_path / "node", "--host", "127.0.0.1", "--port", "0")
    stranger = tmp_path / "stranger"
    p2prc.init_home(p2prc.Home(stranger))
    env = {**os.environ, "P2PRC_API": node.api, "P2PRC_HOME": str(node.home),
           "P2PRC_STRANGER_HOME": str(stranger), "P2PRC_CREATE": "1"}  # fmt: skip
    try:
        result = subprocess.run(
            ["node", "test/smoke.mjs"], cwd=CLIENT, env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "container created and removed" in result.stdout
    finally:
        close(node)
