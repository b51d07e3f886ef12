"""Jobs in the node's SQLite database; each job's log and results in ``<home>/jobs/<id>/``.

The log is a file of NDJSON lines (one ``LogLine`` each) that is only ever appended to, so
a follower reads it from a byte offset and never misses or repeats a line.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from ..errors import InvalidRequest, JobNotFound, StateError
from .models import FINAL_STATES, JobState, JobView, LogLine, RankPlacement
from .task import Task

__all__ = ["JobStore", "allowed", "check_job_id"]

_JOB_ID = re.compile(r"^job[0-9a-f]{12}$")
_PREFIX = re.compile(r"^[0-9a-z]{1,15}$")
# Bytes of log read at once; a kept line is far shorter (ranks' lines are cut at 64 KiB).
_READ_LIMIT = 1024 * 1024

_NEXT: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PLACING, JobState.FAILED, JobState.CANCELLED}),
    JobState.PLACING: frozenset(
        {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT}
    ),
    # Back to placing when a rank is retried on another peer.
    JobState.RUNNING: frozenset({JobState.PLACING, *FINAL_STATES}),
}


def allowed(old: JobState, new: JobState) -> bool:
    """Whether a job may go from ``old`` to ``new``; nothing leaves a final state."""
    return new in _NEXT.get(old, frozenset())


def check_job_id(text: str) -> str:
    """A full job id, or a refusal: ids name directories, so nothing else may pass."""
    if not _JOB_ID.match(text):
        raise InvalidRequest(f"{text!r} is not a job id (job + 12 hex digits)")
    return text


class JobStore:
    """Typed access to ``jobs`` and the job directories."""

    def __init__(
        self, db: sqlite3.Connection, directory: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self.directory = directory
        self._clock = clock

    def create(self, task: Task) -> JobView:
        job = JobView(
            id=f"job{secrets.token_hex(6)}",
            task=task,
            state=JobState.PENDING,
            created_at=self._clock(),
            placements=[RankPlacement(rank=rank) for rank in range(task.nodes)],
        )
        self.job_dir(job.id).mkdir(mode=0o700, parents=True, exist_ok=False)
        self._db.execute(
            "INSERT INTO jobs (id, task, state, reason, created_at, finished_at, placements) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                task.model_dump_json(),
                job.state.value,
                job.reason,
                job.created_at,
                None,
                _placements_json(job.placements),
            ),
        )
        return job

    def get(self, typed: str) -> JobView:
        """A job by id or unique prefix."""
        if not _PREFIX.match(typed):
            raise InvalidRequest(f"{typed!r} is not a job id")
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE id LIKE ? ORDER BY created_at", (f"{typed}%",)
        ).fetchall()
        if not rows:
            raise JobNotFound(f"no job {typed!r}; see 'p2prc jobs list'")
        if len(rows) > 1:
            raise InvalidRequest(f"{typed!r} matches {len(rows)} jobs; give more of the id")
        return _job(rows[0])

    def all(self) -> list[JobView]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at")
        return [_job(row) for row in rows]

    def unfinished(self) -> list[JobView]:
        finals = tuple(state.value for state in FINAL_STATES)
        marks = ", ".join("?" * len(finals))
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ({marks}) ORDER BY created_at",
            finals,
        )
        return [_job(row) for row in rows]

    def set_state(self, job_id: str, state: JobState, reason: str = "") -> JobView | None:
        """Move a job on; None (and nothing changed) when it may not go there from now."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            job = self.get(job_id)
            if not allowed(job.state, state):
                return None
            finished = self._clock() if state in FINAL_STATES else None
            self._db.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                (state.value, reason, finished, job_id),
            )
        return job.model_copy(update={"state": state, "reason": reason, "finished_at": finished})

    def set_placement(self, job_id: str, placement: RankPlacement) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            placements = self.get(job_id).placements
            placements[placement.rank] = placement
            self._db.execute(
                "UPDATE jobs SET placements = ? WHERE id = ?",
                (_placements_json(placements), job_id),
            )

    def job_dir(self, job_id: str) -> Path:
        return self.directory / check_job_id(job_id)

    def results_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "results"

    def log_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "log.ndjson"

    def append_log(self, job_id: str, rank: int | None, line: str) -> None:
        entry = LogLine(rank=rank, line=line, time=self._clock())
        with self.log_file(job_id).open("ab") as file:
            file.write(entry.model_dump_json().encode() + b"\n")

    def read_log(
        self, job_id: str, offset: int = 0, limit: int = _READ_LIMIT
    ) -> tuple[list[LogLine], int]:
        """The whole lines in up to ``limit`` bytes from ``offset``, and the offset after
        the last of them (a follower reads on from there)."""
        try:
            with self.log_file(job_id).open("rb") as file:
                file.seek(offset)
                data = file.read(limit)
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        lines = []
        for raw in data[:end].splitlines():
            try:
                lines.append(LogLine.model_validate_json(raw))
            except ValidationError:
                continue  # a torn line from a crash: skipped, the rest still reads
        return lines, offset + end


_COLUMNS = "id, task, state, reason, created_at, finished_at, placements"


def _placements_json(placements: list[RankPlacement]) -> str:
    return json.dumps([p.model_dump(mode="json") for p in placements])


def _job(row: tuple[str, str, str, str, float, float | None, str]) -> JobView:
    job_id, task, state, reason, created, finished, placements = row
    try:
        return JobView(
            id=job_id,
            task=Task.model_validate_json(task),
            state=JobState(state),
            reason=reason,
            created_at=created,
            finished_at=finished,
            placements=[RankPlacement.model_validate(p) for p in json.loads(placements)],
        )
    except (ValidationError, ValueError) as exc:
        raise StateError(f"job {job_id} in the state database is damaged: {exc}") from None
