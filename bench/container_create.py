"""Container create -> SSH login, p2prc against plain ``docker run`` of the same image.

Runs a real node process (Docker runtime), then N times each:
  p2prc:    signed POST /containers -> NDJSON stream -> container ready -> ``ssh ... true``
  baseline: ``docker run -d -p 127.0.0.1::22 IMAGE`` -> poll for the SSH banner -> ``ssh ... true``
and reports medians, the ratio, and how fast the API acknowledges a create request (first
NDJSON line). Every container it makes is removed. Not a test: it prints and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from p2prc import AsyncClient, Identity
from p2prc.containers.images import DEFAULT_IMAGE

RESULTS = Path(__file__).parent / "results"


def ssh_login(key: Path, port: int) -> float:
    """Seconds for one real SSH login running ``true``."""
    start = time.perf_counter()
    subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "p2prc@127.0.0.1", "true"],
        check=True, timeout=30,
    )  # fmt: skip
    return time.perf_counter() - start


def wait_banner(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(4) == b"SSH-":
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("no SSH banner")


def baseline_once(key: Path, public_key: str) -> float:
    start = time.perf_counter()
    container = subprocess.run(
        ["docker", "run", "-d", "-p", "127.0.0.1::22", "-e",
         f"P2PRC_AUTHORIZED_KEYS={public_key}", DEFAULT_IMAGE],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        port_line = subprocess.run(
            ["docker", "port", container, "22/tcp"], check=True, capture_output=True, text=True
        ).stdout.splitlines()[0]
        port = int(port_line.rsplit(":", 1)[1])
        wait_banner(port, time.monotonic() + 30)
        ssh_login(key, port)
        return time.perf_counter() - start
    finally:
        subprocess.run(["docker", "rm", "-f", container], check=False, capture_output=True)


async def p2prc_once(client: AsyncClient, key: Path) -> tuple[float, float]:
    """(create -> login seconds, seconds until the first NDJSON line)."""
    identity = Identity.load(key.parent)
    status = await client.status()
    body = b"{}"
    headers = identity.signed_headers("POST", "/containers", status.node_id, body)
    headers["content-type"] = "application/json"
    start = time.perf_counter()
    first_line = 0.0
    view: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(base_url=client.base_url, timeout=60) as http,
        http.stream("POST", "/containers", content=body, headers=headers) as response,
    ):
        async for line in response.aiter_lines():
            if not first_line:
                first_line = time.perf_counter() - start
            event = json.loads(line)
            if event["event"] == "created":
                view = event["container"]
            elif event["event"] == "error":
                raise RuntimeError(event["error"])
    await asyncio.to_thread(ssh_login, key, view["ssh"]["port"])
    total = time.perf_counter() - start
    await client.remove_container(view["id"])
    return total, first_line


def start_node(home: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "P2PRC_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "--json", "start", "--port", "0", "--host", "127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())["api"]


async def main(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-") as tmp:
        home = Path(tmp) / "home"
        process, api = start_node(home)
        key = home / "identity" / "id_ed25519"
        public_key = (home / "identity" / "id_ed25519.pub").read_text().strip()
        try:
            async with AsyncClient(api, home=home) as client:
                await p2prc_once(client, key)  # warm-up: first docker-py connection
                ours = [await p2prc_once(client, key) for _ in range(runs)]
            baseline = [
                await asyncio.to_thread(baseline_once, key, public_key) for _ in range(runs)
            ]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
    create = statistics.median(t for t, _ in ours)
    ack = [a for _, a in ours]
    base = statistics.median(baseline)
    return {
        "runs": runs,
        "p2prc_create_to_login_median_s": round(create, 3),
        "docker_run_to_login_median_s": round(base, 3),
        "ratio": round(create / base, 2),
        "api_ack_median_ms": round(statistics.median(ack) * 1000, 1),
        "api_ack_max_ms": round(max(ack) * 1000, 1),
        "target_create_to_login_s": 2.0,
        "target_ack_ms": 100,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    result = asyncio.run(main(parser.parse_args().runs))
    print(f"{'measure':38} {'value':>10}")
    for name, value in result.items():
        print(f"{name:38} {value!s:>10}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "container_create.json").write_text(json.dumps(result, indent=2) + "\n")
