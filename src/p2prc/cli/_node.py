"""Commands about this machine's node: init, start, status, stop, specs, interfaces, config."""

import asyncio
import itertools
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Column, Table

from .._home import home_locked, init_home
from ..client import AsyncClient, Client
from ..config import Home, import_original, load, set_value
from ..errors import NodeError, NodeNotRunning, NotFound
from ..models import Health, NodeStatus, Specs
from ..specs import collect_specs, interfaces
from ._common import Options, emit, options_of, out

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["config_app", "init", "interfaces_command", "specs", "start", "status", "stop"]

config_app = typer.Typer(help="Show and change this node's config.toml.")


def init(ctx: typer.Context) -> None:
    """Create this node's home (config, identity, state); never replaces anything."""
    options = options_of(ctx)
    config, identity = init_home(options.home)
    data = {"home": str(options.home.path), "name": config.name, "node_id": identity.node_id}
    emit(options, data, f"home {data['home']}\nnode {config.name} ({identity.node_id})")


def start(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", min=0, max=65535, help="API port (0: any free port)."),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    options = options_of(ctx)
    config, identity = init_home(options.home)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ..node import Node  # here: only this command runs a node (the API server, Docker...)

    node = Node(config, options.home, identity=identity, host=host, port=port)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(node, options))


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(node: "Node", options: Options) -> None:
    """Serve until a signal (exit 0) or a crashed component (exit 1) stops the node."""
    loop = asyncio.get_running_loop()
    # Before start: a signal while starting stops the node cleanly once it is up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.close)
    async with node:
        ready = {"node_id": node.identity.node_id, "name": node.config.name, "api": node.api_url}
        emit(options, ready, f"p2prc node {ready['name']} ({ready['node_id']}) at {ready['api']}")
        await node.wait_closed()
    if node.failure is not None:
        raise NodeError(f"the node stopped: {node.failure}")


def status(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh every 2 s until Ctrl-C.")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="With --watch: stop after N views.")
    ] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.01, hidden=True)] = 2.0,
) -> None:
    """This node (NAT verdict, relay, mappings, health) and each peer, with its path."""
    options = options_of(ctx)
    if not watch:
        data, view = _status_view(options)
        emit(options, data, view)
        return
    rounds = itertools.count(1) if count is None else range(1, count + 1)
    try:
        if options.json or not out.is_terminal:
            for round_ in rounds:
                if round_ > 1:
                    time.sleep(interval)
                emit(options, *_status_view(options))
            return
        with Live(console=out, auto_refresh=False) as live:
            for round_ in rounds:
                if round_ > 1:
                    time.sleep(interval)
                live.update(_status_view(options)[1], refresh=True)
    except KeyboardInterrupt:
        return


def _status_view(options: Options) -> tuple[dict[str, Any], Group]:
    """The JSON answer and the tables of ``p2prc status``, read from the node now."""
    result, health, view, paths = asyncio.run(_read_status(options.home))
    data = {
        **result.model_dump(mode="json"),
        "health": health.model_dump(mode="json"),
        **_status_data(view, paths),
    }
    peers = _peers_table(data["peers"], view.at)
    return data, Group(_status_table(result, health, data), "", peers)


async def _read_status(home: Home) -> tuple[NodeStatus, Health, Any, dict[str, Any]]:
    from ..api.overview import Overview  # the server's model, loaded only by this command
    from ..direct.models import PathInfo

    async with AsyncClient(home=home) as client:
        result, health = await client.status(), await client.health()
        response = await client._request("GET", "/overview", signed=True)
        try:
            answer = await client._request("GET", "/paths", signed=True)
            paths = {p.node_id: p for p in map(PathInfo.model_validate, answer.json())}
        except NotFound:  # a node without direct paths
            paths = {}
    return result, health, Overview.model_validate_json(response.content), paths


def _status_data(view: Any, paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """This node's NAT verdict, relay and mappings, and each peer with its path."""
    me = view.me
    names = {peer.node_id: peer.name for peer in [*view.peers, *([me] if me else [])]}
    behind_nat = view.behind_nat if view.behind_nat is not None else getattr(me, "behind_nat", None)
    relay = None
    if me is not None and me.relay:
        relay = {"node_id": me.relay, "name": names.get(me.relay, ""), "public_api": me.public_api}
    peers = [
        {
            "name": peer.name,
            "node_id": peer.node_id,
            "state": peer.state,
            "path": _path(peer, names, (paths or {}).get(peer.node_id)),
            **_path_rtts((paths or {}).get(peer.node_id)),
            "rtt_ms": peer.rtt_ms,
            "gpus": peer.gpus,
            "api": peer.api,
            "last_heard": peer.last_heard,
            "last_call": None if peer.last_call is None else peer.last_call.model_dump(),
        }
        for peer in view.peers
    ]
    mappings = [m.model_dump(mode="json", by_alias=False) for m in view.mappings]
    return {
        "nat": "unknown" if behind_nat is None else "behind NAT" if behind_nat else "public",
        "behind_nat": behind_nat,
        "relay": relay,
        "mappings": mappings,
        "peers": peers,
    }


def _path(peer: Any, names: dict[str, str], path: Any = None) -> str:
    """How this node reaches ``peer``: ``direct`` (a direct path is up), ``relay via NAME``
    or ``public`` (its plain API), with the round trips known (``GET /paths``)."""
    if path is not None and path.kind == "direct":
        text = "direct"
    elif peer.relay:
        text = f"relay via {names.get(peer.relay) or peer.relay[:8]}"
    elif peer.behind_nat:
        return "none (behind NAT, no relay)"
    else:
        text = "public"
    if path is None:
        return text
    rtts = [
        f"{label} {value:.1f} ms"
        for label, value in (
            ("direct", path.direct_rtt_ms),
            ("relay" if peer.relay else "api", path.relay_rtt_ms),
        )
        if value is not None
    ]
    return f"{text} ({', '.join(rtts)})" if rtts else text


def _path_rtts(path: Any) -> dict[str, Any]:
    """The JSON's path fields of one peer (``GET /paths``), none when unknown."""
    if path is None:
        return {"path_kind": None, "direct_rtt_ms": None, "relay_rtt_ms": None}
    return {
        "path_kind": path.kind,
        "direct_rtt_ms": path.direct_rtt_ms,
        "relay_rtt_ms": path.relay_rtt_ms,
    }


def _status_table(status: NodeStatus, health: Health, data: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    for key in ("name", "node_id", "api", "version", "trust_mode", "uptime_s"):
        table.add_row(key, str(getattr(status, key)))
    table.add_row("addresses", ", ".join(status.addresses))
    table.add_row("nat", data["nat"])
    relay = data["relay"]
    if relay is not None:
        name = relay["name"] or relay["node_id"][:8]
        table.add_row("relay", f"{name} ({relay['node_id'][:8]}), public api {relay['public_api']}")
    table.add_row("mappings", str(len(data["mappings"])))
    for mapping in data["mappings"]:
        via = f" via {mapping['relay'][:8]}" if mapping["relay"] else ""
        table.add_row("", f"{mapping['local_port']} -> {mapping['entire_address']}{via}")
    table.add_row("health", health.status)
    for name, state in health.components.items():
        if state != "ok":
            table.add_row(f"  {name}", state)
    return table


def _peers_table(peers: list[dict[str, Any]], at: float) -> Table:
    columns = ("peer", "id", "state", "path", "rtt", "gpus", "heard", "last call")
    # "owner_only 3s ago" reads as one value: wrap the path or the name before it.
    header = [Column(name, no_wrap=name in ("heard", "last call")) for name in columns]
    table = Table(*header, box=None, title_justify="left")
    for peer in peers:
        rtt = "-" if peer["rtt_ms"] is None else f"{peer['rtt_ms']:.1f} ms"
        call = peer["last_call"]
        last_call = "-"
        if call is not None:
            last_call = f"{'ok' if call['ok'] else call['error']} {_ago(call['at'], at)}"
        table.add_row(
            peer["name"],
            peer["node_id"][:8],
            peer["state"],
            peer["path"],
            rtt,
            str(peer["gpus"]),
            "-" if peer["last_heard"] is None else _ago(peer["last_heard"], at),
            last_call,
        )
    if not peers:
        table.add_row("(no peers yet)", *[""] * (len(columns) - 1))
    return table


def _ago(then: float, now: float) -> str:  # Twin: ui/app.js ago
    """``then`` as seen at ``now``: ``3s ago``, ``4m ago``, ``2h ago``, ``5d ago``."""
    seconds = max(0, int(now - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def stop(ctx: typer.Context) -> None:
    """Stop the running node of this home."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        client.shutdown()
    deadline = time.monotonic() + 10
    while home_locked(options.home) and time.monotonic() < deadline:
        time.sleep(0.05)
    emit(options, {"stopped": True}, "stopped")


def specs(
    ctx: typer.Context,
    peer: Annotated[
        str | None, typer.Argument(help="host:port of a node; default: this one.")
    ] = None,
) -> None:
    """CPU, memory, disk and GPUs of a node (the original --specs)."""
    options = options_of(ctx)
    result = _specs_of(options.home, peer)
    emit(options, result, _specs_table(result))


def _specs_of(home: Home, peer: str | None) -> Specs:
    if peer is not None:
        from ._common import Options
        from ._peers import resolve

        with Client(resolve(Options(home_arg=home.path), peer), home=home) as client:
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


def interfaces_command(ctx: typer.Context) -> None:
    """This machine's network interfaces and addresses (the original --ni)."""
    options = options_of(ctx)
    rows = interfaces()
    table = Table("interface", "family", "address", "netmask", box=None)
    for row in rows:
        table.add_row(row["interface"], row["family"], row["address"], row["netmask"])
    emit(options, rows, table)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the config (TOML; JSON with --json)."""
    options = options_of(ctx)
    init_home(options.home)
    config = load(options.home)
    if options.json:
        emit(options, config)
    else:
        out.print(options.home.config_file.read_text(), end="", markup=False)


@config_app.command("set")
def config_set(ctx: typer.Context, key: str, value: str) -> None:
    """Set one key, e.g. 'port 9000' or 'trust.mode open'; the file is unchanged on error."""
    options = options_of(ctx)
    init_home(options.home)
    config = set_value(options.home, key, value)
    current: Any = config.model_dump(mode="json")
    for part in key.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    emit(options, {"key": key, "value": current}, f"{key} = {json.dumps(current)}")


@config_app.command("import")
def config_import(ctx: typer.Context, file: Path) -> None:
    """Merge an original P2PRC config.json into this node's config."""
    options = options_of(ctx)
    init_home(options.home)
    config, notes = import_original(options.home, file)
    emit(options, {"config": config.model_dump(mode="json"), "notes": notes}, "\n".join(notes))
