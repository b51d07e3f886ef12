"""``p2prc join TOKEN`` -> a container created on the inviter, against a bare create.

Runs real node processes on loopback (Docker runtime, image cached): alice invites, and
each round a new node bob (its own key) joins, one round of warm-up, then N rounds of:
  join:     ``p2prc join TOKEN`` on bob, then ``p2prc container create ALICE`` (CLI processes,
            as a user types them; the token is made beforehand, untimed)
  baseline: ``p2prc container create ALICE`` on bob, now that alice trusts it
Reports medians and the ratio. Every container it makes is removed. Not a test: it prints
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def cli(home: Path, *args: str) -> Any:
    """One ``p2prc --json`` CLI process on ``home``; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "p2prc", "--json", *args],
        env={**os.environ, "P2PRC_HOME": str(home)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"p2prc {' '.join(args)}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout) if done.stdout.strip() else None


def start_node(home: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    cli(home, "init")
    cli(home, "config", "set", "name", name)
    cli(home, "config", "set", "gossip.lan_discovery", "false")
    process = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "--json", "start", "--port", "0", "--host", "127.0.0.1"],
        env={**os.environ, "P2PRC_HOME": str(home)}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())["api"]


def create(bob: Path, peer: str) -> tuple[float, str]:
    """Seconds for one ``p2prc container create`` on ``peer``, and the container's id."""
    start = time.perf_counter()
    view = cli(bob, "container", "create", peer)
    return time.perf_counter() - start, view["id"]


def join_once(alice: Path, bob: Path, peer: str) -> tuple[float, float]:
    """(join -> container created seconds, join alone seconds)."""
    token = cli(alice, "invite", "--ttl", "10m", "--uses", "1")["token"]
    start = time.perf_counter()
    cli(bob, "join", token)
    joined = time.perf_counter() - start
    _, container = create(bob, peer)
    total = time.perf_counter() - start
    cli(bob, "container", "rm", container)
    return total, joined


def baseline_once(bob: Path, peer: str) -> float:
    seconds, container = create(bob, peer)
    cli(bob, "container", "rm", container)
    return seconds


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)


def main(runs: int) -> dict[str, Any]:
    joins, alone, bare = [], [], []
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-") as tmp:
        process, api = start_node(Path(tmp) / "alice", "alice")
        peer = api.removeprefix("http://")
        try:
            # A new joiner each round (its own key: redeeming is rate limited per key);
            # round 0 is a warm-up (docker-py's first connection, the pools).
            for round_ in range(runs + 1):
                bob = Path(tmp) / f"bob{round_}"
                joiner = start_node(bob, f"bob{round_}")[0]
                try:
                    total, joined = join_once(Path(tmp) / "alice", bob, peer)
                    trusted = baseline_once(bob, peer)  # alice trusts this joiner now
                finally:
                    stop(joiner)
                if round_:
                    joins.append(total)
                    alone.append(joined)
                    bare.append(trusted)
        finally:
            stop(process)
    total, base = statistics.median(joins), statistics.median(bare)
    return {
        "runs": runs,
        "join_to_container_created_median_s": round(total, 3),
        "join_to_container_created_max_s": round(max(joins), 3),
        "join_alone_median_s": round(statistics.median(alone), 3),
        "trusted_create_median_s": round(base, 3),
        "ratio": round(total / base, 2),
        "target_join_to_container_s": 10.0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    result = main(parser.parse_args().runs)
    print(f"{'measure':38} {'value':>10}")
    for key, value in result.items():
        print(f"{key:38} {value:>10}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "join.json").write_text(json.dumps(result, indent=2) + "\n")
