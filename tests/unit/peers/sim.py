"""An in-memory network of SWIM nodes on a simulated clock (no sockets)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from p2prc.identity import Identity
from p2prc.peers.records import PeerRecord
from p2prc.peers.swim import Swim, SwimSettings
from p2prc.peers.table import PeerTable


def make_record(identity: Identity, index: int, version: int = 1, **fields: object) -> PeerRecord:
    values: dict[str, object] = {
        "addresses": ("10.0.0.1",),
        "api_port": 8000 + index,
        "gossip_port": 9000 + index,
        **fields,
    }
    record = PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=f"n{index}",
        version=version,
        **values,  # type: ignore[arg-type]
    )
    return record.signed(identity)


@dataclass
class SimNetwork:
    """Nodes addressed by gossip port; ``down`` nodes neither send nor receive."""

    size: int
    seed: int = 1
    settings: SwimSettings = field(default_factory=SwimSettings)
    nodes: list[Swim] = field(default_factory=list)
    identities: list[Identity] = field(default_factory=list)
    down: set[int] = field(default_factory=set)
    now: float = 0.0
    # Nodes behind NAT: they advertise a private address and say so in their records.
    behind_nat: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.identities = [Identity.generate() for _ in range(self.size)]
        records = [
            make_record(identity, i, addresses=("192.168.1.2",), behind_nat=True)
            if i in self.behind_nat
            else make_record(identity, i)
            for i, identity in enumerate(self.identities)
        ]
        for i, identity in enumerate(self.identities):
            table = PeerTable(records[i])
            for j, record in enumerate(records):
                if j != i:
                    table.apply_record(record)
            self.nodes.append(Swim(identity, table, self.settings, random.Random(rng.random())))

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for index, node in enumerate(self.nodes):
                if index not in self.down:
                    self.deliver(node.tick(self.now), index)

    def route(self, sender: int, address: tuple[str, int]) -> tuple[int, tuple[str, int]] | None:
        """Which node a datagram to ``address`` reaches, and the source it sees; None: lost."""
        target = address[1] - 9000
        if address[0] != "10.0.0.1" or not 0 <= target < self.size:
            return None
        return target, ("10.0.0.1", 9000 + sender)

    def deliver(self, outgoing: list, sender: int) -> None:  # type: ignore[type-arg]
        queue = [(sender, item) for item in outgoing]
        while queue:
            source, item = queue.pop(0)
            routed = self.route(source, item.address)
            if routed is None or routed[0] in self.down:
                continue
            target, seen_from = routed
            replies = self.nodes[target].receive(item.data, self.now, seen_from)
            queue += [(target, reply) for reply in replies]
