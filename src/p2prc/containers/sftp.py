"""An SSH login to a container as its user, with the host key the peer's signed answer named.

Shared by the job runner, the cluster hub, ``p2prc container cp`` and ``forward``: an
unknown or different host key is refused, never learnt, whichever way the login goes (the
peer's direct path, a ProxyCommand, or the container's address).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ..errors import P2PRCError, PeerUnreachable
from ..models import ContainerView

__all__ = ["BLOCK", "CIPHERS", "REQUESTS", "Route", "login", "ssh_errors"]

log = logging.getLogger(__name__)

# A connected socket to a container's SSH by a better way than its address, or None.
Route = Callable[[ContainerView], Awaitable[socket.socket | None]]

CONNECT_TIMEOUT = 20.0
# SFTP transfers: bytes per request and requests in flight (OpenSSH's sftp-server takes
# up to 256 KiB a request); measured on loopback, see the report in the changelog.
BLOCK = 128 * 1024
REQUESTS = 64
# AES-GCM first: with AES-NI it moves bytes at about twice ChaCha20-Poly1305's speed here.
CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]


async def login(
    view: ContainerView,
    key_file: Path,
    *,
    route: Route | None = None,
    proxy_command: Sequence[str] | None = None,
) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``view``'s container; ``PeerUnreachable`` when it cannot be had.

    ``route`` (inside a node: ``direct.ssh.node_route``) gives a connected socket to the
    container's SSH over the peer's direct path, or ``None``: the login goes over it when
    it gives one, and to the view's address when it gives none or that login fails.
    ``proxy_command`` (the CLI's, ``direct.ssh.proxy_argv``) carries the login instead of a
    TCP connection to the address. The host key is the pinned one whichever way.
    """
    ssh = view.ssh
    if not ssh.host_key:
        raise PeerUnreachable(
            f"container {view.id} came without an SSH host key; refusing to log in blind"
        )
    try:
        host_key = asyncssh.import_public_key(ssh.host_key)
    except (asyncssh.Error, ValueError) as exc:
        raise PeerUnreachable(f"cannot log in to container {view.id}: {exc}") from None
    options: dict[str, Any] = {
        "username": ssh.user,
        "client_keys": [str(key_file)],
        "known_hosts": ([host_key], [], []),
        "agent_path": None,
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalive_interval": 15,
        "keepalive_count_max": 4,
        "config": [],
        "encryption_algs": CIPHERS,
    }
    sock = await route(view) if route is not None else None
    if sock is not None:
        try:
            return await asyncssh.connect(ssh.host, ssh.port, sock=sock, **options)
        except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
            sock.close()
            why = str(exc) or type(exc).__name__
            log.info("login to container %s over the direct path: %s; by address", view.id, why)
    if proxy_command is not None:
        options["proxy_command"] = list(proxy_command)
    try:
        return await asyncssh.connect(ssh.host, ssh.port, **options)
    except (asyncssh.Error, OSError, TimeoutError, ValueError) as exc:
        why = str(exc) or type(exc).__name__
        raise PeerUnreachable(f"cannot log in to container {view.id}: {why}") from None


@contextlib.contextmanager
def ssh_errors(view: ContainerView, doing: str) -> Iterator[None]:
    """SSH and transport failures while ``doing`` something to a container, as
    ``PeerUnreachable``; our own errors pass unchanged."""
    try:
        yield
    except P2PRCError:
        raise
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        why = str(exc) or type(exc).__name__
        raise PeerUnreachable(f"cannot {doing} container {view.id}: {why}") from None
