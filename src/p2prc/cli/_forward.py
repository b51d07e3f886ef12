"""``p2prc forward``: local ports that reach ports of a container (over its SSH) or of a peer
(through this node, by the best path: direct when one is up), until Ctrl-C or SIGTERM."""

import asyncio
import ipaddress
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._client_async import AsyncClient
from ..client import Client
from ..containers.store import pick_tracked
from ..direct.models import ForwardEvent
from ..direct.ssh import proxy_argv
from ..errors import ContainerNotFound, InvalidRequest, PeerNotFound, PeerProtocolError
from ..models import TrackedContainer
from ._common import Options, emit, err, options_of

if TYPE_CHECKING:  # containers.forward (asyncssh) is imported when a forward starts
    from ..containers.forward import Forwarding

__all__ = ["forward_command", "forward_container"]


def forward_container(
    options: Options, target: str, ports: list[str], local: int | None, bind: str
) -> None:
    """Forward local ports to ports of a tracked container until interrupted."""
    from ..containers.forward import parse_pair

    pairs = [parse_pair(text) for text in ports]
    if local is not None:
        if len(pairs) != 1 or ":" in ports[0]:
            raise InvalidRequest("--local goes with one plain PORT; else write LOCAL:PORT")
        pairs = [parse_pair(f"{local}:{pairs[0][1]}")]
    with Client(home=options.home) as client:
        tracked = client.tracked()
    try:
        item = pick_tracked(tracked, target)
    except ContainerNotFound:  # no container by that name: a peer's own ports
        item = None
    if not _loopback(bind):
        err.print(
            f"warning: listening on {bind or '*'}: anyone who can reach this machine "
            "at that address can use the forwarded ports",
            markup=False,
        )
    if item is None:
        try:
            asyncio.run(_until_stopped(_forward_peer(options, target, pairs, bind)))
        except PeerNotFound as error:  # neither: the command's first meaning answers
            raise ContainerNotFound(
                f"no container or peer named {target!r}; see 'p2prc container list' "
                "and 'p2prc peers list'"
            ) from error
    else:
        asyncio.run(_until_stopped(_forward_container(options, item, pairs, bind)))


def _loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


async def _forward_container(
    options: Options, item: TrackedContainer, pairs: list[tuple[int, int]], bind: str
) -> None:
    from ..containers.forward import forward_ports

    key = options.home.identity_key
    # By the best path: the node's direct path to the peer when up, else the address.
    proxy = proxy_argv(options.home.path, item.container)
    async with forward_ports(item, pairs, bind, key_file=key, proxy_command=proxy) as forwarding:
        _announce(options, item, forwarding)
        await forwarding.wait()  # PeerUnreachable when the connection drops


async def _forward_peer(
    options: Options, peer: str, pairs: list[tuple[int, int]], bind: str
) -> None:
    """Each pair is a forward the node runs while this command reads its answer."""
    async with AsyncClient(home=options.home) as client:

        async def one(local: int, port: int) -> None:
            body = {"peer": peer, "port": port, "local": local, "bind": bind}
            async for line in client.post_ndjson("/paths/forward", body, unbounded=True):
                try:
                    event = ForwardEvent.model_validate_json(line)
                except ValueError:
                    raise PeerProtocolError(f"the node answered {line[:80]!r}") from None
                if event.event == "listening":
                    path = f"relay via {event.via[:8]}" if event.via else event.path
                    data = {**event.model_dump(exclude={"event", "connections"}), "name": peer}
                    text = f"forwarding {event.local} -> {peer}:{port} (path now: {path})"
                    emit(options, data, text)
            raise PeerProtocolError("the node ended the forward")

        try:
            async with asyncio.TaskGroup() as group:
                for local, port in pairs:
                    group.create_task(one(local, port))
        except* Exception as failed:  # the first one's error, as it came
            raise failed.exceptions[0] from None


async def _until_stopped(work: Coroutine[Any, Any, None]) -> None:
    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        main.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    try:
        await work
    except asyncio.CancelledError:
        if not stopping:
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    err.print("stopped forwarding", markup=False)


def _announce(options: Options, item: TrackedContainer, forwarding: "Forwarding") -> None:
    name = item.container.name or item.container.id
    for one in forwarding.forwards:
        data = {
            "local": one.local,
            "remote": f"{name}:{one.port}",
            "container": one.container,
            "port": one.port,
            "local_port": one.local_port,
            "via": forwarding.via,
        }
        emit(options, data, f"forwarding {one.local} -> {name}:{one.port} (via {forwarding.via})")


def forward_command(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            help="A tracked container's name or id prefix; else a peer (name or id prefix)."
        ),
    ],
    ports: Annotated[
        list[str],
        typer.Argument(
            help="PORT (the same number here) or LOCAL:PORT (0:PORT: any free port here).",
            show_default=False,
        ),
    ],
    local: Annotated[
        int | None,
        typer.Option("--local", min=0, max=65535, help="Local port for one PORT; 0: any free."),
    ] = None,
    bind: Annotated[
        str, typer.Option("--bind", help="Local address; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
) -> None:
    """Forward local ports to ports of a container you created (over its SSH) or of a peer
    (its published ports and your containers' there, by the best path), like ssh -L."""
    forward_container(options_of(ctx), target, ports, local, bind)
