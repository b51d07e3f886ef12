"""The SWIM state machine on a simulated network: detection, refutation, dissemination."""

from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.identity import Identity
from p2prc.peers.records import Claim
from p2prc.peers.swim import SwimSettings
from p2prc.peers.table import STORED, MemberState, PeerTable
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


class _NatNetwork(SimNetwork):
    """Nodes in ``behind_nat`` sit behind one NAT (203.0.113.1) that, like Linux conntrack,
    lets a datagram in only from a peer the inside node sent to in the last 30 s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.holes: dict[tuple[int, int], float] = {}

    def route(self, sender: int, address: tuple[str, int]) -> tuple[int, tuple[str, int]] | None:
        if address[0] == "203.0.113.1":
            inside = address[1] - 40000
            opened = self.holes.get((inside, sender))
            if opened is None or self.now - opened > 30:
                return None
            return inside, ("10.0.0.1", 9000 + sender)
        if address[0] != "10.0.0.1":
            return None  # the private address is unreachable from outside
        routed = super().route(sender, address)
        if routed is not None and sender in self.behind_nat:
            self.holes[(sender, routed[0])] = self.now
            return routed[0], ("203.0.113.1", 40000 + sender)
        return routed


def test_a_node_behind_nat_stays_alive_and_is_declared_dead_when_it_stops() -> None:
    network = _NatNetwork(8, behind_nat=frozenset({4}))
    network.run(90)  # three NAT mapping lifetimes: keepalives must hold them open
    assert set(_states(network, 4)) == {MemberState.ALIVE}
    for target in range(8):
        assert set(_states(network, target)) == {MemberState.ALIVE}
    network.down.add(4)
    network.run(8)
    assert set(_states(network, 4)) == {MemberState.DEAD}


def test_without_the_nat_rule_the_node_would_be_lost() -> None:
    """The test network really blocks: unknown senders' datagrams do not get in."""
    network = _NatNetwork(4, behind_nat=frozenset({1}))
    network.run(1)
    assert network.route(2, ("192.168.1.2", 9001)) is None
    assert network.route(2, ("203.0.113.1", 40001)) is not None  # node 1 talked to node 2
    network.holes.clear()
    assert network.route(2, ("203.0.113.1", 40001)) is None


def test_keepalives_hold_the_nat_open_in_a_large_network() -> None:
    """40 nodes at 2 s periods: round-robin probing alone leaves the NAT's mappings idle
    for over 30 s, so without keepalives the node is suspected and has to refute."""
    refutations = {}
    for keepalive in (10.0, 1e9):
        settings = SwimSettings(period=2.0, probe_timeout=0.5, keepalive=keepalive)
        network = _NatNetwork(40, behind_nat=frozenset({4}), settings=settings)
        version = network.nodes[4].table.me.version
        network.run(240, step=0.25)
        states = set(_states(network, 4))
        # Without keepalives it is suspected again and again and refutes each time (it
        # may be in one of those suspicions at the end); with them it is never doubted.
        assert MemberState.DEAD not in states
        assert states == {MemberState.ALIVE} or keepalive > 10
        refutations[keepalive] = network.nodes[4].table.me.version - version
    assert refutations[10.0] == 0
    assert refutations[1e9] > 0


def test_a_push_pull_answer_is_one_bounded_page() -> None:
    from p2prc.peers.exchange import PAGE, digest, plan, pushed

    network = SimNetwork(2)
    table = network.nodes[0].table
    for index in range(300):
        table.apply_record(make_record(Identity.generate(), index))
    first = plan(table, {})
    assert len(first.records) == PAGE
    assert first.more
    assert plan(table, digest(table)).records == []
    other = network.nodes[1].table
    wanted = plan(other, digest(table)).want
    assert len(wanted) == PAGE  # the other node lacks 300 records: it asks for a page
    assert len(pushed(table, wanted).records) == PAGE
    assert plan(table, digest(other)).want == []  # it knows nothing we lack


def test_a_record_advertises_at_most_eight_usable_addresses() -> None:
    from p2prc.peers.gossip import _advertisable

    addresses = [f"10.0.0.{i}" for i in range(1, 12)] + ["fe80::1%eth0", "localhost"]
    assert _advertisable(["localhost", "fd00::2", *addresses]) == (
        "fd00::2",
        *addresses[:7],
    )


def test_each_member_records_when_it_was_last_heard_from() -> None:
    network = SimNetwork(4)
    network.run(3)
    down, went_down = network.identities[3].node_id, network.now
    network.down.add(3)
    network.run(1)
    for node in network.nodes[:3]:
        for node_id, member in node.table.members.items():
            assert member.heard is not None
            if node_id == down:
                assert went_down - 1.0 < member.heard <= went_down
            else:  # datagrams of its own kept coming
                assert member.heard > went_down


def test_a_newer_record_counts_as_heard_and_a_stored_one_does_not() -> None:
    me, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    table = PeerTable(make_record(me, 0))
    table.apply_record(make_record(bob, 1), introducer=STORED)
    assert table.members[bob.node_id].heard is None
    table.apply_record(make_record(bob, 1, version=2), now=7.5, introducer=carol.node_id)
    assert table.members[bob.node_id].heard == 7.5
    table.apply_record(make_record(bob, 1, version=2), now=9.0)  # the same record again
    assert table.members[bob.node_id].heard == 7.5
    table.apply_record(make_record(carol, 2), now=3.0, introducer=bob.node_id)
    assert table.members[carol.node_id].heard == 3.0


def test_suspicions_signed_by_made_up_keys_do_not_shorten_the_timeout() -> None:
    """Lifeguard's confirmations count only us and members that proved their address."""
    network = SimNetwork(6)
    network.run(2)
    node, victim = network.nodes[0], network.identities[2].node_id
    member = node.table.members[victim]
    version = member.record.version
    ours = Claim("suspect", victim, version, "").signed(network.identities[0])
    node.apply_claim(ours, network.now)
    assert member.state is MemberState.SUSPECT
    alone = node._confirmations(member)
    for _ in range(5):  # a stranger's keys: each a valid signature, none a member
        node.apply_claim(Claim("suspect", victim, version, "").signed(Identity.generate()), 0)
    assert len(member.suspecters) == 6
    assert node._confirmations(member) == alone == 0
    for index in (1, 3):  # two members that proved their address agree
        claim = Claim("suspect", victim, version, "").signed(network.identities[index])
        node.apply_claim(claim, network.now)
    assert node._confirmations(member) == 2
    assert node._suspicion_timeout(2) < node._suspicion_timeout(0)
