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

``--bed RATES`` (root): the same between two hosts of the namespace test bed
(``/work/shared/testbed/netns-nat.sh``, ``TB_PREFIX`` ``--prefix``: two public hosts on
its internet segment), the receiver in the second, the sender in the first, both hosts'
links shaped by ``tc ... tbf`` to each rate in Mbit/s (0: unshaped), so the link, not the
CPU, is the bound, as between two machines. The bed and both processes are removed at the
end, always. Loopback results go to ``direct.json``, test bed ones to ``direct_link.json``;
``direct.md`` shows both (and ``direct_before.json``, an earlier mux's, when there).
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

import psutil
from _common import RESULTS, write_result

from p2prc.direct.link import DirectLink, handshake
from p2prc.identity import Identity
from p2prc.tunnel.streams import close_quietly, pipe
from p2prc.tunnel.tls import pinned_context, server_context

_CHUNK = 1 << 20


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Chunks of a flag byte (1: a chunk follows) and ``_CHUNK`` bytes, then a 0: answer
    the count (TLS has no half-close to end on). Counted as the bytes come, as a server
    reading into its own buffers would: no copy of whole chunks, which would cost more
    than the transport under test."""
    total = left = 0  # left: bytes of the current chunk still to come
    while data := await reader.read(1 << 18):
        at = 0
        while at < len(data):
            if not left:
                if data[at] == 0:
                    writer.write(f"{total}\n".encode())  # a line: no half-close in TLS
                    await writer.drain()
                    writer.close()
                    return
                at, left = at + 1, _CHUNK
            take = min(left, len(data) - at)
            at, left, total = at + take, left - take, total + take
    writer.close()  # ended without the marker: the sender sees no count


async def _role_server(listen: str) -> None:
    identity = Identity.generate()
    home = Path(tempfile.mkdtemp(prefix="p2prc-bench-direct-"))
    context = server_context(identity, home)
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0, limit=1 << 20)
    sink_port = sink.sockets[0].getsockname()[1]
    plain = await asyncio.start_server(_sink, listen, 0, ssl=context, limit=1 << 20)

    async def tunnel_in(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far = await asyncio.open_connection("127.0.0.1", sink_port, limit=1 << 20)
        await pipe(reader, writer, *far)

    tunnel = await asyncio.start_server(tunnel_in, listen, 0, ssl=context, limit=1 << 20)
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
        "tunnel": tunnel.sockets[0].getsockname()[1],
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
    counted = int(await reader.readline())
    await close_quietly(writer)
    assert counted == sent, (counted, sent)
    return counted


Opened = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def _rate(opened: Opened, seconds: float) -> tuple[int, float]:
    """Bytes all of ``opened`` moved in about ``seconds``, and the seconds it took."""
    start = time.perf_counter()
    total = sum(await asyncio.gather(*(_write_for(r, w, seconds) for r, w in opened)))
    return total, time.perf_counter() - start


async def _plain(host: str, ports: dict[str, Any], streams: int) -> Opened:
    """TLS straight to the sink's process: no hop on either side."""
    context = pinned_context(ports["node_id"])
    return [
        await asyncio.open_connection(
            host, ports["plain"], ssl=context, server_hostname="", limit=1 << 20
        )
        for _ in range(streams)
    ]


async def _tunnel(host: str, ports: dict[str, Any], streams: int, carriers: set[Any]) -> Opened:
    """A TLS tunnel (like stunnel, or ssh -L without the SSH): a socket pair here, one TLS
    connection per stream, a TCP hop to the sink there: the hops a direct stream has."""
    context = pinned_context(ports["node_id"])
    opened: Opened = []
    for _ in range(streams):
        mine, theirs = socket.socketpair()
        far = await asyncio.open_connection(sock=theirs, limit=1 << 20)
        tls = await asyncio.open_connection(
            host, ports["tunnel"], ssl=context, server_hostname="", limit=1 << 20
        )
        task = asyncio.ensure_future(pipe(*far, *tls))
        carriers.add(task)
        task.add_done_callback(carriers.discard)
        opened.append(await asyncio.open_connection(sock=mine, limit=1 << 20))
    return opened


async def _direct(link: DirectLink, ports: dict[str, Any], streams: int) -> Opened:
    """Streams of one direct path (the socket pair of ``open_stream``, a TCP hop there)."""
    return [await link.open_stream("port", ports["sink"]) for _ in range(streams)]


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


def _cpu(processes: list[psutil.Process]) -> float:
    """User and system CPU seconds the processes used so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


async def _timed(
    opened: Opened, processes: list[psutil.Process], seconds: float
) -> tuple[float, float]:
    """Gbit/s of one round, and CPU seconds (both processes) per GiB it moved."""
    before = _cpu(processes)
    total, elapsed = await _rate(opened, seconds)
    spent = _cpu(processes) - before
    return total * 8 / elapsed / 1e9, spent / (total / (1 << 30))


async def _measure(
    host: str,
    ports: dict[str, Any],
    counts: list[int],
    seconds: float,
    runs: int,
    processes: list[psutil.Process],
) -> dict[str, Any]:
    link = await _dial(host, ports)
    carriers: set[Any] = set()
    rows: dict[str, Any] = {}
    for streams in counts:
        rates: dict[str, list[float]] = {"plain": [], "tunnel": [], "direct": []}
        cpus: dict[str, list[float]] = {"plain": [], "tunnel": [], "direct": []}
        for _ in range(runs):
            for mode in rates:
                if mode == "plain":
                    opened = await _plain(host, ports, streams)
                elif mode == "tunnel":
                    opened = await _tunnel(host, ports, streams, carriers)
                else:
                    opened = await _direct(link, ports, streams)
                rate, cpu = await _timed(opened, processes, seconds)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
        m = {mode: statistics.median(values) for mode, values in rates.items()}
        c = {mode: statistics.median(values) for mode, values in cpus.items()}
        rows[str(streams)] = {
            "plain_tls_gbit": round(m["plain"], 3),
            "tls_tunnel_gbit": round(m["tunnel"], 3),
            "direct_gbit": round(m["direct"], 3),
            "ratio": round(m["direct"] / m["plain"], 3),
            "ratio_tunnel": round(m["direct"] / m["tunnel"], 3),
            "plain_cpu_s_per_gib": round(c["plain"], 3),
            "tunnel_cpu_s_per_gib": round(c["tunnel"], 3),
            "direct_cpu_s_per_gib": round(c["direct"], 3),
            "cpu_ratio": round(c["plain"] / c["direct"], 3),
            "cpu_ratio_tunnel": round(c["tunnel"] / c["direct"], 3),
            "runs": {mode: [round(x, 3) for x in values] for mode, values in rates.items()},
        }
        print(
            f"{streams} stream(s): "
            + ", ".join(f"{mode} {m[mode]:.2f} Gbit/s ({c[mode]:.2f} CPU s/GiB)" for mode in m),
            flush=True,
        )
    await link.aclose()
    return rows


_HEADER = (
    "| streams | plain TLS | TLS tunnel | direct path | direct / plain "
    "| direct / tunnel | CPU s/GiB plain, tunnel, direct | by CPU: / plain, / tunnel |"
)


def _row(first: str, streams: str, row: dict[str, Any]) -> str:
    return (
        f"| {first}{streams} | {row['plain_tls_gbit']:.2f} Gbit/s | {row['tls_tunnel_gbit']:.2f}"
        f" Gbit/s | {row['direct_gbit']:.2f} Gbit/s | {row['ratio']:.2f} "
        f"| {row['ratio_tunnel']:.2f} | {row['plain_cpu_s_per_gib']:.2f}, "
        f"{row['tunnel_cpu_s_per_gib']:.2f}, {row['direct_cpu_s_per_gib']:.2f} "
        f"| {row['cpu_ratio']:.2f}, {row['cpu_ratio_tunnel']:.2f} |"
    )


def _section(result: dict[str, Any]) -> list[str]:
    link = "links" in result
    lines = [
        f"## {'Between two hosts, link-bound' if link else 'CPU-bound, one machine'}"
        f" ({result['where']})",
        "",
        f"`python bench/direct.py{result['args']}`: {result['seconds']} s a round, "
        f"{result['runs']} rounds interleaved, medians; sender and receiver in separate "
        f"processes on uvloop; {result['cpus']} CPUs, load average {result['load_before']} "
        f"before, {result['load_after']} after (other work on the machine slows both modes, "
        "not always alike).",
        "",
    ]
    if not link:
        lines += [_HEADER, "|---|---|---|---|---|---|---|---|"]
        lines += [_row("", streams, row) for streams, row in result["rows"].items()]
        return lines
    lines += [
        "Sender in one network namespace, receiver in another, a veth pair and a bridge",
        "between them; both ends' egress shaped by `tc qdisc ... tbf` to the link rate",
        "(unshaped: the veth, bound by the CPU again, as on loopback). Below the CPU's",
        "bound the CPU s/GiB are higher than on loopback: the processes wake for smaller",
        "reads more often while the link is the limit; the ratios by CPU say what the",
        "direct path would reach if the CPU were the limit instead.",
        "",
        "| link, " + _HEADER[2:],
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["links"].items():
        label = "unshaped" if name == "0" else f"{name} Mbit/s"
        lines += [_row(f"{label}, ", streams, row) for streams, row in rows.items()]
    return lines


def _markdown() -> str:
    """``direct.md`` from the loopback and the test bed results there are."""
    lines = [
        "# Direct path against plain TLS",
        "",
        "Plain TLS: straight to the receiving process. TLS tunnel: the same hops as a",
        "direct stream (a socket pair on the sending side, a TCP hop to the sink on the",
        "other), one TLS connection per stream, no framing. CPU s/GiB: user + system",
        "seconds of both processes per GiB moved (what bounds the rate on an idle machine;",
        "the rate itself is noisy on a busy one); the CPU ratios are the share of the other",
        "mode's rate the direct path reaches when CPU is the limit. The receiver counts",
        "bytes as they come (it used to copy out whole 1 MiB chunks, which cost it more",
        "than the transport under test and made every mode's figures noisy).",
    ]
    for name in ("direct", "direct_before", "direct_link"):
        path = RESULTS / f"{name}.json"
        if path.exists():
            lines += ["", *_section(json.loads(path.read_text()))]
    return "\n".join(lines) + "\n"


_BED = Path(os.environ.get("TB_SCRIPT", "/work/shared/testbed/netns-nat.sh"))
_SENDER, _RECEIVER = "198.51.100.11", "198.51.100.12"


def _in(prefix: str, host: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", f"{prefix}-{host}", *command]


def _shape(prefix: str, mbit: int) -> None:
    """Both hosts' egress at ``mbit`` Mbit/s (a token bucket), or unshaped for 0."""
    for host in ("pub1", "pub2"):
        subprocess.run(
            _in(prefix, host, "tc", "qdisc", "del", "dev", "eth0", "root"),
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if mbit:
            # A burst of 4 ms at the rate (at least 128 KiB: a GSO packet is up to 64 KiB),
            # a queue of 20 ms.
            burst = max(128 * 1024, mbit * 1_000_000 // 8 // 250)
            shape = ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "20ms"]
            command = ["tc", "qdisc", "add", "dev", "eth0", "root", *shape]
            subprocess.run(_in(prefix, host, *command), check=True)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _bed(args: argparse.Namespace) -> dict[str, Any]:
    """Each link rate between two test bed hosts: the rows of one sender run each."""
    env = {**os.environ, "TB_PREFIX": args.prefix, "TB_PUBLIC": "2", "TB_SITES": "0"}
    links: dict[str, Any] = {}
    budget = len(args.streams.split(",")) * 3 * args.runs * (args.seconds + 5) + 60
    try:
        subprocess.run([str(_BED), "up"], env=env, check=True, stdout=subprocess.DEVNULL)
        for mbit in (int(rate) for rate in args.bed.split(",")):
            _shape(args.prefix, mbit)
            receive = [sys.executable, __file__, "--role", "server", "--listen", _RECEIVER]
            server = subprocess.Popen(
                _in(args.prefix, "pub2", *receive),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout is not None
                ports = server.stdout.readline()
                if not ports:
                    raise RuntimeError("the receiver did not start")
                send = [sys.executable, __file__, "--role", "sender", "--host", _RECEIVER]
                send += ["--ports", ports.strip(), "--server-pid", str(server.pid)]
                send += ["--streams", args.streams, "--seconds", str(args.seconds)]
                sender = subprocess.run(
                    _in(args.prefix, "pub1", *send, "--runs", str(args.runs)),
                    stdout=subprocess.PIPE,
                    text=True,
                    timeout=budget,
                    check=True,
                )
            finally:
                _stop(server)
            *progress, last = sender.stdout.strip().splitlines()
            print(f"link {mbit or 'unshaped'} Mbit/s:", *progress, sep="\n  ", flush=True)
            links[str(mbit)] = json.loads(last)
    finally:
        subprocess.run([str(_BED), "down"], env=env, check=False, stdout=subprocess.DEVNULL)
    return links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["server", "sender"])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--host", default="", help="the server's address; empty: start one")
    parser.add_argument("--ports", default="", help="with --host: the server's first line")
    parser.add_argument("--server-pid", type=int, default=0, help="sender: count its CPU too")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bed", default="", help="link rates in Mbit/s (0: unshaped), root")
    parser.add_argument("--prefix", default="tq", help="the test bed's TB_PREFIX")
    parser.add_argument("--where", default="")
    parser.add_argument("--out", default="", help="result name in bench/results")
    args = parser.parse_args()
    import uvloop

    counts = [int(n) for n in args.streams.split(",")]
    if args.role == "server":
        uvloop.run(_role_server(args.listen))
        return
    if args.role == "sender":  # a test bed host's sender: its rows as the last line
        processes = [psutil.Process()] + (
            [psutil.Process(args.server_pid)] if args.server_pid else []
        )
        ports = json.loads(args.ports)
        rows = uvloop.run(_measure(args.host, ports, counts, args.seconds, args.runs, processes))
        print(json.dumps(rows), flush=True)
        return
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {}
    if args.bed:
        where = args.where or "two network namespaces, tc tbf"
        result["links"] = _bed(args)
    else:
        where = args.where or "loopback"
        server = None
        if args.host:
            host, ports = args.host, json.loads(args.ports)
        else:
            command = [sys.executable, __file__, "--role", "server"]
            server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            host, ports = "127.0.0.1", json.loads(server.stdout.readline())
        try:
            processes = [psutil.Process()] + ([psutil.Process(server.pid)] if server else [])
            result["rows"] = uvloop.run(
                _measure(host, ports, counts, args.seconds, args.runs, processes)
            )
        finally:
            if server is not None:
                _stop(server)
    bed = f" --bed {args.bed}" if args.bed else ""
    extra = f" --where {args.where!r}" if args.where else ""
    result = {
        "where": where,
        "args": f"{bed} --streams {args.streams} --seconds {args.seconds:g} --runs {args.runs}"
        + extra,
        "seconds": args.seconds,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        **result,
    }
    write_result(args.out or ("direct_link" if args.bed else "direct"), result)
    markdown = _markdown()
    (RESULTS / "direct.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
