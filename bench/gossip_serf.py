"""Gossip against Serf: 10 Serf agents and 10 p2prc nodes on loopback, in one run.

Each system runs as real processes (``serf agent`` and ``p2prc start``, each node its own
home) joined to its first node. For each of ``--runs`` rounds, interleaved system by system:

- metadata: one node changes its metadata (Serf: the RPC ``tags`` call that ``serf tags
  -set`` makes; p2prc: the owner's signed ``POST /meta`` that ``p2prc meta set`` makes),
  until every other node's view shows it;
- join: an already running node outside the cluster joins it through the first node
  (Serf: the RPC ``join`` of ``serf join``; p2prc: ``POST /peers`` of ``p2prc peers add``),
  until every node of the cluster lists it alive;
- failure: a node of the cluster is SIGKILLed, until every other node shows it failed
  (Serf) or dead (p2prc).

Views are polled every 20 ms from just before the change is made, while the call that makes
it runs (Serf: RPC ``members`` over one connection per agent; p2prc: ``GET /peers``); a node
counts at the first answer that shows the change, timed when the answer arrives. The
cluster stays at 10 alive nodes: each round's joiner replaces the node that round kills.
Reports medians and p2prc / Serf ratios in ``results/gossip_serf.json`` (a Markdown table
on stdout). Loopback only; every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
from _common import free_port, write_result

from p2prc import AsyncClient

POLL = 0.02
VERBOSE = False
# Seconds each poll round took (every view asked once, concurrently), by system; and how
# long the call that made each change took to return.
ROUNDS: dict[str, list[float]] = {"serf": [], "p2prc": []}
CALLS: dict[str, dict[str, list[float]]] = {
    "serf": {"metadata": [], "join": []},
    "p2prc": {"metadata": [], "join": []},
}
BOUND = 30.0  # seconds a measurement may take before it counts as never


# Serf -------------------------------------------------------------------------------


class SerfRpc:
    """A msgpack RPC connection to one agent (the protocol the ``serf`` CLI speaks)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace")
        self._seq = 0

    @classmethod
    async def connect(cls, port: int) -> SerfRpc:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rpc = cls(reader, writer)
        await rpc.call("handshake", {"Version": 1}, body=False)
        return rpc

    async def _next(self) -> Any:
        while True:
            for item in self._unpacker:
                return item
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("serf RPC closed")
            self._unpacker.feed(data)

    async def call(
        self, command: str, args: dict[str, Any] | None = None, body: bool = True
    ) -> Any:
        self._seq += 1
        self._writer.write(msgpack.packb({"Command": command, "Seq": self._seq}))
        if args is not None:
            self._writer.write(msgpack.packb(args))
        await self._writer.drain()
        header = await self._next()
        if header.get("Error"):
            raise RuntimeError(f"serf {command}: {header['Error']}")
        return await self._next() if body else None

    async def members(self) -> dict[str, dict[str, Any]]:
        answer = await self.call("members")
        return {m["Name"]: m for m in answer["Members"]}

    def close(self) -> None:
        self._writer.close()


@dataclass
class SerfAgent:
    name: str
    port: int
    rpc_port: int
    process: subprocess.Popen[bytes]
    rpc: SerfRpc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _spawn_serf(name: str, port: int, rpc_port: int, join: str | None) -> subprocess.Popen[bytes]:
    command = ["serf", "agent", "-node", name, "-bind", f"127.0.0.1:{port}"]
    command += ["-rpc-addr", f"127.0.0.1:{rpc_port}", "-log-level", "err"]
    if join:
        command += ["-join", join]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def start_serf(name: str, join: str | None) -> SerfAgent:
    port, rpc_port = free_port(), free_port()
    process = _spawn_serf(name, port, rpc_port, join)
    agent = SerfAgent(name, port, rpc_port, process)
    deadline = time.monotonic() + BOUND
    while agent.rpc is None:
        try:
            agent.rpc = await SerfRpc.connect(rpc_port)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serf agent {name} did not start") from None
            await asyncio.sleep(0.05)
    return agent


# p2prc ------------------------------------------------------------------------------


@dataclass
class Node:
    home: Path
    process: subprocess.Popen[str]
    api: str
    node_id: str
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.api, timeout=5, trust_env=False)

    async def peers(self) -> dict[str, dict[str, Any]]:
        views = (await self.http.get("/peers")).json()
        return {view["node_id"]: view for view in views if not view["me"]}


def _cli(home: Path, *args: str) -> None:
    env = {**os.environ, "P2PRC_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "p2prc", *args], env=env, check=True, capture_output=True, timeout=60
    )


def start_p2prc(home: Path, root: str | None) -> Node:
    if root:
        _cli(home, "config", "set", "bootstrap", root)
    env = {**os.environ, "P2PRC_HOME": str(home)}
    command = [sys.executable, "-m", "p2prc", "--json", "start", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=15)
        raise RuntimeError(f"p2prc node in {home} did not start")
    ready = json.loads(line)
    return Node(home, process, ready["api"], ready["node_id"])


# Measuring --------------------------------------------------------------------------

View = Callable[[], Awaitable[bool]]
Check = Callable[[dict[str, dict[str, Any]]], bool]


def field_is(member: str, key: str, value: object, tag: str | None = None) -> Check:
    """True when the view's entry for ``member`` has ``key`` (or its tag ``tag``) = value."""

    def check(view: dict[str, dict[str, Any]]) -> bool:
        entry = view.get(member, {})
        found = entry.get(key, {}).get(tag) if tag is not None else entry.get(key)
        return bool(found == value)

    return check


async def until_all(views: list[View], began: float, system: str = "") -> float:
    """Seconds from ``began`` until every view has answered True once (polled at 20 ms)."""
    pending = list(views)
    seen: list[float] = []
    while pending and time.monotonic() - began < BOUND:
        round_start = time.monotonic()
        answers = await asyncio.gather(*(view() for view in pending), return_exceptions=True)
        now = time.monotonic()
        if system:
            ROUNDS[system].append(now - round_start)
        still = []
        for view, answer in zip(pending, answers, strict=True):
            if answer is True:
                seen.append(now)
            else:
                still.append(view)
        pending = still
        await asyncio.sleep(max(0.0, POLL - (time.monotonic() - round_start)))
    if VERBOSE and seen:
        print(f"  {system}: seen at", [round(t - began, 3) for t in sorted(seen)], flush=True)
    return round(max(seen) - began, 3) if not pending and seen else float("inf")


async def while_polling(
    system: str, kind: str, call: Awaitable[Any], views: list[View]
) -> tuple[float, Any]:
    """Make the change and poll the views at the same time: seconds until all show it
    (from just before the call), and the call's result."""
    began = time.monotonic()

    async def timed() -> Any:
        result = await call
        CALLS[system][kind].append(time.monotonic() - began)
        return result

    task = asyncio.ensure_future(timed())
    took = await until_all(views, began, system)
    return took, await task


async def killed(process: subprocess.Popen[Any], views: list[View], system: str) -> float:
    """SIGKILL the process; seconds until every view shows it failed or dead."""
    began = time.monotonic()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    return await until_all(views, began, system)


def serf_view(agent: SerfAgent, check: Callable[[dict[str, dict[str, Any]]], bool]) -> View:
    async def view() -> bool:
        assert agent.rpc is not None
        return check(await agent.rpc.members())

    return view


def node_view(node: Node, check: Callable[[dict[str, dict[str, Any]]], bool]) -> View:
    async def view() -> bool:
        return check(await node.peers())

    return view


class SerfCluster:
    def __init__(self, size: int) -> None:
        self.size = size
        self.agents: list[SerfAgent] = []
        self.dead: list[SerfAgent] = []
        self._count = 0

    async def start(self) -> None:
        first = await start_serf("n0", None)
        self.agents = [first]
        for index in range(1, self.size):
            self.agents.append(await start_serf(f"n{index}", first.address))
        self._count = self.size
        names = {a.name for a in self.agents}
        await until_all([self._alive_view(a, names) for a in self.agents], time.monotonic())

    def _alive_view(self, agent: SerfAgent, names: set[str]) -> View:
        def check(members: dict[str, dict[str, Any]]) -> bool:
            return all(members.get(n, {}).get("Status") == "alive" for n in names)

        return serf_view(agent, check)

    async def metadata(self, changer: int, value: str) -> float:
        agent = self.agents[changer]
        check = field_is(agent.name, "Tags", value, tag="meta")
        views = [serf_view(a, check) for a in self.agents if a is not agent]
        assert agent.rpc is not None
        call = agent.rpc.call("tags", {"Tags": {"meta": value}, "DeleteTags": []}, body=False)
        return (await while_polling("serf", "metadata", call, views))[0]

    async def join(self) -> float:
        joiner = await start_serf(f"n{self._count}", None)
        self._count += 1
        await asyncio.sleep(1.0)  # already running
        views = [self._alive_view(a, {joiner.name}) for a in self.agents]
        assert joiner.rpc is not None
        call = joiner.rpc.call("join", {"Existing": [self.agents[0].address], "Replay": False})
        took, _ = await while_polling("serf", "join", call, views)
        self.agents.append(joiner)
        return took

    async def kill(self, victim: int) -> float:
        agent = self.agents.pop(victim)
        views = [serf_view(a, field_is(agent.name, "Status", "failed")) for a in self.agents]
        self.dead.append(agent)
        return await killed(agent.process, views, "serf")

    def stop(self) -> None:
        for agent in self.agents + self.dead:
            if agent.rpc is not None:
                agent.rpc.close()
            if agent.process.poll() is None:
                agent.process.kill()
            agent.process.wait(timeout=10)


class P2prcCluster:
    def __init__(self, size: int, base: Path) -> None:
        self.size, self.base = size, base
        self.nodes: list[Node] = []
        self.dead: list[Node] = []
        self._count = 0

    async def start(self) -> None:
        first = start_p2prc(self.base / "n0", None)
        self.nodes = [first]
        root = first.api.removeprefix("http://")
        for index in range(1, self.size):
            self.nodes.append(start_p2prc(self.base / f"n{index}", root))
        self._count = self.size
        ids = {n.node_id for n in self.nodes}
        await until_all(
            [self._alive_view(n, ids - {n.node_id}) for n in self.nodes], time.monotonic()
        )

    def _alive_view(self, node: Node, ids: set[str]) -> View:
        def check(peers: dict[str, dict[str, Any]]) -> bool:
            return all(peers.get(i, {}).get("state") == "alive" for i in ids)

        return node_view(node, check)

    async def metadata(self, changer: int, value: str) -> float:
        node = self.nodes[changer]
        check = field_is(node.node_id, "metadata", value)
        views = [node_view(n, check) for n in self.nodes if n is not node]
        async with AsyncClient(node.api, home=node.home, audience=node.node_id) as client:
            await client.status()  # connection open before the clock starts
            took, _ = await while_polling("p2prc", "metadata", client.set_metadata(value), views)
        return took

    async def join(self) -> float:
        joiner = start_p2prc(self.base / f"n{self._count}", None)
        self._count += 1
        await asyncio.sleep(1.0)
        views = [self._alive_view(n, {joiner.node_id}) for n in self.nodes]
        root = self.nodes[0].api.removeprefix("http://")
        async with AsyncClient(joiner.api, home=joiner.home, audience=joiner.node_id) as client:
            await client.status()
            took, result = await while_polling("p2prc", "join", client.add_peer(root), views)
        if result.failed:
            raise RuntimeError(f"join failed: {result.failed}")
        self.nodes.append(joiner)
        return took

    async def kill(self, victim: int) -> float:
        node = self.nodes.pop(victim)
        views = [node_view(n, field_is(node.node_id, "state", "dead")) for n in self.nodes]
        self.dead.append(node)
        return await killed(node.process, views, "p2prc")

    async def stop(self) -> None:
        for node in self.nodes + self.dead:
            await node.http.aclose()
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes + self.dead:
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
            if node.process.stdout is not None:
                node.process.stdout.close()


async def measure(size: int, runs: int, settle: float) -> dict[str, Any]:
    if shutil.which("serf") is None:
        raise SystemExit("serf is not installed (apt-get install serf)")
    base = Path(tempfile.mkdtemp(prefix="p2prc-serf-bench-"))
    serf, p2prc = SerfCluster(size), P2prcCluster(size, base)
    times: dict[str, dict[str, list[float]]] = {
        "serf": {"metadata": [], "join": [], "failure": []},
        "p2prc": {"metadata": [], "join": [], "failure": []},
    }
    try:
        await serf.start()
        await p2prc.start()
        await asyncio.sleep(settle)
        for run in range(runs):
            for name, cluster in (("serf", serf), ("p2prc", p2prc)):
                changer, victim = 1 + run % (size - 1), size - 1 - run % (size - 1)
                row = times[name]
                row["metadata"].append(await cluster.metadata(changer, f"round-{run}"))
                await asyncio.sleep(settle)
                row["join"].append(await cluster.join())
                await asyncio.sleep(settle)
                row["failure"].append(await cluster.kill(victim))
                await asyncio.sleep(settle)
                print(name, run, {k: v[-1] for k, v in row.items()}, flush=True)
    finally:
        serf.stop()
        await p2prc.stop()
        shutil.rmtree(base, ignore_errors=True)
    return summarise(size, runs, times)


def summarise(size: int, runs: int, times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    medians = {
        system: {kind: round(statistics.median(values), 3) for kind, values in row.items()}
        for system, row in times.items()
    }
    ratios = {
        kind: round(medians["p2prc"][kind] / medians["serf"][kind], 2)
        for kind in medians["serf"]
        if medians["serf"][kind] > 0
    }

    def median_ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 1) if values else float("nan")

    return {
        "nodes": size,
        "runs": runs,
        "poll_s": POLL,
        "poll_round_median_ms": {system: median_ms(v) for system, v in ROUNDS.items()},
        "call_median_ms": {
            system: {kind: median_ms(v) for kind, v in row.items()} for system, row in CALLS.items()
        },
        "times_s": times,
        "median_s": medians,
        "ratio_p2prc_over_serf": ratios,
    }


def markdown(result: dict[str, Any], title: str) -> str:
    medians, ratios = result["median_s"], result["ratio_p2prc_over_serf"]
    rows = [
        f"### {title}",
        "",
        f"{result['nodes']} nodes each, {result['runs']} runs, views polled every "
        f"{result['poll_s'] * 1000:.0f} ms; medians (all runs in brackets).",
        "",
        "| | p2prc | Serf | p2prc / Serf |",
        "|---|---|---|---|",
    ]
    labels = {
        "metadata": "metadata change seen by every node",
        "join": "a running node joins: listed alive by all",
        "failure": "SIGKILLed node failed/dead everywhere",
    }
    for kind, label in labels.items():
        ours = ", ".join(f"{t:.2f}" for t in result["times_s"]["p2prc"][kind])
        theirs = ", ".join(f"{t:.2f}" for t in result["times_s"]["serf"][kind])
        rows.append(
            f"| {label} | {medians['p2prc'][kind]:.2f} s ({ours}) "
            f"| {medians['serf'][kind]:.2f} s ({theirs}) | {ratios[kind]:.2f} |"
        )
    rounds, calls = result["poll_round_median_ms"], result["call_median_ms"]
    rows += [
        "",
        f"A poll round (every pending view asked once, at once) took {rounds['p2prc']} ms "
        f"(p2prc) and {rounds['serf']} ms (Serf), medians. The call that makes the change "
        f"returned in {calls['p2prc']['metadata']} ms (`POST /meta`) and "
        f"{calls['p2prc']['join']} ms (`POST /peers`) against {calls['serf']['metadata']} ms "
        f"and {calls['serf']['join']} ms (Serf RPC `tags`, `join`); views are polled meanwhile.",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between steps")
    parser.add_argument("--out", default="gossip_serf", help="results/<out>.json")
    parser.add_argument("--title", default="Measured")
    parser.add_argument("--verbose", action="store_true", help="print when each node saw it")
    options = parser.parse_args()
    VERBOSE = options.verbose
    result = asyncio.run(measure(options.nodes, options.runs, options.settle))
    write_result(options.out, result)
    print(markdown(result, options.title))
