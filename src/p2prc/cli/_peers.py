"""``p2prc peers ...`` and ``p2prc meta set``: the network as this node sees it."""

import json
from typing import Annotated

import typer
from rich.console import Group
from rich.table import Table

from .._home import init_home
from .._match import unique_peer
from ..client import Client, is_address, peer_url
from ..config import DEFAULT_PORT, load, set_value
from ..direct.client import path_label, read_paths_blocking
from ..direct.models import PathInfo
from ..errors import NodeNotRunning, NotFound
from ..models import PeerView
from ._attach import attached_table
from ._common import Options, command, emit, options_of

__all__ = ["meta_app", "peers_app", "resolve"]

peers_app = typer.Typer(help="The network: who is there, alive or not, and how far away.")
meta_app = typer.Typer(help="This node's metadata, spread to every node.")


def resolve(options: Options, peer: str) -> str:
    """API URL for a peer name, node id prefix, host:port or URL (names need the node)."""
    if is_address(peer) or ":" in peer:  # no name or id has a colon: a (bad) address
        return peer_url(peer)
    with Client(home=options.home) as client:  # NodeNotRunning: never a DNS name
        return client.resolve(peer)


@command(
    peers_app,
    "list",
    help="Every node this node knows, itself first (the original --ls), then attached hosts.",
)
def list_peers(options: Options) -> None:
    """Print the peer table (the original --ls), then the attached hosts with their gateways."""
    with Client(home=options.home) as client:
        views = client.peers()
        paths = read_paths_blocking(client)
        try:
            hosts = client.attached.list()
        except NotFound:  # a node without attached hosts' routes
            hosts = []
    rows: list[dict[str, object]] = [
        {**view.model_dump(mode="json"), "path": _path_json(paths.get(view.node_id))}
        for view in views
    ]
    rows += [{"kind": "attached", **host.model_dump(mode="json")} for host in hosts]
    human = _peer_table(views, paths)
    emit(
        options, rows, Group(human, "", "attached hosts", attached_table(hosts)) if hosts else human
    )


@command(
    peers_app,
    "add",
    help="Add a root node (host:port) and join through it (the original --as / --arn).",
)
def add_peer(options: Options, address: str) -> None:
    """Remember a root node and exchange tables with it now if the node runs."""
    if not is_address(address):
        address = f"{address}:{DEFAULT_PORT}"
    peer_url(address)  # validates
    init_home(options.home)
    bootstrap = load(options.home).bootstrap
    if address not in bootstrap:
        set_value(options.home, "bootstrap", json.dumps([*bootstrap, address]))
    result: dict[str, object] = {"bootstrap": address}
    try:
        with Client(home=options.home) as client:
            result["sync"] = client.add_peer(address).model_dump()
    except NodeNotRunning:
        result["sync"] = None
    emit(options, result, f"added {address}" + ("" if result["sync"] else " (node not running)"))


@command(peers_app, "sync", help="Exchange tables with known nodes now (the original --us).")
def sync_peers(options: Options) -> None:
    """Exchange tables now (the original --us), then print the table."""
    with Client(home=options.home) as client:
        result = client.sync_peers()
    if result.failed and not options.json:
        emit(options, result, "\n".join(f"failed: {line}" for line in result.failed))
    list_peers(options) if not options.json else emit(options, result)


@command(
    meta_app, "set", help="Set this node's metadata text; every node sees it (the original --amd)."
)
def set_metadata(options: Options, text: str) -> None:
    """Set this node's metadata (the original --amd)."""
    with Client(home=options.home) as client:
        view = client.set_metadata(text)
    emit(options, view, f"metadata set (version {view.version}); it spreads by gossip")


@peers_app.command("remove")
def remove_command(ctx: typer.Context, peer: str) -> None:
    """Forget a peer (it comes back if it is alive and gossips)."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        others = [view for view in client.peers() if not view.me]
        found = unique_peer(peer, others, ident=lambda v: v.node_id, name=lambda v: v.name)
        client.remove_peer(found.node_id)
    emit(options, {"removed": found.node_id}, f"removed {found.name}")


@peers_app.command("speedtest")
def speedtest_command(
    ctx: typer.Context,
    peer: str,
    size: Annotated[int, typer.Option("--size", min=1, max=64, help="MiB to download.")] = 8,
) -> None:
    """Measure download bandwidth from a peer (bounded size)."""
    options = options_of(ctx)
    with Client(resolve(options, peer), home=options.home) as client:
        mbit = client.speedtest(size * 1024 * 1024)
    emit(options, {"peer": peer, "mbit_per_s": round(mbit, 1), "mib": size}, f"{mbit:.1f} Mbit/s")


def _path_json(path: PathInfo | None) -> dict[str, object] | None:
    return None if path is None else path.model_dump(include={"kind", "via", "rtt_ms"})


def _peer_table(views: list[PeerView], paths: dict[str, PathInfo]) -> Table:
    columns = ("name", "id", "address", "state", "rtt ms", "path", "nat", "gpus", "metadata")
    table = Table(*columns, box=None)
    for view in views:
        rtt = "" if view.rtt_ms is None else f"{view.rtt_ms:.2f}"
        nat = {None: "?", True: "yes", False: "no"}[view.behind_nat]
        name = f"{view.name} (me)" if view.me else view.name
        address = f"{view.addresses[0] if view.addresses else '-'}:{view.api_port}"
        table.add_row(
            name,
            view.node_id[:8],
            address,
            view.state,
            rtt,
            "" if view.me else path_label(paths.get(view.node_id)),
            nat,
            str(view.gpus),
            view.metadata,
        )
    return table
