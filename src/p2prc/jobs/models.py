"""Typed views of jobs, shared by the job service, the HTTP routes and the client."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from ..models import ContainerView
from .task import Task

__all__ = [
    "FINAL_STATES",
    "JobEvent",
    "JobState",
    "JobView",
    "LogLine",
    "RankPlacement",
    "ResultFile",
]


class JobState(enum.StrEnum):
    """Where a job is; the last five are final."""

    PENDING = "pending"
    PLACING = "placing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    OOM = "oom"
    TIMED_OUT = "timed_out"


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.OOM, JobState.TIMED_OUT}
)


class RankPlacement(BaseModel):
    """Where one rank runs (or ran), and the peers skipped on the way there."""

    model_config = ConfigDict(frozen=True)

    rank: int = Field(ge=0)
    peer: str = Field(default="", description="The peer as named in the table or task")
    container: ContainerView | None = None
    attempt: int = Field(default=0, ge=0, description="0 for the first try, then each retry")
    exit_code: int | None = None
    log_offset: int = Field(default=0, ge=0, description="Bytes of the rank's log already kept")
    skipped: list[str] = Field(default_factory=list, description="'peer: why' for each refusal")


class JobView(BaseModel):
    """A job as its submitting node keeps it."""

    model_config = ConfigDict(frozen=True)

    id: str
    task: Task
    state: JobState
    reason: str = Field(default="", description="Why it ended so (or what it waits for)")
    created_at: float
    finished_at: float | None = None
    placements: list[RankPlacement] = Field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class LogLine(BaseModel):
    """One line a rank wrote (stdout and stderr together), or a line from the job layer."""

    model_config = ConfigDict(frozen=True)

    rank: int | None = Field(
        default=None, description="The rank; none for the job layer's own lines"
    )
    line: str
    time: float


class JobEvent(BaseModel):
    """One NDJSON line of ``GET /jobs/{id}/logs``: a log line, or the job once it ends."""

    model_config = ConfigDict(frozen=True)

    event: str = Field(description="'log' or 'finished'")
    log: LogLine | None = None
    job: JobView | None = None


class ResultFile(BaseModel):
    """One file a job brought back, relative to its results directory."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int = Field(ge=0)
