"""AttachedRecord: signed by its gateway only, and every malformed field refused on decode."""

from __future__ import annotations

import base64
import contextlib
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.attach.records import (
    MAX_ATTACHED_BYTES,
    AttachedRecord,
    check_endpoint,
    check_host_key,
    decode_attached,
)
from p2prc.errors import PeerProtocolError
from p2prc.identity import Identity

GATEWAY = Identity.generate()
OTHER = Identity.generate()
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICseTfn0fT/bt2pdLk2DoidFbZcTCwfsvb7TXblxDSTw"


def _record(**fields: Any) -> AttachedRecord:
    base: dict[str, Any] = {
        "name": "morello",
        "gateway": GATEWAY.node_id,
        "gateway_key": GATEWAY.public_key,
        "version": 1_790_000_000_000,
        "host_key": ED25519,
        "ssh_port": 22,
        "user": "root",
        "ports": (8080, 9000),
        "endpoint": "203.0.113.7:40001",
        "cores": 4,
        "memory": 8 << 30,
        "arch": "aarch64c",
        "os": "FreeBSD",
    }
    return AttachedRecord(**{**base, **fields})


def _fields(record: AttachedRecord) -> list[Any]:
    value: list[Any] = msgpack.unpackb(record.encode(), raw=False)
    return value


def _forge(fields: list[Any], identity: Identity = GATEWAY) -> bytes:
    """Re-sign a changed field list, so only the field checks can refuse it."""
    body = fields[:13]
    signature = identity.sign(b"p2prc-attached-v1" + msgpack.packb(body, use_bin_type=True))
    data: bytes = msgpack.packb([*body, signature], use_bin_type=True)
    return data


def test_round_trip_and_signature() -> None:
    record = _record().signed(GATEWAY)
    assert decode_attached(record.encode()) == record
    assert record.all_ports == (22, 8080, 9000)
    assert len(record.encode()) <= MAX_ATTACHED_BYTES


def test_only_its_gateway_signs_it() -> None:
    with pytest.raises(ValueError, match="only its own"):
        _record().signed(OTHER)
    record = _record().signed(GATEWAY)
    changed = replace(record, ssh_port=2222)  # a field changed after signing
    with pytest.raises(PeerProtocolError, match="does not verify"):
        decode_attached(changed.encode())
    # Signed by another key but claiming the gateway: the key does not match its id.
    fields = _fields(record)
    fields[2] = OTHER.public_key
    with pytest.raises(PeerProtocolError, match="does not match its key"):
        decode_attached(_forge(fields, OTHER))


RSA = "ssh-rsa " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + b"\x01" * 270).decode()

MALFORMED: list[tuple[int, Any]] = [
    (0, ""),  # name
    (0, "-starts-with-dash"),
    (0, "a" * 64),
    (0, "has space"),
    (0, "semi;colon"),
    (0, 7),
    (1, "ABCDEF0123456789abcdef0123456789"),  # gateway: upper case
    (1, "00"),
    (2, b"\x00" * 31),  # gateway key
    (2, "text"),
    (3, -1),  # version
    (3, 2**62),
    (3, True),
    (3, 1.5),
    (4, ""),  # host key
    (4, "ssh-dss AAAAB3NzaC1kc3MAAACBAP"),
    (4, "ssh-ed25519 not*base64"),
    (4, "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + b"x" * 40).decode()),
    (4, "ssh-ed25519 AAAA with comment"),
    (4, "ssh-rsa " + "A" * 1100),
    (5, 0),  # ssh port
    (5, 65536),
    (5, "22"),
    (7, [0]),  # ports
    (7, [65536]),
    (7, [9000, 8080]),
    (7, [8080, 8080]),
    (7, [22]),
    (7, list(range(1000, 1017))),
    (7, "8080"),
    (8, "example.com:80"),  # endpoint: a name, not an IP literal
    (8, "0.0.0.0:80"),
    (8, "203.0.113.7:0"),
    (8, "203.0.113.7:99999"),
    (8, "203.0.113.7"),
    (8, "::1:80"),
    (8, "[203.0.113.7]:80"),
    (9, -1),  # cores
    (9, 1 << 20),
    (10, -5),  # memory
    (6, "us er"),  # user
    (6, "-root"),
    (6, "a" * 33),
    (11, "x86_64; rm -rf /"),  # arch
    (12, "a" * 65),  # os
]


@pytest.mark.parametrize(("index", "value"), MALFORMED)
def test_every_malformed_field_is_refused(index: int, value: Any) -> None:
    fields = _fields(_record().signed(GATEWAY))
    fields[index] = value
    with pytest.raises(PeerProtocolError):
        decode_attached(_forge(fields))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb({"name": "x"}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb(list(range(14))),
        b"\x00" * (MAX_ATTACHED_BYTES + 1),
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        decode_attached(data)


def test_wrong_signature_shape_and_extra_fields() -> None:
    fields = _fields(_record().signed(GATEWAY))
    for signature in (b"", b"x" * 63, "text"):
        with pytest.raises(PeerProtocolError):
            decode_attached(msgpack.packb([*fields[:13], signature], use_bin_type=True))
    with pytest.raises(PeerProtocolError):
        decode_attached(msgpack.packb([*fields, b"extra"], use_bin_type=True))


def test_accepted_shapes() -> None:
    assert check_host_key(RSA) == RSA
    assert check_endpoint("") == ""
    assert check_endpoint("[2001:db8::1]:443") == "[2001:db8::1]:443"
    record = _record(endpoint="", user="", ports=(), cores=0, memory=0, arch="", os="")
    assert decode_attached(record.signed(GATEWAY).encode()).endpoint == ""
    big = "ssh-rsa " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + b"\x01" * 740).decode()
    with pytest.raises(ValueError, match="larger than"):
        _record(host_key=big).signed(GATEWAY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(PeerProtocolError):
        decode_attached(data)


_INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_VALUES = (
    st.none()
    | st.booleans()
    | _INT64
    | st.text(max_size=40)
    | st.binary(max_size=70)
    | st.lists(_INT64, max_size=20)
)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=13), _VALUES)
def test_any_field_replaced_decodes_or_is_refused(index: int, value: Any) -> None:
    fields = _fields(_record().signed(GATEWAY))
    fields[index] = value
    try:
        record = decode_attached(_forge(fields) if index < 13 else msgpack.packb(fields))
    except PeerProtocolError:
        return
    record.verify()  # whatever decodes is a well-formed, verified record
