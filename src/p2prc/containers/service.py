"""Containers this node hosts for its peers: validation, limits, ownership, leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import Component
from ..cluster.image import is_dask_tag
from ..cluster.remote_image import DaskImages, DockerBuilder
from ..config import NodeConfig, parse_duration, parse_size
from ..errors import (
    ContainerError,
    ContainerNotFound,
    GpuUnavailable,
    ImageNotFound,
    InvalidRequest,
    LimitExceeded,
    P2PRCError,
    QuotaExceeded,
    validation_message,
)
from ..identity import b64decode
from ..models import (
    CallerInfo,
    ContainerView,
    CreateContainer,
    ImageList,
    PortMapping,
    SshAccess,
    parse_host_key,
)
from .runtime import (
    LABEL_EXPIRES,
    LABEL_NODE,
    LABEL_OWNER,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
)
from .store import ContainerStore

__all__ = ["ContainerService", "CreatePlan", "Progress"]

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]

# Extra ports asked for with --ports N are container ports 8000 .. 8000 + N - 1.
FIRST_EXTRA_PORT = 8000
_MIN_MEMORY = 32 * 1024**2
_EXPIRY_INTERVAL = 5.0


class PortPublisher(Protocol):
    """Publishes the node's own ports through its relay when it is behind NAT."""

    async def publish(self, host: str, port: int) -> tuple[str, int] | None: ...

    async def withdraw(self, port: int) -> None: ...

    def public_address(self, port: int) -> tuple[str, int] | None: ...


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """A create request checked against this node's offer, for one caller."""

    spec: ContainerSpec
    expires_at: float | None
    caller: CallerInfo


class ContainerService(Component):
    """Creates, lists and removes the containers peers run on this node."""

    def __init__(
        self,
        config: NodeConfig,
        node_id: str,
        store: ContainerStore,
        runtime: ContainerRuntime,
        clock: Callable[[], float] = time.time,
        ssh_probe: Callable[[str, int], Awaitable[bool]] | None = None,
        on_crash: CrashHandler = log_crash,
    ) -> None:
        self._ssh_probe = ssh_probe or _ssh_banner
        self._config = config
        self._limits = config.containers
        self._node_id = node_id
        self._store = store
        self._runtime = runtime
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pending: dict[str, str] = {}
        self._tasks = TaskSet(on_crash)
        # Dask images made for peers' clusters (POST /images/dask).
        self.dask_images = DaskImages(runtime, DockerBuilder(self._limits.docker_host))
        # Set by the node once its port mapper runs: SSH and extra ports of containers on
        # a node behind NAT are published through its relay, and views show those addresses.
        self.publisher: PortPublisher | None = None

    def __repr__(self) -> str:
        return f"<ContainerService [{len(self._store.hosted())} hosted | {self._runtime!r}]>"

    @property
    def runtime(self) -> ContainerRuntime:
        return self._runtime

    async def start(self) -> None:
        """Reconcile records with the runtime, then expire leases in the background."""
        await self.reconcile()
        self._tasks.spawn(self._expire_loop(), "container-expiry")

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        await self._runtime.aclose()

    def offered_images(self) -> list[str]:
        return list(dict.fromkeys([self._config.default_image, *self._limits.images]))

    def offers(self, image: str) -> bool:
        """Whether peers may ask for ``image``: a listed one, or any Dask image
        (``p2prc/dask:<distributed>-py<minor>``) while ``containers.dask`` is on."""
        return image in self.offered_images() or (self._limits.dask and is_dask_tag(image))

    async def images(self) -> ImageList:
        try:
            present: set[str] = set(await self._runtime.images())
        except P2PRCError:
            present = set()
        dask = sorted(image for image in present if self.offers(image) and is_dask_tag(image))
        offered = list(dict.fromkeys([*self.offered_images(), *dask]))
        available = [image for image in offered if image in present]
        return ImageList(default=self._config.default_image, images=offered, available=available)

    def owned_by(self, caller: CallerInfo) -> list[ContainerView]:
        """The caller's containers here; the node's owner sees all."""
        views = self._store.hosted(None if caller.role == "owner" else caller.node_id)
        return [self._public_view(view) for view in views]

    async def publish_hosted(self) -> None:
        """Publish the ports of every hosted container (after a restart)."""
        for view in self._store.hosted():
            await self._publish(view)

    async def validate(self, request: CreateContainer, caller: CallerInfo) -> CreatePlan:
        """Check a create request before anything starts; raises the error it would meet."""
        plan = self._plan(request, caller)
        self._check_quota(caller, plan.spec.name)
        await self._check_gpu(plan)
        return plan

    async def create(
        self,
        request: CreateContainer | CreatePlan,
        caller: CallerInfo,
        ssh_host: str,
        progress: Progress,
    ) -> ContainerView:
        """Reserve a quota slot, start the container and wait until SSH answers.

        A plan from ``validate`` is not checked again; a bare request is validated here.
        """
        _check_ssh_host(ssh_host)
        if isinstance(request, CreatePlan):
            if request.caller != caller:
                raise RuntimeError("a create plan is for the caller it was validated for")
            plan = request
        else:
            plan = await self.validate(request, caller)
        async with self._lock:
            # Not validation but the reservation: other creates may have run since.
            self._check_quota(caller, plan.spec.name)
            self._pending[plan.spec.name] = caller.node_id
        try:
            await progress(f"starting {plan.spec.image}")
            info = await self._runtime.create(plan.spec)
            try:
                await progress("waiting for sshd")
                await self._wait_for_ssh(info)
                host_key = await self._host_key(info.id)
                view = self._view(info, plan, caller.node_id, ssh_host, host_key)
            except BaseException:
                with contextlib.suppress(P2PRCError):
                    await self._runtime.remove(info.id)
                raise
            self._store.add_hosted(view)
        finally:
            self._pending.pop(plan.spec.name, None)
        log.info("container %s created for %s", view.id, caller.node_id)
        await progress("publishing ports")
        await self._publish(view)
        return self._public_view(view)

    async def remove(self, container_id: str, caller: CallerInfo) -> None:
        """Remove a container; only its creator or this node's owner may."""
        view = self._store.get_hosted(container_id)
        if view is None or (caller.role != "owner" and view.owner != caller.node_id):
            raise ContainerNotFound(f"no container {container_id} of yours on this node")
        with contextlib.suppress(ContainerNotFound):
            await self._runtime.remove(container_id)
        self._store.remove_hosted(container_id)
        await self._withdraw(view)
        log.info("container %s removed by %s", container_id, caller.node_id)

    async def reconcile(self) -> None:
        """Make the records match what the runtime really has."""
        if not self._store.hosted():
            return  # nothing to check; also keeps docker-py unloaded on idle nodes
        try:
            present = {
                info.id: info
                for info in await self._runtime.list_containers({LABEL_NODE: self._node_id})
            }
        except P2PRCError as exc:
            log.warning("cannot reconcile containers now: %s", exc)
            return
        for view in self._store.hosted():
            if view.id not in present or present[view.id].status in ("exited", "dead"):
                log.info("container %s is gone; forgetting it", view.id)
                with contextlib.suppress(P2PRCError):
                    await self._runtime.remove(view.id)
                self._store.remove_hosted(view.id)
                await self._withdraw(view)

    async def expire(self) -> list[str]:
        """Remove every container whose lease has run out."""
        expired = self._store.expired(self._clock())
        for container_id in expired:
            log.info("lease of container %s ran out", container_id)
            view = self._store.get_hosted(container_id)
            with contextlib.suppress(ContainerNotFound):
                await self._runtime.remove(container_id)
            self._store.remove_hosted(container_id)
            if view is not None:
                await self._withdraw(view)
        return expired

    async def _publish(self, view: ContainerView) -> None:
        if self.publisher is None:
            return
        host = self._connect_host()
        for port in _host_ports(view):
            try:
                await self.publisher.publish(host, port)
            except (P2PRCError, OSError) as exc:  # it still works on the node's own network
                log.warning("cannot publish port %d of container %s: %s", port, view.id, exc)

    async def _withdraw(self, view: ContainerView) -> None:
        if self.publisher is None:
            return
        for port in _host_ports(view):
            with contextlib.suppress(P2PRCError, OSError):
                await self.publisher.withdraw(port)

    def _public_view(self, view: ContainerView) -> ContainerView:
        """The view with the relay's addresses for ports published through it."""
        publisher = self.publisher
        ssh = publisher.public_address(view.ssh.port) if publisher is not None else None
        if publisher is None or ssh is None:
            return view
        ports = []
        for mapping in view.ports:
            public = publisher.public_address(mapping.host_port)
            address = f"{public[0]}:{public[1]}" if public else ""
            ports.append(mapping.model_copy(update={"public": address}))
        access = view.ssh.model_copy(update={"host": ssh[0], "port": ssh[1]})
        return view.model_copy(update={"ssh": access, "ports": ports})

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(_EXPIRY_INTERVAL)
            try:
                await self.expire()
            except P2PRCError as exc:
                log.warning("lease expiry failed, will retry: %s", exc)

    async def _check_gpu(self, plan: CreatePlan) -> None:
        wanted = plan.spec.gpus
        if wanted == 0:
            return
        if wanted > self._limits.max_gpus:
            raise LimitExceeded(
                f"gpus {wanted} is above this node's maximum {self._limits.max_gpus} per container"
            )
        if not await self._runtime.has_gpu_runtime():
            raise GpuUnavailable("this node has no GPU runtime; ask a peer whose specs list GPUs")
        have = await self._runtime.gpu_count()
        if wanted > have:
            raise LimitExceeded(f"gpus {wanted} is more than the {have} GPUs this node has")

    def _check_quota(self, caller: CallerInfo, name: str) -> None:
        hosted = self._store.hosted()
        if any(view.name == name for view in hosted) or name in self._pending:
            raise InvalidRequest(f"name: a container named {name!r} already exists here")
        mine = sum(1 for view in hosted if view.owner == caller.node_id)
        mine += sum(1 for owner in self._pending.values() if owner == caller.node_id)
        if caller.role != "owner" and mine >= self._limits.max_per_peer:
            raise QuotaExceeded(f"you already run {mine} containers here (limit per peer)")
        if len(hosted) + len(self._pending) >= self._limits.max_total:
            raise QuotaExceeded("this node runs as many containers as it allows")

    def _plan(self, request: CreateContainer, caller: CallerInfo) -> CreatePlan:
        limits = self._limits
        image = request.image or self._config.default_image
        if not self.offers(image):
            offered = ", ".join(self.offered_images())
            dask = " and Dask images" if limits.dask else " (containers.dask is off)"
            raise ImageNotFound(
                f"image {image!r} is not offered by this node (offered: {offered}{dask})"
            )
        cpus = request.cpus if request.cpus is not None else limits.default_cpus
        if cpus > limits.max_cpus:
            raise LimitExceeded(f"cpus {cpus:g} is above this node's maximum {limits.max_cpus:g}")
        memory = _size("memory", request.memory or limits.default_memory)
        if memory < _MIN_MEMORY:
            raise InvalidRequest("memory: at least 32MiB")
        if memory > parse_size(limits.max_memory):
            raise LimitExceeded(f"memory is above this node's maximum {limits.max_memory}")
        if request.ports > limits.max_ports:
            raise LimitExceeded(
                f"ports {request.ports} is above this node's maximum {limits.max_ports}"
            )
        expires_at = self._expiry_time(request.ttl)
        keys = (
            _caller_key(caller),
            *(_clean_key(index, key) for index, key in enumerate(request.authorized_keys)),
        )
        name = f"p2prc-{request.name or secrets.token_hex(4)}"
        labels = {LABEL_NODE: self._node_id, LABEL_OWNER: caller.node_id}
        if expires_at is not None:
            labels[LABEL_EXPIRES] = str(int(expires_at))
        spec = ContainerSpec(
            name=name,
            image=image,
            cpus=cpus,
            memory=memory,
            pids=limits.pids,
            ports=tuple(range(FIRST_EXTRA_PORT, FIRST_EXTRA_PORT + request.ports)),
            gpus=request.gpu_count,
            authorized_keys=keys,
            labels=labels,
            publish_host=limits.publish_host,
            disk=parse_size(limits.disk) or None,
        )
        return CreatePlan(spec=spec, expires_at=expires_at, caller=caller)

    def _expiry_time(self, ttl: str | None) -> float | None:
        text = ttl if ttl is not None else self._limits.default_ttl
        if text is None:
            return None
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise InvalidRequest(f"ttl: {exc}") from None
        if seconds <= 0:
            raise InvalidRequest("ttl: must be positive")
        if seconds > parse_duration(self._limits.max_ttl):
            raise LimitExceeded(f"ttl is above this node's maximum {self._limits.max_ttl}")
        return self._clock() + seconds

    def _connect_host(self) -> str:
        """Where this node reaches the ports it publishes for containers."""
        publish = self._limits.publish_host
        return "127.0.0.1" if publish in ("0.0.0.0", "::") else publish

    async def _wait_for_ssh(self, info: ContainerInfo) -> None:
        if info.ssh_port is None:
            raise ContainerError("the image publishes no SSH port")
        host = self._connect_host()
        deadline = time.monotonic() + self._limits.ssh_wait
        while time.monotonic() < deadline:
            if await self._ssh_probe(host, info.ssh_port):
                return
            await asyncio.sleep(0.05)
        raise ContainerError(
            f"sshd in the container did not answer within {self._limits.ssh_wait:g} s"
        )

    async def _host_key(self, container_id: str) -> str:
        """The container's SSH host key, for its creator to pin; empty if unreadable."""
        try:
            return parse_host_key(await self._runtime.host_key(container_id))
        except (P2PRCError, ValueError) as exc:  # the creator falls back to trust on first use
            log.warning("cannot read the SSH host key of container %s: %s", container_id, exc)
            return ""

    def _view(
        self, info: ContainerInfo, plan: CreatePlan, owner: str, ssh_host: str, host_key: str
    ) -> ContainerView:
        assert info.ssh_port is not None
        try:
            return ContainerView(
                id=info.id,
                name=info.name,
                peer=self._node_id,
                image=plan.spec.image,
                ssh=SshAccess(
                    host=ssh_host, port=info.ssh_port, user=self._limits.user, host_key=host_key
                ),
                ports=[
                    PortMapping(container_port=p.container_port, host_port=p.host_port)
                    for p in info.ports
                ],
                gpu=info.gpus > 0,
                gpus=info.gpus,
                disk=info.disk,
                cpus=plan.spec.cpus,
                memory=plan.spec.memory,
                owner=owner,
                created_at=self._clock(),
                expires_at=plan.expires_at,
            )
        except ValidationError as exc:  # e.g. containers.user is not a POSIX user name
            raise ContainerError(
                f"cannot describe container {info.id}: {validation_message(exc)}"
            ) from None


def _check_ssh_host(host: str) -> None:
    """The host the caller reached us by must be fit for its view (an IP or DNS name)."""
    try:
        SshAccess(host=host, port=22, user="p2prc")
    except ValidationError:
        raise InvalidRequest(
            f"cannot give {host!r} as SSH host; call this node by IP or name"
        ) from None


def _host_ports(view: ContainerView) -> list[int]:
    """The node's ports of a container: SSH first, then the extra ones."""
    return [view.ssh.port, *(p.host_port for p in view.ports)]


async def _ssh_banner(host: str, port: int) -> bool:
    """Whether an SSH server answers with its banner at host:port."""
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return (await reader.read(4)) == b"SSH-"
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False


def _size(field: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


def _caller_key(caller: CallerInfo) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(b64decode(caller.public_key))
    return _openssh(key)


def _clean_key(index: int, text: str) -> str:
    """Re-serialise a public key so only its type and data reach the container."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(
            f"authorized_keys[{index}]: not an OpenSSH public key ({exc})"
        ) from None
    return _openssh(key)


def _openssh(key: object) -> str:
    public = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return bytes(public).decode()
