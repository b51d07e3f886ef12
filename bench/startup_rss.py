"""Node start-up time (process start -> /health answers) and idle RSS, against bare uvicorn."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    free_port,
    get,
    print_table,
    rss_mib,
    start_hello,
    start_node,
    stop,
    wait_ready,
    write_result,
)

TARGET_START_S = 1.5
TARGET_RSS_MIB = 80.0


def measure(runs: int) -> dict[str, object]:
    node_starts, hello_starts, node_rss, hello_rss = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-") as tmp:
        for run in range(runs):
            home = Path(tmp) / f"home{run}"
            port = free_port()
            node = start_node(home, port)
            try:
                node_starts.append(wait_ready(port, "/health"))
                for path in ("/status", "/specs", "/health") * 5:
                    get(port, path)
                time.sleep(2)
                node_rss.append(rss_mib(node.pid))
            finally:
                stop(node)
            port = free_port()
            hello = start_hello(port)
            try:
                hello_starts.append(wait_ready(port, "/health"))
                for _ in range(15):
                    get(port, "/health")
                time.sleep(2)
                hello_rss.append(rss_mib(hello.pid))
            finally:
                stop(hello)
    start, base_start = statistics.median(node_starts), statistics.median(hello_starts)
    rss, base_rss = statistics.median(node_rss), statistics.median(hello_rss)
    return {
        "runs": runs,
        "node_start_median_s": round(start, 3),
        "node_start_max_s": round(max(node_starts), 3),
        "hello_start_median_s": round(base_start, 3),
        "start_ratio": round(start / base_start, 2),
        "node_idle_rss_mib": round(rss, 1),
        "hello_idle_rss_mib": round(base_rss, 1),
        "rss_ratio": round(rss / base_rss, 2),
        "start_target_s": TARGET_START_S,
        "rss_target_mib": TARGET_RSS_MIB,
        "start_pass": max(node_starts) < TARGET_START_S,
        "rss_pass": rss < TARGET_RSS_MIB,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    result = measure(parser.parse_args().runs)
    print_table(
        [
            ("start-up median (s)", result["node_start_median_s"], result["hello_start_median_s"]),
            ("start-up max (s)", result["node_start_max_s"], ""),
            ("idle RSS (MiB)", result["node_idle_rss_mib"], result["hello_idle_rss_mib"]),
            ("ratio start / RSS", result["start_ratio"], result["rss_ratio"]),
            ("pass start < 1.5 s / RSS < 80 MiB", result["start_pass"], result["rss_pass"]),
        ],
        ("measure", "p2prc node", "bare uvicorn"),
    )
    write_result("startup_rss", result)
