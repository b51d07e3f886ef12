"""The client side of ``map-port PORT --remote NAME`` for an attached host: the local node
says which gateways reach ``NAME``; the first that takes the signed call forwards the port
and publishes it (``POST /attached/NAME/map`` on that gateway)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from .._client_async import AsyncClient, _validate
from ..config import Home
from ..errors import AttachFailed, AttachRefused, InvalidRequest, P2PRCError
from ..models import MappedPort
from .client import AttachedAPI
from .proxy import ordered
from .records import NAME

__all__ = ["map_attached", "map_on_gateway", "unmap_attached", "unmap_on_gateway"]


def _path(name: str, *rest: str) -> str:
    if not NAME.match(name):
        raise InvalidRequest(f"{name!r} is not an attached host name")
    return "/".join(["/attached", name, "map", *rest])


async def map_on_gateway(client: AsyncClient, name: str, port: int) -> MappedPort:
    """``POST /attached/NAME/map`` on the gateway ``client`` talks to."""
    path = _path(name)
    response = await client._request("POST", path, {"port": port}, signed=True)
    return _validate(MappedPort, response, f"{client.base_url}{path}")


async def unmap_on_gateway(client: AsyncClient, name: str, port: int) -> None:
    """``DELETE /attached/NAME/map/PORT`` on the gateway ``client`` talks to."""
    await client._request("DELETE", _path(name, str(port)), signed=True)


async def map_attached(home: Home | Path, name: str, port: int) -> MappedPort:
    """Forward and publish ``port`` of the attached host ``name`` through its first gateway
    that takes it; ``AttachRefused`` when every gateway refused, else ``AttachFailed``
    naming each gateway's answer when none took it."""
    return await _on_gateways(home, name, port, map_on_gateway)


async def unmap_attached(home: Home | Path, name: str, port: int) -> None:
    """Stop forwarding ``port`` of ``name`` on the gateway that maps it."""
    await _on_gateways(home, name, port, unmap_on_gateway)


_ResultT = TypeVar("_ResultT")


async def _on_gateways(
    home: Home | Path,
    name: str,
    port: int,
    call: Callable[[AsyncClient, str, int], Awaitable[_ResultT]],
) -> _ResultT:
    reasons: list[str] = []
    refused = 0
    async with AsyncClient(home=home) as local:
        gateways = ordered((await AttachedAPI(local).get(name)).gateways)
        for gateway in gateways:
            label = gateway.name or gateway.node_id[:8]
            try:
                if gateway.state == "self":
                    return await call(local, name, port)
                url = await local.resolve(gateway.node_id)
                async with AsyncClient(url, home=home, audience=gateway.node_id) as remote:
                    return await call(remote, name, port)
            except AttachRefused as exc:
                refused += 1
                reasons.append(f"{label}: {exc}")
            except P2PRCError as exc:
                reasons.append(f"{label}: {exc}")
    if not gateways:
        raise AttachFailed(f"attached host {name} has no gateway")
    summary = f"port {port} of {name}: " + "; ".join(reasons)
    if refused == len(gateways):
        raise AttachRefused(summary)
    raise AttachFailed(f"no gateway maps {summary}")
