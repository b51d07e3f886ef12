"""``p2prc cluster ...``: Dask clusters on the pool, owned by this node."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.table import Table

from ..client import AsyncClient
from ..cluster.client import ClustersAPI, client_line
from ..cluster.models import ClusterCreate, ClusterScale, ClusterView
from ..errors import InvalidRequest, validation_message
from ._common import Options, emit, err, options_of

__all__ = ["cluster_app"]

cluster_app = typer.Typer(
    help="Dask clusters on the pool: create, list, show, scale, rm, client.",
    no_args_is_help=True,
)

T = TypeVar("T")


def _call(options: Options, work: Callable[[ClustersAPI], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient(home=options.home) as client:
            return await work(client.clusters)

    return asyncio.run(main())


def _spec(**fields: Any) -> ClusterCreate:
    """The create request from the options: a bad value is one line, before any call."""
    worker = {k: fields.pop(k) for k in ("cpus", "memory", "gpus") if fields.get(k) is not None}
    fields = {k: v for k, v in fields.items() if v is not None}
    if worker:
        fields["worker"] = worker
    try:
        return ClusterCreate.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


def _details(view: ClusterView) -> str:
    lines = [f"cluster {view.name} ({view.id})  {view.state.value}  {view.reason}".rstrip()]
    lines.append(f"  scheduler  {view.scheduler_address or '-'}  on {view.scheduler_peer or '-'}")
    lines.append(f"  dashboard  {view.dashboard_link or '-'}")
    if view.security is not None:
        lines.append(f"  ca         {view.security.ca_file}")
        lines.append(f"  cert       {view.security.cert_file}")
        lines.append(f"  key        {view.security.key_file}")
    lines.append(f"  workers    {len(view.workers)}")
    for worker in view.workers:
        where = f"{worker.name} on {worker.peer or '-'}  {worker.state.value}"
        lines.append(f"    {where}  {worker.address or '-'}  {worker.reason}".rstrip())
        lines += [f"      skipped {why}" for why in worker.skipped]
    if not view.final and view.scheduler_address:
        lines += ["connect with:", f"  {client_line(view)}"]
    return "\n".join(lines)


def _table(views: list[ClusterView]) -> Table:
    table = Table("cluster", "name", "state", "workers", "scheduler", "reason", box=None)
    for view in views:
        table.add_row(
            view.id,
            view.name,
            view.state.value,
            str(len(view.workers)),
            view.scheduler_address or "-",
            view.reason,
        )
    return table


def _progress(message: str) -> None:
    if message != "accepted":
        err.print(f"[p2prc] {message}", markup=False)


@cluster_app.command("create")
def cluster_create(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option("--workers", "-n", help="Workers to start.")] = 0,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPUs per worker.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory per worker.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="GPUs per worker.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads per worker.")] = None,
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Workers may go here (repeatable).")
    ] = None,
    scheduler_peer: Annotated[
        str | None, typer.Option("--scheduler-peer", help="Where the scheduler runs.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The cluster's name.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Dask image.")] = None,
) -> None:
    """Start a Dask cluster: a scheduler and --workers workers, each in a container."""
    options = options_of(ctx)
    spec = _spec(
        workers=workers,
        cpus=cpus,
        memory=memory,
        gpus=gpus,
        threads=threads,
        peers=peer or None,
        scheduler_peer=scheduler_peer,
        name=name,
        image=image,
    )
    view = _call(options, lambda api: api.create(spec, progress=_progress))
    emit(options, view, _details(view))


@cluster_app.command("list")
def cluster_list(ctx: typer.Context) -> None:
    """Every cluster of this node."""
    options = options_of(ctx)
    views = _call(options, lambda api: api.list())
    emit(options, [v.model_dump(mode="json") for v in views], _table(views) if views else "none")


@cluster_app.command("show")
def cluster_show(ctx: typer.Context, cluster: str) -> None:
    """One cluster: addresses, TLS files, each worker and where it runs."""
    options = options_of(ctx)
    view = _call(options, lambda api: api.get(cluster))
    emit(options, view, _details(view))


@cluster_app.command("scale")
def cluster_scale(
    ctx: typer.Context,
    cluster: str,
    workers: Annotated[int, typer.Argument(help="Workers wanted.")],
) -> None:
    """Add workers, or remove the newest, until the cluster has WORKERS."""
    options = options_of(ctx)
    try:
        ClusterScale(workers=workers)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None
    view = _call(options, lambda api: api.scale(cluster, workers))
    emit(options, view, f"{view.name}: {len(view.workers)} workers")


@cluster_app.command("rm")
def cluster_rm(ctx: typer.Context, cluster: str) -> None:
    """Close a cluster: every container removed."""
    options = options_of(ctx)
    view = _call(options, lambda api: api.remove(cluster))
    emit(options, view, f"{view.name} {view.state.value}")


@cluster_app.command("client")
def cluster_client(ctx: typer.Context, cluster: str) -> None:
    """The Python line that connects a distributed.Client to the cluster."""
    options = options_of(ctx)
    view = _call(options, lambda api: api.get(cluster))
    line = client_line(view)
    emit(options, {"cluster": view.id, "line": line}, line)
