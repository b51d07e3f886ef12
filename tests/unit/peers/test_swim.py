"""The SWIM state machine on a simulated network: detection, refutation, dissemination."""

from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.peers.records import Claim
from p2prc.peers.table import MemberState
from tests.unit.peers.sim import SimNetwork, make_record


def _states(network: SimNetwork, target: int) -> list[MemberState]:
    node_id = network.identities[target].node_id
    return [
        node.table.members[node_id].state
        for index, node in enumerate(network.nodes)
        if index != target and index not in network.down
    ]


def test_no_false_deaths_when_all_are_up() -> None:
    network = SimNetwork(8)
    network.run(20)
    for target in range(8):
        assert set(_states(network, target)) == {MemberState.ALIVE}


def test_a_silent_node_is_declared_dead_everywhere() -> None:
    network = SimNetwork(10)
    network.run(2)
    network.down.add(3)
    network.run(6)
    assert set(_states(network, 3)) == {MemberState.DEAD}


def test_a_suspected_node_refutes() -> None:
    network = SimNetwork(6)
    network.run(1)
    victim = network.identities[2].node_id
    version = network.nodes[2].table.me.version
    claim = Claim("suspect", victim, version, "").signed(network.identities[0])
    network.nodes[0].apply_claim(claim, network.now)
    network.run(4)
    assert set(_states(network, 2)) == {MemberState.ALIVE}
    assert network.nodes[1].table.members[victim].record.version > version


def test_metadata_spreads_to_everyone() -> None:
    network = SimNetwork(20)
    network.run(1)
    node = network.nodes[5]
    record = make_record(network.identities[5], 5, version=node.table.me.version + 1, metadata="x")
    node.table.me = record
    node.broadcast_record(record)
    network.run(2)
    seen = [
        n.table.members[record.node_id].record.metadata
        for i, n in enumerate(network.nodes)
        if i != 5
    ]
    assert seen == ["x"] * 19


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_garbage_datagrams_are_dropped(data: bytes) -> None:
    network = SimNetwork(2)
    assert network.nodes[0].receive(data, 0.0) == []


def test_forged_datagram_is_dropped() -> None:
    network = SimNetwork(3)
    network.run(0.3)
    outgoing = network.nodes[1].tick(10.0) or network.nodes[1].tick(10.3)
    assert outgoing
    data = outgoing[0].data
    forged = data[:-64] + bytes(64)
    target = network.nodes[outgoing[0].address[1] - 9000]
    assert target.receive(forged, 10.4) == []
    assert target.stats.dropped["forged datagram"] == 1
