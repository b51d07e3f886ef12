"""A change is pushed at once (not at the next gossip round), within bounds a flood cannot
stretch; a member just learned gets its bare ping at once; a join spreads in round trips."""

from collections import Counter

import msgpack

from p2prc.identity import Identity
from p2prc.peers.broadcasts import Broadcasts
from p2prc.peers.records import PeerRecord
from p2prc.peers.swim import Outgoing
from p2prc.peers.table import MemberState
from p2prc.peers.wire import seal
from tests.unit.peers.sim import SimNetwork, make_record


def _kinds(outgoing: list[Outgoing]) -> Counter[str]:
    return Counter(msgpack.unpackb(item.data[4:-64], raw=False)[1] for item in outgoing)


def _update(record: PeerRecord) -> list[object]:
    return [0, *record.body(), record.signature]


def _metadata(network: SimNetwork, index: int) -> list[str]:
    node_id = network.identities[index].node_id
    return [
        n.table.members[node_id].record.metadata for i, n in enumerate(network.nodes) if i != index
    ]


def test_a_metadata_change_reaches_most_nodes_at_once_and_all_by_the_next_round() -> None:
    network = SimNetwork(20)
    network.run(8)  # every member proven
    node = network.nodes[5]
    record = make_record(network.identities[5], 5, version=node.table.me.version + 1, metadata="x")
    node.table.me = record
    node.broadcast_record(record)
    network.deliver(node.push(network.now), 5)  # what Gossip does after a change
    # Each node pushes once to 3 others: about 6 % are missed (s = exp(-3 (1 - s))).
    assert _metadata(network, 5).count("x") >= 15
    network.run(0.25)
    assert _metadata(network, 5) == ["x"] * 19


def test_without_the_push_the_change_waits_for_gossip_rounds() -> None:
    network = SimNetwork(20)
    network.run(8)
    node = network.nodes[5]
    record = make_record(network.identities[5], 5, version=node.table.me.version + 1, metadata="x")
    node.table.me = record
    node.broadcast_record(record)
    network.nodes[5]._queue.mark_pushed()  # as if the push had already gone
    network.deliver(node.push(network.now), 5)
    assert _metadata(network, 5).count("x") < 19


def test_a_flood_of_new_versions_draws_at_most_one_push_per_gossip_interval() -> None:
    network = SimNetwork(6)
    network.run(5)
    node, mallory = network.nodes[0], network.identities[3]
    version = network.nodes[3].table.me.version
    pushed: Counter[str] = Counter()
    start = network.now
    for step in range(1000):  # 1,000 signed new records of its own in one second
        now = start + step / 1000
        version += 1
        record = make_record(mallory, 3, version=version, metadata=str(step))
        datagram = seal(mallory, [mallory.node_id, "gossip", 0, "", [_update(record)]])
        pushed += _kinds(node.receive(datagram, now, ("10.0.0.1", 9003)))
    # One push of `fanout` datagrams per gossip interval (200 ms) at most: the regular
    # rounds (at ticks, not here) and the pushes together at most double gossip traffic.
    assert 3 <= pushed["gossip"] <= 5 * 3
    assert node.table.members[mallory.node_id].state is MemberState.ALIVE


def test_a_push_carries_each_update_once_and_does_not_spend_its_retransmits() -> None:
    queue = Broadcasts()
    queue.add("r:a", [0, "a"], 0)
    assert queue.fresh
    assert queue.take(1000, 2, fresh=True) == [[0, "a"]]
    assert queue.take(1000, 2, fresh=True) == [[0, "a"]]  # every datagram of one push
    queue.mark_pushed()
    assert not queue.fresh
    assert queue.take(1000, 2, fresh=True) == []
    assert queue.take(1000, 2) == [[0, "a"]]
    assert queue.take(1000, 2) == [[0, "a"]]
    assert queue.take(1000, 2) == []  # the limit counts only regular sends
    queue.add("r:a", [0, "a2"], 0)  # a newer version is pushed again
    assert queue.take(1000, 2, fresh=True) == [[0, "a2"]]


def test_members_just_learned_get_a_bare_ping_at_once_at_most_fanout() -> None:
    network = SimNetwork(4)
    network.run(3)
    sybils = [make_record(Identity.generate(), 50 + i, addresses=("10.0.0.9",)) for i in range(20)]
    mallory = network.identities[3]
    node, out = network.nodes[0], []
    for start in range(0, 20, 4):  # four records fit in one datagram
        updates = [_update(r) for r in sybils[start : start + 4]]
        datagram = seal(mallory, [mallory.node_id, "gossip", 0, "", updates])
        out += node.receive(datagram, network.now, ("10.0.0.1", 9003))
    assert sum(1 for s in sybils if s.node_id in node.table.members) == 20
    to_sybils = [item for item in out if item.address[0] == "10.0.0.9"]
    assert 1 <= len(to_sybils) <= 3
    assert _kinds(to_sybils) == {"ping": len(to_sybils)}
    assert all(msgpack.unpackb(i.data[4:-64], raw=False)[4] == [] for i in to_sybils)


def test_a_joining_node_is_known_everywhere_within_a_few_round_trips() -> None:
    network = SimNetwork(11)
    joiner = network.identities[10]
    for index in range(10):
        del network.nodes[index].table.members[joiner.node_id]
    network.down.add(10)
    network.run(8)
    network.down.discard(10)
    seed = network.nodes[0]
    # What the joiner's push-pull over HTTP does: the seed merges its record, then pushes.
    seed.apply_record(network.nodes[10].table.me, network.now, joiner.node_id)
    network.deliver(seed.push(network.now), 0)
    assert sum(joiner.node_id in n.table.members for n in network.nodes[:10]) >= 7
    network.run(0.25)
    assert all(joiner.node_id in n.table.members for n in network.nodes[:10])
    network.run(1)
    assert all(n.proven(joiner.node_id) for n in network.nodes[:10])


def test_gossip_rounds_are_not_stretched_by_local_health() -> None:
    network = SimNetwork(4)
    network.run(3)
    node = network.nodes[0]
    record = network.nodes[0].table.me
    gossip = 0
    start = network.now
    while network.now < start + 1.0:
        network.now += 0.05
        node.awareness = 8  # a starved node: its probe period is 9 x 200 ms
        node.broadcast_record(record)  # always something to gossip
        node._queue.mark_pushed()  # regular rounds only
        gossip += _kinds(node.tick(network.now))["gossip"]
    assert gossip >= 4 * 3  # a round of fanout 3 every 200 ms
