"""Typed request and response bodies, shared by the HTTP API and the client."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "CallerInfo",
    "ContainerGroup",
    "ContainerView",
    "CpuInfo",
    "CreateContainer",
    "CreateEvent",
    "DiskInfo",
    "GpuInfo",
    "GroupMember",
    "Health",
    "HostResult",
    "ImageList",
    "MapPortRequest",
    "MappedPort",
    "MemoryInfo",
    "MetadataUpdate",
    "NodeStatus",
    "OsInfo",
    "PeerAddress",
    "PeerView",
    "PluginEvent",
    "PluginInfo",
    "PluginRun",
    "PluginRunRequest",
    "PortMapping",
    "Reachability",
    "ReachabilityRequest",
    "RemoteCreate",
    "Specs",
    "SshAccess",
    "SyncResult",
    "TrackedContainer",
    "parse_host_key",
]


class _Model(BaseModel):
    """Base of every answer: frozen."""

    model_config = ConfigDict(frozen=True)


class _Request(BaseModel):
    """Base of every request body: unknown keys and NaN or infinite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Health(_Model):
    """Liveness answer, and whether every component of the node still runs."""

    ok: bool = Field(default=True, description="False when a component is down")
    status: str = Field(default="ok", description='"ok", or "degraded" when a component is down')
    components: dict[str, str] = Field(
        default_factory=dict, description='Each component: "ok", or "down: <why>"'
    )


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
    public_key: str = Field(description="The caller's Ed25519 public key, base64url")


# Containers ---------------------------------------------------------------------------

_CONTAINER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
CONTAINER_ID = r"^[0-9a-f]{12}$"
NODE_ID = r"^[0-9a-f]{32}$"
POSIX_USER = r"^[a-z_][a-z0-9_-]{0,31}$"
# Underscores too: real networks name hosts so (compose services), and they are inert.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PUBLIC_ADDRESS = r"^(?:|(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5})$"
# What an image name shown to (or run by) the owner may contain: no spaces, braces or markup.
_IMAGE_CHARS = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$"
_ED25519_PREFIX = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20"
# A Docker image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
IMAGE_REFERENCE = (
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]{1,5})?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)


class CreateContainer(_Request):
    """What a caller asks for; the node applies its defaults and maxima."""

    name: str | None = Field(default=None, pattern=_CONTAINER_NAME)
    image: str | None = Field(default=None, max_length=255, pattern=IMAGE_REFERENCE)
    ports: int = Field(default=0, ge=0, le=64, description="How many extra TCP ports to publish")
    gpu: bool = Field(default=False, description="The original flag: one GPU (see gpus)")
    gpus: int = Field(default=0, ge=0, le=64, description="How many GPUs; 0 = none")
    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory: str | None = Field(
        default=None, max_length=32, description="Bytes, or with a unit: 512MiB, 2GiB, 1g"
    )
    ttl: str | None = Field(
        default=None, max_length=32, description="Lease: seconds, or 30m, 2h, 1d; none = no expiry"
    )
    authorized_keys: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Extra OpenSSH public keys; the caller's node key is always installed",
    )

    @property
    def gpu_count(self) -> int:
        """The GPUs asked for: ``gpus``, or one for the original ``gpu`` flag."""
        return self.gpus or int(self.gpu)


def _host_name(value: str) -> str:
    """An IP literal or a DNS name: nothing else may name a container's SSH host."""
    if "%" not in value:  # no scoped IPv6 addresses: '%' is template syntax downstream
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in value.split(".")):
        raise ValueError("must be an IP address or a DNS name")
    return value


def parse_host_key(value: str) -> str:
    """An ``ssh-ed25519`` public key line, re-serialised without its comment; or empty."""
    if not value:
        return value
    words = value.split()
    try:
        blob = base64.b64decode(words[1], validate=True) if len(words) >= 2 else b""
    except ValueError:
        blob = b""
    # The wire form is string "ssh-ed25519", then string <32 key bytes>.
    if words[0] != "ssh-ed25519" or len(blob) != len(_ED25519_PREFIX) + 32:
        raise ValueError("must be an ssh-ed25519 public key")
    if not blob.startswith(_ED25519_PREFIX):
        raise ValueError("must be an ssh-ed25519 public key")
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}"


class SshAccess(_Model):
    host: Annotated[str, AfterValidator(_host_name)] = Field(max_length=253)
    port: int = Field(ge=1, le=65535)
    user: str = Field(pattern=POSIX_USER, description="A POSIX user name")
    host_key: Annotated[str, AfterValidator(parse_host_key)] = Field(
        default="",
        max_length=200,
        description="The container's SSH host key (ssh-ed25519 ...); empty when unknown",
    )


class PortMapping(_Model):
    container_port: int = Field(ge=1, le=65535)
    host_port: int = Field(ge=1, le=65535)
    public: str = Field(
        default="",
        max_length=300,
        pattern=_PUBLIC_ADDRESS,
        description="host:port on the node's relay when it is behind NAT; else empty",
    )


class ContainerView(_Model):
    """A container on a peer, as its creator sees it; every field is checked, peers lie."""

    id: str = Field(pattern=CONTAINER_ID, description="12 hex digits, as Docker shortens it")
    name: str = Field(pattern=_CONTAINER_NAME)
    peer: str = Field(pattern=NODE_ID, description="The hosting node's id")
    image: str = Field(max_length=255, pattern=_IMAGE_CHARS)
    ssh: SshAccess
    ports: list[PortMapping] = Field(max_length=64)
    gpu: bool
    gpus: int = Field(default=0, ge=0, le=1024, description="GPUs given to the container")
    disk: int | None = Field(
        default=None, ge=0, description="Disk limit in bytes; none: this node cannot limit disk"
    )
    cpus: float = Field(ge=0, allow_inf_nan=False)
    memory: int = Field(ge=0)
    owner: str = Field(pattern=NODE_ID, description="Node id of the creator")
    created_at: float = Field(allow_inf_nan=False)
    expires_at: float | None = Field(default=None, allow_inf_nan=False)
    status: str = Field(default="running", pattern=r"^[a-z]{1,16}$")


class CreateEvent(_Model):
    """One line of the NDJSON stream a create request answers with."""

    event: str = Field(description="'progress', 'created' or 'error'")
    message: str | None = None
    container: ContainerView | None = None
    error: dict[str, str] | None = None


class ImageList(_Model):
    """Images a node offers to its peers."""

    default: str
    images: list[str]
    available: list[str] = Field(description="Offered images that are present right now")


class RemoteCreate(_Request):
    """Ask the local node to create a container on a peer and track it."""

    peer: str = Field(min_length=1, max_length=300)
    spec: CreateContainer = Field(default_factory=CreateContainer)


class TrackedContainer(_Model):
    """A container this node created on a peer (the original --tc list)."""

    container: ContainerView
    peer_address: str


# Peers --------------------------------------------------------------------------------


class PeerView(_Model):
    """One node as this node sees it (the original IP table entry, typed)."""

    node_id: str
    name: str
    me: bool = False
    state: str = Field(description="alive, suspect, dead or left")
    rtt_ms: float | None
    addresses: list[str]
    api: str = Field(description="Base URL of its API")
    api_port: int
    gossip_port: int
    relay_port: int = Field(default=0, description="Port of its relay service; 0: none")
    behind_nat: bool | None
    relay: str = Field(description="Node id of the relay it tunnels through; empty: none")
    public_api: str = Field(
        default="", description="host:port of its API on its relay (behind NAT); empty: none"
    )
    user: str
    cores: int
    memory: int
    gpus: int
    metadata: str
    custom: dict[str, str] = Field(description="The owner's custom metadata (set with /meta)")
    reserved: dict[str, str] = Field(
        default_factory=dict,
        description="The node's own 'p2prc.' keys, set by p2prc itself: 'p2prc.direct' (its "
        "direct-path port), 'p2prc.attached' (the version of its attached-host records)",
    )
    version: int


class MetadataUpdate(_Request):
    """Set this node's metadata (the original --amd), spread to every node."""

    text: str = Field(max_length=400)
    custom: dict[str, str] | None = Field(default=None, max_length=16)


class PeerAddress(_Request):
    """A node to exchange tables with now (bootstrap)."""

    address: str = Field(min_length=1, max_length=300)


class SyncResult(_Model):
    contacted: list[str]
    changed: int
    failed: list[str]


# Groups and plugins ---------------------------------------------------------------------


class ContainerGroup(_Model):
    """Tracked containers run together by plugins (the original --cgroup / --group)."""

    id: str
    created_at: float
    containers: list[TrackedContainer]
    attached: list[str] = Field(
        default_factory=list, description="Attached hosts in the group, by name"
    )


class GroupMember(_Request):
    """A tracked container id (or unique prefix), or an attached host's name, for a group."""

    container: str = Field(min_length=1, max_length=64)


class PluginInfo(_Model):
    """An installed plugin: a playbook and its description."""

    name: str
    summary: str
    variables: dict[str, str]
    path: str


class PluginRunRequest(_Request):
    """Run a plugin against a tracked container, an attached host or a group."""

    target: str = Field(min_length=1, max_length=64)
    variables: dict[str, str] = Field(default_factory=dict, max_length=64)


class HostResult(_Model):
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0


class PluginRun(_Model):
    """One plugin run with its per-host summary and output."""

    id: str
    plugin: str
    target: str
    started_at: float
    finished_at: float | None = None
    ok: bool | None = None
    hosts: dict[str, HostResult] = Field(default_factory=dict)
    output: str = ""


class PluginEvent(_Model):
    """One NDJSON line of a plugin run: 'progress' (host, task, status) or 'finished'."""

    event: str
    host: str | None = None
    task: str | None = None
    status: str | None = None
    run: PluginRun | None = None
    error: dict[str, str] | None = None


# Port mapping ---------------------------------------------------------------------------


class MapPortRequest(_Request):
    """Publish a local TCP port of the node (the original --mp)."""

    port: int = Field(ge=1, le=65535)
    domain: str | None = Field(default=None, max_length=253)
    udp: bool = Field(default=False, description="Publish a UDP port instead of TCP")


class ReachabilityRequest(_Request):
    """Ask a node to connect back to the caller's own address on ``port``."""

    port: int = Field(ge=1, le=65535)


class Reachability(_Model):
    address: str
    port: int
    reachable: bool


class MappedPort(BaseModel):
    """Where a published port is reachable; the original's keys plus p2prc's."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    ip_address: str = Field(alias="IPAddress")
    port_no: int = Field(alias="PortNo")
    entire_address: str = Field(alias="EntireAddress")
    local_port: int
    relay: str = Field(description="Node id of the relay, empty when the node maps on itself")
    domain: str | None = None
    udp: bool = False
