"""Signed peer records and membership claims: the facts nodes gossip. Sans-IO.

A ``PeerRecord`` describes one node and is signed by that node; only it can change its
record, by signing a higher ``version`` (versions are millisecond timestamps, kept
increasing across restarts). The version is also the node's SWIM incarnation: a node
refutes a suspicion by signing a newer record.

A ``Claim`` says another node is ``suspect`` or ``dead`` at a given version; it is
signed by the node that makes it. Everything decoded from the wire is checked for type
and size before use; anything else raises ``PeerProtocolError``.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import msgpack

from ..config import join_address
from ..errors import PeerProtocolError
from ..identity import Identity, node_id_of, verify_signature

__all__ = [
    "MAX_ADDRESSES",
    "MAX_RECORD_BYTES",
    "VERSION_BOUND",
    "Claim",
    "PeerRecord",
    "decode_claim",
    "decode_record",
    "ip_literal",
    "plausible_version",
]

MAX_RECORD_BYTES = 1100
MAX_CLAIM_BYTES = 300
# Every decoder refuses an integer at or above this; versions (millisecond timestamps,
# about 2**41 today) are never signed, stored or accepted near it (see plausible_version).
VERSION_BOUND = 2**62
_MAX_TEXT = 512
_MAX_METADATA = 400
MAX_ADDRESSES = 8
_SIGNATURE = 64


def _packb(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


_SignedT = TypeVar("_SignedT", "PeerRecord", "Claim")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What a node says about itself."""

    node_id: str
    public_key: bytes
    name: str
    version: int
    addresses: tuple[str, ...] = ()
    api_port: int = 0
    gossip_port: int = 0
    relay_port: int = 0
    behind_nat: bool | None = None
    relay: str = ""
    user: str = ""
    cores: int = 0
    memory: int = 0
    gpus: int = 0
    metadata: str = ""
    custom: dict[str, str] = field(default_factory=dict)
    # "host:port" where the node's API is published by its relay (behind NAT), else "";
    # always TLS with the node's own key (see api_url).
    public_api: str = ""
    signature: bytes = b""

    def body(self) -> list[Any]:
        """The signed fields, in a fixed order."""
        return [
            self.node_id,
            self.public_key,
            self.name,
            self.version,
            list(self.addresses),
            self.api_port,
            self.gossip_port,
            self.relay_port,
            self.behind_nat,
            self.relay,
            self.user,
            self.cores,
            self.memory,
            self.gpus,
            self.metadata,
            dict(sorted(self.custom.items())),
            self.public_api,
        ]

    def encode(self) -> bytes:
        return _packb([*self.body(), self.signature])

    def signed(self, identity: Identity) -> PeerRecord:
        """This record signed by ``identity`` (which must be its node's)."""
        if identity.node_id != self.node_id:
            raise ValueError("a node signs only its own record")
        message = b"p2prc-record-v1" + _packb(self.body())
        record = replace(self, signature=identity.sign(message))
        if len(record.encode()) > MAX_RECORD_BYTES:
            raise ValueError(f"record is larger than {MAX_RECORD_BYTES} bytes; shorten metadata")
        return record

    def verify(self) -> None:
        """Raise ``PeerProtocolError`` unless the record is well-formed and self-signed."""
        message = b"p2prc-record-v1" + _packb(self.body())
        _check_signed("record", "node id", self.node_id, self.public_key, self.signature, message)

    @property
    def host(self) -> str:
        """The first advertised address, or empty."""
        return self.addresses[0] if self.addresses else ""

    @property
    def api_url(self) -> str:
        """Where peers reach the node's API: through its relay when it has one there.

        ``public_api`` is always TLS with the node's own key; the URL names the node id
        (``https://<node id>@host:port``) so clients pin it and the relay sees only TLS.
        """
        if self.public_api:
            return f"https://{self.node_id}@{self.public_api}"
        return f"http://{join_address(self.host, self.api_port)}"


@dataclass(frozen=True, slots=True)
class Claim:
    """``suspect`` or ``dead``: one node's signed opinion of another at a version."""

    kind: str
    target: str
    version: int
    by: str
    author_key: bytes = b""
    signature: bytes = b""

    def body(self) -> list[Any]:
        return [self.kind, self.target, self.version, self.by, self.author_key]

    def encode(self) -> bytes:
        return _packb([*self.body(), self.signature])

    def signed(self, identity: Identity) -> Claim:
        claim = replace(self, by=identity.node_id, author_key=identity.public_key)
        return replace(claim, signature=identity.sign(b"p2prc-claim-v1" + _packb(claim.body())))

    def verify(self) -> None:
        """Check the claim against the author key it carries."""
        message = b"p2prc-claim-v1" + _packb(self.body())
        _check_signed("claim", "author", self.by, self.author_key, self.signature, message)


def _check_signed(
    what: str, who: str, node_id: str, key: bytes, signature: bytes, message: bytes
) -> None:
    """``PeerProtocolError`` unless ``key`` is ``node_id``'s and signed ``message``."""
    if node_id_of(key) != node_id:
        raise PeerProtocolError(f"{what}'s {who} does not match its key")
    try:
        verify_signature(key, signature, message)
    except Exception:
        raise PeerProtocolError(f"{what} signature does not verify") from None


def _unpack(data: bytes, limit: int) -> list[Any]:
    if len(data) > limit:
        raise PeerProtocolError(f"message larger than {limit} bytes")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=limit)
    except Exception as exc:
        raise PeerProtocolError(f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(value, list):
        raise PeerProtocolError("expected a list")
    return value


def _text(value: Any, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise PeerProtocolError("bad text field")
    return value


def plausible_version(version: int, wall: float, skew: float) -> bool:
    """Whether a version (ms timestamp) is no later than ``wall`` (s) plus ``skew`` (s)."""
    return 0 <= version <= int((wall + skew) * 1000) and version < VERSION_BOUND // 2


def _int(value: Any, high: int = VERSION_BOUND) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < high:
        raise PeerProtocolError("bad integer field")
    return value


def _port(value: Any) -> int:
    return _int(value, 65536)


def _bytes(value: Any, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise PeerProtocolError("bad binary field")
    return value


def ip_literal(value: Any, what: str = "address") -> str:
    """An IP literal a datagram or connection can go to (no names, scopes or wildcards)."""
    text = _text(value, 64)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise PeerProtocolError(f"bad {what}: not an IP literal") from None
    if "%" in text or address.is_unspecified or address.is_multicast:
        raise PeerProtocolError(f"bad {what}: not a unicast address")
    return text


def _endpoint(value: Any) -> str:
    """``host:port`` (``[v6]:port``) with an IP literal host, or empty; else refused."""
    text = _text(value, 80)
    if not text:
        return text
    host, _, port = text.rpartition(":")
    v6 = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if v6 else host
    ip_literal(bare, "public_api")
    if v6 != (":" in bare) or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerProtocolError("bad public_api")
    return text


def _node_id(value: Any, what: str) -> str:
    """Empty or a node id: 32 lower-case hex digits."""
    text = _text(value, 64)
    if text and (len(text) != 32 or text.strip("0123456789abcdef")):
        raise PeerProtocolError(f"bad {what}")
    return text


def record_from_fields(fields: list[Any]) -> PeerRecord:
    """Build and type-check a record from its decoded list form."""
    if len(fields) != 18:
        raise PeerProtocolError("record has the wrong number of fields")
    addresses, custom, behind_nat = fields[4], fields[15], fields[8]
    if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES:
        raise PeerProtocolError("bad addresses")
    if not isinstance(custom, dict) or len(custom) > 32:
        raise PeerProtocolError("bad custom table")
    if behind_nat is not None and not isinstance(behind_nat, bool):
        raise PeerProtocolError("bad behind_nat")
    return PeerRecord(
        node_id=_text(fields[0], 64),
        public_key=_bytes(fields[1], 32),
        name=_text(fields[2], 64),
        version=_int(fields[3]),
        addresses=tuple(ip_literal(address) for address in addresses),
        api_port=_port(fields[5]),
        gossip_port=_port(fields[6]),
        relay_port=_port(fields[7]),
        behind_nat=behind_nat,
        relay=_node_id(fields[9], "relay"),
        user=_text(fields[10], 64),
        cores=_int(fields[11], 1 << 20),
        memory=_int(fields[12]),
        gpus=_int(fields[13], 1 << 10),
        metadata=_text(fields[14], _MAX_METADATA),
        custom={_text(k, 64): _text(v, 256) for k, v in custom.items()},
        public_api=_endpoint(fields[16]),
        signature=_bytes(fields[17], _SIGNATURE),
    )


def parse_record(data: bytes) -> PeerRecord:
    """A type-checked record from its encoding; its signature is not checked yet."""
    return record_from_fields(_unpack(data, MAX_RECORD_BYTES))


def decode_record(data: bytes) -> PeerRecord:
    """A verified record from its encoding."""
    return _verified(parse_record(data))


def claim_from_fields(fields: list[Any]) -> Claim:
    if len(fields) != 6 or fields[0] not in ("suspect", "dead", "left"):
        raise PeerProtocolError("bad claim")
    return Claim(
        kind=fields[0],
        target=_text(fields[1], 64),
        version=_int(fields[2]),
        by=_text(fields[3], 64),
        author_key=_bytes(fields[4], 32),
        signature=_bytes(fields[5], _SIGNATURE),
    )


def parse_claim(data: bytes) -> Claim:
    """A type-checked claim from its encoding; its signature is not checked yet."""
    return claim_from_fields(_unpack(data, MAX_CLAIM_BYTES))


def decode_claim(data: bytes) -> Claim:
    """A verified claim from its encoding."""
    return _verified(parse_claim(data))


def _verified(signed: _SignedT) -> _SignedT:
    signed.verify()
    return signed


def retransmit_limit(members: int, multiplier: int = 4) -> int:
    """How often an update is piggybacked: memberlist's ``mult * ceil(log10(n + 1))``."""
    return multiplier * max(1, math.ceil(math.log10(members + 1)))
