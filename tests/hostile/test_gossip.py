"""Gossip that holds: lying claims, junk addresses, Sybil floods and third-party records.

Every test here failed on the code before the fix (the attacks of issue 12, holes 1, 2,
4 and 5, and the dual-stack bug).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.config import NodeConfig
from p2prc.errors import PeerProtocolError
from p2prc.identity import Identity
from p2prc.peers.exchange import Request, decode_answer
from p2prc.peers.gossip import Gossip
from p2prc.peers.records import decode_record
from p2prc.peers.swim import Outgoing, SwimSettings
from p2prc.peers.table import MemberState
from p2prc.state import State
from tests.conftest import FakeNode
from tests.hostile.attacker import (
    claim_update,
    exchange_payload,
    fake_record,
    record_update,
    signed_claim,
    signed_datagram,
)
from tests.unit.peers.sim import SimNetwork

_BOUND = 2**62


def _loops() -> list[Any]:
    import uvloop

    return [
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(uvloop.new_event_loop, id="uvloop"),
    ]


def _run(factory: Callable[[], asyncio.AbstractEventLoop], coro: Awaitable[None]) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)  # type: ignore[arg-type]


def _config(name: str, **gossip: object) -> NodeConfig:
    return NodeConfig.model_validate(
        {"name": name, "gossip": {"port": 0, "interval": 0.1, **gossip}}
    )


class _Gossips:
    """Real Gossip instances on loopback, each with its own state database."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self.running: list[Gossip] = []
        self.crashes: list[BaseException] = []
        self._states: list[State] = []

    async def start(
        self, name: str, addresses: list[str], identity: Identity | None = None, **gossip: object
    ) -> Gossip:
        state = State(self._tmp / f"{name}.db")
        self._states.append(state)
        node = Gossip(
            identity or Identity.generate(),
            _config(name, **gossip),
            state,
            api_port=1,
            addresses=addresses,
            on_crash=lambda task, exc: self.crashes.append(exc),
        )
        await node.start()
        self.running.append(node)
        return node

    async def close(self) -> None:
        for node in self.running:
            await node.aclose()
        for state in self._states:
            state.close()


def _introduce(*nodes: Gossip) -> None:
    """Each node learns every other's record (as from a root node's push-pull)."""
    now = asyncio.get_running_loop().time()
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.swim.apply_record(other.me, now)  # type: ignore[union-attr]


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# Hole 1: a dead claim at the codec's bound -------------------------------------------


def _states(network: SimNetwork, target: int) -> set[MemberState]:
    node_id = network.identities[target].node_id
    return {
        node.table.members[node_id].state
        for index, node in enumerate(network.nodes)
        if index != target
    }


def test_a_dead_claim_at_the_codec_bound_in_one_datagram_kills_nobody() -> None:
    network = SimNetwork(5)
    network.run(2)
    mallory = network.identities[4]  # a member: its datagrams are read
    victim = network.identities[1].node_id
    lies = [
        signed_claim(mallory, "dead", victim, _BOUND - 1),
        signed_claim(mallory, "dead", victim, int(time.time() * 1000) + 10**9),
        signed_claim(mallory, "dead", network.identities[0].node_id, _BOUND - 1),
    ]
    datagram = signed_datagram(mallory, "gossip", [claim_update(c) for c in lies])
    network.nodes[0].receive(datagram, network.now, ("10.0.0.1", 9004))
    network.run(5)
    assert _states(network, 1) == {MemberState.ALIVE}
    assert _states(network, 0) == {MemberState.ALIVE}
    for node in network.nodes:
        assert node.table.me.version < 2**50
        assert all(m.state_version < 2**50 for m in node.table.members.values())
    assert (
        network.nodes[0].table.rejected["future"] + network.nodes[0].table.rejected["claim_ahead"]
        >= 2
    )


async def test_a_dead_claim_at_the_codec_bound_in_one_exchange_kills_nobody(
    tmp_path: Path,
) -> None:
    gossips = _Gossips(tmp_path)
    try:
        alice = await gossips.start("alice", ["127.0.0.1"])
        bob = await gossips.start("bob", ["127.0.0.1"])
        _introduce(alice, bob)
        mallory = Identity.generate()
        claims = [
            signed_claim(mallory, "dead", bob.me.node_id, _BOUND - 1),
            signed_claim(mallory, "dead", alice.me.node_id, _BOUND - 1),
            signed_claim(mallory, "suspect", bob.me.node_id, bob.me.version + 10**9),
            signed_claim(mallory, "dead", bob.me.node_id, bob.me.version + 1),
        ]
        alice.exchange(exchange_payload([], claims), mallory.node_id)
        await asyncio.sleep(1.0)
        bob_at_alice = alice.table.get(bob.me.node_id)
        assert bob_at_alice is not None
        assert bob_at_alice.state is MemberState.ALIVE
        assert alice.me.version < 2**50
        assert bob.me.version < 2**50
        assert int(alice._state.get_meta("record_version") or 0) < 2**50
    finally:
        await gossips.close()


async def test_a_poisoned_saved_version_recovers_at_start(tmp_path: Path) -> None:
    with State(tmp_path / "victim.db") as state:
        state.set_meta("record_version", str(_BOUND))
    gossips = _Gossips(tmp_path)
    try:
        victim = await gossips.start("victim", ["127.0.0.1"])
        assert abs(victim.me.version - time.time() * 1000) < 60_000
        assert decode_record(victim.me.encode()) == victim.me
    finally:
        await gossips.close()


# Hole 2 and the dual-stack bug: addresses and families ---------------------------------


@pytest.mark.parametrize(
    "address", ["localhost", "169.254.169.254/latest#", "0.0.0.0", "fe80::1%eth0"]
)
def test_records_carry_only_ip_literals(address: str) -> None:
    record = fake_record(Identity.generate(), addresses=(address,))
    with pytest.raises(PeerProtocolError):
        decode_record(record.encode())


@pytest.mark.parametrize("factory", _loops())
def test_an_unsendable_datagram_is_skipped_not_fatal(factory: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        gossips = _Gossips(tmp_path)
        try:
            node = await gossips.start("solo", ["127.0.0.1"])
            junk = [("localhost", 9), ("not an address", 9), ("::1", 0), ("127.0.0.1", 0)]
            node._send([Outgoing(address, b"x") for address in junk])
            assert node.swim is not None
            assert sum(node.swim.stats.unsent.values()) >= 2
            await asyncio.sleep(0.3)
            assert not gossips.crashes
            assert len(node._tasks) == 2
        finally:
            await gossips.close()

    _run(factory, scenario())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("factory", _loops())
def test_a_dual_stack_node_reaches_ipv4_and_ipv6_members(factory: Any, tmp_path: Path) -> None:
    """A node with IPv4 and IPv6 addresses (as on its default host) probes an IPv4-only
    member over 127.0.0.1 and an IPv6 member over ::1; before the fix, its first send to
    the IPv4 member raised 'socket family mismatch' under uvloop and the tick loop died."""

    async def scenario() -> None:
        gossips = _Gossips(tmp_path)
        try:
            dual = await gossips.start("dual", ["127.0.0.1", "::1"])
            four = await gossips.start("four", ["127.0.0.1"])
            six = await gossips.start("six", ["::1"])
            _introduce(dual, four, six)
            swim = dual.swim
            assert swim is not None

            def probed() -> bool:
                members = [dual.table.get(n.me.node_id) for n in (four, six)]
                return all(m is not None and m.rtt_ms is not None for m in members)

            await _until(probed)
            assert swim.proven(four.me.node_id)
            assert swim.proven(six.me.node_id)
            assert four.swim is not None
            assert four.swim.proven(dual.me.node_id)
            assert not swim.stats.unsent
            assert not gossips.crashes
            assert len(dual._tasks) == 2
        finally:
            await gossips.close()

    _run(factory, scenario())


# Hole 4: thousands of self-signed records -------------------------------------------


@dataclass
class _GossipNode(FakeNode):
    real_gossip: Gossip | None = None

    @property
    def gossip(self) -> Gossip:
        assert self.real_gossip is not None
        return self.real_gossip


@pytest.fixture
async def exposed(tmp_path: Path, make_fake_node: Any) -> AsyncIterator[tuple[Gossip, Any]]:
    """A real Gossip behind the node API (in-process), and a function to reach it."""
    gossips = _Gossips(tmp_path)
    base = make_fake_node()
    victim = await gossips.start("victim", ["127.0.0.1"], identity=base.identity, max_members=400)
    node = _GossipNode(**{name: getattr(base, name) for name in FakeNode.__dataclass_fields__})
    node.real_gossip = victim
    transport = httpx.ASGITransport(app=create_app(node))

    def client(identity: Identity) -> AsyncClient:
        return AsyncClient(
            "http://node.test", home=tmp_path / "none", identity=identity, transport=transport
        )

    try:
        yield victim, client
    finally:
        await gossips.close()


async def test_a_sybil_flood_in_one_exchange_is_capped(exposed: tuple[Gossip, Any]) -> None:
    victim, client = exposed
    mallory = Identity.generate()
    sybils = [fake_record(Identity.generate(), port=9) for _ in range(3000)]
    async with client(mallory) as attacker:
        await attacker.exchange(exchange_payload(sybils, []))
        for start in range(0, 3000, 256):
            chunk = sybils[start : start + 256]
            await attacker.exchange(Request(records=[r.encode() for r in chunk]).encode())
        assert len(victim.table) <= 64  # one introducer: 64 new members a minute
        assert victim.table.rejected["introducer_rate"] > 0
        # A thousand other throwaway keys, each within its own share: the cap holds.
        for index in range(0, 3000, 60):
            async with client(Identity.generate()) as other:
                chunk = sybils[index : index + 60]
                await other.exchange(Request(records=[r.encode() for r in chunk]).encode())
        assert len(victim.table) <= 400
        assert victim.table.rejected["table_full"] > 0

        await asyncio.sleep(2.0)  # probes to the silent Sybils must not starve the node
        assert victim.swim is not None
        assert victim.swim.awareness <= 1

        answer = await attacker.exchange(Request(digest={}).encode())
        assert len(answer) < 400_000
        decoded = decode_answer(answer)
        assert len(decoded.records) <= 256
        assert decoded.more


async def test_get_peers_is_paginated(exposed: tuple[Gossip, Any]) -> None:
    victim, client = exposed
    now = asyncio.get_running_loop().time()
    for _ in range(150):
        victim.swim.apply_record(fake_record(Identity.generate()), now)  # type: ignore[union-attr]
    async with client(Identity.generate()) as reader:
        first = await reader._request("GET", "/peers?limit=100")
        page = first.json()
        assert len(page) == 100
        assert page[0]["me"]
        second = (
            await reader._request("GET", f"/peers?limit=100&after={page[-1]['node_id']}")
        ).json()
        assert len(second) == 51
        assert not {v["node_id"] for v in page} & {v["node_id"] for v in second}
        default = (await reader._request("GET", "/peers")).json()
        assert len(default) == 151
        everyone = await reader.peers()
        assert len(everyone) == 151
        assert everyone[0].me
        too_many = await reader._http.get("/peers?limit=5000")
        assert too_many.status_code == 422


async def test_a_push_pull_moves_only_what_is_missing(tmp_path: Path) -> None:
    """Two nodes with the same 300 members: their exchange carries digests, no records."""
    gossips = _Gossips(tmp_path)
    try:
        alice = await gossips.start("alice", ["127.0.0.1"])
        bob = await gossips.start("bob", ["127.0.0.1"])
        _introduce(alice, bob)
        now = asyncio.get_running_loop().time()
        for _ in range(300):
            record = fake_record(Identity.generate())
            alice.swim.apply_record(record, now)  # type: ignore[union-attr]
            bob.swim.apply_record(record, now)  # type: ignore[union-attr]
        answer = decode_answer(bob.exchange(Request(digest=_digest(alice)).encode(), "x" * 32))
        assert answer.records == []
        assert answer.want == []
        assert not answer.more
        # Alice learns one more member: Bob's answer asks for exactly that one.
        extra = fake_record(Identity.generate())
        alice.swim.apply_record(extra, now)  # type: ignore[union-attr]
        answer = decode_answer(bob.exchange(Request(digest=_digest(alice)).encode(), "x" * 32))
        assert answer.want == [extra.node_id]
        assert answer.records == []
    finally:
        await gossips.close()


def _digest(node: Gossip) -> dict[str, tuple[int, int, int]]:
    from p2prc.peers.exchange import digest

    return digest(node.table)


# Hole 5: records that point at a third party --------------------------------------------


def test_records_pointing_at_a_third_party_draw_only_a_few_bare_pings() -> None:
    """20 self-signed records naming 10.0.0.9:18198: the honest nodes send it at most
    three bare pings per record and no gossip, ping-req or piggybacked updates (the old
    code sent it about a hundred datagrams in 30 s, each up to 1400 bytes)."""
    network = SimNetwork(4, settings=SwimSettings())
    network.run(2)
    sybils = [
        fake_record(Identity.generate(), addresses=("10.0.0.9",), port=18198) for _ in range(20)
    ]
    mallory = network.identities[3]
    for sybil in sybils:
        datagram = signed_datagram(mallory, "gossip", [record_update(sybil)])
        network.nodes[0].receive(datagram, network.now, ("10.0.0.1", 9003))
    hits: list[tuple[int, bytes]] = []
    original = network.route

    def route(sender: int, address: tuple[str, int]) -> tuple[int, tuple[str, int]] | None:
        if address == ("10.0.0.9", 18198):
            hits.append((sender, b""))
        return original(sender, address)

    network.route = route  # type: ignore[method-assign]
    kinds: list[str] = []
    for _node_index, node in enumerate(network.nodes):
        send = node._send

        def spy(target: str, message: list[Any], address: Any = None, *, _send: Any = send) -> Any:
            out = _send(target, message, address)
            for item in out:
                if item.address == ("10.0.0.9", 18198):
                    kinds.append(message[0])
                    body = msgpack.unpackb(item.data[4:-64], raw=False)
                    assert body[4] == [], "updates piggybacked to an unproven address"
            return out

        node._send = spy  # type: ignore[method-assign]
    network.run(30)
    assert set(kinds) <= {"ping"}
    assert len(hits) <= 3 * len(sybils) * len(network.nodes)
    per_node = [sum(1 for sender, _ in hits if sender == i) for i in range(4)]
    assert max(per_node) <= 3 * len(sybils)
    # And the honest members are still fine.
    for index in range(4):
        assert _states(network, index) == {MemberState.ALIVE}


@pytest.mark.parametrize("factory", _loops())
def test_a_real_third_party_listener_draws_few_datagrams(factory: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.bind(("127.0.0.9", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        gossips = _Gossips(tmp_path)
        try:
            alice = await gossips.start("alice", ["127.0.0.1"])
            bob = await gossips.start("bob", ["127.0.0.1"])
            _introduce(alice, bob)
            sybils = [
                fake_record(Identity.generate(), addresses=("127.0.0.9",), port=port)
                for _ in range(20)
            ]
            alice.exchange(exchange_payload(sybils, []), Identity.generate().node_id)
            await asyncio.sleep(4.0)
            received = 0
            while True:
                try:
                    data = listener.recv(2048)
                except BlockingIOError:
                    break
                received += 1
                assert len(data) < 400  # bare pings, nothing piggybacked
            assert received <= 3 * len(sybils) * 2  # two nodes, three bare pings per record
            assert alice.table.get(bob.me.node_id).state is MemberState.ALIVE  # type: ignore[union-attr]
        finally:
            listener.close()
            await gossips.close()

    _run(factory, scenario())


def test_a_datagram_flood_from_one_source_is_cut_before_any_signature_check() -> None:
    network = SimNetwork(3)
    network.run(1)
    mallory = network.identities[2]
    lying = signed_datagram(mallory, "ping", [record_update(fake_record(Identity.generate()))])
    node = network.nodes[0]
    for index in range(2000):
        node.receive(lying, network.now + index / 2000, ("10.0.0.1", 9002))
    assert node.stats.dropped["over the per-source rate"] > 1800
    network.run(3)
    assert _states(network, 1) == {MemberState.ALIVE}
