"""LAN discovery with mDNS (zeroconf): announce this node, join the nodes it finds.

Runs only when the node listens on a non-loopback address (a node bound to 127.0.0.1 has
no LAN). Each node registers ``<node id>._p2prc._tcp.local.`` with its API port and node
id; a browser turns every other node it sees into a push-pull exchange, which is signed
and checked like any other, so mDNS only ever suggests where to look.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..config import join_address

__all__ = ["SERVICE", "LanDiscovery"]

log = logging.getLogger(__name__)

SERVICE = "_p2prc._tcp.local."


class LanDiscovery(Component):
    """Announces the node on the LAN and calls ``join(url)`` for each node found."""

    def __init__(
        self,
        node_id: str,
        addresses: list[str],
        api_port: int,
        join: Callable[[str], Awaitable[object]],
        *,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._node_id = node_id
        self._addresses = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
        self._port = api_port
        self._join = join
        self._zeroconf: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks = TaskSet(on_crash)
        self.seen: set[str] = set()

    async def start(self) -> None:
        if not self._addresses:
            return
        from zeroconf import ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        self._zeroconf = AsyncZeroconf(interfaces=self._addresses)
        self._info = AsyncServiceInfo(
            SERVICE,
            f"{self._node_id}.{SERVICE}",
            parsed_addresses=self._addresses,
            port=self._port,
            properties={"node_id": self._node_id},
        )
        await self._zeroconf.async_register_service(self._info)

        def changed(**event: Any) -> None:
            if event["state_change"] is ServiceStateChange.Added:
                name = str(event["name"])
                if not name.startswith(self._node_id) and name not in self.seen:
                    self._tasks.spawn(self._resolve(event["zeroconf"], name), "lan-resolve")

        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, [SERVICE], handlers=[changed])
        self._resolver = AsyncServiceInfo
        log.info("LAN discovery on %s", ", ".join(self._addresses))

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        if self._zeroconf is None:
            return
        with contextlib.suppress(Exception):
            await self._browser.async_cancel()
            await self._zeroconf.async_unregister_service(self._info)
        await self._zeroconf.async_close()

    async def _resolve(self, zeroconf: Any, name: str) -> None:
        try:
            info = self._resolver(SERVICE, name)
            if not await info.async_request(zeroconf, 3000) or not info.port:
                return
        except Exception as exc:  # what a LAN host announces is input: dropped, never fatal
            log.info("LAN peer %s cannot be resolved: %r", name, exc)
            return
        for address in info.parsed_addresses():
            try:
                await self._join(f"http://{join_address(address, info.port)}")
            except Exception as exc:  # any failure just means: try the next address
                log.debug("LAN peer %s at %s: %s", name, address, exc)
                continue
            self.seen.add(name)
            log.info("joined LAN peer %s at %s", name, address)
            return
