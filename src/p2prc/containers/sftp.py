"""An SSH login to a container as its user, with the host key the peer's signed answer named.

Shared by the job runner and ``p2prc container cp``: an unknown or different host key is
refused, never learnt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import asyncssh

from ..errors import P2PRCError, PeerUnreachable
from ..models import ContainerView

__all__ = ["BLOCK", "CIPHERS", "REQUESTS", "login", "ssh_errors"]

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


async def login(view: ContainerView, key_file: Path) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``view``'s container; ``PeerUnreachable`` when it cannot be had."""
    ssh = view.ssh
    if not ssh.host_key:
        raise PeerUnreachable(
            f"container {view.id} came without an SSH host key; refusing to log in blind"
        )
    try:
        host_key = asyncssh.import_public_key(ssh.host_key)
        return await asyncssh.connect(
            ssh.host,
            ssh.port,
            username=ssh.user,
            client_keys=[str(key_file)],
            known_hosts=([host_key], [], []),
            agent_path=None,
            connect_timeout=CONNECT_TIMEOUT,
            keepalive_interval=15,
            keepalive_count_max=4,
            config=[],
            encryption_algs=CIPHERS,
        )
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
