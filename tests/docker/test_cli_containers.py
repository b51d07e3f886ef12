"""The real CLI against a real node process on Docker, with the original flags."""

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import p2prc, start_node

pytestmark = pytest.mark.docker


def test_legacy_flags_end_to_end(tmp_path: Path, docker_client: Any) -> None:
    home = tmp_path / "node"
    node = start_node(home, "--port", "0", "--host", "127.0.0.1")
    address = node.api.removeprefix("http://")
    try:
        created = json.loads(
            p2prc(home, "--json", "--touch", address, "-p", "2", "--cn", "cli").stdout
        )
        assert {"id", "peer", "ssh", "ports", "gpu"} <= set(created)
        assert created["name"] == "p2prc-cli"
        assert [p["container_port"] for p in created["ports"]] == [8000, 8001]
        tracked = json.loads(p2prc(home, "--json", "--tc").stdout)
        assert [item["container"]["id"] for item in tracked] == [created["id"]]
        login = p2prc(
            home, "container", "ssh", created["id"][:6], "--", "echo", "hello-from", "$HOSTNAME"
        )
        assert login.stdout.split()[0:1] == ["hello-from"]
        offered = json.loads(p2prc(home, "--json", "--vi", address).stdout)
        assert "p2prc/sshd:latest" in offered["available"]
        missing = p2prc(home, "--rm", address, check=False)
        assert missing.returncode == 1
        assert missing.stderr.startswith("InvalidRequest: provide the container id")
        assert p2prc(home, "--rm", address, "--id", created["id"]).returncode == 0
        assert json.loads(p2prc(home, "--json", "--tc").stdout) == []
        assert docker_client.containers.list(all=True, filters={"id": created["id"]}) == []
    finally:
        node.stop()
        for stream in (node.process.stdout, node.process.stderr):
            if stream is not None:
                stream.close()


def test_offered_custom_image(tmp_path: Path, docker_client: Any) -> None:
    context = tmp_path / "image"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM p2prc/sshd:latest\nRUN echo render-worker > /etc/p2prc-role\n"
    )
    home = tmp_path / "node"
    tag = "p2prc-test/render:1"
    p2prc(home, "images", "build", "--dockerfile", str(context), "--tag", tag)
    node = start_node(home, "--port", "0", "--host", "127.0.0.1")
    address = node.api.removeprefix("http://")
    try:
        created = json.loads(
            p2prc(home, "--json", "container", "create", address, "--image", tag).stdout
        )
        role = p2prc(home, "container", "ssh", created["id"], "--", "cat", "/etc/p2prc-role")
        assert role.stdout.strip() == "render-worker"
        refused = p2prc(
            home, "container", "create", address, "--image", "busybox:latest", check=False
        )
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith("ImageNotFound:")
        p2prc(home, "container", "rm", created["id"])
    finally:
        node.stop()
        for stream in (node.process.stdout, node.process.stderr):
            if stream is not None:
                stream.close()
        docker_client.images.remove(tag, force=True)
