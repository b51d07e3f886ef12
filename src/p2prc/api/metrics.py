"""``/metrics``: the node in Prometheus' text format, off unless ``metrics.enabled``.

Each node has its own registry (several nodes may run in one process). Counts are read
from the node's components at scrape time; only API request durations are observed as
they happen. No label holds an id, a key or an address: every label's values are a
small fixed set.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import MetricsConfig, NodeConfig
from ..errors import NotFound
from ..peers.gossip import Gossip, member_state
from ..peers.table import MemberState
from .auth import RequestVerifier

__all__ = ["MetricsNode", "NodeCollector", "install"]

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class MetricsNode(Protocol):
    """What the metrics read from a node (relay, jobs and hosted containers when present)."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def gossip(self) -> Gossip: ...
    @property
    def started_at(self) -> float: ...


def _read(what: str, read: Callable[[], Iterable[Metric]]) -> Iterator[Metric]:
    """One component's metrics; a component that is down costs its metrics, not the scrape."""
    try:
        yield from list(read())
    except Exception as exc:
        log.debug("metrics: %s unavailable: %s", what, exc)


class NodeCollector(Collector):
    """Reads the node's state at each scrape."""

    def __init__(self, node: MetricsNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        yield from _read("node", self._uptime)
        yield from _read("gossip", self._gossip)
        yield from _read("relay", self._relay)
        yield from _read("mapper", self._mapper)
        yield from _read("containers", self._containers)
        yield from _read("jobs", self._jobs)

    def _uptime(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "p2prc_node_start_time_seconds",
            "When the node started (Unix time).",
            value=self._node.started_at,
        )

    def _gossip(self) -> Iterator[Metric]:
        gossip = self._node.gossip
        states = Counter(member_state(m) for m in gossip.table.members.values())
        members = GaugeMetricFamily(
            "p2prc_members", "Members of the peer table by state.", labels=["state"]
        )
        for state in MemberState:
            members.add_metric([state.name.lower()], states.get(state.name.lower(), 0))
        yield members
        yield _by_reason(
            "p2prc_peer_records_rejected",
            "Peer records and claims refused, by reason.",
            gossip.table.rejected,
        )
        swim = gossip.swim
        if swim is None:
            return
        stats = swim.stats
        yield CounterMetricFamily(
            "p2prc_gossip_datagrams_sent", "Gossip datagrams sent.", value=stats.sent
        )
        yield CounterMetricFamily(
            "p2prc_gossip_datagrams_received", "Gossip datagrams received.", value=stats.received
        )
        yield CounterMetricFamily(
            "p2prc_gossip_sent_bytes", "Bytes of gossip datagrams sent.", value=stats.bytes_sent
        )
        yield _by_reason(
            "p2prc_gossip_datagrams_dropped",
            "Gossip datagrams received and dropped, by reason.",
            stats.dropped,
        )
        yield _by_reason(
            "p2prc_gossip_datagrams_unsent",
            "Gossip datagrams that could not be sent, by reason.",
            stats.unsent,
        )
        yield GaugeMetricFamily(
            "p2prc_gossip_local_health",
            "Lifeguard local health (0 is healthy).",
            value=swim.awareness,
        )

    def _relay(self) -> Iterator[Metric]:
        relay = getattr(self._node, "relay", None)
        if relay is None:
            return
        load = relay.load()
        yield GaugeMetricFamily(
            "p2prc_relay_tunnels", "Tunnel clients connected to this relay.", value=len(load)
        )
        streams = sum(tunnel.streams for tunnel in load)
        yield GaugeMetricFamily(
            "p2prc_relay_streams", "Streams open through this relay.", value=streams
        )
        forwarded = getattr(relay, "bytes_forwarded", None)
        if isinstance(forwarded, int):
            yield CounterMetricFamily(
                "p2prc_relay_forwarded_bytes", "Bytes forwarded by this relay.", value=forwarded
            )

    def _mapper(self) -> Iterator[Metric]:
        mapper = getattr(self._node, "mapper", None)
        if mapper is None:
            return
        yield GaugeMetricFamily(
            "p2prc_behind_nat", "1 when this node is behind NAT.", value=int(mapper.behind_nat)
        )
        yield GaugeMetricFamily(
            "p2prc_mapped_ports", "Ports this node publishes.", value=len(mapper.mappings())
        )

    def _containers(self) -> Iterator[Metric]:
        store = getattr(self._node, "container_store", None)
        if store is not None:
            yield GaugeMetricFamily(
                "p2prc_containers_hosted",
                "Containers this node runs for peers.",
                value=len(store.hosted()),
            )
        tracked = getattr(self._node, "tracked", None)
        if tracked is not None:
            yield GaugeMetricFamily(
                "p2prc_containers_tracked",
                "Containers this node created on peers.",
                value=len(tracked.list()),
            )

    def _jobs(self) -> Iterator[Metric]:
        service = getattr(self._node, "jobs", None)
        if service is None:
            return
        from ..jobs.models import JobState

        states = Counter(str(job.state) for job in service.list())
        jobs = GaugeMetricFamily("p2prc_jobs", "Jobs submitted here, by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], states.get(state.value, 0))
        yield jobs


def _by_reason(name: str, documentation: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


class _Durations:
    """ASGI middleware: each request's duration by route template, method, status class."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self._histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            # The router writes the matched route into the scope: its template, never
            # the path itself (ids in paths would make labels unbounded).
            route = getattr(scope.get("route"), "path", None)
            method = str(scope.get("method", ""))
            self._histogram.labels(
                route=route if isinstance(route, str) else "unmatched",
                method=method if method in _METHODS else "other",
                status=f"{status // 100}xx",
            ).observe(time.perf_counter() - started)


def _allowed(config: MetricsConfig, host: str | None) -> bool:
    if host is None or not config.allow:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # Requests the relay forwards reach the API from loopback (the node's TLS end), so a
    # loopback caller is anyone: it signs with the owner's key.
    if address.is_loopback:
        return False
    return any(address in ipaddress.ip_network(net.strip(), strict=False) for net in config.allow)


def install(app: FastAPI, node: MetricsNode, verifier: RequestVerifier) -> None:
    """Serve ``/metrics`` for ``node`` and time the API's requests (a registry of its own)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    durations = Histogram(
        "p2prc_api_request_duration_seconds",
        "API requests by route template, method and status class.",
        ["route", "method", "status"],
        registry=registry,
        buckets=_BUCKETS,
    )
    config = node.config.metrics
    if config.enabled:
        app.add_middleware(_Durations, histogram=durations)
    app.state.metrics_registry = registry
    routes = APIRouter(tags=["read"])

    @routes.get("/metrics", response_class=Response, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text format; for the addresses in metrics.allow or the owner's key."""
        if not config.enabled:
            raise NotFound("metrics are off on this node (p2prc config set metrics.enabled true)")
        if not _allowed(config, request.client.host if request.client else None):
            await verifier.owner(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes)
