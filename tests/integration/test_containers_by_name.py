"""A container on a peer by name: the local node resolves it, in two requests in all."""

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc import AsyncClient, Client, TrustConfig
from p2prc.cli._common import Options
from p2prc.cli._containers import create_container
from p2prc.errors import NodeNotRunning, PeerNotFound
from tests.integration.test_containers_remote import _node

Seen = list[tuple[str, int | None, str]]


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """Every HTTP request any in-process client sends: method, port, path."""
    seen: Seen = []
    send = httpx.AsyncHTTPTransport.handle_async_request

    async def counted(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> Any:
        seen.append((request.method, request.url.port, request.url.path))
        return await send(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", counted)
    return seen


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def only_numeric(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise AssertionError(f"DNS lookup of {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", only_numeric)


def _port(url: str) -> int | None:
    return httpx.URL(url).port


def _create_hops(seen: Seen) -> Seen:
    """The hops of the call, without the nodes' own background traffic (gossip push-pull,
    the path manager timing the relayed path with /health)."""
    return [hop for hop in seen if hop[2] not in ("/peers/exchange", "/health")]


async def test_create_on_a_peer_by_name_takes_two_requests(
    tmp_path: Path, requests: Seen, no_dns: None
) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        await alice.gossip.push_pull(bob.api_url, trusted=True)
        requests.clear()
        view = await client.create_on_peer("bob")
        assert view.peer == bob.identity.node_id
        assert _create_hops(requests) == [
            ("POST", _port(alice.api_url), "/tracked"),
            ("POST", _port(bob.api_url), "/containers"),
        ]
        tracked = await client.tracked()
        assert tracked[0].peer_address == bob.api_url
        by_prefix = await client.create_on_peer(bob.identity.node_id[:8])
        assert by_prefix.peer == bob.identity.node_id
        requests.clear()
        with pytest.raises(PeerNotFound, match="no peer named 'carol'"):
            await client.create_on_peer("carol")
        assert _create_hops(requests) == [("POST", _port(alice.api_url), "/tracked")]
        with pytest.raises(PeerNotFound):
            await client.create_on_peer("alice")  # the node itself is no peer
        assert len(await client.tracked()) == 2


async def test_an_address_no_record_publishes_still_works(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        address = bob.api_url.removeprefix("http://")
        view = await client.create_on_peer(address)
        assert view.peer == bob.identity.node_id  # audience from bob's /status


async def test_the_sync_client_and_the_cli_pass_the_name(
    tmp_path: Path, requests: Seen, no_dns: None
) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
    ):
        await alice.gossip.push_pull(bob.api_url, trusted=True)
        home = tmp_path / "alice"

        def library() -> str:
            with Client(home=home) as client:
                return client.create_on_peer("bob").peer

        requests.clear()
        assert await asyncio.to_thread(library) == bob.identity.node_id
        assert len(_create_hops(requests)) == 2
        requests.clear()
        await asyncio.to_thread(create_container, Options(json=True, home_arg=home), "bob")
        assert _create_hops(requests) == [
            ("POST", _port(alice.api_url), "/tracked"),
            ("POST", _port(bob.api_url), "/containers"),
        ]


def test_a_name_without_a_node_is_node_not_running(tmp_path: Path, no_dns: None) -> None:
    with pytest.raises(NodeNotRunning):
        Client(home=tmp_path / "nobody").create_on_peer("bob")
    with pytest.raises(NodeNotRunning):
        create_container(Options(home_arg=tmp_path / "nobody"), "bob")
    from p2prc.cli._peers import resolve

    with pytest.raises(NodeNotRunning):
        resolve(Options(home_arg=tmp_path / "nobody"), "bob")
    assert resolve(Options(home_arg=tmp_path / "nobody"), "10.0.0.2:8088") == (
        "http://10.0.0.2:8088"
    )
