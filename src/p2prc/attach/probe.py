"""Probing a host before it is attached: its address, an SSH banner, its host key, and its
specs over SSH with the gateway's node key. Each failure is ``AttachFailed`` (or
``InvalidRequest`` for input that is no address), except specs: a refused login is no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import re
import socket
from typing import Any

import asyncssh
from cryptography.hazmat.primitives import serialization

from ..errors import AttachFailed, InvalidRequest, PeerProtocolError
from ..identity import Identity
from .records import check_host_key

__all__ = ["check_ssh", "host_key", "reachable", "read_specs", "resolve_host"]

log = logging.getLogger(__name__)

_BANNER_TIMEOUT = 5.0
_RESOLVE_TIMEOUT = 5.0
_SPECS_TIMEOUT = 10.0
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")
_SPECS = "uname -m; uname -s; nproc; awk '/^MemTotal:/ {print $2}' /proc/meminfo"


async def read_specs(
    identity: Identity, address: str, port: int, user: str, pinned: str, connect_timeout: float
) -> dict[str, Any]:
    """CPU architecture, OS, cores and memory over SSH, logging in with ``identity``'s key
    and the pinned host key; empty when the host does not let it in (never an error)."""
    key = asyncssh.import_private_key(
        identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    try:
        async with asyncio.timeout(_SPECS_TIMEOUT):
            async with asyncssh.connect(
                address,
                port,
                username=user or _local_user(),
                client_keys=[key],
                known_hosts=([asyncssh.import_public_key(pinned)], [], []),
                agent_path=None,
                config=[],
                connect_timeout=connect_timeout,
            ) as connection:
                result = await connection.run(_SPECS, check=False, timeout=_SPECS_TIMEOUT)
    except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
        log.info("no specs for %s:%d: %s", address, port, exc or type(exc).__name__)
        return {}
    return _parse_specs(result.stdout if isinstance(result.stdout, str) else "")


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


async def resolve_host(host: str) -> list[str]:
    """IP literals for ``host``: itself, or a DNS name's addresses resolved now (within 5 s,
    at most four, in the resolver's order)."""
    text = host.strip().removeprefix("[").removesuffix("]")
    try:
        addresses = [ipaddress.ip_address(text)]
    except ValueError:
        addresses = []
    if not addresses:
        if not _HOSTNAME.match(text):
            raise InvalidRequest(f"{host!r} is neither an IP address nor a DNS name")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):
                infos = await loop.getaddrinfo(text, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise AttachFailed(f"cannot resolve {text!r}: {exc or 'timed out'}") from None
        found = dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos)
        addresses = [ipaddress.ip_address(address) for address in list(found)[:4]]
        if not addresses:
            raise AttachFailed(f"cannot resolve {text!r}")
    usable = [a for a in addresses if not (a.is_unspecified or a.is_multicast)]
    if not usable or "%" in text:
        raise InvalidRequest(f"{host!r} is not a unicast address")
    return [str(address) for address in usable]


async def reachable(addresses: list[str], port: int, connect_timeout: float) -> str:
    """The first of ``addresses`` where an SSH server answers on ``port``; else the first
    address's failure (``AttachFailed``)."""
    first: AttachFailed | None = None
    for address in addresses:
        try:
            await check_ssh(address, port, connect_timeout)
        except AttachFailed as exc:
            first = first or exc
            continue
        return address
    raise first or AttachFailed("no address to try")


async def check_ssh(address: str, port: int, connect_timeout: float) -> None:
    """A TCP connection within ``connect_timeout`` and an SSH banner within 5 s."""
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(address, port)
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise AttachFailed(f"cannot reach {where}: {why}") from None
    try:
        async with asyncio.timeout(_BANNER_TIMEOUT):
            for _ in range(8):  # RFC 4253: lines before the banner are allowed
                line = await reader.readuntil(b"\n")
                if line.startswith(b"SSH-"):
                    return
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    raise AttachFailed(f"{where} is not an SSH server (no SSH banner within 5 s)")


async def host_key(address: str, port: int, connect_timeout: float) -> str:
    """The host's SSH host key as an OpenSSH line (``type base64``)."""
    where = f"{address}:{port}"
    try:
        async with asyncio.timeout(connect_timeout + _BANNER_TIMEOUT):
            key = await asyncssh.get_server_host_key(address, port)
    except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
        raise AttachFailed(f"cannot read the host key of {where}: {exc or 'timed out'}") from None
    if key is None:
        raise AttachFailed(f"{where} offered no host key")
    line = " ".join(key.export_public_key("openssh").decode().split()[:2])
    try:
        return check_host_key(line)
    except PeerProtocolError as exc:
        raise AttachFailed(f"{where}: unusable host key: {exc}") from None


def _parse_specs(text: str) -> dict[str, Any]:
    lines = [line.strip() for line in text.splitlines()[:4]]
    if len(lines) != 4:
        return {}
    arch, os_, cores, memory = lines
    specs: dict[str, Any] = {}
    word = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
    if word.match(arch):
        specs["arch"] = arch
    if word.match(os_):
        specs["os"] = os_
    if cores.isdigit() and 0 < int(cores) < 1 << 20:
        specs["cores"] = int(cores)
    if memory.isdigit() and len(memory) < 16:
        specs["memory"] = int(memory) * 1024
    return specs
