"""A job on a NAT'd peer, in the shared test bed's network namespaces, with real Docker.

A relay node on public host pub1; a node on home1 behind the NAT router with its own
Docker daemon inside home1's namespace (as the test bed's README shows), so its containers'
SSH ports exist only on home1 and are published through the relay; a submitting node on
pub2 runs ``p2prc run --peer home --upload DIR --download out``: the upload, the command
and the download all go through the relay, the output comes back byte-exact, the job
succeeds and the NAT'd peer's daemon holds no container afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc.config import Home
from p2prc.containers.images import DEFAULT_IMAGE
from p2prc.identity import Identity
from tests.netns._bed import NamespaceDocker

pytestmark = pytest.mark.netns

TESTBED = Path(__file__).resolve().parents[3] / "shared" / "testbed" / "netns-nat.sh"
# A prefix of its own: the other netns tests' bed (p2t) may be up at the same time.
PREFIX = "p2j"
ENV = {**os.environ, "TB_PREFIX": PREFIX, "TB_PUBLIC": "2", "TB_SITES": "1"}
RELAY_IP, CLIENT_IP, HOME_IP = "198.51.100.11", "198.51.100.12", "192.168.1.10"
HOME_NS = f"{PREFIX}-home1"


def _bed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args], env=ENV, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture
def home_docker() -> Iterator[NamespaceDocker]:
    """The test bed, with a Docker daemon inside home1's namespace holding the image."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    if not TESTBED.is_file():
        pytest.skip(f"no test bed at {TESTBED}")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("needs dockerd and the docker CLI")
    if subprocess.run(["docker", "image", "inspect", DEFAULT_IMAGE], capture_output=True,
                      timeout=30, check=False).returncode != 0:  # fmt: skip
        pytest.skip(f"{DEFAULT_IMAGE} is not built; run 'p2prc images bootstrap'")
    up = _bed("up")
    if up.returncode != 0:
        pytest.skip(f"test bed did not come up: {up.stderr.strip()[-300:]}")
    try:
        with NamespaceDocker(HOME_NS).running((DEFAULT_IMAGE,)) as daemon:
            yield daemon
    finally:
        _bed("down")


def _cli(ns: str, home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", f"{PREFIX}-{ns}", "env", f"P2PRC_HOME={home}",
               sys.executable, "-m", "p2prc", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _configure(ns: str, home: Path, settings: dict[str, str]) -> None:
    for key, value in settings.items():
        result = _cli(ns, home, "config", "set", key, value)
        assert result.returncode == 0, result.stderr


def _start(ns: str, home: Path, host: str) -> subprocess.Popen[bytes]:
    """A node in host ``ns``; its log goes to ``home/node.log`` (shown on failures)."""
    command = ["ip", "netns", "exec", f"{PREFIX}-{ns}", "env", f"P2PRC_HOME={home}",
               sys.executable, "-m", "p2prc", "--debug", "start", "--host", host,
               "--port", "8088"]  # fmt: skip
    with (home / "node.log").open("ab") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def _logs(*homes: Path, lines: int = 40) -> str:
    parts = []
    for home in homes:
        log = home / "node.log"
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        parts.append(f"--- {home.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def _json(ns: str, home: Path, *args: str) -> Any:
    result = _cli(ns, home, "--json", *args)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _wait(what: str, check: Callable[[], bool], seconds: float, *homes: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{_logs(*homes)}")


@pytest.mark.timeout(420)
def test_a_job_on_a_nated_peer_through_its_relay(
    home_docker: NamespaceDocker, tmp_path: Path
) -> None:
    homes = {name: tmp_path / name for name in ("relay", "home", "client")}
    for home in homes.values():
        home.mkdir()
    quiet = {"gossip.lan_discovery": "false"}
    boot = {"bootstrap": f"{RELAY_IP}:8088"}
    _configure("pub1", homes["relay"], {**quiet, "name": "relay", "relay.enabled": "true",
               "trust.mode": "open", "behind_nat": "false",
               "gossip.advertise": RELAY_IP})  # fmt: skip
    relay_id = Identity.load(Home(homes["relay"]).identity_dir).node_id
    _configure("home1", homes["home"], {**quiet, **boot, "name": "home", "trust.mode": "open",
               "gossip.advertise": HOME_IP, "relay.use": relay_id,
               "containers.docker_host": home_docker.socket})  # fmt: skip
    _configure("pub2", homes["client"], {**quiet, **boot, "name": "client",
               "behind_nat": "false", "gossip.advertise": CLIENT_IP})  # fmt: skip
    nodes = [
        _start("pub1", homes["relay"], RELAY_IP),
        _start("home1", homes["home"], HOME_IP),
        _start("pub2", homes["client"], CLIENT_IP),
    ]
    try:

        def home_reachable() -> bool:
            found = _json("pub2", homes["client"], "peers", "list") or []
            view = [v for v in found if v["name"] == "home"]
            return bool(view) and view[0]["state"] == "alive" and bool(view[0]["public_api"])

        _wait("the NAT'd node's API in the client's table", home_reachable, 60, *homes.values())
        upload = tmp_path / "upload"
        (upload / "in").mkdir(parents=True)
        blob = os.urandom(2 * 1024 * 1024 + 5)
        (upload / "in" / "data.bin").write_bytes(blob)
        results = tmp_path / "results"
        command = "mkdir out && cp in/data.bin out/copy.bin && echo wrote $(wc -c < out/copy.bin)"
        ran = _cli("pub2", homes["client"], "run", "--peer", "home", "--upload", str(upload),
                   "--download", "out", "--to", str(results), "--", "sh", "-c", command,
                   timeout=240)  # fmt: skip
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n{_logs(*homes.values())}"
        assert f"wrote {len(blob)}" in ran.stdout
        assert (results / "out" / "copy.bin").read_bytes() == blob
        listed = _json("pub2", homes["client"], "jobs", "list")
        assert [job["state"] for job in listed] == ["succeeded"]
        container = listed[0]["placements"][0]["container"]
        # The rank's container was reached at the relay, never at home1's own address.
        assert container["ssh"]["host"] == RELAY_IP
        assert container["peer"] == Identity.load(Home(homes["home"]).identity_dir).node_id
        left = home_docker.docker("ps", "-aq")
        assert left.returncode == 0, left.stderr
        assert left.stdout.split() == [], "the NAT'd peer kept the job's container"
    finally:
        for process in nodes:
            process.terminate()
        for process in nodes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
