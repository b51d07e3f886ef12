"""map-port across a real NAT, in the shared test bed's network namespaces.

A relay node on public host pub1, a node on home1 behind the NAT router, a web server on
home1 that nothing outside can reach; home1 publishes it with map-port, and a client on
pub2 fetches it byte-exact through the relay.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

TESTBED = Path(__file__).resolve().parents[3] / "shared" / "testbed" / "netns-nat.sh"
ENV = {**os.environ, "TB_PREFIX": "p2t", "TB_PUBLIC": "2", "TB_SITES": "1"}
RELAY_IP, HOME_IP = "198.51.100.11", "192.168.1.10"


def _bed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args], env=ENV, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture
def testbed() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    if not TESTBED.is_file():
        pytest.skip(f"no test bed at {TESTBED}")
    up = _bed("up")
    if up.returncode != 0:
        pytest.skip(f"test bed did not come up: {up.stderr.strip()[-300:]}")
    try:
        yield
    finally:
        _bed("down")


def _cli(ns: str, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", f"p2t-{ns}", "env", f"P2PRC_HOME={home}",
               sys.executable, "-m", "p2prc", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{args}: {result.stderr}")
    return result


def _start(ns: str, home: Path, host: str) -> subprocess.Popen[bytes]:
    command = ["ip", "netns", "exec", f"p2t-{ns}", "env", f"P2PRC_HOME={home}",
               sys.executable, "-m", "p2prc", "start", "--host", host,
               "--port", "8088"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _configure(ns: str, home: Path, settings: dict[str, str]) -> None:
    for key, value in settings.items():
        _cli(ns, home, "config", "set", key, value)


def test_map_port_through_the_nat(testbed: None, tmp_path: Path) -> None:
    relay_home, nat_home, www = tmp_path / "relay", tmp_path / "home", tmp_path / "www"
    www.mkdir()
    blob = os.urandom(2 * 1024 * 1024)
    (www / "blob.bin").write_bytes(blob)
    quiet = {"gossip.lan_discovery": "false"}
    _configure("pub1", relay_home, {**quiet, "relay.enabled": "true", "trust.mode": "open",
               "behind_nat": "false", "gossip.advertise": RELAY_IP})  # fmt: skip
    # behind_nat stays "auto": the node must find out by asking the relay to connect back.
    _configure("home1", nat_home, {**quiet, "bootstrap": f"{RELAY_IP}:8088",
               "gossip.advertise": HOME_IP})  # fmt: skip
    web = ["ip", "netns", "exec", "p2t-home1", sys.executable, "-m", "http.server", "8000",
           "--bind", "127.0.0.1", "--directory", str(www)]  # fmt: skip
    processes = [
        _start("pub1", relay_home, RELAY_IP),
        _start("home1", nat_home, HOME_IP),
        subprocess.Popen(web, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        address = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not address:
            result = _cli("home1", nat_home, "--json", "map-port", "8000", check=False)
            if result.returncode == 0:
                address = json.loads(result.stdout)["EntireAddress"]
            else:
                time.sleep(1)
        assert address.startswith(f"{RELAY_IP}:"), result.stderr
        me = next(v for v in json.loads(_cli("home1", nat_home, "--json", "peers", "list").stdout)
                  if v["me"])  # fmt: skip
        assert me["behind_nat"] is True
        fetch = (
            "import hashlib,sys,urllib.request;"
            "body = urllib.request.urlopen(sys.argv[1], timeout=20).read();"
            "print(hashlib.sha256(body).hexdigest())"
        )
        got = subprocess.run(
            ["ip", "netns", "exec", "p2t-pub2", sys.executable, "-c", fetch,
             f"http://{address}/blob.bin"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert got.stdout.strip() == hashlib.sha256(blob).hexdigest(), got.stderr
        direct = subprocess.run(
            ["ip", "netns", "exec", "p2t-pub2", sys.executable, "-c", fetch,
             f"http://{HOME_IP}:8000/blob.bin"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert direct.returncode != 0  # the home host itself is unreachable from outside
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
