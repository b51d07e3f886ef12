"""Watches one honest node during the hostile soak, from inside its own host.

Every ``--every`` seconds it reads the node's peer table (open ``GET /peers``) and the
node process's RSS, and makes two signed calls: one with the node's own key (the owner)
and one to each other honest node with this node's key (a trusted peer). It writes one
JSON document with the timeline when the duration is over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import psutil

from p2prc import AsyncClient, P2PRCError
from p2prc.config import Home
from p2prc.identity import Identity


async def _call(client: AsyncClient) -> tuple[bool, float, str]:
    start = time.perf_counter()
    try:
        await client.whoami()
    except P2PRCError as exc:
        return False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:200]
    return True, time.perf_counter() - start, ""


async def watch(home: Path, local: str, others: list[str], duration: float, every: float) -> Any:
    identity = Identity.load(Home(home).identity_dir)
    runtime = json.loads((home / "node.json").read_text())
    process = psutil.Process(int(runtime["pid"]))
    timeline: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    async with AsyncClient(local, identity=identity, timeout=5) as owner:
        peers = [AsyncClient(url, identity=identity, timeout=5) for url in others]
        try:
            while time.monotonic() < deadline:
                now = time.time()
                try:
                    views = await owner.peers()
                    states = {v.node_id: v.state for v in views if not v.me}
                except P2PRCError as exc:
                    states = {"error": f"{type(exc).__name__}"}
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    rss = 0
                timeline.append({"t": now, "states": states, "rss": rss, "members": len(states)})
                for who, url, client in [
                    ("owner", local, owner),
                    *(("peer", url, c) for url, c in zip(others, peers, strict=True)),
                ]:
                    ok, seconds, error = await _call(client)
                    calls.append(
                        {"t": now, "who": who, "to": url, "ok": ok, "s": seconds, "error": error}
                    )
                await asyncio.sleep(max(0.0, every - (time.time() - now)))
        finally:
            for client in peers:
                await client.aclose()
    return {"timeline": timeline, "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("home", type=Path)
    parser.add_argument("local")
    parser.add_argument("others", nargs="*")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=0.25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = asyncio.run(
        watch(args.home, args.local, args.others, min(args.duration, 900.0), args.every)
    )
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
