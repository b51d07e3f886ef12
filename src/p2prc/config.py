"""Node home, configuration file and its validation.

This is the only module that reads the environment (``P2PRC_HOME``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .errors import ConfigError, validation_message

__all__ = [
    "DEFAULT_PORT",
    "AttachConfig",
    "ContainerConfig",
    "DirectConfig",
    "GossipConfig",
    "Home",
    "MetricsConfig",
    "NodeConfig",
    "RelayConfig",
    "Timeouts",
    "TrustConfig",
    "import_original",
    "load",
    "parse_duration",
    "parse_size",
    "resolve_home",
    "save",
    "set_value",
]

DEFAULT_PORT = 8088  # the original P2PRC port

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NODE_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Home:
    """The directory one node keeps everything in."""

    path: Path

    def __post_init__(self) -> None:
        # Accept "str" paths from library callers: Home("/srv/p2prc").
        object.__setattr__(self, "path", Path(self.path).expanduser())

    # Twins on purpose: one typed property per file of the home, the layout in one place.
    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def identity_dir(self) -> Path:
        return self.path / "identity"

    @property
    def identity_key(self) -> Path:
        """The node's private key, also the SSH key for its containers."""
        return self.identity_dir / "id_ed25519"  # identity._PRIVATE_NAME

    @property
    def known_hosts(self) -> Path:
        """The pinned SSH host keys of tracked containers."""
        return self.path / "known_hosts"

    @property
    def state_file(self) -> Path:
        return self.path / "state.db"

    @property
    def plugins_dir(self) -> Path:
        return self.path / "plugins"

    @property
    def runtime_file(self) -> Path:
        """Written by a running node: its pid and API address."""
        return self.path / "node.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "node.lock"

    def make_private(self) -> None:
        """Create the home and its plugins dir as 0700, or take them back to it.

        Only modes change: nothing in an existing home is removed or replaced.
        """
        for directory in (self.path, self.plugins_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        for file in (self.config_file, self.known_hosts):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(file, 0o600)


def resolve_home(explicit: Path | str | None = None) -> Home:
    """The home given, else ``P2PRC_HOME``, else the platform's user data dir."""
    if explicit is not None:
        return Home(Path(explicit).expanduser().absolute())
    if env := os.environ.get("P2PRC_HOME"):
        return Home(Path(env).expanduser().absolute())
    return Home(Path(platformdirs.user_data_dir("p2prc", appauthor=False)))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What a trusted key may do on this node ('p2prc trust add PEER --role ...').
TRUST_ROLES = ("containers", "relay", "map-port")


class TrustConfig(_Section):
    """Who may make state-changing requests to this node."""

    mode: Literal["open", "allowlist"] = "allowlist"
    allow: list[str] = Field(default_factory=list)
    # Node id -> what that key may do here; a key in allow without an entry may do all.
    roles: dict[str, list[str]] = Field(default_factory=dict)
    # Signed requests older or newer than this many seconds are refused.
    clock_skew: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("allow")
    @classmethod
    def _keys_parse(cls, value: list[str]) -> list[str]:
        from .identity import parse_public_key

        for key in value:
            parse_public_key(key)
        return value

    @field_validator("roles")
    @classmethod
    def _roles_known(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for node_id, roles in value.items():
            if not _NODE_ID.match(node_id):
                raise ValueError(f"trust.roles: {node_id!r} is not a node id (32 hex digits)")
            unknown = sorted(set(roles) - set(TRUST_ROLES))
            if unknown:
                known = ", ".join(TRUST_ROLES)
                raise ValueError(
                    f"trust.roles.{node_id}: unknown role(s) {unknown}; known: {known}"
                )
        return value


class Timeouts(_Section):
    """Seconds allowed for each network step."""

    connect: float = Field(default=5.0, gt=0, le=300)
    request: float = Field(default=30.0, gt=0, le=3600)
    shutdown: float = Field(default=3.0, gt=0, le=60)


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: str | int) -> int:
    """Bytes from ``512MiB``, ``2g``, ``1.5GB`` or a plain number (all binary units)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size like 512MiB or 2g")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``90``, ``30m``, ``2h`` or ``1d``."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration like 90, 30m, 2h or 1d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def _checked(parse: Callable[[str], object]) -> AfterValidator:
    """A validator that keeps the text as written once ``parse`` accepts it."""

    def check(value: str) -> str:
        parse(value)
        return value

    return AfterValidator(check)


# Text fields checked when the config is read, kept as written.
_Ip = Annotated[str, _checked(ipaddress.ip_address)]
_Size = Annotated[str, _checked(parse_size)]
_Duration = Annotated[str, _checked(parse_duration)]


class ContainerConfig(_Section):
    """What this node offers its peers, with defaults and maxima for every resource."""

    images: list[str] = Field(default_factory=lambda: ["p2prc/sshd:latest"])
    dask: bool = Field(
        default=True,
        description=(
            "Offer Dask images: any p2prc/dask:<distributed>-py<minor> may be asked for, and "
            "a trusted peer with the containers role may have this node build one for its "
            "Dask cluster's workers (POST /images/dask; at most 4 such images kept, one "
            "build at a time). False: only the images listed in 'images'."
        ),
    )
    docker_host: str = "unix:///var/run/docker.sock"
    user: str = "p2prc"
    publish_host: _Ip = "0.0.0.0"
    default_cpus: float = Field(default=1.0, gt=0)
    max_cpus: float = Field(default_factory=lambda: float(os.cpu_count() or 1), gt=0)
    default_memory: _Size = "1GiB"
    max_memory: _Size = "4GiB"
    pids: int = Field(default=512, ge=16, le=1_000_000)
    # Disk per container where the storage driver can limit it ("0": no limit asked for).
    disk: _Size = "10GiB"
    max_gpus: int = Field(default=1, ge=0, le=64)
    # Networks a container may not reach (besides this host's own addresses).
    blocked_networks: list[str] = Field(default_factory=lambda: ["169.254.0.0/16"])
    max_ports: int = Field(default=16, ge=0, le=64)
    max_per_peer: int = Field(default=4, ge=0)
    max_total: int = Field(default=16, ge=0)
    default_ttl: _Duration | None = None
    max_ttl: _Duration = "7d"
    ssh_wait: float = Field(default=20.0, gt=0, le=300)

    @field_validator("blocked_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(item, strict=False)) for item in value]


class GossipConfig(_Section):
    """Membership: SWIM over UDP plus push-pull over the HTTP API."""

    enabled: bool = True
    # UDP port; None means the same number as the API's TCP port.
    port: int | None = Field(default=None, ge=0, le=65535)
    # Addresses put in this node's record; empty means the listen address if specific,
    # else this machine's own addresses.
    advertise: list[_Ip] = Field(default_factory=list)
    interval: float = Field(default=0.2, gt=0.01, le=10)
    fanout: int = Field(default=3, ge=1, le=16)
    indirect_checks: int = Field(default=3, ge=0, le=16)
    suspicion_mult: float = Field(default=4.0, ge=1, le=20)
    push_pull_interval: float = Field(default=15.0, ge=1, le=3600)
    # The most members the table holds; listed (trusted) keys are never crowded out.
    max_members: int = Field(default=1024, ge=8, le=65536)
    # mDNS on the LAN; only active when the node listens on a non-loopback address.
    lan_discovery: bool = True


class RelayConfig(_Section):
    """Serving as a relay for nodes behind NAT (public nodes), and the limits on it."""

    enabled: bool = False
    port: int = Field(default=8089, ge=0, le=65535)
    public_host: _Ip = "0.0.0.0"
    ports_per_client: int = Field(default=16, ge=1, le=1024)
    connections_per_client: int = Field(default=1024, ge=1, le=100_000)
    max_connections: int = Field(default=4096, ge=1, le=100_000)
    # Domains: HTTP routed by Host, TLS by SNI (passed through); 0 is off. 80 and 443 for
    # real use (binding them needs root or CAP_NET_BIND_SERVICE).
    http_port: int = Field(default=0, ge=0, le=65535)
    https_port: int = Field(default=0, ge=0, le=65535)
    domains_per_client: int = Field(default=16, ge=0, le=1024)
    # Public ports handed out for tunnels: [low, high]; [0, 0] is any free port from 1024 up.
    port_range: tuple[int, int] = (0, 0)
    # Relays this node may tunnel through (node ids or public keys), besides the keys in
    # trust.allow; NAT detection believes these nodes' answers too. Open trust mode does
    # not make strangers relays.
    use: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("use")
    @classmethod
    def _relays_parse(cls, value: list[str]) -> list[str]:
        from .identity import parse_public_key

        for entry in value:
            if not _NODE_ID.match(entry.strip()):
                parse_public_key(entry)
        return value

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if (low, high) != (0, 0) and not 1 <= low <= high <= 65535:
            raise ValueError("port_range is [low, high] within 1-65535, or [0, 0] for any")
        return value


class MetricsConfig(_Section):
    """``[metrics]``: the Prometheus endpoint ``/metrics`` (off unless enabled)."""

    enabled: bool = False
    # Addresses or networks (CIDR) that may scrape without a signature; others, and
    # loopback always (relayed API requests arrive from there), need the owner's signature.
    allow: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry.strip(), strict=False)
        return value


class AttachConfig(_Section):
    """``[attach]``: the gateway's listener for attached hosts (``p2prc ssh`` connects there)."""

    # 0: any free port (the port is in the signed attached records, so it may change).
    port: int = Field(default=0, ge=0, le=65535)


class DirectConfig(_Section):
    """``[direct]``: direct paths between nodes (TLS pinned by node id, beside the relay)."""

    enabled: bool = True
    # 0: any free port (the port is in the node's signed record, so it may change).
    port: int = Field(default=0, ge=0, le=65535)
    retry: float = Field(default=60.0, ge=1, le=3600)  # seconds between attempts per peer
    heartbeat: float = Field(default=3.0, gt=0, le=60)
    stale: float = Field(default=6.5, gt=0, le=600)  # no reply this long: the path is dead


class NodeConfig(_Section):
    """Everything in ``config.toml``; the original P2PRC field meanings are kept."""

    name: str = Field(default_factory=lambda: _default_name())
    host: _Ip = "0.0.0.0"
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    bootstrap: list[str] = Field(default_factory=list)
    behind_nat: Literal["auto"] | bool = "auto"
    default_image: str = "p2prc/sshd:latest"
    plugin_path: str | None = None
    custom: dict[str, Any] = Field(default_factory=dict)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    containers: ContainerConfig = Field(default_factory=ContainerConfig)
    gossip: GossipConfig = Field(default_factory=GossipConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    attach: AttachConfig = Field(default_factory=AttachConfig)
    direct: DirectConfig = Field(default_factory=DirectConfig)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-63 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("custom")
    @classmethod
    def _custom_not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        # p2prc.* keys are the node's own in its signed record (p2prc.attached ...).
        reserved = sorted(k for k in value if k == "p2prc" or str(k).startswith("p2prc."))
        if reserved:
            raise ValueError(f"keys starting with 'p2prc.' are reserved: {', '.join(reserved)}")
        return value

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            split_address(address)
        return value


def _default_name() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40].strip("-") or "node"
    return f"{host}-{secrets.token_hex(3)}"


def split_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host, as a (host, port) pair."""
    text = address.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = _port(rest.removeprefix(":"), address)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, address)
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"{address!r} is not a host:port address")
    return host, port


def join_address(host: str, port: int) -> str:
    """The inverse of ``split_address``: ``host:port``, with brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{address!r} has no valid port (1-65535)")
    return int(text)


def _validate(data: dict[str, Any]) -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where="config")) from None


def _read_raw(home: Home) -> dict[str, Any]:
    try:
        text = home.config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config at {home.config_file}; run 'p2prc init'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {home.config_file}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{home.config_file} is not valid TOML: {exc}") from None


def load(home: Home) -> NodeConfig:
    """Read and validate ``config.toml``."""
    return _validate(_read_raw(home))


def save(home: Home, config: NodeConfig) -> None:
    """Write ``config.toml`` atomically."""
    text = tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
    atomic_write(home.config_file, text.encode(), mode=0o600)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _known_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = annotation
    return keys


def _parse_value(raw: str, annotation: Any) -> Any:
    try:
        value: Any = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    if getattr(annotation, "__origin__", None) is list and isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    return value


def set_value(home: Home, key: str, raw: str) -> NodeConfig:
    """Set one dotted key from its text form; the file is unchanged on any error."""
    data = _read_raw(home)
    known = _known_keys(NodeConfig)
    if key not in known and not (key.startswith("custom.") and len(key) > len("custom.")):
        raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    value = _parse_value(raw, known.get(key))
    *parents, last = key.split(".")
    table = data
    for part in parents:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part}: is not a table")
        table = child
    table[last] = value
    config = _validate(data)
    save(home, config)
    return config


def import_original(home: Home, path: Path) -> tuple[NodeConfig, list[str]]:
    """Merge an original P2PRC ``config.json`` into this home's config.

    Returns the new config and one note per original key that was mapped or ignored.
    """
    try:
        original = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as an original P2PRC config.json: {exc}") from None
    if not isinstance(original, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    data = _read_raw(home)
    notes: list[str] = []
    for key, value in original.items():
        notes.append(_import_key(data, key, value, path.parent))
    config = _validate(data)
    save(home, config)
    return config, notes


def _import_key(data: dict[str, Any], key: str, value: Any, base: Path) -> str:
    if key == "MachineName" and value:
        data["name"] = value
        return f"MachineName -> name = {value!r}"
    if key == "ServerPort" and value:
        data["port"] = int(value) if str(value).isdigit() else value
        return f"ServerPort -> port = {value}"
    if key == "BehindNAT" and isinstance(value, bool):
        data["behind_nat"] = value
        return f"BehindNAT -> behind_nat = {str(value).lower()}"
    if key == "PluginPath" and value:
        data["plugin_path"] = str(value)
        return f"PluginPath -> plugin_path = {value!r}"
    if key == "CustomConfig" and isinstance(value, dict):
        data["custom"] = value
        return "CustomConfig -> custom"
    if key == "UnsafeMode" and value is True:
        data.setdefault("trust", {})["mode"] = "open"
        return "UnsafeMode -> trust.mode = 'open'"
    if key == "IPTable" and value:
        peers = _original_peers(base / str(value))
        if peers:
            merged = [*data.get("bootstrap", []), *peers]
            data["bootstrap"] = list(dict.fromkeys(merged))
        return f"IPTable -> bootstrap += {peers}"
    return f"{key}: ignored (no meaning in p2prc)"


def _original_peers(path: Path) -> list[str]:
    """``ip:port`` of every entry in an original ``ip_table.json``, if readable."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    peers = []
    entries = table.get("ip_address") if isinstance(table, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        port = str(entry.get("ServerPort") or DEFAULT_PORT)
        if ipv4 := entry.get("IPV4"):
            address = f"{ipv4}:{port}"
        elif ipv6 := entry.get("IPV6"):
            address = f"[{ipv6}]:{port}"
        else:
            continue
        try:
            split_address(address)
        except ValueError:
            continue
        if not address.startswith("0.0.0.0"):
            peers.append(address)
    return peers
