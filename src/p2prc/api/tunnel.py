"""Port mapping routes: publish a local port of this node (the original /MAPPort, signed)."""

from typing import Annotated, Protocol

from fastapi import APIRouter, Depends

from ..models import CallerInfo, MappedPort, MapPortRequest
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

    @routes.post("/map-port")
    async def map_port(body: MapPortRequest, caller: Peer) -> MappedPort:
        """Publish one of this node's local ports (trusted peers may ask: the original --ra)."""
        return await node.mapper.map(body.port, body.domain)

    @routes.get("/map-port")
    async def mappings(caller: Owner) -> list[MappedPort]:
        """This node's published ports."""
        return node.mapper.mappings()

    @routes.delete("/map-port/{port}")
    async def unmap(port: int, caller: Owner) -> dict[str, int]:
        """Stop publishing a port."""
        await node.mapper.unmap(port)
        return {"unmapped": port}

    return routes
