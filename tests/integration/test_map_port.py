"""map-port through a relay chosen from the signed peer table, on loopback nodes."""

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.config import GossipConfig, RelayConfig
from p2prc.errors import DomainTaken, InvalidRequest, NotFound, RelayUnavailable
from p2prc.models import CreateContainer

BODY = os.urandom(1024 * 1024)


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Closed on every path: the mapper's "does it listen" probe connects and hangs up, and
    # before 3.11.7 asyncio left such a connection open until the garbage collector found
    # it (a ResourceWarning in a finalizer, which on 3.11.2 can surface as "AST
    # constructor recursion depth mismatch" when it lands inside an ast.parse).
    try:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(BODY)}\r\nconnection: close\r\n\r\n"
        writer.write(head.encode() + BODY)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # a probe, or a client gone mid-answer
    finally:
        writer.close()


@pytest.fixture
async def web_port() -> AsyncIterator[int]:
    """A local HTTP server that answers every request with BODY."""
    server = await asyncio.start_server(_http, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: object) -> AsyncIterator[Node]:
    home = Home(path / name)
    settings, identity = init_home(home, NodeConfig(name=name, **config))  # type: ignore[arg-type]
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as node:
        yield node


def _relay_config(**relay: Any) -> dict[str, Any]:
    """A public node that relays for anyone, on loopback."""
    return {
        "trust": TrustConfig(mode="open"),
        "relay": RelayConfig(enabled=True, port=0, public_host="127.0.0.1", **relay),
        "behind_nat": False,
    }


def _natted(*relays: Node, **config: Any) -> dict[str, Any]:
    """A node behind NAT that bootstraps from the first relay and may use them all."""
    return {
        "behind_nat": True,
        "bootstrap": [relays[0].api_url.removeprefix("http://")],
        "relay": RelayConfig(use=[r.identity.node_id for r in relays]),
        **config,
    }


async def _wait_for_relay(client: AsyncClient) -> None:
    for _ in range(100):
        if any(p.relay_port and p.state == "alive" for p in await client.peers() if not p.me):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the relay never appeared in the peer table")


async def test_map_port_through_a_relay(tmp_path: Path, web_port: int) -> None:
    local_port = web_port
    relay_config = _relay_config()
    async with (
        _node(tmp_path, "relay", **relay_config) as relay,
        _node(tmp_path, "home", **_natted(relay)) as home,
        AsyncClient(home=tmp_path / "home") as client,
    ):
        await _wait_for_relay(client)
        mapped = await client.map_port(local_port)
        assert mapped.relay == relay.identity.node_id
        assert (await client.map_port(local_port)).port_no == mapped.port_no
        assert mapped.entire_address == f"127.0.0.1:{mapped.port_no}"
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://{mapped.entire_address}/")
        assert answer.content == BODY
        assert [m.local_port for m in await client.mappings()] == [local_port]
        with pytest.raises(InvalidRequest, match="nothing listens"):
            await client.map_port(1)
        with pytest.raises(InvalidRequest, match="domain"):
            await client.map_port(local_port, "app.example.com")
        await client.unmap_port(local_port)
        with pytest.raises(NotFound):
            await client.unmap_port(local_port)
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"http://{mapped.entire_address}/", timeout=2)
        assert home.relay is None


async def test_public_node_maps_on_itself(tmp_path: Path, web_port: int) -> None:
    port = web_port
    async with (
        _node(
            tmp_path, "public", behind_nat=False, gossip=GossipConfig(advertise=["127.0.0.1"])
        ) as _n,
        AsyncClient(home=tmp_path / "public") as client,
    ):
        mapped = await client.map_port(port)
        assert (mapped.ip_address, mapped.port_no, mapped.relay) == ("127.0.0.1", port, "")


async def test_mapping_moves_when_its_relay_dies(tmp_path: Path, web_port: int) -> None:
    local_port = web_port
    relay_config = _relay_config()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(_node(tmp_path, "r1", **relay_config))
        boot = first.api_url.removeprefix("http://")
        second = await stack.enter_async_context(
            _node(tmp_path, "r2", bootstrap=[boot], **relay_config)
        )
        relays = {first.identity.node_id: first, second.identity.node_id: second}
        await stack.enter_async_context(_node(tmp_path, "home", **_natted(first, second)))
        client = await stack.enter_async_context(AsyncClient(home=tmp_path / "home"))
        for _ in range(100):
            offering = [p for p in await client.peers() if p.relay_port and p.state == "alive"]
            if len(offering) == 2:
                break
            await asyncio.sleep(0.1)
        mapped = await client.map_port(local_port)
        await relays[mapped.relay].aclose()  # the relay node goes away
        moved = mapped
        for _ in range(400):  # generous: failover waits for the lost relay to be noticed
            moved = (await client.mappings())[0]
            if moved.relay and moved.relay != mapped.relay:
                break
            await asyncio.sleep(0.1)
        assert moved.relay not in ("", mapped.relay)
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://{moved.entire_address}/")
        assert answer.content == BODY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_domains_and_the_nat_nodes_api_through_its_relay(
    tmp_path: Path, web_port: int
) -> None:
    local_port = web_port
    http_port = _free_port()
    relay_config = _relay_config(http_port=http_port)
    async with (
        _node(tmp_path, "relay", **relay_config) as relay,
        _node(tmp_path, "home", **_natted(relay)) as home,
        _node(tmp_path, "other", **_natted(relay)) as other,
        AsyncClient(home=tmp_path / "home") as client,
        AsyncClient(home=tmp_path / "relay") as relay_client,
    ):
        await _wait_for_relay(client)
        mapped = await client.map_port(local_port, "App.Example.org")
        assert mapped.domain == "app.example.org"
        async with httpx.AsyncClient() as http:
            answer = await http.get(
                f"http://127.0.0.1:{http_port}/", headers={"Host": "app.example.org"}
            )
            assert answer.content == BODY
        # Another node may not take the domain while home holds it.
        async with AsyncClient(home=tmp_path / "other") as other_client:
            await _wait_for_relay(other_client)
            with pytest.raises(DomainTaken):
                await other_client.map_port(local_port, "app.example.org")
        # The NAT'd node's API is published through the relay and named in its record,
        # over TLS pinned to its node id.
        view = None
        for _ in range(100):
            views = await relay_client.peers()
            view = next(v for v in views if v.node_id == home.identity.node_id)
            if view.public_api:
                break
            await asyncio.sleep(0.1)
        assert view is not None
        assert view.relay == relay.identity.node_id
        assert view.api.startswith(f"https://{home.identity.node_id}@127.0.0.1:")
        assert view.public_api in view.api
        async with AsyncClient(view.api, home=tmp_path / "relay") as through:
            status = await through.status()
        assert status.node_id == home.identity.node_id
        # Unmapping frees the domain for the other node.
        await client.unmap_port(local_port)
        async with AsyncClient(home=tmp_path / "other") as other_client:
            taken = await other_client.map_port(local_port, "app.example.org")
            assert taken.domain == "app.example.org"
        assert other.relay is None


async def test_a_public_node_routes_a_domain_itself(tmp_path: Path, web_port: int) -> None:
    port = web_port
    http_port = _free_port()
    async with (
        _node(tmp_path, "plain", behind_nat=False) as _p,
        AsyncClient(home=tmp_path / "plain") as plain,
    ):
        with pytest.raises(InvalidRequest, match=r"relay\.http_port"):
            await plain.map_port(port, "web.example.org")
        with pytest.raises(InvalidRequest, match="not a domain"):
            await plain.map_port(port, "web example")
    relay = RelayConfig(enabled=True, port=0, public_host="127.0.0.1", http_port=http_port)
    async with (
        _node(tmp_path, "public", behind_nat=False, relay=relay) as _n,
        AsyncClient(home=tmp_path / "public") as client,
    ):
        mapped = await client.map_port(port, "web.example.org")
        assert (mapped.relay, mapped.domain) == ("", "web.example.org")
        async with httpx.AsyncClient() as http:
            answer = await http.get(
                f"http://127.0.0.1:{http_port}/x", headers={"Host": "web.example.org"}
            )
        assert answer.content == BODY


async def test_containers_on_a_nat_node_are_reached_through_its_relay(tmp_path: Path) -> None:
    relay_config = _relay_config()
    async with _node(tmp_path, "relay", **relay_config) as relay:
        home_dir = Home(tmp_path / "home")
        settings, identity = init_home(
            home_dir,
            NodeConfig(name="home", trust=TrustConfig(mode="open"), **_natted(relay)),
        )  # fmt: skip
        runtime = FakeRuntime(ssh_banner=True)
        async with (
            Node(settings, home_dir, identity=identity, host="127.0.0.1", port=0,
                 runtime=runtime) as home,
            AsyncClient(home=tmp_path / "relay") as client,
        ):  # fmt: skip
            api = ""
            for _ in range(100):
                views = await client.peers()
                found = [v for v in views if v.node_id == home.identity.node_id]
                if found and found[0].public_api:
                    api = found[0].api
                    break
                await asyncio.sleep(0.1)
            assert api, "the NAT'd node's API never appeared on the relay"
            view = await client.create_on_peer(api, CreateContainer(ports=1, name="job"))
            local_ssh = runtime.containers[view.id].ssh_port
            assert view.ssh.host == "127.0.0.1"
            assert view.ssh.port != local_ssh  # the relay's public port, not the node's
            assert view.ports[0].public.startswith("127.0.0.1:")
            reader, writer = await asyncio.open_connection("127.0.0.1", view.ssh.port)
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
            writer.close()
            listed = await client.tracked()
            assert listed[0].container.ssh.port == view.ssh.port
            await client.remove_tracked(view.id)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", view.ssh.port)


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def test_udp_port_through_a_relay(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    port = echo.get_extra_info("sockname")[1]
    relay_config = _relay_config()
    try:
        async with (
            _node(tmp_path, "relay", **relay_config) as relay,
            _node(tmp_path, "home", **_natted(relay)) as _home,
            AsyncClient(home=tmp_path / "home") as client,
        ):
            await _wait_for_relay(client)
            mapped = await client.map_port(port, udp=True)
            assert mapped.udp
            assert mapped.relay == relay.identity.node_id
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                await loop.sock_sendto(sock, b"ping", ("127.0.0.1", mapped.port_no))
                data = await asyncio.wait_for(loop.sock_recv(sock, 100), 10)
            assert data == b"echo:ping"
            with pytest.raises(InvalidRequest, match="TCP"):
                await client.map_port(port, "udp.example.org", udp=True)
            assert {(m.local_port, m.udp) for m in await client.mappings()} == {(port, True)}
            await client.unmap_port(port, udp=True)
            assert await client.mappings() == []
    finally:
        echo.close()


async def test_a_relay_that_refuses_is_named_with_its_reason(tmp_path: Path, web_port: int) -> None:
    """The owner learns which relay refused and what its owner runs, without its log."""
    relay_config = {**_relay_config(), "trust": TrustConfig(mode="allowlist")}
    async with (
        _node(tmp_path, "relay", **relay_config) as relay,
        _node(tmp_path, "home", **_natted(relay)) as home,
        AsyncClient(home=tmp_path / "home") as client,
    ):
        await _wait_for_relay(client)
        with pytest.raises(RelayUnavailable) as refused:
            await client.map_port(web_port)
        text = str(refused.value)
        assert "relay (" in text  # the relay's name and id prefix
        assert f"p2prc trust add {home.identity.node_id}" in text
