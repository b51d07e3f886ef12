"""Pinned SSH host keys of tracked containers, kept in the home's ``known_hosts``.

Each container is known under its own ``HostKeyAlias`` (``p2prc-<id>``): host ports are
reused by later containers, so an address never names a key. A pinned alias has exactly
one line; ``ssh`` then runs with ``StrictHostKeyChecking=yes``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import atomic_write

__all__ = ["alias", "is_pinned", "pin", "unpin"]


def alias(container_id: str) -> str:
    """The name a container's host key is known under."""
    return f"p2prc-{container_id}"


def pin(known_hosts: Path, name: str, key: str) -> None:
    """Make ``key`` (``ssh-ed25519 <base64>``) the one key known for ``name``."""
    wanted = f"{name} {key}"
    with _locked(known_hosts):
        lines = _read(known_hosts)
        if [line for line in lines if _names(line, name)] == [wanted]:
            return
        kept = [line for line in lines if not _names(line, name)]
        _write(known_hosts, [*kept, wanted])


def unpin(known_hosts: Path, name: str) -> None:
    """Forget every key known for ``name``."""
    with _locked(known_hosts):
        lines = _read(known_hosts)
        kept = [line for line in lines if not _names(line, name)]
        if kept != lines:
            _write(known_hosts, kept)


def is_pinned(known_hosts: Path, name: str, key: str) -> bool:
    """Whether ``key`` is the one key known for ``name``."""
    return [line for line in _read(known_hosts) if _names(line, name)] == [f"{name} {key}"]


def _names(line: str, name: str) -> bool:
    """Whether a known_hosts line is about ``name`` (plain or hashed, any marker)."""
    fields = line.split()
    if fields and fields[0].startswith("@"):
        fields = fields[1:]
    if not fields or line.lstrip().startswith("#"):
        return False
    return any(_matches(pattern, name) for pattern in fields[0].split(","))


def _matches(pattern: str, name: str) -> bool:
    if not pattern.startswith("|1|"):
        return pattern == name
    try:  # |1|base64(salt)|base64(HMAC-SHA1(salt, name))
        salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _write(path: Path, lines: list[str]) -> None:
    atomic_write(path, "".join(f"{line}\n" for line in lines).encode(), mode=0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (the node and the CLI share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
