"""Relayed TCP throughput (2 TLS hops, framed) against a direct connection, same run.

A sink counts bytes on 127.0.0.1; the sender writes ``--mib`` MiB to it directly, then
through a RelayServer and a TunnelClient (both in this process, with the sink: one event
loop, so this is a floor for separate processes). Reports Gbit/s and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from _common import write_result

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayServer


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(1 << 20):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _send(port: int, mib: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(1 << 20)
    start = time.perf_counter()
    for _ in range(mib):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    received = int(await reader.read())
    elapsed = time.perf_counter() - start
    writer.close()
    assert received == mib << 20
    return received * 8 / elapsed / 1e9


async def measure(mib: int) -> dict[str, object]:
    relay_id, client_id = Identity.generate(), Identity.generate()
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    direct = await _send(port, mib)
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            RelayServer(relay_id, Path(tmp), host="127.0.0.1", public_host="127.0.0.1") as relay,
            TunnelClient(client_id, "127.0.0.1", relay.port, relay_id.node_id) as client,
        ):
            public = await client.expose(port)
            relayed = await _send(public, mib)
    sink.close()
    return {
        "mib": mib,
        "direct_gbit_s": round(direct, 2),
        "relayed_gbit_s": round(relayed, 2),
        "ratio": round(relayed / direct, 3),
        "targets": ">= 1 Gbit/s and >= 5 % of direct",
        "pass": relayed >= 1.0 and relayed / direct >= 0.05,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    result = asyncio.run(measure(parser.parse_args().mib))
    for key, value in result.items():
        print(f"{key:16} {value}")
    write_result("relay_throughput", result)
