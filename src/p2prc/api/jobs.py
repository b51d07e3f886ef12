"""Owner-only routes for jobs: submit, list, show, follow the log, cancel, fetch results."""

import asyncio
import os
import stat
from pathlib import Path, PurePosixPath

from fastapi import APIRouter
from fastapi.responses import FileResponse, StreamingResponse

from ..errors import InvalidRequest, NodeError, NotFound
from ..jobs.models import JobEvent, JobView, ResultFile
from ..jobs.service import JobService
from ..jobs.task import Task
from ._stream import ndjson
from .auth import Owner

__all__ = ["router"]


def router(node: object) -> APIRouter:
    """Routes under /jobs (all for the node's owner); the node's ``jobs`` is read per call."""
    routes = APIRouter(tags=["jobs"])

    def jobs() -> JobService:
        try:
            service = getattr(node, "jobs", None)
        except RuntimeError:
            service = None
        if not isinstance(service, JobService):
            raise NodeError("this node runs no job service")
        return service

    @routes.post("/jobs")
    async def submit(body: Task, caller: Owner) -> JobView:
        """Start a job; answers at once with its id (follow it with /jobs/{id}/logs)."""
        return await jobs().submit(body)

    @routes.get("/jobs")
    async def list_jobs(caller: Owner) -> list[JobView]:
        """Every job this node submitted, oldest first."""
        return jobs().list()

    @routes.get("/jobs/{job_id}")
    async def show(job_id: str, caller: Owner) -> JobView:
        """One job (id or unique prefix): state, reason, where each rank runs."""
        return jobs().get(job_id)

    @routes.get("/jobs/{job_id}/logs", response_model=JobEvent)
    async def logs(job_id: str, caller: Owner, follow: bool = False) -> StreamingResponse:
        """The job's log as NDJSON lines, then the job; ``follow`` waits for its end."""
        service = jobs()
        service.get(job_id)  # an unknown job is a 404 before the stream starts
        return ndjson(service.events(job_id, follow=follow))

    @routes.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str, caller: Owner) -> JobView:
        """Stop every rank and remove the job's containers."""
        return await jobs().cancel(job_id)

    @routes.get("/jobs/{job_id}/results")
    async def results(job_id: str, caller: Owner) -> list[ResultFile]:
        """The files the job brought back."""
        return await asyncio.to_thread(_listing, jobs().results_dir(job_id))

    @routes.get("/jobs/{job_id}/results/{path:path}")
    async def result_file(job_id: str, path: str, caller: Owner) -> FileResponse:
        """One file the job brought back, streamed."""
        folder = jobs().results_dir(job_id)
        return FileResponse(_inside(folder, path), media_type="application/octet-stream")

    return routes


def _listing(folder: Path) -> list[ResultFile]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            entry = Path(parent, name)
            info = entry.lstat()
            if stat.S_ISREG(info.st_mode):
                found.append(
                    ResultFile(path=entry.relative_to(folder).as_posix(), size=info.st_size)
                )
    return found


def _inside(folder: Path, path: str) -> Path:
    """A regular file under ``folder``: no '..', no absolute path, no link on the way."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("..", ".") for p in parts):
        raise InvalidRequest(f"{path!r} is not a path inside the results")
    entry = folder
    for part in parts:
        entry = entry / part
        try:
            mode = entry.lstat().st_mode
        except OSError:
            raise NotFound(f"the results have no {path}") from None
        if stat.S_ISLNK(mode):
            raise InvalidRequest(f"{path} is a link")
    if not stat.S_ISREG(mode):
        raise NotFound(f"{path} is not a file of the results")
    return entry
