"""Typed views of Dask clusters, shared by the cluster service, the HTTP routes and the client."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..jobs.task import Resources
from ..models import ContainerView, _Request

__all__ = [
    "FINAL_STATES",
    "MAX_WORKERS",
    "ClusterCreate",
    "ClusterEvent",
    "ClusterScale",
    "ClusterSecurity",
    "ClusterState",
    "ClusterView",
    "WorkerState",
    "WorkerView",
]

# A cluster's workers: the most one owner may ask for at once (each is a container).
MAX_WORKERS = 64


class ClusterState(enum.StrEnum):
    """Where a cluster is; the last two are final."""

    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    CLOSED = "closed"


FINAL_STATES = frozenset({ClusterState.FAILED, ClusterState.CLOSED})


class WorkerState(enum.StrEnum):
    """Where one worker is."""

    STARTING = "starting"
    RUNNING = "running"
    LOST = "lost"
    FAILED = "failed"


class ClusterCreate(_Request):
    """What ``POST /clusters`` asks for: how many workers of what size, and where."""

    workers: int = Field(default=0, ge=0, le=MAX_WORKERS, description="Workers to start now")
    worker: Resources = Field(
        default_factory=Resources, description="Each worker's container: cpus, memory, gpus"
    )
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="Threads per worker (default: its cpus, or 1)"
    )
    peers: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Peers workers may go to (names, node ids, addresses); empty: any fitting",
    )
    scheduler_peer: str | None = Field(
        default=None,
        max_length=256,
        description="Where the scheduler's container runs; default this node's own host",
    )
    name: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    image: str | None = Field(
        default=None, max_length=256, description="Default: the Dask image of this environment"
    )
    timeout: float = Field(
        default=180.0, gt=0, le=3600, description="Seconds a scheduler or worker may take to start"
    )


class ClusterScale(_Request):
    """What ``POST /clusters/{id}/scale`` asks for: the number of workers wanted."""

    workers: int = Field(ge=0, le=MAX_WORKERS)


class ClusterSecurity(BaseModel):
    """Where the client's TLS files of a cluster are (in the node's home, mode 0600)."""

    model_config = ConfigDict(frozen=True)

    ca_file: str
    cert_file: str
    key_file: str


class WorkerView(BaseModel):
    """One worker: its container, the peer it runs on, the address Dask knows it by."""

    model_config = ConfigDict(frozen=True)

    name: str
    peer: str = Field(default="", description="The peer's name")
    state: WorkerState = WorkerState.STARTING
    address: str = Field(default="", description="tls://127.0.0.1:PORT, through the node")
    container: ContainerView | None = None
    reason: str = ""
    skipped: list[str] = Field(default_factory=list, description="'peer: why' for each refusal")


class ClusterView(BaseModel):
    """A cluster as its owner's node keeps it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    state: ClusterState
    reason: str = Field(default="", description="Why it failed (or what it waits for)")
    scheduler_address: str = Field(default="", description="tls://127.0.0.1:PORT on this host")
    dashboard_link: str = Field(default="", description="http://127.0.0.1:PORT/status")
    scheduler_peer: str = ""
    scheduler: ContainerView | None = None
    security: ClusterSecurity | None = None
    workers: list[WorkerView] = Field(default_factory=list)
    versions: dict[str, str] = Field(
        default_factory=dict, description="dask, distributed, ... in the image"
    )
    created_at: float
    closed_at: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class ClusterEvent(BaseModel):
    """One line of the NDJSON answer of ``POST /clusters``: progress, then the cluster."""

    model_config = ConfigDict(frozen=True)

    event: Literal["progress", "created", "error"]
    message: str | None = None
    cluster: ClusterView | None = None
    error: dict[str, str] | None = None
