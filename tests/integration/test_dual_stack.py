"""Two real nodes on their default host (0.0.0.0) on a machine with IPv4 and IPv6 addresses.

Every other test node listens on 127.0.0.1, where the records hold one IPv4 address. On
the default host a record holds every address of the machine, IPv6 included, which once
made the gossip socket bind ``::`` and fail on its first send to an IPv4 peer (uvloop:
"socket family mismatch"): no failure detection after that, and SIGTERM exited 1.
"""

from __future__ import annotations

import ipaddress
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from p2prc.specs import own_addresses
from tests.integration.conftest import NodeProcess, close, p2prc, start_node

pytestmark = pytest.mark.slow


def _families() -> set[int]:
    versions: set[int] = set()
    for address in own_addresses():
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback and not ip.is_link_local:
            versions.add(ip.version)
    return versions


if _families() != {4, 6}:
    pytest.skip("this machine has no IPv4 and IPv6 addresses both", allow_module_level=True)


def _states(node: NodeProcess) -> dict[str, str]:
    views = httpx.get(f"{node.api}/peers", timeout=5).json()
    return {view["node_id"]: view["state"] for view in views if not view["me"]}


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not reached in {seconds:.0f} s: {what}")


def _stderr(node: NodeProcess) -> str:
    return node.log()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Node a, and node b that joined it; both on the default host with any free port."""
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        # No multicast off this machine; gossip itself stays on the machine's own addresses.
        p2prc(home, "config", "set", "gossip.lan_discovery", "false")
    nodes = [start_node(homes[0], "--port", "0")]
    try:
        p2prc(homes[1], "config", "set", "bootstrap", nodes[0].api.removeprefix("http://"))
        nodes.append(start_node(homes[1], "--port", "0"))
        a, b = nodes
        _wait(lambda: _states(a)[b.node_id] == "alive", 30, "a sees b alive")
        _wait(lambda: _states(b)[a.node_id] == "alive", 30, "b sees a alive")
        yield nodes
    finally:
        for node in nodes:
            close(node)


def _assert_clean_exit(node: NodeProcess) -> None:
    assert node.stop(signal.SIGTERM) < 15
    log = _stderr(node)
    assert node.process.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (node.home / "node.json").exists()


def test_killed_node_is_found_dead_and_sigterm_exits_0(pair: list[NodeProcess]) -> None:
    a, b = pair
    both = {4, 6} <= {ipaddress.ip_address(x).version for x in _addresses(a, b.node_id)}
    assert both, "b's record should list the machine's IPv4 and IPv6 addresses"
    b.process.send_signal(signal.SIGKILL)
    b.process.wait(timeout=10)
    _wait(lambda: _states(a)[b.node_id] == "dead", 60, "a finds killed b dead")
    assert a.process.poll() is None
    _assert_clean_exit(a)


def test_sigterm_with_a_live_peer_exits_0_and_the_peer_sees_it_leave(
    pair: list[NodeProcess],
) -> None:
    a, b = pair
    _assert_clean_exit(b)
    _wait(lambda: _states(a)[b.node_id] in ("left", "dead"), 60, "a sees b gone")
    assert a.process.poll() is None
    _assert_clean_exit(a)


def _addresses(node: NodeProcess, node_id: str) -> list[str]:
    views = httpx.get(f"{node.api}/peers", timeout=5).json()
    return next(list(view["addresses"]) for view in views if view["node_id"] == node_id)
