"""The peer link's lookup (names and id prefixes from signed records, never from DNS) and
the outcome of each call it makes, kept per member."""

import socket
import time
from dataclasses import replace

import httpx
import pytest

from p2prc.config import Timeouts
from p2prc.errors import InvalidRequest, NotTrusted, PeerNotFound
from p2prc.identity import Identity
from p2prc.peers.link import PeerLink, PeerTarget, resolve_peer
from p2prc.peers.table import Member, PeerTable
from tests.unit.peers.sim import make_record

ME, BOB, CAROL = Identity.generate(), Identity.generate(), Identity.generate()


def _member(identity: Identity, index: int, **fields: object) -> Member:
    return Member(make_record(identity, index, 1, **fields))


MEMBERS = [
    _member(ME, 0),
    _member(BOB, 1),
    _member(CAROL, 2, relay=ME.node_id, public_api="198.51.100.7:40001"),
]


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"DNS lookup of {args[0]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)


def test_a_name_gives_the_records_url_and_node_id() -> None:
    target = resolve_peer("n1", MEMBERS, ME.node_id)
    assert target == PeerTarget("http://10.0.0.1:8001", BOB.node_id)


def test_a_nated_peer_is_reached_on_its_relay_pinned_to_its_id() -> None:
    target = resolve_peer("n2", MEMBERS, ME.node_id)
    assert target == PeerTarget(f"https://{CAROL.node_id}@198.51.100.7:40001", CAROL.node_id)


def test_a_unique_id_prefix_resolves() -> None:
    target = resolve_peer(BOB.node_id[:10].upper(), MEMBERS, ME.node_id)
    assert target.node_id == BOB.node_id


def test_an_unknown_name_is_peer_not_found() -> None:
    with pytest.raises(PeerNotFound, match="no peer named 'bob'"):
        resolve_peer("bob", MEMBERS, ME.node_id)
    with pytest.raises(PeerNotFound):
        resolve_peer("n0", MEMBERS, ME.node_id)  # this node itself is no peer
    with pytest.raises(PeerNotFound):
        resolve_peer("bob", [])  # gossip off: no names at all
    assert PeerNotFound.status == 404


def test_an_ambiguous_prefix_or_name_is_refused() -> None:
    ids = [Identity.generate() for _ in range(17)]  # 16 hex digits: two share the first
    by_first: dict[str, list[Identity]] = {}
    for identity in ids:
        by_first.setdefault(identity.node_id[0], []).append(identity)
    twins = next(group for group in by_first.values() if len(group) > 1)[:2]
    members = [_member(identity, 10 + n) for n, identity in enumerate(twins)]
    with pytest.raises(InvalidRequest, match="matches 2 peers"):
        resolve_peer(twins[0].node_id[0], members)
    same_name = [Member(replace(m.record, name="twin")) for m in members]
    with pytest.raises(InvalidRequest, match="matches 2 peers"):
        resolve_peer("twin", same_name)


def test_an_address_uses_the_record_that_publishes_it() -> None:
    assert resolve_peer("10.0.0.1:8001", MEMBERS).node_id == BOB.node_id
    assert resolve_peer("http://10.0.0.1:8001/", MEMBERS).node_id == BOB.node_id


def test_an_address_no_record_publishes_is_called_as_typed() -> None:
    assert resolve_peer("10.9.9.9:8088", MEMBERS) == PeerTarget("http://10.9.9.9:8088", None)
    assert resolve_peer("[::1]:9000", []) == PeerTarget("http://[::1]:9000", None)


# The outcome of each call, kept per member for `p2prc status` ------------------------


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/refuse":
        error = {"code": "not_trusted", "message": "node n1 does not trust you"}
        return httpx.Response(403, json={"error": error})
    return httpx.Response(200, json={})


def _link(*members: Member) -> tuple[PeerLink, PeerTable]:
    table = PeerTable(make_record(ME, 0, 1))
    for member in members:
        table.members[member.record.node_id] = member
    transport = httpx.MockTransport(_answer)
    return PeerLink(ME, lambda: table, Timeouts(), transport=transport), table


async def test_a_call_that_works_is_recorded_as_ok() -> None:
    link, _ = _link(_member(BOB, 1))
    assert link.last_call(BOB.node_id) is None
    before = time.time()
    async with link.connect(link.resolve("n1")) as client:
        await client._request("GET", "/ok", signed=True)
    outcome = link.last_call(BOB.node_id)
    assert outcome is not None
    assert outcome.ok
    assert outcome.code == ""
    assert before <= outcome.at <= time.time()


async def test_a_refused_call_is_recorded_with_its_code() -> None:
    link, _ = _link(_member(BOB, 1))
    with pytest.raises(NotTrusted):
        async with link.connect(link.resolve("n1")) as client:
            await client._request("GET", "/refuse", signed=True)
    outcome = link.last_call(BOB.node_id)
    assert outcome is not None
    assert not outcome.ok
    assert outcome.code == "not_trusted"
    async with link.connect("10.0.0.1:8001") as client:  # by address: the same member
        await client._request("GET", "/ok", signed=True)
    outcome = link.last_call(BOB.node_id)
    assert outcome is not None
    assert outcome.ok


async def test_only_members_are_kept_and_dropped_ones_are_forgotten() -> None:
    others = [Identity.generate() for _ in range(5)]
    link, table = _link(*(_member(identity, 10 + n) for n, identity in enumerate(others)))
    stranger = PeerTarget("http://10.9.9.9:8088", Identity.generate().node_id)
    async with link.connect(stranger) as client:
        await client._request("GET", "/ok", signed=True)
    assert link.last_call(stranger.node_id or "") is None  # not in the table: not kept
    for identity in others:
        async with link.connect(link.resolve(identity.node_id)) as client:
            await client._request("GET", "/ok", signed=True)
    assert all(link.last_call(identity.node_id) is not None for identity in others)
    for identity in others[:4]:
        table.forget(identity.node_id)
    survivor = others[4]
    async with link.connect(link.resolve(survivor.node_id)) as client:
        await client._request("GET", "/ok", signed=True)
    assert len(link._calls) <= len(table.members)  # bounded by the table
    assert [identity for identity in others if link.last_call(identity.node_id)] == [survivor]
