"""The signed record a gateway publishes for each host it attaches. Sans-IO.

An ``AttachedRecord`` says: gateway ``gateway`` (a node id, with its key) reaches the host
``name`` whose SSH host key is ``host_key``, on ``ssh_port`` and the extra ``ports``, through
its attach listener at ``endpoint``. It is signed by the gateway over
``b"p2prc-attached-v1" + msgpack(body)``; only that gateway can change it, by signing a higher
``version`` (milliseconds, as peer records). The host's LAN address is never in it.

Everything decoded is checked for type and size before use (at most ``MAX_ATTACHED_BYTES``
encoded); anything else raises ``PeerProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from ..errors import PeerProtocolError
from ..identity import Identity, node_id_of, verify_signature
from ..peers.records import VERSION_BOUND, ip_literal

__all__ = [
    "CONTEXT",
    "HOST_KEY_TYPES",
    "MAX_ATTACHED_BYTES",
    "MAX_HOST_KEY",
    "MAX_PORTS",
    "NAME",
    "USER",
    "AttachedRecord",
    "check_endpoint",
    "check_host_key",
    "check_ports",
    "decode_attached",
]

CONTEXT = b"p2prc-attached-v1"
MAX_ATTACHED_BYTES = 1100
MAX_HOST_KEY = 1024
MAX_PORTS = 16
HOST_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
    }
)
# The peer-name rules: attached names and peer names share one namespace.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# A POSIX (portable) user name, or empty: the SSH client's default.
USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
_TEXT = re.compile(r"^[A-Za-z0-9._ /()+-]{0,64}$")
_FIELDS = 14
_SIGNATURE = 64


def _packb(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


@dataclass(frozen=True, slots=True)
class AttachedRecord:
    """What one gateway says about one host it reaches."""

    name: str
    gateway: str
    gateway_key: bytes
    version: int
    host_key: str
    ssh_port: int = 22
    user: str = ""
    ports: tuple[int, ...] = ()
    endpoint: str = ""
    cores: int = 0
    memory: int = 0
    arch: str = ""
    os: str = ""
    signature: bytes = b""

    def body(self) -> list[Any]:
        """The signed fields, in a fixed order."""
        return [
            self.name,
            self.gateway,
            self.gateway_key,
            self.version,
            self.host_key,
            self.ssh_port,
            self.user,
            list(self.ports),
            self.endpoint,
            self.cores,
            self.memory,
            self.arch,
            self.os,
        ]

    def encode(self) -> bytes:
        return _packb([*self.body(), self.signature])

    def signed(self, identity: Identity) -> AttachedRecord:
        """This record, checked and signed by ``identity`` (the gateway's own)."""
        if identity.node_id != self.gateway or identity.public_key != self.gateway_key:
            raise ValueError("a gateway signs only its own attached records")
        _check_fields(self)
        record = replace(self, signature=identity.sign(CONTEXT + _packb(self.body())))
        if len(record.encode()) > MAX_ATTACHED_BYTES:
            raise ValueError(f"attached record is larger than {MAX_ATTACHED_BYTES} bytes")
        return record

    def verify(self) -> None:
        """``PeerProtocolError`` unless well-formed and signed by its gateway's key."""
        _check_fields(self)
        if node_id_of(self.gateway_key) != self.gateway:
            raise PeerProtocolError("attached record's gateway does not match its key")
        try:
            verify_signature(self.gateway_key, self.signature, CONTEXT + _packb(self.body()))
        except Exception:
            raise PeerProtocolError("attached record signature does not verify") from None

    @property
    def all_ports(self) -> tuple[int, ...]:
        """The SSH port, then the extra ports: every port the gateway forwards to."""
        return (self.ssh_port, *self.ports)


def check_host_key(value: Any) -> str:
    """An OpenSSH public key line ``type base64`` (no comment) of an allowed type."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_HOST_KEY:
        raise PeerProtocolError("bad host key: expected an OpenSSH public key line")
    kind, _, data = value.partition(" ")
    if kind not in HOST_KEY_TYPES or not data or " " in data:
        raise PeerProtocolError(f"bad host key: type must be one of {sorted(HOST_KEY_TYPES)}")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise PeerProtocolError("bad host key: not base64") from None
    if len(blob) < 4:
        raise PeerProtocolError("bad host key: too short")
    (size,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + size] != kind.encode() or len(blob) <= 4 + size:
        raise PeerProtocolError("bad host key: its data is not a key of that type")
    return value


def check_ports(ssh_port: Any, ports: Any) -> tuple[int, ...]:
    """The extra ports: sorted, unique, 1-65535, at most ``MAX_PORTS``, not the SSH port."""
    _port(ssh_port, "ssh_port")
    if not isinstance(ports, (list, tuple)) or len(ports) > MAX_PORTS:
        raise PeerProtocolError(f"bad ports: at most {MAX_PORTS}")
    checked = tuple(_port(port, "port") for port in ports)
    if list(checked) != sorted(set(checked)) or ssh_port in checked:
        raise PeerProtocolError("bad ports: must be sorted, unique and not the SSH port")
    return checked


def check_endpoint(value: Any) -> str:
    """``host:port`` (``[v6]:port``) with an IP literal host, or empty."""
    if not isinstance(value, str) or len(value) > 80:
        raise PeerProtocolError("bad endpoint")
    if not value:
        return value
    host, _, port = value.rpartition(":")
    v6 = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if v6 else host
    ip_literal(bare, "endpoint")
    if v6 != (":" in bare) or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise PeerProtocolError("bad endpoint")
    return value


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise PeerProtocolError(f"bad {what}: must be 1-65535")
    return value


def _int(value: Any, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < high:
        raise PeerProtocolError(f"bad {what}")
    return value


def _text(value: Any, pattern: re.Pattern[str], what: str, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise PeerProtocolError(f"bad {what}")
    if value and not pattern.match(value):
        raise PeerProtocolError(f"bad {what}")
    return value


def _check_fields(record: AttachedRecord) -> None:
    _text(record.name, NAME, "name", empty=False)
    if (
        not isinstance(record.gateway, str)
        or len(record.gateway) != 32
        or record.gateway.strip("0123456789abcdef")
    ):
        raise PeerProtocolError("bad gateway: expected a node id")
    if not isinstance(record.gateway_key, bytes) or len(record.gateway_key) != 32:
        raise PeerProtocolError("bad gateway key")
    _int(record.version, VERSION_BOUND, "version")
    check_host_key(record.host_key)
    check_ports(record.ssh_port, record.ports)
    _text(record.user, USER, "user")
    check_endpoint(record.endpoint)
    _int(record.cores, 1 << 20, "cores")
    _int(record.memory, VERSION_BOUND, "memory")
    _text(record.arch, _TEXT, "arch")
    _text(record.os, _TEXT, "os")
    if not isinstance(record.signature, bytes) or len(record.signature) not in (0, _SIGNATURE):
        raise PeerProtocolError("bad signature field")


def decode_attached(data: bytes) -> AttachedRecord:
    """A verified record from its encoding; ``PeerProtocolError`` on anything else."""
    if not isinstance(data, bytes) or len(data) > MAX_ATTACHED_BYTES:
        raise PeerProtocolError(f"attached record larger than {MAX_ATTACHED_BYTES} bytes")
    try:
        fields = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=MAX_ATTACHED_BYTES
        )
    except Exception as exc:
        raise PeerProtocolError(f"undecodable attached record: {type(exc).__name__}") from None
    if not isinstance(fields, list) or len(fields) != _FIELDS:
        raise PeerProtocolError("attached record has the wrong shape")
    ports = fields[7]
    if not isinstance(ports, list):
        raise PeerProtocolError("bad ports")
    signature = fields[13]
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE:
        raise PeerProtocolError("bad signature field")
    record = AttachedRecord(
        name=fields[0],
        gateway=fields[1],
        gateway_key=fields[2],
        version=fields[3],
        host_key=fields[4],
        ssh_port=fields[5],
        user=fields[6],
        ports=tuple(ports),
        endpoint=fields[8],
        cores=fields[9],
        memory=fields[10],
        arch=fields[11],
        os=fields[12],
        signature=signature,
    )
    record.verify()
    return record
