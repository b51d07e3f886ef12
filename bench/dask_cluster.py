"""Dask on the pool: P2PRCCluster start-up, task throughput and a worker-to-worker transfer,
each against ``distributed.LocalCluster(n_workers=3, processes=True)`` in the same run.

Two real nodes in this process on loopback (Docker runtime, the Dask image cached), trusting
each other; every Dask connection goes through the owner node's SSH hub over TLS.
  start:      P2PRCCluster(workers=3) -> a Client that sees 3 workers (median of --runs);
  throughput: 10,000 small tasks (client.map of a trivial function, gathered), tasks/s;
  transfer:   a 256 MiB numpy array made on one worker, fetched by a task on another
              (client.submit(..., workers=[...])), MiB/s.
Every container is removed afterwards. Not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import numpy as np
from _common import print_table, write_result
from distributed import Client, LocalCluster, wait
from distributed.versions import VersionMismatchWarning

from p2prc import ContainerConfig, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.cluster.image import ensure_dask_image
from p2prc.config import GossipConfig
from p2prc.dask import P2PRCCluster

# The workers cannot import this script: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIB = 1024 * 1024
TASKS = 10_000


def _inc(i: int) -> int:
    return i + 1


def _make(size: int) -> Any:
    return np.ones(size // 8, dtype="float64")


def _size(array: Any) -> int:
    return int(array.nbytes)


def _wait(client: Any, n: int) -> None:
    client.wait_for_workers(n, timeout=300)


def throughput(client: Any) -> float:
    """Tasks per second for TASKS trivial tasks, submitted and gathered."""
    client.submit(_inc, -1).result()  # warm
    start = time.perf_counter()
    futures = client.map(_inc, range(TASKS), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    assert sum(results) == TASKS * (TASKS + 1) // 2
    return TASKS / elapsed


def transfer(client: Any, size: int) -> float:
    """MiB/s of a ``size``-byte array made on one worker and fetched on another."""
    workers = sorted(client.scheduler_info()["workers"])
    source, target = workers[0], workers[1]
    made = client.submit(_make, size, workers=[source], pure=False)
    wait([made])  # type: ignore[no-untyped-call]  # made, and kept, on the source
    start = time.perf_counter()
    fetched = client.submit(_size, made, workers=[target], allow_other_workers=False, pure=False)
    assert fetched.result() == size
    elapsed = time.perf_counter() - start
    del made, fetched
    return size / MIB / elapsed


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VersionMismatchWarning)  # Debian's 3.11 patch release
        yield


def pool_run(home: Path, image: str, runs: int, size: int) -> dict[str, Any]:
    starts = []
    for _ in range(runs):
        start = time.perf_counter()
        with (
            _quiet(),
            P2PRCCluster(workers=3, threads=1, image=image, home=home) as cluster,
            Client(cluster) as client,  # type: ignore[no-untyped-call]
        ):
            _wait(client, 3)
            starts.append(time.perf_counter() - start)
    with (
        _quiet(),
        P2PRCCluster(workers=3, threads=1, image=image, home=home) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        _wait(client, 3)
        rate = throughput(client)
        speed = transfer(client, size)
    return {"start_s": starts, "tasks_per_s": rate, "transfer_mib_s": speed}


def local_run(runs: int, size: int) -> dict[str, Any]:
    starts = []
    for _ in range(runs):
        start = time.perf_counter()
        with (
            LocalCluster(n_workers=3, threads_per_worker=1, processes=True) as cluster,  # type: ignore[no-untyped-call]
            Client(cluster) as client,  # type: ignore[no-untyped-call]
        ):
            _wait(client, 3)
            starts.append(time.perf_counter() - start)
    with (
        LocalCluster(n_workers=3, threads_per_worker=1, processes=True) as cluster,  # type: ignore[no-untyped-call]
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        _wait(client, 3)
        rate = throughput(client)
        speed = transfer(client, size)
    return {"start_s": starts, "tasks_per_s": rate, "transfer_mib_s": speed}


async def main(runs: int, size: int) -> dict[str, Any]:
    image = await asyncio.to_thread(ensure_dask_image)
    offers = ContainerConfig(images=["p2prc/sshd:latest", image])
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-dask-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            nodes: list[Node] = []
            for name in ("bob", "alice"):  # alice joins bob: workers go to both from her table
                home = Home(Path(tmp) / name)
                config, identity = init_home(
                    home,
                    NodeConfig(
                        name=name,
                        trust=TrustConfig(mode="open"),
                        containers=offers,
                        bootstrap=[f"127.0.0.1:{n.port}" for n in nodes],
                        gossip=GossipConfig(lan_discovery=False),
                    ),
                )
                node = Node(config, home, identity=identity, host="127.0.0.1", port=0)
                nodes.append(await stack.enter_async_context(node))
            bob, alice = nodes
            for _ in range(300):
                if bob.identity.node_id in {m.record.node_id for m in alice.gossip.table.alive()}:
                    break
                await asyncio.sleep(0.1)
            pool = await asyncio.to_thread(pool_run, Path(tmp) / "alice", image, runs, size)
    local = await asyncio.to_thread(local_run, runs, size)
    return {
        "start_to_client_ready_median_s": round(statistics.median(pool["start_s"]), 2),
        "local_start_median_s": round(statistics.median(local["start_s"]), 2),
        "tasks_per_s": round(pool["tasks_per_s"]),
        "local_tasks_per_s": round(local["tasks_per_s"]),
        "tasks_ratio_to_local": round(pool["tasks_per_s"] / local["tasks_per_s"], 2),
        "transfer_mib": size // MIB,
        "transfer_mib_s": round(pool["transfer_mib_s"]),
        "local_transfer_mib_s": round(local["transfer_mib_s"]),
        "transfer_ratio_to_local": round(pool["transfer_mib_s"] / local["transfer_mib_s"], 2),
        "tasks": TASKS,
        "image": image,
        "seconds": {
            "start": [round(x, 2) for x in pool["start_s"]],
            "local_start": [round(x, 2) for x in local["start_s"]],
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="size moved between two workers")
    args = parser.parse_args()
    result = asyncio.run(main(args.runs, args.mib * MIB))
    rows: list[tuple[str, object, object]] = [
        ("workers=3 -> client ready (s, median)", result["start_to_client_ready_median_s"],
         result["local_start_median_s"]),
        (f"{TASKS} small tasks (tasks/s)", result["tasks_per_s"], result["local_tasks_per_s"]),
        (f"{result['transfer_mib']} MiB worker to worker (MiB/s)", result["transfer_mib_s"],
         result["local_transfer_mib_s"]),
    ]  # fmt: skip
    print_table(rows, ("measure", "P2PRCCluster", "LocalCluster"))
    for name in ("tasks_ratio_to_local", "transfer_ratio_to_local"):
        print(f"{name:40} {result[name]!s:>14}")
    write_result("dask_cluster", result)
