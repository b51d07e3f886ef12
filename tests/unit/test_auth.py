"""Signed requests: forged, replayed, expired, unsigned and untrusted calls are refused."""

import time

import httpx
import pytest

from p2prc.api import create_app
from p2prc.api.auth import KeyRate
from p2prc.client import AsyncClient
from p2prc.config import NodeConfig, TrustConfig
from p2prc.errors import (
    AuthError,
    NotTrusted,
    OwnerOnly,
    RateLimited,
    RequestReplayed,
    SignatureExpired,
    SignatureInvalid,
    WrongAudience,
)
from p2prc.identity import HEADER_KEY, HEADER_SIGNATURE, Identity, b64encode
from tests.conftest import FakeNode


def _transport(node: FakeNode) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(node))


def _client(node: FakeNode, identity: Identity, tmp_path: object) -> AsyncClient:
    return AsyncClient(
        "http://node.test", home=f"{tmp_path}/none", identity=identity, transport=_transport(node)
    )


async def _send(node: FakeNode, headers: dict[str, str], body: bytes = b"") -> httpx.Response:
    async with httpx.AsyncClient(transport=_transport(node), base_url="http://node.test") as http:
        return await http.post("/whoami", headers=headers, content=body)


def _error(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def test_owner_may_shut_down(api_client: AsyncClient, fake_node: FakeNode) -> None:
    caller = await api_client.whoami()
    assert caller.role == "owner"
    assert caller.node_id == fake_node.identity.node_id
    await api_client.shutdown()
    assert fake_node.closed


async def test_peer_may_not_shut_down(make_fake_node: object, tmp_path: object) -> None:
    assert callable(make_fake_node)
    node = make_fake_node(NodeConfig(name="n", trust=TrustConfig(mode="open")))
    async with _client(node, Identity.generate(), tmp_path) as client:
        assert (await client.whoami()).role == "peer"
        with pytest.raises(OwnerOnly):
            await client.shutdown()
    assert not node.closed


async def test_allowlist(make_fake_node: object, tmp_path: object) -> None:
    assert callable(make_fake_node)
    friend, stranger = Identity.generate(), Identity.generate()
    trust = TrustConfig(mode="allowlist", allow=[friend.openssh_public_key("friend")])
    node = make_fake_node(NodeConfig(name="n", trust=trust))
    async with _client(node, friend, tmp_path) as client:
        assert (await client.whoami()).node_id == friend.node_id
    async with _client(node, stranger, tmp_path) as client:
        with pytest.raises(NotTrusted, match=stranger.node_id):
            await client.whoami()


async def test_unsigned_request(fake_node: FakeNode) -> None:
    response = await _send(fake_node, {})
    assert response.status_code == 401
    assert _error(response) == AuthError.code


def _headers(node: FakeNode, identity: Identity, **overrides: object) -> dict[str, str]:
    now = float(overrides.pop("now", time.time()))  # type: ignore[arg-type]
    body = bytes(overrides.pop("body", b""))  # type: ignore[call-overload]
    headers = identity.signed_headers("POST", "/whoami", node.identity.node_id, body, now=now)
    headers.update({key.replace("_", "-"): str(value) for key, value in overrides.items()})
    return headers


async def test_valid_raw_signature(fake_node: FakeNode) -> None:
    response = await _send(fake_node, _headers(fake_node, fake_node.identity))
    assert response.status_code == 200, response.text


async def test_forged_signature(fake_node: FakeNode) -> None:
    forger = Identity.generate()
    headers = _headers(fake_node, forger)
    headers[HEADER_KEY] = fake_node.identity.public_key_b64  # claim to be the owner
    response = await _send(fake_node, headers)
    assert response.status_code == 401
    assert _error(response) == SignatureInvalid.code


async def test_tampered_body(fake_node: FakeNode) -> None:
    headers = _headers(fake_node, fake_node.identity, body=b'{"a": 1}')
    response = await _send(fake_node, headers, body=b'{"a": 2}')
    assert _error(response) == SignatureInvalid.code


async def test_replayed_request(fake_node: FakeNode) -> None:
    headers = _headers(fake_node, fake_node.identity)
    assert (await _send(fake_node, headers)).status_code == 200
    response = await _send(fake_node, headers)
    assert response.status_code == 401
    assert _error(response) == RequestReplayed.code


# 62, not 61: the header holds whole seconds, so now + 61 can arrive 60.99 s ahead (within skew).
@pytest.mark.parametrize("offset", [-3600, -61, 62, 10_000])
async def test_expired_or_future_timestamp(fake_node: FakeNode, offset: int) -> None:
    headers = _headers(fake_node, fake_node.identity, now=time.time() + offset)
    response = await _send(fake_node, headers)
    assert _error(response) == SignatureExpired.code


async def test_signed_for_another_node(fake_node: FakeNode) -> None:
    identity = fake_node.identity
    headers = identity.signed_headers("POST", "/whoami", "0" * 32, b"")
    response = await _send(fake_node, headers)
    assert _error(response) == WrongAudience.code


@pytest.mark.parametrize(
    "override",
    [
        {HEADER_KEY: "not base64 !"},
        {HEADER_KEY: b64encode(b"short")},
        {HEADER_SIGNATURE: "%%%"},
        {"P2PRC-Nonce": "xyz"},
        {"P2PRC-Nonce": "'; DROP TABLE seen_nonces; --"},
        {"P2PRC-Timestamp": "yesterday"},
        {"P2PRC-Timestamp": "9" * 40},
    ],
)
async def test_malformed_headers(fake_node: FakeNode, override: dict[str, str]) -> None:
    headers = {**_headers(fake_node, fake_node.identity), **override}
    response = await _send(fake_node, headers)
    assert response.status_code == 401
    assert _error(response) == SignatureInvalid.code
    assert (await _send(fake_node, _headers(fake_node, fake_node.identity))).status_code == 200


async def test_signature_binds_the_path(fake_node: FakeNode) -> None:
    """A signature for /whoami cannot be reused on /shutdown."""
    headers = _headers(fake_node, fake_node.identity)
    async with httpx.AsyncClient(
        transport=_transport(fake_node), base_url="http://node.test"
    ) as http:
        response = await http.post("/shutdown", headers=headers)
    assert _error(response) == SignatureInvalid.code
    assert not fake_node.closed


def test_key_rate_counts_each_key_in_its_window() -> None:
    rate = KeyRate(limit=2, window=10.0, max_keys=2)
    rate.hit("a", now=0.0)
    rate.hit("a", now=1.0)
    with pytest.raises(RateLimited):
        rate.hit("a", now=2.0)
    rate.hit("b", now=2.0)
    rate.hit("a", now=10.5)  # the first hit left the window
    with pytest.raises(RateLimited):
        rate.hit("c", now=10.5)  # room for two keys, both still counting
    rate.hit("c", now=30.0)  # idle keys are dropped to make room


async def test_owner_only_refusal_stores_no_nonce(make_fake_node: object, tmp_path: object) -> None:
    assert callable(make_fake_node)
    node = make_fake_node(NodeConfig(name="n", trust=TrustConfig(mode="open")))
    peer = Identity.generate()
    async with _client(node, peer, tmp_path) as client:
        for _ in range(3):
            with pytest.raises(OwnerOnly):
                await client.shutdown()
        await client.whoami()
    rows = node.state.connection.execute("SELECT key, pool FROM seen_nonces").fetchall()
    assert rows == [(peer.node_id, "other")]


def test_the_sliding_window_is_shared_by_key_rate_and_the_peer_table() -> None:
    from p2prc._rate import SlidingWindow
    from p2prc.peers.table import PeerTable

    window = SlidingWindow(1, 60.0, max_keys=1)
    assert window.take("a", 0.0)
    assert window.spent("a", 59.0)
    assert not window.take("a", 59.0)
    assert not window.take("b", 30.0)  # no room: "a" still counts
    assert window.take("b", 61.0)
    assert len(window) == 1
    assert isinstance(KeyRate(limit=1, window=1.0), SlidingWindow)
    assert "_within_rate" not in vars(PeerTable)
