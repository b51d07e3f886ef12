"""Memory per relayed connection, with the relay in its own process.

Three processes: a RelayServer (child), ``--tunnels`` TunnelClients (a second child) and
this one, which runs one echo server per tunnel and opens ``--connections`` concurrent
connections to the relay's public ports (spread evenly over the tunnels). Each connection
must echo a 64-byte message. Both children's RSS is read (psutil) with every tunnel up
and no connection ("idle"), with all connections open after the 64-byte echo ("open"),
after each connection also echoed ``--burst-kib`` KiB ("burst"), and after they closed.
Reports (RSS_open - RSS_idle) / connections in KiB for the relay and the client process;
the target is <= 64 KiB per active connection on the relay. Before every reading the
child runs ``gc.collect()`` and reports glibc's malloc counters (mallinfo2) and its task
count; with ``--trace`` it also runs tracemalloc and reports where the Python heap grew
between "idle" and "open" (tracemalloc inflates RSS: those results go to a separate file).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
from _common import echo_handler, write_result

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayLimits, RelayServer

MESSAGE = 64
# Connections opened at once (the relay's listeners have asyncio's backlog of 100).
OPENING = 100
# Bound on waiting for a child's answer or for sockets to close.
WAIT_S = 120.0


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_kib() -> dict[str, float] | None:
    """glibc's view of the heap: bytes in use (incl. mmapped blocks), free, arena size."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {
        "in_use_kib": (info.uordblks + info.hblkhd) / 1024,
        "free_kib": info.fordblks / 1024,
        "arena_kib": info.arena / 1024,
    }


def malloc_trim() -> None:
    """Hand glibc's free heap pages back to the kernel (what RSS keeps but nothing uses)."""
    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).malloc_trim(0)


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _trace_top(baseline: tracemalloc.Snapshot) -> dict[str, Any]:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    lines = snapshot.compare_to(baseline, "lineno")
    stacks = snapshot.compare_to(baseline, "traceback")
    return {
        "traced_growth_kib": round(sum(stat.size_diff for stat in lines) / 1024, 1),
        "top_lines": [
            f"{stat.traceback[0].filename.split('site-packages/')[-1].split('lib/python3')[-1]}"
            f":{stat.traceback[0].lineno} {stat.size_diff / 1024:+.1f} KiB"
            f" ({stat.count_diff:+d} blocks)"
            for stat in lines[:20]
        ],
        "top_stacks": [
            {
                "kib": round(stat.size_diff / 1024, 1),
                "blocks": stat.count_diff,
                "stack": [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback][:8],
            }
            for stat in stacks[:8]
        ],
    }


async def _commands(trace: bool) -> None:
    """Answer the parent's ``mark`` / ``report`` lines on stdin until it closes stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    baseline: tracemalloc.Snapshot | None = None
    while line := (await reader.readline()).strip():
        gc.collect()
        if line == b"trim":
            malloc_trim()
        answer: dict[str, Any] = {
            "malloc": malloc_kib(),
            "tasks": len(asyncio.all_tasks()),
        }
        if trace and line == b"mark":
            baseline = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
        elif trace and baseline is not None:
            answer["tracemalloc"] = _trace_top(baseline)
        _emit(answer)


async def relay_child(trace: bool) -> None:
    limits = RelayLimits(ports_per_client=64, max_connections=4096)
    with tempfile.TemporaryDirectory() as tmp:
        identity = Identity.generate()
        async with RelayServer(
            identity, Path(tmp), host="127.0.0.1", public_host="127.0.0.1", limits=limits
        ) as relay:
            _emit({"port": relay.port, "node_id": identity.node_id})
            await _commands(trace)


async def clients_child(relay_port: int, relay_id: str, echo_ports: list[int], trace: bool) -> None:
    clients = [
        TunnelClient(Identity.generate(), "127.0.0.1", relay_port, relay_id) for _ in echo_ports
    ]
    await asyncio.gather(*(client.start() for client in clients))
    ports = await asyncio.gather(
        *(client.expose(port) for client, port in zip(clients, echo_ports, strict=True))
    )
    _emit({"ports": ports})
    await _commands(trace)
    await asyncio.gather(*(client.aclose() for client in clients))


class Child:
    """One child process of this script, driven over stdin/stdout lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ps = psutil.Process(process.pid)

    @classmethod
    async def start(cls, *args: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), WAIT_S)
        if not line:
            raise RuntimeError(f"child {self.process.pid} exited ({await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, command: str) -> dict[str, Any]:
        """Send a command; the answer, with this process's RSS and socket count added."""
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await self.read()
        answer["rss_mib"] = self.ps.memory_info().rss / 2**20
        answer["sockets"] = self.sockets()
        return answer

    def sockets(self) -> int:
        return len(self.ps.net_connections(kind="tcp"))

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open(port: int, gate: asyncio.Semaphore) -> Connection:
    """A connection to ``port`` that echoed 64 random bytes correctly."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(MESSAGE)
        writer.write(payload)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(MESSAGE), WAIT_S)
    if echoed != payload:
        raise RuntimeError(f"port {port} echoed other bytes")
    return reader, writer


async def _burst(connection: Connection, size: int) -> None:
    reader, writer = connection
    payload = os.urandom(size)
    writer.write(payload)
    await writer.drain()
    if await asyncio.wait_for(reader.readexactly(size), WAIT_S) != payload:
        raise RuntimeError("a burst came back different")


async def _close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in connections))


async def _settle(child: Child, sockets: int) -> None:
    """Wait (bounded) until the child holds ``sockets`` TCP sockets again."""
    for _ in range(int(WAIT_S / 0.05)):
        if child.sockets() <= sockets:
            return
        await asyncio.sleep(0.05)


def _summary(phases: dict[str, dict[str, Any]], connections: int) -> dict[str, Any]:
    """Growth from "idle" to each later phase, per connection."""
    idle = phases["idle"]
    later = [name for name in phases if name != "idle"]

    def per(value: float) -> float:
        return round(value / connections, 1)

    summary: dict[str, Any] = {
        "rss_idle_mib": round(idle["rss_mib"], 1),
        "kib_per_connection_open": per((phases["open"]["rss_mib"] - idle["rss_mib"]) * 1024),
        "rss_kib_per_connection": {
            name: per((phases[name]["rss_mib"] - idle["rss_mib"]) * 1024) for name in later
        },
    }
    if idle["malloc"] is not None:
        for key in ("in_use_kib", "free_kib"):
            summary[f"malloc_{key}_per_connection"] = {
                name: per(phases[name]["malloc"][key] - idle["malloc"][key]) for name in later
            }
    for key in ("tasks", "sockets"):
        grown = (phases["open"][key] - idle[key]) / connections
        summary[f"{key}_per_connection_open"] = round(grown, 2)
    if "tracemalloc" in phases["open"]:
        summary["tracemalloc_from_idle"] = {
            name: phases[name]["tracemalloc"] for name in ("open", "burst", "closed")
        }
    return summary


async def measure(tunnels: int, connections: int, burst_kib: int, trace: bool) -> dict[str, object]:
    raise_fd_limit(4 * connections + 4 * tunnels + 256)
    flags = ["--tunnels", str(tunnels), "--connections", str(connections)]
    flags += ["--trace"] if trace else []
    echoes = [await asyncio.start_server(echo_handler, "127.0.0.1", 0) for _ in range(tunnels)]
    echo_ports = [server.sockets[0].getsockname()[1] for server in echoes]
    relay = await Child.start("--role", "relay", *flags)
    clients: Child | None = None
    try:
        hello = await relay.read()
        clients = await Child.start(
            "--role",
            "clients",
            "--relay-port",
            str(hello["port"]),
            "--relay-id",
            hello["node_id"],
            "--echo-ports",
            ",".join(map(str, echo_ports)),
            *flags,
        )
        ports: list[int] = (await clients.read())["ports"]
        gate = asyncio.Semaphore(OPENING)
        # warm-up: one connection per tunnel, so one-time costs are not counted per connection
        base = relay.sockets(), clients.sockets()
        await _close(await asyncio.gather(*(_open(port, gate) for port in ports)))
        await _settle(relay, base[0])
        await _settle(clients, base[1])

        phases: dict[str, dict[str, dict[str, Any]]] = {"relay": {}, "client": {}}

        async def record(name: str, command: str = "mark") -> None:
            assert clients is not None
            phases["relay"][name] = await relay.ask(command)
            phases["client"][name] = await clients.ask(command)

        await record("idle", "mark")
        start = time.perf_counter()
        spread = [ports[i % len(ports)] for i in range(connections)]
        opened = await asyncio.gather(*(_open(port, gate) for port in spread))
        open_s = time.perf_counter() - start
        await record("open", "report")
        await asyncio.gather(*(_burst(c, burst_kib * 1024) for c in opened))
        await record("burst", "report")
        await _close(opened)
        await _settle(relay, base[0])
        await _settle(clients, base[1])
        await record("closed", "report")
        await record("trimmed", "trim")
    finally:
        if clients is not None:
            await clients.stop()
        await relay.stop()
        for server in echoes:
            server.close()
    relay_summary = _summary(phases["relay"], connections)
    return {
        "tunnels": tunnels,
        "connections": connections,
        "echoed_ok": len(opened),
        "open_all_s": round(open_s, 2),
        "burst_kib": burst_kib,
        "relay": relay_summary,
        "client": _summary(phases["client"], connections),
        "target": "relay <= 64 KiB per active connection (RSS, open - idle)",
        "pass": relay_summary["kib_per_connection_open"] <= 64,
        "pass_after_burst": relay_summary["rss_kib_per_connection"]["burst"] <= 64,
        "phases": "idle: tunnels up, no connection; open: all connections echoed 64 B; burst: "
        "each also echoed burst_kib; closed: all closed; trimmed: closed + malloc_trim(0)",
        "tracemalloc": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=100)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--burst-kib", type=int, default=64)
    parser.add_argument("--trace", action="store_true", help="tracemalloc in both children")
    parser.add_argument("--role", choices=["parent", "relay", "clients"], default="parent")
    parser.add_argument("--relay-port", type=int, default=0)
    parser.add_argument("--relay-id", default="")
    parser.add_argument("--echo-ports", default="")
    options = parser.parse_args()
    if options.role != "parent":
        raise_fd_limit(4 * options.connections + 4 * options.tunnels + 256)
        if options.trace:
            tracemalloc.start(12)
        if options.role == "relay":
            asyncio.run(relay_child(options.trace))
        else:
            echo_ports = [int(port) for port in options.echo_ports.split(",")]
            asyncio.run(
                clients_child(options.relay_port, options.relay_id, echo_ports, options.trace)
            )
        return
    result = asyncio.run(
        measure(options.tunnels, options.connections, options.burst_kib, options.trace)
    )
    print(json.dumps(result, indent=2))
    write_result("relay_memory_trace" if options.trace else "relay_memory", result)


if __name__ == "__main__":
    main()
