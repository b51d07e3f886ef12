"""The relay control protocol as named messages. Sans-IO.

One frozen dataclass per message; ``encode()`` gives its frame (``tunnel/frames.py``: a
length, then a msgpack map with a string ``type``), ``from_map`` checks one decoded map, and
``parse`` (a decoded map) or ``decode`` (the bytes of one frame) check any message: types,
ranges and sizes. Whatever a peer sends, they return a message or raise ``MessageError``,
never another exception; the error names the message type and stream id it could read, so a
receiver can abort just that stream or refuse just that request.

Handshake: the relay sends ``Challenge``; the client answers ``Hello`` (its key, and its
signature of ``challenge_message``); the relay answers ``Welcome`` or ``Error`` and closes.
Then the client asks ``Expose``/``Route`` (answered ``Exposed``/``Routed`` or ``Error``),
tells ``Unexpose``/``Unroute``, and pings (``Ping``/``Pong``); the relay opens streams
(``Open``), which both sides carry as ``Data``, ``End``, ``Abort`` and ``Credit``
(``tunnel/mux.py``), and UDP rides as ``Datagram`` both ways (``tunnel/udp.py``).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..config import join_address, split_address
from ..errors import TunnelProtocolError
from ..identity import b64decode, b64encode
from .frames import MAX_FRAME, FrameDecoder
from .frames import encode as encode_frame

__all__ = [
    "MAX_DATAGRAM",
    "STREAM_TYPES",
    "WINDOW",
    "Abort",
    "Challenge",
    "Credit",
    "Data",
    "Datagram",
    "End",
    "Error",
    "Expose",
    "Exposed",
    "Hello",
    "Message",
    "MessageError",
    "MessageType",
    "Open",
    "Ping",
    "Pong",
    "Route",
    "Routed",
    "StreamMessage",
    "Unexpose",
    "Unroute",
    "Welcome",
    "challenge_message",
    "decode",
    "parse",
    "parse_endpoint",
]

# A stream's first window: bytes that may be in flight (sent, not yet written out by the
# other side) before it grows (``tunnel/mux.py``); also the most one ``w`` frame grants.
WINDOW = 512 * 1024
# A datagram payload larger than this is dropped (a frame holds at most 64 KiB).
MAX_DATAGRAM = 60_000
# Stream ids are the relay's counter from 1; 2**63 connections outlast any relay.
_MAX_STREAM = 2**63 - 1
# Text fields: node ids are 32 hex digits, nonces 32; domains at most 253 characters.
_MAX_ID = 128
_MAX_DOMAIN = 253
_MAX_TEXT = 1024  # an error's message (the relay sends at most a line)
_MAX_HOST = 64  # an IP address, v4 or v6, as text
_KEY_BYTES, _SIGNATURE_BYTES = 32, 64  # Ed25519
_HEADER = struct.Struct(">I")


def challenge_message(nonce: str, relay_id: str) -> bytes:
    """What a tunnel client signs to prove its key to a relay."""
    return f"p2prc-relay-v1\n{nonce}\n{relay_id}".encode()


class MessageError(Exception):
    """A peer's frame is no valid message; ``kind`` and ``stream``: what could be read."""

    def __init__(self, reason: str, kind: str | None = None, stream: int | None = None) -> None:
        super().__init__(reason)
        self.kind, self.stream = kind, stream


class MessageType(enum.StrEnum):
    """The ``type`` of each message on the wire."""

    CHALLENGE = "challenge"
    HELLO = "hello"
    WELCOME = "welcome"
    ERROR = "error"
    EXPOSE = "expose"
    EXPOSED = "exposed"
    UNEXPOSE = "unexpose"
    ROUTE = "route"
    ROUTED = "routed"
    UNROUTE = "unroute"
    PING = "ping"
    PONG = "pong"
    OPEN = "open"
    DATA = "d"
    END = "e"
    ABORT = "x"
    CREDIT = "w"
    DATAGRAM = "u"


# Frames that belong to a stream (``Mux.dispatch``).
STREAM_TYPES = frozenset({MessageType.DATA, MessageType.END, MessageType.ABORT, MessageType.CREDIT})


def _int(data: Mapping[str, object], key: str, low: int, high: int) -> int:
    value = data.get(key)
    if type(value) is not int or not low <= value <= high:  # bool is no int here
        raise MessageError(f"{key!r} must be an integer {low}-{high}")
    return value


def _str(data: Mapping[str, object], key: str, most: int) -> str:
    value = data.get(key)
    if not isinstance(value, str) or len(value) > most:
        raise MessageError(f"{key!r} must be text of at most {most} characters")
    return value


def _bytes(data: Mapping[str, object], key: str, most: int) -> bytes:
    value = data.get(key)
    if not isinstance(value, bytes) or len(value) > most:
        raise MessageError(f"{key!r} must be bytes, at most {most}")
    return value


def _flag(data: Mapping[str, object], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise MessageError(f"{key!r} must be true or false")
    return value


def _key(data: Mapping[str, object], key: str, size: int) -> bytes:
    try:
        raw = b64decode(_str(data, key, 2 * size))
    except ValueError:
        raise MessageError(f"{key!r} is not base64url") from None
    if len(raw) != size:
        raise MessageError(f"{key!r} must be {size} bytes")
    return raw


# Twins on purpose: each message below spells out its own to_map / from_map, so the wire
# format and the type and size check of every field stand in one place per message.
class _Message:
    __slots__ = ()
    TYPE: ClassVar[MessageType]

    def to_map(self) -> dict[str, Any]:
        """The map that goes on the wire."""
        return {"type": self.TYPE.value}

    def encode(self) -> bytes:
        """The frame of this message."""
        return encode_frame(self.to_map())

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        """The message in a decoded map of its type; ``MessageError`` when malformed."""
        return cls()


@dataclass(frozen=True, slots=True)
class Challenge(_Message):
    """Relay: sign this nonce for me (``challenge_message``)."""

    TYPE = MessageType.CHALLENGE
    nonce: str
    relay: str

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "nonce": self.nonce, "relay": self.relay}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_str(data, "nonce", _MAX_ID), _str(data, "relay", _MAX_ID))


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """Client: my Ed25519 key (raw) and its signature of the challenge."""

    TYPE = MessageType.HELLO
    key: bytes
    signature: bytes

    def to_map(self) -> dict[str, Any]:
        return {
            "type": self.TYPE.value,
            "key": b64encode(self.key),
            "signature": b64encode(self.signature),
        }

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_key(data, "key", _KEY_BYTES), _key(data, "signature", _SIGNATURE_BYTES))


def parse_endpoint(text: str) -> tuple[str, int]:
    """An ``ip:port`` or ``[v6]:port`` with an IP literal (no name) and a port 1-65535."""
    try:
        host, port = split_address(text, 0)
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MessageError(f"{text[:_MAX_HOST]!r} is no ip:port") from None
    if port == 0:
        raise MessageError(f"{text[:_MAX_HOST]!r} has no port")
    return address.compressed, port


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    """Relay: you are in, as ``node_id``; ``observed``: the address your connection came
    from, as the relay saw it (your NAT's public side; optional, a newer relay's hint)."""

    TYPE = MessageType.WELCOME
    node_id: str
    observed: tuple[str, int] | None = None

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE.value, "node_id": self.node_id}
        if self.observed is not None:
            out["observed"] = join_address(*self.observed)
        return out

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        observed = None
        if "observed" in data:
            observed = parse_endpoint(_str(data, "observed", _MAX_HOST + 8))
        return cls(_str(data, "node_id", _MAX_ID), observed)


@dataclass(frozen=True, slots=True)
class Error(_Message):
    """Relay: a request refused, or the connection refused (then it closes)."""

    TYPE = MessageType.ERROR
    message: str
    code: str | None = None  # a ``P2PRCError.code``; none: a ``TunnelError``

    def to_map(self) -> dict[str, Any]:
        text = self.message[:_MAX_TEXT]  # what decode takes: a long error still arrives
        if self.code is None:
            return {"type": self.TYPE.value, "message": text}
        return {"type": self.TYPE.value, "code": self.code, "message": text}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        code = _str(data, "code", _MAX_ID) if "code" in data else None
        return cls(_str(data, "message", _MAX_TEXT), code)


@dataclass(frozen=True, slots=True)
class Expose(_Message):
    """Client: publish my ``local_port`` (TCP, or UDP), on ``public_port`` if it is free."""

    TYPE = MessageType.EXPOSE
    local_port: int
    public_port: int | None = None
    udp: bool = False

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE.value, "local_port": self.local_port}
        if self.public_port:
            out["public_port"] = self.public_port
        if self.udp:
            out["udp"] = True
        return out

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        public = _int(data, "public_port", 1, 65535) if "public_port" in data else None
        return cls(_int(data, "local_port", 1, 65535), public, _flag(data, "udp"))


@dataclass(frozen=True, slots=True)
class Exposed(_Message):
    """Relay: ``local_port`` is public on ``public_port``."""

    TYPE = MessageType.EXPOSED
    local_port: int
    public_port: int
    udp: bool = False

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.TYPE.value,
            "local_port": self.local_port,
            "public_port": self.public_port,
        }
        if self.udp:
            out["udp"] = True
        return out

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        ports = (_int(data, "local_port", 1, 65535), _int(data, "public_port", 1, 65535))
        return cls(*ports, _flag(data, "udp"))


@dataclass(frozen=True, slots=True)
class Unexpose(_Message):
    """Client: stop serving ``public_port`` (TCP or UDP)."""

    TYPE = MessageType.UNEXPOSE
    public_port: int

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "public_port": self.public_port}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_int(data, "public_port", 1, 65535))


@dataclass(frozen=True, slots=True)
class _DomainPort(_Message):
    domain: str
    local_port: int

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "domain": self.domain, "local_port": self.local_port}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_str(data, "domain", _MAX_DOMAIN), _int(data, "local_port", 1, 65535))


@dataclass(frozen=True, slots=True)
class Route(_DomainPort):
    """Client: send ``domain``'s HTTP and TLS connections to my ``local_port``."""

    TYPE = MessageType.ROUTE


@dataclass(frozen=True, slots=True)
class Routed(_DomainPort):
    """Relay: ``domain`` now goes to ``local_port``."""

    TYPE = MessageType.ROUTED


@dataclass(frozen=True, slots=True)
class Unroute(_Message):
    """Client: release ``domain``."""

    TYPE = MessageType.UNROUTE
    domain: str

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "domain": self.domain}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_str(data, "domain", _MAX_DOMAIN))


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    """Client: are you there (a heartbeat)?"""

    TYPE = MessageType.PING


@dataclass(frozen=True, slots=True)
class Pong(_Message):
    """Relay: yes."""

    TYPE = MessageType.PONG


@dataclass(frozen=True, slots=True)
class Open(_Message):
    """Relay: stream ``s`` is a connection for your ``local_port``."""

    TYPE = MessageType.OPEN
    s: int
    local_port: int

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "s": self.s, "local_port": self.local_port}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_int(data, "s", 0, _MAX_STREAM), _int(data, "local_port", 1, 65535))


@dataclass(frozen=True, slots=True)
class Data(_Message):
    """Bytes of stream ``s``."""

    TYPE = MessageType.DATA
    s: int
    b: bytes

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "s": self.s, "b": self.b}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_int(data, "s", 0, _MAX_STREAM), _bytes(data, "b", MAX_FRAME))


@dataclass(frozen=True, slots=True)
class _StreamOnly(_Message):
    s: int

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "s": self.s}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_int(data, "s", 0, _MAX_STREAM))


@dataclass(frozen=True, slots=True)
class End(_StreamOnly):
    """Stream ``s`` sends no more (half-close)."""

    TYPE = MessageType.END


@dataclass(frozen=True, slots=True)
class Abort(_StreamOnly):
    """Stream ``s`` is over, both ways."""

    TYPE = MessageType.ABORT


@dataclass(frozen=True, slots=True)
class Credit(_Message):
    """Stream ``s`` may send ``n`` bytes more."""

    TYPE = MessageType.CREDIT
    s: int
    n: int

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "s": self.s, "n": self.n}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        return cls(_int(data, "s", 0, _MAX_STREAM), _int(data, "n", 1, WINDOW))


@dataclass(frozen=True, slots=True)
class Datagram(_Message):
    """A UDP datagram of public port ``p``, from or to the remote address ``a``."""

    TYPE = MessageType.DATAGRAM
    p: int
    a: tuple[str, int]
    b: bytes

    def to_map(self) -> dict[str, Any]:
        return {"type": self.TYPE.value, "p": self.p, "a": [self.a[0], self.a[1]], "b": self.b}

    @classmethod
    def from_map(cls, data: Mapping[str, object]) -> Self:
        address = data.get("a")
        if not isinstance(address, list | tuple) or len(address) != 2:
            raise MessageError("'a' must be [host, port]")
        host = _str({"host": address[0]}, "host", _MAX_HOST)
        port = _int({"port": address[1]}, "port", 0, 65535)
        return cls(_int(data, "p", 1, 65535), (host, port), _bytes(data, "b", MAX_DATAGRAM))


Message = (
    Challenge
    | Hello
    | Welcome
    | Error
    | Expose
    | Exposed
    | Unexpose
    | Route
    | Routed
    | Unroute
    | Ping
    | Pong
    | Open
    | Data
    | End
    | Abort
    | Credit
    | Datagram
)

# What ``Mux.dispatch`` takes.
StreamMessage = Data | End | Abort | Credit

_CLASSES: tuple[type[Message], ...] = (
    Challenge,
    Hello,
    Welcome,
    Error,
    Expose,
    Exposed,
    Unexpose,
    Route,
    Routed,
    Unroute,
    Ping,
    Pong,
    Open,
    Data,
    End,
    Abort,
    Credit,
    Datagram,
)
_BY_TYPE: dict[str, type[Message]] = {cls.TYPE.value: cls for cls in _CLASSES}


def parse(data: object) -> Message:
    """The message in one decoded frame (a map); ``MessageError`` unless it is valid."""
    if not isinstance(data, dict):
        raise MessageError("a message must be a map")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise MessageError("a message needs a string 'type'")
    cls = _BY_TYPE.get(kind)
    if cls is None:
        raise MessageError(f"unknown message type {kind[:32]!r}", kind)
    sid = data.get("s")
    stream = sid if type(sid) is int and 0 <= sid <= _MAX_STREAM else None
    try:
        return cls.from_map(data)
    except MessageError as exc:
        raise MessageError(f"{cls.__name__} message: {exc}", kind, stream) from None


def decode(data: bytes) -> Message:
    """The message in the bytes of exactly one frame; ``MessageError`` unless it is valid."""
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[0] != len(data) - _HEADER.size:
        raise MessageError("not exactly one frame")
    try:
        (body,) = FrameDecoder().feed(data)
    except TunnelProtocolError as exc:
        raise MessageError(str(exc)) from None
    return parse(body)
