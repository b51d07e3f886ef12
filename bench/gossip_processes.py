"""Gossip convergence with the simulated nodes spread over several processes (real UDP).

Each worker process hosts a slice of the N nodes (its own UDP sockets on 127.0.0.1, its
own event loop) and runs the real SWIM engine. The parent hands every worker all records,
then a schedule on the shared monotonic clock: a new node joins, a node changes its
metadata, a node is killed. Workers record when each of their nodes first learned each
fact; the parent reports the time until 99 % of nodes knew (dead: 100 %), false deaths,
and gossip bytes per node per second, beside the push-gossip model's prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

from _common import GOSSIP_FANOUT, GOSSIP_PERIOD, gossip_model_seconds, sim_record, write_result

from p2prc.identity import Identity
from p2prc.peers.records import PeerRecord
from p2prc.peers.swim import Swim, SwimSettings
from p2prc.peers.table import Member, MemberState, PeerTable

PERIOD, FANOUT = GOSSIP_PERIOD, GOSSIP_FANOUT
model_seconds = gossip_model_seconds


def _record(identity: Identity, port: int, version: int, metadata: str = "") -> PeerRecord:
    return sim_record(identity, f"sim-{port}", port, version, metadata)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, worker: Worker, index: int) -> None:
        self.worker, self.index = worker, index

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.worker.received(self.index, data)


class Worker:
    """One process's slice of the cluster."""

    def __init__(self, count: int, pipe: Connection) -> None:
        self.pipe = pipe
        self.identities = [Identity.generate() for _ in range(count)]
        self.nodes: list[Swim] = []
        self.transports: list[asyncio.DatagramTransport] = []
        self.down: set[int] = set()
        self.seen: dict[str, dict[int, float]] = {"join": {}, "meta": {}, "dead": {}}
        self.false_seen: set[tuple[int, str]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for index in range(len(self.identities)):
            transport, _ = await loop.create_datagram_endpoint(
                lambda index=index: _Udp(self, index),  # type: ignore[misc]
                local_addr=("127.0.0.1", 0),
            )
            self.transports.append(transport)
        ports = [t.get_extra_info("sockname")[1] for t in self.transports]
        mine = [_record(i, p, 1).encode() for i, p in zip(self.identities, ports, strict=True)]
        self.pipe.send(mine)
        plan: dict[str, Any] = self.pipe.recv()
        self._build(plan, ports)
        self.pipe.send("ready")
        plan.update(self.pipe.recv())
        await self._follow(plan, ports)
        for transport in self.transports:
            transport.close()
        sent = sum(n.stats.bytes_sent for n in self.nodes)
        false = sum(
            1
            for i, n in enumerate(self.nodes)
            if i not in self.down
            for m in n.table.members.values()
            if m.state >= MemberState.DEAD and m.record.node_id != plan["victim"]
        )
        self.pipe.send(
            {"seen": self.seen, "sent": sent, "false": false, "ever": len(self.false_seen)}
        )

    def _build(self, plan: dict[str, Any], ports: list[int]) -> None:
        from p2prc.peers.records import decode_record

        records = [decode_record(raw) for raw in plan["records"]]
        settings = SwimSettings(period=PERIOD, probe_timeout=PERIOD / 2, fanout=FANOUT)
        for index, identity in enumerate(self.identities):
            me = next(r for r in records if r.node_id == identity.node_id)
            table = PeerTable(me)
            for record in records:
                if record.node_id not in (identity.node_id, plan["joiner"]):
                    # Verified once by decode_record above; skip a check per table.
                    table.members[record.node_id] = Member(record, state_version=record.version)
            self.nodes.append(Swim(identity, table, settings))
            if identity.node_id == plan["joiner"]:
                self.down.add(index)

    async def _follow(self, plan: dict[str, Any], ports: list[int]) -> None:
        done: set[str] = set()
        while time.monotonic() < plan["end"]:
            now = time.monotonic()
            for action in ("join", "meta", "kill"):
                if action not in done and now >= plan[action]:
                    done.add(action)
                    self._act(action, plan, ports)
            for index, node in enumerate(self.nodes):
                if index not in self.down:
                    self._send(index, node.tick(now))
            self._observe(plan, now)
            await asyncio.sleep(0.05)

    def _act(self, action: str, plan: dict[str, Any], ports: list[int]) -> None:
        for index, identity in enumerate(self.identities):
            node = self.nodes[index]
            if action == "join" and identity.node_id == plan["joiner"]:
                self.down.discard(index)
                node.broadcast_record(node.table.me)
                for record in plan["records"]:
                    from p2prc.peers.records import decode_record

                    decoded = decode_record(record)
                    if decoded.node_id != identity.node_id:
                        node.table.apply_record(decoded)
            if action == "join" and identity.node_id == plan["seed"]:
                from p2prc.peers.records import decode_record

                # What the joiner's push-pull over HTTP does in a real node.
                node.apply_record(decode_record(plan["records"][-1]), time.monotonic())
            if action == "meta" and identity.node_id == plan["changer"]:
                node.table.me = _record(identity, ports[index], node.table.me.version + 1, "b")
                node.broadcast_record(node.table.me)
            if action == "kill" and identity.node_id == plan["victim"]:
                self.down.add(index)

    def _observe(self, plan: dict[str, Any], now: float) -> None:
        for index, node in enumerate(self.nodes):
            if index in self.down:
                continue
            members = node.table.members
            joined = members.get(plan["joiner"])
            if joined is not None:
                self.seen["join"].setdefault(index, now)
            changed = members.get(plan["changer"])
            if changed is not None and changed.record.metadata == "b":
                self.seen["meta"].setdefault(index, now)
            victim = members.get(plan["victim"])
            if victim is not None and victim.state >= MemberState.DEAD:
                self.seen["dead"].setdefault(index, now)
            if int(now * 20) % 20 == 0:  # a full scan about once a second
                for member in members.values():
                    is_victim = member.record.node_id == plan["victim"]
                    if member.state >= MemberState.DEAD and not is_victim:
                        self.false_seen.add((index, member.record.node_id))

    def _send(self, index: int, outgoing: list[Any]) -> None:
        for item in outgoing:
            self.transports[index].sendto(item.data, item.address)

    def received(self, index: int, data: bytes) -> None:
        if index not in self.down:
            self._send(index, self.nodes[index].receive(data, time.monotonic()))


def _worker_main(count: int, pipe: Connection) -> None:
    asyncio.run(Worker(count, pipe).run())


def measure(n: int, processes: int, warmup: float = 3.0) -> dict[str, Any]:
    from p2prc.peers.records import decode_record

    sizes = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    sizes[-1] += 1  # one extra node: the joiner
    pipes, workers = [], []
    for size in sizes:
        parent, child = multiprocessing.Pipe()
        worker = multiprocessing.Process(target=_worker_main, args=(size, child), daemon=True)
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    records = [raw for pipe in pipes for raw in pipe.recv()]
    ids = [decode_record(raw).node_id for raw in records]
    plan: dict[str, Any] = {
        "records": records,
        "joiner": ids[-1],
        "seed": ids[0],
        "changer": ids[1],
        "victim": ids[2],
    }
    for pipe in pipes:
        pipe.send(plan)
    for pipe in pipes:
        pipe.recv()  # "ready": tables built
    start = time.monotonic() + 1.0
    times = {
        "start": start,
        "join": start + warmup,
        "meta": start + warmup + 5,
        "kill": start + warmup + 10,
        "end": start + warmup + 25,
    }
    plan.update(times)
    for pipe in pipes:
        pipe.send(times)
    results = [pipe.recv() for pipe in pipes]
    for worker in workers:
        worker.join(timeout=10)
    return _summarise(n, processes, plan, results)


def _summarise(
    n: int, processes: int, plan: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    def quantile(kind: str, fraction: float, exclude: int) -> float:
        times = sorted(t for r in results for t in r["seen"][kind].values())
        needed = math.ceil(fraction * (n - exclude))
        if len(times) < needed:
            return math.inf
        began = float(plan[kind if kind != "dead" else "kill"])
        return round(float(times[needed - 1]) - began, 2)

    duration = plan["end"] - plan["start"]
    return {
        "nodes": n,
        "processes": processes,
        "join_99_s": quantile("join", 0.99, 0),
        "metadata_99_s": quantile("meta", 0.99, 1),
        "dead_all_s": quantile("dead", 1.0, 1),
        "model_s": round(model_seconds(n), 2),
        "false_deaths": sum(r["false"] for r in results),
        "false_deaths_ever": sum(r["ever"] for r in results),
        "bytes_per_node_per_s": round(sum(r["sent"] for r in results) / (n + 1) / duration),
    }


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def soak(n: int, processes: int, seconds: float) -> dict[str, Any]:
    """Run n nodes for ``seconds`` with one core kept busy; count false deaths."""
    burner = multiprocessing.Process(target=_burn, args=(seconds + 30,), daemon=True)
    burner.start()
    try:
        row = measure(n, processes, warmup=seconds)
    finally:
        burner.terminate()
        burner.join()
    return {**row, "soak_s": seconds, "busy_core": True}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--soak", type=float, default=0, help="seconds of busy-core soak")
    options = parser.parse_args()
    if options.soak:
        result = soak(int(options.sizes.split(",")[-1]), options.processes, options.soak)
        print(result)
        write_result("gossip_soak", result)
        raise SystemExit(0)
    rows = [measure(int(n), options.processes) for n in options.sizes.split(",")]
    print(
        f"period {PERIOD * 1000:.0f} ms, fanout {FANOUT}, {options.processes} processes, real UDP"
    )
    print(
        f"{'nodes':>6} {'join99':>7} {'meta99':>7} {'model':>6} {'dead':>6} {'false':>6}"
        f" {'B/s/node':>9}"
    )
    for row in rows:
        print(f"{row['nodes']:>6} {row['join_99_s']!s:>7} {row['metadata_99_s']!s:>7} "
              f"{row['model_s']!s:>6} {row['dead_all_s']!s:>6} {row['false_deaths']!s:>6} "
              f"{row['bytes_per_node_per_s']!s:>9}")  # fmt: skip
    write_result("gossip_processes", {"period_s": PERIOD, "fanout": FANOUT, "rows": rows})
