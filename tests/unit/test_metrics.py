"""``/metrics``: Prometheus text read back by prometheus-client's own parser; who may scrape."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.api.app import create_app
from p2prc.config import MetricsConfig, RelayConfig
from p2prc.errors import ConfigError
from p2prc.identity import Identity


@contextlib.asynccontextmanager
async def _node(path: Path, **config: Any) -> AsyncIterator[Node]:
    home = Home(path / "node")
    settings, identity = init_home(home, NodeConfig(name="metrics", **config))
    async with Node(
        settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as node:
        yield node


def _http(node: Node, client: str = "10.1.2.3") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node), client=(client, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://node.test")


def _signed(node: Node, identity: Identity) -> dict[str, str]:
    return identity.signed_headers("GET", "/metrics", node.identity.node_id, b"")


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_off_by_default(tmp_path: Path) -> None:
    async with _node(tmp_path) as node, _http(node) as http:
        answer = await http.get("/metrics", headers=_signed(node, node.identity))
    assert answer.status_code == 404
    assert "metrics.enabled" in answer.json()["error"]["message"]


async def test_owner_scrapes_names_by_convention(tmp_path: Path) -> None:
    metrics = MetricsConfig(enabled=True)
    relay = RelayConfig(enabled=True, port=0)
    async with _node(tmp_path, metrics=metrics, relay=relay) as node, _http(node) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/no/such-route/abc123")).status_code == 404
        answer = await http.get("/metrics", headers=_signed(node, node.identity))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    families = _families(answer.text)
    for name in (
        "p2prc_members",
        "p2prc_peer_records_rejected",
        "p2prc_gossip_datagrams_sent",
        "p2prc_gossip_datagrams_received",
        "p2prc_gossip_sent_bytes",
        "p2prc_relay_tunnels",
        "p2prc_relay_streams",
        "p2prc_containers_hosted",
        "p2prc_containers_tracked",
        "p2prc_jobs",
        "p2prc_behind_nat",
        "p2prc_api_request_duration_seconds",
    ):
        assert name in families, name
    for name, family in families.items():
        assert name.startswith("p2prc_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    states = {s.labels["state"]: s.value for s in families["p2prc_members"].samples}
    assert set(states) == {"alive", "suspect", "dead", "left"}
    assert {s.labels["state"] for s in families["p2prc_jobs"].samples} >= {"running", "failed"}
    timed = families["p2prc_api_request_duration_seconds"].samples
    routes = {(s.labels["route"], s.labels["status"]) for s in timed if "route" in s.labels}
    assert ("/health", "2xx") in routes
    # A path no route matched is one label value, never the path itself.
    assert ("unmatched", "4xx") in routes
    assert not any("such-route" in s.labels.get("route", "") for s in timed)
    # Labels come from small fixed sets: no ids, keys or addresses.
    labels = {key for family in families.values() for s in family.samples for key in s.labels}
    assert labels <= {"state", "reason", "route", "method", "status", "le"}


async def test_who_may_scrape(tmp_path: Path) -> None:
    metrics = MetricsConfig(enabled=True, allow=["10.0.0.0/8", "0.0.0.0/0"])
    async with _node(tmp_path, metrics=metrics) as node:
        async with _http(node, "10.9.8.7") as http:
            listed = await http.get("/metrics")
        assert listed.status_code == 200
        assert "p2prc_members" in _families(listed.text)
        # Loopback is where relayed requests come from: it signs, whatever allow says.
        async with _http(node, "127.0.0.1") as http:
            unsigned = await http.get("/metrics")
            stranger = await http.get("/metrics", headers=_signed(node, Identity.generate()))
            owner = await http.get("/metrics", headers=_signed(node, node.identity))
        assert unsigned.status_code == 401
        assert stranger.status_code == 403
        assert stranger.json()["error"]["code"] == "owner_only"
        assert owner.status_code == 200


async def test_not_listed_needs_the_owner(tmp_path: Path) -> None:
    metrics = MetricsConfig(enabled=True, allow=["192.0.2.0/24"])
    async with _node(tmp_path, metrics=metrics) as node, _http(node, "198.51.100.7") as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=_signed(node, node.identity))).is_success


def test_allow_must_be_addresses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        MetricsConfig(allow=["not-an-address"])
    home = Home(tmp_path / "home")
    init_home(home)
    from p2prc.config import set_value

    with pytest.raises(ConfigError):
        set_value(home, "metrics.allow", '["10.0.0.300/8"]')
    set_value(home, "metrics.enabled", "true")


async def test_a_relay_counts_its_tunnel(tmp_path: Path) -> None:
    """Real gossip and a real tunnel on loopback: the scrape reads the live state."""
    web = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    relay_config = RelayConfig(enabled=True, port=0, public_host="127.0.0.1")
    enabled = MetricsConfig(enabled=True)
    async with (
        web,
        _node(
            tmp_path / "r",
            metrics=enabled,
            relay=relay_config,
            behind_nat=False,
            trust=TrustConfig(mode="open"),
        ) as relay,
        _node(
            tmp_path / "h",
            behind_nat=True,
            bootstrap=[relay.api_url.removeprefix("http://")],
            relay=RelayConfig(use=[relay.identity.node_id]),
        ) as home,
        AsyncClient(home=tmp_path / "h" / "node") as client,
    ):
        for _ in range(100):
            if any(p.relay_port and p.state == "alive" for p in await client.peers() if not p.me):
                break
            await asyncio.sleep(0.1)
        await client.map_port(web.sockets[0].getsockname()[1])
        async with _http(relay) as http:
            for _ in range(100):  # the first probe's datagram may be a moment away
                answer = await http.get("/metrics", headers=_signed(relay, relay.identity))
                families = _families(answer.text)
                values = {s.name: s.value for f in families.values() for s in f.samples}
                if values["p2prc_gossip_datagrams_received_total"] > 0:
                    break
                await asyncio.sleep(0.1)
        assert home.mapper.behind_nat
    assert values["p2prc_relay_tunnels"] == 1
    assert values["p2prc_gossip_datagrams_received_total"] > 0
    alive = [s for s in families["p2prc_members"].samples if s.labels["state"] == "alive"]
    assert alive[0].value == 1
