"""``p2prc group ...`` and ``p2prc plugin ...``: automate containers and attached hosts."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..client import Client
from ..errors import InvalidRequest
from ..models import ContainerGroup, PluginEvent, PluginRun
from ._common import Options, command, emit, err, options_of

__all__ = ["group_app", "plugin_app"]

group_app = typer.Typer(help="Groups of tracked containers and attached hosts, for plugins.")
plugin_app = typer.Typer(
    help="Ansible plugins: playbooks run against containers, attached hosts or groups."
)


def _group_table(groups: list[ContainerGroup]) -> Table:
    table = Table("group", "containers", "attached hosts", box=None)
    for group in groups:
        ids = ", ".join(item.container.id for item in group.containers) or "-"
        table.add_row(group.id, ids, ", ".join(group.attached) or "-")
    return table


@command(
    group_app, "create", help="Create an empty group and print its id (the original --cgroup)."
)
def create_group(options: Options) -> None:
    with Client(home=options.home) as client:
        group = client.create_group()
    emit(options, group, group.id)


@command(group_app, "list", help="Every group (the original --groups).")
def list_groups(options: Options) -> None:
    with Client(home=options.home) as client:
        groups = client.groups()
    emit(options, [g.model_dump(mode="json") for g in groups], _group_table(groups))


def show_or_change_group(
    options: Options, group_id: str, container: str | None, remove: bool = False
) -> None:
    with Client(home=options.home) as client:
        if container is None:
            group = client.group(group_id)
        elif remove:
            group = client.remove_from_group(group_id, container)
        else:
            group = client.add_to_group(group_id, container)
    emit(options, group, _group_table([group]))


@command(group_app, "delete", help="Delete a group; its containers stay (the original --rmgroup).")
def delete_group(options: Options, group_id: str) -> None:
    with Client(home=options.home) as client:
        client.delete_group(group_id)
    emit(options, {"deleted": group_id}, f"deleted {group_id}")


@group_app.command("add")
def group_add(ctx: typer.Context, group_id: str, container: str) -> None:
    """Add a tracked container or an attached host to a group (the original --group G --id C)."""
    show_or_change_group(options_of(ctx), group_id, container)


@group_app.command("rm")
def group_rm(ctx: typer.Context, group_id: str, container: str) -> None:
    """Take a container or an attached host out of a group (original --rmcgroup)."""
    show_or_change_group(options_of(ctx), group_id, container, remove=True)


@group_app.command("show")
def group_show(ctx: typer.Context, group_id: str) -> None:
    """Show one group (the original --group G)."""
    show_or_change_group(options_of(ctx), group_id, None)


@command(plugin_app, "list", help="Installed plugins (the original --vp).")
def list_plugins(options: Options) -> None:
    with Client(home=options.home) as client:
        plugins = client.plugins()
    table = Table("plugin", "summary", "variables", box=None)
    for plugin in plugins:
        table.add_row(plugin.name, plugin.summary, ", ".join(plugin.variables))
    emit(options, [p.model_dump(mode="json") for p in plugins], table)


@command(
    plugin_app,
    "pull",
    help="Install a plugin from a git URL or local repository (the original --pp).",
)
def pull_plugin(options: Options, source: str) -> None:
    local = Path(source).expanduser()
    if not source.startswith("-") and local.is_dir():
        source = str(local.resolve())  # the node runs elsewhere: relative to here, not there
    with Client(home=options.home) as client, err.status(f"pulling {source}"):
        plugin = client.pull_plugin(source)
    emit(options, plugin, f"installed {plugin.name}: {plugin.summary}")


@command(plugin_app, "rm", help="Uninstall a plugin (the original --rp).")
def remove_plugin(options: Options, name: str) -> None:
    with Client(home=options.home) as client:
        client.remove_plugin(name)
    emit(options, {"removed": name}, f"removed {name}")


def run_plugin(options: Options, name: str, target: str, variables: list[str]) -> None:
    """Run a plugin; progress per host on stderr; exit 1 unless every host succeeded."""
    values = {}
    for item in variables:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--var takes key=value, not {item!r}")
        values[key] = value

    def show(event: PluginEvent) -> None:
        err.print(f"  {event.host}: {event.status:<11} {event.task}", markup=False)

    with Client(home=options.home) as client:
        run = client.run_plugin(name, target, values, progress=show)
    emit(options, run, _run_table(run))
    if not run.ok:
        raise typer.Exit(1)


def _run_table(run: PluginRun) -> Table:
    table = Table("host", "ok", "changed", "failed", "unreachable", box=None)
    for host, result in run.hosts.items():
        row = (result.ok, result.changed, result.failed, result.unreachable)
        table.add_row(host, *map(str, row))
    table.caption = (
        f"{run.plugin} on {run.target}: {'succeeded' if run.ok else 'FAILED'} ({run.id})"
    )
    return table


@plugin_app.command("run")
def plugin_run(
    ctx: typer.Context,
    name: str,
    target: Annotated[
        str, typer.Argument(help="A tracked container id, an attached host's name or a group id.")
    ],
    var: Annotated[list[str] | None, typer.Option("--var", help="key=value (repeatable).")] = None,
) -> None:
    """Run a plugin on a container, an attached host or a group (original --plugin NAME --id ID)."""
    run_plugin(options_of(ctx), name, target, var or [])


@plugin_app.command("runs")
def plugin_runs(ctx: typer.Context) -> None:
    """Past runs with their per-host summary (output in --json)."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        runs = client.plugin_runs()
    table = Table("run", "plugin", "target", "ok", "hosts", box=None)
    for run in runs:
        table.add_row(run.id, run.plugin, run.target, str(run.ok), str(len(run.hosts)))
    emit(options, [r.model_dump(mode="json") for r in runs], table)
