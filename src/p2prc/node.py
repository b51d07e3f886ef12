"""The node: one per home, owning the API server, the state and background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import fcntl
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ._aio import CrashHandler, TaskSet
from ._closing import Component
from ._home import home_locked, init_home
from .api import create_app
from .api._server import ApiServer, api_server, bind_api
from .attach import service as attach_service
from .attach.forwarder import RemoteMaps
from .attach.gateway import AttachGateway
from .attach.store import AttachStore
from .cluster import service as cluster_service
from .config import Home, NodeConfig, atomic_write, join_address
from .containers.runtime import ContainerRuntime
from .containers.service import ContainerService
from .containers.store import ContainerStore
from .containers.tracked import TrackedContainers
from .direct import paths as direct_paths
from .direct.punch import PunchSlots
from .errors import NodeAlreadyRunning, NodeError
from .identity import Identity
from .jobs.service import JobService, for_node
from .peers.gossip import Gossip
from .peers.link import PeerLink, PeerTarget
from .plugins.service import PluginRuns
from .state import State
from .trust import TrustPolicy
from .tunnel.mapper import PortMapper
from .tunnel.nat import NatState, dial_back
from .tunnel.relay import RelayLimits, RelayServer

__all__ = ["Node", "home_locked", "init_home"]

log = logging.getLogger(__name__)

_PartT = TypeVar("_PartT")


def _release_memory() -> None:
    """Give the heap freed by start-up back to the OS (glibc only; harmless elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _running(part: _PartT | None, missing: str) -> _PartT:
    if part is None:
        raise RuntimeError(missing)
    return part


class _NodeState(enum.Enum):
    CREATED = 1
    RUNNING = 2
    CLOSED = 3


class Node(Component):
    """One p2prc node.

    Usage::

        async with Node(config, home) as node:
            print(node.api_url)
            await node.wait_closed()
    """

    def __init__(
        self,
        config: NodeConfig,
        home: Home,
        *,
        identity: Identity | None = None,
        host: str | None = None,
        port: int | None = None,
        runtime: ContainerRuntime | None = None,
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._containers: ContainerService | None = None
        self._link: PeerLink | None = None
        self._tracked: TrackedContainers | None = None
        self._plugin_runs: PluginRuns | None = None
        self._jobs: JobService | None = None
        self._clusters: cluster_service.ClusterService | None = None
        self._attached: attach_service.AttachService | None = None
        self._attach_gateway: AttachGateway | None = None
        self._attach_maps: RemoteMaps | None = None
        self._gossip: Gossip | None = None
        self._mapper: PortMapper | None = None
        self._paths: direct_paths.Paths | None = None
        self.punches = PunchSlots()  # hole punches running, one per peer (direct/punch.py)
        self.relay: RelayServer | None = None
        self._listen: socket.socket | None = None
        self._home = home
        self._identity = identity
        self._host = host if host is not None else config.host
        self._requested_port = port if port is not None else config.port
        self._port = 0
        self._lifecycle = _NodeState.CREATED
        self._state: State | None = None
        self._trust: TrustPolicy | None = None
        self._server: ApiServer | None = None
        self._lock_fd: int | None = None
        self._tasks = TaskSet(self._crash_handler(None))
        self._api_task: asyncio.Task[None] | None = None
        # Started components by name: "ok", or "down: <why>" once one of their tasks crashed.
        self._components: dict[str, str] = {}
        self._failure: str | None = None
        # Feature components (gossip, runtime, relay ...) are entered here in dependency
        # order by _start_components() and exited in reverse by aclose(), after the API.
        self._stack = contextlib.AsyncExitStack()
        # The services that call this node's own API (jobs, clusters: their containers on
        # this node are made and removed through it) start after it and stop before it.
        self._callers = contextlib.AsyncExitStack()
        self._closing = asyncio.Event()
        self._started_at = 0.0

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port else "not listening"
        return f"<Node {self._config.name} [{self._lifecycle.name.lower()} | {where}]>"

    # Twins on purpose: one typed property per part of the running node (the check is in
    # _running), so each router's Protocol and mypy see the part's own type.
    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def identity(self) -> Identity:
        return _running(self._identity, "The node has no identity before start().")

    @property
    def state(self) -> State:
        return _running(self._state, "The node's state is open only while it runs.")

    @property
    def containers(self) -> ContainerService:
        return _running(self._containers, "The container service runs only while the node runs.")

    @property
    def gossip(self) -> Gossip:
        return _running(self._gossip, "Gossip runs only while the node runs, and when enabled.")

    @property
    def mapper(self) -> PortMapper:
        return _running(self._mapper, "Port mapping runs only while the node runs.")

    @property
    def paths(self) -> direct_paths.Paths:
        """Direct paths to peers (``direct/paths.py``)."""
        return _running(self._paths, "Direct paths run only while the node runs.")

    @property
    def link(self) -> PeerLink:
        """The one way this node calls other nodes."""
        return _running(self._link, "The peer link runs only while the node runs.")

    @property
    def tracked(self) -> TrackedContainers:
        """Containers this node created on peers."""
        return _running(self._tracked, "Tracked containers run only while the node runs.")

    @property
    def plugin_runs(self) -> PluginRuns:
        """Groups, plugins and plugin runs of this node's owner."""
        return _running(self._plugin_runs, "The plugin service runs only while the node runs.")

    @property
    def jobs(self) -> JobService:
        """Jobs this node submitted to its peers."""
        return _running(self._jobs, "The job service runs only while the node runs.")

    @property
    def clusters(self) -> cluster_service.ClusterService:
        """Dask clusters this node owns."""
        return _running(self._clusters, "The cluster service runs only while the node runs.")

    @property
    def attach_gateway(self) -> AttachGateway:
        """The attach listener: other nodes reach this gateway's attached hosts there."""
        return _running(self._attach_gateway, "The attach listener runs only while the node runs.")

    @property
    def attach_maps(self) -> RemoteMaps:
        """Ports of attached hosts forwarded and published here (map-port --remote)."""
        return _running(self._attach_maps, "Forwarded ports run only while the node runs.")

    @property
    def attached(self) -> attach_service.AttachService:
        """Attached hosts: this gateway's own and those other gateways announce."""
        return _running(self._attached, "The attach service runs only while the node runs.")

    @property
    def container_store(self) -> ContainerStore:
        return ContainerStore(self.state.connection)

    @property
    def home_path(self) -> Path:
        return self._home.path

    @property
    def port(self) -> int:
        """The port the API listens on (the real one when 0 was asked for)."""
        return self._port

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def api_url(self) -> str:
        """Base URL of the API, reachable from this machine."""
        return f"http://{join_address(self._local_host, self._port)}"

    @property
    def _local_host(self) -> str:
        """Where this machine reaches the API: its listen address, loopback for a wildcard."""
        host = self._host
        if host in ("0.0.0.0", "::", ""):
            return "127.0.0.1" if host != "::" else "::1"
        return host

    async def start(self) -> None:
        """Take the home's lock, open the state and start serving the API."""
        if self._lifecycle is not _NodeState.CREATED:
            raise RuntimeError(f"Cannot start a node that is {self._lifecycle.name.lower()}.")
        self._lifecycle = _NodeState.RUNNING
        try:
            self._lock_home()
            if self._identity is None:
                self._identity = Identity.load(self._home.identity_dir)
            self._trust = TrustPolicy(self._config.trust, self._identity.public_key)
            self._state = State(self._home.state_file)
            self._start_services()
            self._started_at = time.time()
            sock = self._listen = self._bind()
            self._port = sock.getsockname()[1]
            await self._start_components()
            await self._start_api(sock)
            await self._start_callers()
            self._write_runtime_file()
            if self._config.behind_nat == "auto" and self._gossip is not None:
                self._spawn(self._detect_nat(self._gossip), name="nat-detection")
            _release_memory()
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "node %s (%s) serving on %s", self._config.name, self.identity.node_id, self.api_url
        )

    def close(self) -> None:
        """Ask the node to stop (``aclose`` stops it); safe from a signal handler and safe
        to repeat."""
        # The API keeps serving until aclose: the services closing first still call it.
        self._closing.set()

    async def wait_closed(self) -> None:
        """Wait until something asked the node to stop."""
        await self._closing.wait()

    @property
    def failure(self) -> str | None:
        """Why the node stopped on its own (a crashed component), else None."""
        return self._failure

    def component_health(self) -> dict[str, str]:
        """Each started component: "ok", or "down: <why>"."""
        return dict(self._components)

    async def aclose(self) -> None:
        """Stop in reverse start order: the services that call the node's own API, the
        API, background tasks, the components; then release the home.

        Errors while closing a component are logged, never raised: the home is released
        whatever happens.
        """
        if self._lifecycle is _NodeState.CLOSED:
            return
        self._lifecycle = _NodeState.CLOSED
        self.close()
        await self._close_stack(self._callers, "the services over the API")
        if self._server is not None and self._api_task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._api_task}, timeout=self._config.timeouts.shutdown + 1)
            self._server.force_exit = True
        await self._tasks.cancel_all()
        await self._close_stack(self._stack, "the node's components")
        if self._listen is not None:
            self._listen.close()
        if self._state is not None:
            try:
                self._state.close()
            except Exception:
                log.exception("closing the state failed")
        if self._lock_fd is not None:
            # Only the holder of the home's lock owns the runtime file.
            self._home.runtime_file.unlink(missing_ok=True)
            self._unlock_home()
            log.info("node %s stopped", self._config.name)

    async def _close_stack(self, stack: contextlib.AsyncExitStack, what: str) -> None:
        """Exit ``stack`` within the shutdown bound; a failure or a hang is logged."""
        limit = self._config.timeouts.shutdown + 5
        try:
            async with asyncio.timeout(limit):
                await stack.aclose()
        except TimeoutError:
            log.error("%s did not stop within %.0f s; leaving them", what, limit)
        except Exception:
            log.exception("closing %s failed", what)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run a background task owned by the node; it is cancelled when the node closes."""
        return self._spawn(coro, name=name)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        return self._tasks.spawn(coro, name)

    def _crash_handler(self, component: str | None) -> CrashHandler:
        """What a component's task set calls when one of its tasks crashes (``None``: the
        node's own tasks, each its own component)."""

        def crashed(task: asyncio.Task[Any], exc: BaseException) -> None:
            # A crashed task stops the node loudly rather than leaving it half-alive.
            name = component or task.get_name()
            reason = f"{task.get_name()} crashed: {type(exc).__name__}: {exc}"
            self._components[name] = f"down: {reason}"
            if self._closing.is_set():
                log.error("%s: %s while the node was stopping", name, reason, exc_info=exc)
                return
            log.error("%s: %s; stopping the node", name, reason, exc_info=exc)
            self._failure = f"{name}: {reason}"
            self.close()

        return crashed

    def _start_services(self) -> None:
        """The services between the API and the components (no tasks or sockets of their own)."""
        db, home = self.state.connection, self._home
        table = (lambda: self.gossip.table) if self._config.gossip.enabled else None
        self._link = PeerLink(self.identity, table, self._config.timeouts)

        def me() -> PeerTarget:  # this node's own API, where it listens now
            return PeerTarget(self.api_url, self.identity.node_id)

        self._tracked = TrackedContainers(self._link, db, home.known_hosts, me=me)
        self._plugin_runs = PluginRuns(
            db, home, self._config.plugin_path, spawn=self.spawn,
            attached=lambda name: self.attached.get(name),
        )  # fmt: skip

    async def _start_components(self) -> None:
        """Start each feature's component; each later feature adds its line here."""
        runtime = self._runtime
        if runtime is None:
            from .containers.docker import DockerRuntime

            offer = self._config.containers
            runtime = self._runtime = DockerRuntime(
                offer.docker_host, blocked=offer.blocked_networks
            )
        service = ContainerService(
            self._config,
            self.identity.node_id,
            self.container_store,
            runtime,
            on_crash=self._crash_handler("containers"),
        )
        self._containers = await self._stack.enter_async_context(service)
        self._components["containers"] = "ok"
        relay = self._config.relay
        if relay.enabled:
            limits = RelayLimits(
                ports_per_client=relay.ports_per_client,
                connections_per_client=relay.connections_per_client,
                max_connections=relay.max_connections,
                domains_per_client=relay.domains_per_client,
                port_range=relay.port_range,
            )
            server = RelayServer(
                self.identity,
                self._home.identity_dir,
                host=self._host,
                port=relay.port,
                public_host=relay.public_host,
                allowed=lambda node_id: self.trust.allows(node_id, "relay"),
                limits=limits,
                http_port=relay.http_port or None,
                https_port=relay.https_port or None,
                on_crash=self._crash_handler("relay"),
            )
            self.relay = await self._stack.enter_async_context(server)
            self._components["relay"] = "ok"
        if self._config.gossip.enabled:
            from .specs import gpus

            gossip = Gossip(
                self.identity,
                self._config,
                self.state,
                api_port=self._port,
                addresses=self.advertised_addresses(),
                gpus=lambda: len(gpus()),
                relay_port=self.relay.port if self.relay else 0,
                on_crash=self._crash_handler("gossip"),
                trust=self.trust,
                nat=NatState(self._config, self.trust),  # the mapper reads gossip's
                link=self.link,
            )
            self._gossip = await self._stack.enter_async_context(gossip)
            self._components["gossip"] = "ok"
            if self._config.gossip.lan_discovery and self._host not in ("127.0.0.1", "::1"):
                from .peers.lan import LanDiscovery

                lan = LanDiscovery(
                    self.identity.node_id,
                    self.advertised_addresses(),
                    self._port,
                    gossip.push_pull,
                    on_crash=self._crash_handler("lan"),
                )
                await self._stack.enter_async_context(lan)
                self._components["lan"] = "ok"

        await self._start_mapper()
        await self._start_paths()
        await self._start_attach_gateway()
        attached = attach_service.for_node(self, on_crash=self._crash_handler("attached"))
        self._attached = await self._stack.enter_async_context(attached)
        self._components["attached"] = "ok"

    async def _start_attach_gateway(self) -> None:
        """The attach listener and the forwarded ports of attached hosts (``attach/``)."""
        addresses = self.advertised_addresses()
        gateway = AttachGateway(
            self.identity,
            self._home.identity_dir,
            lambda: self.attached,
            host=self._host,
            port=self._config.attach.port,
            addresses=addresses,
            publisher=self.mapper,
            on_endpoint=lambda: self.attached.republish(),
            connect_timeout=self._config.timeouts.connect,
            on_crash=self._crash_handler("attach-gateway"),
        )
        self._attach_gateway = await self._stack.enter_async_context(gateway)
        self._components["attach-gateway"] = "ok"
        maps = RemoteMaps(
            AttachStore(self.state.connection),
            lambda: self.attached,
            host=self._host,
            addresses=addresses,
            publisher=self.mapper,
            connect_timeout=self._config.timeouts.connect,
            on_crash=self._crash_handler("attach-maps"),
        )
        self._attach_maps = await self._stack.enter_async_context(maps)

    async def _start_callers(self) -> None:
        """Start the services that call this node's own API, once it serves."""
        jobs = for_node(self, self._crash_handler("jobs"))
        self._jobs = await self._callers.enter_async_context(jobs)
        self._components["jobs"] = "ok"
        clusters = cluster_service.for_node(self, on_crash=self._crash_handler("clusters"))
        self._clusters = await self._callers.enter_async_context(clusters)
        self._components["clusters"] = "ok"

    async def _detect_nat(self, gossip: Gossip) -> None:
        """Ask trusted peers to connect back to our API port (see ``NatState``)."""
        ask = dial_back(self.link, gossip.api_url, self._port)
        await gossip.nat.detect(gossip.table.alive, ask)

    async def _start_paths(self) -> None:
        paths = direct_paths.for_node(
            self,
            listen_host=self._host,
            api_host=self._local_host,
            tls_dir=self._home.identity_dir,
            on_crash=self._crash_handler("direct"),
        )
        self._paths = await self._stack.enter_async_context(paths)
        self.link.paths = paths
        self._components["direct"] = "ok"

    async def _start_mapper(self) -> None:
        mapper = PortMapper(
            self.identity,
            self._config,
            self.state.connection,
            self._gossip,
            self.advertised_addresses(),
            api_port=self._port,
            relay=self.relay,
            api_host=self._local_host,
            on_crash=self._crash_handler("mapper"),
            trust=self.trust,
            tls_dir=self._home.identity_dir,
            nat=self._gossip.nat if self._gossip is not None else None,
        )
        store = self.container_store

        def container_ports(node_id: str) -> set[int]:
            """The host ports of ``node_id``'s containers here: what that peer may map."""
            views = store.hosted(node_id)
            return {p for v in views for p in (v.ssh.port, *(m.host_port for m in v.ports))}

        mapper.peer_ports = container_ports
        self._mapper = await self._stack.enter_async_context(mapper)
        self._components["mapper"] = "ok"
        if self._containers is not None:
            self._containers.publisher = mapper
            self._spawn(self._containers.publish_hosted(), name="publish-containers")

    @property
    def trust(self) -> TrustPolicy:
        """The trust policy every check of this node asks."""
        return _running(self._trust, "The node has no trust policy before start().")

    def advertised_addresses(self) -> list[str]:
        """Addresses in this node's record: configured, else the listen address, else all."""
        from .specs import own_addresses

        if self._config.gossip.advertise:
            return list(self._config.gossip.advertise)
        if self._host not in ("0.0.0.0", "::", ""):
            return [self._host]
        return own_addresses() or ["127.0.0.1"]

    async def _start_api(self, sock: socket.socket) -> None:
        self._server = api_server(create_app(self), shutdown=self._config.timeouts.shutdown)
        task = self._api_task = self._spawn(self._server.serve(sockets=[sock]), name="api")
        while not self._server.started:
            if task.done():
                await task
                raise NodeError("the API server stopped while starting")
            await asyncio.sleep(0.005)
        self._components["api"] = "ok"

    def _bind(self) -> socket.socket:
        return bind_api(self._host, self._requested_port)

    def _lock_home(self) -> None:
        self._home.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeAlreadyRunning(f"a node is already running for {self._home.path}") from None
        self._lock_fd = fd

    def _unlock_home(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write_runtime_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "api": self.api_url,
            "port": self._port,
            "node_id": self.identity.node_id,
        }
        if self._attach_gateway is not None:  # p2prc ssh --proxy: this node's own listener
            gateway = self._attach_gateway
            info["attach"] = join_address(gateway.local_host, gateway.port)
        atomic_write(self._home.runtime_file, json.dumps(info).encode(), mode=0o600)
