"""The node's job service: submit, list, follow, cancel, and reattach after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..config import Home, NodeConfig
from ..containers.sftp import Route
from ..direct.paths import Paths
from ..direct.ssh import node_route
from ..errors import InvalidRequest, JobError, NodeNotRunning, P2PRCError
from ..identity import Identity
from ..peers.gossip import Gossip
from ..peers.records import PeerRecord
from ..peers.table import MemberState
from ..state import State
from .models import FINAL_STATES, JobEvent, JobState, JobView
from .placement import Candidate, candidates
from .runner import MAX_RESULTS, ContainerHost, FindPeers, JobRunner, SshHosts, canonical_host
from .store import JobStore
from .task import Task, check_workdir

__all__ = ["JobNode", "JobService", "for_node", "peer_hosts", "published_hosts"]

log = logging.getLogger(__name__)


class JobService(Component):
    """Owns the jobs this node submitted, and the task running each unfinished one."""

    def __init__(
        self,
        store: JobStore,
        host: ContainerHost,
        key_file: Path,
        find_peers: FindPeers,
        on_crash: CrashHandler = log_crash,
        peer_gone: Callable[[str], bool] = lambda node_id: False,
        ssh_hosts: SshHosts = lambda node_id: None,
        max_results: int = MAX_RESULTS,
        route: Route | None = None,
    ) -> None:
        self.store = store
        self._route = route
        self._gone = peer_gone
        self._ssh_hosts = ssh_hosts
        self._max_results = max_results
        self._host = host
        self._key_file = key_file
        self._find = find_peers
        self._tasks = TaskSet(on_crash)
        self._runners: dict[str, tuple[JobRunner, asyncio.Task[None]]] = {}
        # Per job, one event per follower of its log: set when a line or its end comes.
        self._followers: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<JobService [{len(self._runners)} running]>"

    async def start(self) -> None:
        """Reattach to the jobs that ran when the node stopped; fail those it was placing."""
        for job in self.store.unfinished():
            if job.state is JobState.RUNNING:
                self._spawn(job.id, resume=True)
                continue
            reason = "the submitting node stopped while the job was being placed"
            self.store.set_state(job.id, JobState.FAILED, reason)
            self.store.append_log(job.id, None, f"failed: {reason}")
            self._changed(job.id)
            for placement in job.placements:
                if placement.container is not None:
                    with contextlib.suppress(P2PRCError):
                        await self._host.remove(placement.container.id)

    async def aclose(self) -> None:
        """Stop following: running jobs stay running, to be reattached to."""
        self._closed = True  # a job submitted now would have no runner to stop it
        await self._tasks.cancel_all()

    async def submit(self, task: Task) -> JobView:
        """Record a job and start it; returns once it is recorded."""
        if task.workdir is not None:
            if not Path(task.workdir).is_absolute():
                raise InvalidRequest("workdir must be an absolute path on the node's machine")
            await asyncio.to_thread(check_workdir, Path(task.workdir))
        self._check_open()
        job = self.store.create(task)
        self.store.append_log(job.id, None, f"submitted: {task.nodes} rank(s)")
        self._spawn(job.id)
        return job

    def _check_open(self) -> None:
        if self._closed:
            raise NodeNotRunning("the node is stopping; ask again once it runs")

    def _changed(self, job_id: str) -> None:
        """Wake the followers of the job's log."""
        for event in self._followers.get(job_id, ()):
            event.set()

    def _spawn(self, job_id: str, *, resume: bool = False) -> None:
        runner = JobRunner(
            self.store,
            job_id,
            self._host,
            self._key_file,
            self._find,
            peer_gone=self._gone,
            ssh_hosts=self._ssh_hosts,
            max_results=self._max_results,
            on_change=lambda: self._changed(job_id),
            route=self._route,
        )

        async def run() -> None:
            try:
                await runner.run(resume=resume)
            finally:
                self._runners.pop(job_id, None)
                self._changed(job_id)

        task = self._tasks.spawn(run(), f"job-{job_id}")
        self._runners[job_id] = (runner, task)

    def list(self) -> list[JobView]:
        return self.store.all()

    def get(self, job_id: str) -> JobView:
        return self.store.get(job_id)

    async def cancel(self, job_id: str) -> JobView:
        """Stop every rank and remove the containers; a finished job stays as it ended."""
        self._check_open()  # a running job is left to reattach to, never half-cancelled
        job = self.store.get(job_id)
        entry = self._runners.get(job.id)
        if entry is not None:
            runner, task = entry
            if not (runner.cancelled or runner.closing):
                runner.cancelled = True
                task.cancel()
            await asyncio.wait({task})
        elif job.state not in FINAL_STATES:
            self.store.set_state(job.id, JobState.CANCELLED, "cancelled by the owner")
            self._changed(job.id)
        return self.store.get(job.id)

    async def wait(self, job_id: str) -> JobView:
        """The job once it is final."""
        job = self.store.get(job_id)
        entry = self._runners.get(job.id)
        if entry is not None:
            await asyncio.wait({entry[1]})
        return self.store.get(job.id)

    def results_dir(self, job_id: str) -> Path:
        job = self.store.get(job_id)
        folder = self.store.results_dir(job.id)
        if not folder.is_dir():
            raise JobError(f"job {job.id} has no results (yet)")
        return folder

    async def events(self, job_id: str, *, follow: bool = False) -> AsyncIterator[JobEvent]:
        """The job's log lines (then, when following, new ones until it ends), then the job."""
        job = self.store.get(job_id)
        offset = 0
        # Its own event: cleared only by this follower, so no change between its clear
        # and its wait is missed (a shared one could be cleared by another follower).
        changed = asyncio.Event()
        followers = self._followers.setdefault(job.id, set())
        followers.add(changed)
        try:
            while True:
                changed.clear()
                final = self.store.get(job.id).final
                while True:  # everything written so far, a bounded chunk at a time
                    lines, offset = self.store.read_log(job.id, offset)
                    if not lines:
                        break
                    for line in lines:
                        yield JobEvent(event="log", log=line)
                if final or not follow:
                    break
                await changed.wait()
        finally:
            followers.discard(changed)
            if not followers and self._followers.get(job.id) is followers:
                del self._followers[job.id]
        yield JobEvent(event="finished", job=self.store.get(job.id))


class JobNode(Protocol):
    """What the job service needs from its node."""

    @property
    def identity(self) -> Identity: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def state(self) -> State: ...
    @property
    def home_path(self) -> Path: ...
    @property
    def gossip(self) -> Gossip: ...
    @property
    def tracked(self) -> ContainerHost: ...
    @property
    def paths(self) -> Paths: ...


def for_node(node: JobNode, on_crash: CrashHandler = log_crash) -> JobService:
    """The job service of a running node: its state, its key, its peers."""

    def find(task: Task) -> tuple[list[Candidate], list[str]]:
        try:
            gossip = node.gossip
        except RuntimeError:  # gossip is off: only the task's own peers can be used
            return candidates(task, [], node.identity.node_id)
        return candidates(task, gossip.table.alive(), node.identity.node_id)

    def gone(node_id: str) -> bool:
        try:
            member = node.gossip.table.get(node_id)
        except RuntimeError:
            return False
        return member is not None and member.state >= MemberState.DEAD

    store = JobStore(node.state.connection, node.home_path / "jobs")
    key = Home(node.home_path).identity_key
    hosts = peer_hosts(node)
    return JobService(
        store,
        node.tracked,
        key,
        find,
        on_crash=on_crash,
        peer_gone=gone,
        ssh_hosts=hosts,
        route=node_route(lambda: node.paths),
    )


def peer_hosts(node: JobNode) -> SshHosts:
    """The hosts each peer's containers may be reached at (``published_hosts``), read
    from the node's signed table when asked; ``None`` for a peer it has no record of."""

    def hosts(node_id: str) -> set[str] | None:
        try:
            table = node.gossip.table
        except RuntimeError:  # gossip is off, or not running
            return None
        member = table.get(node_id)
        if member is None:
            return None
        relay = table.get(member.record.relay) if member.record.relay else None
        return published_hosts(member.record, None if relay is None else relay.record)

    return hosts


def published_hosts(record: PeerRecord, relay: PeerRecord | None) -> set[str]:
    """The hosts a peer's containers may be reached at: its signed record's addresses,
    where its relay publishes its API, and its relay's own addresses."""
    hosts = {canonical_host(address) for address in record.addresses}
    if record.public_api:
        hosts.add(canonical_host(record.public_api.rpartition(":")[0]))
    if relay is not None:
        hosts |= {canonical_host(address) for address in relay.addresses}
    return hosts - {""}
