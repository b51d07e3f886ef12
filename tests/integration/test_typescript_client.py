"""The TypeScript client, built with tsc, against a real node process."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import p2prc
from tests.integration.conftest import NodeProcess

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def _npm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npm", *args], cwd=CLIENT, capture_output=True, text=True, timeout=300, check=False
    )


def test_typescript_client(running_node: NodeProcess, tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    if not (CLIENT / "node_modules" / ".bin" / "tsc").exists():
        installed = _npm("install", "--no-audit", "--no-fund", "--silent")
        assert installed.returncode == 0, installed.stderr
    built = _npm("run", "--silent", "build")
    assert built.returncode == 0, built.stdout + built.stderr
    stranger = tmp_path / "stranger"
    p2prc.init_home(p2prc.Home(stranger))
    env = {
        **os.environ,
        "P2PRC_API": running_node.api,
        "P2PRC_HOME": str(running_node.home),
        "P2PRC_STRANGER_HOME": str(stranger),
    }
    result = subprocess.run(
        ["node", "test/smoke.mjs"], cwd=CLIENT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 checks passed" in result.stdout
