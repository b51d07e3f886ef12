"""Gossip convergence, failure detection and traffic, beside the epidemic model's prediction.

N simulated nodes run the real SWIM engine (``p2prc.peers.swim``), 200 ms protocol
period, fanout 3. For N <= ``--udp-max`` (default 100) each node has its own UDP socket
on 127.0.0.1 and runs in real time in this process. Beyond that, every datagram being
Ed25519-signed and verified costs more CPU than two cores have in real time, so the same
engine runs on a virtual clock with in-memory delivery; the table says which.

Measured per size: time until 99 % of nodes know a new node's record (join) and a
metadata change, time until every node declares a killed node dead, and gossip bytes
sent per node per second in steady state. The model column is the push-gossip estimate
``T * (log(N) / log(k + 1) + ln(N) / k)`` rounds of period T with fanout k.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import random
import time
from collections.abc import Callable

from _common import GOSSIP_FANOUT, GOSSIP_PERIOD, gossip_model_seconds, sim_record, write_result

from p2prc.identity import Identity
from p2prc.peers.records import PeerRecord
from p2prc.peers.swim import Outgoing, Swim, SwimSettings
from p2prc.peers.table import MemberState, PeerTable

PERIOD, FANOUT = GOSSIP_PERIOD, GOSSIP_FANOUT
model_seconds = gossip_model_seconds


class Cluster:
    """N Swim engines; ``deliver`` moves datagrams (UDP or in memory)."""

    def __init__(self, n: int, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.identities = [Identity.generate() for _ in range(n + 1)]
        self.ports = list(range(20000, 20000 + n + 1))
        self.records = [self._record(i, 1) for i in range(n + 1)]
        settings = SwimSettings(period=PERIOD, probe_timeout=PERIOD / 2, fanout=FANOUT)
        self.nodes: list[Swim] = []
        for i in range(n + 1):
            table = PeerTable(self.records[i])
            for j in range(n):  # the last identity is the joiner, unknown to everyone
                if j != i:
                    table.apply_record(self.records[j])
            self.nodes.append(
                Swim(self.identities[i], table, settings, random.Random(rng.random()))
            )
        self.down: set[int] = {n}

    def _record(self, i: int, version: int, metadata: str = "") -> PeerRecord:
        return sim_record(self.identities[i], f"sim{i}", self.ports[i], version, metadata)

    def index_of(self, port: int) -> int:
        return port - self.ports[0]

    def fraction(self, test: Callable[[Swim], bool], exclude: int) -> float:
        live = [n for i, n in enumerate(self.nodes) if i not in self.down and i != exclude]
        return sum(1 for n in live if test(n)) / max(len(live), 1)

    def bump_metadata(self, i: int, text: str) -> PeerRecord:
        node = self.nodes[i]
        record = self._record(i, node.table.me.version + 1, text)
        node.table.me = record
        node.broadcast_record(record)
        return record

    def join(self, seed_index: int) -> PeerRecord:
        joiner = len(self.nodes) - 1
        self.down.discard(joiner)
        table = self.nodes[joiner].table
        for j in range(len(self.nodes) - 1):
            table.apply_record(self.records[j])
        record = self.records[joiner]
        self.nodes[seed_index].apply_record(record, 0.0)
        return record


class VirtualNet:
    """In-memory delivery on a virtual clock."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.now = cluster, 0.0

    def run_until(self, done: Callable[[], bool], limit: float) -> float:
        start = self.now
        while self.now - start < limit:
            self.now += 0.05
            for i, node in enumerate(self.cluster.nodes):
                if i not in self.cluster.down:
                    self._deliver(node.tick(self.now))
            if done():
                return self.now - start
        return math.inf

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        queue = list(outgoing)
        while queue:
            item = queue.pop()
            target = self.cluster.index_of(item.address[1])
            if target not in self.cluster.down:
                queue += self.cluster.nodes[target].receive(item.data, self.now)


class UdpNet:
    """One real UDP socket per node on 127.0.0.1, real time, one event loop."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.transports: list[asyncio.DatagramTransport] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(len(self.cluster.nodes)):
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Protocol, self, i), local_addr=("127.0.0.1", 0)
            )
            self.transports.append(transport)
            port = transport.get_extra_info("sockname")[1]
            self.cluster.ports[i] = port
        # Re-sign every record with its real port; tables restart from them.
        c = self.cluster
        c.records = [c._record(i, 2) for i in range(len(c.nodes))]
        for i, node in enumerate(c.nodes):
            node.table = PeerTable(c.records[i])
            for j in range(len(c.nodes) - 1):
                if j != i:
                    node.table.apply_record(c.records[j])
        self.port_index = {port: i for i, port in enumerate(c.ports)}

    def send(self, i: int, outgoing: list[Outgoing]) -> None:
        if i in self.cluster.down:
            return
        for item in outgoing:
            self.transports[i].sendto(item.data, item.address)

    def received(self, i: int, data: bytes) -> None:
        if i not in self.cluster.down:
            self.send(i, self.cluster.nodes[i].receive(data, time.monotonic()))

    async def run_until(self, done: Callable[[], bool], limit: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < limit:
            now = time.monotonic()
            for i, node in enumerate(self.cluster.nodes):
                if i not in self.cluster.down:
                    self.send(i, node.tick(now))
            if done():
                return time.monotonic() - start
            await asyncio.sleep(0.05)
        return math.inf

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, net: UdpNet, index: int) -> None:
        self.net, self.index = net, index

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net.received(self.index, data)


async def scenario(n: int, udp: bool) -> dict[str, object]:
    cluster = Cluster(n)
    net: UdpNet | VirtualNet = VirtualNet(cluster)
    if udp:
        net = UdpNet(cluster)
        await net.open()

    async def run(done: Callable[[], bool], limit: float) -> float:
        if isinstance(net, UdpNet):
            return await net.run_until(done, limit)
        return net.run_until(done, limit)

    await run(lambda: False, 2.0)  # settle: probes, RTTs
    sent_before = sum(node.stats.bytes_sent for node in cluster.nodes[:n])
    traffic_window = 3.0
    await run(lambda: False, traffic_window)
    sent = sum(node.stats.bytes_sent for node in cluster.nodes[:n]) - sent_before
    joined = cluster.join(seed_index=0)
    joiner = len(cluster.nodes) - 1

    def knows_joiner(s: Swim) -> bool:
        return joined.node_id in s.table.members

    join_s = await run(lambda: cluster.fraction(knows_joiner, joiner) >= 0.99, 15)
    changed = cluster.bump_metadata(1, "gpu pool b")
    meta_s = await run(
        lambda: (
            cluster.fraction(
                lambda s: getattr(s.table.members.get(changed.node_id), "record", None) == changed,
                1,
            )
            >= 0.99
        ),
        15,
    )
    victim = 2
    victim_id = cluster.identities[victim].node_id
    cluster.down.add(victim)

    def all_dead() -> bool:
        def dead(s: Swim) -> bool:
            member = s.table.members.get(victim_id)
            return member is not None and member.state >= MemberState.DEAD

        return cluster.fraction(dead, victim) >= 1.0

    dead_s = await run(all_dead, 20)
    false_deaths = sum(
        1
        for i, s in enumerate(cluster.nodes)
        if i not in cluster.down
        for m in s.table.members.values()
        if m.state >= MemberState.DEAD and m.record.node_id != victim_id
    )
    if isinstance(net, UdpNet):
        net.close()
    return {
        "nodes": n,
        "transport": "udp loopback, real time" if udp else "virtual clock, in memory",
        "join_99_s": round(join_s, 2),
        "metadata_99_s": round(meta_s, 2),
        "model_s": round(model_seconds(n), 2),
        "dead_everywhere_s": round(dead_s, 2),
        "false_deaths": false_deaths,
        "bytes_per_node_per_s": round(sent / n / traffic_window),
    }


async def main(sizes: list[int], udp_max: int) -> list[dict[str, object]]:
    return [await scenario(n, udp=n <= udp_max) for n in sizes]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--udp-max", type=int, default=100)
    options = parser.parse_args()
    rows = asyncio.run(main([int(s) for s in options.sizes.split(",")], options.udp_max))
    print(f"period {PERIOD * 1000:.0f} ms, fanout {FANOUT}; targets: 99 % within 1 / 1.5 / 3 s")
    print(f"{'nodes':>6} {'transport':26} {'join':>6} {'meta':>6} {'model':>6} {'dead':>6} "
          f"{'false':>5} {'B/s/node':>9}")  # fmt: skip
    for row in rows:
        print(f"{row['nodes']:>6} {row['transport']!s:26} {row['join_99_s']!s:>6} "
              f"{row['metadata_99_s']!s:>6} {row['model_s']!s:>6} {row['dead_everywhere_s']!s:>6} "
              f"{row['false_deaths']!s:>5} {row['bytes_per_node_per_s']!s:>9}")  # fmt: skip
    write_result("gossip_convergence", {"period_s": PERIOD, "fanout": FANOUT, "rows": rows})
