"""SSH to a container over the best path: the peer's direct path when one is up, else the
container's address (the peer's own, or its relay's for a NAT'd peer), as before.

Inside a node, ``node_route`` is the ``route`` of ``containers.sftp.login`` (jobs, cluster
hubs): a ``port N`` stream over ``node.paths`` as a socket, ``N`` the SSH port the view
names (the peer maps a relay port of its container back to the container's host port,
``paths.container_port``). From the CLI, ``proxy_argv`` is the ProxyCommand of ``ssh`` and
asyncssh (``container ssh``, ``cp``, ``forward CONTAINER``): ``python -m p2prc.direct.ssh``
asks this home's node for a forward to the port (``POST /paths/forward``, held while the
session lasts) and pipes stdio over it when the node says the path is direct; with no node
running, no direct path or no answer in ``ASK_TIMEOUT`` seconds it connects to the address
itself. Either way the host key is checked by the SSH client against the pinned one.

ssh starts the ProxyCommand for every connection: this module imports only what that needs
at the top (the client and the paths come in when used).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Home, resolve_home
from ..errors import P2PRCError, PeerUnreachable

if TYPE_CHECKING:
    import socket

    from ..containers.sftp import Route
    from ..models import ContainerView
    from .paths import Paths

__all__ = ["ASK_TIMEOUT", "main", "node_route", "proxy_argv", "proxy_command", "run_proxy"]

# Seconds the ProxyCommand waits for this home's node to answer before going by address.
ASK_TIMEOUT = 5.0
# Seconds for a TCP connection to the container's address.
CONNECT_TIMEOUT = 20.0
# Seconds the container's sshd has for its banner over the direct path.
BANNER_TIMEOUT = 10.0
# Bytes read at once.
CHUNK = 64 * 1024

log = logging.getLogger(__name__)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# -- inside the node ----------------------------------------------------------------------


def node_route(paths: Callable[[], Paths]) -> Route:
    """``login``'s route over the node's direct paths (``paths`` raises ``RuntimeError``
    while they do not run): a socket when the view's peer has a path up, else ``None``.
    Each use touches the peer, so a first login starts an attempt for the next one."""

    async def route(view: ContainerView) -> socket.socket | None:
        try:
            found = paths()
        except RuntimeError:
            return None
        found.touch(view.peer)
        return await found.open_socket(view.peer, "port", view.ssh.port)

    return route


# -- the CLI's ProxyCommand ---------------------------------------------------------------


def proxy_argv(home: Path, view: ContainerView) -> list[str]:
    """The ProxyCommand for ``view``'s SSH (an argument list, for asyncssh)."""
    ssh = view.ssh
    return [
        sys.executable,
        "-m",
        "p2prc.direct.ssh",
        "--home",
        str(home),
        view.peer,
        str(ssh.port),
        ssh.host,
    ]


def proxy_command(home: Path, view: ContainerView) -> str:
    """``proxy_argv`` as one ``ssh -o ProxyCommand=`` value (shell-quoted, % kept)."""
    # ssh expands %-tokens in ProxyCommand before the shell sees it: keep ours literal.
    return shlex.join(proxy_argv(home, view)).replace("%", "%%")


@contextlib.asynccontextmanager
async def _over_node(
    home: Home, peer: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None]:
    """A stream to ``port`` of ``peer`` through this home's node while it says the path
    is direct (the node's forward lasts as long as the block), and the first bytes the far
    end sent; ``None`` otherwise. An SSH server speaks first (its banner): a stream that
    ends before a byte came (the peer refused the port: an older node, a port it does not
    know) or says nothing in ``BANNER_TIMEOUT`` is no stream, and the caller goes by
    address while nothing has been sent yet."""
    from .._client_async import AsyncClient  # here: the client is the heaviest import
    from .models import ForwardEvent

    loop = asyncio.get_running_loop()
    listening: asyncio.Future[ForwardEvent] = loop.create_future()

    async def ask() -> None:
        async with AsyncClient(home=home) as client:
            body = {"peer": peer, "port": port}
            async for line in client.post_ndjson("/paths/forward", body, unbounded=True):
                event = ForwardEvent.model_validate_json(line)
                if event.event == "listening" and not listening.done():
                    listening.set_result(event)

    task = asyncio.ensure_future(ask())
    task.add_done_callback(lambda done: _settle(done, listening))
    stream: Stream | None = None
    first = b""
    try:
        try:
            event = await asyncio.wait_for(asyncio.shield(listening), ASK_TIMEOUT)
        except (P2PRCError, ValueError, OSError, TimeoutError) as exc:
            log.debug("no forward from the node: %s", exc)
            event = None
        if event is not None and event.path == "direct":
            host, _, at = event.local.rpartition(":")
            with contextlib.suppress(OSError, ValueError, TimeoutError):
                stream = await asyncio.open_connection(host, int(at))
                first = await asyncio.wait_for(stream[0].read(CHUNK), BANNER_TIMEOUT)
        if stream is not None and first:
            yield (*stream, first)
        else:
            yield None
    finally:
        if stream is not None:
            stream[1].close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if listening.done() and not listening.cancelled():
            listening.exception()  # seen: an error after the wait gave up is no news


def _settle(task: asyncio.Future[None], listening: asyncio.Future[Any]) -> None:
    """The ask ended before ``listening``: its error (or a plain end) answers the wait."""
    if listening.done() or task.cancelled():
        if not listening.done():
            listening.cancel()
        return
    error = task.exception()
    if isinstance(error, Exception):
        listening.set_exception(error)
    else:
        listening.set_exception(PeerUnreachable("the node ended the forward"))


async def run_proxy(home: Home, peer: str, port: int, host: str) -> str:
    """Pipe this process's stdin and stdout to ``port`` of ``peer``'s container: over the
    node's direct path when it has one, else to ``host:port``. Which way went: the answer
    (``direct`` or ``address``)."""
    from ..tunnel.streams import stdio_pipe

    async with _over_node(home, peer, port) as stream:
        if stream is not None:
            reader, writer, first = stream  # the banner, read to know the stream took
            await stdio_pipe(reader, writer, first)
            return "direct"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise PeerUnreachable(f"cannot connect to {host} port {port}: {why}") from None
    await stdio_pipe(reader, writer)
    return "address"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2prc.direct.ssh",
        description="The ProxyCommand of p2prc container ssh: a container's SSH by the best path.",
    )
    parser.add_argument("--home", type=Path, default=None, help="the node's home")
    parser.add_argument("peer", help="the hosting node's id")
    parser.add_argument("port", type=int, help="the container's SSH port in its view")
    parser.add_argument("host", help="the container's SSH host in its view (the fallback)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error("port must be 1-65535")
    from ..tunnel.streams import proxy_main

    return proxy_main(run_proxy(resolve_home(args.home), args.peer, args.port, args.host))


if __name__ == "__main__":
    sys.exit(main())
