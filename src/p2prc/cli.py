"""The ``p2prc`` command: parse, call the node or the client, print.

Modern subcommands, each with the global ``--json``; the original P2PRC flags
(``-s``, ``--specs ADDR``, ``--ni``, ``--vc``, ``--dc``) are accepted as aliases,
with one or two leading dashes as the original allowed.
"""

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from . import __version__
from .client import Client, local_api_url
from .config import Home, import_original, load, resolve_home, set_value
from .errors import NodeNotRunning, P2PRCError
from .models import NodeStatus, Specs
from .node import Node, init_home
from .specs import collect_specs, interfaces

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
config_app = typer.Typer(help="Show and change this node's config.toml.")
app.add_typer(config_app, name="config")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Options:
    """Global options, shared by every command."""

    json: bool = False
    debug: bool = False
    home_arg: Path | None = None

    @property
    def home(self) -> Home:
        return resolve_home(self.home_arg)


def _options(ctx: typer.Context) -> Options:
    root = ctx.find_root()
    if not isinstance(root.obj, Options):
        root.obj = Options()
    return root.obj


def _emit(options: Options, data: Any, human: Any = None) -> None:
    """Print ``data`` as JSON with --json, else ``human`` (or a plain rendering)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if options.json:
        # One compact line per result, so scripts can read results as JSON Lines.
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    elif human is not None:
        out.print(human)
    else:
        out.print(json.dumps(data, indent=2))


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
) -> None:
    options = _options(ctx)
    options.json, options.debug, options.home_arg = json_output, debug, home
    if version:
        _emit(options, {"version": __version__}, f"p2prc {__version__}")
        raise typer.Exit()
    legacy: list[tuple[bool, Callable[[], None]]] = [
        (dc, lambda: init(ctx)),
        (vc, lambda: config_show(ctx)),
        (ni, lambda: interfaces_command(ctx)),
        (specs_addr is not None, lambda: specs(ctx, specs_addr)),
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


@app.command()
def init(ctx: typer.Context) -> None:
    """Create this node's home (config, identity, state); never replaces anything."""
    options = _options(ctx)
    config, identity = init_home(options.home)
    data = {"home": str(options.home.path), "name": config.name, "node_id": identity.node_id}
    _emit(options, data, f"home {data['home']}\nnode {config.name} ({identity.node_id})")


@app.command()
def start(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", min=0, max=65535, help="API port (0: any free port)."),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    options = _options(ctx)
    config, identity = init_home(options.home)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    node = Node(config, options.home, identity=identity, host=host, port=port)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(node, options))


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(node: Node, options: Options) -> None:
    loop = asyncio.get_running_loop()
    async with node:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.close)
        ready = {"node_id": node.identity.node_id, "name": node.config.name, "api": node.api_url}
        _emit(options, ready, f"p2prc node {ready['name']} ({ready['node_id']}) at {ready['api']}")
        await node.wait_closed()


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the running node of this home."""
    options = _options(ctx)
    with Client(home=options.home) as client:
        result = client.status()
    _emit(options, result, _status_table(result))


def _status_table(status: NodeStatus) -> Table:
    table = Table(show_header=False, box=None)
    for key in ("name", "node_id", "api", "version", "trust_mode", "uptime_s"):
        table.add_row(key, str(getattr(status, key)))
    table.add_row("addresses", ", ".join(status.addresses))
    return table


@app.command()
def stop(ctx: typer.Context) -> None:
    """Stop the running node of this home."""
    options = _options(ctx)
    pid = _runtime_pid(options.home)
    with Client(home=options.home) as client:
        client.shutdown()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _emit(options, {"stopped": True}, "stopped")


def _runtime_pid(home: Home) -> int | None:
    local_api_url(home)  # raises NodeNotRunning when there is no runtime file
    try:
        return int(json.loads(home.runtime_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
def specs(
    ctx: typer.Context,
    peer: Annotated[
        str | None, typer.Argument(help="host:port of a node; default: this one.")
    ] = None,
) -> None:
    """CPU, memory, disk and GPUs of a node (the original --specs)."""
    options = _options(ctx)
    result = _specs_of(options.home, peer)
    _emit(options, result, _specs_table(result))


def _specs_of(home: Home, peer: str | None) -> Specs:
    if peer is not None:
        with Client(peer, home=home) as client:
            return client.specs()
    try:
        with Client(home=home) as client:
            return client.specs()
    except NodeNotRunning:
        return collect_specs(home.path if home.path.exists() else Path.home())


def _specs_table(result: Specs) -> Table:
    gib = 1024**3
    table = Table(show_header=False, box=None)
    table.add_row("hostname", result.hostname)
    table.add_row("os", f"{result.os.distribution or result.os.system} ({result.os.machine})")
    table.add_row("cpu", f"{result.cpu.model}, {result.cpu.cores} cores")
    table.add_row("memory", f"{result.memory.total / gib:.1f} GiB")
    table.add_row("disk free", f"{result.disk.free / gib:.1f} GiB")
    gpus = ", ".join(gpu.name for gpu in result.gpus) or "none"
    table.add_row("gpus", gpus)
    return table


@app.command("interfaces")
def interfaces_command(ctx: typer.Context) -> None:
    """This machine's network interfaces and addresses (the original --ni)."""
    options = _options(ctx)
    rows = interfaces()
    table = Table("interface", "family", "address", "netmask", box=None)
    for row in rows:
        table.add_row(row["interface"], row["family"], row["address"], row["netmask"])
    _emit(options, rows, table)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the config (TOML; JSON with --json)."""
    options = _options(ctx)
    init_home(options.home)
    config = load(options.home)
    if options.json:
        _emit(options, config)
    else:
        out.print(options.home.config_file.read_text(), end="", markup=False)


@config_app.command("set")
def config_set(ctx: typer.Context, key: str, value: str) -> None:
    """Set one key, e.g. 'port 9000' or 'trust.mode open'; the file is unchanged on error."""
    options = _options(ctx)
    init_home(options.home)
    config = set_value(options.home, key, value)
    current: Any = config.model_dump(mode="json")
    for part in key.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    _emit(options, {"key": key, "value": current}, f"{key} = {json.dumps(current)}")


@config_app.command("import")
def config_import(ctx: typer.Context, file: Path) -> None:
    """Merge an original P2PRC config.json into this node's config."""
    options = _options(ctx)
    init_home(options.home)
    config, notes = import_original(options.home, file)
    _emit(options, {"config": config.model_dump(mode="json"), "notes": notes}, "\n".join(notes))


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
