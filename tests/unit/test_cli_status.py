"""``p2prc status``: this node's NAT verdict and relay, each peer's path, when it was last
heard and how our last call to it went, --watch and --json."""

import asyncio
import contextlib
import io
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.api.overview import Overview, overview
from p2prc.cli import _node as _node_cli
from p2prc.cli import main
from p2prc.config import DirectConfig, RelayConfig
from p2prc.errors import AuthError, OwnerOnly
from p2prc.identity import Identity


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: object) -> AsyncIterator[Node]:
    home = Home(path / name)
    settings, identity = init_home(home, NodeConfig(name=name, **config))  # type: ignore[arg-type]
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as node:
        yield node


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    def run() -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    code = await asyncio.to_thread(run)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def _wait_for(client: AsyncClient, *names: str, relayed: str = "") -> None:
    """Until every one of ``names`` is alive in the table and ``relayed`` names its relay."""
    for _ in range(200):
        peers = {p.name: p for p in await client.peers() if not p.me}
        if all(n in peers and peers[n].state == "alive" for n in names) and (
            not relayed or peers[relayed].relay
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{names} never all appeared alive")


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    """A public relay, a NAT'd node tunnelling through it, and a public node: 'pub' (no
    direct paths: each path stays the relay or the plain API)."""
    open_trust: dict[str, Any] = {"trust": TrustConfig(mode="open")}
    off = DirectConfig(enabled=False)
    relay_config = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    async with _node(
        tmp_path, "relay", behind_nat=False, relay=relay_config, direct=off, **open_trust
    ) as relay:
        boot = [relay.api_url.removeprefix("http://")]
        use = RelayConfig(use=[relay.identity.node_id])
        async with (
            _node(tmp_path, "home", behind_nat=True, bootstrap=boot, relay=use, direct=off) as home,
            _node(
                tmp_path, "pub", behind_nat=False, bootstrap=boot, direct=off, **open_trust
            ) as pub,
            AsyncClient(home=tmp_path / "pub") as client,
        ):
            await _wait_for(client, "relay", "home", relayed="home")
            yield {"relay": relay, "home": home, "pub": pub}


async def test_status_shows_each_peers_path(
    network: dict[str, Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await _cli(capsys, "--home", str(tmp_path / "pub"), "status")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "relay via relay" in rows["home"]
    assert "public" in rows["relay"]
    assert "alive" in rows["home"]
    assert rows["nat"].split()[1] == "public"
    for key in ("mappings", "health", "node_id"):
        assert key in rows


async def test_status_json_is_one_object(
    network: dict[str, Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await _cli(capsys, "--json", "--home", str(tmp_path / "home"), "status")
    assert code == 0, err
    data = json.loads(out)
    home, relay = network["home"], network["relay"]
    assert data["node_id"] == home.identity.node_id
    assert data["health"]["status"] == "ok"
    assert (data["nat"], data["behind_nat"]) == ("behind NAT", True)
    assert data["relay"]["node_id"] == relay.identity.node_id
    assert data["relay"]["name"] == "relay"
    assert data["relay"]["public_api"].startswith("127.0.0.1:")
    assert isinstance(data["mappings"], list)
    paths = {peer["name"]: peer["path"] for peer in data["peers"]}
    assert paths["relay"] == "public"


async def test_watch_stops_after_count(
    network: dict[str, Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "pub")
    args = ("--json", "--home", home, "status", "--watch", "--count", "2", "--interval", "0.05")
    code, out, err = await _cli(capsys, *args)
    assert code == 0, err
    views = [json.loads(line) for line in out.splitlines()]
    assert len(views) == 2
    assert all(v["node_id"] == network["pub"].identity.node_id for v in views)
    code, out, err = await _cli(
        capsys, "--home", home, "status", "-w", "--count", "2", "--interval", "0.05"
    )
    assert code == 0, err
    assert out.count("relay via relay") == 2


async def test_overview_is_owner_only(network: dict[str, Node], tmp_path: Path) -> None:
    pub = network["pub"]
    async with AsyncClient(home=tmp_path / "pub") as owner:
        answer = await owner._request("GET", "/overview", signed=True)
        view = Overview.model_validate_json(answer.content)
        assert view.me is not None
        assert view.me.node_id == pub.identity.node_id
        assert view.behind_nat is False
    async with AsyncClient(
        pub.api_url, home=tmp_path / "none", identity=Identity.generate()
    ) as stranger:
        with pytest.raises((OwnerOnly, AuthError)):
            await stranger._request("GET", "/overview", signed=True)


async def test_watch_on_a_terminal_redraws_in_place(
    network: dict[str, Node],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr(_node_cli, "out", terminal)
    home = str(tmp_path / "pub")
    args = ("--home", home, "status", "--watch", "--count", "3", "--interval", "0.05")
    code, _, err = await _cli(capsys, *args)
    assert code == 0, err
    drawn = screen.getvalue()
    assert drawn.count("relay via relay") >= 3  # each view, and the last one kept on exit
    assert "\x1b[" in drawn  # cursor moves: one live view, redrawn


async def test_status_shows_when_each_peer_was_heard_and_how_our_last_call_went(
    network: dict[str, Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = network["pub"]
    with pytest.raises(OwnerOnly):  # home answers, and refuses: only its owner may read this
        async with pub.link.connect(pub.link.resolve("home")) as client:
            await client._request("GET", "/overview", signed=True)
    code, out, err = await _cli(capsys, "--home", str(tmp_path / "pub"), "status")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    header = next(line for line in lines if line.split()[:2] == ["peer", "id"])
    assert "heard" in header
    assert "last call" in header
    # A row is the line with the peer's id; a wrapped cell continues on lines without it.
    ids = {name: node.identity.node_id[:8] for name, node in network.items()}
    rows = {
        name: next(line for line in lines if f" {short} " in line)
        for name, short in ids.items()
        if name != "pub"
    }
    assert re.search(r"owner_only \d+s ago", rows["home"])
    assert re.search(r"ok \d+s ago", rows["relay"])  # the bootstrap exchange
    assert re.search(r"alive\s.*\d+s ago", rows["home"])  # heard: its datagrams arrive

    code, out, err = await _cli(capsys, "--json", "--home", str(tmp_path / "pub"), "status")
    assert code == 0, err
    peers = {peer["name"]: peer for peer in json.loads(out)["peers"]}
    now = time.time()
    for name in ("home", "relay"):
        assert now - 30 < peers[name]["last_heard"] <= now
    assert peers["home"]["last_call"]["ok"] is False
    assert peers["home"]["last_call"]["error"] == "owner_only"
    assert now - 30 < peers["home"]["last_call"]["at"] <= now
    assert peers["relay"]["last_call"]["ok"] is True
    assert peers["relay"]["last_call"]["error"] == ""
    assert {"name", "node_id", "state", "path", "rtt_ms", "gpus", "api"} <= set(peers["home"])


async def test_overview_peers_carry_last_heard_and_last_call(network: dict[str, Node]) -> None:
    pub, home = network["pub"], network["home"]
    view = overview(pub)
    peers = {peer.node_id: peer for peer in view.peers}
    assert all(peer.last_heard is not None for peer in peers.values())
    assert all(peer.last_heard <= view.at for peer in peers.values() if peer.last_heard)
    assert peers[network["relay"].identity.node_id].last_call is not None
    async with pub.link.connect(pub.link.resolve("home")) as client:
        await client.status()
    call = overview(pub).peers[[p.node_id for p in view.peers].index(home.identity.node_id)]
    assert call.last_call is not None
    assert call.last_call.ok
    data = json.loads(overview(pub).model_dump_json())
    assert {"last_heard", "last_call"} <= set(data["peers"][0])
