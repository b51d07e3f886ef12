"""``p2prc install-node user@host``: a p2prc node on a machine given only SSH."""

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from ._common import emit, err, options_of

__all__ = ["install_node_command"]


def install_node_command(
    ctx: typer.Context,
    destination: Annotated[str, typer.Argument(help="user@host (or host: your user name).")],
    start: Annotated[
        bool, typer.Option("--start", help="Keep it running (user systemd, else a supervisor).")
    ] = False,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the node installed there; install nothing.")
    ] = False,
    ssh_port: Annotated[int, typer.Option("--ssh-port", min=1, max=65535)] = 22,
    identity: Annotated[
        Path | None, typer.Option("-i", "--identity", help="SSH private key (default: yours).")
    ] = None,
    directory: Annotated[
        str, typer.Option("--dir", help="Where it goes there (venv and node home).")
    ] = "~/.p2prc-node",
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Its API port.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Its peer name.")] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="The address it listens on (default all).")
    ] = None,
    python: Annotated[
        str, typer.Option("--python", help="The Python there (3.11+ with venv).")
    ] = "python3",
    wheels: Annotated[
        list[Path] | None,
        typer.Option("--wheels", help="A directory of wheels for its platform (repeatable)."),
    ] = None,
) -> None:
    """Install p2prc over SSH, join it to this network (trusted both ways), optionally start it.

    The machine needs Python 3.11+ with venv; otherwise reach it with 'p2prc attach'.
    """
    options = options_of(ctx)
    from ..install.remote import InstallRequest, install_node, stop_node  # asyncssh: on use

    request = InstallRequest(
        destination=destination, ssh_port=ssh_port, identity_file=identity,
        directory=directory, port=port, name=name, listen=listen, start=start,
        python=python, wheel_dirs=list(wheels or []),
    )  # fmt: skip

    def say(line: str) -> None:
        err.print(line, markup=False)

    if stop:
        stopped = asyncio.run(stop_node(request, options.home, say))
        emit(options, stopped, f"stopped the node in {stopped['directory']} on {stopped['host']}")
        return
    node = asyncio.run(install_node(request, options.home, say))
    kept = {
        "systemd": "kept running by systemd --user",
        "supervised": f"kept running by a supervisor (pid {node.pid})",
        "stopped": "not running (install-node --start keeps it running)",
    }[node.service]
    human = "\n".join(
        [
            f"node {node.name} ({node.node_id}) at {node.api}",
            f"installed in {node.directory} on {node.host}; {kept}",
            f"joined {node.joined}: both nodes trust each other",
        ]
    )
    emit(options, node, human)
