"""A Dask cluster whose worker is on a NAT'd peer, in the shared test bed, with real Docker.

A relay node on public host pub1; a node on home1 behind the NAT router, with its own Docker
daemon inside home1's namespace, so its containers exist only there and are reached through
the relay; the owner on pub2 (a Docker daemon of its own too) runs the scheduler on its own
host and the worker on home. A ``distributed.Client`` in pub2's namespace computes through
the owner's hub: every Dask byte between scheduler and worker crosses the NAT inside the
worker container's SSH session, through the relay. ``cluster rm`` leaves no container.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2prc.config import Home
from p2prc.containers.images import DEFAULT_IMAGE, image_exists
from p2prc.identity import Identity
from tests.netns._bed import NamespaceDocker

pytest.importorskip("distributed")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.docker,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TESTBED = Path(__file__).resolve().parents[3] / "shared" / "testbed" / "netns-nat.sh"
# A prefix of its own: the other netns tests' beds may be up at the same time.
PREFIX = "p2d"
ENV = {**os.environ, "TB_PREFIX": PREFIX, "TB_PUBLIC": "2", "TB_SITES": "1"}
RELAY_IP, OWNER_IP, HOME_IP = "198.51.100.11", "198.51.100.12", "192.168.1.10"

# Run inside pub2's namespace: the owner's own client, as a user would write it.
CLIENT = textwrap.dedent(
    """
    import json, sys
    import dask.array as da
    from distributed import Client, Security
    view = json.loads(sys.argv[1])
    tls = view["security"]
    security = Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert_file"],
                        tls_client_key=tls["key_file"], require_encryption=True)
    with Client(view["scheduler_address"], security=security, timeout=60) as client:
        workers = client.scheduler_info()["workers"]
        total = da.ones((4_000_000,), chunks=500_000).sum().compute()
        squares = client.gather(client.map(lambda x: x * x, range(200)))
        print(json.dumps({"workers": len(workers), "total": int(total),
                          "squares": sum(squares)}))
    """
)


def _bed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args], env=ENV, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture
def daemons() -> Iterator[tuple[NamespaceDocker, NamespaceDocker, str]]:
    """The test bed, with Docker daemons in home1 and pub2 holding the Dask image."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    if not TESTBED.is_file():
        pytest.skip(f"no test bed at {TESTBED}")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("needs dockerd and the docker CLI")
    if not image_exists(DEFAULT_IMAGE):
        pytest.skip(f"{DEFAULT_IMAGE} is not built; run 'p2prc images bootstrap'")
    from p2prc.cluster.image import ensure_dask_image

    image = ensure_dask_image()
    up = _bed("up")
    if up.returncode != 0:
        pytest.skip(f"test bed did not come up: {up.stderr.strip()[-300:]}")
    try:
        with (
            NamespaceDocker(f"{PREFIX}-home1").running((image,)) as home,
            NamespaceDocker(f"{PREFIX}-pub2", bip="172.31.2.1/24").running((image,)) as owner,
        ):
            yield home, owner, image
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


def _json(ns: str, home: Path, *args: str, timeout: float = 60) -> Any:
    result = _cli(ns, home, "--json", *args, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def _wait(what: str, check: Callable[[], bool], seconds: float, *homes: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{_logs(*homes)}")


@pytest.mark.timeout(600)
def test_a_worker_on_a_nated_peer_through_its_relay(
    daemons: tuple[NamespaceDocker, NamespaceDocker, str], tmp_path: Path
) -> None:
    home_docker, owner_docker, image = daemons
    homes = {name: tmp_path / name for name in ("relay", "home", "owner")}
    for home in homes.values():
        home.mkdir()
    quiet = {"gossip.lan_discovery": "false"}
    boot = {"bootstrap": f"{RELAY_IP}:8088"}
    # No containers.images offer: default nodes offer Dask images (containers.dask), and
    # the owner asks the home node for the image (its daemon has it loaded) first.
    _configure("pub1", homes["relay"], {**quiet, "name": "relay", "relay.enabled": "true",
               "trust.mode": "open", "behind_nat": "false",
               "gossip.advertise": RELAY_IP})  # fmt: skip
    relay_id = Identity.load(Home(homes["relay"]).identity_dir).node_id
    _configure("home1", homes["home"], {**quiet, **boot, "name": "home",
               "trust.mode": "open", "gossip.advertise": HOME_IP, "relay.use": relay_id,
               "containers.docker_host": home_docker.socket})  # fmt: skip
    _configure("pub2", homes["owner"], {**quiet, **boot, "name": "owner",
               "behind_nat": "false", "gossip.advertise": OWNER_IP,
               "containers.docker_host": owner_docker.socket})  # fmt: skip
    nodes = [
        _start("pub1", homes["relay"], RELAY_IP),
        _start("home1", homes["home"], HOME_IP),
        _start("pub2", homes["owner"], OWNER_IP),
    ]
    try:

        def home_reachable() -> bool:
            listed = _cli("pub2", homes["owner"], "--json", "peers", "list")
            found = json.loads(listed.stdout) if listed.returncode == 0 else []
            view = [v for v in found if v["name"] == "home"]
            return bool(view) and view[0]["state"] == "alive" and bool(view[0]["public_api"])

        _wait("the NAT'd node's API in the owner's table", home_reachable, 60, *homes.values())
        created = _cli("pub2", homes["owner"], "--json", "cluster", "create", "--workers", "1",
                       "--peer", "home", "--image", image, timeout=300)  # fmt: skip
        assert created.returncode == 0, (
            f"{created.stdout}\n{created.stderr}\n{_logs(*homes.values())}"
        )
        view = json.loads(created.stdout)
        assert view["state"] == "running"
        [worker] = view["workers"]
        assert worker["peer"] == "home"
        # The worker's container was reached at the relay, never at home1's own address.
        assert worker["container"]["ssh"]["host"] == RELAY_IP
        assert view["scheduler_address"].startswith("tls://127.0.0.1:")

        ran = subprocess.run(
            ["ip", "netns", "exec", f"{PREFIX}-pub2", sys.executable, "-c", CLIENT,
             json.dumps(view)],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n{_logs(*homes.values())}"
        answer = json.loads(ran.stdout.strip().splitlines()[-1])
        assert answer == {
            "workers": 1,
            "total": 4_000_000,
            "squares": sum(x * x for x in range(200)),
        }

        removed = _json("pub2", homes["owner"], "cluster", "rm", view["id"], timeout=120)
        assert removed["state"] == "closed"
        for daemon in (home_docker, owner_docker):
            left = daemon.docker("ps", "-aq")
            assert left.returncode == 0, left.stderr
            assert left.stdout.split() == [], f"{daemon.ns} kept a cluster container"
    finally:
        for process in nodes:
            process.terminate()
        for process in nodes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
