"""Typed views of attached hosts, shared by the attach service, its routes and the client."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..models import _Model, _Request
from .records import MAX_PORTS, NAME, USER

__all__ = [
    "MAX_ALLOW",
    "AllowChange",
    "AttachRequest",
    "AttachedGateway",
    "AttachedHost",
    "AttachedLocal",
    "AttachedRecords",
    "GatewayState",
]

MAX_ALLOW = 64
_ENTRY = 1024  # an allow entry: a peer name, a node id or an OpenSSH public key line

GatewayState = Literal["self", "alive", "suspect", "dead"]


def _name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError(
            "must be 1-63 letters, digits, '.', '_' or '-', starting with one of the first two"
        )
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


class AttachRequest(_Request):
    """``POST /attached``: attach the host at ``host`` under ``name`` on this gateway."""

    name: str = Field(description="The host's name in the network (peer-name rules)")
    host: str = Field(min_length=1, max_length=253, description="IP literal or DNS name")
    ssh_port: int = Field(default=22, description="1-65535")
    user: str = Field(default="", max_length=32, description="The SSH user ('': the client's)")
    ports: list[int] = Field(default_factory=list, max_length=MAX_PORTS)
    allow: list[str] = Field(default_factory=list, max_length=MAX_ALLOW)
    same_as: str | None = Field(
        default=None, description="An attached host this one is (its host key must match)"
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _name(value)

    @field_validator("same_as")
    @classmethod
    def _valid_same_as(cls, value: str | None) -> str | None:
        return None if value is None else _name(value)

    @field_validator("user")
    @classmethod
    def _valid_user(cls, value: str) -> str:
        if value and not USER.match(value):
            raise ValueError("must be a POSIX user name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("ssh_port")
    @classmethod
    def _valid_ssh_port(cls, value: int) -> int:
        return _port(value)

    @field_validator("ports")
    @classmethod
    def _valid_ports(cls, value: list[int]) -> list[int]:
        return [_port(port) for port in value]

    @field_validator("allow")
    @classmethod
    def _valid_allow(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.strip() or len(entry) > _ENTRY or "\n" in entry:
                raise ValueError("each entry is a peer name, a node id or a public key line")
        return value


class AllowChange(_Request):
    """``PUT /attached/NAME/allow``: keys to add to and remove from the host's allow list."""

    add: list[str] = Field(default_factory=list, max_length=MAX_ALLOW)
    remove: list[str] = Field(default_factory=list, max_length=MAX_ALLOW)

    @field_validator("add", "remove")
    @classmethod
    def _valid_entries(cls, value: list[str]) -> list[str]:
        return AttachRequest._valid_allow(value)


class AttachedGateway(_Model):
    """One gateway that reaches an attached host, as this node sees it."""

    node_id: str
    name: str = Field(description="The gateway's peer name")
    endpoint: str = Field(description="host:port of its attach listener ('' while none)")
    state: GatewayState
    version: int = Field(description="The version of its signed record for the host")
    rtt_ms: float | None = None


class AttachedLocal(_Model):
    """What only this gateway knows of a host it attached (owner routes only)."""

    address: str = Field(description="The host's LAN address, as dialled")
    allow: list[str] = Field(description="Node ids allowed besides this node's own key")
    created: float


class AttachedHost(_Model):
    """An attached host: the merged view of every gateway's signed record for it."""

    name: str
    host_key: str = Field(description="Its pinned SSH host key (OpenSSH line)")
    ssh_port: int
    user: str = ""
    ports: list[int] = Field(default_factory=list, description="Extra TCP ports forwarded")
    cores: int = 0
    memory: int = 0
    arch: str = ""
    os: str = ""
    gateways: list[AttachedGateway] = Field(default_factory=list)
    conflicts: list[AttachedGateway] = Field(
        default_factory=list, description="Gateways claiming the name with another host key"
    )
    local: AttachedLocal | None = Field(
        default=None, description="This gateway's own row (owner answers only)"
    )


class AttachedRecords(_Model):
    """``GET /attached/records``: this gateway's signed records, each base64 encoded."""

    records: list[str]
