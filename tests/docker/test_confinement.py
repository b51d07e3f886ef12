"""Containers are confined on the real daemon: capabilities, tenant networks, host firewall.

Every address used here lives on this machine: the host's own bridge addresses, and a
network namespace that plays the cloud metadata service (169.254.169.254) and an outside
host (198.51.100.7) behind a veth pair.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import AsyncClient
from p2prc.containers.confine import CAPABILITIES, NETWORK_PREFIX
from p2prc.containers.images import DEFAULT_IMAGE, IMAGE_VERSION, image_version
from p2prc.models import ContainerView
from tests.docker.conftest import ssh

pytestmark = pytest.mark.docker

_NET_RAW = 13  # bit of CAP_NET_RAW in /proc/*/status
_CAP_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "NET_BIND_SERVICE": 10,
    "SYS_CHROOT": 18,
    "AUDIT_WRITE": 29,
}
_NS = "p2prc-test-meta"
_METADATA = "169.254.169.254"
_OUTSIDE = "198.51.100.7"
_PROBE = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.settimeout(2)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "    print('open')\n"
    "except OSError as exc:\n"
    "    print('closed', exc)\n"
)
_SERVE = (
    "import socket, sys, threading\n"
    "def serve(host):\n"
    "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    s.bind((host, 80)); s.listen(16)\n"
    "    while True:\n"
    "        c, _ = s.accept(); c.sendall(b'meta'); c.close()\n"
    "for host in sys.argv[1:]:\n"
    "    threading.Thread(target=serve, args=(host,), daemon=True).start()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def outside() -> Iterator[None]:
    """A namespace routed from the host: 169.254.169.254:80 and 198.51.100.7:80 answer."""
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs ip and iptables (root)")
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", _NS)
    _ip("netns", "add", _NS)
    server: subprocess.Popen[str] | None = None
    try:
        _ip("link", "add", "p2prc-tm0", "type", "veth", "peer", "name", "p2prc-tm1")
        _ip("link", "set", "p2prc-tm1", "netns", _NS)
        _ip("addr", "add", "10.250.0.1/30", "dev", "p2prc-tm0")
        _ip("link", "set", "p2prc-tm0", "up")
        inside = ["netns", "exec", _NS, "ip"]
        _ip(*inside, "addr", "add", "10.250.0.2/30", "dev", "p2prc-tm1")
        for address in (_METADATA, _OUTSIDE):
            _ip(*inside, "addr", "add", f"{address}/32", "dev", "p2prc-tm1")
            _ip("route", "add", f"{address}/32", "via", "10.250.0.2")
        _ip(*inside, "link", "set", "p2prc-tm1", "up")
        _ip(*inside, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", _NS, sys.executable, "-c", _SERVE, _METADATA, _OUTSIDE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        assert _reach_from_host(_METADATA, 80)  # the test bed itself works
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
            for pipe in (server.stdin, server.stdout):
                if pipe is not None:
                    pipe.close()
        for address in (_METADATA, _OUTSIDE):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("route", "del", f"{address}/32")
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", "p2prc-tm0")
        _ip("netns", "del", _NS)


def _reach_from_host(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _listeners(addresses: list[str]) -> Iterator[int]:
    """A TCP server on these host addresses, one port for all; yields the port."""
    sockets: list[socket.socket] = []
    port = 0
    for address in addresses:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        port = server.getsockname()[1]
        server.listen(16)
        sockets.append(server)
    stop = threading.Event()

    def serve(server: socket.socket) -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.sendall(b"host service\n")
                conn.close()

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    try:
        yield port
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        for server in sockets:
            server.close()


def _probe(container: Any, host: str, port: int) -> bool:
    result = container.exec_run(["python3", "-c", _PROBE, host, str(port)])
    return bool(result.output.decode().startswith("open"))


def _network(docker_client: Any, view: ContainerView) -> tuple[str, str, str]:
    """(network name, container IP, gateway) of a p2prc container."""
    attrs = docker_client.containers.get(view.id).attrs
    networks = attrs["NetworkSettings"]["Networks"]
    assert len(networks) == 1
    name, settings = next(iter(networks.items()))
    return name, settings["IPAddress"], settings["Gateway"]


def _capabilities(line: str) -> set[int]:
    mask = int(line.split()[1], 16)
    return {bit for bit in range(64) if mask >> bit & 1}


async def test_capabilities_are_dropped_and_ssh_and_sudo_still_work(
    node_factory: Any, docker_client: Any, tmp_path: Path
) -> None:
    assert image_version(DEFAULT_IMAGE) == IMAGE_VERSION, "run scripts/build-image"
    async with (
        node_factory("alice") as _alice,
        node_factory("bob") as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        view = await client.create_on_peer(bob.api_url)
        raw = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"
        command = (
            f"grep CapBnd /proc/1/status; sudo true && echo sudo-ok; sudo id -un; "
            f'sudo python3 -c "{raw}" 2>&1 | tail -1'
        )
        result = ssh(tmp_path / "alice", view.ssh.port, command)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("CapBnd:")
        assert _capabilities(lines[0]) == {_CAP_BITS[name] for name in CAPABILITIES}
        assert _NET_RAW not in _capabilities(lines[0])
        assert lines[1:3] == ["sudo-ok", "root"]
        assert "Operation not permitted" in lines[3]  # no raw sockets even for root inside
        host = docker_client.containers.get(view.id).attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"]
        assert not host["Privileged"]
        assert {"Name": "nofile", "Soft": 8192, "Hard": 8192} in host["Ulimits"]
        assert view.disk is None  # overlay2 on ext4 here: no limit, and the view says so


async def test_tenants_are_isolated_from_each_other_the_host_and_metadata(
    node_factory: Any, docker_client: Any, tmp_path: Path, outside: None
) -> None:
    async with (
        node_factory("alice") as _alice,
        node_factory("carol") as _carol,
        node_factory("bob") as bob,
        AsyncClient(home=tmp_path / "alice") as alice,
        AsyncClient(home=tmp_path / "carol") as carol,
    ):
        first = await alice.create_on_peer(bob.api_url)
        second = await alice.create_on_peer(bob.api_url)
        theirs = await carol.create_on_peer(bob.api_url)
        network, first_ip, gateway = _network(docker_client, first)
        same, second_ip, _ = _network(docker_client, second)
        other, their_ip, _ = _network(docker_client, theirs)
        assert network == same != other
        assert network.startswith(NETWORK_PREFIX)
        assert other.startswith(NETWORK_PREFIX)
        options = docker_client.networks.get(network).attrs["Options"]
        assert options["com.docker.network.bridge.enable_icc"] == "false"
        # A container on Docker's default bridge, as every container was before: the control.
        control = docker_client.containers.run(
            DEFAULT_IMAGE,
            entrypoint=["sleep", "300"],
            detach=True,
            labels={"p2prc.node": bob.identity.node_id},
        )
        control.reload()
        docker0 = control.attrs["NetworkSettings"]["Gateway"]
        tenant = docker_client.containers.get(first.id)
        with _listeners([gateway, docker0]) as port:
            assert _reach_from_host(gateway, port)
            assert _probe(control, docker0, port)  # the old, open world
            assert _probe(control, _METADATA, 80)
            assert not _probe(tenant, gateway, port)  # this host's services
            assert not _probe(tenant, docker0, port)
            assert not _probe(tenant, _METADATA, 80)  # cloud metadata
        assert _probe(tenant, _OUTSIDE, 80)  # the world outside stays reachable
        assert _reach_from_host(second_ip, 22)
        assert _reach_from_host(their_ip, 22)
        assert not _probe(tenant, second_ip, 22)  # no traffic inside a tenant's network
        assert not _probe(tenant, their_ip, 22)  # nor across tenants
        assert not _probe(control, first_ip, 22)
        # Published ports still work: a real login through the host's port.
        assert ssh(tmp_path / "alice", first.ssh.port, "true").returncode == 0
        control.remove(force=True)
        await alice.remove_tracked(first.id)
        assert docker_client.networks.list(names=[network])  # the second one still uses it
        await alice.remove_tracked(second.id)
        await carol.remove_tracked(theirs.id)
        assert docker_client.networks.list(names=[network]) == []
        assert docker_client.networks.list(names=[other]) == []
