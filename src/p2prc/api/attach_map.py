"""``map-port --remote NAME`` on a gateway: forward and publish a port of an attached host.

Signed routes; the caller is the gateway's owner or a key the host's allow list lets in, and
the port is the host's SSH port or an attached port (one refusal for anything else).
"""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import APIRouter, Path
from pydantic import Field

from ..errors import NodeError
from ..identity import b64decode
from ..models import MappedPort, _Request
from .auth import Signed

__all__ = ["AttachMapRequest", "router"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Path(pattern=_NAME, max_length=63)]
Port = Annotated[int, Path(ge=1, le=65535)]


class AttachMapRequest(_Request):
    """``POST /attached/NAME/map``: the attached host's port to forward and publish."""

    port: int = Field(ge=1, le=65535)


class _Maps(Protocol):
    async def map(self, name: str, port: int, public_key: bytes) -> MappedPort: ...
    async def unmap(self, name: str, port: int, public_key: bytes) -> None: ...


def router(node: object) -> APIRouter:
    """Routes under /attached/NAME/map."""
    routes = APIRouter(tags=["attached"])

    def maps() -> _Maps:
        try:
            found = getattr(node, "attach_maps", None)
        except RuntimeError:
            found = None
        if found is None:
            raise NodeError("this node forwards no ports of attached hosts")
        return cast(_Maps, found)

    @routes.post("/attached/{name}/map")
    async def map_attached(name: Name, body: AttachMapRequest, caller: Signed) -> MappedPort:
        """Forward ``port`` of the attached host through this gateway and publish it (its
        relay when behind NAT): where it is reachable now."""
        return await maps().map(name, body.port, b64decode(caller.public_key))

    @routes.delete("/attached/{name}/map/{port}")
    async def unmap_attached(name: Name, port: Port, caller: Signed) -> dict[str, int]:
        """Stop forwarding and publishing ``port`` of the attached host."""
        await maps().unmap(name, port, b64decode(caller.public_key))
        return {"unmapped": port}

    return routes
