"""AttachService without a node: signing and announcing, the merge rules, the gateway-side
checks, allow lists, and pulls of other gateways' sets (a real HTTP answer through a mock
transport), each bound and bad answer refused with nothing stored."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from p2prc.attach import probe
from p2prc.attach.models import AttachedGateway, AttachRequest
from p2prc.attach.records import AttachedRecord
from p2prc.attach.service import ATTACHED_KEY, AttachService, merge
from p2prc.attach.store import AttachedRow, AttachStore
from p2prc.config import NodeConfig, Timeouts
from p2prc.errors import (
    AttachedNotFound,
    InvalidRequest,
    NameTaken,
    PeerNotFound,
)
from p2prc.identity import Identity
from p2prc.peers.link import PeerLink
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member, MemberState, PeerTable
from p2prc.state import State

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICseTfn0fT/bt2pdLk2DoidFbZcTCwfsvb7TXblxDSTw"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGpUl3Y6kYq3Cj0W5OPhgBwSa8sWJtqK4HNJyH3bSlxM"


def _peer(identity: Identity, name: str, **custom: str) -> PeerRecord:
    record = PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=name,
        version=int(time.time() * 1000),
        addresses=("127.0.0.1",),
        api_port=9,
        custom=dict(custom),
    )
    return record.signed(identity)


def _record(identity: Identity, name: str = "morello", **fields: object) -> AttachedRecord:
    base: dict[str, object] = {
        "name": name,
        "gateway": identity.node_id,
        "gateway_key": identity.public_key,
        "version": int(time.time() * 1000) - 1000,
        "host_key": KEY_A,
        "endpoint": "127.0.0.1:4000",
    }
    return AttachedRecord(**{**base, **fields}).signed(identity)  # type: ignore[arg-type]


class Net:
    """A service, its store, a peer table and what one remote gateway answers."""

    def __init__(self, tmp_path: Path) -> None:
        self.me = Identity.generate()
        self.state = State(tmp_path / "state.db")
        self.store = AttachStore(self.state.connection)
        self.table = PeerTable(_peer(self.me, "gw"))
        self.published: list[str | None] = []
        self.endpoint = "127.0.0.1:5000"
        self.answers: dict[str, Callable[[], httpx.Response]] = {}
        self.calls = 0
        transport = httpx.MockTransport(self._answer)
        link = PeerLink(self.me, lambda: self.table, Timeouts(), transport=transport)
        self.service = AttachService(
            self.me,
            NodeConfig(name="gw"),
            self.store,
            link=link,
            table=lambda: self.table,
            publish=lambda key, value: self.published.append(value),
            endpoint=lambda: self.endpoint,
        )

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        assert request.url.path == "/attached/records"
        port = str(request.url.port)
        return self.answers[port]()

    def member(self, identity: Identity, name: str, port: int, **custom: str) -> Member:
        record = replace(_peer(identity, name, **custom), api_port=port).signed(identity)
        member = Member(record)
        self.table.members[identity.node_id] = member
        return member

    def serve(self, port: int, records: list[bytes]) -> None:
        body = {"records": [base64.b64encode(r).decode() for r in records]}
        self.answers[str(port)] = lambda: httpx.Response(200, json=body)

    def row(self, name: str = "morello", **fields: object) -> None:
        base: dict[str, object] = {
            "name": name,
            "address": "192.168.0.10",
            "ssh_port": 22,
            "host_key": KEY_A,
            "created": time.time(),
            "version": 0,
            "ports": (8080,),
        }
        self.store.add(AttachedRow(**{**base, **fields}))  # type: ignore[arg-type]
        self.service.republish()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    value = Net(tmp_path)
    yield value
    value.state.close()


async def _settle(net: Net) -> None:
    net.service.sync_once()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not net.service._pulling:
            return


async def test_own_rows_are_signed_and_announced(net: Net) -> None:
    service = net.service
    await service.start()
    try:
        assert net.published == [None]  # no hosts: no key
        net.row()
        version = net.published[-1]
        assert version is not None
        assert int(version) == service._version
        (raw,) = service.records()
        host = service.get("morello")
        assert host.gateways[0].state == "self"
        assert host.gateways[0].endpoint == "127.0.0.1:5000"
        assert "192.168.0.10" not in raw.decode(errors="replace")  # no LAN address
        own = service.own()
        assert own[0].local is not None
        assert own[0].local.address == "192.168.0.10"
        # A new endpoint (the listener moved) is re-signed by the watcher on its own.
        net.endpoint = "203.0.113.9:7000"
        for _ in range(40):
            await asyncio.sleep(0.05)
            if service.get("morello").gateways[0].endpoint == net.endpoint:
                break
        assert service.get("morello").gateways[0].endpoint == net.endpoint
        assert int(net.published[-1] or 0) > int(version)
        await service.detach("morello")
        assert net.published[-1] is None
        assert service.records() == []
        with pytest.raises(AttachedNotFound):
            await service.detach("morello")
    finally:
        await service.aclose()


def test_allows_and_target(net: Net) -> None:
    peer = Identity.generate()
    net.row(allow=(peer.node_id,))
    service = net.service
    assert service.allows("morello", net.me.public_key)
    assert service.allows("morello", peer.public_key)
    assert not service.allows("morello", Identity.generate().public_key)
    assert not service.allows("ghost", net.me.public_key)
    assert not service.allows("morello", b"short")
    assert service.target("morello", 22) == ("192.168.0.10", 22)
    assert service.target("morello", 8080) == ("192.168.0.10", 8080)
    for port in (21, 80, 443, 8081, 0):
        assert service.target("morello", port) is None
    assert service.target("ghost", 22) is None


async def test_allow_lists_resolve_names_ids_and_keys(net: Net) -> None:
    net.row()
    peer, other = Identity.generate(), Identity.generate()
    net.member(peer, "laptop", 9001)
    service = net.service
    host = await service.set_allow(
        "morello", [" laptop ", other.openssh_public_key("x"), peer.node_id], []
    )
    assert host.local is not None
    assert host.local.allow == [peer.node_id, other.node_id]
    assert service.allows("morello", other.public_key)
    host = await service.set_allow("morello", [], ["laptop", "gone-peer"])
    assert host.local is not None
    assert host.local.allow == [other.node_id]
    with pytest.raises(PeerNotFound):
        await service.set_allow("morello", ["nobody"], [])
    with pytest.raises(InvalidRequest, match="only Ed25519"):
        await service.set_allow("morello", ["ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"], [])
    with pytest.raises(InvalidRequest, match="at most 64"):
        await service.set_allow("morello", [f"{i:032x}" for i in range(65)], [])
    with pytest.raises(AttachedNotFound):
        await service.set_allow("ghost", [peer.node_id], [])


def test_names_checked_before_anything(net: Net) -> None:
    net.row()
    net.member(Identity.generate(), "laptop", 9001)
    check = net.service._check_name
    with pytest.raises(NameTaken, match="peer's name"):
        check("laptop", None)
    with pytest.raises(NameTaken, match="peer's name"):
        check("gw", None)  # this node's own
    with pytest.raises(NameTaken, match="already attached"):
        check("morello", None)
    with pytest.raises(InvalidRequest, match="same-as"):
        check("board", "morello")
    with pytest.raises(AttachedNotFound):
        check("board", "board")


def _gateway(states: dict[str, str]) -> Callable[[AttachedRecord], AttachedGateway]:
    def of(record: AttachedRecord) -> AttachedGateway:
        return AttachedGateway(
            node_id=record.gateway,
            name=record.gateway[:4],
            endpoint=record.endpoint,
            state=states[record.gateway],  # type: ignore[arg-type]
            version=record.version,
        )

    return of


def test_merge_rules() -> None:
    one, two, three, four = (Identity.generate() for _ in range(4))
    now = int(time.time() * 1000) - 10_000
    records = [
        _record(two, version=now + 2, cores=8, arch="aarch64"),
        _record(one, version=now + 1),
        _record(three, version=now + 3),
        _record(four, version=now, host_key=KEY_B),  # oldest: wins the name
        _record(one, name="other", version=now),
    ]
    states = {one.node_id: "dead", two.node_id: "alive", three.node_id: "self"}
    states[four.node_id] = "suspect"
    hosts = merge(records, _gateway(states))
    assert [h.name for h in hosts] == ["morello", "other"]
    morello = hosts[0]
    assert morello.host_key == KEY_B
    assert [g.node_id for g in morello.gateways] == [four.node_id]
    assert {g.node_id for g in morello.conflicts} == {one.node_id, two.node_id, three.node_id}
    # Without the conflicting one: one host, three gateways, self, alive, then dead first.
    hosts = merge(records[:3], _gateway(states))
    assert [g.state for g in hosts[0].gateways] == ["self", "alive", "dead"]
    assert hosts[0].cores == 8  # the specs a gateway read
    assert hosts[0].arch == "aarch64"
    assert hosts[0].conflicts == []


async def test_pull_stores_a_members_verified_set(net: Net) -> None:
    gateway = Identity.generate()
    records = [_record(gateway), _record(gateway, name="board", ports=(80,))]
    net.serve(9001, [r.encode() for r in records])
    member = net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(records[0].version)})
    await _settle(net)
    hosts = {h.name: h for h in net.service.known()}
    assert set(hosts) == {"board", "morello"}
    assert hosts["board"].gateways[0].name == "laptop"
    assert hosts["board"].gateways[0].state == "alive"
    assert len(net.store.foreign()) == 2
    calls = net.calls
    await _settle(net)  # same announcement: no pull
    assert net.calls == calls
    member.state = MemberState.DEAD  # a dead gateway stays listed, as dead
    assert net.service.get("board").gateways[0].state == "dead"
    # It announces no hosts any more: its records go.
    net.member(gateway, "laptop", 9001)
    await _settle(net)
    assert net.service.known() == []
    assert net.store.foreign() == []


async def test_a_gateway_not_alive_is_pulled_once_back(net: Net) -> None:
    gateway = Identity.generate()
    record = _record(gateway)
    net.serve(9001, [record.encode()])
    member = net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(record.version)})
    member.state = MemberState.SUSPECT
    await _settle(net)
    assert net.calls == 0
    member.state = MemberState.ALIVE
    await _settle(net)
    assert net.calls == 1
    assert [h.name for h in net.service.known()] == ["morello"]


async def test_pulls_are_spaced_and_future_announcements_ignored(net: Net) -> None:
    gateway = Identity.generate()
    record = _record(gateway)
    net.serve(9001, [record.encode()])
    net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(record.version)})
    await _settle(net)
    net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(record.version + 1)})
    await _settle(net)
    assert net.calls == 1  # a re-announcement at once waits for the gap
    net.service._retry[gateway.node_id] = (0.0, 0.5)
    await _settle(net)
    assert net.calls == 2
    future = str(int(time.time() * 1000) + 3_600_000)
    net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: future})
    net.service._retry.clear()
    await _settle(net)
    assert net.calls == 2
    assert net.service.known() == []  # as if it announced nothing


async def test_records_of_a_gateway_the_table_forgets_are_dropped(net: Net) -> None:
    gateway = Identity.generate()
    record = _record(gateway)
    net.serve(9001, [record.encode()])
    net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(record.version)})
    await _settle(net)
    assert len(net.service.known()) == 1
    del net.table.members[gateway.node_id]
    await _settle(net)
    assert net.service.known() == []
    assert net.store.foreign() == []


BAD_ANSWERS: dict[str, Callable[[Identity, Identity], httpx.Response]] = {
    "another gateway's record": lambda g, o: _json([_record(o).encode()]),
    "a record dated in the future": lambda g, o: _json(
        [_record(g, version=int(time.time() * 1000) + 3_600_000).encode()]
    ),
    "a name twice": lambda g, o: _json([_record(g).encode(), _record(g, ports=(1,)).encode()]),
    "a forged record": lambda g, o: _json([replace(_record(g), ssh_port=2).encode()]),
    "too many records": lambda g, o: _json([_record(g, name=f"h{i}").encode() for i in range(33)]),
    "too many bytes": lambda g, o: httpx.Response(200, content=b" " * (65 * 1024)),
    "not json": lambda g, o: httpx.Response(200, content=b"<html>"),
    "not base64": lambda g, o: httpx.Response(200, json={"records": ["!!"]}),
    "no records key": lambda g, o: httpx.Response(200, json={"hosts": []}),
    "an error": lambda g, o: httpx.Response(500, json={"error": {"code": "internal"}}),
}


def _json(records: list[bytes]) -> httpx.Response:
    return httpx.Response(200, json={"records": [base64.b64encode(r).decode() for r in records]})


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
async def test_a_bad_answer_stores_nothing_and_backs_off(net: Net, case: str) -> None:
    gateway, other = Identity.generate(), Identity.generate()
    good = _record(gateway, name="kept")
    net.store.replace_gateway(gateway.node_id, [good])  # what we held before
    await net.service.start()
    try:
        net.answers["9001"] = lambda: BAD_ANSWERS[case](gateway, other)
        net.member(gateway, "laptop", 9001, **{ATTACHED_KEY: str(good.version + 5)})
        await _settle(net)
        assert net.calls == 1
        assert [r.name for r in net.store.foreign()] == ["kept"]  # nothing lost either
        assert [h.name for h in net.service.known()] == ["kept"]
        retry_at, delay = net.service._retry[gateway.node_id]
        assert delay == 1.0
        assert retry_at > time.monotonic()
        await _settle(net)
        assert net.calls == 1  # not again before the backoff
    finally:
        await net.service.aclose()


def test_a_stored_record_that_no_longer_verifies_is_dropped(net: Net) -> None:
    gateway = Identity.generate()
    net.store.replace_gateway(gateway.node_id, [_record(gateway)])
    net.state.connection.execute("UPDATE attached_records SET record = x'00'")
    assert net.store.foreign() == []
    count = net.state.connection.execute("SELECT COUNT(*) FROM attached_records").fetchone()
    assert count[0] == 0


def _fake_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The board as the probe finds it (no SSH): at 192.168.0.10, KEY_A, two cores."""

    async def resolve(host: str) -> list[str]:
        return ["192.168.0.10"]

    async def reachable(addresses: list[str], port: int, bound: float) -> str:
        return addresses[0]

    async def host_key(address: str, port: int, bound: float) -> str:
        return KEY_A

    async def specs(*args: object) -> dict[str, object]:
        return {"cores": 2}

    for name, fake in [("resolve_host", resolve), ("reachable", reachable),
                       ("host_key", host_key), ("read_specs", specs)]:  # fmt: skip
        monkeypatch.setattr(probe, name, fake)


async def test_a_set_that_cannot_be_announced_is_not_stored(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_probe(monkeypatch)

    def full(key: str, value: str | None) -> None:
        if value is not None:
            raise ValueError("record is larger than 1100 bytes; shorten metadata")

    net.service._publish = full
    with pytest.raises(InvalidRequest, match="cannot announce attached hosts"):
        await net.service.attach(AttachRequest(name="morello", host="board.lan"))
    assert net.store.rows() == []
    assert net.service.records() == []
    net.service._publish = lambda key, value: net.published.append(value)
    host = await net.service.attach(AttachRequest(name="morello", host="board.lan"))
    assert host.cores == 2
    assert host.local is not None
    assert host.local.address == "192.168.0.10"
    assert net.published[-1] == str(host.gateways[0].version)


async def test_an_attach_publishes_the_listener_before_signing(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind NAT the first record names the relay's address, not the listener's LAN one
    (a client handed the LAN address could not reach the gateway); a relay that does not
    answer delays nothing for good: the record is signed with what there is."""

    _fake_probe(monkeypatch)
    net.endpoint = "192.168.0.2:5000"

    async def publish() -> str:
        await asyncio.sleep(0.05)  # the relay's round trip
        net.endpoint = "198.51.100.11:40001"
        return net.endpoint

    net.service._publish_endpoint = publish
    host = await net.service.attach(AttachRequest(name="morello", host="board.lan"))
    assert [g.endpoint for g in host.gateways] == ["198.51.100.11:40001"]

    async def silent() -> str:
        raise OSError("relay unreachable")

    net.service._publish_endpoint = silent
    net.endpoint = "192.168.0.2:5000"
    second = await net.service.attach(AttachRequest(name="board2", host="board.lan"))
    assert [g.endpoint for g in second.gateways] == ["192.168.0.2:5000"]
    assert len(net.store.rows()) == 2
