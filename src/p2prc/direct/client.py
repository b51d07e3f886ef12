"""The client side of ``GET /paths``: each peer's path, read from this home's node."""

from __future__ import annotations

from .._client_async import AsyncClient, _validate_list
from .._client_sync import Client
from ..errors import AuthError, NotFound
from .models import PathInfo

__all__ = ["path_label", "read_paths", "read_paths_blocking"]


async def read_paths(client: AsyncClient) -> dict[str, PathInfo]:
    """Each alive peer's path by node id (the owner's ``GET /paths``); empty from a node
    without direct paths (an older version) or for a caller who is not its owner."""
    try:
        response = await client._request("GET", "/paths", signed=True)
    except (NotFound, AuthError):
        return {}
    items = _validate_list(PathInfo, response, f"{client.base_url}/paths")
    return {item.node_id: item for item in items}


def read_paths_blocking(client: Client) -> dict[str, PathInfo]:
    """``read_paths`` for the blocking client (on its own loop)."""
    return client._run(read_paths(client._async))


def path_label(path: PathInfo | None) -> str:
    """``direct 0.3 ms``, ``relay via 1a2b3c4d 2.1 ms``, ``public``, or ``-`` when unknown."""
    if path is None:
        return "-"
    text = f"relay via {path.via[:8]}" if path.kind == "relay" else path.kind
    return text if path.rtt_ms is None else f"{text} {path.rtt_ms:.1f} ms"
