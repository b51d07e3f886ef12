"""A Dask cluster whose worker is on a NAT'd peer, in the shared test bed, with real Docker.

A relay node on public host pub1; a node on home1 behind the NAT router, with its own Docker
daemon inside home1's namespace, so its containers exist only there and are reached through
the relay; the owner on pub2 (a Docker daemon of its own too) runs the scheduler on its own
host and the worker on home. A ``distributed.Client`` in pub2's namespace computes through
the owner's hub: every Dask byte between scheduler and worker crosses the NAT inside the
worker container's SSH session, through the relay. ``cluster rm`` leaves no container.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc.config import Home
from p2prc.containers.images import DEFAULT_IMAGE, image_exists
from p2prc.identity import Identity
from tests.netns._bed import Bed, NamespaceDocker

pytest.importorskip("distributed")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.docker,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# A prefix of its own: the other netns tests' beds may be up at the same time.
BED = Bed("p2d", public=2)
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


@pytest.fixture
def daemons() -> Iterator[tuple[NamespaceDocker, NamespaceDocker, str]]:
    """The test bed, with Docker daemons in home1 and pub2 holding the Dask image."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("needs dockerd and the docker CLI")
    if not image_exists(DEFAULT_IMAGE):
        pytest.skip(f"{DEFAULT_IMAGE} is not built; run 'p2prc images bootstrap'")
    from p2prc.cluster.image import ensure_dask_image

    image = ensure_dask_image()
    with (
        BED.running(),
        NamespaceDocker(BED.ns("home1")).running((image,)) as home,
        NamespaceDocker(BED.ns("pub2"), bip="172.31.2.1/24").running((image,)) as owner,
    ):
        yield home, owner, image


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
    BED.configure("pub1", homes["relay"], {**quiet, "name": "relay", "relay.enabled": "true",
                  "trust.mode": "open", "behind_nat": "false",
                  "gossip.advertise": RELAY_IP})  # fmt: skip
    relay_id = Identity.load(Home(homes["relay"]).identity_dir).node_id
    BED.configure("home1", homes["home"], {**quiet, **boot, "name": "home",
                  "trust.mode": "open", "gossip.advertise": HOME_IP, "relay.use": relay_id,
                  "containers.docker_host": home_docker.socket})  # fmt: skip
    BED.configure("pub2", homes["owner"], {**quiet, **boot, "name": "owner",
                  "behind_nat": "false", "gossip.advertise": OWNER_IP,
                  "containers.docker_host": owner_docker.socket})  # fmt: skip
    nodes = [
        BED.start("pub1", homes["relay"], RELAY_IP),
        BED.start("home1", homes["home"], HOME_IP),
        BED.start("pub2", homes["owner"], OWNER_IP),
    ]
    try:

        def home_reachable() -> bool:
            listed = BED.cli("pub2", homes["owner"], "--json", "peers", "list")
            found = json.loads(listed.stdout) if listed.returncode == 0 else []
            view = [v for v in found if v["name"] == "home"]
            return bool(view) and view[0]["state"] == "alive" and bool(view[0]["public_api"])

        BED.wait("the NAT'd node's API in the owner's table", home_reachable, 60, *homes.values())
        created = BED.cli("pub2", homes["owner"], "--json", "cluster", "create", "--workers", "1",
                          "--peer", "home", "--image", image, timeout=300)  # fmt: skip
        assert created.returncode == 0, (
            f"{created.stdout}\n{created.stderr}\n{BED.logs(*homes.values())}"
        )
        view = json.loads(created.stdout)
        assert view["state"] == "running"
        [worker] = view["workers"]
        assert worker["peer"] == "home"
        # The worker's container was reached at the relay, never at home1's own address.
        assert worker["container"]["ssh"]["host"] == RELAY_IP
        assert view["scheduler_address"].startswith("tls://127.0.0.1:")

        ran = subprocess.run(
            BED.command("pub2", sys.executable, "-c", CLIENT, json.dumps(view)),
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n{BED.logs(*homes.values())}"
        answer = json.loads(ran.stdout.strip().splitlines()[-1])
        assert answer == {
            "workers": 1,
            "total": 4_000_000,
            "squares": sum(x * x for x in range(200)),
        }

        removed = BED.json("pub2", homes["owner"], "cluster", "rm", view["id"], timeout=120,
                           check=True)  # fmt: skip
        assert removed["state"] == "closed"
        for daemon in (home_docker, owner_docker):
            left = daemon.docker("ps", "-aq")
            assert left.returncode == 0, left.stderr
            assert left.stdout.split() == [], f"{daemon.ns} kept a cluster container"
    finally:
        BED.stop(nodes)
