"""Invite and join across the NAT, in the shared test bed's network namespaces.

An inviter node on public host pub1 (a real ``p2prc start`` process) prints a token with
``p2prc invite``; a node home behind home1's NAT router runs ``p2prc join TOKEN`` and at
once makes signed calls that need trust to the inviter, which accepts them without a
restart: ``whoami`` and ``specs``, then ``p2prc container create`` of a real container on
the inviter's own Docker daemon inside pub1's namespace (skipped where there is no dockerd
or no image). A second home on home1 joining with the same token is refused with a one-line
error, and its signed call stays refused.
"""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc.containers.images import DEFAULT_IMAGE
from tests.netns._bed import Bed, NamespaceDocker

pytestmark = pytest.mark.netns

# A prefix of its own: the other netns tests' beds (p2t, p2j) may be up at the same time.
BED = Bed("p2i", public=1)
INVITER_IP, HOME_IP = "198.51.100.11", "192.168.1.10"
API = f"http://{INVITER_IP}:8088"
# Run as the joiner: its signed whoami and specs calls to the inviter, as JSON.
CALL = (
    "import json,sys,p2prc\n"
    "with p2prc.Client(sys.argv[1], home=sys.argv[2], timeout=20) as c:\n"
    " print(json.dumps([c.whoami().node_id, c.specs().cpu.cores > 0]))"
)


@pytest.fixture
def testbed() -> Iterator[NamespaceDocker | None]:
    """The test bed, with a Docker daemon in pub1 holding the image where that can be."""
    with BED.running():
        if shutil.which("dockerd") is None or not _has_image():
            yield None
        else:
            with NamespaceDocker(BED.ns("pub1"), bip="172.31.2.1/24").running(
                (DEFAULT_IMAGE,)
            ) as docker:
                yield docker


def _has_image() -> bool:
    inspect = ["docker", "image", "inspect", DEFAULT_IMAGE]
    return subprocess.run(inspect, capture_output=True, timeout=30, check=False).returncode == 0


def _call(home: Path) -> subprocess.CompletedProcess[str]:
    """The joiner's signed calls to the inviter, from home1 through the NAT."""
    return BED.run("home1", sys.executable, "-c", CALL, API, str(home),
                   env={"P2PRC_HOME": str(home)})  # fmt: skip


def test_a_natted_node_joins_by_token_and_is_trusted_at_once(
    testbed: NamespaceDocker | None, tmp_path: Path
) -> None:
    inviter, joiner, late = tmp_path / "inviter", tmp_path / "joiner", tmp_path / "late"
    for ns, home, name in (("pub1", inviter, "alice"), ("home1", joiner, "bob"),
                           ("home1", late, "carol")):  # fmt: skip
        BED.cli(ns, home, "init", check=True)
        BED.cli(ns, home, "config", "set", "name", name, check=True)
        BED.cli(ns, home, "config", "set", "gossip.lan_discovery", "false", check=True)
    BED.cli("pub1", inviter, "config", "set", "gossip.advertise", INVITER_IP, check=True)
    BED.cli("pub1", inviter, "config", "set", "behind_nat", "false", check=True)
    if testbed is not None:
        BED.cli(
            "pub1", inviter, "config", "set", "containers.docker_host", testbed.socket, check=True
        )
    for home in (joiner, late):
        BED.cli("home1", home, "config", "set", "gossip.advertise", HOME_IP, check=True)
    nodes = [BED.start("pub1", inviter, INVITER_IP, 8088),
             BED.start("home1", joiner, HOME_IP, 8088),
             BED.start("home1", late, HOME_IP, 8089)]  # fmt: skip
    try:
        for (ns, home), node in zip(
            (("pub1", inviter), ("home1", joiner), ("home1", late)), nodes, strict=True
        ):
            deadline = time.monotonic() + 30
            while BED.cli(ns, home, "status").returncode != 0:
                assert node.poll() is None, BED.logs(home)
                assert time.monotonic() < deadline, BED.logs(home)
                time.sleep(0.5)
        before = _call(joiner)
        assert before.returncode != 0
        assert "NotTrusted" in before.stderr, before.stderr[-500:]

        invite = BED.cli(
            "pub1", inviter, "--json", "invite", "--ttl", "10m", "--uses", "1", check=True
        )
        token = json.loads(invite.stdout)["token"]
        joined = BED.json("home1", joiner, "join", token, check=True)
        inviter_id = BED.json("pub1", inviter, "id", check=True)["node_id"]
        joiner_id = BED.json("home1", joiner, "id", check=True)["node_id"]
        assert joined["node_id"] == inviter_id

        after = _call(joiner)  # the inviter was not restarted
        assert after.returncode == 0, after.stderr[-500:] + BED.logs(inviter)
        assert json.loads(after.stdout) == [joiner_id, True]
        if testbed is not None:  # a real container on the inviter, from behind the NAT
            made = BED.cli(
                "home1", joiner, "--json", "container", "create", f"{INVITER_IP}:8088", check=True
            )
            view = json.loads(made.stdout)
            assert view["peer"] == inviter_id
            assert testbed.docker("ps", "-q").stdout.split() != [], testbed.log()
            BED.cli("home1", joiner, "container", "rm", view["id"], check=True)
            assert testbed.docker("ps", "-aq").stdout.split() == []
        listed = BED.json("pub1", inviter, "trust", "list", check=True)
        assert [(row["node_id"], row["name"]) for row in listed] == [(joiner_id, "bob")]

        again = BED.cli("home1", late, "join", token)
        assert again.returncode == 1
        assert (
            again.stderr.strip()
            == "NotTrusted: this invite token was already used; ask for a new one"
        )
        refused = _call(late)
        assert refused.returncode != 0
        assert "NotTrusted" in refused.stderr, refused.stderr[-500:]
    finally:
        BED.stop(nodes)
