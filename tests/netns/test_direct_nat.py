"""Direct paths across real NATs, in the shared test bed's network namespaces (issue #18).

A relay node on pub1, a public node on pub2, and one node behind each of two NAT routers
(``TB_SITES=2``: home1, home2), every node on the default host (all addresses). On easy
NAT (source ports kept) the two NAT'd nodes punch a direct path: one call makes it, a
transfer over it is byte-exact, and killing it moves the path back to the relay (calls go
on) until the next attempt brings it back; the NAT'd node dials the public one; garbage,
a stranger's key and a wrong certificate on a direct port are refused. On hard NAT (a
random source port per flow) the NAT'd nodes stay on the relay and calls still work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc.direct.paths import REOPEN_AFTER

from ._bed import Bed

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

RELAY_IP, PUB2_IP = "198.51.100.11", "198.51.100.12"
HOME_IPS = {"home1": "192.168.1.10", "home2": "192.168.2.10"}
# Seconds a punch may take in this bed (direct/punch.py: PUNCH_SECONDS and its numbers).
PUNCH_WITHIN = 15.0

# In a node's namespace: unless told not to, have the node use its path to the peer once
# (POST /paths/forward to the peer's port 8000, closed once it listens: the node touches
# the path), then poll GET /paths until the peer's path is of the kind wanted; prints the
# seconds it took and the path, or fails with the last path seen.
WATCH = """
import asyncio, json, sys, time
from p2prc import AsyncClient
home, peer, kind, within, call = sys.argv[1:6]
within = float(within)
async def main():
    async with AsyncClient(home=home) as client:
        started = time.monotonic()
        if call == "1":
            body = {"peer": peer, "port": 8000}
            async for line in client.post_ndjson("/paths/forward", body, unbounded=True):
                break
        path = None
        while time.monotonic() - started < within:
            answer = await client._request("GET", "/paths", signed=True)
            path = next((p for p in answer.json() if p["node_id"] == peer), None)
            if path is not None and path["kind"] == kind:
                print(json.dumps({"seconds": time.monotonic() - started, "path": path}))
                return
            await asyncio.sleep(0.05)
        sys.exit(f"no {kind} path within {within} s: {path}")
asyncio.run(main())
"""
FETCH = """
import hashlib, sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=60).read()
print(hashlib.sha256(body).hexdigest(), len(body))
"""
# A server that trickles 2000 KiB, 1 KiB every 5 ms, to each connection; and its reader
# (which says when the first bytes came, then how many came in all).
TRICKLE = """
import socket, threading, time
server = socket.create_server(("127.0.0.1", 8001))
def feed(conn):
    with conn:
        try:
            for _ in range(2000):
                conn.sendall(b"x" * 1024)
                time.sleep(0.005)
        except OSError:
            pass
while True:
    threading.Thread(target=feed, args=(server.accept()[0],), daemon=True).start()
"""
TRICKLE_READ = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
total = len(sock.recv(65536))
print("started", flush=True)
try:
    while chunk := sock.recv(65536):
        total += len(chunk)
except OSError as exc:
    print("broken", type(exc).__name__, flush=True)
print(total, flush=True)
"""
TRICKLED = 2000 * 1024
# What a stranger on the internet sends to a direct port: garbage, then (a fresh key) a
# real handshake; and a handshake that pins another node than the one listening there.
PROBE = """
import asyncio, os, socket, sys, tempfile
from pathlib import Path
from p2prc.direct.link import handshake
from p2prc.errors import P2PRCError
from p2prc.identity import Identity
from p2prc.tunnel.tls import server_context
host, port, listening, other = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.create_connection((host, port), timeout=10)
sock.sendall(os.urandom(4096))
try:
    while sock.recv(65536):
        pass
    print("garbage: closed")
except OSError as exc:
    print("garbage: closed", type(exc).__name__)
async def shake(expected):
    me = Identity.generate()
    context = server_context(me, Path(tempfile.mkdtemp()))
    sock = socket.create_connection((host, port), timeout=10)
    try:
        await handshake(sock, me, client=True, server_context=context, expected=expected,
                        allowed=lambda node_id: True)
    except P2PRCError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"
print("stranger:", asyncio.run(shake(listening)))
print("wrong certificate:", asyncio.run(shake(other)))
"""


class _Network:
    """The bed's nodes: homes by host name, their node ids, the processes started."""

    def __init__(self, bed: Bed, tmp_path: Path) -> None:
        self.bed, self.tmp = bed, tmp_path
        self.homes: dict[str, Path] = {}
        self.processes: list[subprocess.Popen[Any]] = []

    def start(self, host: str, settings: dict[str, str]) -> Path:
        home = self.homes[host] = self.tmp / host
        quiet = {"name": host, "gossip.lan_discovery": "false", "trust.mode": "open",
                 "direct.retry": "5"}  # fmt: skip
        self.bed.configure(host, home, {**quiet, **settings})
        # The default host; each site's node on a CPU of its own (Bed.site_cpu says why).
        cpu = Bed.site_cpu(int(host[4:])) if host.startswith("home") else None
        self.processes.append(self.bed.start(host, home, None, cpu=cpu))
        return home

    def id(self, host: str) -> str:
        return self.bed.node_id(self.homes[host])

    def peers(self, host: str) -> list[dict[str, Any]]:
        found = self.bed.json(host, self.homes[host], "peers", "list")
        return found if isinstance(found, list) else []

    def peer(self, host: str, other: str) -> dict[str, Any] | None:
        return next((p for p in self.peers(host) if p["node_id"] == self.id(other)), None)

    def direct_port(self, host: str) -> int:
        me = next(p for p in self.peers(host) if p["me"])
        return int(me["reserved"]["p2prc.direct"])

    def watch(self, host: str, other: str, kind: str, within: float, *, call: bool) -> Any:
        """Seconds until ``host``'s path to ``other`` is ``kind`` (after one call), and it."""
        args = (self.homes[host], self.id(other), kind, within, "1" if call else "0")
        done = self.bed.python(host, WATCH, *args, timeout=within + 60)
        if done.returncode != 0:
            logs = self.bed.logs(*self.homes.values(), lines=30)
            raise AssertionError(f"{host} -> {other}: {done.stderr[-800:]}\n{logs}")
        return json.loads(done.stdout)

    def wait_ready(self, hosts: dict[str, list[str]]) -> None:
        """Until each host sees each of its peers alive (the NAT'd ones through a relay)."""

        def ready() -> bool:
            for host, others in hosts.items():
                for other in others:
                    view = self.peer(host, other)
                    if (
                        view is None
                        or view["state"] != "alive"
                        or "p2prc.direct" not in (view.get("reserved") or {})
                    ):
                        return False
                    if other.startswith("home") and not (view.get("path") or {}).get("via"):
                        return False
            return True

        self.bed.wait("the nodes to see each other", ready, 120, *self.homes.values())


@contextlib.contextmanager
def _network(tmp_path: Path, nat: str) -> Iterator[_Network]:
    with Bed("tp", public=2, sites=2, nat=nat).running() as bed:
        network = _Network(bed, tmp_path)
        try:
            yield network
        finally:
            Bed.stop(network.processes)


@pytest.fixture
def easy(tmp_path: Path) -> Iterator[_Network]:
    with _network(tmp_path, "easy") as network:
        yield network


@pytest.fixture
def hard(tmp_path: Path) -> Iterator[_Network]:
    with _network(tmp_path, "hard") as network:
        yield network


def _relay_and_homes(network: _Network) -> None:
    network.start("pub1", {"relay.enabled": "true", "behind_nat": "false",
                           "gossip.advertise": RELAY_IP})  # fmt: skip
    relay = network.id("pub1")
    for host, address in HOME_IPS.items():
        network.start(host, {"behind_nat": "true", "bootstrap": f"{RELAY_IP}:8088",
                             "gossip.advertise": address, "relay.use": relay})  # fmt: skip


def _serve_blob(network: _Network, host: str, size: int) -> str:
    """A web server on ``host``'s loopback serving ``size`` random bytes; their sha256."""
    www = network.tmp / f"www-{host}"
    www.mkdir()
    blob = os.urandom(size)
    (www / "blob.bin").write_bytes(blob)
    server = network.bed.popen(host, "python3", "-m", "http.server", "8000", "--bind",
                               "127.0.0.1", "--directory", str(www))  # fmt: skip
    network.processes.append(server)
    return hashlib.sha256(blob).hexdigest()


def test_two_nated_nodes_punch_a_direct_path_and_fall_back_to_the_relay(
    easy: _Network,
) -> None:
    network = easy
    _relay_and_homes(network)
    network.start("pub2", {"behind_nat": "false", "bootstrap": f"{RELAY_IP}:8088",
                           "gossip.advertise": PUB2_IP})  # fmt: skip
    network.wait_ready({"home1": ["home2", "pub2"], "home2": ["home1"]})

    # One call from home1: a direct path to home2 by hole punching, and to pub2 by a dial.
    punched = network.watch("home1", "home2", "direct", PUNCH_WITHIN, call=True)
    print(f"punched: direct after {punched['seconds']:.2f} s: {punched['path']}")
    assert punched["path"]["direct_rtt_ms"] is not None
    assert network.watch("home2", "home1", "direct", 5, call=False)["path"]["kind"] == "direct"
    dialled = network.watch("home1", "pub2", "direct", 10, call=True)
    assert dialled["path"]["kind"] == "direct"
    assert network.watch("pub2", "home1", "direct", 5, call=False)["path"]["kind"] == "direct"

    # A transfer over it, byte-exact: home2 publishes its port 8000, home1 forwards to it.
    digest = _serve_blob(network, "home2", 8 * 1024 * 1024)
    network.bed.cli("home2", network.homes["home2"], "map-port", "8000", check=True)
    home1 = {"P2PRC_HOME": str(network.homes["home1"])}
    log = (network.tmp / "forward.log").open("w")
    network.processes.append(network.bed.serve("home2", TRICKLE))
    network.bed.cli("home2", network.homes["home2"], "map-port", "8001", check=True)
    forward = network.bed.popen("home1", sys.executable, "-m", "p2prc", "forward", "home2",
                                "18000:8000", "18001:8001", env=home1, stdout=log,
                                stderr=log)  # fmt: skip
    log.close()  # the forward process has its own copy
    network.processes.append(forward)
    fetched = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not fetched.startswith(digest):
        fetched = network.bed.output("home1", FETCH, "http://127.0.0.1:18000/blob.bin")
        if not fetched.startswith(digest):
            time.sleep(1)
    forwarded = (network.tmp / "forward.log").read_text()
    assert fetched == f"{digest} {8 * 1024 * 1024}", f"{fetched}\n{forwarded}"

    # A download in progress is a stream on the direct path (home2 sees it) ...
    slow = network.bed.popen("home1", "python3", "-c", TRICKLE_READ, "18001",
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    network.processes.append(slow)
    assert slow.stdout is not None
    assert slow.stdout.readline().strip() == "started"
    on_home2 = network.watch("home2", "home1", "direct", 5, call=False)["path"]
    assert on_home2["streams"] >= 1
    # ... killing the direct connection breaks that download, and the path goes back to
    # the relay at once; calls go on through it.
    direct_port = network.direct_port("home1")
    network.bed.run("home1", "ss", "-K", "(", "sport", "=", f":{direct_port}", "or",
                    "dport", "=", f":{direct_port}", ")")  # fmt: skip
    back = network.watch("home1", "home2", "relay", 3, call=False)
    assert back["path"]["last_error"]
    rest, _ = slow.communicate(timeout=60)
    assert int(rest.split()[-1]) < TRICKLED, rest  # it ended early, as on a reset
    assert network.peer("home1", "home2") is not None
    synced = network.bed.json("home1", network.homes["home1"], "peers", "sync", check=True)
    assert synced is not None
    # The next attempt (direct.retry = 5 s, and REOPEN_AFTER since the path closed) brings
    # the direct path back; new streams use it.
    time.sleep(REOPEN_AFTER)
    again = network.watch("home1", "home2", "direct", PUNCH_WITHIN, call=True)
    assert again["path"]["since"] > punched["path"]["since"]
    fetched = network.bed.output("home1", FETCH, "http://127.0.0.1:18000/blob.bin")
    assert fetched == f"{digest} {8 * 1024 * 1024}", fetched

    # A stranger on pub1 at pub2's direct port: garbage is dropped, a key that is no member
    # is refused, and a node that pins another node's certificate refuses pub2's.
    probe = network.bed.python("pub1", PROBE, PUB2_IP, network.direct_port("pub2"),
                               network.id("pub2"), network.id("home2"))  # fmt: skip
    lines = dict(line.split(":", 1) for line in probe.stdout.strip().splitlines())
    assert lines.get("garbage", "").strip().startswith("closed"), probe.stdout + probe.stderr
    assert "direct path" in lines.get("stranger", ""), probe.stdout
    assert lines.get("stranger", "").strip() != "accepted"
    assert lines.get("wrong certificate", "").strip().startswith("WrongNode"), probe.stdout
    # ... and pub2 still serves home1 over its direct path.
    assert network.watch("home1", "pub2", "direct", 5, call=True)["path"]["kind"] == "direct"


def test_on_hard_nat_the_nodes_stay_on_the_relay_and_calls_work(hard: _Network) -> None:
    network = hard
    _relay_and_homes(network)
    network.wait_ready({"home1": ["home2"], "home2": ["home1"]})

    # A call from home1 goes through the relay at once; no direct path comes of it, and
    # the path says why (these NATs change source ports: no punch is tried).
    began = time.monotonic()
    synced = network.bed.json("home1", network.homes["home1"], "peers", "sync", check=True)
    assert synced is not None
    called = time.monotonic() - began
    stays = network.watch("home1", "home2", "relay", 3, call=False)["path"]
    time.sleep(3)
    after = network.watch("home1", "home2", "relay", 3, call=True)["path"]
    assert after["kind"] == "relay"
    assert after["attempts"] >= 1, after
    assert "ports" in after["last_error"] or "punch" in after["last_error"], after
    print(f"hard NAT: the call took {called:.2f} s (with the CLI's start); {stays}; {after}")

    # home2's API answers home1 through the relay: its published port too.
    digest = _serve_blob(network, "home2", 2 * 1024 * 1024)
    mapped = network.bed.json("home2", network.homes["home2"], "map-port", "8000", check=True)
    address = mapped["EntireAddress"]
    assert address.startswith(f"{RELAY_IP}:")
    fetched = network.bed.output("home1", FETCH, f"http://{address}/blob.bin")
    assert fetched == f"{digest} {2 * 1024 * 1024}", fetched
