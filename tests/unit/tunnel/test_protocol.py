"""The relay control protocol: every message round-trips with the same bytes as before, and
whatever a peer sends decodes to a valid message or raises ``MessageError``, nothing else."""

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.tunnel import protocol as p
from p2prc.tunnel.frames import MAX_FRAME, encode

ports = st.integers(1, 65535)
sids = st.integers(0, 2**63 - 1)
ids = st.text(max_size=128)
domains = st.text(max_size=253)

messages: st.SearchStrategy[p.Message] = st.one_of(
    st.builds(p.Challenge, ids, ids),
    st.builds(p.Hello, st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64)),
    st.builds(p.Welcome, ids),
    st.builds(p.Error, st.text(max_size=1024), st.none() | st.text(max_size=128)),
    st.builds(p.Expose, ports, st.none() | ports, st.booleans()),
    st.builds(p.Exposed, ports, ports, st.booleans()),
    st.builds(p.Unexpose, ports),
    st.builds(p.Route, domains, ports),
    st.builds(p.Routed, domains, ports),
    st.builds(p.Unroute, domains),
    st.builds(p.Ping),
    st.builds(p.Pong),
    st.builds(p.Open, sids, ports),
    st.builds(p.Data, sids, st.binary(max_size=4096)),
    st.builds(p.End, sids),
    st.builds(p.Abort, sids),
    st.builds(p.Credit, sids, st.integers(1, p.WINDOW)),
    st.builds(
        p.Datagram,
        ports,
        st.tuples(st.text(max_size=64), st.integers(0, 65535)),
        st.binary(max_size=p.MAX_DATAGRAM),
    ),
)


@settings(max_examples=1000, deadline=None)
@given(messages)
def test_every_message_round_trips(message: p.Message) -> None:
    assert p.decode(message.encode()) == message
    assert p.parse(msgpack.unpackb(msgpack.packb(message.to_map()), raw=False)) == message
    assert type(message).from_map(message.to_map()) == message


def test_every_type_has_a_message() -> None:
    assert {cls.TYPE for cls in p._BY_TYPE.values()} == set(p.MessageType)
    assert all(p.MessageType(value) for value in p._BY_TYPE)


KEY, SIGNATURE = bytes(range(32)), bytes(range(64))
KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
SIGNATURE_B64 = KEY_B64 + "gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw"


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (p.Challenge("n", "r"), {"type": "challenge", "nonce": "n", "relay": "r"}),
        (
            p.Hello(KEY, SIGNATURE),
            {"type": "hello", "key": KEY_B64, "signature": SIGNATURE_B64},
        ),
        (p.Welcome("id"), {"type": "welcome", "node_id": "id"}),
        (p.Error("no"), {"type": "error", "message": "no"}),
        (p.Error("no", "domain_taken"), {"type": "error", "code": "domain_taken", "message": "no"}),
        (p.Expose(80), {"type": "expose", "local_port": 80}),
        (
            p.Expose(80, 9000, udp=True),
            {"type": "expose", "local_port": 80, "public_port": 9000, "udp": True},
        ),
        (p.Exposed(80, 9000), {"type": "exposed", "local_port": 80, "public_port": 9000}),
        (
            p.Exposed(80, 9000, udp=True),
            {"type": "exposed", "local_port": 80, "public_port": 9000, "udp": True},
        ),
        (p.Unexpose(9000), {"type": "unexpose", "public_port": 9000}),
        (p.Route("a.example", 80), {"type": "route", "domain": "a.example", "local_port": 80}),
        (p.Routed("a.example", 80), {"type": "routed", "domain": "a.example", "local_port": 80}),
        (p.Unroute("a.example"), {"type": "unroute", "domain": "a.example"}),
        (p.Ping(), {"type": "ping"}),
        (p.Pong(), {"type": "pong"}),
        (p.Open(7, 80), {"type": "open", "s": 7, "local_port": 80}),
        (p.Data(7, b"hi"), {"type": "d", "s": 7, "b": b"hi"}),
        (p.End(7), {"type": "e", "s": 7}),
        (p.Abort(7), {"type": "x", "s": 7}),
        (p.Credit(7, 4096), {"type": "w", "s": 7, "n": 4096}),
        (
            p.Datagram(9000, ("10.0.0.1", 53), b"q"),
            {"type": "u", "p": 9000, "a": ["10.0.0.1", 53], "b": b"q"},
        ),
    ],
)
def test_the_wire_format_is_the_maps_of_before(message: p.Message, wire: dict[str, Any]) -> None:
    assert message.encode() == encode(wire)  # byte for byte: key order included
    assert p.decode(encode(wire)) == message


@pytest.mark.parametrize(
    ("wire", "kind", "stream"),
    [
        ({"type": "d", "s": 2, "b": "text, not bytes"}, "d", 2),
        ({"type": "w", "s": 3, "n": p.WINDOW + 1}, "w", 3),
        ({"type": "w", "s": 3, "n": 0}, "w", 3),
        ({"type": "e", "s": True}, "e", None),  # a bool is no stream id
        ({"type": "x", "s": -1}, "x", None),
        ({"type": "open", "s": 4, "local_port": 8000.0}, "open", 4),
        ({"type": "open", "s": 4, "local_port": 0}, "open", 4),
        ({"type": "expose", "local_port": 70000}, "expose", None),
        ({"type": "expose", "local_port": 80, "udp": 1}, "expose", None),
        ({"type": "expose", "local_port": 80, "public_port": "9000"}, "expose", None),
        ({"type": "route", "domain": "a" * 254, "local_port": 80}, "route", None),
        ({"type": "route", "local_port": 80}, "route", None),
        ({"type": "u", "p": "x", "a": "garbage", "b": 1}, "u", None),
        ({"type": "u", "p": 1, "a": ["h" * 65, 1], "b": b""}, "u", None),
        ({"type": "u", "p": 1, "a": ["h", 1], "b": b"x" * (p.MAX_DATAGRAM + 1)}, "u", None),
        ({"type": "hello", "key": "AAEC", "signature": "AAEC"}, "hello", None),
        ({"type": "hello", "key": "not base64!", "signature": ""}, "hello", None),
        ({"type": "challenge"}, "challenge", None),
        ({"type": "error", "message": "x" * 1025}, "error", None),
        ({"type": "newer"}, "newer", None),
        ({"type": 1}, None, None),
        ({}, None, None),
    ],
)
def test_malformed_messages_name_what_they_could(
    wire: dict[str, Any], kind: str | None, stream: int | None
) -> None:
    with pytest.raises(p.MessageError) as caught:
        p.parse(wire)
    assert (caught.value.kind, caught.value.stream) == (kind, stream)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x05\x80",  # shorter than its length
        encode({"type": "ping"}) + b"\x00",  # more than one frame
        encode({"type": "ping"}) * 2,
        (MAX_FRAME + 1).to_bytes(4, "big") + b"\x80" * (MAX_FRAME + 1),
        b"\x00\x00\x00\x01\xc1",  # msgpack's never-used byte
        b"\x00\x00\x00\x01\x90",  # a list, not a map
    ],
)
def test_anything_but_one_frame_is_refused(data: bytes) -> None:
    with pytest.raises(p.MessageError):
        p.decode(data)


def _valid_or_refused(data: object) -> None:
    try:
        message = p.parse(data)
    except p.MessageError:
        return
    assert p.parse(message.to_map()) == message


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
    | st.binary(max_size=80)
)
shapes = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
# Maps with real types and field names, so the fuzzing reaches every check of every message.
fields = st.sampled_from(
    [
        "nonce",
        "relay",
        "key",
        "signature",
        "node_id",
        "message",
        "code",
        "local_port",
        "public_port",
        "udp",
        "domain",
        "s",
        "b",
        "n",
        "p",
        "a",
    ]
)
near_messages = st.builds(
    lambda kind, rest: {"type": kind, **rest},
    st.sampled_from([*p.MessageType, "newer"]),
    st.dictionaries(fields, shapes | sids | ports | st.tuples(st.text(), ports), max_size=5),
)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_a_message_or_the_protocol_error(data: bytes) -> None:
    with contextlib.suppress(p.MessageError):
        p.decode(data)
    with contextlib.suppress(p.MessageError):
        p.decode(len(data).to_bytes(4, "big") + data)


@settings(max_examples=1000, deadline=None)
@given(shapes | near_messages)
def test_random_structures_give_a_message_or_the_protocol_error(data: object) -> None:
    _valid_or_refused(data)
    try:
        frame = msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):  # not msgpack-able (an int over 64 bits)
        return
    with contextlib.suppress(p.MessageError):
        p.decode(len(frame).to_bytes(4, "big") + frame)


@settings(max_examples=500, deadline=None)
@given(near_messages)
def test_valid_near_messages_keep_their_fields(data: dict[str, Any]) -> None:
    kind: object = None
    try:
        kind = p.parse(data).TYPE
    except p.MessageError as exc:
        kind = exc.kind
    assert data["type"] == kind


def test_the_challenge_binds_nonce_and_relay() -> None:
    assert p.challenge_message("n", "r") == b"p2prc-relay-v1\nn\nr"


def test_a_long_error_is_cut_to_what_decode_takes() -> None:
    message = p.decode(p.Error("x" * 5000, "invalid_request").encode())
    assert message == p.Error("x" * 1024, "invalid_request")
