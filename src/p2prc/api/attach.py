"""Routes for attached hosts: the merged view and the signed records (open), attach, detach
and allow-list changes (owner only). ``POST /attached/NAME/map`` is ``api/attach_map.py``'s."""

from __future__ import annotations

import base64
from typing import Annotated, Protocol, cast

from fastapi import APIRouter, Path

from ..attach.models import AllowChange, AttachedHost, AttachedRecords, AttachRequest
from ..errors import NodeError
from .auth import Owner

__all__ = ["AttachNode", "Attached", "router"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Path(pattern=_NAME, max_length=63)]


class Attached(Protocol):
    """What these routes call on the node's ``attached`` (``attach.service.AttachService``)."""

    async def attach(self, request: AttachRequest) -> AttachedHost: ...
    async def detach(self, name: str) -> None: ...
    async def set_allow(self, name: str, add: list[str], remove: list[str]) -> AttachedHost: ...
    def own(self) -> list[AttachedHost]: ...
    def known(self) -> list[AttachedHost]: ...
    def get(self, name: str) -> AttachedHost: ...
    def records(self) -> list[bytes]: ...


class AttachNode(Protocol):
    """Nothing beyond ``attached``, read per call (absent while the node does not run it)."""


def router(node: AttachNode) -> APIRouter:
    """Routes under /attached."""
    routes = APIRouter(tags=["attached"])

    def attached() -> Attached:
        try:
            service = getattr(node, "attached", None)
        except RuntimeError:
            service = None
        if service is None:
            raise NodeError("this node runs no attach service")
        return cast(Attached, service)

    @routes.get("/attached")
    async def list_attached() -> list[AttachedHost]:
        """Every attached host this node knows, merged over its gateways (no LAN address)."""
        return attached().known()

    @routes.get("/attached/records")
    async def records() -> AttachedRecords:
        """This gateway's signed attached records (each base64 of its msgpack encoding)."""
        encoded = [base64.b64encode(record).decode() for record in attached().records()]
        return AttachedRecords(records=encoded)

    @routes.get("/attached/own")
    async def own(caller: Owner) -> list[AttachedHost]:
        """The hosts this gateway attached, with their LAN address and allow list."""
        return attached().own()

    @routes.get("/attached/{name}")
    async def get(name: Name) -> AttachedHost:
        """One attached host, merged over its gateways."""
        return attached().get(name)

    @routes.post("/attached")
    async def attach(body: AttachRequest, caller: Owner) -> AttachedHost:
        """Attach a host this node reaches: checked, its host key pinned, then announced."""
        return await attached().attach(body)

    @routes.delete("/attached/{name}")
    async def detach(name: Name, caller: Owner) -> dict[str, str]:
        """Stop reaching the host through this gateway (every node drops its record)."""
        await attached().detach(name)
        return {"detached": name}

    @routes.put("/attached/{name}/allow")
    async def allow(name: Name, body: AllowChange, caller: Owner) -> AttachedHost:
        """Add keys to, and remove keys from, who may reach the host through this gateway."""
        return await attached().set_allow(name, body.add, body.remove)

    return routes
