"""A node in process with a real sshd: attach through the service and the API, who may call
which route, bad input as clear errors with nothing stored, and the reserved custom key."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from p2prc import AsyncClient, FakeRuntime, Home, Identity, Node, NodeConfig, init_home
from p2prc.attach.models import AttachRequest
from p2prc.attach.records import decode_attached
from p2prc.attach.service import ATTACHED_KEY
from p2prc.config import GossipConfig
from p2prc.errors import (
    AttachedNotFound,
    AttachFailed,
    InvalidRequest,
    NameTaken,
    OwnerOnly,
)
from tests._sshd import SSHD, Sshd

pytestmark = pytest.mark.skipif(not Path(SSHD).exists(), reason="needs OpenSSH's sshd")


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    home = Home(tmp_path / "gw")
    config = NodeConfig(name="gw", gossip=GossipConfig(lan_discovery=False))
    settings, identity = init_home(home, config)
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as running:
        yield running


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with Sshd() as server:
        yield server


async def _not_ssh(banner: bytes) -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_attach_in_process_and_through_the_api(node: Node, sshd: Sshd) -> None:
    sshd.authorize(node.identity.openssh_public_key("gw"))
    request = AttachRequest(name="morello", host="localhost", ssh_port=sshd.port, ports=[8080])
    host = await node.attached.attach(request)
    assert host.host_key == sshd.host_key
    assert host.arch == platform.machine()
    assert host.local is not None
    assert host.local.address in ("127.0.0.1", "::1")  # the DNS name resolved and pinned
    assert node.gossip.me.custom[ATTACHED_KEY] == str(host.gateways[0].version)
    assert node.attached.target("morello", 8080) == (host.local.address, 8080)

    owner = AsyncClient(node.api_url, identity=node.identity)
    stranger = AsyncClient(node.api_url, identity=Identity.generate())
    anonymous = httpx.AsyncClient(base_url=node.api_url)
    async with owner, stranger, anonymous:
        (listed,) = await stranger.attached.list()  # open
        assert listed.name == "morello"
        assert listed.local is None
        (raw,) = await stranger.attached.records()
        assert decode_attached(raw).host_key == sshd.host_key
        assert (await stranger.attached.get("morello")).ports == [8080]
        with pytest.raises(AttachedNotFound):
            await stranger.attached.get("ghost")
        with pytest.raises(OwnerOnly):
            await stranger.attached.own()
        with pytest.raises(OwnerOnly):
            await stranger.attached.detach("morello")
        with pytest.raises(OwnerOnly):
            await stranger.attached.attach(name="x", host="127.0.0.1", ssh_port=sshd.port)
        response = await anonymous.post("/attached", json={"name": "x", "host": "127.0.0.1"})
        assert response.status_code == 401
        response = await anonymous.delete("/attached/morello")
        assert response.status_code == 401
        # Past the client's own checks: the node refuses a bad body by itself.
        for body in (
            {"name": "x", "host": "127.0.0.1", "ports": [70000]},
            {"name": "x", "host": "127.0.0.1", "ssh_port": 0},
            {"name": "-x", "host": "127.0.0.1"},
            {"name": "x", "host": "127.0.0.1", "ports": list(range(1, 18))},
            {"name": "x", "host": "127.0.0.1", "user": "root; rm -rf /"},
            {"name": "x", "host": "127.0.0.1", "extra": 1},
        ):
            response = await owner._http.post("/attached", json=body)
            assert response.status_code == 422, body
            assert response.json()["error"]["code"] == "invalid_request"

        owned = await owner.attached.own()
        assert [h.name for h in owned] == ["morello"]
        with pytest.raises(NameTaken, match="already attached"):
            await owner.attached.attach(name="morello", host="127.0.0.1", ssh_port=sshd.port)
        with pytest.raises(NameTaken, match="peer's name"):
            await owner.attached.attach(name="gw", host="127.0.0.1", ssh_port=sshd.port)

        # The reserved key: a user may not set it, and keeps it when setting others.
        with pytest.raises(InvalidRequest, match="reserved"):
            await owner.set_metadata("hello", {"p2prc.attached": "1"})
        await owner.set_metadata("hello", {"colour": "blue"})
        custom = node.gossip.me.custom
        assert custom["colour"] == "blue"
        assert custom[ATTACHED_KEY] == str(host.gateways[0].version)

        await owner.attached.detach("morello")
        assert ATTACHED_KEY not in node.gossip.me.custom
        assert node.gossip.me.custom["colour"] == "blue"
        assert await stranger.attached.list() == []


async def test_not_ssh_and_unreachable_are_clear_and_store_nothing(node: Node) -> None:
    server, port = await _not_ssh(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    async with server:
        with pytest.raises(AttachFailed, match="is not an SSH server"):
            await node.attached.attach(AttachRequest(name="web", host="127.0.0.1", ssh_port=port))
    server, port = await _not_ssh(b"")  # accepts, then closes at once
    async with server:
        with pytest.raises(AttachFailed, match="is not an SSH server"):
            await node.attached.attach(AttachRequest(name="web", host="127.0.0.1", ssh_port=port))
    with pytest.raises(AttachFailed, match="cannot reach"):
        await node.attached.attach(AttachRequest(name="web", host="127.0.0.1", ssh_port=port))
    with pytest.raises(InvalidRequest, match="not a unicast"):
        await node.attached.attach(AttachRequest(name="web", host="0.0.0.0"))
    with pytest.raises(InvalidRequest, match="neither"):
        await node.attached.attach(AttachRequest(name="web", host="a b"))
    with pytest.raises(AttachFailed, match="cannot resolve"):
        await node.attached.attach(AttachRequest(name="web", host="no-such-host.invalid"))
    assert node.attached.own() == []
    assert node.attached.records() == []
    assert ATTACHED_KEY not in node.gossip.me.custom
