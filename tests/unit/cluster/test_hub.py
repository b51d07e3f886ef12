"""The SSH hub against asyncssh's own server on loopback, one address per "container".

Each fake container listens for its forwards on its own loopback address (127.0.0.N), as
a real container does in its own network namespace, so ``127.0.0.N:V`` is port V inside
container N.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from p2prc.cluster.hub import Hub
from p2prc.errors import PeerUnreachable
from p2prc.identity import Identity
from p2prc.models import ContainerView, SshAccess

_INNER = 7000


class _Container(asyncssh.SSHServer):
    def __init__(self, address: str) -> None:
        self.address = address
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[Any]:
        assert self.conn is not None
        return self.conn.forward_connection(self.address, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Awaitable[Any]:
        assert self.conn is not None
        return self.conn.forward_local_port(self.address, listen_port, listen_host, listen_port)


async def _echo_as(name: bytes, address: str) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name + b":" + await reader.readline())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, address, _INNER)


async def _ask(address: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(address, port)
    writer.write(b"hi\n")
    answer = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return answer


@contextlib.asynccontextmanager
async def _container(
    number: int, identity: Identity, servers: list[_Container]
) -> AsyncIterator[ContainerView]:
    address = f"127.0.0.{number}"
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    echo = await _echo_as(f"c{number}".encode(), address)

    def factory() -> _Container:
        server = _Container(address)
        servers.append(server)
        return server

    acceptor = await asyncssh.create_server(
        factory,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(identity.openssh_public_key()),
        process_factory=lambda process: process.exit(3),
    )
    port = acceptor.sockets[0].getsockname()[1]
    view = ContainerView(
        id=f"{number:012x}", name=f"c{number}", peer="a" * 32, image="i",
        ssh=SshAccess(
            host="127.0.0.1", port=port, user="p2prc",
            host_key=host_key.export_public_key().decode().strip(),
        ),
        ports=[], gpu=False, cpus=1, memory=1, owner="b" * 32, created_at=0,
    )  # fmt: skip
    try:
        yield view
    finally:
        acceptor.close()
        echo.close()


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return Identity.load_or_create(tmp_path / "identity")


@pytest.fixture
def key(tmp_path: Path, identity: Identity) -> Path:
    return tmp_path / "identity" / "id_ed25519"


async def test_members_reach_each_other_by_the_same_port_everywhere(
    identity: Identity, key: Path
) -> None:
    servers: list[_Container] = []
    lost: list[tuple[str, str]] = []
    async with (
        _container(2, identity, servers) as two,
        _container(3, identity, servers) as three,
        Hub(key, lambda name, why: lost.append((name, why))) as hub,
    ):
        a = await hub.add("a", two, shared=[_INNER])
        b = await hub.add("b", three, shared=[_INNER])
        va, vb = a.port(_INNER), b.port(_INNER)
        assert await _ask("127.0.0.1", va) == b"c2:hi\n"
        assert await _ask("127.0.0.1", vb) == b"c3:hi\n"
        assert await _ask("127.0.0.3", va) == b"c2:hi\n"  # a, from inside b's container
        assert await _ask("127.0.0.2", vb) == b"c3:hi\n"  # b, from inside a's container
        await hub.remove("b")
        assert "b" not in hub
        with pytest.raises(ConnectionRefusedError):
            await _ask("127.0.0.1", vb)
        with pytest.raises(ConnectionRefusedError):
            await _ask("127.0.0.2", vb)
        assert lost == []
    with pytest.raises(ConnectionRefusedError):
        await _ask("127.0.0.1", va)
    assert lost == []


async def test_a_lost_connection_is_reported_once(identity: Identity, key: Path) -> None:
    servers: list[_Container] = []
    lost: list[tuple[str, str]] = []
    async with (
        _container(4, identity, servers) as four,
        Hub(key, lambda name, why: lost.append((name, why))) as hub,
    ):
        await hub.add("w1", four, shared=[_INNER], local=[])
        assert servers[0].conn is not None
        servers[0].conn.close()
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.05)
        assert lost == [("w1", "its SSH connection was lost")]


async def test_a_watched_process_ending_counts_as_lost(identity: Identity, key: Path) -> None:
    servers: list[_Container] = []
    lost: list[tuple[str, str]] = []

    async with (
        _container(5, identity, servers) as five,
        Hub(key, lambda name, why: lost.append((name, why))) as hub,
    ):
        await hub.add("w1", five, shared=[])
        hub.watch("w1", "tail --pid 1 -f /dev/null")  # the fake exits with 3 at once
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.05)
        assert lost == [("w1", "its process ended (exit status 3)")]


async def test_a_connection_closing_under_the_watcher_counts_as_lost(
    identity: Identity, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers: list[_Container] = []
    lost: list[tuple[str, str]] = []

    async def closing(*_args: object, **_kwargs: object) -> None:
        # What asyncssh raised for a channel opened on a connection closing under it.
        raise AttributeError("'NoneType' object has no attribute 'session_started'")

    async with (
        _container(6, identity, servers) as six,
        Hub(key, lambda name, why: lost.append((name, why))) as hub,
    ):
        await hub.add("w1", six, shared=[])
        monkeypatch.setattr(hub._members["w1"].conn, "run", closing)
        hub.watch("w1")
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.05)
        assert lost == [("w1", "its connection ended while watched (AttributeError)")]


async def test_a_wrong_host_key_is_refused(identity: Identity, key: Path) -> None:
    servers: list[_Container] = []
    async with _container(6, identity, servers) as six, Hub(key) as hub:
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        bad = six.model_copy(update={"ssh": six.ssh.model_copy(update={"host_key": other})})
        with pytest.raises(PeerUnreachable):
            await hub.add("w1", bad, shared=[_INNER])
        assert "w1" not in hub
