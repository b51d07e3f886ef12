"""``DockerRuntime``: docker-py in worker threads, Docker errors translated to ours."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import (
    ContainerError,
    ContainerNotFound,
    GpuUnavailable,
    ImageNotFound,
    RuntimeUnavailable,
)
from .runtime import SSH_PORT, ContainerInfo, ContainerSpec, PortBinding

__all__ = ["DEFAULT_DOCKER_HOST", "DockerRuntime"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Phrases the daemon uses when a device request cannot be met (no NVIDIA runtime).
_GPU_FAILURES = ("could not select device driver", "nvidia", "capabilities: [[gpu]]")


class DockerRuntime:
    """Containers on the local Docker daemon; connects lazily, so a node starts without it."""

    def __init__(self, base_url: str = DEFAULT_DOCKER_HOST, timeout: float = 60.0) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: Any = None

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
        import docker

        client = self._docker()
        ports: dict[str, Any] = {f"{SSH_PORT}/tcp": (spec.publish_host, None)}
        for port in spec.ports:
            ports[f"{port}/tcp"] = (spec.publish_host, None)
        device_requests = (
            [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if spec.gpu else None
        )
        container = client.containers.create(
            spec.image,
            name=spec.name,
            detach=True,
            environment={"P2PRC_AUTHORIZED_KEYS": "\n".join(spec.authorized_keys)},
            labels=spec.labels,
            ports=ports,
            nano_cpus=int(spec.cpus * 1e9),
            mem_limit=spec.memory,
            memswap_limit=spec.memory,
            pids_limit=spec.pids,
            device_requests=device_requests,
            init=True,
        )
        try:
            container.start()
            container.reload()
        except BaseException:
            with contextlib.suppress(Exception):
                container.remove(force=True)
            raise
        return _info(container.attrs)

    def _remove(self, container_id: str) -> None:
        self._docker().containers.get(container_id).remove(force=True)

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
        gpu=bool(host_config.get("DeviceRequests")),
        labels=dict(config.get("Labels") or {}),
    )
