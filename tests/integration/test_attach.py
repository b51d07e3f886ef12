"""Attached hosts with real processes: three nodes (two on loopback, one on 0.0.0.0) and a
real OpenSSH server. A gateway attaches it (host key pinned, specs read with its key), every
node sees it with its gateways, a second gateway joins with --same-as, bad input is refused
with nothing published or lost, and detach removes it everywhere."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc import Client
from p2prc.attach.models import AttachRequest
from p2prc.errors import AttachFailed, InvalidRequest, NameTaken, PeerNotFound
from tests._sshd import SSHD, Sshd
from tests.integration.conftest import NodeProcess, close, free_port, p2prc, start_node, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),  # three node processes and many CLI runs on a loaded machine
    pytest.mark.skipif(not Path(SSHD).exists(), reason="needs OpenSSH's sshd"),
]


@dataclass
class Net:
    a: NodeProcess  # a gateway on loopback
    b: NodeProcess  # a plain node on loopback
    c: NodeProcess  # a second gateway, on the default host 0.0.0.0
    sshd: Sshd


def _wait(condition: Callable[[], Any], seconds: float = 20.0) -> Any:
    return wait_until(condition, seconds)


def _attached(node: NodeProcess) -> dict[str, dict[str, Any]]:
    hosts = httpx.get(f"{node.api}/attached", timeout=5).json()
    return {host["name"]: host for host in hosts}


def _records(node: NodeProcess) -> list[str]:
    records: list[str] = httpx.get(f"{node.api}/attached/records", timeout=5).json()["records"]
    return records


def _announced(seen_by: NodeProcess, node: NodeProcess) -> str | None:
    views = httpx.get(f"{seen_by.api}/peers", timeout=5).json()
    view = next(v for v in views if v["node_id"] == node.node_id)
    reserved: dict[str, str] = view["reserved"]
    return reserved.get("p2prc.attached")


def _gateways(node: NodeProcess, name: str) -> list[str]:
    host = _attached(node).get(name)
    return [] if host is None else [g["node_id"] for g in host["gateways"]]


def _alive(node: NodeProcess) -> set[str]:
    views = httpx.get(f"{node.api}/peers", timeout=5).json()
    return {v["node_id"] for v in views if not v["me"] and v["state"] == "alive"}


def _sees(node: NodeProcess, ids: set[str]) -> Callable[[], bool]:
    return lambda: _alive(node) == ids


def _routes(node: NodeProcess, name: str, gateways: list[str]) -> Callable[[], bool]:
    return lambda: _gateways(node, name) == gateways


def _fails(home: Path, *args: str) -> str:
    result = p2prc(home, *args, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    started: list[NodeProcess] = []
    with Sshd() as sshd:
        try:
            for name in ("gw-a", "node-b", "gw-c"):
                p2prc(tmp_path / name, "config", "set", "name", name)
            started.append(start_node(tmp_path / "gw-a", "--host", "127.0.0.1", "--port", "0"))
            root = started[0].api.removeprefix("http://")
            for name in ("node-b", "gw-c"):
                p2prc(tmp_path / name, "config", "set", "bootstrap", root)
            started.append(start_node(tmp_path / "node-b", "--host", "127.0.0.1", "--port", "0"))
            started.append(start_node(tmp_path / "gw-c", "--port", "0"))  # 0.0.0.0
            a, b, c = started
            ids = {a.node_id, b.node_id, c.node_id}
            for node in started:
                _wait(_sees(node, ids - {node.node_id}))
            yield Net(a, b, c, sshd)
        finally:
            for node in started:
                close(node)


def test_attach_seen_everywhere_second_gateway_and_detach(net: Net) -> None:
    a, b, c, sshd = net.a, net.b, net.c, net.sshd
    sshd.authorize((a.home / "identity" / "id_ed25519.pub").read_text())
    port = str(sshd.port)
    result = p2prc(a.home, "--json", "attach", "morello", "--host", "127.0.0.1",
                   "--ssh-port", port, "--port", "8080", "--allow", "node-b")  # fmt: skip
    host = json.loads(result.stdout)
    assert host["host_key"] == sshd.host_key  # pinned: the key the server really has
    assert host["ports"] == [8080]
    assert host["ssh_port"] == sshd.port
    assert host["arch"] == platform.machine()
    assert host["cores"] >= 1
    assert host["memory"] > 0
    assert host["os"] == "Linux"
    assert [g["state"] for g in host["gateways"]] == ["self"]
    assert host["local"]["address"] == "127.0.0.1"
    assert host["local"]["allow"] == [b.node_id]  # the peer name resolved to its node id
    assert len(_records(a)) == 1
    denied = json.loads(p2prc(a.home, "--json", "attach", "morello", "--deny", "node-b").stdout)
    assert denied["local"]["allow"] == []
    (mine,) = json.loads(p2prc(a.home, "--json", "attached", "--own").stdout)
    assert mine["local"] == {**denied["local"], "allow": []}
    again = json.loads(p2prc(a.home, "--json", "attach", "morello", "--allow", b.node_id).stdout)
    assert again["local"]["allow"] == [b.node_id]

    # Every node sees it, with its gateway (alive), and peers list shows it.
    for node in (b, c):
        assert _wait(_routes(node, "morello", [a.node_id]))
    seen = _attached(b)["morello"]
    assert seen["host_key"] == sshd.host_key
    assert seen["gateways"][0]["name"] == "gw-a"
    assert seen["gateways"][0]["state"] == "alive"
    assert seen["local"] is None
    assert '"address"' not in json.dumps(seen)  # the LAN address stays on the gateway
    rows = json.loads(p2prc(b.home, "--json", "peers", "list").stdout)
    attached = [row for row in rows if row.get("kind") == "attached"]
    assert [r["name"] for r in attached] == ["morello"]
    assert attached[0]["gateways"][0]["node_id"] == a.node_id
    human = p2prc(b.home, "peers", "list").stdout
    assert "attached hosts" in human
    assert "morello" in human
    assert "gw-a (alive)" in human

    # A second gateway (its key is not authorized: specs unknown there, not an error).
    second = json.loads(p2prc(c.home, "--json", "attach", "morello", "--host", "127.0.0.1",
                              "--ssh-port", port, "--same-as", "morello").stdout)  # fmt: skip
    assert {g["node_id"] for g in second["gateways"]} == {a.node_id, c.node_id}
    assert second["arch"] == platform.machine()  # from gw-a's record
    assert _wait(lambda: set(_gateways(b, "morello")) == {a.node_id, c.node_id})
    table = p2prc(b.home, "attached").stdout
    assert "gw-a (alive)" in table
    assert "gw-c (alive)" in table

    # Detach: each gateway's record goes away everywhere.
    p2prc(c.home, "detach", "morello")
    assert _wait(lambda: _gateways(b, "morello") == [a.node_id])
    assert _wait(lambda: _announced(b, c) is None)
    p2prc(a.home, "detach", "morello")
    assert _wait(lambda: "morello" not in _attached(b) and "morello" not in _attached(c))
    assert _records(a) == []
    assert _announced(b, a) is None
    assert "no host named 'morello'" in _fails(a.home, "detach", "morello")


def test_bad_input_is_refused_with_nothing_published_or_lost(net: Net, tmp_path: Path) -> None:
    a, b, sshd = net.a, net.b, net.sshd
    port = str(sshd.port)
    p2prc(a.home, "attach", "morello", "--host", "127.0.0.1", "--ssh-port", port)
    assert _wait(lambda: _gateways(b, "morello") == [a.node_id])
    version, records = _announced(b, a), _records(a)
    assert version is not None

    closed = str(free_port())
    assert "cannot reach 127.0.0.1:" in _fails(
        a.home, "attach", "ghost", "--host", "127.0.0.1", "--ssh-port", closed
    )
    web_port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: httpx.get(f"http://127.0.0.1:{web_port}/", timeout=2).status_code == 200)
        started = time.monotonic()
        stderr = _fails(a.home, "attach", "web", "--host", "127.0.0.1", "--ssh-port", str(web_port))
        assert "is not an SSH server" in stderr
        assert time.monotonic() - started < 15
    finally:
        web.terminate()
        web.wait(timeout=10)
    assert "out of range" in _fails(a.home, "attach", "x", "--host", "127.0.0.1", "--port", "70000")
    assert "out of range" in _fails(a.home, "attach", "x", "--host", "127.0.0.1", "--ssh-port", "0")
    # The rest through the library (the same routes; one process start less each).
    with Client(home=a.home) as client:
        cases: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"name": "node-b"}, NameTaken, "is a peer's name"),
            ({"name": "morello"}, NameTaken, "already attached 'morello'"),
            ({"host": "no;such host"}, InvalidRequest, "neither an IP address nor a DNS name"),
            ({"allow": ["nobody"]}, PeerNotFound, "no peer named 'nobody'"),
        ]
        for fields, error, message in cases:
            request = AttachRequest.model_validate(
                {"name": "x", "host": "127.0.0.1", "ssh_port": sshd.port, **fields}
            )
            with pytest.raises(error, match=message):
                client.attached.attach(request)
    # Another host (another host key) under a name another gateway's record holds.
    with Sshd() as other, Client(home=b.home) as client:
        with pytest.raises(NameTaken, match="attached through gw-a with another host key"):
            client.attached.attach(name="morello", host="127.0.0.1", ssh_port=other.port)
        with pytest.raises(AttachFailed, match="host key mismatch"):
            client.attached.attach(
                name="morello", host="127.0.0.1", ssh_port=other.port, same_as="morello"
            )
    # Nothing was published or lost: the same announcement, the same record, one host.
    assert _announced(b, a) == version
    assert _records(a) == records
    assert _records(b) == []
    assert _announced(a, b) is None
    assert list(_attached(a)) == ["morello"]
    assert list(_attached(b)) == ["morello"]
    with Client(home=a.home) as client:
        assert [h.name for h in client.attached.own()] == ["morello"]
