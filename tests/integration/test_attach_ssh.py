"""The attach data path with real processes: nodes on loopback (one gateway on 0.0.0.0), a
real OpenSSH server as the attached host on 127.0.0.2, and the system ssh / scp.

``p2prc ssh NAME -- CMD`` from another node works end to end; a key the gateway does not
allow, a port that is not attached and a host whose key changed are refused; ``ssh
--config`` serves plain ``ssh -F`` and ``scp``; with two gateways, killing the first moves
the next ``p2prc ssh`` to the second; ``map-port PORT --remote NAME`` serves a web server
of the host to another node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc import FakeRuntime, Node
from p2prc.attach.models import AttachRequest
from p2prc.config import GossipConfig, Home, NodeConfig, RelayConfig, TrustConfig
from p2prc.node import init_home
from tests._sshd import SSHD, Sshd
from tests.integration.conftest import NodeProcess, close, p2prc, start_node, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(SSHD).exists(), reason="needs OpenSSH's sshd"),
]

BOARD = "127.0.0.2"  # the attached host's LAN address: not the nodes' own


@dataclass
class Net:
    a: NodeProcess  # the gateway, on loopback
    b: NodeProcess  # the client node
    c: NodeProcess  # another node, on 0.0.0.0: a stranger to the host, later a gateway
    sshd: Sshd


def _wait(condition: Callable[[], Any], seconds: float = 30.0) -> Any:
    return wait_until(condition, seconds)


def _gateways(node: NodeProcess, name: str) -> list[str]:
    hosts = {h["name"]: h for h in httpx.get(f"{node.api}/attached", timeout=5).json()}
    host = hosts.get(name)
    return [] if host is None else [g["node_id"] for g in host["gateways"]]


def _alive(node: NodeProcess) -> set[str]:
    views = httpx.get(f"{node.api}/peers", timeout=5).json()
    return {v["node_id"] for v in views if not v["me"] and v["state"] == "alive"}


def _key(node: NodeProcess) -> str:
    return (node.home / "identity" / "id_ed25519.pub").read_text()


def _fingerprint(node: NodeProcess) -> str:
    """How sshd logs a login with the node's key (``SHA256:...``)."""
    public = node.home / "identity" / "id_ed25519.pub"
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, timeout=30, check=True
    )
    return listed.stdout.split()[1]


def _run(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI with no terminal (ssh must never prompt)."""
    return subprocess.run(
        [sys.executable, "-m", "p2prc", "--home", str(home), *args],
        capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _configure(home: Path, name: str, bootstrap: list[str]) -> None:
    """A public node of its own name; no other nodes of this machine found on the LAN."""
    config = NodeConfig(
        name=name,
        behind_nat=False,
        bootstrap=bootstrap,
        gossip=GossipConfig(lan_discovery=False),
    )
    init_home(Home(home), config)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    started: list[NodeProcess] = []
    with Sshd(host=BOARD, extra_config="Subsystem sftp internal-sftp") as sshd:
        try:
            _configure(tmp_path / "gw-a", "gw-a", [])
            started.append(start_node(tmp_path / "gw-a", "--host", "127.0.0.1", "--port", "0"))
            root = [started[0].api.removeprefix("http://")]
            _configure(tmp_path / "node-b", "node-b", root)
            _configure(tmp_path / "node-c", "node-c", root)
            started.append(start_node(tmp_path / "node-b", "--host", "127.0.0.1", "--port", "0"))
            started.append(start_node(tmp_path / "node-c", "--port", "0"))  # 0.0.0.0
            ids = {node.node_id for node in started}
            for node in started:
                _wait(lambda node=node: _alive(node) >= ids - {node.node_id})  # type: ignore[misc]
            a, b, c = started
            for node in started:  # the host takes every node's key: the gateway decides
                sshd.authorize(_key(node))
            attach = ("attach", "board", "--host", BOARD, "--ssh-port", str(sshd.port))
            p2prc(a.home, *attach, "--port", "8080", "--allow", b.node_id)
            _wait(lambda: _gateways(b, "board") == [a.node_id])
            _wait(lambda: _gateways(c, "board") == [a.node_id])
            yield Net(a, b, c, sshd)
        finally:
            for node in started:
                close(node)


def test_ssh_from_another_node_runs_end_to_end(net: Net, tmp_path: Path) -> None:
    b = net.b
    result = _run(b.home, "ssh", "board", "--", "uname", "-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(platform.system())
    # The key it checked is the one the gateway pinned, under the host's alias.
    known = (b.home / "known_hosts").read_text()
    assert f"p2prc-attached-board {net.sshd.host_key}" in known.splitlines()
    # The host saw b's own key: the session is end to end, the gateway only forwards.
    logins = [line for line in net.sshd.log().splitlines() if "Accepted publickey" in line]
    assert any(_fingerprint(b) in line for line in logins)
    # The gateway itself reaches its host through its own listener (from node.json).
    local = json.loads((net.a.home / "node.json").read_text())["attach"]
    assert local.startswith("127.0.0.1:")
    own = _run(net.a.home, "ssh", "board", "--", "echo", "from-the-gateway")
    assert own.returncode == 0, own.stderr
    assert own.stdout == "from-the-gateway\n"
    # A command with arguments and its exit status come back as they are.
    status = _run(b.home, "ssh", "board", "--", "sh", "-c", "'echo out; echo err >&2; exit 3'")
    assert status.returncode == 3
    assert status.stdout == "out\n"
    assert "err" in status.stderr


def test_a_key_not_allowed_and_a_port_not_attached_are_refused(net: Net) -> None:
    b, c = net.b, net.c
    stranger = _run(c.home, "ssh", "board", "--", "true")
    assert stranger.returncode != 0
    assert "not allowed" in stranger.stderr
    assert _fingerprint(c) not in net.sshd.log()  # it never reached the host
    other = _run(b.home, "ssh", "--proxy", "board", "--port", "2222")
    assert other.returncode != 0
    assert "AttachRefused" in other.stderr
    assert "not allowed" in other.stderr
    # An attached port is forwarded, even when nothing answers there: a different answer.
    closed = _run(b.home, "ssh", "--proxy", "board", "--port", "8080")
    assert "does not answer" in closed.stderr


def test_ssh_config_serves_plain_ssh_and_scp(net: Net, tmp_path: Path) -> None:
    b = net.b
    result = _run(b.home, "ssh", "--config")
    assert result.returncode == 0, result.stderr
    config = tmp_path / "ssh_config"
    config.write_text(result.stdout)
    assert result.stdout.startswith("Host board\n")
    plain = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "board", "echo", "plain"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "plain\n"
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    target = tmp_path / "copied.bin"
    copy = subprocess.run(
        ["scp", "-F", str(config), "-o", "BatchMode=yes", str(payload), f"board:{target}"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert copy.returncode == 0, copy.stderr
    assert target.read_bytes() == payload.read_bytes()
    blocks = json.loads(_run(b.home, "--json", "ssh", "--config", "board").stdout)
    assert [block["name"] for block in blocks] == ["board"]


def test_map_port_remote_serves_a_web_server_of_the_host(net: Net, tmp_path: Path) -> None:
    a, b = net.a, net.b
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("served by the board\n")
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", "8080", "--bind", BOARD],
        cwd=site, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: httpx.get(f"http://{BOARD}:8080/", timeout=2).status_code == 200)
        result = _run(b.home, "--json", "map-port", "8080", "--remote", "board")
        assert result.returncode == 0, result.stderr
        mapped = json.loads(result.stdout)
        address = mapped["EntireAddress"]
        assert address.startswith("127.0.0.1:")  # gw-a's own address: it is public
        page = httpx.get(f"http://{address}/", timeout=10)
        assert page.text == "served by the board\n"
        # Only attached ports: the SSH port is one, another port is not.
        refused = _run(b.home, "map-port", "9", "--remote", "board")
        assert refused.returncode != 0
        assert "not allowed" in refused.stderr
        # A stranger's key may not map it either.
        stranger = _run(net.c.home, "map-port", "8080", "--remote", "board")
        assert "not allowed" in stranger.stderr
        # unmap --remote stops it; mapping again serves it again.
        unmapped = _run(b.home, "unmap", "8080", "--remote", "board")
        assert unmapped.returncode == 0, unmapped.stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{address}/", timeout=5)
        again = json.loads(_run(b.home, "--json", "map-port", "8080", "--remote", "board").stdout)
        address = again["EntireAddress"]
        assert httpx.get(f"http://{address}/", timeout=10).text == "served by the board\n"
        # Detaching the host ends the forwarding at once.
        p2prc(a.home, "detach", "board")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{address}/", timeout=5)
    finally:
        web.terminate()
        web.wait(timeout=10)


def test_failover_to_the_second_gateway_and_a_changed_host_key(net: Net) -> None:
    a, b, c, sshd = net.a, net.b, net.c, net.sshd
    p2prc(c.home, "attach", "board", "--host", BOARD, "--ssh-port", str(sshd.port),
          "--same-as", "board", "--port", "8080", "--allow", b.node_id)  # fmt: skip
    _wait(lambda: set(_gateways(b, "board")) == {a.node_id, c.node_id})
    begun = time.monotonic()
    first = _run(b.home, "ssh", "board", "--", "true")
    baseline = time.monotonic() - begun  # two Python processes and an SSH login
    assert first.returncode == 0, first.stderr

    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    result = _run(b.home, "ssh", "board", "--", "echo", "via-second")
    failover = time.monotonic() - killed
    assert result.returncode == 0, result.stderr
    assert result.stdout == "via-second\n"
    # Within seconds: the dead gateway costs one refused connect (3 s at most) over the
    # same command with both gateways up.
    print(f"p2prc ssh {baseline:.1f} s with both gateways, {failover:.1f} s after the kill")
    assert failover < baseline + 5, (baseline, failover)

    # The board gets a new host key: the pinned one no longer matches, ssh refuses it.
    port, directory = sshd.port, sshd.directory
    sshd.stop()
    (directory / "ssh_host_ed25519_key").unlink()
    (directory / "ssh_host_ed25519_key.pub").unlink()
    sshd.start()
    assert sshd.port == port
    changed = _run(b.home, "ssh", "board", "--", "echo", "should-not-run")
    assert changed.returncode != 0
    assert "should-not-run" not in changed.stdout
    assert "Host key verification failed" in changed.stderr


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: Any) -> AsyncIterator[Node]:
    home = Home(path / name)
    settings, identity = init_home(home, NodeConfig(name=name, **config))
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as node:
        yield node


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    for _ in range(int(seconds * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_through_the_relay_when_the_gateway_is_behind_nat(tmp_path: Path) -> None:
    """The gateway's listener is published through its relay, its signed record says so,
    and p2prc ssh from another node goes through the relay, TLS pinned to the gateway."""
    no_lan = GossipConfig(lan_discovery=False)
    relay_config = {
        "trust": TrustConfig(mode="open"),
        "relay": RelayConfig(enabled=True, port=0, public_host="127.0.0.1"),
        "behind_nat": False,
        "gossip": no_lan,
    }
    with Sshd(host=BOARD) as sshd:
        async with _node(tmp_path, "relay", **relay_config) as relay:
            root = [relay.api_url.removeprefix("http://")]
            natted = {
                "behind_nat": True,
                "bootstrap": root,
                "relay": RelayConfig(use=[relay.identity.node_id]),
                "gossip": no_lan,
            }
            client_config = {"behind_nat": False, "bootstrap": root, "gossip": no_lan}
            async with (
                _node(tmp_path, "gw", **natted) as gateway,
                _node(tmp_path, "client", **client_config) as client,
            ):
                sshd.authorize(gateway.identity.openssh_public_key())
                sshd.authorize(client.identity.openssh_public_key())
                request = AttachRequest(
                    name="board",
                    host=BOARD,
                    ssh_port=sshd.port,
                    allow=[client.identity.node_id],
                )
                await gateway.attached.attach(request)
                listener = gateway.attach_gateway
                await _until(lambda: listener.endpoint() != f"127.0.0.1:{listener.port}")
                endpoint = listener.endpoint()  # the relay's public port for the listener

                def seen() -> bool:
                    hosts = [h for h in client.attached.known() if h.name == "board"]
                    return bool(hosts) and [g.endpoint for g in hosts[0].gateways] == [endpoint]

                await _until(seen)
                command = [sys.executable, "-m", "p2prc", "--home", str(tmp_path / "client")]
                process = await asyncio.create_subprocess_exec(
                    *command, "ssh", "board", "--", "echo", "through-the-relay",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(process.communicate(), 60)
                assert process.returncode == 0, err.decode()
                assert out == b"through-the-relay\n"
                assert listener.streams_served == 1
