"""Push-pull anti-entropy in bounded steps: digests first, then only what is missing. Sans-IO.

The caller posts a *digest* of its table (node id, record version, state version, state
for every member and itself); the answer carries at most ``PAGE`` records and ``PAGE``
claims the caller lacks, the ids (at most ``PAGE``) of entries the caller holds newer,
and whether more is left. The caller then posts the wanted records and claims, with a
new digest when more is left, for a bounded number of rounds. Nothing here ever sends or
reads a whole table, and a request is refused before any work if it is oversized.

The classic form (a list ``[records, claims]``, the first version's) is still read: at
most ``PAGE`` of each are merged and one page of ours is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..errors import PeerProtocolError
from .records import MAX_CLAIM_BYTES, MAX_RECORD_BYTES
from .table import MemberState, PeerTable

__all__ = [
    "MAX_EXCHANGE_BYTES",
    "PAGE",
    "Answer",
    "Request",
    "decode_answer",
    "decode_request",
    "digest",
    "plan",
]

MAX_EXCHANGE_BYTES = 4 * 1024 * 1024
PAGE = 256
MAX_DIGEST = 70_000

Digest = dict[str, tuple[int, int, int]]


@dataclass(slots=True)
class Request:
    """One push-pull post: a digest (asks for an answer), and records or claims pushed."""

    digest: Digest | None = None
    records: list[bytes] = field(default_factory=list)
    claims: list[bytes] = field(default_factory=list)
    legacy: bool = False

    def encode(self) -> bytes:
        body: dict[str, Any] = {"records": self.records, "claims": self.claims}
        if self.digest is not None:
            body["digest"] = [[k, *v] for k, v in self.digest.items()]
        return _packb(body)


@dataclass(slots=True)
class Answer:
    """What the caller lacks (one page), what we want from it, and whether more is left."""

    records: list[bytes] = field(default_factory=list)
    claims: list[bytes] = field(default_factory=list)
    want: list[str] = field(default_factory=list)
    more: bool = False
    legacy: bool = False

    def encode(self) -> bytes:
        if self.legacy:
            return _packb([self.records, self.claims])
        body = {"records": self.records, "claims": self.claims, "want": self.want}
        return _packb({**body, "more": self.more})


def _packb(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_EXCHANGE_BYTES:
        raise PeerProtocolError("exchange payload too large")
    try:
        return msgpack.unpackb(
            data, raw=False, max_bin_len=MAX_RECORD_BYTES, max_array_len=MAX_DIGEST
        )
    except Exception:
        raise PeerProtocolError("undecodable exchange payload") from None


def _blobs(value: Any, limit: int) -> list[bytes]:
    """A list of encoded items; at most ``PAGE`` are kept (the rest are not looked at)."""
    if not isinstance(value, list):
        raise PeerProtocolError("malformed exchange payload")
    return [item if isinstance(item, bytes) and len(item) <= limit else b"" for item in value][
        :PAGE
    ]


def _digest(value: Any) -> Digest:
    if not isinstance(value, list):
        raise PeerProtocolError("malformed digest")
    entries: Digest = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
            raise PeerProtocolError("malformed digest")
        numbers = entry[1:]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise PeerProtocolError("malformed digest")
        entries[entry[0][:64]] = (numbers[0], numbers[1], numbers[2])
    return entries


def _pair(value: list[Any]) -> tuple[list[bytes], list[bytes]]:
    """The classic ``[records, claims]`` form."""
    return _blobs(value[0], MAX_RECORD_BYTES), _blobs(value[1], MAX_CLAIM_BYTES)


def _version(theirs: Digest, node_id: str) -> int:
    held = theirs.get(node_id)
    return -1 if held is None else held[0]


def decode_request(data: bytes) -> Request:
    """A push-pull post, checked for shape and size (items are decoded when merged)."""
    value = _unpack(data)
    if isinstance(value, list) and len(value) == 2:
        records, claims = _pair(value)
        return Request(None, records, claims, legacy=True)
    if not isinstance(value, dict):
        raise PeerProtocolError("malformed exchange payload")
    digest = _digest(value["digest"]) if "digest" in value else None
    records = _blobs(value.get("records", []), MAX_RECORD_BYTES)
    return Request(digest, records, _blobs(value.get("claims", []), MAX_CLAIM_BYTES))


def decode_answer(data: bytes) -> Answer:
    """A push-pull answer, checked for shape and size."""
    value = _unpack(data)
    if isinstance(value, list) and len(value) == 2:
        records, claims = _pair(value)
        return Answer(records, claims, legacy=True)
    if not isinstance(value, dict):
        raise PeerProtocolError("malformed exchange answer")
    want = value.get("want", [])
    if not isinstance(want, list) or not all(isinstance(w, str) for w in want):
        raise PeerProtocolError("malformed exchange answer")
    records = _blobs(value.get("records", []), MAX_RECORD_BYTES)
    claims = _blobs(value.get("claims", []), MAX_CLAIM_BYTES)
    return Answer(records, claims, [w[:64] for w in want[:PAGE]], value.get("more") is True)


def digest(table: PeerTable) -> Digest:
    """Ours: every member and this node, by id."""
    entries: Digest = {table.me.node_id: (table.me.version, table.me.version, 0)}
    for node_id, member in table.members.items():
        entries[node_id] = (member.record.version, member.state_version, int(member.state))
    return entries


def plan(table: PeerTable, theirs: Digest) -> Answer:
    """One page of what ``theirs`` lacks (trusted members first), and what we want of it."""
    me = table.me
    members = sorted(table.members.values(), key=lambda m: (not m.trusted, m.record.node_id))
    lacking = [me] if _version(theirs, me.node_id) < me.version else []
    lacking += [m.record for m in members if _version(theirs, m.record.node_id) < m.record.version]
    page = lacking[:PAGE]
    sent = {record.node_id for record in page}
    answer = Answer([record.encode() for record in page], more=len(lacking) > PAGE)
    for member in members:
        claim, node_id = member.claim, member.record.node_id
        if claim is None or len(answer.claims) >= PAGE:
            continue
        held = theirs.get(node_id)
        if held is not None and (held[1], held[2]) >= member.key:
            continue
        if node_id in sent or held is not None:
            answer.claims.append(claim.encode())
        else:
            answer.more = True  # its record comes on a later page
    answer.want = _wanted(table, theirs)
    return answer


def _wanted(table: PeerTable, theirs: Digest) -> list[str]:
    want: list[str] = []
    room = len(table) < table.max_members
    for node_id, (version, state_version, state) in theirs.items():
        if len(want) >= PAGE:
            break
        if node_id == table.me.node_id:
            if version > table.me.version:
                want.append(node_id)
            continue
        member = table.get(node_id)
        if member is None:
            if room and state <= MemberState.SUSPECT:
                want.append(node_id)
        elif version > member.record.version or (state_version, state) > member.key:
            want.append(node_id)
    return want


def pushed(table: PeerTable, want: list[str]) -> Request:
    """Our records (and claims) for the ids the other side wants, at most a page."""
    request = Request()
    for node_id in want[:PAGE]:
        if node_id == table.me.node_id:
            request.records.append(table.me.encode())
            continue
        member = table.get(node_id)
        if member is not None:
            request.records.append(member.record.encode())
            if member.claim is not None:
                request.claims.append(member.claim.encode())
    return request
