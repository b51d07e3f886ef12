"""The Python example in docs/library.md runs for real against a peer node."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import p2prc, start_node

pytestmark = pytest.mark.docker

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"


def test_library_script(tmp_path: Path, docker_client: Any) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code is not None
    peer_home = tmp_path / "peer"
    p2prc(peer_home, "config", "set", "trust.mode", "open")
    peer = start_node(peer_home, "--host", "127.0.0.1", "--port", "0")
    address = peer.api.removeprefix("http://")
    script = code.group(1).replace("192.0.2.7:8088", address)
    script = script.replace("/tmp/my-app-node", str(tmp_path / "app"))
    script = script.replace(
        'NodeConfig(name="my-app")', 'NodeConfig(name="my-app", host="127.0.0.1", port=18655)'
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "ssh -p" in result.stdout
        assert "reachable at 127.0.0.1:18655" in result.stdout
        assert "'alive'" in result.stdout
        assert (
            docker_client.containers.list(all=True, filters={"label": f"p2prc.node={peer.node_id}"})
            == []
        )
    finally:
        peer.stop()
        for stream in (peer.process.stdout, peer.process.stderr):
            if stream is not None:
                stream.close()
