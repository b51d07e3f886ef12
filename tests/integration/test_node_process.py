"""A real ``p2prc start`` process, queried by the real CLI and the client library."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import p2prc
from tests.integration.conftest import NodeProcess, free_port, start_node
from tests.integration.conftest import p2prc as run_cli


def test_status_and_specs_from_cli(running_node: NodeProcess) -> None:
    status = json.loads(run_cli(running_node.home, "--json", "status").stdout)
    assert status["node_id"] == running_node.node_id
    assert status["api"] == running_node.api
    assert {"name", "version"} <= set(status)
    assert status["health"]["status"] == "ok"
    assert {"api", "gossip", "containers"} <= set(status["health"]["components"])
    specs = json.loads(run_cli(running_node.home, "--json", "specs").stdout)
    assert {"cpu", "memory", "gpus"} <= set(specs)
    address = running_node.api.removeprefix("http://")
    legacy = json.loads(run_cli(running_node.home, "--json", "--specs", address).stdout)
    assert legacy["cpu"]["cores"] == specs["cpu"]["cores"]
    human = run_cli(running_node.home, "status").stdout
    assert running_node.node_id in human
    assert "health" in human


def test_client_library(running_node: NodeProcess) -> None:
    with p2prc.Client(home=running_node.home) as client:
        assert client.status().node_id == running_node.node_id
        assert client.specs().memory.total > 0
        assert client.whoami().role == "owner"
    other = Path(str(running_node.home) + "-stranger")
    p2prc.init_home(p2prc.Home(other))
    with (
        p2prc.Client(running_node.api, home=other) as client,
        pytest.raises(p2prc.NotTrusted),
    ):
        client.whoami()
    with p2prc.Client(running_node.api, home=other) as client, pytest.raises(p2prc.OwnerOnly):
        client.shutdown()
    assert running_node.process.poll() is None


async def test_async_client(running_node: NodeProcess) -> None:
    async with p2prc.AsyncClient(running_node.api, home=running_node.home) as client:
        assert (await client.health()).ok
        assert (await client.status()).node_id == running_node.node_id


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_5s(running_node: NodeProcess, sig: int) -> None:
    assert running_node.stop(sig) < 5
    assert running_node.process.returncode == 0
    assert not (running_node.home / "node.json").exists()


def test_cli_stop(running_node: NodeProcess) -> None:
    assert json.loads(run_cli(running_node.home, "--json", "stop").stdout) == {"stopped": True}
    assert running_node.process.wait(timeout=10) == 0
    result = run_cli(running_node.home, "status", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("NodeNotRunning:")


def test_second_node_on_same_home_is_refused(running_node: NodeProcess) -> None:
    result = run_cli(running_node.home, "start", "--host", "127.0.0.1", "--port", "0", check=False)
    assert result.returncode == 1
    assert "NodeAlreadyRunning" in result.stderr
    assert json.loads(run_cli(running_node.home, "--json", "status").stdout)["node_id"]


def test_port_in_use(running_node: NodeProcess, tmp_path: Path) -> None:
    port = running_node.api.rsplit(":", 1)[1]
    result = run_cli(
        tmp_path / "other", "start", "--host", "127.0.0.1", "--port", port, check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("AddressInUse:")


def test_legacy_server_flag_uses_config_port(tmp_path: Path) -> None:
    home = tmp_path / "legacy"
    port = free_port()
    run_cli(home, "config", "set", "port", str(port))
    run_cli(home, "config", "set", "host", "127.0.0.1")
    node = start_node(home, command=("-s",))
    try:
        assert node.api.endswith(f":{port}")
        status = json.loads(run_cli(home, "--json", "status").stdout)
        assert status["port"] == port
    finally:
        node.stop()
        for stream in (node.process.stdout, node.process.stderr):
            if stream is not None:
                stream.close()


def test_restart_keeps_identity(node_factory: object) -> None:
    assert callable(node_factory)
    first = node_factory("same")
    first.stop()
    second = node_factory("same")
    assert second.node_id == first.node_id


def test_plugin_pull_of_a_relative_directory_without_git(
    node_factory: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stock Debian 12 has no git: a local directory is copied, relative to the CLI's
    # working directory (not the node's).
    no_git = tmp_path / "bin"
    no_git.mkdir()
    monkeypatch.setenv("PATH", str(no_git))
    assert callable(node_factory)
    node = node_factory("plain")
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "p2prc", "--json", "plugin", "pull", "./http-share"],
        env={**os.environ, "P2PRC_HOME": str(node.home)},
        cwd=repo / "plugins",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "http-share"
    url = run_cli(node.home, "plugin", "pull", "https://example.invalid/x.git", check=False)
    assert url.returncode == 1
    assert "git is not installed; it is needed to pull" in url.stderr
