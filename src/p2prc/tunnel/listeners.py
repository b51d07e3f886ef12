"""Which addresses a local TCP port listens on, from Linux's ``/proc/net/tcp{,6}``.

A peer may publish only a port that the network could reach anyway, never one bound to
loopback alone (an admin panel, a database); this module answers that question. The
parser is sans-IO: ``listening_addresses`` takes the tables' text.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

__all__ = ["listening_addresses", "loopback_only", "read_listening"]

_LISTEN = "0A"
_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def listening_addresses(table: str, port: int) -> list[Address]:
    """The local addresses of the LISTEN sockets on ``port`` in one ``/proc/net/tcp*`` text."""
    found: list[Address] = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN:
            continue
        host, _, port_hex = fields[1].partition(":")
        try:
            if int(port_hex, 16) == port:
                found.append(_address(host))
        except ValueError:
            continue  # a line we do not understand is not a listener we can vouch for
    return found


def _address(text: str) -> Address:
    """A ``/proc/net/tcp*`` address: 32-bit words in host (little-endian) byte order."""
    if len(text) not in (8, 32):
        raise ValueError(f"bad address {text!r}")
    raw = b"".join(bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, len(text), 8))
    return ipaddress.ip_address(raw)


def loopback_only(addresses: list[Address]) -> bool:
    """Whether every address is a loopback one (IPv4-mapped ones included)."""
    return bool(addresses) and all(
        (a.ipv4_mapped or a).is_loopback if isinstance(a, ipaddress.IPv6Address) else a.is_loopback
        for a in addresses
    )


def read_listening(port: int) -> list[Address] | None:
    """The addresses ``port`` listens on here; ``None`` where the tables cannot be read."""
    found: list[Address] = []
    try:
        for path in _TABLES:
            if path.exists():
                found.extend(listening_addresses(path.read_text(), port))
            elif path.name == "tcp":
                return None
    except OSError:
        return None
    return found
