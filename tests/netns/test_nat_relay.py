"""map-port across a real NAT, in the shared test bed's network namespaces.

A relay node on public host pub1, a node on home1 behind the NAT router, a web server on
home1 that nothing outside can reach; home1 publishes it with map-port, and a client on
pub2 fetches it byte-exact through the relay. The second test adds a second relay and a
client node: the client reaches the NAT'd node's API and its web server by domain through
the relay, the relay is killed, and everything comes back through the other one.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns._bed import Bed

pytestmark = pytest.mark.netns

BED = Bed("p2t", public=3)
RELAY_IP, HOME_IP = "198.51.100.11", "192.168.1.10"
RELAY2_IP, CLIENT_IP = "198.51.100.12", "198.51.100.13"
FETCH = (
    "import hashlib,sys,urllib.request;"
    "request = urllib.request.Request(sys.argv[1], headers={'Host': sys.argv[2]});"
    "body = urllib.request.urlopen(request, timeout=20).read();"
    "print(hashlib.sha256(body).hexdigest())"
)


@pytest.fixture
def testbed() -> Iterator[None]:
    with BED.running():
        yield


def test_map_port_through_the_nat(testbed: None, tmp_path: Path) -> None:
    relay_home, nat_home, www = tmp_path / "relay", tmp_path / "home", tmp_path / "www"
    www.mkdir()
    blob = os.urandom(2 * 1024 * 1024)
    (www / "blob.bin").write_bytes(blob)
    quiet = {"gossip.lan_discovery": "false"}
    BED.configure("pub1", relay_home, {**quiet, "relay.enabled": "true", "trust.mode": "open",
                  "behind_nat": "false", "gossip.advertise": RELAY_IP})  # fmt: skip
    # behind_nat stays "auto": the node must find out by asking the relay to connect back
    # (a relay it names in relay.use: open trust mode does not make a node a relay).
    BED.configure("home1", nat_home, {**quiet, "bootstrap": f"{RELAY_IP}:8088",
                  "gossip.advertise": HOME_IP, "relay.use": BED.node_id(relay_home)})  # fmt: skip
    web = BED.command("home1", sys.executable, "-m", "http.server", "8000", "--bind",
                      "127.0.0.1", "--directory", str(www))  # fmt: skip
    processes = [
        BED.start("pub1", relay_home, RELAY_IP),
        BED.start("home1", nat_home, HOME_IP),
        subprocess.Popen(web, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        address = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not address:
            result = BED.cli("home1", nat_home, "--json", "map-port", "8000")
            if result.returncode == 0:
                address = json.loads(result.stdout)["EntireAddress"]
            else:
                time.sleep(1)
        assert address.startswith(f"{RELAY_IP}:"), result.stderr
        me = next(v for v in BED.json("home1", nat_home, "peers", "list", check=True)
                  if v["me"])  # fmt: skip
        assert me["behind_nat"] is True
        digest = hashlib.sha256(blob).hexdigest()
        assert _fetch("pub2", f"http://{address}/blob.bin", "any") == digest
        direct = BED.python("pub2", FETCH, f"http://{HOME_IP}:8000/blob.bin", "any")
        assert direct.returncode != 0  # the home host itself is unreachable from outside
        # Half-close across the NAT: a server on home1 answers only after the client's EOF.
        after_eof = (
            "import socket;s=socket.socket();"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            "s.bind(('127.0.0.1',8100));s.listen()\n"
            "for _ in range(5):\n"
            " c,_a=s.accept();d=b''\n"
            " while (x:=c.recv(65536)): d+=x\n"
            " c.sendall(b'got %d' % len(d));c.close()"
        )
        processes.append(BED.serve("home1", after_eof))
        half = BED.json("home1", nat_home, "map-port", "8100", check=True)
        talk = (
            "import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[2])),10);"
            "c.sendall(b'x'*3000000);c.shutdown(socket.SHUT_WR);c.settimeout(20);"
            "print(c.recv(100).decode())"
        )
        assert BED.output("pub2", talk, RELAY_IP, half["PortNo"]) == "got 3000000"
        # UDP: an echo server on home1, published with --udp, answered to pub2.
        echo = (
            "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.bind(('127.0.0.1',9000));"
            "[s.sendto(b'echo:'+d,a) for d,a in iter(lambda: s.recvfrom(65535), None)]"
        )
        processes.append(BED.serve("home1", echo))
        udp = BED.json("home1", nat_home, "map-port", "9000", "--udp", check=True)
        assert udp["udp"] is True
        assert udp["IPAddress"] == RELAY_IP
        ask = (
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.settimeout(5);s.sendto(b'ping',(sys.argv[1],int(sys.argv[2])));"
            "print(s.recvfrom(100)[0].decode())"
        )
        assert BED.output("pub2", ask, RELAY_IP, udp["PortNo"]) == "echo:ping"
    finally:
        BED.stop(processes)


def _fetch(ns: str, url: str, host: str) -> str:
    return BED.output(ns, FETCH, url, host)


def _tls(ns: str, relay_ip: str, cert: Path) -> str:
    """Say hello over TLS to secure.example.org at the relay's HTTPS port, verifying the
    node's own certificate end to end."""
    hello = (
        "import socket,ssl,sys;ctx=ssl.create_default_context(cafile=sys.argv[2]);"
        "c=socket.create_connection((sys.argv[1],8443),10);"
        "t=ctx.wrap_socket(c,server_hostname='secure.example.org');t.sendall(b'hello');"
        "print(t.recv(100).decode())"
    )
    return BED.output(ns, hello, relay_ip, cert)


@pytest.mark.timeout(300)
def test_api_domain_and_failover_across_the_nat(testbed: None, tmp_path: Path) -> None:
    homes = {name: tmp_path / name for name in ("r1", "r2", "home", "client")}
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(3 * 1024 * 1024 + 17)
    (www / "blob.bin").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    quiet = {"gossip.lan_discovery": "false"}
    boot = {"bootstrap": f"{RELAY_IP}:8088"}
    relay = {**quiet, "relay.enabled": "true", "relay.http_port": "8080",
             "relay.https_port": "8443", "trust.mode": "open", "behind_nat": "false"}  # fmt: skip
    BED.configure("pub1", homes["r1"], {**relay, "name": "r1", "gossip.advertise": RELAY_IP})
    BED.configure("pub2", homes["r2"], {**relay, **boot, "name": "r2",
                  "gossip.advertise": RELAY2_IP})  # fmt: skip
    relays = f"{BED.node_id(homes['r1'])},{BED.node_id(homes['r2'])}"
    BED.configure("home1", homes["home"], {**quiet, **boot, "name": "home", "trust.mode": "open",
                  "gossip.advertise": HOME_IP, "relay.use": relays})  # fmt: skip
    BED.configure("pub3", homes["client"], {**quiet, **boot, "name": "client",
                  "behind_nat": "false", "gossip.advertise": CLIENT_IP})  # fmt: skip
    web = BED.command("home1", sys.executable, "-m", "http.server", "8000", "--bind",
                      "127.0.0.1", "--directory", str(www))  # fmt: skip
    nodes = {
        "r1": BED.start("pub1", homes["r1"], RELAY_IP),
        "r2": BED.start("pub2", homes["r2"], RELAY2_IP),
        "home": BED.start("home1", homes["home"], HOME_IP),
        "client": BED.start("pub3", homes["client"], CLIENT_IP),
    }
    server = subprocess.Popen(web, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    extra: list[subprocess.Popen[bytes]] = []
    try:
        mapped: dict[str, str] = {}

        def published() -> bool:
            result = BED.json("home1", homes["home"], "map-port", "8000", "--domain",
                              "app.example.org")  # fmt: skip
            if isinstance(result, dict):
                mapped.update(result)
            return bool(mapped)

        BED.wait("map-port with a domain", published, 40, *homes.values())
        relay_ip = mapped["IPAddress"]
        assert relay_ip in (RELAY_IP, RELAY2_IP)
        assert mapped["domain"] == "app.example.org"
        # By domain through the relay's HTTP port, byte-exact.
        assert _fetch("pub3", f"http://{relay_ip}:8080/blob.bin", "app.example.org") == digest
        # HTTPS by SNI: the TLS server on home1 holds the certificate; the relay only reads
        # the server name and passes the bytes through.
        cert, key = tmp_path / "secure.crt", tmp_path / "secure.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", "/CN=secure.example.org", "-addext",
             "subjectAltName=DNS:secure.example.org", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        tls_server = (
            "import socket,ssl,sys\n"
            "ctx=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER);ctx.load_cert_chain(sys.argv[1],sys.argv[2])\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind(('127.0.0.1',8443));s.listen()\n"
            "for _ in range(5):\n"
            " c,_a=s.accept()\n"
            " try:\n"
            "  t=ctx.wrap_socket(c,server_side=True);t.sendall(b'tls:'+t.recv(100));t.close()\n"
            " except OSError:\n"
            "  c.close()\n"
        )
        extra.append(BED.serve("home1", tls_server, cert, key))
        secure = BED.json(
            "home1", homes["home"], "map-port", "8443", "--domain", "secure.example.org"
        )
        assert isinstance(secure, dict)
        assert secure["domain"] == "secure.example.org"
        assert _tls("pub3", relay_ip, cert) == "tls:hello", "HTTPS by SNI through the relay"
        # The client node sees the NAT'd node alive, with its API on the relay over TLS
        # pinned to its node id, and uses it: a signed call answers; map-port of the NAT'd
        # node's own web server is refused (a peer maps only its own containers' ports).
        views: list[dict[str, object]] = []

        def home_seen() -> bool:
            found = BED.json("pub3", homes["client"], "peers", "list")
            views[:] = [v for v in found or [] if v["name"] == "home"]
            return bool(views) and views[0]["state"] == "alive" and bool(views[0]["public_api"])

        BED.wait("the NAT'd node's API in the client's table", home_seen, 40, *homes.values())
        home_id = BED.node_id(homes["home"])
        assert str(views[0]["api"]).startswith(f"https://{home_id}@{relay_ip}:")
        speed = BED.json("pub3", homes["client"], "peers", "speedtest", "home", "--size", "1")
        assert isinstance(speed, dict), "the NAT'd node's API did not answer through the relay"
        refused = BED.cli("pub3", homes["client"], "map-port", "8000", "--remote", "home")
        assert refused.returncode != 0
        assert "not a TCP port of your containers" in refused.stderr + refused.stdout

        # The network has converged: the NAT'd node knows both relays (as it would long
        # before one fails in real use).
        def both_relays_known() -> bool:
            found = BED.json("home1", homes["home"], "peers", "list") or []
            relays = {v["name"] for v in found if v["relay_port"] and v["state"] == "alive"}
            return relays == {"r1", "r2"}

        BED.wait("the NAT'd node to know both relays", both_relays_known, 40, *homes.values())
        # Kill the relay in use: the mapping, the domain and the API move to the other one.
        used = "r1" if relay_ip == RELAY_IP else "r2"
        nodes[used].kill()
        nodes[used].wait(timeout=10)
        other_ip = RELAY2_IP if used == "r1" else RELAY_IP
        moved: list[dict[str, object]] = []

        def mapping_moved() -> bool:
            found = BED.json("home1", homes["home"], "mappings")
            moved[:] = [m for m in found or [] if m["IPAddress"] == other_ip]
            return bool(moved)

        BED.wait("the mapping to move to the other relay", mapping_moved, 40, *homes.values())
        assert _fetch("pub3", f"http://{other_ip}:8080/blob.bin", "app.example.org") == digest
        assert _tls("pub3", other_ip, cert) == "tls:hello"
        assert _fetch("pub3", f"http://{moved[0]['EntireAddress']}/blob.bin", "x") == digest

        def api_moved() -> bool:
            home_seen()
            return bool(views) and f"@{other_ip}:" in str(views[0]["api"])

        # Gossip or the next push-pull (15 s +-25 %, digests then pages) carries the new
        # record; generous, since a loaded CI machine once needed more than 40 s.
        BED.wait("the NAT'd node's API to move", api_moved, 90, *homes.values())
        again = BED.json("pub3", homes["client"], "peers", "speedtest", "home", "--size", "1")
        assert isinstance(again, dict)
    finally:
        BED.stop([*nodes.values(), server, *extra])
