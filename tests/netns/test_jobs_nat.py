"""A job on a NAT'd peer, in the shared test bed's network namespaces, with real Docker.

A relay node on public host pub1; a node on home1 behind the NAT router with its own
Docker daemon inside home1's namespace (as the test bed's README shows), so its containers'
SSH ports exist only on home1 and are published through the relay; a submitting node on
pub2 runs ``p2prc run --peer home --upload DIR --download out``: the upload, the command
and the download all go through the relay, the output comes back byte-exact, the job
succeeds and the NAT'd peer's daemon holds no container afterwards.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc.config import Home
from p2prc.containers.images import DEFAULT_IMAGE
from p2prc.identity import Identity
from tests.netns._bed import Bed, NamespaceDocker

pytestmark = pytest.mark.netns

# A prefix of its own: the other netns tests' bed (p2t) may be up at the same time.
BED = Bed("p2j", public=2)
RELAY_IP, CLIENT_IP, HOME_IP = "198.51.100.11", "198.51.100.12", "192.168.1.10"


@pytest.fixture
def home_docker() -> Iterator[NamespaceDocker]:
    """The test bed, with a Docker daemon inside home1's namespace holding the image."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("needs dockerd and the docker CLI")
    if subprocess.run(["docker", "image", "inspect", DEFAULT_IMAGE], capture_output=True,
                      timeout=30, check=False).returncode != 0:  # fmt: skip
        pytest.skip(f"{DEFAULT_IMAGE} is not built; run 'p2prc images bootstrap'")
    with BED.running(), NamespaceDocker(BED.ns("home1")).running((DEFAULT_IMAGE,)) as daemon:
        yield daemon


@pytest.mark.timeout(420)
def test_a_job_on_a_nated_peer_through_its_relay(
    home_docker: NamespaceDocker, tmp_path: Path
) -> None:
    homes = {name: tmp_path / name for name in ("relay", "home", "client")}
    for home in homes.values():
        home.mkdir()
    quiet = {"gossip.lan_discovery": "false"}
    boot = {"bootstrap": f"{RELAY_IP}:8088"}
    BED.configure("pub1", homes["relay"], {**quiet, "name": "relay", "relay.enabled": "true",
                  "trust.mode": "open", "behind_nat": "false",
                  "gossip.advertise": RELAY_IP})  # fmt: skip
    relay_id = Identity.load(Home(homes["relay"]).identity_dir).node_id
    BED.configure("home1", homes["home"], {**quiet, **boot, "name": "home", "trust.mode": "open",
                  "gossip.advertise": HOME_IP, "relay.use": relay_id,
                  "containers.docker_host": home_docker.socket})  # fmt: skip
    BED.configure("pub2", homes["client"], {**quiet, **boot, "name": "client",
                  "behind_nat": "false", "gossip.advertise": CLIENT_IP})  # fmt: skip
    nodes = [
        BED.start("pub1", homes["relay"], RELAY_IP),
        BED.start("home1", homes["home"], HOME_IP),
        BED.start("pub2", homes["client"], CLIENT_IP),
    ]
    try:

        def home_reachable() -> bool:
            found = BED.json("pub2", homes["client"], "peers", "list") or []
            view = [v for v in found if v["name"] == "home"]
            return bool(view) and view[0]["state"] == "alive" and bool(view[0]["public_api"])

        BED.wait("the NAT'd node's API in the client's table", home_reachable, 60, *homes.values())
        upload = tmp_path / "upload"
        (upload / "in").mkdir(parents=True)
        blob = os.urandom(2 * 1024 * 1024 + 5)
        (upload / "in" / "data.bin").write_bytes(blob)
        results = tmp_path / "results"
        command = "mkdir out && cp in/data.bin out/copy.bin && echo wrote $(wc -c < out/copy.bin)"
        ran = BED.cli("pub2", homes["client"], "run", "--peer", "home", "--upload", str(upload),
                      "--download", "out", "--to", str(results), "--", "sh", "-c", command,
                      timeout=240)  # fmt: skip
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n{BED.logs(*homes.values())}"
        assert f"wrote {len(blob)}" in ran.stdout
        assert (results / "out" / "copy.bin").read_bytes() == blob
        listed = BED.json("pub2", homes["client"], "jobs", "list")
        assert [job["state"] for job in listed] == ["succeeded"]
        container = listed[0]["placements"][0]["container"]
        # The rank's container was reached at the relay, never at home1's own address.
        assert container["ssh"]["host"] == RELAY_IP
        assert container["peer"] == Identity.load(Home(homes["home"]).identity_dir).node_id
        left = home_docker.docker("ps", "-aq")
        assert left.returncode == 0, left.stderr
        assert left.stdout.split() == [], "the NAT'd peer kept the job's container"
    finally:
        BED.stop(nodes)
