"""Two nodes on one LAN find each other by mDNS, with no bootstrap configured.

The LAN is a veth pair inside a network namespace this test creates and deletes;
its multicast never leaves the namespace. Everything runs through ``ip netns exec``.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ADDRESS = "203.0.113.1"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    name = f"p2prc-lan-{secrets.token_hex(3)}"
    if _ip("netns", "add", name).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    try:
        steps = [
            ("link", "set", "lo", "up"),
            ("link", "add", "lan0", "type", "veth", "peer", "name", "lan1"),
            ("addr", "add", f"{ADDRESS}/24", "dev", "lan0"),
            ("link", "set", "lan1", "up"),
            ("link", "set", "lan0", "up", "multicast", "on"),
            ("route", "add", "224.0.0.0/4", "dev", "lan0"),
        ]
        for step in steps:
            result = _ip("-n", name, *step)
            if result.returncode != 0:
                pytest.skip(f"cannot build the test LAN: {result.stderr.strip()}")
        yield name
    finally:
        _ip("netns", "del", name)


def _in_ns(namespace: str, home: Path, *args: str) -> list[str]:
    env_args = ["env", f"P2PRC_HOME={home}"]
    return ["ip", "netns", "exec", namespace, *env_args, sys.executable, "-m", "p2prc", *args]


def test_nodes_find_each_other_on_the_lan(namespace: str, tmp_path: Path) -> None:
    processes = []
    try:
        for index in (1, 2):
            home = tmp_path / f"n{index}"
            command = _in_ns(
                namespace, home, "start", "--host", "0.0.0.0", "--port", f"1820{index}"
            )
            processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while time.monotonic() < deadline:
            result = subprocess.run(
                _in_ns(namespace, tmp_path / "n1", "--json", "peers", "list"),
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if result.returncode == 0:
                views = json.loads(result.stdout)
                names = {v["api"] for v in views if not v["me"] and v["state"] == "alive"}
                if names:
                    break
            time.sleep(0.5)
        assert names == {f"http://{ADDRESS}:18202"}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
