"""Relay latency, map-port time and memory per connection, against direct, same run.

All parts run in this process (relay, tunnel clients, echo server), so latency and memory
are upper bounds for separate processes. Reports: added latency of a 64-byte ping-pong
(relayed minus direct, p50/p99), map-port (expose -> first forwarded round trip) p95, and
RSS per active relayed connection with 100 tunnels and 1,000 concurrent connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import echo_handler, rss_mib, write_result

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayLimits, RelayServer


async def _pings(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload, times = os.urandom(64), []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(64)
        times.append((time.perf_counter() - start) * 1000)
    writer.close()
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(pings: int, tunnels: int, per_tunnel: int) -> dict[str, object]:
    relay_id = Identity.generate()
    echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    direct = await _pings(port, pings)
    limits = RelayLimits(ports_per_client=64, max_connections=4096)
    with tempfile.TemporaryDirectory() as tmp:
        async with RelayServer(
            relay_id, Path(tmp), host="127.0.0.1", public_host="127.0.0.1", limits=limits
        ) as relay:
            first = TunnelClient(Identity.generate(), "127.0.0.1", relay.port, relay_id.node_id)
            await first.start()
            public = await first.expose(port)
            relayed = await _pings(public, pings)
            map_times = []
            for _ in range(20):
                start = time.perf_counter()
                exposed = await first.expose(port)
                await _pings(exposed, 1)
                map_times.append((time.perf_counter() - start) * 1000)
                await first.unexpose(port)
            await first.aclose()
            clients = [
                TunnelClient(Identity.generate(), "127.0.0.1", relay.port, relay_id.node_id)
                for _ in range(tunnels)
            ]
            await asyncio.gather(*(c.start() for c in clients))
            ports = await asyncio.gather(*(c.expose(port) for c in clients))
            before = rss_mib(os.getpid())
            streams = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", p) for p in ports for _ in range(per_tunnel))
            )
            for _, writer in streams:
                writer.write(b"x")
            await asyncio.gather(*(reader.readexactly(1) for reader, _ in streams))
            after = rss_mib(os.getpid())
            for _, writer in streams:
                writer.close()
            await asyncio.gather(*(c.aclose() for c in clients))
    echo.close()
    connections = tunnels * per_tunnel
    added = [r - d for r, d in zip(sorted(relayed), sorted(direct), strict=True)]
    return {
        "pings": pings,
        "direct_p50_ms": round(statistics.median(direct), 3),
        "relayed_p50_ms": round(statistics.median(relayed), 3),
        "added_p50_ms": round(statistics.median(added), 3),
        "added_p99_ms": round(_quantile(relayed, 0.99) - _quantile(direct, 0.99), 3),
        "map_port_p95_ms": round(_quantile(map_times, 0.95), 1),
        "tunnels": tunnels,
        "connections": connections,
        "kib_per_connection": round((after - before) * 1024 / connections, 1),
        "targets": "added p50 <= 0.5 ms, p99 <= 2 ms; map-port p95 <= 200 ms; <= 64 KiB/conn",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--tunnels", type=int, default=100)
    parser.add_argument("--per-tunnel", type=int, default=10)
    options = parser.parse_args()
    result = asyncio.run(measure(options.pings, options.tunnels, options.per_tunnel))
    for key, value in result.items():
        print(f"{key:20} {value}")
    write_result("relay_latency", result)
