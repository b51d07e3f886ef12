"""Port mapping routes: publish a local port of this node (the original /MAPPort, signed)."""

import asyncio
import contextlib
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, Request

from ..models import CallerInfo, MappedPort, MapPortRequest, Reachability, ReachabilityRequest
from ..tunnel.mapper import PortMapper
from .auth import RequestVerifier

__all__ = ["router"]


class TunnelNode(Protocol):
    @property
    def mapper(self) -> PortMapper: ...


def router(node: TunnelNode, verifier: RequestVerifier) -> APIRouter:
    """Routes under /map-port."""
    routes = APIRouter(tags=["tunnel"])
    Peer = Annotated[CallerInfo, Depends(verifier.peer)]
    Owner = Annotated[CallerInfo, Depends(verifier.owner)]
    Signed = Annotated[CallerInfo, Depends(verifier.authenticated)]

    @routes.post("/map-port")
    async def map_port(body: MapPortRequest, caller: Peer) -> MappedPort:
        """Publish one of this node's local ports (trusted peers may ask: the original --ra)."""
        return await node.mapper.map(body.port, body.domain, udp=body.udp)

    @routes.post("/reachability")
    async def reachability(
        body: ReachabilityRequest, request: Request, caller: Signed
    ) -> Reachability:
        """Try to connect back to the caller's own address (NAT detection).

        Only the address the request came from is ever dialled, so this cannot be used to
        probe anyone else.
        """
        address = request.client.host if request.client else ""
        return Reachability(
            address=address, port=body.port, reachable=await _connects(address, body.port)
        )

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


async def _connects(host: str, port: int) -> bool:
    if not host:
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
