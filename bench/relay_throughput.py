"""Relayed TCP throughput (2 TLS hops, framed) against direct and ``ssh -R``, same run.

A sink counts bytes on 127.0.0.1; the sender writes ``--mib`` MiB to it directly, then
through a RelayServer and a TunnelClient (both in this process, with the sink: one event
loop, so this is a floor for separate processes), then through ``ssh -R`` (a private sshd
on loopback with its own host key, port and authorized key; ssh and sshd are separate
processes). ``--runs`` rounds of the three, interleaved; reports the median Gbit/s of each
and the ratios relay/direct and relay/ssh. When sshd cannot run, the ssh fields are null
and ``ssh_error`` says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import SshUnavailable, ssh_reverse, write_result

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


async def measure(mib: int, runs: int) -> dict[str, object]:
    relay_id, client_id = Identity.generate(), Identity.generate()
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    speeds: dict[str, list[float]] = {"direct": [], "relay": [], "ssh": []}
    cipher: str | None = None
    ssh_error: str | None = None
    ssh_port = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as ssh_stack:
        try:  # ssh_reverse blocks (keys, processes, polls): off the loop that runs the sink
            ssh_port, cipher = await asyncio.to_thread(ssh_stack.enter_context, ssh_reverse(port))
        except (SshUnavailable, OSError, subprocess.SubprocessError) as exc:
            ssh_error = str(exc) or type(exc).__name__
        try:
            server = RelayServer(relay_id, Path(tmp), host="127.0.0.1", public_host="127.0.0.1")
            async with (
                server as relay,
                TunnelClient(client_id, "127.0.0.1", relay.port, relay_id.node_id) as client,
            ):
                public = await client.expose(port)
                for _ in range(runs):  # interleaved, so a busy moment hits all three alike
                    speeds["direct"].append(await _send(port, mib))
                    speeds["relay"].append(await _send(public, mib))
                    if ssh_error is None:
                        try:
                            speeds["ssh"].append(await _send(ssh_port, mib))
                        except (OSError, ValueError) as exc:
                            ssh_error = f"ssh -R transfer failed: {exc!r}"
        finally:
            await asyncio.to_thread(ssh_stack.close)
    sink.close()
    direct, relayed = statistics.median(speeds["direct"]), statistics.median(speeds["relay"])
    ssh = statistics.median(speeds["ssh"]) if ssh_error is None else None
    return {
        "mib": mib,
        "runs": runs,
        "direct_gbit_s": round(direct, 2),
        "relayed_gbit_s": round(relayed, 2),
        "ssh_r_gbit_s": None if ssh is None else round(ssh, 2),
        "relay_vs_direct": round(relayed / direct, 3),
        "relay_vs_ssh": None if ssh is None else round(relayed / ssh, 3),
        "ssh_cipher": cipher,
        "ssh_error": ssh_error,
        "each_run_gbit_s": {name: [round(v, 2) for v in values] for name, values in speeds.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "targets": ">= 1 Gbit/s and >= 5 % of direct",
        "pass": relayed >= 1.0 and relayed / direct >= 0.05,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs; medians reported")
    options = parser.parse_args()
    result = asyncio.run(measure(options.mib, options.runs))
    for key, value in result.items():
        print(f"{key:16} {value}")
    write_result("relay_throughput", result)
