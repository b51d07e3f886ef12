"""Port mapping routes: publish a local port of this node (the original /MAPPort, signed)."""

import ipaddress
from typing import Protocol

from fastapi import APIRouter, Request

from ..config import NodeConfig
from ..errors import InvalidRequest, NotFound
from ..models import MappedPort, MapPortRequest, Reachability, ReachabilityRequest
from ..peers.gossip import Gossip
from ..tunnel.mapper import PortMapper
from ..tunnel.streams import connects
from .auth import KeyRate, Owner, PortMapUser, Signed

__all__ = ["router"]

# Dial-backs one key may have per minute (NAT detection needs one per peer it asks).
_DIAL_BACKS_PER_MINUTE = 6


class TunnelNode(Protocol):
    @property
    def mapper(self) -> PortMapper: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def gossip(self) -> Gossip: ...


def router(node: TunnelNode) -> APIRouter:
    """Routes under /map-port."""
    routes = APIRouter(tags=["tunnel"])

    @routes.post("/map-port")
    async def map_port(body: MapPortRequest, caller: PortMapUser) -> MappedPort:
        """Publish one of this node's local ports (trusted peers may ask: the original --ra)."""
        # The owner any port; a peer only its own containers' (the mapper checks).
        by = "" if caller.role == "owner" else caller.node_id
        return await node.mapper.map(body.port, body.domain, udp=body.udp, by=by)

    dial_backs = KeyRate(limit=_DIAL_BACKS_PER_MINUTE, window=60.0)

    @routes.post("/reachability")
    async def reachability(
        body: ReachabilityRequest, request: Request, caller: Signed
    ) -> Reachability:
        """Try to connect back to the caller (NAT detection).

        Only the connection's own source address is dialled, at the API port of the
        caller's signed peer record: nothing in the request chooses where to connect.
        """
        host = request.client.host if request.client else ""
        port = _dial_back_port(node, caller.node_id, host, body.port)
        dial_backs.hit(caller.node_id)
        reachable = await connects(host, port, node.config.timeouts.connect)
        return Reachability(address=host, port=port, reachable=reachable)

    @routes.get("/map-port")
    async def mappings(caller: Owner) -> list[MappedPort]:
        """This node's published ports."""
        return node.mapper.mappings()

    @routes.delete("/map-port/{port}")
    async def unmap(port: int, caller: Owner, udp: bool = False) -> dict[str, int]:
        """Stop publishing a port (``?udp=true``: the UDP mapping of that port)."""
        await node.mapper.unmap(port, udp=udp)
        return {"unmapped": port}

    return routes


def _dial_back_port(node: TunnelNode, node_id: str, host: str, asked: int) -> int:
    """The port to dial back for a reachability check, or a clear refusal."""
    if not node.config.gossip.enabled:
        raise InvalidRequest("this node runs without gossip, so it knows no peer records")
    gossip = node.gossip
    if gossip.me.behind_nat is True:
        raise InvalidRequest("this node is behind NAT; ask a public node to check reachability")
    member = gossip.table.get(node_id)
    if member is None:
        raise NotFound(f"node {node_id} is not in this node's peer table; push-pull first")
    record = member.record
    if asked != record.api_port:
        raise InvalidRequest(f"port {asked} is not the API port of your signed record")
    if not host:
        raise InvalidRequest("the connection's source address is unknown")
    if _is_loopback(host) and not any(_is_loopback(address) for address in record.addresses):
        # A caller relayed to us (the tunnel connects from loopback) cannot be dialled back.
        raise InvalidRequest("this request came through a relay; its source cannot be dialled")
    return record.api_port


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
