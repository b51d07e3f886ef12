"""The ``p2prc`` command: parse, call the node or the client, print.

Modern subcommands, each with the global ``--json``; the original P2PRC flags
are accepted as aliases, with one or two leading dashes as the original allowed.
Each feature's commands live in their own module and are registered here.
"""

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..client import Client
from ..errors import InvalidRequest, P2PRCError
from ._attach import attach_command, attached_command, detach_command
from ._cluster import cluster_app
from ._common import Options, emit, err, options_of, out
from ._containers import bootstrap_images, build_image, container_app, images
from ._doctor import doctor_command
from ._forward import forward_command
from ._install import install_node_command
from ._jobs import jobs_app, run_command
from ._legacy import LEGACY, normalise, translate
from ._node import config_app, init, interfaces_command, specs, start, status, stop
from ._peers import meta_app, peers_app
from ._plugins import group_app, plugin_app
from ._ssh import (
    SSH_SETTINGS,
    is_attached,
    map_attached_port,
    ssh_command,
    unmap_attached_port,
)
from ._trust import id_command, invite_command, join_command, trust_app
from ._ui import ui_command

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="p2prc: pool machines into a peer-to-peer compute network.",
)
for command in (init, start, status, stop, specs):
    app.command()(command)
app.command("interfaces")(interfaces_command)
app.command("doctor")(doctor_command)
app.add_typer(config_app, name="config")
app.add_typer(container_app, name="container")
app.add_typer(peers_app, name="peers")
app.add_typer(meta_app, name="meta")
app.add_typer(group_app, name="group")
app.command("run")(run_command)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.command("forward")(forward_command)
app.command("attach")(attach_command)
app.command("detach")(detach_command)
app.command("attached")(attached_command)
app.command("ssh", context_settings=SSH_SETTINGS)(ssh_command)
app.command("install-node")(install_node_command)
app.add_typer(trust_app, name="trust")
app.command("id")(id_command)
app.command("invite")(invite_command)
app.command("join")(join_command)
app.command("ui")(ui_command)


@app.command("map-port")
def map_port_command(
    ctx: typer.Context,
    port: Annotated[int, typer.Argument(min=1, max=65535, help="Local port.")],
    domain: Annotated[
        str | None,
        typer.Option(
            "--domain",
            "--dn",
            help="Route this domain (HTTP Host, TLS SNI) to the port on the relay.",
        ),
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote", help="Ask this peer to map its own port, or an attached host's gateway."
        ),
    ] = None,
    udp: Annotated[bool, typer.Option("--udp", help="A UDP port instead of TCP.")] = False,
) -> None:
    """Publish a local port: on this node if public, else through a relay (original --mp)."""
    _map_port(options_of(ctx), port, domain, remote, udp=udp)


@app.command("mappings")
def mappings_command(ctx: typer.Context) -> None:
    """This node's published ports: local port, public address, relay, domain."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        mapped = client.mappings()
    rows = [m.model_dump(by_alias=True) for m in mapped]
    lines = [
        f"{m.local_port}/{'udp' if m.udp else 'tcp'} -> {m.entire_address}"
        + (f"  {m.domain}" if m.domain else "")
        + (f"  via relay {m.relay[:12]}" if m.relay else "")
        for m in mapped
    ]
    emit(options, rows, "\n".join(lines) or "no published ports")


@app.command("unmap")
def unmap_command(
    ctx: typer.Context,
    port: int,
    udp: Annotated[bool, typer.Option("--udp", help="The UDP mapping of the port.")] = False,
    remote: Annotated[
        str | None, typer.Option("--remote", help="A port of this attached host (its gateway).")
    ] = None,
) -> None:
    """Stop publishing a port."""
    options = options_of(ctx)
    if remote is not None:
        unmap_attached_port(options, remote, port)
        return
    with Client(home=options.home) as client:
        client.unmap_port(port, udp=udp)
    emit(options, {"unmapped": port}, f"unmapped {port}")


def _map_port(
    options: Options, port: int, domain: str | None, remote: str | None, *, udp: bool = False
) -> None:
    from ._peers import resolve

    if remote and is_attached(options, remote):  # a host reached through its gateway
        map_attached_port(options, remote, port, domain, udp=udp)
        return
    target = resolve(options, remote) if remote else None
    with Client(target, home=options.home) as client:
        mapped = client.map_port(port, domain, udp=udp)
    data = mapped.model_dump(by_alias=True, include={"ip_address", "port_no", "entire_address"})
    data["domain"] = mapped.domain
    data["udp"] = mapped.udp
    human = mapped.entire_address + (f"  (domain {mapped.domain})" if mapped.domain else "")
    emit(options, data, human)


@app.command("generate")
def generate_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Project (and directory) name.")],
    module: Annotated[str | None, typer.Option("--module", "--mod", help="Python module.")] = None,
    directory: Annotated[Path, typer.Option("--dir", help="Where to create it.")] = Path("."),
) -> None:
    """Write a new Python project that embeds a p2prc node (the original --gen)."""
    _generate(options_of(ctx), name, module, directory)


def _generate(options: Options, name: str, module: str | None, directory: Path) -> None:
    from .._generate import generate

    root = generate(name, module, directory)
    emit(options, {"project": str(root)}, f"created {root}; next: cd {root} && pip install -e .")


app.add_typer(plugin_app, name="plugin")


@app.command("images")
def images_command(
    ctx: typer.Context,
    peer: Annotated[str, typer.Argument(help="host:port of a peer, or 'bootstrap'.")],
    offline: Annotated[
        bool | None,
        typer.Option("--offline/--pull", help="bootstrap: debootstrap, or pull the base."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="bootstrap: rebuild.")] = False,
    dockerfile: Annotated[
        Path | None, typer.Option("--dockerfile", help="build: directory with a Dockerfile.")
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="build, bootstrap --packages: the image's name.")
    ] = None,
    packages: Annotated[
        str | None,
        typer.Option("--packages", help="bootstrap: extra Debian packages, a,b (offline)."),
    ] = None,
    dask: Annotated[
        bool,
        typer.Option("--dask", help="bootstrap: the Dask image too (this Python's versions)."),
    ] = False,
) -> None:
    """Images a peer offers (the original --vi).

    'images bootstrap' builds the default image; 'images bootstrap --offline --packages
    povray --tag lab/render:1' builds one with extra Debian packages; 'images bootstrap
    --dask' also the Dask image for 'p2prc cluster'; 'images build
    --dockerfile DIR --tag T' builds your own. Peers pick an offered image with --image.
    """
    if peer == "bootstrap":
        bootstrap_images(
            options_of(ctx), offline=offline, force=force, packages=packages, tag=tag, dask=dask
        )
    elif peer == "build":
        if dockerfile is None or tag is None:
            raise InvalidRequest("images build needs --dockerfile DIR and --tag NAME")
        build_image(options_of(ctx), dockerfile, tag)
    else:
        images(options_of(ctx), peer)


@app.command("help")
def help_command(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Argument(help="'legacy': the original flags.")] = None,
) -> None:
    """Show help; 'p2prc help legacy' lists the original P2PRC flags and their commands."""
    options = options_of(ctx)
    if topic is None:
        out.print(ctx.find_root().get_help())
        return
    if topic != "legacy":
        raise InvalidRequest(f"no help topic {topic!r}; try 'p2prc help legacy'")
    rows = [{"flag": ", ".join(f.names), "value": f.value, "command": f.becomes} for f in LEGACY]
    human = "\n".join(
        f"{(row['flag'] + ' ' + row['value']).strip():42} {row['command']}" for row in rows
    )
    emit(options, rows, human)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    home: Annotated[
        Path | None, typer.Option("--home", help="Node home (default: $P2PRC_HOME).")
    ] = None,
    version: Annotated[bool, typer.Option("--version", "-v", help="Print the version.")] = False,
) -> None:
    """Global options may also follow any subcommand; original flags: 'p2prc help legacy'."""
    options = options_of(ctx)
    options.json, options.debug, options.home_arg = json_output, debug, home
    if version:
        emit(options, {"version": __version__}, f"p2prc {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


_normalise_legacy = normalise


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(message, markup=False)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``p2prc`` console script."""
    raw = sys.argv[1:] if argv is None else argv
    debug = "--debug" in raw
    try:
        args = translate(raw)
        # Standalone mode: click prints usage errors itself and exits with code 2.
        app(args=args, prog_name="p2prc")
    except P2PRCError as exc:
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        _fail("Interrupted.", 130)
