"""Local ports that reach ports of a container, over its SSH session (like ``ssh -L``).

One SSH connection per container, as its user, with the host key pinned at creation; each
local listener forwards to ``127.0.0.1:PORT`` inside the container. The connection's
keepalive (see ``sftp.login``) notices a silent peer; a connection that drops ends
``Forwarding.wait`` with ``PeerUnreachable``, it is never hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ..config import join_address, resolve_home
from ..errors import AddressInUse, InvalidRequest, PeerUnreachable
from ..models import ContainerView, TrackedContainer
from .sftp import login, ssh_errors

__all__ = ["Forwarded", "Forwarding", "forward", "forward_ports", "parse_pair"]

LOOPBACK = "127.0.0.1"
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One local port and the container port it reaches."""

    bind: str
    local_port: int
    container: str
    port: int

    @property
    def local(self) -> str:
        return join_address(self.bind, self.local_port)

    @property
    def remote(self) -> str:
        return f"{self.container}:{self.port}"


def parse_pair(text: str) -> tuple[int, int]:
    """``PORT`` or ``LOCAL:PORT`` as ``(local, port)``; ``PORT`` alone listens on the same
    number here, ``0:PORT`` (or ``:PORT``) on any free one."""
    head, sep, tail = text.partition(":")
    local_text, port_text = (head or "0", tail) if sep else (head, head)
    try:
        local, port = int(local_text), int(port_text)
    except ValueError:
        raise InvalidRequest(f"{text!r}: expected PORT or LOCAL:PORT, as numbers") from None
    _check_ports(local, port)
    return local, port


def _check_ports(local: int, port: int) -> None:
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"container port {port} is not in 1-65535")
    if not 0 <= local <= 65535:
        raise InvalidRequest(f"local port {local} is not in 0-65535 (0: any free port)")


class Forwarding:
    """Listening local ports forwarded to one container over one SSH connection."""

    def __init__(
        self,
        view: ContainerView,
        conn: asyncssh.SSHClientConnection,
        forwards: list[Forwarded],
        listeners: list[asyncssh.SSHListener],
    ) -> None:
        self.view = view
        self.forwards = forwards
        self._conn = conn
        self._listeners = listeners
        self._closing = False

    def __repr__(self) -> str:
        pairs = ", ".join(f"{f.local} -> {f.remote}" for f in self.forwards)
        return f"<Forwarding {pairs} via {self.via}>"

    @property
    def via(self) -> str:
        """The SSH endpoint the bytes go through (a relay's port when the peer is behind NAT)."""
        ssh = self.view.ssh
        return f"ssh {ssh.user}@{ssh.host}:{ssh.port}"

    @property
    def local_port(self) -> int:
        """The first forward's local port (the one, when there is one)."""
        return self.forwards[0].local_port

    async def wait(self) -> None:
        """Return when the forwarding is closed here; ``PeerUnreachable`` when the SSH
        connection dropped first."""
        await self._conn.wait_closed()
        if not self._closing:
            raise PeerUnreachable(
                f"the SSH connection to container {self.view.id} ({self.via}) dropped; "
                "the forwarded ports are closed"
            )

    async def aclose(self) -> None:
        """Stop listening, close the connection and the forwarded connections with it."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        self._conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._conn.wait_closed()


def _view(target: ContainerView | TrackedContainer) -> ContainerView:
    return target.container if isinstance(target, TrackedContainer) else target


@contextlib.asynccontextmanager
async def forward_ports(
    target: ContainerView | TrackedContainer,
    pairs: Sequence[tuple[int, int]],
    bind: str = LOOPBACK,
    *,
    key_file: Path | None = None,
    proxy_command: Sequence[str] | None = None,
) -> AsyncIterator[Forwarding]:
    """Forward each ``(local_port, port)`` of ``pairs``: ``bind:local_port`` here reaches
    ``port`` inside the container (local port 0: any free one, see ``Forwarding.forwards``).

    ``key_file`` defaults to this home's node key; ``proxy_command`` carries the SSH
    connection (``direct.ssh.proxy_argv``: by the best path); ``PeerUnreachable`` when the
    container cannot be logged in to (a host key other than the pinned one included),
    ``AddressInUse`` when a local port is taken.
    """
    view = _view(target)
    if not pairs:
        raise InvalidRequest("nothing to forward: give at least one port")
    for local, port in pairs:
        _check_ports(local, port)
    key = key_file or resolve_home(None).identity_key
    conn = await login(view, key, proxy_command=proxy_command)
    forwards: list[Forwarded] = []
    listeners: list[asyncssh.SSHListener] = []
    forwarding = Forwarding(view, conn, forwards, listeners)
    try:
        for local, port in pairs:
            listener = await _listen(view, conn, bind, local, port)
            listeners.append(listener)
            forwards.append(Forwarded(bind, listener.get_port(), view.id, port))
        yield forwarding
    finally:
        await forwarding.aclose()


@contextlib.asynccontextmanager
async def forward(
    target: ContainerView | TrackedContainer,
    port: int,
    local_port: int = 0,
    bind: str = LOOPBACK,
    *,
    key_file: Path | None = None,
    proxy_command: Sequence[str] | None = None,
) -> AsyncIterator[Forwarding]:
    """``bind:local_port`` here reaching ``port`` inside the container, while in the block::

    async with forward(view, 8000) as fwd:
        httpx.get(f"http://127.0.0.1:{fwd.local_port}/")
    """
    pairs = [(local_port, port)]
    opened = forward_ports(target, pairs, bind, key_file=key_file, proxy_command=proxy_command)
    async with opened as forwarding:
        yield forwarding


async def _listen(
    view: ContainerView, conn: asyncssh.SSHClientConnection, bind: str, local: int, port: int
) -> asyncssh.SSHListener:
    where = join_address(bind, local)
    with ssh_errors(view, "forward a port to"):
        try:
            return await conn.forward_local_port(bind, local, LOOPBACK, port)
        except ConnectionError:
            raise
        except OSError as exc:  # this machine's side: the listening socket
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{where} is already in use on this machine") from None
            if exc.errno == errno.EACCES:
                raise InvalidRequest(
                    f"cannot listen on {where}: permission denied "
                    "(ports below 1024 need root here; pick another local port)"
                ) from None
            why = exc.strerror or str(exc)
            raise InvalidRequest(f"cannot listen on {where}: {why}") from None
