"""The library side of jobs: ``client.jobs`` (a ``JobsAPI``) over a node's ``/jobs`` routes.

Usage::

    async with AsyncClient(home=home) as client:
        job = await client.run(Task(run="make -j8", workdir="/src"))  # client.jobs.run
        async for line in job.logs():
            print(line.rank, line.line)
        final = await job.wait()
        await job.results("out/")

``Client.jobs`` and ``Client.run`` give the blocking twins, ``BlockingJobsAPI`` and
``BlockingJob``: the same calls, each run on the sync client's private event loop.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import secrets
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from .._client_async import _SIGN_HEADER, AsyncClient, _raise_for_error
from ..errors import InvalidRequest, PeerProtocolError
from .models import JobEvent, JobView, LogLine, ResultFile
from .task import Task

__all__ = ["BlockingJob", "BlockingJobsAPI", "Job", "JobsAPI"]

_T = TypeVar("_T")
_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _job_path(job_id: str) -> str:
    if not job_id or not job_id.isalnum() or len(job_id) > 15:
        raise InvalidRequest(f"{job_id!r} is not a job id")
    return f"/jobs/{job_id}"


class JobsAPI:
    """Jobs of the node ``client`` talks to (its owner's key signs every call)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(self, task: Task) -> JobView:
        """``POST /jobs``: start a job; returns at once."""
        return await self._client._call("POST", "/jobs", JobView, task.model_dump(mode="json"))

    async def run(self, task: Task) -> Job:
        """Submit ``task`` and return a handle to follow, wait for, cancel or fetch it."""
        return Job(self, await self.submit(task))

    async def list(self) -> list[JobView]:
        """``GET /jobs``."""
        response = await self._client._request("GET", "/jobs", signed=True)
        try:
            return [JobView.model_validate(item) for item in response.json()]
        except (ValueError, TypeError) as exc:
            raise PeerProtocolError(f"{self._client.base_url}/jobs: {exc}") from None

    async def get(self, job_id: str) -> JobView:
        """``GET /jobs/ID`` (a unique prefix is enough)."""
        response = await self._client._request("GET", _job_path(job_id), signed=True)
        return _parse(JobView, response)

    async def cancel(self, job_id: str) -> JobView:
        """``POST /jobs/ID/cancel``: stop every rank, remove the containers."""
        return await self._client._call("POST", f"{_job_path(job_id)}/cancel", JobView)

    async def events(self, job_id: str, *, follow: bool = False) -> AsyncGenerator[JobEvent, None]:
        """The job's log lines, then a ``finished`` event with the job."""
        path = f"{_job_path(job_id)}/logs"
        client = self._client
        with client._transport_errors():
            async with client._http.stream(
                "GET",
                path,
                params={"follow": "true" if follow else "false"},
                headers={_SIGN_HEADER: "1"},
                timeout=httpx.Timeout(30.0, read=None) if follow else httpx.USE_CLIENT_DEFAULT,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        try:
                            yield JobEvent.model_validate_json(line)
                        except ValidationError as exc:
                            raise PeerProtocolError(f"{path}: bad line: {exc}") from None

    async def results(self, job_id: str) -> builtins.list[ResultFile]:
        """``GET /jobs/ID/results``: the files the job brought back."""
        response = await self._client._request("GET", f"{_job_path(job_id)}/results", signed=True)
        try:
            return [ResultFile.model_validate(item) for item in response.json()]
        except (ValueError, TypeError) as exc:
            raise PeerProtocolError(f"{self._client.base_url}: bad results list: {exc}") from None

    async def download(self, job_id: str, to: Path) -> builtins.list[Path]:
        """Every result file into ``to`` (created), streamed; returns the paths written."""
        written = []
        base = _absolute(to)
        for item in await self.results(job_id):
            target = _local(base, item.path)
            url = f"{_job_path(job_id)}/results/{quote(item.path)}"
            await self._fetch(url, target)
            written.append(target)
        return written

    async def _fetch(self, url: str, target: Path) -> None:
        client = self._client
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            with client._transport_errors():
                async with client._http.stream("GET", url, headers={_SIGN_HEADER: "1"}) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for_error(response)
                    with partial.open("xb") as file:
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()


class Job:
    """A submitted job: ``logs()``, ``wait()``, ``cancel()``, ``results(dir)``."""

    def __init__(self, api: JobsAPI, view: JobView) -> None:
        self._api = api
        self.id = view.id
        self.view = view

    def __repr__(self) -> str:
        return f"<Job {self.id} [{self.view.state.value}]>"

    async def logs(self, *, follow: bool = True) -> AsyncGenerator[LogLine, None]:
        """Every log line, live until the job ends (``follow=False``: what is kept now)."""
        async with contextlib.aclosing(self._api.events(self.id, follow=follow)) as events:
            async for event in events:
                if event.log is not None:
                    yield event.log
                elif event.job is not None:
                    self.view = event.job

    async def wait(self) -> JobView:
        """The job once it reached its final state."""
        async with contextlib.aclosing(self._api.events(self.id, follow=True)) as events:
            async for event in events:
                if event.job is not None:
                    self.view = event.job
        return self.view

    async def cancel(self) -> JobView:
        """Stop every rank and remove the containers."""
        self.view = await self._api.cancel(self.id)
        return self.view

    async def results(self, to: Path | str) -> list[Path]:
        """Download what the job brought back into ``to``."""
        return await self._api.download(self.id, Path(to))


class _Runs(Protocol):
    """The sync client's private event loop (``Client._run``)."""

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T: ...


class _Twin(Generic[_S]):
    """A blocking twin of an async object: its calls run on the sync client's loop."""

    def __init__(self, runs: _Runs, of: _S) -> None:
        self._runs = runs
        self._of = of

    def _iterate(self, items: AsyncGenerator[_T, None]) -> Iterator[_T]:
        """An async generator as a plain iterator, each step run on the sync loop."""
        try:
            while True:
                try:
                    yield self._runs._run(_next(items))
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(RuntimeError):  # the client was closed meanwhile
                self._runs._run(items.aclose())


def _blocking(
    method: Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_Twin[_S], _P], _R]:
    """The blocking form of an async method (as ``_client_sync._blocking`` for ``Client``)."""

    @functools.wraps(method)
    def blocking(self: _Twin[_S], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self._runs._run(method(self._of, *args, **kwargs))

    return blocking


class BlockingJobsAPI(_Twin["JobsAPI"]):
    """The blocking twin of ``JobsAPI`` (``Client.jobs``)."""

    submit = _blocking(JobsAPI.submit)
    list = _blocking(JobsAPI.list)
    get = _blocking(JobsAPI.get)
    cancel = _blocking(JobsAPI.cancel)
    results = _blocking(JobsAPI.results)
    download = _blocking(JobsAPI.download)

    # Explicit: these answer blocking handles, not the async ones.
    def run(self, task: Task) -> BlockingJob:
        """Submit ``task`` and return a handle to follow, wait for, cancel or fetch it."""
        return BlockingJob(self._runs, self._runs._run(self._of.run(task)))

    def events(self, job_id: str, *, follow: bool = False) -> Iterator[JobEvent]:
        """The job's log lines, then a ``finished`` event with the job."""
        return self._iterate(self._of.events(job_id, follow=follow))

    def job(self, job_id: str) -> BlockingJob:
        """A handle to a job already submitted (id or unique prefix)."""
        return BlockingJob(self._runs, Job(self._of, self.get(job_id)))


class BlockingJob(_Twin["Job"]):
    """The blocking twin of ``Job``: ``logs()``, ``wait()``, ``cancel()``, ``results(dir)``."""

    wait = _blocking(Job.wait)
    cancel = _blocking(Job.cancel)
    results = _blocking(Job.results)

    def __init__(self, runs: _Runs, job: Job) -> None:
        super().__init__(runs, job)
        self.id = job.id

    def __repr__(self) -> str:
        return f"<BlockingJob {self.id} [{self.view.state.value}]>"

    @property
    def view(self) -> JobView:
        """The job as last seen."""
        return self._of.view

    # Explicit: an async iterator becomes a plain one.
    def logs(self, *, follow: bool = True) -> Iterator[LogLine]:
        """Every log line, live until the job ends (``follow=False``: what is kept now)."""
        return self._iterate(self._of.logs(follow=follow))


async def _next(items: AsyncGenerator[_T, None]) -> _T:
    return await anext(items)


def _absolute(path: Path) -> Path:
    return path.resolve()


def _local(base: Path, path: str) -> Path:
    """Where a result goes under ``base``; a path the node sent that leaves it is refused."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise PeerProtocolError(f"the node named a result outside the results: {path!r}")
    return base.joinpath(*parts)


def _parse(model: type[JobView], response: httpx.Response) -> JobView:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise PeerProtocolError(f"unexpected answer: {exc}") from None
