"""Least authority in the tunnel and relay: what a trusted peer, a stranger relay or a
relay in the middle can no longer do (security review rows 6, 7, 10, 15).

Every node runs on loopback; the only wildcard listeners are a fake container's ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.config import RelayConfig
from p2prc.containers.runtime import ContainerInfo, ContainerSpec, PortBinding
from p2prc.errors import (
    DomainTaken,
    InvalidRequest,
    NotFound,
    OwnerOnly,
    PeerError,
    RelayUnavailable,
)
from p2prc.identity import Identity
from p2prc.models import CreateContainer, PeerView
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.frames import FrameDecoder
from p2prc.tunnel.protocol import (
    Abort,
    Challenge,
    Expose,
    Exposed,
    Open,
    Ping,
    Pong,
    Route,
    Routed,
    Welcome,
)
from p2prc.tunnel.relay import RelayServer
from p2prc.tunnel.streams import FramedStream, close_quietly
from p2prc.tunnel.tls import server_context

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _site(text: str) -> Handler:
    """An HTTP server that answers every request with ``text``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            await reader.readuntil(b"\r\n\r\n")
            body = text.encode()
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    return answer


@contextlib.asynccontextmanager
async def _server(handler: Handler, host: str = "127.0.0.1", **kw: Any) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, host, 0, **kw)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


class _Runtime(FakeRuntime):
    """Containers whose extra ports are real sockets on every address (as Docker's are),
    serving the attacker's site; SSH is a loopback-only socket (``ssh_banner``)."""

    def __init__(self) -> None:
        super().__init__(ssh_banner=True)
        self.sites: list[asyncio.Server] = []

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        info = await super().create(spec)
        ports = []
        for binding in info.ports:
            server = await asyncio.start_server(_site("attacker's site"), "0.0.0.0", 0)
            self.sites.append(server)
            ports.append(PortBinding(binding.container_port, server.sockets[0].getsockname()[1]))
        info = dataclasses.replace(info, ports=tuple(ports))
        self.containers[info.id] = info
        return info

    async def aclose(self) -> None:
        for server in self.sites:
            server.close()
        await super().aclose()


@contextlib.asynccontextmanager
async def _node(
    path: Path, name: str, runtime: FakeRuntime | None = None, **config: Any
) -> AsyncIterator[Node]:
    home = Home(path / name)
    settings, identity = init_home(home, NodeConfig(name=name, **config))
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0,
        runtime=runtime or FakeRuntime(),
    ) as node:  # fmt: skip
        yield node


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(port: int, host: str) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        answer = await http.get(f"http://127.0.0.1:{port}/", headers={"Host": host}, timeout=10)
    return answer.text


# Row 6, 7 and 10: map-port from a trusted peer -------------------------------------------


@contextlib.asynccontextmanager
async def _public_node_with_peers(
    tmp_path: Path, *peers: Identity
) -> AsyncIterator[tuple[Node, int]]:
    """A public node that routes domains on its relay's HTTP port, trusting ``peers``."""
    http_port = _free_port()
    relay = RelayConfig(enabled=True, port=0, public_host="127.0.0.1", http_port=http_port)
    trust = TrustConfig(allow=[p.public_key_b64 for p in peers])
    async with _node(tmp_path, "a", _Runtime(), behind_nat=False, relay=relay, trust=trust) as node:
        yield node, http_port


async def test_a_trusted_peer_cannot_take_over_the_owners_domain(tmp_path: Path) -> None:
    mallory = Identity.generate()
    async with (
        _public_node_with_peers(tmp_path, mallory) as (node, http_port),
        _server(_site("owner's site")) as owner_site,
        AsyncClient(home=node.home_path) as owner,
        AsyncClient(node.api_url, identity=mallory) as peer,
    ):
        await owner.map_port(owner_site, "app.example.org")
        assert await _get(http_port, "app.example.org") == "owner's site"
        container = await peer.create_container(CreateContainer(ports=1))
        own_port = container.ports[0].host_port
        # The exact takeover of security-review row 6: the peer's container port, the
        # owner's domain.
        with pytest.raises(DomainTaken):
            await peer.map_port(own_port, "app.example.org")
        assert await _get(http_port, "app.example.org") == "owner's site"
        # Nor may it re-point the owner's mapping itself.
        with pytest.raises(NotFound):
            await peer.map_port(owner_site, "app.example.org")
        assert [(m.local_port, m.domain) for m in await owner.mappings()] == [
            (owner_site, "app.example.org")
        ]


async def test_a_peer_publishes_only_its_own_containers_ports(tmp_path: Path) -> None:
    mallory, trent = Identity.generate(), Identity.generate()
    async with (
        _public_node_with_peers(tmp_path, mallory, trent) as (node, http_port),
        _server(_site("admin panel")) as admin,  # bound to loopback only
        AsyncClient(home=node.home_path) as owner,
        AsyncClient(node.api_url, identity=mallory) as peer,
        AsyncClient(node.api_url, identity=trent) as other,
    ):
        container = await peer.create_container(CreateContainer(ports=1))
        refusals = []
        # A localhost-only service, a port nothing listens on, the loopback-only SSH
        # port of its own container, UDP: one answer for all, so it scans nothing.
        for port, udp in ((admin, False), (1, False), (container.ssh.port, False), (admin, True)):
            with pytest.raises(NotFound) as refused:
                await peer.map_port(port, udp=udp)
            refusals.append(str(refused.value).replace(str(port), "N"))
        assert len(set(refusals)) == 1, refusals
        assert await owner.mappings() == []
        # Its own container's port, which Docker publishes on every address: yes.
        own_port = container.ports[0].host_port
        mapped = await peer.map_port(own_port, "mallory.example.org")
        assert mapped.domain == "mallory.example.org"
        assert await _get(http_port, "mallory.example.org") == "attacker's site"
        # Another peer may neither map it nor take its domain.
        with pytest.raises(NotFound):
            await other.map_port(own_port)
        theirs = await other.create_container(CreateContainer(ports=1))
        with pytest.raises(DomainTaken):
            await other.map_port(theirs.ports[0].host_port, "mallory.example.org")
        # The owner keeps full authority: it may point the domain elsewhere.
        async with _server(_site("owner's site")) as owner_site:
            await owner.map_port(owner_site, "mallory.example.org")
            assert await _get(http_port, "mallory.example.org") == "owner's site"
            # The peer may not change the owner's mapping of its own port either.
            await owner.map_port(own_port, "shared.example.org")
            with pytest.raises(OwnerOnly):
                await peer.map_port(own_port, "mallory2.example.org")


async def test_a_peers_mapping_goes_with_its_container(tmp_path: Path) -> None:
    mallory = Identity.generate()
    async with (
        _public_node_with_peers(tmp_path, mallory) as (node, http_port),
        AsyncClient(home=node.home_path) as owner,
        AsyncClient(node.api_url, identity=mallory) as peer,
    ):
        container = await peer.create_container(CreateContainer(ports=1))
        await peer.map_port(container.ports[0].host_port, "mallory.example.org")
        await peer.remove_container(container.id)
        # Whatever takes that port next is not the peer's to publish.
        assert await owner.mappings() == []
        assert "not routed" in await _get(http_port, "mallory.example.org")


async def test_the_domain_check_holds_behind_nat_too(tmp_path: Path) -> None:
    mallory = Identity.generate()
    http_port = _free_port()
    async with _node(tmp_path, "relay", **_open_relay(http_port=http_port)) as relay:
        config: dict[str, Any] = {
            "behind_nat": True,
            "bootstrap": [relay.api_url.removeprefix("http://")],
            "relay": RelayConfig(use=[relay.identity.node_id]),
            "trust": TrustConfig(allow=[mallory.public_key_b64]),
        }
        async with (
            _node(tmp_path, "home", _Runtime(), **config) as home,
            _server(_site("owner's site")) as owner_site,
            AsyncClient(home=home.home_path) as owner,
            AsyncClient(home.api_url, identity=mallory) as peer,
        ):
            await _peer_view(owner, relay.identity.node_id, lambda v: v.state == "alive")
            await owner.map_port(owner_site, "app.example.org")
            container = await peer.create_container(CreateContainer(ports=1))
            with pytest.raises(DomainTaken):
                await peer.map_port(container.ports[0].host_port, "app.example.org")
            assert await _get(http_port, "app.example.org") == "owner's site"


# Row 15: privileged public ports on a relay --------------------------------------------


def test_a_tunnel_client_gets_no_privileged_public_port(tmp_path: Path) -> None:
    relay = RelayServer(Identity.generate(), tmp_path)
    assert relay._public_ports(80) == [0]
    assert relay._public_ports(1023) == [0]
    assert relay._public_ports(8080) == [8080, 0]


# Malformed control messages: each is refused alone, the tunnel goes on ---------------


async def test_malformed_control_messages_end_nothing_but_themselves(tmp_path: Path) -> None:
    """A tunnel client sends bad messages of every type: the relay answers a bad request
    with an error, drops the rest, and keeps serving the tunnel."""
    relay_node = Identity.generate()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    relay = RelayServer(
        relay_node, tmp_path, host="127.0.0.1", public_host="127.0.0.1", http_port=0
    )
    async with (
        relay,
        _server(echo) as echo_port,
        TunnelClient(Identity.generate(), "127.0.0.1", relay.port, relay_node.node_id) as client,
    ):
        with pytest.raises(InvalidRequest, match="local_port"):
            await client._ask(cast(Expose, {"type": "expose", "local_port": 70000}), Exposed)
        with pytest.raises(InvalidRequest, match="domain"):
            await client._ask(cast(Route, {"type": "route", "local_port": 80}), Routed)
        control = client._control
        assert control is not None
        bad: list[dict[str, Any]] = [
            {"type": "d", "s": "1", "b": b"x"},
            {"type": "w", "s": 1, "n": -5},
            {"type": "x"},
            {"type": "u", "p": "x", "a": "garbage", "b": 1},
            {"type": "unexpose", "public_port": "x"},
            {"type": "unroute"},
            {"type": "hello", "key": 1},
            {"type": "open", "s": 1, "local_port": echo_port},  # the relay's to send
            {"type": "from a newer version", "x": [1, 2]},
        ]
        for raw in bad:
            await control.send(raw)
        public = await client.expose(echo_port)
        reader, writer = await asyncio.open_connection("127.0.0.1", public)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.read(100), 5) == b"still here"
        writer.close()
        assert not client.closed.is_set()


async def test_a_relays_malformed_messages_end_nothing_but_themselves(tmp_path: Path) -> None:
    """A relay sends bad messages of every type: the tunnel client refuses a bad open,
    drops the rest, takes no unasked answer for its next request, and keeps its tunnel."""
    relay_node, client_node = Identity.generate(), Identity.generate()
    heard: asyncio.Queue[object] = asyncio.Queue()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, FrameDecoder())
        await stream.send(Challenge("n", relay_node.node_id))
        await stream.receive()
        await stream.send(Welcome(client_node.node_id))
        bad: list[dict[str, Any]] = [
            {"type": "open", "s": 7, "local_port": "22"},
            {"type": "d", "s": 1, "b": "text"},
            {"type": "u", "p": 1, "a": ["h", "port"], "b": b""},
            {"type": "exposed", "local_port": 1},
            {"type": "exposed", "local_port": 1, "public_port": 2},  # valid, but unasked
            {"type": "welcome"},
            {"type": "from a newer version"},
        ]
        for raw in bad:
            await stream.send(raw)
        await stream.send(Open(8, 22))  # a port the client never exposed
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                message = await stream.receive()
                await heard.put(message)
                if isinstance(message, Ping):
                    await stream.send(Pong())
                elif isinstance(message, Expose):
                    await stream.send(Exposed(message.local_port, 9999))

    async with (
        _server(relay, ssl=server_context(relay_node, tmp_path)) as port,
        TunnelClient(client_node, "127.0.0.1", port, relay_node.node_id) as client,
    ):
        assert await asyncio.wait_for(heard.get(), 5) == Abort(7)
        assert await asyncio.wait_for(heard.get(), 5) == Abort(8)
        assert await client.expose(8000) == 9999  # the unasked answer is not taken for it
        assert await heard.get() == Expose(8000)
        assert await asyncio.wait_for(heard.get(), 10) == Ping()  # heartbeats go on
        assert not client.closed.is_set()


# Row 10 of the review (issue hole 8): relays, NAT answers, and the API through a relay ---


def _open_relay(**relay: Any) -> dict[str, Any]:
    """A public node that relays for anyone: open trust mode."""
    return {
        "trust": TrustConfig(mode="open"),
        "relay": RelayConfig(enabled=True, port=0, public_host="127.0.0.1", **relay),
        "behind_nat": False,
    }


async def _peer_view(
    client: AsyncClient, node_id: str, ready: Callable[[PeerView], bool]
) -> PeerView:
    for _ in range(150):
        for view in await client.peers():
            if view.node_id == node_id and ready(view):
                return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"node {node_id} never got ready in the peer table")


async def test_a_nat_node_uses_no_stranger_as_relay_or_nat_oracle(tmp_path: Path) -> None:
    async with _node(tmp_path, "stranger", **_open_relay()) as stranger:
        boot = [stranger.api_url.removeprefix("http://")]
        async with (
            _node(tmp_path, "natted", behind_nat=True, bootstrap=boot) as natted,
            _node(tmp_path, "auto", bootstrap=boot) as auto,
            AsyncClient(home=natted.home_path) as client,
        ):
            await _peer_view(client, stranger.identity.node_id, lambda v: v.state == "alive")
            with pytest.raises(RelayUnavailable):
                await client.map_port(natted.port)
            assert natted.gossip.table.me.public_api == ""
            # NAT detection asks only listed peers: the stranger's word is not taken.
            await asyncio.sleep(3)
            assert auto.gossip.table.me.behind_nat is None


async def test_a_listed_relay_is_used_and_believed(tmp_path: Path) -> None:
    async with _node(tmp_path, "relay", **_open_relay()) as relay:
        boot = [relay.api_url.removeprefix("http://")]
        use = RelayConfig(use=[relay.identity.public_key_b64])
        async with _node(tmp_path, "auto", bootstrap=boot, relay=use) as auto:
            for _ in range(100):
                if auto.gossip.table.me.behind_nat is not None:
                    break
                await asyncio.sleep(0.1)
            assert auto.gossip.table.me.behind_nat is False  # the relay could connect back


class _Tamper:
    """A relay's public port as a hostile relay would serve it: forwards the bytes, and
    rewrites the answers it can read (``forge``) or flips a byte of every encrypted TLS
    record it passes on (``flip``)."""

    def __init__(self, upstream: int, mode: str) -> None:
        self.upstream, self.mode = upstream, mode

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far_reader, far_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_copy(reader, far_writer))
                group.create_task(self._answers(far_reader, writer))
        except* OSError:
            pass
        finally:
            await close_quietly(writer, far_writer)

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while data := await reader.read(65536):
            if self.mode == "forge":
                writer.write(data.replace(b'"name":"natted-home"', b'"name":"forged-home"'))
                continue
            buffer += data
            while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[3:5]):
                size = 5 + int.from_bytes(buffer[3:5])
                record, buffer = bytearray(buffer[:size]), buffer[size:]
                if record[0] == 0x17:  # application data (in TLS 1.3 also the handshake)
                    record[-1] ^= 0x01
                writer.write(bytes(record))
        writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _natted_api(tmp_path: Path) -> AsyncIterator[tuple[Node, PeerView, Node]]:
    """A NAT'd node whose API its relay publishes; its view as the relay sees it."""
    async with _node(tmp_path, "relay", **_open_relay()) as relay:
        config: dict[str, Any] = {
            "behind_nat": True,
            "bootstrap": [relay.api_url.removeprefix("http://")],
            "relay": RelayConfig(use=[relay.identity.node_id]),
        }
        async with (
            _node(tmp_path, "natted-home", **config) as home,
            AsyncClient(home=relay.home_path) as relay_client,
        ):
            view = await _peer_view(
                relay_client, home.identity.node_id, lambda v: bool(v.public_api)
            )
            yield home, view, relay


async def test_the_relay_cannot_read_or_change_the_nat_nodes_api(tmp_path: Path) -> None:
    async with _natted_api(tmp_path) as (home, view, _relay):
        caller = home.identity  # its owner, calling from afar through the relay
        public_port = int(view.public_api.rsplit(":", 1)[1])
        # Honest calls through the relay work, signed ones included.
        async with AsyncClient(view.api, identity=caller) as honest:
            assert (await honest.status()).node_id == home.identity.node_id
            assert (await honest.whoami()).role == "owner"
        # A relay that rewrites what it can read: with TLS it reads nothing.
        for mode in ("forge", "flip"):
            tamper = _Tamper(public_port, mode)
            async with _server(tamper.handle) as port:
                url = view.api.replace(f":{public_port}", f":{port}")
                async with AsyncClient(url, identity=caller, timeout=10) as through:
                    if mode == "forge":
                        assert (await through.status()).name == "natted-home"
                    else:
                        with pytest.raises(PeerError):
                            await through.status()


async def test_an_impersonating_relay_gets_not_one_byte_of_the_request(
    tmp_path: Path,
) -> None:
    relay, victim = Identity.generate(), Identity.generate()
    received: list[bytes] = []

    async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()

    context = server_context(relay, tmp_path)  # the relay's own key, not the victim's
    async with _server(terminate, ssl=context) as port:
        url = f"https://{victim.node_id}@127.0.0.1:{port}"
        async with AsyncClient(url, identity=Identity.generate(), timeout=10) as client:
            with pytest.raises(PeerError, match="expected node"):
                await client.whoami()
    assert b"".join(received) == b""
