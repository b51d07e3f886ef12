"""The ``p2prc`` command: parse, call the node or the client, print.

Modern subcommands, each with the global ``--json``; the original P2PRC flags
are accepted as aliases, with one or two leading dashes as the original allowed.
Each feature's commands live in their own module and are registered here.
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..client import Client
from ..errors import InvalidRequest, P2PRCError
from ._common import Options, emit, err, options_of, out
from ._containers import (
    bootstrap_images,
    build_image,
    container_app,
    create_container,
    images,
    list_containers,
    remove_container,
)
from ._node import config_app, config_show, init, interfaces_command, specs, start, status, stop
from ._peers import add_peer, list_peers, meta_app, peers_app, set_metadata, sync_peers
from ._plugins import (
    create_group,
    delete_group,
    group_app,
    list_groups,
    list_plugins,
    plugin_app,
    pull_plugin,
    remove_plugin,
    run_plugin,
    show_or_change_group,
)

__all__ = ["app", "main"]

# Single-dash long flags of the original CLI, rewritten to two dashes before parsing.
_LEGACY_FLAGS = frozenset(
    [
        "ls",
        "as",
        "us",
        "arn",
        "specs",
        "touch",
        "gpu",
        "cn",
        "bi",
        "rm",
        "id",
        "vi",
        "tc",
        "dc",
        "vc",
        "ni",
        "vp",
        "plugin",
        "pp",
        "rp",
        "cgroup",
        "group",
        "rmcgroup",
        "rmgroup",
        "groups",
        "amd",
        "mp",
        "dn",
        "ra",
        "gen",
        "mod",
        "udp",
        "ip",
    ]
)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="p2prc: pool machines into a peer-to-peer compute network.",
)
for command in (init, start, status, stop, specs):
    app.command()(command)
app.command("interfaces")(interfaces_command)
app.add_typer(config_app, name="config")
app.add_typer(container_app, name="container")
app.add_typer(peers_app, name="peers")
app.add_typer(meta_app, name="meta")
app.add_typer(group_app, name="group")


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
        str | None, typer.Option("--remote", help="Ask this peer to map its own port.")
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
) -> None:
    """Stop publishing a port."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        client.unmap_port(port, udp=udp)
    emit(options, {"unmapped": port}, f"unmapped {port}")


def _map_port(
    options: Options, port: int, domain: str | None, remote: str | None, *, udp: bool = False
) -> None:
    from ._peers import resolve

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
    tag: Annotated[str | None, typer.Option("--tag", help="build: the image's name.")] = None,
) -> None:
    """Images a peer offers (the original --vi).

    'images bootstrap' builds the default image; 'images build --dockerfile DIR --tag T'
    builds your own and offers it to peers (they pick it with --image).
    """
    if peer == "bootstrap":
        bootstrap_images(options_of(ctx), offline=offline, force=force)
    elif peer == "build":
        if dockerfile is None or tag is None:
            raise InvalidRequest("images build needs --dockerfile DIR and --tag NAME")
        build_image(options_of(ctx), dockerfile, tag)
    else:
        images(options_of(ctx), peer)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    home: Annotated[
        Path | None, typer.Option("--home", help="Node home (default: $P2PRC_HOME).")
    ] = None,
    version: Annotated[bool, typer.Option("--version", "-v", help="Print the version.")] = False,
    server: Annotated[bool, typer.Option("-s", "--Server", help="Legacy: start.")] = False,
    specs_addr: Annotated[
        str | None, typer.Option("--specs", "--Specification", help="Legacy: specs ADDR.")
    ] = None,
    ni: Annotated[bool, typer.Option("--ni", "--NetworkInterfaces", help="Legacy.")] = False,
    vc: Annotated[bool, typer.Option("--vc", "--ViewConfig", help="Legacy.")] = False,
    dc: Annotated[bool, typer.Option("--dc", "--SetDefaultConfig", help="Legacy.")] = False,
    touch: Annotated[
        str | None, typer.Option("--touch", "--CreateVM", help="Legacy: container create ADDR.")
    ] = None,
    ports: Annotated[int, typer.Option("-p", "--Ports", min=0, help="Legacy: with --touch.")] = 0,
    gpu: Annotated[bool, typer.Option("--gpu", "--UseGpu", help="Legacy: with --touch.")] = False,
    cn: Annotated[str | None, typer.Option("--cn", "--ContainerName", help="Legacy.")] = None,
    bi: Annotated[str | None, typer.Option("--bi", "--BaseImage", help="Legacy.")] = None,
    rm: Annotated[
        str | None, typer.Option("--rm", "--RemoveVM", help="Legacy: container rm (ADDR --id ID).")
    ] = None,
    container_id: Annotated[str | None, typer.Option("--id", "--ID", help="Legacy.")] = None,
    tc: Annotated[bool, typer.Option("--tc", "--TrackedContainers", help="Legacy.")] = False,
    vi: Annotated[str | None, typer.Option("--vi", "--ViewImages", help="Legacy.")] = None,
    ls: Annotated[bool, typer.Option("--ls", "--ListServers", help="Legacy: peers list.")] = False,
    add_server: Annotated[
        str | None, typer.Option("--as", "--AddServer", help="Legacy: peers add IP (-p PORT).")
    ] = None,
    arn: Annotated[bool, typer.Option("--arn", "--AddRootNode", help="Legacy: --ip -p.")] = False,
    ip: Annotated[
        str | None, typer.Option("--ip", "--IPAddress", help="Legacy: with --arn.")
    ] = None,
    us: Annotated[bool, typer.Option("--us", "--UpdateServerList", help="Legacy: sync.")] = False,
    amd: Annotated[str | None, typer.Option("--amd", "--AddMetaData", help="Legacy.")] = None,
    cgroup: Annotated[bool, typer.Option("--cgroup", "--CreateGroup", help="Legacy.")] = False,
    group: Annotated[str | None, typer.Option("--group", "--Group", help="Legacy.")] = None,
    rmcgroup: Annotated[
        bool, typer.Option("--rmcgroup", "--RemoveContainerGroup", help="Legacy.")
    ] = False,
    rmgroup: Annotated[
        str | None, typer.Option("--rmgroup", "--RemoveGroup", help="Legacy.")
    ] = None,
    groups: Annotated[bool, typer.Option("--groups", "--Groups", help="Legacy.")] = False,
    vp: Annotated[bool, typer.Option("--vp", "--ViewPlugins", help="Legacy.")] = False,
    pp: Annotated[str | None, typer.Option("--pp", "--PullPlugin", help="Legacy.")] = None,
    rp: Annotated[str | None, typer.Option("--rp", "--RemovePlugin", help="Legacy.")] = None,
    plugin: Annotated[
        str | None, typer.Option("--plugin", "--ExecutePlugin", help="Legacy.")
    ] = None,
    gen: Annotated[
        str | None, typer.Option("--gen", "--Generate", help="Legacy: generate.")
    ] = None,
    mp: Annotated[int | None, typer.Option("--mp", "--MAPPort", help="Legacy: map-port.")] = None,
    dn: Annotated[str | None, typer.Option("--dn", "--DomainName", help="Legacy.")] = None,
    ra: Annotated[str | None, typer.Option("--ra", "--RemoteAddress", help="Legacy.")] = None,
    udp: Annotated[bool, typer.Option("--udp", help="Legacy: with --mp, a UDP port.")] = False,
    mod: Annotated[
        str | None, typer.Option("--mod", "--ModuleName", help="Legacy: with --gen.")
    ] = None,
) -> None:
    options = options_of(ctx)
    options.json, options.debug, options.home_arg = json_output, debug, home
    if version:
        emit(options, {"version": __version__}, f"p2prc {__version__}")
        raise typer.Exit()
    legacy: list[tuple[bool, Callable[[], None]]] = [
        (dc, lambda: init(ctx)),
        (vc, lambda: config_show(ctx)),
        (ni, lambda: interfaces_command(ctx)),
        (specs_addr is not None, lambda: specs(ctx, specs_addr)),
        (vi is not None, lambda: images(options, str(vi))),
        (add_server is not None, lambda: add_peer(options, _with_port(str(add_server), ports))),
        (arn, lambda: _legacy_root(options, ip, ports)),
        (us, lambda: sync_peers(options)),
        (amd is not None, lambda: set_metadata(options, str(amd))),
        (ls, lambda: list_peers(options)),
        (
            touch is not None,
            lambda: create_container(options, str(touch), ports=ports, gpu=gpu, name=cn, image=bi),
        ),
        (rm is not None, lambda: _legacy_remove(options, container_id)),
        (cgroup, lambda: create_group(options)),
        (
            group is not None,
            lambda: show_or_change_group(options, str(group), container_id, rmcgroup),
        ),
        (rmgroup is not None, lambda: delete_group(options, str(rmgroup))),
        (groups, lambda: list_groups(options)),
        (vp, lambda: list_plugins(options)),
        (pp is not None, lambda: pull_plugin(options, str(pp))),
        (rp is not None, lambda: remove_plugin(options, str(rp))),
        (plugin is not None, lambda: _legacy_plugin(options, str(plugin), container_id)),
        (mp is not None, lambda: _map_port(options, int(mp or 0), dn, ra, udp=udp)),
        (gen is not None, lambda: _generate(options, str(gen), mod, Path("."))),
        (tc, lambda: list_containers(options)),
        (server, lambda: start(ctx)),
    ]
    ran = False
    for wanted, action in legacy:
        if wanted:
            action()
            ran = True
    if ran:
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


def _with_port(host: str, port: int) -> str:
    if port and ":" not in host:
        return f"{host}:{port}"
    return host


def _legacy_root(options: Options, ip: str | None, port: int) -> None:
    if not ip or not port:
        raise InvalidRequest("--arn needs --ip IP and -p PORT")
    add_peer(options, _with_port(ip, port))


def _legacy_plugin(options: Options, name: str, target: str | None) -> None:
    if not target:
        raise InvalidRequest("provide the container or group id with --id")
    run_plugin(options, name, target, [])


def _legacy_remove(options: Options, container_id: str | None) -> None:
    if not container_id:
        raise InvalidRequest("provide the container id with --id")
    remove_container(options, container_id)


def _normalise_legacy(argv: list[str]) -> list[str]:
    return [f"-{arg}" if arg[:1] == "-" and arg[1:] in _LEGACY_FLAGS else arg for arg in argv]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(message, markup=False)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``p2prc`` console script."""
    args = _normalise_legacy(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # Standalone mode: click prints usage errors itself and exits with code 2.
        app(args=args, prog_name="p2prc")
    except P2PRCError as exc:
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        _fail("Interrupted.", 130)
