"""The container runtime seam: what the node asks of Docker, and a fake for tests."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..errors import ContainerNotFound, GpuUnavailable, ImageNotFound

__all__ = ["ContainerInfo", "ContainerRuntime", "ContainerSpec", "FakeRuntime", "PortBinding"]

SSH_PORT = 22
LABEL_NODE = "p2prc.node"
LABEL_OWNER = "p2prc.owner"
LABEL_EXPIRES = "p2prc.expires"


@dataclass(frozen=True, slots=True)
class PortBinding:
    """A container port published on a host port."""

    container_port: int
    host_port: int


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to start one container; validated before it gets here."""

    name: str
    image: str
    cpus: float
    memory: int
    pids: int
    ports: tuple[int, ...]
    gpus: int
    authorized_keys: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)
    publish_host: str = "0.0.0.0"
    disk: int | None = None  # bytes; applied where the storage driver can limit disk


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A running (or stopped) container as the runtime sees it."""

    id: str
    name: str
    image: str
    status: str
    ssh_port: int | None
    ports: tuple[PortBinding, ...]
    gpus: int
    labels: dict[str, str]
    disk: int | None = None  # the disk limit in force, None where there is none


class ContainerRuntime(Protocol):
    """What the node needs from a container engine; every call may raise our errors."""

    async def create(self, spec: ContainerSpec) -> ContainerInfo: ...
    async def remove(self, container_id: str) -> None: ...
    async def get(self, container_id: str) -> ContainerInfo: ...
    async def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]: ...
    async def images(self) -> list[str]: ...
    async def has_gpu_runtime(self) -> bool: ...
    async def gpu_count(self) -> int:
        """How many GPUs containers here can be given (0 without a GPU runtime)."""
        ...

    async def host_key(self, container_id: str) -> str:
        """The container's ``ssh-ed25519`` host public key line."""
        ...

    async def aclose(self) -> None: ...


class FakeRuntime:
    """An in-memory runtime for unit tests: no Docker, no sockets."""

    def __init__(
        self, images: list[str] | None = None, *, gpus: int = 0, ssh_banner: bool = False
    ) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        # With ssh_banner, each container's SSH port is a real loopback socket that greets
        # like sshd, so a node's readiness check passes without Docker.
        self._ssh_banner = ssh_banner
        self._servers: dict[str, asyncio.Server] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.host_keys: dict[str, str] = {}
        self._images = images if images is not None else ["p2prc/sshd:latest"]
        self._gpus = gpus
        self._ports = itertools.count(40000)
        self.closed = False

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        if spec.image not in self._images:
            raise ImageNotFound(f"image {spec.image!r} is not available on this node")
        if spec.gpus > self._gpus:
            raise GpuUnavailable(f"this node has {self._gpus} GPUs")
        container_id = secrets.token_hex(6)
        ssh_port = next(self._ports)
        if self._ssh_banner:
            server = await asyncio.start_server(_greet, "127.0.0.1", 0)
            self._servers[container_id] = server
            ssh_port = server.sockets[0].getsockname()[1]
        info = ContainerInfo(
            id=container_id,
            name=spec.name,
            image=spec.image,
            status="running",
            ssh_port=ssh_port,
            ports=tuple(PortBinding(port, next(self._ports)) for port in spec.ports),
            gpus=spec.gpus,
            labels=dict(spec.labels),
            disk=spec.disk,
        )
        self.containers[container_id] = info
        self.specs[container_id] = spec
        self.host_keys[container_id] = _fake_host_key()
        return info

    async def remove(self, container_id: str) -> None:
        await self._close_server(container_id)
        if self.containers.pop(container_id, None) is None:
            raise ContainerNotFound(f"no container {container_id}")

    async def _close_server(self, container_id: str) -> None:
        server = self._servers.pop(container_id, None)
        if server is not None:
            server.close()
            await server.wait_closed()

    async def get(self, container_id: str) -> ContainerInfo:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"no container {container_id}") from None

    async def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        return [
            info
            for info in self.containers.values()
            if all(info.labels.get(key) == value for key, value in labels.items())
        ]

    async def images(self) -> list[str]:
        return list(self._images)

    async def has_gpu_runtime(self) -> bool:
        return self._gpus > 0

    async def gpu_count(self) -> int:
        return self._gpus

    async def host_key(self, container_id: str) -> str:
        await self.get(container_id)
        return self.host_keys[container_id]

    async def aclose(self) -> None:
        for container_id in list(self._servers):
            await self._close_server(container_id)
        self.closed = True

    def stop_outside(self, container_id: str) -> None:
        """Test helper: the container vanished without the node's knowledge."""
        self.containers.pop(container_id, None)

    def mark(self, container_id: str, status: str) -> None:
        """Test helper: change a container's status."""
        self.containers[container_id] = replace(self.containers[container_id], status=status)


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-p2prc-fake\r\n")
    await writer.drain()
    writer.close()


def _fake_host_key() -> str:
    """A real Ed25519 public key line, as a container's sshd would have made."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return f"{public.decode()} root@fake"
