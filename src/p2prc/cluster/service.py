"""The node's Dask clusters: create, scale, watch and remove them; durable in SQLite.

The owner's node owns every cluster. The scheduler gets a container (on this node's own
host unless ``scheduler_peer`` says where), each worker one on a peer placed like a job's
rank, and every Dask connection goes through this node's SSH hub (``hub.Hub``): nothing
Dask listens on is ever published. TLS certificates come from the cluster's own CA
(``certs.ClusterCA``); keys reach containers over the pinned SSH session only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..config import Home
from ..containers.sftp import Route
from ..direct.ssh import node_route
from ..errors import (
    ClusterError,
    ContainerNotFound,
    ImageNotFound,
    NotFound,
    P2PRCError,
)
from ..jobs.placement import Candidate, candidates, order_for_rank
from ..jobs.runner import SKIP, ContainerHost, checked_ssh_host
from ..jobs.service import JobNode, peer_hosts
from ..jobs.task import Resources
from ..models import ContainerView, CreateContainer
from ..peers.link import PeerLink
from . import image as images
from .certs import ClusterCA, Issued
from .hub import Hub, Member
from .image import dask_image
from .models import ClusterCreate, ClusterState, ClusterView, WorkerState, WorkerView
from .remote_image import ensure_on_peer
from .store import ClusterStore

__all__ = [
    "DASHBOARD_PORT",
    "SCHEDULER_PORT",
    "WORKER_PORT",
    "ClusterNode",
    "ClusterService",
    "FindPlaces",
    "ImageSource",
    "Progress",
    "dask_image",
    "for_node",
]

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]
# The candidates for a worker of these resources (this node among them when it fits), and
# 'name: why' for the peers that do not fit.
FindPlaces = Callable[[Resources], tuple[list[Candidate], list[str]]]
# The image to use (the spec's, else this environment's Dask image, made if missing) and
# the versions it carries; a ClusterError when they do not match this environment.
ImageSource = Callable[[str | None, Progress], Awaitable[tuple[str, dict[str, str]]]]
# Have a peer (as placement names it; its name for progress) make the Dask image of these
# versions before a container of it is created there (``remote_image.ensure_on_peer``).
PeerImage = Callable[[str, str, dict[str, str], Progress], Awaitable[object]]
# The hosts a peer (node id) publishes (``jobs.service.published_hosts``); None: unknown.
SshHosts = Callable[[str], set[str] | None]

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
WORKER_PORT = 8788
_DASK = "/opt/dask/bin/dask"
_SCHEDULER = "scheduler"
_TLS = "--tls-ca-file ca.pem --tls-cert cert.pem --tls-key key.pem"
_ACTIVE = (WorkerState.STARTING, WorkerState.RUNNING)
_READY = {_SCHEDULER: "Scheduler at:", "worker": "Registered to:"}
_CLEAN_TRIES = 3
_CLEAN_EVERY = 2.0
# A stop removes the running clusters' containers within this (the node gives the services
# `[timeouts] shutdown` + 5 s); what is left is failed and removed at the next start.
_STOP_WITHIN = 5.0


@dataclass(eq=False)
class _Live:
    """What a cluster has in memory while it runs: its CA, hub and worker counter."""

    ca: ClusterCA
    hub: Hub
    image: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    scheduler_port: int = 0
    next_worker: int = 1
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ClusterService(Component):
    """Owns the Dask clusters this node made, and the hub of each running one."""

    def __init__(
        self,
        store: ClusterStore,
        host: ContainerHost,
        key_file: Path,
        find_places: FindPlaces,
        image: ImageSource,
        *,
        me: Candidate,
        me_id: str,
        ssh_hosts: SshHosts = lambda node_id: None,
        peer_image: PeerImage | None = None,
        on_crash: CrashHandler = log_crash,
        route: Route | None = None,
    ) -> None:
        self.store = store
        self._route = route
        self._host = host
        self._key_file = key_file
        self._find = find_places
        self._image = image
        self._me = me
        self._me_id = me_id
        self._ssh_hosts = ssh_hosts
        self._peer_image = peer_image
        self._on_crash = on_crash
        self._tasks = TaskSet(on_crash)
        self._live: dict[str, _Live] = {}
        self._stopping = False

    def __repr__(self) -> str:
        return f"<ClusterService [{len(self._live)} running]>"

    async def start(self) -> None:
        """Clusters that ran when the node stopped have lost their hub: failed, and their
        containers removed (in the background: a peer that does not answer must not hold
        up the node)."""
        for cluster in self.store.unfinished():
            reason = "the node restarted; its containers are removed"
            view = self.store.update(cluster.id, state=ClusterState.FAILED, reason=reason)
            self._tasks.spawn(self._clean(view), f"cluster-clean-{view.id}")

    async def _clean(self, view: ClusterView) -> None:
        """Remove a failed cluster's containers; tried again a few times, for a peer that
        answers late."""
        for _ in range(_CLEAN_TRIES):
            if await self._remove_containers(view):
                return
            await asyncio.sleep(_CLEAN_EVERY)

    async def aclose(self) -> None:
        """Stop: each running cluster's hub is closed and its containers removed (tried
        briefly; what is left is failed and removed at the next start)."""
        self._stopping = True  # the API still serves meanwhile: nothing new may start
        await self._tasks.cancel_all()

        async def stop(cluster_id: str, live: _Live) -> None:
            await live.hub.aclose()
            if await self._remove_containers(self.store.get(cluster_id)):
                self.store.update(cluster_id, state=ClusterState.FAILED, reason="the node stopped")

        # All at once, under one bound inside the node's own stop budget.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_WITHIN):
                await asyncio.gather(
                    *(stop(cluster_id, live) for cluster_id, live in list(self._live.items())),
                    return_exceptions=True,
                )
        self._live.clear()

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise ClusterError("the node is stopping; start the cluster once it runs again")

    def list(self) -> list[ClusterView]:
        return self.store.all()

    def get(self, cluster: str) -> ClusterView:
        """A cluster by id, unique id prefix, or name (``ClusterNotFound``)."""
        return self.store.get(cluster)

    async def create(self, spec: ClusterCreate, progress: Progress | None = None) -> ClusterView:
        """A cluster whose scheduler and ``spec.workers`` workers run; a ``ClusterError``
        with the reason otherwise, and nothing left behind."""
        self._refuse_if_stopping()
        say = progress or _quiet
        view = self.store.create(spec)
        cluster_id = view.id
        try:
            image, versions = await self._image(spec.image, say)
            ca = ClusterCA.create(cluster_id)
            security = self.store.write_security(
                cluster_id, ca.cert_pem, *_pair(ca.issue("client"))
            )
            hub = Hub(self._key_file, self._lost_hook(view), self._on_crash, self._route)
            live = self._live[cluster_id] = _Live(ca, hub, image, versions)
            self.store.update(cluster_id, security=security, versions=versions)
            await self._start_scheduler(cluster_id, spec, live, say)
            await _each([self._add(cluster_id, say) for _ in range(spec.workers)])
        except BaseException as exc:
            why = _why(exc)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._tear_down(cluster_id, ClusterState.FAILED, why))
            if isinstance(exc, ClusterError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            if isinstance(exc, P2PRCError):
                raise ClusterError(why) from exc
            raise
        running = self.store.update(cluster_id, state=ClusterState.RUNNING, reason="")
        if running.state is not ClusterState.RUNNING:  # removed while it started
            raise ClusterError(f"cluster {view.name} was {running.state.value} while starting")
        await say(f"cluster {view.name} runs with {spec.workers} worker(s)")
        return running

    async def scale(
        self, cluster: str, workers: int, progress: Progress | None = None
    ) -> ClusterView:
        """Add or remove workers (the newest first) until ``workers`` run or start."""
        self._refuse_if_stopping()
        view = self._running(cluster)
        async with self._live[view.id].lock:  # one scale at a time counts the workers
            view = self._running(view.id)
            active = [w for w in view.workers if w.state in _ACTIVE]
            if workers > len(active):
                more = workers - len(active)
                await _each([self._add(view.id, progress or _quiet) for _ in range(more)])
            for worker in reversed(active[workers:]):
                await self._remove_worker(view.id, worker.name)
        return self.store.get(view.id)

    async def add_worker(self, cluster: str, progress: Progress | None = None) -> WorkerView:
        """One more worker, once it runs and the scheduler knows it."""
        self._refuse_if_stopping()
        view = self._running(cluster)
        return await self._add(view.id, progress or _quiet)

    async def remove_worker(self, cluster: str, worker: str) -> ClusterView:
        """Stop one worker and remove its container (it is forgotten)."""
        view = self._running(cluster)
        if not any(w.name == worker for w in view.workers):
            raise NotFound(f"cluster {view.name} has no worker {worker!r}")
        await self._remove_worker(view.id, worker)
        return self.store.get(view.id)

    async def remove(self, cluster: str) -> ClusterView:
        """Close the cluster: every container removed, its files here too, state closed."""
        view = self.store.get(cluster)
        if view.final and view.id not in self._live:
            await self._remove_containers(view)
            self.store.remove_files(view.id)
            return self.store.get(view.id)
        return await self._tear_down(view.id, ClusterState.CLOSED, "closed by the owner")

    # -- starting members ---------------------------------------------------------------

    async def _start_scheduler(
        self, cluster_id: str, spec: ClusterCreate, live: _Live, say: Progress
    ) -> None:
        target = self._me if spec.scheduler_peer is None else self._pick(spec.scheduler_peer)
        await say(f"scheduler: creating its container on {target.name}")
        create = CreateContainer(image=live.image, name=f"{cluster_id}-scheduler")
        try:
            view = await self._create(target, create, say, live.versions)
        except ImageNotFound as exc:
            where = "this node's" if target is self._me else f"{target.name}'s"
            hint = "set containers.dask = true or add it to containers.images"
            raise ClusterError(f"{exc}; {hint} in {where} config") from None
        self.store.update(cluster_id, scheduler=view, scheduler_peer=target.name)
        member = await live.hub.add(_SCHEDULER, view, [SCHEDULER_PORT], [DASHBOARD_PORT])
        command = (
            f"{_DASK} scheduler --protocol tls --host 127.0.0.1 --port {SCHEDULER_PORT} "
            f"--dashboard-address 127.0.0.1:{DASHBOARD_PORT} {_TLS}"
        )
        await self._launch(member, live, _SCHEDULER, command, spec.timeout)
        live.hub.watch(_SCHEDULER)
        live.scheduler_port = member.port(SCHEDULER_PORT)
        self.store.update(
            cluster_id,
            scheduler_address=f"tls://127.0.0.1:{live.scheduler_port}",
            dashboard_link=f"http://127.0.0.1:{member.port(DASHBOARD_PORT)}/status",
        )
        await say(f"scheduler: running at tls://127.0.0.1:{live.scheduler_port}")

    async def _add(self, cluster_id: str, say: Progress) -> WorkerView:
        live = self._live[cluster_id]
        spec = self.store.spec(cluster_id)
        number = live.next_worker
        live.next_worker += 1
        name = f"w{number}"
        worker = WorkerView(name=name)
        self.store.set_worker(cluster_id, worker)
        try:
            worker = await self._place(cluster_id, spec, live, name, number, say)
            member = await live.hub.add(name, _container(worker), [WORKER_PORT])
            address = f"tls://127.0.0.1:{member.port(WORKER_PORT)}"
            worker = worker.model_copy(update={"address": address})
            self.store.set_worker(cluster_id, worker)
            command = _worker_command(spec, worker, live.scheduler_port, address)
            await self._launch(member, live, f"worker-{name}", command, spec.timeout)
            live.hub.watch(name)
        except BaseException as exc:
            why = _why(exc)
            worker = worker.model_copy(update={"state": WorkerState.FAILED, "reason": why})
            self.store.set_worker(cluster_id, worker)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._drop_worker(cluster_id, worker))
            if isinstance(exc, P2PRCError) and not isinstance(exc, ClusterError):
                raise ClusterError(f"worker {name}: {why}") from exc
            raise
        worker = worker.model_copy(update={"state": WorkerState.RUNNING})
        self.store.set_worker(cluster_id, worker)
        await say(f"worker {name}: running on {worker.peer} at {worker.address}")
        return worker

    async def _place(
        self,
        cluster_id: str,
        spec: ClusterCreate,
        live: _Live,
        name: str,
        number: int,
        say: Progress,
    ) -> WorkerView:
        """The worker's container on the first candidate that takes it (spread by number)."""
        if spec.peers:
            found, skipped = [self._pick(peer) for peer in spec.peers], list[str]()
        else:
            found, skipped = self._find(spec.worker)
        needs = spec.worker
        create = CreateContainer(
            image=live.image,
            cpus=needs.cpus,
            memory=needs.memory,
            gpus=needs.gpus,
            name=f"{cluster_id}-{name}",
        )
        for candidate in order_for_rank(found, number - 1):
            await say(f"worker {name}: trying {candidate.name}")
            try:
                view = await self._create(candidate, create, say, live.versions)
            except SKIP as exc:
                skipped.append(f"{candidate.name}: {exc.code}: {exc}")
                await say(f"worker {name}: skipped {candidate.name}: {exc}")
                continue
            worker = WorkerView(name=name, peer=candidate.name, container=view, skipped=skipped)
            self.store.set_worker(cluster_id, worker)
            return worker
        why = "; ".join(skipped) or "no peer is known (see 'p2prc peers list')"
        raise ClusterError(f"no peer could take worker {name}: {why}")

    def _pick(self, typed: str) -> Candidate:
        """What the owner typed, as a candidate (this node by its name, id or address)."""
        text = typed.strip()
        if text in (self._me.name, self._me.peer, self._me_id):
            return self._me
        return Candidate(text, text)

    async def _create(
        self, target: Candidate, spec: CreateContainer, say: Progress, versions: dict[str, str]
    ) -> ContainerView:
        """A container on ``target`` (a peer makes the Dask image first), its SSH host
        checked; a cancel waits for it (the peer makes it anyway) so that it is removed
        with the rest."""
        image = spec.image or ""
        if target is not self._me and self._peer_image and versions and images.is_dask_tag(image):
            await self._peer_image(target.peer, target.name, versions, say)
        creating = asyncio.ensure_future(self._host.create_on_peer(target.peer, spec, say))
        try:
            view = await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                view = await creating
                with contextlib.suppress(P2PRCError):
                    await self._host.remove(view.id)
            raise
        if target is self._me:
            return view
        return await checked_ssh_host(self._host, self._ssh_hosts, target.peer, view)

    async def _launch(
        self, member: Member, live: _Live, role: str, command: str, limit: float
    ) -> None:
        """Start ``command`` in the member's container with the role's own certificate."""
        issued = live.ca.issue(role)
        files = {"ca.pem": live.ca.cert_pem, "cert.pem": issued.cert_pem, "key.pem": issued.key_pem}
        mark = _READY[_SCHEDULER if role == _SCHEDULER else "worker"]
        await live.hub.launch(member.name, files, command, mark, limit)

    # -- losing and removing members ----------------------------------------------------

    def _lost_hook(self, view: ClusterView) -> Callable[[str, str], None]:
        def lost(name: str, why: str) -> None:
            self._tasks.spawn(self._lost(view.id, name, why), f"cluster-lost-{view.id}-{name}")

        return lost

    async def _lost(self, cluster_id: str, name: str, why: str) -> None:
        if cluster_id not in self._live:
            return
        if name == _SCHEDULER:
            reason = f"the scheduler was lost: {why}"
            await self._tear_down(cluster_id, ClusterState.FAILED, reason)
            return
        view = self.store.get(cluster_id)
        for worker in view.workers:
            if worker.name == name and worker.state is not WorkerState.FAILED:
                lost = worker.model_copy(update={"state": WorkerState.LOST, "reason": why})
                self.store.set_worker(cluster_id, lost)
                await self._drop_worker(cluster_id, lost)

    async def _remove_worker(self, cluster_id: str, name: str) -> None:
        for worker in self.store.get(cluster_id).workers:
            if worker.name == name:
                await self._drop_worker(cluster_id, worker)
                self.store.forget_worker(cluster_id, name)

    async def _drop_worker(self, cluster_id: str, worker: WorkerView) -> None:
        live = self._live.get(cluster_id)
        if live is not None:
            await live.hub.remove(worker.name)
        if worker.container is not None:
            await self._remove_container(worker.container)

    async def _tear_down(self, cluster_id: str, state: ClusterState, reason: str) -> ClusterView:
        live = self._live.pop(cluster_id, None)
        view = self.store.update(cluster_id, state=state, reason=reason)
        if live is not None:
            await live.hub.aclose()
        await self._remove_containers(view)
        if state is ClusterState.CLOSED:
            self.store.remove_files(cluster_id)
        return self.store.get(cluster_id)

    async def _remove_containers(self, view: ClusterView) -> bool:
        """Remove the cluster's containers; whether every one is gone."""
        containers = [w.container for w in view.workers if w.container is not None]
        if view.scheduler is not None:
            containers.append(view.scheduler)
        done = await asyncio.gather(*(self._remove_container(c) for c in containers))
        return all(done)

    async def _remove_container(self, view: ContainerView) -> bool:
        try:
            await self._host.remove(view.id)
        except (ContainerNotFound, NotFound):
            pass
        except P2PRCError as exc:
            log.warning("could not remove container %s of a cluster: %s", view.id, exc)
            return False
        return True

    def _running(self, cluster: str) -> ClusterView:
        view = self.store.get(cluster)
        if view.id not in self._live or view.final:  # starting ones take workers too
            raise ClusterError(f"cluster {view.name} is {view.state.value}, not running")
        return view


def _worker_command(spec: ClusterCreate, worker: WorkerView, scheduler: int, address: str) -> str:
    view = _container(worker)
    cpus = spec.worker.cpus or view.cpus or 1
    threads = spec.threads or max(1, int(cpus))
    memory = spec.worker.memory_bytes or view.memory
    return (
        shlex.join(
            [
                _DASK,
                "worker",
                f"tls://127.0.0.1:{scheduler}",
                "--listen-address",
                f"tls://127.0.0.1:{WORKER_PORT}",
                "--contact-address",
                address,
                "--nthreads",
                str(threads),
                "--memory-limit",
                str(memory) if memory else "auto",
                "--name",
                worker.name,
                "--no-nanny",
                "--no-dashboard",
            ]
        )
        + f" {_TLS}"
    )


def _container(worker: WorkerView) -> ContainerView:
    if worker.container is None:
        raise RuntimeError(f"worker {worker.name} has no container")
    return worker.container


def _pair(issued: Issued) -> tuple[bytes, bytes]:
    return issued.cert_pem, issued.key_pem


async def _each(work: list[Coroutine[Any, Any, Any]]) -> None:
    """Run ``work`` at once; the first failure cancels the rest, waits, and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for item in work:
                group.create_task(item)
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "the node stopped while the cluster was starting"
    if isinstance(exc, P2PRCError):
        return str(exc) or type(exc).__name__
    return f"internal error: {exc!r}"


async def _quiet(message: str) -> None:
    """Progress nobody reads."""


class ClusterNode(JobNode, Protocol):
    """What the cluster service needs from its node: the job service's needs, and the
    address of its own API (the way to its own containers)."""

    @property
    def api_url(self) -> str: ...
    @property
    def link(self) -> PeerLink: ...


def for_node(
    node: ClusterNode, image: ImageSource | None = None, on_crash: CrashHandler = log_crash
) -> ClusterService:
    """The cluster service of a running node: its state, its key, its peers, itself."""
    me_id = node.identity.node_id
    me = Candidate(node.api_url, node.config.name)

    def find(needs: Resources) -> tuple[list[Candidate], list[str]]:
        try:
            members = node.gossip.table.alive()
        except RuntimeError:  # gossip is off: this node alone, unless peers are named
            return [me], []
        found, unfit = candidates(needs, members, me_id, include_me=True)
        found = [me if c.peer == me_id else c for c in found]
        if me not in found and not any(line.startswith(f"{me.name}: ") for line in unfit):
            found.insert(0, me)  # not in its own table: nearest of all
        return found, unfit

    store = ClusterStore(node.state.connection, node.home_path / "clusters")
    return ClusterService(
        store,
        node.tracked,
        Home(node.home_path).identity_key,
        find,
        image or dask_image,
        me=me,
        me_id=me_id,
        ssh_hosts=peer_hosts(node),
        peer_image=partial(ensure_on_peer, node.link),
        on_crash=on_crash,
        route=node_route(lambda: node.paths),
    )
