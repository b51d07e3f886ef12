"""``p2prc run ...`` and ``p2prc jobs ...``: tasks on the pool, their logs and results."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from ..client import AsyncClient
from ..errors import InvalidRequest
from ..jobs.client import JobsAPI
from ..jobs.models import JobState, JobView, LogLine
from ..jobs.task import Task, load_task, parse_task
from ._common import Options, emit, err, options_of, out

__all__ = ["jobs_app", "run_command"]

jobs_app = typer.Typer(help="Jobs this node submitted: list, show, logs, cancel, results.")

T = TypeVar("T")


def _call(options: Options, work: Callable[[JobsAPI], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient(home=options.home) as client:
            return await work(JobsAPI(client))

    return asyncio.run(main())


def _print_line(line: LogLine) -> None:
    where = f"({line.rank})" if line.rank is not None else "[p2prc]"
    text = f"{where} {line.line}"
    (out if line.rank is not None else err).print(text, markup=False)


def _exit_for(job: JobView) -> None:
    if job.state is not JobState.SUCCEEDED:
        err.print(f"job {job.id} {job.state.value}: {job.reason}", markup=False)
        raise typer.Exit(1)


async def _follow(api: JobsAPI, job_id: str, quiet: bool) -> JobView:
    final: JobView | None = None
    async with contextlib.aclosing(api.events(job_id, follow=True)) as events:
        async for event in events:
            if event.log is not None and not quiet:
                _print_line(event.log)
            elif event.job is not None:
                final = event.job
    if final is None:
        return await api.get(job_id)
    return final


def _task_from(
    args: list[str], fields: dict[str, Any], resources: dict[str, Any], env: list[str]
) -> Task:
    if len(args) == 1 and args[0].endswith(".toml") and Path(args[0]).is_file():
        if fields or resources or env:
            raise InvalidRequest("give a task file or options, not both")
        return load_task(Path(args[0]))
    if not args:
        raise InvalidRequest("give a command after '--', or a task.toml")
    values: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--env takes KEY=VALUE, not {item!r}")
        values[key] = value
    data: dict[str, Any] = {"run": args, **fields}
    if resources:
        data["resources"] = resources
    if values:
        data["env"] = values
    return parse_task(data)


def run_command(
    ctx: typer.Context,
    args: Annotated[
        list[str] | None, typer.Argument(help="-- COMMAND..., or the path of a task.toml.")
    ] = None,
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Run on this peer (repeatable).")
    ] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", help="How many ranks.")] = None,
    upload: Annotated[
        Path | None, typer.Option("--upload", help="Directory uploaded into ~/work.")
    ] = None,
    download: Annotated[
        list[str] | None,
        typer.Option("--download", help="Output path (in ~/work) brought back here."),
    ] = None,
    image: Annotated[str | None, typer.Option("--image", help="Container image.")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPUs per rank.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory per rank.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="GPUs per rank.")] = None,
    setup: Annotated[str | None, typer.Option("--setup", help="Runs first (sh -c).")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time-limit", help="90, 30m, 2h.")] = None,
    retries: Annotated[int | None, typer.Option("--retries", help="Retries per rank.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the containers.")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Print the id, return.")] = False,
    to: Annotated[Path, typer.Option("--to", help="Where results go.")] = Path("."),
) -> None:
    """Run a command (or a task.toml) on the pool; follows its log unless --detach."""
    options = options_of(ctx)
    fields: dict[str, Any] = {
        key: value
        for key, value in {
            "peers": peer or None,
            "nodes": nodes,
            "workdir": str(upload.expanduser().resolve()) if upload else None,
            "outputs": download or None,
            "image": image,
            "setup": setup,
            "time_limit": time_limit,
            "retries": retries,
            "keep": keep or None,
        }.items()
        if value is not None
    }
    resources = {
        k: v for k, v in {"cpus": cpus, "memory": memory, "gpus": gpus}.items() if v is not None
    }
    task = _task_from(args or [], fields, resources, env or [])

    async def work(api: JobsAPI) -> tuple[JobView, list[Path]]:
        job = await api.submit(task)
        if detach:
            return job, []
        err.print(f"job {job.id}", markup=False)
        final = await _follow(api, job.id, quiet=options.json)
        written = await api.download(job.id, to) if final.task.outputs else []
        return final, written

    try:
        job, written = _call(options, work)
    except KeyboardInterrupt:
        err.print("stopped following; the job runs on ('p2prc jobs cancel ID' stops it)")
        raise typer.Exit(130) from None
    for path in written:
        err.print(f"  {path}", markup=False)
    if options.json or detach:
        emit(options, job, job.id)
    if not detach:
        _exit_for(job)


def _job_table(jobs: list[JobView]) -> Table:
    table = Table("job", "state", "ranks", "peers", "reason", box=None)
    for job in jobs:
        peers = ", ".join(dict.fromkeys(p.peer for p in job.placements if p.peer)) or "-"
        table.add_row(job.id, job.state.value, str(job.task.nodes), peers, job.reason)
    return table


@jobs_app.command("list")
def jobs_list(ctx: typer.Context) -> None:
    """Every job this node submitted."""
    options = options_of(ctx)
    jobs = _call(options, lambda api: api.list())
    emit(options, [j.model_dump(mode="json") for j in jobs], _job_table(jobs))


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str) -> None:
    """One job: its state, why, and where each rank ran (and which peers were skipped)."""
    options = options_of(ctx)
    job = _call(options, lambda api: api.get(job_id))
    lines = [f"{job.id}  {job.state.value}  {job.reason}".rstrip()]
    for placement in job.placements:
        container = placement.container.id if placement.container else "-"
        lines.append(f"  rank {placement.rank}: {placement.peer or '-'} ({container})")
        lines += [f"    skipped {why}" for why in placement.skipped]
    emit(options, job, "\n".join(lines))


@jobs_app.command("logs")
def jobs_logs(
    ctx: typer.Context,
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
) -> None:
    """A job's log, each line with its rank."""
    options = options_of(ctx)

    async def work(api: JobsAPI) -> None:
        async with contextlib.aclosing(api.events(job_id, follow=follow)) as events:
            async for event in events:
                if event.log is None:
                    continue
                if options.json:
                    emit(options, event.log)
                else:
                    _print_line(event.log)

    _call(options, work)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Stop every rank of a job and remove its containers."""
    options = options_of(ctx)
    job = _call(options, lambda api: api.cancel(job_id))
    emit(options, job, f"{job.id} {job.state.value}")


@jobs_app.command("results")
def jobs_results(
    ctx: typer.Context,
    job_id: str,
    to: Annotated[Path, typer.Option("--to", help="Directory to write them to.")] = Path("."),
) -> None:
    """Download what a job brought back."""
    options = options_of(ctx)
    written = _call(options, lambda api: api.download(job_id, to))
    emit(options, [str(p) for p in written], "\n".join(map(str, written)) or "no files")
