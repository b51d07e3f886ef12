"""Direct-path throughput against plain TLS between the same two processes, same run.

Two processes, each on uvloop as a node is: this one sends, a ``--role server`` one
receives. The server runs a sink (counts a connection's bytes, answers the count at its
end), a plain TLS 1.3 server in front of the same sink (Python ``ssl``, the node's own
certificate), and a direct port (``direct/link.py``: TLS pinned by node id, the signed
challenge, the mux) whose ``port`` streams go to the sink. The sender, for ``--seconds``,
writes on ``--streams`` connections at once, each through plain TLS, then each as a
stream of one direct path (``DirectLink.open_stream``, the socket pair every direct
stream of a node uses), ends with a marker (TLS cannot half-close) and waits for the
counts; the rate is all bytes over
the time until the last count came back. Rounds interleave the two; medians are reported,
and the ratio direct/plain TLS (goal: at least 0.8). ``--host`` names the server's host
(another machine or namespace: run ``--role server --listen ADDRESS`` there and pass
``--ports`` from its first line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write_result

from p2prc.direct.link import DirectLink, handshake
from p2prc.identity import Identity
from p2prc.tunnel.streams import close_quietly
from p2prc.tunnel.tls import pinned_context, server_context

_CHUNK = 1 << 20


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Chunks of a flag byte (1: a chunk follows) and ``_CHUNK`` bytes, then a 0: answer
    the count (TLS has no half-close to end on)."""
    total = 0
    while await reader.readexactly(1) == b"\1":
        total += len(await reader.readexactly(_CHUNK))
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _role_server(listen: str) -> None:
    identity = Identity.generate()
    home = Path(tempfile.mkdtemp(prefix="p2prc-bench-direct-"))
    context = server_context(identity, home)
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0, limit=1 << 20)
    sink_port = sink.sockets[0].getsockname()[1]
    plain = await asyncio.start_server(_sink, listen, 0, ssl=context, limit=1 << 20)
    listening = socket.create_server((listen, 0))
    listening.setblocking(False)
    links: list[DirectLink] = []

    def targets(peer: str, target: str, port: int) -> tuple[str, int] | None:
        return ("127.0.0.1", sink_port) if target == "port" else None

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listening)
            wire, peer = await handshake(
                sock,
                identity,
                client=False,
                server_context=context,
                expected=None,
                allowed=lambda node_id: True,
            )
            link = DirectLink(wire, peer, client=False, targets=targets)
            link.start()
            links.append(link)

    ports = {
        "node_id": identity.node_id,
        "plain": plain.sockets[0].getsockname()[1],
        "direct": listening.getsockname()[1],
        "sink": sink_port,
    }
    print(json.dumps(ports), flush=True)
    await accept()


async def _write_for(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float
) -> int:
    chunk = b"\1" + os.urandom(_CHUNK)
    sent = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        writer.write(chunk)
        await writer.drain()
        sent += _CHUNK
    writer.write(b"\0")
    counted = int(await reader.read())
    await close_quietly(writer)
    assert counted == sent, (counted, sent)
    return counted


async def _plain(host: str, ports: dict[str, Any], streams: int, seconds: float) -> float:
    context = pinned_context(ports["node_id"])
    opened = [
        await asyncio.open_connection(
            host, ports["plain"], ssl=context, server_hostname="", limit=1 << 20
        )
        for _ in range(streams)
    ]
    start = time.perf_counter()
    total = sum(await asyncio.gather(*(_write_for(r, w, seconds) for r, w in opened)))
    return total * 8 / (time.perf_counter() - start) / 1e9


async def _direct(link: DirectLink, ports: dict[str, Any], streams: int, seconds: float) -> float:
    opened = [await link.open_stream("port", ports["sink"]) for _ in range(streams)]
    start = time.perf_counter()
    total = sum(await asyncio.gather(*(_write_for(r, w, seconds) for r, w in opened)))
    return total * 8 / (time.perf_counter() - start) / 1e9


async def _dial(host: str, ports: dict[str, Any]) -> DirectLink:
    identity = Identity.generate()
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, ports["direct"]))
    context = server_context(identity, Path(tempfile.mkdtemp(prefix="p2prc-bench-direct-")))
    wire, peer = await handshake(
        sock,
        identity,
        client=True,
        server_context=context,
        expected=ports["node_id"],
        allowed=lambda node_id: True,
    )
    link = DirectLink(wire, peer, client=True, targets=lambda *_: None)
    link.start()
    await asyncio.sleep(0.2)  # the first ping's round trip sizes the windows
    return link


async def _measure(
    host: str, ports: dict[str, Any], counts: list[int], seconds: float, runs: int
) -> dict[str, Any]:
    link = await _dial(host, ports)
    rows: dict[str, Any] = {}
    for streams in counts:
        plain, direct = [], []
        for _ in range(runs):
            plain.append(await _plain(host, ports, streams, seconds))
            direct.append(await _direct(link, ports, streams, seconds))
        p, d = statistics.median(plain), statistics.median(direct)
        rows[str(streams)] = {
            "plain_tls_gbit": round(p, 3),
            "direct_gbit": round(d, 3),
            "ratio": round(d / p, 3),
            "plain_runs": [round(x, 3) for x in plain],
            "direct_runs": [round(x, 3) for x in direct],
        }
        print(f"{streams} stream(s): plain TLS {p:.2f} Gbit/s, direct {d:.2f} Gbit/s", flush=True)
    await link.aclose()
    return rows


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Direct path against plain TLS ({result['where']})",
        "",
        f"`python bench/direct.py{result['args']}`: {result['seconds']} s a round, "
        f"{result['runs']} rounds interleaved, medians; sender and receiver in separate "
        "processes on uvloop.",
        "",
        "| streams | plain TLS (Gbit/s) | direct path (Gbit/s) | direct / TLS |",
        "|---|---|---|---|",
    ]
    for streams, row in result["rows"].items():
        lines.append(
            f"| {streams} | {row['plain_tls_gbit']:.2f} | {row['direct_gbit']:.2f} "
            f"| {row['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["server"])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--host", default="", help="the server's address; empty: start one")
    parser.add_argument("--ports", default="", help="with --host: the server's first line")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--where", default="loopback")
    parser.add_argument("--out", default="direct", help="result name in bench/results")
    args = parser.parse_args()
    import uvloop

    if args.role == "server":
        uvloop.run(_role_server(args.listen))
        return
    server = None
    if args.host:
        host, ports = args.host, json.loads(args.ports)
    else:
        server = subprocess.Popen(
            [sys.executable, __file__, "--role", "server"], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        host, ports = "127.0.0.1", json.loads(server.stdout.readline())
    try:
        counts = [int(n) for n in args.streams.split(",")]
        rows = uvloop.run(_measure(host, ports, counts, args.seconds, args.runs))
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    extra = "" if args.where == "loopback" else f" --where {args.where!r}"
    result = {
        "where": args.where,
        "args": f" --streams {args.streams} --seconds {args.seconds:g} --runs {args.runs}{extra}",
        "seconds": args.seconds,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    write_result(args.out, result)
    (RESULTS / f"{args.out}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
