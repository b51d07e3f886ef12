"""Signed records, claims and the merge rules of the peer table."""

import contextlib
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.errors import PeerProtocolError
from p2prc.identity import Identity
from p2prc.peers.records import Claim, decode_claim, decode_record
from p2prc.peers.table import MemberState, PeerTable, Verdict
from tests.unit.peers.sim import make_record

ALICE, BOB, CAROL = Identity.generate(), Identity.generate(), Identity.generate()


def test_record_round_trip() -> None:
    record = make_record(ALICE, 1, metadata="gpu pool", custom={"team": "render"})
    assert decode_record(record.encode()) == record


def test_a_relayed_record_names_its_api_on_the_relay() -> None:
    record = make_record(ALICE, 1, relay=BOB.node_id, public_api="198.51.100.7:40001")
    assert decode_record(record.encode()) == record
    # The relay publishes it over TLS, pinned to the node id the URL names.
    assert record.api_url == f"https://{ALICE.node_id}@198.51.100.7:40001"
    assert make_record(ALICE, 1).api_url == "http://10.0.0.1:8001"
    v6 = make_record(ALICE, 1, public_api="[2001:db8::1]:443")
    assert decode_record(v6.encode()).api_url == f"https://{ALICE.node_id}@[2001:db8::1]:443"


@pytest.mark.parametrize(
    "public_api",
    ["evil.example:80", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "10.0.0.1:80/x", "x" * 90],
)
def test_a_bad_public_api_is_refused(public_api: str) -> None:
    record = make_record(ALICE, 1, public_api=public_api)
    with pytest.raises(PeerProtocolError):
        decode_record(record.encode())


@pytest.mark.parametrize(
    "change",
    [
        {"name": "mallory"},
        {"version": 99},
        {"metadata": "changed"},
        {"api_port": 1},
        {"public_api": "203.0.113.9:80"},
    ],
)
def test_tampered_record_is_rejected(change: dict[str, object]) -> None:
    forged = replace(make_record(ALICE, 1), **change)  # type: ignore[arg-type]
    with pytest.raises(PeerProtocolError):
        decode_record(forged.encode())
    table = PeerTable(make_record(BOB, 2))
    assert table.apply_record(forged) is Verdict.REJECTED
    assert table.rejected["bad_signature"] == 1
    assert table.members == {}


def test_record_for_another_key_is_rejected() -> None:
    """Nobody can write another node's record, even with a valid signature of their own."""
    impostor = replace(make_record(ALICE, 1), public_key=BOB.public_key)
    with pytest.raises(PeerProtocolError, match="node id"):
        impostor.verify()


def test_oversized_record_cannot_be_signed() -> None:
    with pytest.raises(ValueError, match="larger"):
        make_record(ALICE, 1, custom={f"k{i}": "v" * 200 for i in range(10)})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (decode_record, decode_claim):
        with contextlib.suppress(PeerProtocolError):
            decode(data)


def test_stale_and_replayed_records() -> None:
    table = PeerTable(make_record(BOB, 2))
    old, new = make_record(ALICE, 1, version=5), make_record(ALICE, 1, version=9)
    assert table.apply_record(new) is Verdict.CHANGED
    assert table.apply_record(old) is Verdict.REJECTED
    assert table.rejected["stale"] == 1
    assert table.apply_record(new) is Verdict.UNCHANGED
    member = table.get(ALICE.node_id)
    assert member is not None
    assert member.record.version == 9


def test_newer_record_revives_a_dead_node() -> None:
    table = PeerTable(make_record(BOB, 2))
    table.apply_record(make_record(ALICE, 1, version=5))
    table.apply_claim(Claim("dead", ALICE.node_id, 5, "").signed(CAROL))
    assert table.members[ALICE.node_id].state is MemberState.DEAD
    table.apply_record(make_record(ALICE, 1, version=6))
    assert table.members[ALICE.node_id].state is MemberState.ALIVE


def test_claims_about_me_ask_for_refutation() -> None:
    me = make_record(BOB, 2, version=5)
    table = PeerTable(me)
    claim = Claim("suspect", BOB.node_id, 5, "").signed(CAROL)
    assert table.apply_claim(claim) is Verdict.REFUTE
    assert table.apply_record(make_record(BOB, 2, version=7)) is Verdict.REFUTE


def test_forged_claim_and_foreign_leave_are_rejected() -> None:
    table = PeerTable(make_record(BOB, 2))
    table.apply_record(make_record(ALICE, 1, version=5))
    forged = replace(Claim("dead", ALICE.node_id, 5, "").signed(CAROL), version=6)
    assert table.apply_claim(forged) is Verdict.REJECTED
    not_hers = Claim("left", ALICE.node_id, 5, "").signed(CAROL)
    assert table.apply_claim(not_hers) is Verdict.REJECTED
    assert table.members[ALICE.node_id].state is MemberState.ALIVE


_NODES = [Identity.generate() for _ in range(3)]
_WITNESS = Identity.generate()


@st.composite
def updates(draw: st.DrawFn) -> list[object]:
    items: list[object] = []
    for _ in range(draw(st.integers(1, 14))):
        index = draw(st.integers(0, 2))
        version = draw(st.integers(1, 4))
        kind = draw(st.sampled_from(["record", "suspect", "dead", "left"]))
        node = _NODES[index]
        if kind == "record":
            items.append(make_record(node, index, version=version))
        else:
            author = node if kind == "left" else _WITNESS
            items.append(Claim(kind, node.node_id, version, "").signed(author))
    return items


@settings(max_examples=200, deadline=None)
@given(updates(), st.randoms(use_true_random=False))
def test_any_interleaving_converges(items: list[object], rng: random.Random) -> None:
    """Applying the same updates in any order, with repeats, gives the same table."""
    tables = []
    for _ in range(3):
        table = PeerTable(make_record(BOB, 9))
        order = items + rng.sample(items, len(items) // 2)
        rng.shuffle(order)
        for item in order:
            if isinstance(item, Claim):
                table.apply_claim(item)
            else:
                table.apply_record(item)  # type: ignore[arg-type]
        tables.append(table.snapshot())
    assert tables[0] == tables[1] == tables[2]


def test_a_claim_ahead_of_the_record_waits_for_that_record() -> None:
    table = PeerTable(make_record(BOB, 2))
    table.apply_record(make_record(ALICE, 1, version=5))
    assert table.apply_claim(Claim("dead", ALICE.node_id, 7, "").signed(CAROL)) is Verdict.UNCHANGED
    assert table.members[ALICE.node_id].state is MemberState.ALIVE
    table.apply_record(make_record(ALICE, 1, version=6))
    assert table.members[ALICE.node_id].state is MemberState.ALIVE
    table.apply_record(make_record(ALICE, 1, version=7))
    assert table.members[ALICE.node_id].key == (7, int(MemberState.DEAD))
    assert table.members[ALICE.node_id].claim is not None


def test_nothing_dated_beyond_the_clock_and_skew_is_taken() -> None:
    table = PeerTable(make_record(BOB, 2, version=5), wall=lambda: 1000.0, skew=60.0)
    future = make_record(ALICE, 1, version=1_061_001)
    assert table.apply_record(future) is Verdict.REJECTED
    assert table.apply_record(make_record(ALICE, 1, version=1_060_000)) is Verdict.CHANGED
    late = Claim("dead", ALICE.node_id, 2**62 - 1, "").signed(CAROL)
    assert table.apply_claim(late) is Verdict.REJECTED
    assert table.rejected["future"] == 2
    # About us: a claim above our own version is a lie, not a reason to refute.
    assert table.apply_claim(Claim("dead", BOB.node_id, 6, "").signed(CAROL)) is Verdict.REJECTED
    assert table.apply_claim(Claim("dead", BOB.node_id, 5, "").signed(CAROL)) is Verdict.REFUTE


def test_the_table_is_capped_and_each_introducer_rate_limited() -> None:
    listed = Identity.generate()
    table = PeerTable(
        make_record(BOB, 2), max_members=10, new_per_minute=4, listed=lambda i: i == listed.node_id
    )
    strangers = [make_record(Identity.generate(), 3) for _ in range(12)]
    verdicts = [table.apply_record(r, now=0.0, introducer="x" * 32) for r in strangers[:6]]
    assert verdicts.count(Verdict.CHANGED) == 4
    assert table.rejected["introducer_rate"] == 2
    later = [table.apply_record(r, now=61.0, introducer="x" * 32) for r in strangers[4:8]]
    assert later.count(Verdict.CHANGED) == 4
    for index, record in enumerate(strangers[8:]):
        table.apply_record(record, now=61.0, introducer=f"{index:032x}")
    assert len(table) == 10
    assert table.rejected["table_full"] == 2
    # A record a listed key introduces (or a listed key's own) crowds out a stranger.
    evicted: list[str] = []
    table.on_evict = evicted.append
    assert table.apply_record(make_record(listed, 4), now=62.0, introducer="y" * 32) is (
        Verdict.CHANGED
    )
    newcomer = make_record(Identity.generate(), 5)
    assert table.apply_record(newcomer, now=62.0, introducer=listed.node_id) is Verdict.CHANGED
    assert len(table) == 10
    assert len(evicted) == 2
    assert table.members[newcomer.node_id].trusted
