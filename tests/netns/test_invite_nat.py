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
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc.containers.images import DEFAULT_IMAGE
from tests.netns._bed import NamespaceDocker

pytestmark = pytest.mark.netns

TESTBED = Path(__file__).resolve().parents[3] / "shared" / "testbed" / "netns-nat.sh"
# A prefix of its own: the other netns tests' beds (p2t, p2j) may be up at the same time.
PREFIX = "p2i"
ENV = {**os.environ, "TB_PREFIX": PREFIX, "TB_PUBLIC": "1", "TB_SITES": "1"}
INVITER_IP, HOME_IP = "198.51.100.11", "192.168.1.10"
API = f"http://{INVITER_IP}:8088"
# Run as the joiner: its signed whoami and specs calls to the inviter, as JSON.
CALL = (
    "import json,sys,p2prc\n"
    "with p2prc.Client(sys.argv[1], home=sys.argv[2], timeout=20) as c:\n"
    " print(json.dumps([c.whoami().node_id, c.specs().cpu.cores > 0]))"
)


def _bed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args], env=ENV, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture
def testbed() -> Iterator[NamespaceDocker | None]:
    """The test bed, with a Docker daemon in pub1 holding the image where that can be."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    if not TESTBED.is_file():
        pytest.skip(f"no test bed at {TESTBED}")
    up = _bed("up")
    if up.returncode != 0:
        pytest.skip(f"test bed did not come up: {up.stderr.strip()[-300:]}")
    try:
        if shutil.which("dockerd") is None or not _has_image():
            yield None
        else:
            with NamespaceDocker(f"{PREFIX}-pub1", bip="172.31.2.1/24").running(
                (DEFAULT_IMAGE,)
            ) as docker:
                yield docker
    finally:
        _bed("down")


def _has_image() -> bool:
    inspect = ["docker", "image", "inspect", DEFAULT_IMAGE]
    return subprocess.run(inspect, capture_output=True, timeout=30, check=False).returncode == 0


def _in(ns: str, home: Path, *command: str) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}-{ns}", "env", f"P2PRC_HOME={home}", *command]


def _cli(ns: str, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = _in(ns, home, sys.executable, "-m", "p2prc", *args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{args}: {result.stderr}")
    return result


def _call(home: Path) -> subprocess.CompletedProcess[str]:
    """The joiner's signed calls to the inviter, from home1 through the NAT."""
    command = _in("home1", home, sys.executable, "-c", CALL, API, str(home))
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _start(ns: str, home: Path, host: str, port: int) -> subprocess.Popen[bytes]:
    """A node in namespace ``ns``; its log goes to ``home/node.log`` (shown on failures)."""
    command = _in(ns, home, sys.executable, "-m", "p2prc", "--debug", "start", "--host", host,
                  "--port", str(port))  # fmt: skip
    with (home / "node.log").open("ab") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def _log(home: Path, lines: int = 40) -> str:
    log = home / "node.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def test_a_natted_node_joins_by_token_and_is_trusted_at_once(
    testbed: NamespaceDocker | None, tmp_path: Path
) -> None:
    inviter, joiner, late = tmp_path / "inviter", tmp_path / "joiner", tmp_path / "late"
    for ns, home, name in (("pub1", inviter, "alice"), ("home1", joiner, "bob"),
                           ("home1", late, "carol")):  # fmt: skip
        _cli(ns, home, "init")
        _cli(ns, home, "config", "set", "name", name)
        _cli(ns, home, "config", "set", "gossip.lan_discovery", "false")
    _cli("pub1", inviter, "config", "set", "gossip.advertise", INVITER_IP)
    _cli("pub1", inviter, "config", "set", "behind_nat", "false")
    if testbed is not None:
        _cli("pub1", inviter, "config", "set", "containers.docker_host", testbed.socket)
    for home in (joiner, late):
        _cli("home1", home, "config", "set", "gossip.advertise", HOME_IP)
    nodes = [_start("pub1", inviter, INVITER_IP, 8088), _start("home1", joiner, HOME_IP, 8088),
             _start("home1", late, HOME_IP, 8089)]  # fmt: skip
    try:
        for (ns, home), node in zip(
            (("pub1", inviter), ("home1", joiner), ("home1", late)), nodes, strict=True
        ):
            deadline = time.monotonic() + 30
            while _cli(ns, home, "status", check=False).returncode != 0:
                assert node.poll() is None, _log(home)
                assert time.monotonic() < deadline, _log(home)
                time.sleep(0.5)
        before = _call(joiner)
        assert before.returncode != 0
        assert "NotTrusted" in before.stderr, before.stderr[-500:]

        invite = _cli("pub1", inviter, "--json", "invite", "--ttl", "10m", "--uses", "1")
        token = json.loads(invite.stdout)["token"]
        joined = json.loads(_cli("home1", joiner, "--json", "join", token).stdout)
        inviter_id = json.loads(_cli("pub1", inviter, "--json", "id").stdout)["node_id"]
        joiner_id = json.loads(_cli("home1", joiner, "--json", "id").stdout)["node_id"]
        assert joined["node_id"] == inviter_id

        after = _call(joiner)  # the inviter was not restarted
        assert after.returncode == 0, after.stderr[-500:] + _log(inviter)
        assert json.loads(after.stdout) == [joiner_id, True]
        if testbed is not None:  # a real container on the inviter, from behind the NAT
            made = _cli("home1", joiner, "--json", "container", "create", f"{INVITER_IP}:8088")
            view = json.loads(made.stdout)
            assert view["peer"] == inviter_id
            assert testbed.docker("ps", "-q").stdout.split() != [], testbed.log()
            _cli("home1", joiner, "container", "rm", view["id"])
            assert testbed.docker("ps", "-aq").stdout.split() == []
        listed = json.loads(_cli("pub1", inviter, "--json", "trust", "list").stdout)
        assert [(row["node_id"], row["name"]) for row in listed] == [(joiner_id, "bob")]

        again = _cli("home1", late, "join", token, check=False)
        assert again.returncode == 1
        assert (
            again.stderr.strip()
            == "NotTrusted: this invite token was already used; ask for a new one"
        )
        refused = _call(late)
        assert refused.returncode != 0
        assert "NotTrusted" in refused.stderr, refused.stderr[-500:]
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(timeout=5)
