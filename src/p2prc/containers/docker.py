"""``DockerRuntime``: docker-py in worker threads, Docker errors translated to ours."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import (
    ContainerError,
    ContainerNotFound,
    GpuUnavailable,
    ImageNotFound,
    RuntimeUnavailable,
)
from .confine import (
    CAPABILITIES,
    DEFAULT_BLOCKED,
    NETWORK_PREFIX,
    Firewall,
    disk_limit_support,
    tenant_network,
)
from .runtime import LABEL_OWNER, SSH_PORT, ContainerInfo, ContainerSpec, PortBinding

__all__ = ["DEFAULT_DOCKER_HOST", "DockerRuntime"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Phrases the daemon uses when a device request cannot be met (no NVIDIA runtime).
_GPU_FAILURES = ("could not select device driver", "nvidia", "capabilities: [[gpu]]")
_LABEL_TENANT = "p2prc.tenant"
# Open files per process inside a container (pids_limit bounds the processes).
_NOFILE = 8192


class DockerRuntime:
    """Containers on the local Docker daemon; connects lazily, so a node starts without it."""

    def __init__(
        self,
        base_url: str = DEFAULT_DOCKER_HOST,
        timeout: float = 60.0,
        *,
        blocked: Sequence[str] = DEFAULT_BLOCKED,
        firewall: Firewall | None = None,
    ) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: Any = None
        remote = "" if base_url.startswith("unix://") else base_url
        self._firewall = firewall or Firewall(blocked, remote=remote)
        # Creating a tenant's network and attaching a container, or detaching the last one
        # and removing the network, happen under this lock, so neither sees the other half-done.
        self._networks = threading.Lock()
        self._disk_problem: str | None = None
        self._disk_checked = False

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "not connected"
        return f"<DockerRuntime [{state}]>"

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        return await self._call(self._create, spec)

    async def remove(self, container_id: str) -> None:
        await self._call(self._remove, container_id)

    async def get(self, container_id: str) -> ContainerInfo:
        return await self._call(self._get, container_id)

    async def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        return await self._call(self._list, labels)

    async def images(self) -> list[str]:
        return await self._call(self._images)

    async def has_gpu_runtime(self) -> bool:
        info: dict[str, Any] = await self._call(lambda: self._docker().info())
        return "nvidia" in (info.get("Runtimes") or {})

    async def gpu_count(self) -> int:
        if not await self.has_gpu_runtime():
            return 0
        from ..specs import gpus

        return len(await asyncio.to_thread(gpus))

    async def host_key(self, container_id: str) -> str:
        return await self._call(self._host_key, container_id)

    async def aclose(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.to_thread(self._translated, function, *args)

    def _translated(self, function: Callable[..., _T], *args: Any) -> _T:
        with _docker_errors():
            return function(*args)

    def _docker(self) -> Any:
        if self._client is None:
            import docker

            _check_reachable(self._base_url)
            self._client = docker.DockerClient(base_url=self._base_url, timeout=int(self._timeout))
        return self._client

    def _create(self, spec: ContainerSpec) -> ContainerInfo:
        import docker.errors
        import docker.types

        ports: dict[str, Any] = {f"{SSH_PORT}/tcp": (spec.publish_host, None)}
        for port in spec.ports:
            ports[f"{port}/tcp"] = (spec.publish_host, None)
        device_requests = (
            [docker.types.DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
            if spec.gpus > 0
            else None
        )
        options: dict[str, Any] = {
            "name": spec.name,
            "detach": True,
            "environment": {"P2PRC_AUTHORIZED_KEYS": "\n".join(spec.authorized_keys)},
            "labels": spec.labels,
            "ports": ports,
            "nano_cpus": int(spec.cpus * 1e9),
            "mem_limit": spec.memory,
            "memswap_limit": spec.memory,
            "pids_limit": spec.pids,
            "ulimits": [docker.types.Ulimit(name="nofile", soft=_NOFILE, hard=_NOFILE)],
            "cap_drop": ["ALL"],
            "cap_add": list(CAPABILITIES),
            "device_requests": device_requests,
            "init": True,
        }
        if spec.disk is not None and self._disk_supported():
            options["storage_opt"] = {"size": str(spec.disk)}
        self._firewall.ensure()
        with self._networks:
            options["network"] = self._tenant_network(spec)
            try:
                container = self._create_container(spec.image, options)
            except docker.errors.NotFound as exc:
                if "network" not in _explanation(exc).lower():
                    raise
                # Another node on this daemon removed the network in between: make it again.
                options["network"] = self._tenant_network(spec)
                container = self._create_container(spec.image, options)
            try:
                container.start()
                container.reload()
            except BaseException:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
                self._release_networks([options["network"]])
                raise
        return _info(container.attrs)

    def _create_container(self, image: str, options: dict[str, Any]) -> Any:
        """Create; where the driver refuses a size limit, say so once and create without it."""
        import docker.errors

        containers = self._docker().containers
        try:
            return containers.create(image, **options)
        except docker.errors.APIError as exc:
            if "storage_opt" not in options or "storage" not in _explanation(exc).lower():
                raise
            self._no_disk_limit(_explanation(exc))
            del options["storage_opt"]
            return containers.create(image, **options)

    def _disk_supported(self) -> bool:
        if not self._disk_checked:
            self._disk_checked = True
            problem = disk_limit_support(self._docker().info())
            if problem is not None:
                self._no_disk_limit(problem)
        return self._disk_problem is None

    def _no_disk_limit(self, problem: str) -> None:
        self._disk_problem = problem
        log.warning("containers get NO disk limit on this node: %s", problem)

    def _tenant_network(self, spec: ContainerSpec) -> str:
        """The owner's own network (created on demand): no traffic between its containers."""
        import docker.errors

        name, bridge = tenant_network(spec.labels.get(LABEL_OWNER) or spec.name)
        networks = self._docker().networks
        try:
            networks.get(name)
        except docker.errors.NotFound:
            try:
                networks.create(
                    name,
                    driver="bridge",
                    check_duplicate=True,
                    options={
                        "com.docker.network.bridge.enable_icc": "false",
                        "com.docker.network.bridge.name": bridge,
                    },
                    labels={_LABEL_TENANT: spec.labels.get(LABEL_OWNER, "")},
                )
            except docker.errors.APIError:  # another node on this daemon made it first
                networks.get(name)
            else:
                log.info("created network %s (bridge %s) for a tenant", name, bridge)
        return name

    def _release_networks(self, names: list[str]) -> None:
        """Remove each tenant network no container uses any more."""
        import docker.errors

        for name in names:
            try:
                network = self._docker().networks.get(name)
                network.reload()
                if not network.attrs.get("Containers") and not self._attached(name):
                    network.remove()
                    log.info("removed network %s (its last container went)", name)
            except docker.errors.APIError as exc:  # in use again, or gone already
                log.debug("network %s kept: %s", name, _explanation(exc))

    def _attached(self, name: str) -> bool:
        """Whether any container, running or not, names the network (Containers lists running)."""
        found = self._docker().containers.list(all=True, filters={"network": name})
        return bool(found)

    def _remove(self, container_id: str) -> None:
        container = self._docker().containers.get(container_id)
        networks = (container.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        with self._networks:
            container.remove(force=True)
            self._release_networks([name for name in networks if name.startswith(NETWORK_PREFIX)])

    def _get(self, container_id: str) -> ContainerInfo:
        return _info(self._docker().containers.get(container_id).attrs)

    def _list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        found = self._docker().containers.list(all=True, filters=filters)
        return [_info(container.attrs) for container in found]

    def _host_key(self, container_id: str) -> str:
        """The public host key the entrypoint made before sshd started."""
        container = self._docker().containers.get(container_id)
        code, output = container.exec_run(
            ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"], stderr=False, user="root"
        )
        if code != 0:
            raise ContainerError(f"container {container_id} has no ed25519 host key")
        return bytes(output or b"").decode("ascii", "replace").strip()

    def _images(self) -> list[str]:
        tags: list[str] = []
        for image in self._docker().images.list():
            tags.extend(image.tags)
        return sorted(tags)


def _check_reachable(base_url: str) -> None:
    """Connect once ourselves: docker-py leaks its socket when the daemon is absent."""
    if not base_url.startswith("unix://"):
        return
    path = base_url.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except OSError as exc:
            raise RuntimeUnavailable(f"container runtime unavailable: {path}: {exc}") from None


@contextlib.contextmanager
def _docker_errors() -> Iterator[None]:
    """Translate docker-py and transport errors into ours, once, keeping the cause."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageNotFound(f"image not found: {_explanation(exc)}") from exc
    except docker.errors.NotFound as exc:
        raise ContainerNotFound(f"no such container: {_explanation(exc)}") from exc
    except docker.errors.APIError as exc:
        text = _explanation(exc)
        if any(phrase in text.lower() for phrase in _GPU_FAILURES):
            raise GpuUnavailable(f"this node has no GPU runtime ({text})") from exc
        raise ContainerError(f"docker refused: {text}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise RuntimeUnavailable(f"container runtime unavailable: {exc}") from exc


def _explanation(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def _info(attrs: dict[str, Any]) -> ContainerInfo:
    config = attrs.get("Config") or {}
    published = ((attrs.get("NetworkSettings") or {}).get("Ports")) or {}
    ssh_port: int | None = None
    bindings: list[PortBinding] = []
    for key, hosts in sorted(published.items()):
        port_text, _, protocol = key.partition("/")
        if protocol != "tcp" or not hosts:
            continue
        host_port = int(hosts[0]["HostPort"])
        if int(port_text) == SSH_PORT:
            ssh_port = host_port
        else:
            bindings.append(PortBinding(int(port_text), host_port))
    host_config = attrs.get("HostConfig") or {}
    return ContainerInfo(
        id=str(attrs["Id"])[:12],
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        status=str((attrs.get("State") or {}).get("Status", "unknown")),
        ssh_port=ssh_port,
        ports=tuple(bindings),
        gpus=_gpus(host_config.get("DeviceRequests") or []),
        disk=_disk(host_config.get("StorageOpt") or {}),
        labels=dict(config.get("Labels") or {}),
    )


def _gpus(requests: list[dict[str, Any]]) -> int:
    """How many GPUs a container's device requests ask for (-1, all, counts as 1 at least)."""
    total = 0
    for request in requests:
        count = int(request.get("Count") or 0)
        total += len(request.get("DeviceIDs") or []) or (count if count > 0 else 1)
    return total


def _disk(storage: dict[str, Any]) -> int | None:
    size = storage.get("size")
    try:
        return int(size) if size is not None else None
    except (TypeError, ValueError):
        return None
