"""GET /status requests/s of one node process vs a bare uvicorn hello-world, same run.

Load comes from wrk (32 keep-alive connections, one thread) when installed, else from a
raw-socket asyncio generator in a separate process. The machine has two cores, so the
load generator competes with the server: both servers are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port, print_table, start_hello, start_node, stop, wait_ready, write_result

TARGET_RPS = 2000
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, path: str, seconds: int, connections: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run(["wrk", "-t1", "-c8", "-d1s", url], capture_output=True, check=True)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {}
    for percent in ("50", "99"):
        match = re.search(rf"^\s+{percent}%\s+([0-9.]+)(us|ms|s)", out, re.M)
        assert match is not None
        latency[percent] = float(match.group(1)) * _UNITS[match.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "errors": float(errors.group(1)) if errors else 0.0,
    }


async def _raw_load(port: int, path: str, seconds: float, connections: int) -> dict[str, float]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - start) * 1000)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "errors": 0.0,
    }


def python_load(port: int, path: str, seconds: int, connections: int) -> dict[str, float]:
    """Run the raw generator in a child process so it does not share the server's core."""
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]);"
        "from api_throughput import _raw_load;"
        "print(json.dumps(asyncio.run(_raw_load(int(sys.argv[2]), sys.argv[3],"
        " float(sys.argv[4]), int(sys.argv[5])))))"
    )
    args = [str(Path(__file__).parent), str(port), path, str(seconds), str(connections)]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    import json

    return {key: float(value) for key, value in json.loads(out.stdout).items()}


def measure(seconds: int, connections: int, generator: str) -> dict[str, object]:
    load = wrk if generator == "wrk" else python_load
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-") as tmp:
        port = free_port()
        node = start_node(Path(tmp) / "home", port)
        try:
            wait_ready(port, "/health")
            ours = load(port, "/status", seconds, connections)
        finally:
            stop(node)
    port = free_port()
    hello = start_hello(port)
    try:
        wait_ready(port, "/")
        base = load(port, "/", seconds, connections)
    finally:
        stop(hello)
    return {
        "generator": generator,
        "connections": connections,
        "seconds": seconds,
        "node_status": ours,
        "hello_world": base,
        "ratio": round(ours["rps"] / base["rps"], 3),
        "target_rps": TARGET_RPS,
        "pass": ours["rps"] >= TARGET_RPS and ours["errors"] == 0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--generator", choices=["wrk", "python"], default=None)
    options = parser.parse_args()
    generator = options.generator or ("wrk" if shutil.which("wrk") else "python")
    result = measure(options.seconds, options.connections, generator)
    ours, base = result["node_status"], result["hello_world"]
    assert isinstance(ours, dict)
    assert isinstance(base, dict)
    print(f"load: {generator}, {options.connections} connections, {options.seconds} s")
    print_table(
        [
            ("requests/s", round(ours["rps"]), round(base["rps"])),
            ("p50 latency (ms)", round(ours["p50_ms"], 2), round(base["p50_ms"], 2)),
            ("p99 latency (ms)", round(ours["p99_ms"], 2), round(base["p99_ms"], 2)),
            ("ratio node / hello", result["ratio"], ""),
            (f"pass (>= {TARGET_RPS} req/s, no errors)", result["pass"], ""),
        ],
        ("measure", "GET /status", "hello-world"),
    )
    write_result(f"api_throughput_{generator}", result)
