"""Typed request and response bodies, shared by the HTTP API and the client."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CallerInfo",
    "CpuInfo",
    "DiskInfo",
    "GpuInfo",
    "Health",
    "MemoryInfo",
    "NodeStatus",
    "OsInfo",
    "Specs",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Health(_Model):
    """Liveness answer."""

    ok: bool = True


class NodeStatus(_Model):
    """Who a node is and where it listens."""

    node_id: str
    name: str
    version: str
    api: str = Field(description="Base URL of the node's HTTP API")
    addresses: list[str] = Field(description="The node's own IP addresses, loopback excluded")
    port: int
    public_key: str = Field(description="OpenSSH form of the node's Ed25519 public key")
    uptime_s: float
    started_at: float
    trust_mode: str


class OsInfo(_Model):
    system: str
    release: str
    machine: str
    distribution: str


class CpuInfo(_Model):
    model: str
    cores: int = Field(description="Logical cores")
    physical_cores: int | None
    load_1m: float


class MemoryInfo(_Model):
    total: int = Field(description="Bytes")
    available: int = Field(description="Bytes")


class DiskInfo(_Model):
    path: str
    total: int
    free: int


class GpuInfo(_Model):
    index: int
    name: str
    memory_total: int
    driver: str


class Specs(_Model):
    """What a node offers: the original ``/server_info``, typed."""

    hostname: str
    os: OsInfo
    cpu: CpuInfo
    memory: MemoryInfo
    disk: DiskInfo
    gpus: list[GpuInfo]


class CallerInfo(_Model):
    """How a node sees the caller of a signed request."""

    node_id: str
    role: str = Field(description="'owner' for the node's own key, else 'peer'")
