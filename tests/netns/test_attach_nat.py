"""Attached hosts (#16) in the namespace test bed: a board that runs only OpenSSH, behind a
NAT router, reached from a public node through a relay and one of two gateways on its LAN.

The bed (``tests/netns/_attach_bed.py``): ``TB_HOSTS=3``; a real sshd on ``home1-3`` (no
p2prc there), gateway nodes on ``home1`` and ``home1-2`` that both attach it as
``morello``, a relay on ``pub1``, a client node (allowed) and a stranger node (not allowed)
on ``pub2``. The tests share one bed and run in file order; the last one kills a gateway.
"""

import json
import os
import platform
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns._attach_bed import (
    BOARD,
    BOARD_IP,
    CLIENT_IP,
    GATEWAYS,
    GW2_IP,
    GW2_WEB_PORT,
    OTHER_PORT,
    WEB_PORT,
    AttachBed,
    NetnsSshd,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

# Run in pub2 as a node home: open_route to PORT of the board's merged view (its name
# replaced by NAME when given), then an HTTP request through it; the outcome as JSON.
ROUTE = """
import asyncio, json, sys
from p2prc.attach.models import AttachedHost
from p2prc.attach.proxy import open_route
from p2prc.config import Home
from p2prc.errors import P2PRCError
from p2prc.identity import Identity

home, view, port, name = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host = AttachedHost.model_validate({**view, "name": name or view["name"]})

async def main():
    try:
        reader, writer, gateway = await open_route(Identity.load(Home(home).identity_dir),
                                                   host, port)
    except P2PRCError as exc:
        return {"error": type(exc).__name__, "code": exc.code, "message": str(exc)}
    writer.write(b"GET /hello.txt HTTP/1.0\\r\\nHost: board\\r\\n\\r\\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return {"gateway": gateway.name, "answer": answer.decode(errors="replace")}

print(json.dumps(asyncio.run(main())))
"""
PLAYBOOK = """\
- name: Mark the board
  hosts: all
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - name: Write the addresses of the host it runs on
      ansible.builtin.shell: "ip -4 -o addr show > {{ marker }}"
"""
FETCH = (
    "import sys,urllib.request;"
    "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"
)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttachBed]:
    with AttachBed(tmp_path_factory.mktemp("attach")).running() as up:
        up.wait_routes(set(GATEWAYS), name="stranger")
        yield up


def _ok(done: subprocess.CompletedProcess[str], bed: AttachBed) -> str:
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{bed.logs()}"
    return done.stdout


def _board_view(bed: AttachBed, name: str = "client") -> dict[str, Any]:
    [view] = [h for h in bed.json(name, "attached", check=True) if h["name"] == BOARD]
    return dict(view)


def _signed(views: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What the signed records say of each host (not the table's live state or RTT)."""
    return [
        (v["name"], v["host_key"], v["ssh_port"], v["user"], v["ports"],
         sorted((g["node_id"], g["endpoint"], g["version"]) for g in v["gateways"]),
         v.get("local"))
        for v in views
    ]  # fmt: skip


def _route(bed: AttachBed, port: int, name: str = "", as_node: str = "client") -> Any:
    view = _board_view(bed, as_node)
    done = bed.bed.python("pub2", ROUTE, bed.homes[as_node], json.dumps(view), port, name)
    assert done.returncode == 0, done.stderr[-1500:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ssh_from_a_public_node_through_the_relay_and_a_gateway(bed: AttachBed) -> None:
    view = _board_view(bed)
    assert view["host_key"] == bed.board.host_key
    assert (view["ssh_port"], view["user"], view["ports"]) == (22, "root", [WEB_PORT])
    assert sorted(g["name"] for g in view["gateways"]) == sorted(GATEWAYS)
    # Both gateways are behind the NAT: the endpoints the client dials are the relay's.
    assert all(g["endpoint"].startswith("198.51.100.11:") for g in view["gateways"]), view
    # Specs were read over SSH with the gateway's node key (authorized on the board).
    assert (view["arch"], view["cores"]) == (platform.machine(), os.cpu_count())
    # The board shows in peers list, with its gateways.
    assert BOARD in _ok(bed.cli("client", "peers", "list"), bed)

    before = len(bed.board.logins())
    out = _ok(bed.ssh("uname", "-a"), bed)
    assert out.startswith("Linux ")
    assert platform.node() in out
    # It ran on the board itself (its namespace's address), logged in from a gateway.
    assert f"inet {BOARD_IP}/" in _ok(bed.ssh("ip", "-4", "-o", "addr", "show"), bed)
    logins = bed.board.logins()[before:]
    assert len(logins) == 2, logins
    assert set(logins) <= {ip for _, ip in GATEWAYS.values()}, logins
    # Plain ssh with the block from `p2prc ssh --config` (scp, rsync, Ansible do the same).
    [block] = bed.json("client", "ssh", "--config", BOARD, check=True)
    config = bed.root / "ssh_config"
    config.write_text(block["config"])
    plain = bed.bed.run("pub2", "ssh", "-F", str(config), "-o", "BatchMode=yes", BOARD, "echo",
                        "plain ssh")  # fmt: skip
    assert _ok(plain, bed).strip() == "plain ssh"


def test_the_host_key_is_pinned_and_a_changed_key_is_refused(bed: AttachBed) -> None:
    pinned = bed.board.host_key
    known = (bed.homes["client"] / "known_hosts").read_text()
    assert f"p2prc-attached-{BOARD} {pinned}" in known
    bed.board.rekey()
    try:
        assert bed.board.host_key != pinned
        refused = bed.ssh("true")
        assert refused.returncode != 0
        assert "Host key verification failed" in refused.stderr, refused.stderr[-1500:]
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    finally:
        bed.board.restore_key()
    assert bed.board.host_key == pinned
    _ok(bed.ssh("true"), bed)


def test_a_key_the_gateways_do_not_allow_is_refused(bed: AttachBed) -> None:
    # The board's sshd would let the stranger in: only the gateways' allow lists stop it.
    before = len(bed.board.logins())
    refused = bed.ssh("true", name="stranger")
    assert refused.returncode != 0
    assert "AttachRefused" in refused.stderr, refused.stderr[-1500:]
    assert len(bed.board.logins()) == before  # no byte reached the board
    mapped = bed.cli("stranger", "map-port", str(WEB_PORT), "--remote", BOARD)
    assert mapped.returncode != 0, mapped.stdout
    assert mapped.stderr.strip()
    # Allowed on both gateways, it gets in; denied again, it is refused again.
    for gateway in GATEWAYS:
        _ok(bed.cli(gateway, "attach", BOARD, "--allow", "stranger"), bed)
    assert _ok(bed.ssh("echo", "in", name="stranger"), bed).strip() == "in"
    for gateway in GATEWAYS:
        _ok(bed.cli(gateway, "attach", BOARD, "--deny", "stranger"), bed)
    again = bed.ssh("true", name="stranger")
    assert again.returncode != 0
    assert "AttachRefused" in again.stderr, again.stderr[-1500:]


def test_only_attached_ports_are_forwarded(bed: AttachBed) -> None:
    served = _route(bed, WEB_PORT)
    assert served.get("gateway") in GATEWAYS, served
    assert "hello from the board" in served["answer"]
    # Another port of the board (a web server listens there), a port of the second
    # gateway's host (one listens there too, by its name or its address), a name nobody
    # attached: each is refused by every gateway with the same answer.
    asks = [(OTHER_PORT, ""), (GW2_WEB_PORT, "gw2"), (GW2_WEB_PORT, GW2_IP), (22, "nobody")]
    for port, name in asks:
        refused = _route(bed, port, name)
        assert refused.get("error") == "AttachRefused", (port, name, refused)
        assert refused["code"] == "attach_refused"
    # The servers are there: a node on that LAN reaches them directly.
    here = f"http://{BOARD_IP}:{OTHER_PORT}/hello.txt"
    assert "hello from the board" in bed.bed.output("home1", FETCH, here)
    assert "hello" in bed.bed.output("home1", FETCH, f"http://{GW2_IP}:{GW2_WEB_PORT}/hello.txt")
    # The ProxyCommand refuses a port that was not attached, too.
    proxy = bed.cli("client", "ssh", "--proxy", BOARD, "--port", str(OTHER_PORT))
    assert proxy.returncode != 0
    assert "AttachRefused" in proxy.stderr, proxy.stderr[-800:]


def test_map_port_remote_serves_a_web_server_of_the_board(bed: AttachBed) -> None:
    mapped = bed.json("client", "map-port", str(WEB_PORT), "--remote", BOARD, check=True)
    address = mapped["EntireAddress"]
    assert address.startswith("198.51.100.11:"), mapped  # the serving gateway's relay
    assert bed.bed.output("pub2", FETCH, f"http://{address}/hello.txt").strip() == (
        "hello from the board"
    )
    refused = bed.cli("client", "map-port", str(OTHER_PORT), "--remote", BOARD)
    assert refused.returncode != 0, refused.stdout
    assert refused.stderr.strip()


def test_a_plugin_writes_a_file_on_the_board(bed: AttachBed) -> None:
    plugin = bed.root / "mark-plugin"
    plugin.mkdir()
    (plugin / "plugin.toml").write_text(
        'name = "mark"\nsummary = "write where it ran"\n[variables]\nmarker = "a path"\n'
    )
    # The file says where the task ran: the board's own namespace has BOARD_IP.
    (plugin / "site.yml").write_text(PLAYBOOK)
    _ok(bed.cli("client", "plugin", "pull", str(plugin)), bed)
    marker = bed.root / "marker.txt"
    before = len(bed.board.logins())
    ran = bed.cli("client", "--json", "plugin", "run", "mark", BOARD, "--var",
                  f"marker={marker}", timeout=240)  # fmt: skip
    run = json.loads(_ok(ran, bed))
    assert run["ok"] is True, run
    assert f"inet {BOARD_IP}/" in marker.read_text()
    assert bed.board.logins()[before:], "the plugin never logged in to the board"


def test_bad_input_gives_clear_errors_and_publishes_nothing(bed: AttachBed) -> None:
    before = _board_view(bed)
    own = bed.json("gw1", "attached", check=True)
    # A second sshd on the client's own host: reachable, SSH, another host key.
    other = NetnsSshd(bed.bed, "pub2", bed.root / "other-sshd", "127.0.0.1", 2200)
    other.start()
    try:
        cases: list[tuple[str, tuple[str, ...], str]] = [
            ("gw1", ("ghost", "--host", "192.168.1.99"), "AttachFailed"),
            ("gw1", ("web", "--host", BOARD_IP, "--ssh-port", str(OTHER_PORT)),
             "not an SSH server"),
            ("gw1", ("relay", "--host", BOARD_IP), "a peer's name"),
            ("gw1", (BOARD, "--host", BOARD_IP), "already attached"),
            ("client", (BOARD, "--host", "127.0.0.1", "--ssh-port", "2200"),
             "with another host key"),
            ("gw1", ("big", "--host", BOARD_IP, "--port", "70000"), "70000"),
            ("gw1", ("zero", "--host", BOARD_IP, "--ssh-port", "0"), "0"),
            ("gw1", ("bad name!", "--host", BOARD_IP), "name"),
        ]  # fmt: skip
        for node, args, message in cases:
            done = bed.cli(node, "attach", *args, timeout=60)
            assert done.returncode != 0, (args, done.stdout)
            error = done.stderr.strip()
            assert message in error, (args, error)
            assert "Traceback" not in error, (args, error)
            assert len(error.splitlines()) <= 3, (args, error)
    finally:
        other.stop()
    # Nothing stored or published: the gateway's own list and every node's view are as before.
    assert _signed(bed.json("gw1", "attached", check=True)) == _signed(own)
    assert [h["name"] for h in bed.json("client", "attached", check=True)] == [BOARD]
    after = _board_view(bed)
    assert _signed([after]) == _signed([before])
    assert after["conflicts"] == []


def test_killing_the_gateway_in_use_moves_ssh_to_the_other(bed: AttachBed) -> None:
    ips = {ip: name for name, (_, ip) in GATEWAYS.items()}
    _ok(bed.ssh("true"), bed)
    used = ips[bed.board.logins()[-1]]
    bed.kill_node(used)
    logins = len(bed.board.logins())
    done = bed.ssh("echo", "moved", timeout=60)
    assert _ok(done, bed).strip() == "moved"
    [by] = bed.board.logins()[logins:]
    assert ips[by] != used
    # The client's own address never dialled the board: every login came from a gateway.
    assert CLIENT_IP not in bed.board.logins()
