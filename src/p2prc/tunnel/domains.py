"""Domain names for routed mappings: validation, and the Host of an HTTP request. Sans-IO."""

from __future__ import annotations

import re

from ..errors import InvalidRequest, TunnelProtocolError

__all__ = ["MAX_HEAD", "normalize_domain", "request_host"]

# An HTTP request head larger than this is refused before routing.
MAX_HEAD = 16 * 1024
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain(name: str) -> str:
    """``name`` lower-cased without a trailing dot; ``InvalidRequest`` unless it is a host
    name of two or more labels (letters, digits, hyphens; IDNs in their ``xn--`` form)."""
    domain = name.strip().lower().removesuffix(".")
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise InvalidRequest(f"{name!r} is not a domain name like app.example.org")
    if labels[-1].isdigit():
        raise InvalidRequest(f"{name!r} is an address, not a domain name")
    return domain


def request_host(head: bytes) -> str:
    """The host of an HTTP/1.x request head (through its blank line), without a port."""
    lines = head.split(b"\r\n")
    if len(lines[0].split(b" ")) != 3 or not lines[0].split(b" ")[2].startswith(b"HTTP/1."):
        raise TunnelProtocolError("not an HTTP/1 request")
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"host":
            try:
                host = value.strip().decode("ascii").lower()
            except UnicodeDecodeError:
                raise TunnelProtocolError("Host header is not ASCII") from None
            if host.startswith("["):
                return host.partition("]")[0] + "]"
            return host.partition(":")[0].removesuffix(".")
    raise TunnelProtocolError("request without a Host header")
