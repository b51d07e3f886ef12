"""``GET /paths``: how this node reaches each peer (direct, relay via X, public), the owner's."""

from typing import Protocol

from fastapi import APIRouter

from ..direct.models import PathInfo
from ..direct.paths import Paths
from .auth import Owner

__all__ = ["DirectNode", "router"]


class DirectNode(Protocol):
    @property
    def paths(self) -> Paths: ...


def router(node: DirectNode) -> APIRouter:
    """Routes under /paths."""
    routes = APIRouter(tags=["direct"])

    @routes.get("/paths")
    async def paths(caller: Owner) -> list[PathInfo]:
        """Each alive peer's path: the kind in use, its round trip, direct attempts and the
        last error; the owner's only (it tells who this node talks to)."""
        return node.paths.paths()

    return routes
