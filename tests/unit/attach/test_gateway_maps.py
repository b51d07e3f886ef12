"""RemoteMaps (map-port --remote of an attached host) on real loopback sockets, and the ssh
command line p2prc ssh runs."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2prc.attach import forwarder
from p2prc.attach.forwarder import RemoteMaps
from p2prc.attach.gateway import REFUSED
from p2prc.attach.models import AttachedGateway, AttachedHost
from p2prc.attach.store import AttachStore
from p2prc.cli._ssh import ssh_argv
from p2prc.config import Home
from p2prc.errors import AttachRefused, InvalidRequest, NotFound
from p2prc.identity import Identity
from p2prc.state import State
from p2prc.tunnel.streams import close_quietly

OWNER, FRIEND, STRANGER = (Identity.generate().public_key for _ in range(3))


@dataclass
class Policy:
    targets: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def allows(self, name: str, public_key: bytes) -> bool:
        return public_key in (OWNER, FRIEND)

    def target(self, name: str, port: int) -> tuple[str, int] | None:
        return self.targets.get((name, port))

    def own(self) -> list[object]:
        return []


@dataclass
class Publisher:
    """A node behind NAT whose relay publishes ports at 198.51.100.9 (+10000)."""

    behind_nat: bool = True
    published: dict[int, str] = field(default_factory=dict)
    withdrawn: list[int] = field(default_factory=list)

    async def publish(self, host: str, port: int) -> tuple[str, int] | None:
        if not self.behind_nat:
            return None
        self.published[port] = host
        return "198.51.100.9", port + 10000

    def public_address(self, port: int) -> tuple[str, int] | None:
        return None

    async def withdraw(self, port: int) -> None:
        self.withdrawn.append(port)
        self.published.pop(port, None)


async def _web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"HTTP/1.0 200 OK\r\n\r\nfrom the board")
    await writer.drain()
    writer.close()


@dataclass
class Bed:
    maps: RemoteMaps
    policy: Policy
    publisher: Publisher
    store: AttachStore
    db: sqlite3.Connection


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    web = await asyncio.start_server(_web, "127.0.0.1", 0)
    web_port = int(web.sockets[0].getsockname()[1])
    state = State(tmp_path / "state.db")
    store = AttachStore(state.connection)
    policy = Policy({("board", 8080): ("127.0.0.1", web_port)})
    publisher = Publisher()
    maps = RemoteMaps(store, lambda: policy, host="127.0.0.1", publisher=publisher)
    async with maps:
        yield Bed(maps, policy, publisher, store, state.connection)
    web.close()
    state.close()


async def _get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await writer.drain()
    body = await asyncio.wait_for(reader.read(), 5)
    await close_quietly(writer)
    return body


async def test_a_mapped_port_forwards_to_the_host_and_is_published(bed: Bed) -> None:
    mapped = await bed.maps.map("board", 8080, FRIEND)
    assert mapped.entire_address == f"198.51.100.9:{mapped.local_port + 10000}"
    assert bed.publisher.published == {mapped.local_port: "127.0.0.1"}
    assert (await _get(mapped.local_port)).endswith(b"from the board")
    again = await bed.maps.map("board", 8080, OWNER)  # idempotent: the same listener
    assert again.local_port == mapped.local_port
    (row,) = bed.store.maps()
    assert (row.name, row.port, row.listen_port) == ("board", 8080, mapped.local_port)
    assert (row.public_host, row.public_port) == ("198.51.100.9", mapped.local_port + 10000)


async def test_a_public_gateway_gives_its_own_address(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    policy = Policy({("board", 22): ("127.0.0.1", 1)})
    maps = RemoteMaps(
        AttachStore(state.connection),
        lambda: policy,
        host="127.0.0.1",
        addresses=["203.0.113.4"],
        publisher=Publisher(behind_nat=False),
    )
    async with maps:
        mapped = await maps.map("board", 22, OWNER)
    assert mapped.entire_address == f"203.0.113.4:{mapped.local_port}"
    state.close()


async def test_refusals_read_the_same_and_open_nothing(bed: Bed) -> None:
    for name, port, key in (("board", 8080, STRANGER), ("board", 9, OWNER), ("x", 8080, OWNER)):
        with pytest.raises(AttachRefused, match="not allowed") as caught:
            await bed.maps.map(name, port, key)
        assert str(caught.value) == str(AttachRefused(REFUSED))
    assert bed.store.maps() == []
    assert bed.publisher.published == {}


async def test_unmap_closes_and_withdraws(bed: Bed) -> None:
    mapped = await bed.maps.map("board", 8080, OWNER)
    with pytest.raises(AttachRefused):
        await bed.maps.unmap("board", 8080, STRANGER)
    await bed.maps.unmap("board", 8080, FRIEND)
    assert bed.publisher.withdrawn == [mapped.local_port]
    assert bed.store.maps() == []
    with pytest.raises(ConnectionRefusedError):
        await _get(mapped.local_port)
    with pytest.raises(NotFound):
        await bed.maps.unmap("board", 8080, OWNER)


async def test_a_detached_host_is_no_longer_forwarded(bed: Bed) -> None:
    mapped = await bed.maps.map("board", 8080, OWNER)
    bed.policy.targets.clear()  # detached: target() answers None from now on
    # Each connection asks again: closed at once (or reset), not forwarded.
    with contextlib.suppress(ConnectionResetError):
        assert await _get(mapped.local_port) == b""
    await bed.maps._reconcile()
    assert bed.store.maps() == []
    with pytest.raises(ConnectionRefusedError):
        await _get(mapped.local_port)


async def test_stored_maps_are_opened_again_at_start(tmp_path: Path) -> None:
    web = await asyncio.start_server(_web, "127.0.0.1", 0)
    policy = Policy({("board", 8080): ("127.0.0.1", int(web.sockets[0].getsockname()[1]))})
    state = State(tmp_path / "state.db")
    store = AttachStore(state.connection)
    async with RemoteMaps(store, lambda: policy, host="127.0.0.1") as first:
        port = (await first.map("board", 8080, OWNER)).local_port
    async with RemoteMaps(store, lambda: policy, host="127.0.0.1") as second:
        for _ in range(100):
            if ("board", 8080) in second._servers:
                break
            await asyncio.sleep(0.02)
        assert (await _get(port)).endswith(b"from the board")  # the same port as before
    web.close()
    state.close()


async def test_maps_are_bounded(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "MAX_MAPS", 1)
    bed.policy.targets[("board", 22)] = ("127.0.0.1", 1)
    await bed.maps.map("board", 8080, OWNER)
    with pytest.raises(Exception, match="at most 1 forwarded"):
        await bed.maps.map("board", 22, OWNER)


def _host(user: str = "") -> AttachedHost:
    gateway = AttachedGateway(
        node_id="a" * 32, name="gw", endpoint="127.0.0.1:1", state="alive", version=1
    )
    return AttachedHost(
        name="board", host_key="ssh-ed25519 AAAA", ssh_port=22, user=user, gateways=[gateway]
    )


def test_ssh_runs_an_argument_list_with_the_destination_after_double_dash(
    tmp_path: Path,
) -> None:
    argv = ssh_argv(Home(tmp_path), _host(), "alice", ["uname", "-a; rm -rf /"])
    assert argv[0] == "ssh"
    end = argv.index("--")
    assert argv[end + 1 :] == ["board", "uname", "-a; rm -rf /"]  # words, never a shell line
    assert argv[end - 2 : end] == ["-l", "alice"]
    assert "StrictHostKeyChecking=yes" in argv
    assert "HostKeyAlias=p2prc-attached-board" in argv
    assert "-l" not in ssh_argv(Home(tmp_path), _host(), "", [])


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "a b", "root;", "x" * 40])
def test_a_bad_user_is_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(InvalidRequest, match="not a user name"):
        ssh_argv(Home(tmp_path), _host(), user, [])
