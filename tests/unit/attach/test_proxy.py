"""The client side: open_route's order and failover across gateways (real listeners on
loopback), and the ssh options / ProxyCommand text."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2prc.attach.gateway import AttachGateway
from p2prc.attach.proxy import (
    host_alias,
    open_route,
    ordered,
    proxy_command,
    ssh_config_block,
    ssh_options,
)
from p2prc.errors import AttachFailed, AttachRefused
from p2prc.identity import Identity
from p2prc.tunnel.streams import close_quietly


@dataclass
class Gw:
    node_id: str
    endpoint: str
    state: str = "alive"
    name: str = ""
    rtt_ms: float | None = None


@dataclass
class Host:
    name: str = "board"
    host_key: str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVzZWQgb25seSBpbiB0ZXN0cyBvZiBwMnByYw"
    ssh_port: int = 22
    user: str = ""
    gateways: list[Gw] = field(default_factory=list)


@dataclass
class Policy:
    target_port: int
    allowed: set[bytes]

    def allows(self, name: str, public_key: bytes) -> bool:
        return public_key in self.allowed

    def target(self, name: str, port: int) -> tuple[str, int] | None:
        return ("127.0.0.1", self.target_port) if (name, port) == ("board", 22) else None

    def own(self) -> list[object]:
        return []


def _constant(policy: Policy) -> Callable[[], Policy]:
    return lambda: policy


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-board\r\n")
    await writer.drain()
    writer.close()


@dataclass
class Bed:
    client: Identity
    gateways: list[tuple[Identity, AttachGateway]]


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    board = await asyncio.start_server(_hello, "127.0.0.1", 0)
    port = int(board.sockets[0].getsockname()[1])
    client = Identity.generate()
    gateways = []
    for index in range(2):
        identity = Identity.generate()
        policy = Policy(port, {client.public_key})
        directory = tmp_path / f"g{index}"
        directory.mkdir()
        gateway = AttachGateway(identity, directory, _constant(policy), host="127.0.0.1")
        await gateway.start()
        gateways.append((identity, gateway))
    yield Bed(client, gateways)
    for _, gateway in gateways:
        await gateway.aclose()
    board.close()


def _gw(bed: Bed, index: int, **changes: str) -> Gw:
    identity, gateway = bed.gateways[index]
    fields = {"node_id": identity.node_id, "endpoint": gateway.endpoint(), "name": f"g{index}"}
    return Gw(**{**fields, **changes})  # type: ignore[arg-type]


def _dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


async def test_the_route_reaches_the_host_through_the_first_gateway(bed: Bed) -> None:
    host = Host(gateways=[_gw(bed, 0), _gw(bed, 1)])
    reader, writer, used = await open_route(bed.client, host)
    assert used.name == "g0"
    assert await reader.readline() == b"SSH-2.0-board\r\n"
    await close_quietly(writer)


async def test_a_dead_gateway_fails_over_to_the_next_within_seconds(bed: Bed) -> None:
    dead = _gw(bed, 0, endpoint=f"127.0.0.1:{_dead_port()}")
    host = Host(gateways=[dead, _gw(bed, 1)])
    started = time.monotonic()
    reader, writer, used = await open_route(bed.client, host)
    assert used.name == "g1"
    assert time.monotonic() - started < 3
    assert await reader.readline() == b"SSH-2.0-board\r\n"
    await close_quietly(writer)


async def test_a_silent_gateway_costs_its_bound_then_the_next_is_tried(bed: Bed) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hole = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    host = Host(gateways=[_gw(bed, 0, endpoint=hole), _gw(bed, 1)])
    started = time.monotonic()
    _, writer, used = await open_route(bed.client, host, per_gateway=0.5)
    assert used.name == "g1"
    assert 0.4 < time.monotonic() - started < 2.5
    await close_quietly(writer, *accepted)
    server.close()


async def test_a_gateway_with_another_key_is_not_used(bed: Bed) -> None:
    impostor = _gw(bed, 0, node_id=Identity.generate().node_id)
    host = Host(gateways=[impostor, _gw(bed, 1)])
    _, writer, used = await open_route(bed.client, host)
    assert used.name == "g1"
    await close_quietly(writer)
    with pytest.raises(AttachFailed, match="expected node"):
        await open_route(bed.client, Host(gateways=[impostor]))


async def test_every_reason_is_named_when_no_gateway_works(bed: Bed) -> None:
    dead = _gw(bed, 0, endpoint=f"127.0.0.1:{_dead_port()}")
    with pytest.raises(AttachFailed) as caught:
        await open_route(bed.client, Host(gateways=[dead, _gw(bed, 1)]), 2222)
    text = str(caught.value)
    assert "g0 (127.0.0.1:" in text
    assert "g1 (" in text
    assert "not allowed" in text
    with pytest.raises(AttachFailed, match="has no gateway"):
        await open_route(bed.client, Host(gateways=[]))


async def test_a_key_refused_by_every_gateway_is_refused(bed: Bed) -> None:
    host = Host(gateways=[_gw(bed, 0), _gw(bed, 1)])
    with pytest.raises(AttachRefused, match="not allowed"):
        await open_route(Identity.generate(), host)


async def test_this_node_uses_its_own_listener_not_its_published_endpoint(bed: Bed) -> None:
    own = _gw(bed, 1, state="self", endpoint="198.51.100.7:1")  # a relay address, say
    host = Host(gateways=[_gw(bed, 0, state="dead"), own])
    local = bed.gateways[1][1].endpoint()
    _, writer, used = await open_route(bed.client, host, local=local, per_gateway=1.0)
    assert used.state == "self"
    await close_quietly(writer)


def test_gateways_are_tried_self_alive_suspect_dead_and_by_rtt() -> None:
    gateways = [
        Gw("d", "", "dead"),
        Gw("s", "", "suspect"),
        Gw("a-slow", "", "alive", rtt_ms=80.0),
        Gw("a-unknown", "", "alive"),
        Gw("a-fast", "", "alive", rtt_ms=2.0),
        Gw("me", "", "self"),
    ]
    assert [g.node_id for g in ordered(gateways)] == [
        "me",
        "a-fast",
        "a-slow",
        "a-unknown",
        "s",
        "d",
    ]


def test_ssh_options_pin_the_alias_and_use_the_proxy(tmp_path: Path) -> None:
    home = tmp_path / "my home %d"
    options = ssh_options(home, Host())
    pairs = dict(options[i + 1].split("=", 1) for i in range(0, len(options), 2))
    assert set(options[::2]) == {"-o"}
    assert pairs["HostKeyAlias"] == host_alias("board") == "p2prc-attached-board"
    assert pairs["StrictHostKeyChecking"] == "yes"
    assert pairs["IdentitiesOnly"] == "yes"
    assert pairs["UserKnownHostsFile"] == f'"{home}/known_hosts"'.replace("%", "%%")
    assert pairs["IdentityFile"] == f'"{home}/identity/id_ed25519"'.replace("%", "%%")
    # ssh expands % tokens, then a shell runs the text: it must come back as our argv.
    command = shlex.split(pairs["ProxyCommand"].replace("%%", "%"))
    expected = [sys.executable, "-m", "p2prc.attach", "--home", str(home), "board"]
    assert command == expected


def test_proxy_command_takes_a_port() -> None:
    text = proxy_command(Path("/h"), "board", 8080)
    assert shlex.split(text)[-3:] == ["board", "--port", "8080"]


def test_the_config_block_has_one_host_and_its_user(tmp_path: Path) -> None:
    block = ssh_config_block(tmp_path, Host(user="alice"))
    lines = block.splitlines()
    assert lines[0] == "Host board"
    assert "    User alice" in lines
    assert "    HostKeyAlias p2prc-attached-board" in lines
    assert "    StrictHostKeyChecking yes" in lines
    assert any(line.startswith("    ProxyCommand ") for line in lines)
