"""One job, start to end: place its ranks, upload, run, follow, download, clean up.

A container is made per rank on a peer through the tracked-containers service; the rank
runs there over SSH (``remote.RankSession``). Whatever happens, the containers are
removed at the end (unless the task keeps them) — except when the node itself stops:
then the job stays ``running`` and the next start of the node reattaches to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from ..client import is_address
from ..containers.service import FIRST_EXTRA_PORT, Progress
from ..containers.sftp import Route
from ..errors import (
    ContainerError,
    JobError,
    NotTrusted,
    P2PRCError,
    PeerError,
    PeerNotFound,
    PeerProtocolError,
)
from ..models import ContainerView, CreateContainer
from .models import JobState, JobView, RankPlacement
from .placement import Candidate, order_for_rank
from .remote import RankSession, ResultBudget, job_script
from .store import JobStore
from .task import Task

__all__ = [
    "MAX_LOG",
    "MAX_RESULTS",
    "SKIP",
    "ContainerHost",
    "FindPeers",
    "JobRunner",
    "SshHosts",
    "canonical_host",
    "checked_ssh_host",
]

log = logging.getLogger(__name__)

# A peer that answers so is skipped for the next one; any other error fails the rank.
SKIP = (NotTrusted, ContainerError, PeerError, PeerNotFound)
_OFFSET_EVERY = 1.0
# Bytes of log a job keeps on the submitting node.
MAX_LOG = 256 * 1024**2
# Bytes of results a job brings back to the submitting node (all ranks together).
MAX_RESULTS = 10 * 1024**3
# Logins again to the same container before a rank counts as lost.
_RECONNECTS = 3
# Seconds between looks at the membership state of the nodes hosting ranks.
_WATCH_EVERY = 1.0
# Seconds between upload progress lines in the job's log.
_PROGRESS_EVERY = 2.0
T = TypeVar("T")


class ContainerHost(Protocol):
    """Creates and removes containers on peers (``containers.tracked.TrackedContainers``)."""

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: Progress | None = None
    ) -> ContainerView: ...

    async def remove(self, container: str) -> str: ...


FindPeers = Callable[[Task], tuple[list[Candidate], list[str]]]
# The hosts a peer (node id) publishes in its signed record, and its relay's; None when
# no record of it is known.
SshHosts = Callable[[str], set[str] | None]


class _PeerGone(Exception):
    """Membership declared the rank's hosting node dead: no use logging in again.

    Internal, outside the P2PRCError tree: it never leaves the runner (``_follow``
    catches it with the peer errors and retries the rank or fails the job)."""


class _Failed(Exception):
    """The job ends in ``state`` with ``reason``."""

    def __init__(self, state: JobState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


class JobRunner:
    """Runs one job to its final state."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        host: ContainerHost,
        key_file: Path,
        find_peers: FindPeers,
        peer_gone: Callable[[str], bool] = lambda node_id: False,
        ssh_hosts: SshHosts = lambda node_id: None,
        max_results: int = MAX_RESULTS,
        on_change: Callable[[], None] = lambda: None,
        route: Route | None = None,
    ) -> None:
        self._store = store
        self._route = route
        self._changed = on_change
        self._ssh_hosts = ssh_hosts
        self._budget = ResultBudget(max_results)
        self._results_error = ""
        self._gone = peer_gone
        self.job_id = job_id
        self._host = host
        self._key_file = key_file
        self._find = find_peers
        self._sessions: dict[int, RankSession] = {}
        self._views: dict[int, ContainerView] = {}
        self._saved_at: dict[int, float] = {}
        self._reconnects: dict[int, int] = {}
        self._logged: int | None = None
        self._first_failure: int | None = None
        # Set by cancel(): the task's cancellation is the owner's, not the node stopping.
        self.cancelled = False
        # Set once the job is over and its containers are being removed: a cancel now
        # would only interrupt the removal.
        self.closing = False

    def __repr__(self) -> str:
        return f"<JobRunner {self.job_id} [{len(self._views)} containers]>"

    def note(self, line: str, rank: int | None = None) -> None:
        """A line in the job's log from the job layer itself."""
        self._store.append_log(self.job_id, None, line if rank is None else f"rank {rank}: {line}")
        self._changed()

    async def run(self, *, resume: bool = False) -> None:
        """The job, to its final state (cancellation by the node leaves it to reattach)."""
        job = self._store.get(self.job_id)
        leave = False
        try:
            if resume:
                await self._resume(job)
            else:
                await self._execute(job)
        except asyncio.CancelledError:
            if self.cancelled:
                self._finish(JobState.CANCELLED, "cancelled by the owner")
            else:  # the node stops: a running job is reattached to at its next start
                leave = self._store.get(self.job_id).state is JobState.RUNNING
            raise
        except _Failed as failed:
            self._finish(failed.state, failed.reason)
        except P2PRCError as exc:
            self._finish(JobState.FAILED, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("job %s crashed", self.job_id)
            self._finish(JobState.FAILED, f"internal error: {exc!r}")
        finally:
            self.closing = True
            await self._close(remove=not (leave or job.task.keep))

    def _finish(self, state: JobState, reason: str) -> None:
        if self._store.set_state(self.job_id, state, reason) is not None:
            self.note(f"{state.value}: {reason}" if reason else state.value)

    async def _execute(self, job: JobView) -> None:
        task = job.task
        self._move(JobState.PLACING, "placing")
        for rank in range(task.nodes):
            await self._place(task, rank, exclude=set())
        await _together([self._prepare(task, rank) for rank in range(task.nodes)])
        addresses = self._addresses(task)
        for rank in range(task.nodes):
            await self._sessions[rank].start(job_script(task, self._env(rank, addresses)))
        self._move(JobState.RUNNING, "")
        await self._follow_all(task)

    async def _resume(self, job: JobView) -> None:
        """Reattach to a job that was running when the node stopped."""
        for placement in job.placements:
            if placement.container is None:
                raise _Failed(JobState.FAILED, f"rank {placement.rank} was never placed")
            self._views[placement.rank] = placement.container
        self.note("the submitting node restarted; reattaching")
        for placement in job.placements:
            rank, view = placement.rank, self._views[placement.rank]
            try:
                self._sessions[rank] = await self._connect(view)
            except PeerError as exc:
                if placement.attempt >= job.task.retries:
                    raise _Failed(JobState.FAILED, f"rank {rank} lost its peer: {exc}") from None
                self.note(f"lost {placement.peer} ({exc}); retrying elsewhere", rank)
                session = RankSession(view, self._key_file, route=self._route)
                self._sessions[rank] = session  # closed: replaced
                await self._retry(job.task, rank, placement)
        await self._follow_all(job.task)

    def _move(self, state: JobState, reason: str) -> None:
        if self._store.set_state(self.job_id, state, reason) is None:
            raise _Failed(JobState.FAILED, f"the job could not move to {state.value}")

    async def _place(self, task: Task, rank: int, exclude: set[str]) -> ContainerView:
        unfit: list[str] = []
        if task.peers:  # the owner pinned them: used as given, in their order
            found = [Candidate(peer, peer) for peer in task.peers]
        else:
            found, unfit = self._find(task)
        skipped = list(unfit)
        attempt = self._store.get(self.job_id).placements[rank].attempt + (1 if exclude else 0)
        spec = CreateContainer(
            image=task.image,
            cpus=task.resources.cpus,
            memory=task.resources.memory,
            gpus=task.resources.gpus,
            ports=task.ports,
            name=f"{self.job_id}-{rank}" + (f"-{attempt}" if attempt else ""),
        )

        async def progress(message: str) -> None:
            self.note(message, rank)

        for candidate in order_for_rank([c for c in found if c.peer not in exclude], rank):
            try:
                view = await self._create(rank, candidate.peer, spec, progress)
                view = await checked_ssh_host(self._host, self._ssh_hosts, candidate.peer, view)
            except SKIP as exc:
                skipped.append(f"{candidate.name}: {exc.code}: {exc}")
                self.note(f"skipped {candidate.name}: {exc}", rank)
                continue
            self._views[rank] = view
            placement = RankPlacement(
                rank=rank,
                peer=candidate.name,
                container=view,
                attempt=attempt,
                skipped=skipped,
            )
            self._store.set_placement(self.job_id, placement)
            self.note(f"placed on {candidate.name} (container {view.id})", rank)
            return view
        why = "; ".join(skipped) or "no peer is known (see 'p2prc peers list')"
        raise _Failed(JobState.FAILED, f"no peer could take rank {rank}: {why}")

    async def _create(
        self, rank: int, peer: str, spec: CreateContainer, progress: Progress
    ) -> ContainerView:
        """A container on ``peer``; a cancel waits for it (the peer makes it anyway), so
        that it is removed with the others rather than left behind."""
        creating = asyncio.ensure_future(self._host.create_on_peer(peer, spec, progress))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._views[rank] = await creating
            raise

    async def _connect(self, view: ContainerView) -> RankSession:
        session = RankSession(view, self._key_file, route=self._route)
        await session.connect()
        return session

    async def _prepare(self, task: Task, rank: int) -> None:
        session = self._sessions[rank] = await self._connect(self._views[rank])
        total = 0 if task.workdir is None else await asyncio.to_thread(_tree_size, task.workdir)
        started = shown = time.monotonic()
        sent = 0

        def progress(size: int) -> None:
            nonlocal sent, shown
            sent += size
            if time.monotonic() - shown >= _PROGRESS_EVERY:
                shown = time.monotonic()
                self.note(f"uploading: {_mib(sent)} of {_mib(total)} MiB", rank)

        await session.upload(task.workdir, progress)
        if task.workdir is not None:
            took = time.monotonic() - started
            self.note(f"uploaded {_mib(sent)} MiB in {took:.1f} s", rank)

    def _addresses(self, task: Task) -> list[str]:
        """Where each rank can be reached: its first extra port when it has one."""
        found = []
        for rank in range(task.nodes):
            view = self._views[rank]
            ports = [p for p in view.ports if p.container_port == FIRST_EXTRA_PORT]
            if ports and ports[0].public:
                found.append(ports[0].public)
            elif ports:
                found.append(_join(view.ssh.host, ports[0].host_port))
            else:
                found.append(view.ssh.host)
        return found

    def _env(self, rank: int, addresses: list[str]) -> dict[str, str]:
        return {
            "P2PRC_JOB_ID": self.job_id,
            "P2PRC_NODE_RANK": str(rank),
            "P2PRC_NUM_NODES": str(len(addresses)),
            "P2PRC_NODE_ADDRS": "\n".join(addresses),
        }

    async def _follow_all(self, task: Task) -> None:
        limit = task.time_limit_s
        job = self._store.get(self.job_id)
        remaining = None if limit is None else max(0.0, job.created_at + limit - time.time())
        codes: dict[int, tuple[int | None, bool]] = {}
        try:
            async with asyncio.timeout(remaining):
                await _together([self._follow(task, rank, codes) for rank in list(self._sessions)])
        except TimeoutError:
            for session in self._sessions.values():
                await session.kill()
            await self._download(task)
            raise _Failed(JobState.TIMED_OUT, f"the time limit of {limit:g} s ran out") from None
        await self._download(task)
        # The rank that failed first, then the others (stopped because of it).
        for rank in sorted(codes, key=lambda rank: (rank != self._first_failure, rank)):
            code, oom = codes[rank]
            if oom and code != 0:
                memory = task.resources.memory or "the peer's default"
                raise _Failed(JobState.OOM, f"rank {rank} ran out of memory ({memory})")
            if code is None:
                raise _Failed(JobState.FAILED, f"rank {rank} ended without an exit status")
            if code != 0:
                hint = " (killed: SIGKILL, often out of memory)" if code == 137 else ""
                raise _Failed(JobState.FAILED, f"rank {rank} exited with code {code}{hint}")
        if self._results_error:
            raise _Failed(JobState.FAILED, self._results_error)
        self._finish(JobState.SUCCEEDED, "")

    async def _follow(
        self, task: Task, rank: int, codes: dict[int, tuple[int | None, bool]]
    ) -> None:
        while True:
            session = self._sessions[rank]
            placement = self._store.get(self.job_id).placements[rank]

            async def on_line(line: str, offset: int, rank: int = rank) -> None:
                self._keep_line(rank, line)
                self._save_offset(rank, offset)

            try:
                offset = await self._watched(rank, session.follow(placement.log_offset, on_line))
                self._save_offset(rank, offset, force=True)
                codes[rank] = await session.exit_code()
                if codes[rank][0] != 0 and self._first_failure is None:
                    self._first_failure = rank
                    await self._stop_others(rank)
                done = self._store.get(self.job_id).placements[rank]
                self._store.set_placement(
                    self.job_id, done.model_copy(update={"exit_code": codes[rank][0]})
                )
                return
            except (PeerError, _PeerGone) as exc:
                if not isinstance(exc, _PeerGone) and await self._reconnect(rank):
                    continue
                if placement.attempt >= task.retries:
                    raise _Failed(JobState.FAILED, f"rank {rank} lost its peer: {exc}") from None
                self.note(f"lost {placement.peer} ({exc}); retrying elsewhere", rank)
            await self._retry(task, rank, placement)

    async def _stop_others(self, failed: int) -> None:
        """One rank failed: the others are stopped (a rank waiting on it would hang)."""
        others = [r for r in self._sessions if r != failed]
        if others:
            self.note(f"rank {failed} failed; stopping ranks {', '.join(map(str, others))}")
        for rank in others:
            await self._sessions[rank].kill()

    async def _watched(self, rank: int, work: Coroutine[Any, Any, T]) -> T:
        """``work``, unless membership declares the rank's hosting node dead first."""
        peer = self._views[rank].peer
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_WATCH_EVERY)
                if done:
                    return task.result()
                if self._gone(peer):
                    raise _PeerGone(f"membership declared its node {peer[:12]} dead")
        finally:
            if not task.done():
                task.cancel()
                await _reaped(task)

    async def _reconnect(self, rank: int) -> bool:
        """Log in again to the rank's container (a dropped connection, not a dead peer)."""
        tries = self._reconnects[rank] = self._reconnects.get(rank, 0) + 1
        if tries > _RECONNECTS:
            return False
        await self._sessions[rank].aclose()
        try:
            self._sessions[rank] = await self._connect(self._views[rank])
        except PeerError:
            return False
        self.note("reconnected to its container", rank)
        return True

    async def _retry(self, task: Task, rank: int, placement: RankPlacement) -> None:
        self._move(JobState.PLACING, f"retrying rank {rank}")
        old = self._views.pop(rank)
        await self._sessions.pop(rank).aclose()
        with contextlib.suppress(P2PRCError):
            await self._host.remove(old.id)
        exclude = {placement.container.peer if placement.container else "", placement.peer}
        await self._place(task, rank, exclude)
        self._reconnects.pop(rank, None)
        await self._prepare(task, rank)
        addresses = self._addresses(task)
        await self._sessions[rank].start(job_script(task, self._env(rank, addresses)))
        self._move(JobState.RUNNING, "")

    def _keep_line(self, rank: int, line: str) -> None:
        """Keep a rank's line, up to MAX_LOG bytes of log per job (then one note, no more)."""
        if self._logged is None:
            with contextlib.suppress(OSError):
                self._logged = self._store.log_file(self.job_id).stat().st_size
        size = self._logged = (self._logged or 0) + len(line) + 64
        if size <= MAX_LOG:
            self._store.append_log(self.job_id, rank, line)
            self._changed()
        elif size - len(line) - 64 <= MAX_LOG:
            self.note(f"the log passed {MAX_LOG // 1024**2} MiB; further lines are not kept")

    def _save_offset(self, rank: int, offset: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at.get(rank, 0.0) < _OFFSET_EVERY:
            return
        self._saved_at[rank] = now
        placement = self._store.get(self.job_id).placements[rank]
        self._store.set_placement(self.job_id, placement.model_copy(update={"log_offset": offset}))

    async def _download(self, task: Task) -> None:
        if not task.outputs:
            return
        target = self._store.results_dir(self.job_id)
        target.mkdir(mode=0o700, exist_ok=True)
        for rank, session in sorted(self._sessions.items()):

            def note(message: str, rank: int = rank) -> None:
                self.note(message, rank)

            started = time.monotonic()
            try:
                count = await session.download(task.outputs, target, note, self._budget)
            except PeerError as exc:
                self.note(f"could not download its outputs: {exc}", rank)
                continue
            except JobError as exc:
                self._results_error = f"rank {rank}: {exc}"
                self.note(str(exc), rank)
                return
            self.note(f"downloaded {count} files in {time.monotonic() - started:.1f} s", rank)

    async def _close(self, *, remove: bool) -> None:
        for session in self._sessions.values():
            await session.aclose()
        self._sessions.clear()
        if not remove:
            return
        for rank, view in sorted(self._views.items()):
            try:
                await self._host.remove(view.id)
            except P2PRCError as exc:
                self.note(f"could not remove container {view.id}: {exc}", rank)
        self._views.clear()


async def _together(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` at once; the first failure cancels the rest (and waits for them)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def checked_ssh_host(
    host: ContainerHost, ssh_hosts: SshHosts, typed: str, view: ContainerView
) -> ContainerView:
    """``view`` (made on the peer the owner ``typed``), once its SSH host is one its peer
    publishes (or its relay, or the address the owner pinned); else the container is
    removed, nothing connects, and ``PeerProtocolError`` says why."""
    allowed = ssh_hosts(view.peer) or set()
    if is_address(typed):  # pinned as host:port or a URL: the host the owner gave
        with contextlib.suppress(ValueError):
            allowed.add(canonical_host(urlsplit(_as_url(typed)).hostname or ""))
    if canonical_host(view.ssh.host) in allowed:
        return view
    with contextlib.suppress(P2PRCError):
        await host.remove(view.id)
    raise PeerProtocolError(
        f"its container's SSH host {view.ssh.host} is not an address it publishes "
        "(nor its relay's); not connecting there"
    )


async def _reaped(task: asyncio.Future[Any]) -> None:
    """Wait for a cancelled child to end; only a cancel of the waiting task itself (the
    node stopping, the owner's cancel) goes on from here."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except P2PRCError:
        pass


def _tree_size(folder: str) -> int:
    """Bytes of the regular files under ``folder`` (links not followed)."""
    total = 0
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(parent, name))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def canonical_host(host: str) -> str:
    """A host as the SSH check compares it: an IP address in its one form, else lowercase."""
    text = host.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _as_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f}"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
