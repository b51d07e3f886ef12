"""The client side of the attach data path: a route to an attached host's port through one
of its gateways, and the ``ssh`` options that use it.

``open_route`` tries the host's gateways in order (this node first when it is one, then
alive before suspect before dead), each within ``ROUTE_TIMEOUT`` seconds for connect, TLS
(pinned to that gateway's node id) and the signed handshake, and returns the first that
answers ``ok``: a dead gateway costs a few seconds, never the session (failover). When
none works, the error names every gateway's reason.

``ssh`` itself stays end to end: ``proxy_command`` is the ``ProxyCommand`` that pipes
``ssh``'s stdin and stdout over such a route (``p2prc ssh --proxy NAME``), and the host key
is pinned in the home's ``known_hosts`` under ``p2prc-attached-<name>`` with
``StrictHostKeyChecking=yes``, so a host whose key changed is refused by ``ssh``.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from ..config import Home, split_address
from ..containers import hostkeys
from ..errors import AttachFailed, AttachRefused, P2PRCError, TunnelProtocolError
from ..identity import Identity
from ..tunnel.streams import CHUNK, close_quietly, stdio_pipe, write
from ..tunnel.tls import pinned_context
from . import handshake

__all__ = [
    "ROUTE_TIMEOUT",
    "GatewayView",
    "HostView",
    "host_alias",
    "open_route",
    "pin_host_key",
    "proxy_command",
    "ssh_config_block",
    "ssh_options",
]

# Seconds one gateway has for connect, TLS and handshake before the next one is tried.
ROUTE_TIMEOUT = 3.0
_RANK = {"self": 0, "alive": 1, "suspect": 2, "dead": 3}


class GatewayView(Protocol):
    """One gateway of an attached host (``attach.models.AttachedGateway``)."""

    @property
    def node_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def rtt_ms(self) -> float | None: ...


_GatewayT = TypeVar("_GatewayT", bound=GatewayView)
_GatewayT_co = TypeVar("_GatewayT_co", bound=GatewayView, covariant=True)


class HostView(Protocol[_GatewayT_co]):
    """An attached host as the routes need it (``attach.models.AttachedHost``)."""

    @property
    def name(self) -> str: ...
    @property
    def host_key(self) -> str: ...
    @property
    def ssh_port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def gateways(self) -> Sequence[_GatewayT_co]: ...


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def host_alias(name: str) -> str:
    """The name the attached host's key is known under in ``known_hosts``."""
    return f"p2prc-attached-{name}"


def ordered(gateways: Sequence[_GatewayT]) -> list[_GatewayT]:
    """This node first, then alive, suspect, dead; lowest RTT first within each."""

    def rank(gateway: _GatewayT) -> tuple[int, bool, float]:
        rtt = gateway.rtt_ms
        return _RANK.get(gateway.state, len(_RANK)), rtt is None, rtt or 0.0

    return sorted(gateways, key=rank)


async def open_route(
    identity: Identity,
    host: HostView[_GatewayT],
    port: int | None = None,
    *,
    local: str | None = None,
    per_gateway: float = ROUTE_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _GatewayT]:
    """A stream to ``port`` (default the SSH port) of ``host`` through its first gateway
    that takes it. ``local`` is this node's own listener (``host:port``), used for the
    gateway that is this node (``state == "self"``) instead of its published endpoint.

    ``AttachRefused`` when every gateway refused (the key is not allowed, or the port is not
    attached); ``AttachFailed`` naming each gateway's reason otherwise.
    """
    port = host.ssh_port if port is None else port
    reasons: list[str] = []
    refused = 0
    gateways = ordered(host.gateways)
    for gateway in gateways:
        endpoint = local if gateway.state == "self" and local else gateway.endpoint
        label = f"{gateway.name or gateway.node_id[:8]} ({endpoint or 'no endpoint'})"
        try:
            async with asyncio.timeout(per_gateway):
                reader, writer = await _route(identity, gateway.node_id, endpoint, host.name, port)
        except AttachRefused as exc:
            refused += 1
            reasons.append(f"{label}: {exc}")
            continue
        except TimeoutError:
            reasons.append(f"{label}: no answer within {per_gateway:g} s")
            continue
        except (P2PRCError, OSError, EOFError, ValueError) as exc:
            reasons.append(f"{label}: {_reason(exc)}")
            continue
        return reader, writer, gateway
    if not gateways:
        raise AttachFailed(f"attached host {host.name} has no gateway")
    summary = f"{host.name} port {port}: " + "; ".join(reasons)
    if refused == len(gateways):
        raise AttachRefused(summary)
    raise AttachFailed(f"no gateway reaches {summary}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the gateway closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _route(identity: Identity, node_id: str, endpoint: str, name: str, port: int) -> Stream:
    """Connect, TLS pinned to ``node_id``, handshake; the stream once the gateway said ok."""
    if not handshake.is_node_id(node_id):
        raise TunnelProtocolError("the gateway's node id is malformed")
    where, at = split_address(endpoint, 0)
    if not at:
        raise AttachFailed("the gateway publishes no endpoint")
    reader, writer = await asyncio.open_connection(
        where, at, ssl=pinned_context(node_id), server_hostname="", limit=CHUNK
    )
    try:
        nonce = handshake.parse_challenge(await handshake.read_frame(reader))
        signature = identity.sign(handshake.connect_message(nonce, node_id, name, port))
        write(writer, handshake.connect_frame(identity.public_key, signature, name, port))
        await writer.drain()
        answer = handshake.answer_of(await handshake.read_frame(reader))
    except BaseException:
        await close_quietly(writer)
        raise
    if answer is not None:
        await close_quietly(writer)
        code, message = answer
        if code == "attach_refused":
            raise AttachRefused(message)
        raise AttachFailed(f"{message} ({code})")
    return reader, writer


# -- ssh ------------------------------------------------------------------------------------


def pin_host_key(home: Path, host: HostView[GatewayView]) -> None:
    """Make the signed record's host key the one ``known_hosts`` knows for ``host``."""
    hostkeys.pin(Home(home).known_hosts, host_alias(host.name), host.host_key)


def proxy_command(home: Path, name: str, port: int | None = None) -> str:
    """The ``ProxyCommand`` text (shell-quoted) that pipes ssh through ``open_route``."""
    # The light entry point (attach/__main__.py): ssh starts it for every connection.
    command = [sys.executable, "-m", "p2prc.attach", "--home", str(home), name]
    if port is not None:
        command += ["--port", str(port)]
    # ssh expands %-tokens in ProxyCommand before the shell sees it: keep ours literal.
    return shlex.join(command).replace("%", "%%")


def _settings(home: Path, host: HostView[GatewayView]) -> list[tuple[str, str]]:
    files = Home(home)
    return [
        ("HostKeyAlias", host_alias(host.name)),
        ("UserKnownHostsFile", _config_value(str(files.known_hosts))),
        ("StrictHostKeyChecking", "yes"),
        ("IdentityFile", _config_value(str(files.identity_key))),
        ("IdentitiesOnly", "yes"),
        ("ProxyCommand", proxy_command(home, host.name)),
    ]


def _config_value(text: str) -> str:
    """A path as one ssh_config value (quoted when it has spaces; % kept literal)."""
    text = text.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def ssh_options(home: Path, host: HostView[GatewayView]) -> list[str]:
    """``ssh`` arguments (``-o KEY=VALUE`` pairs) that reach ``host`` through p2prc."""
    options: list[str] = []
    for key, value in _settings(home, host):
        options += ["-o", f"{key}={value}"]
    return options


def ssh_config_block(home: Path, host: HostView[GatewayView]) -> str:
    """An ``ssh_config`` ``Host`` block: plain ``ssh NAME``, ``scp``, ``rsync`` then work."""
    lines = [f"Host {host.name}", f"    HostName {host.name}"]
    if host.user:
        lines.append(f"    User {host.user}")
    lines += [f"    {key} {value}" for key, value in _settings(home, host)]
    return "\n".join(lines) + "\n"


# -- the ProxyCommand's pipe ------------------------------------------------------------------


async def run_proxy(home: Home, name: str, port: int | None = None) -> None:
    """The ProxyCommand: pin the signed record's host key, open a route to ``name`` through
    one of its gateways and pipe this process's stdin and stdout over it."""
    from .._client_async import AsyncClient  # here: the client is the heaviest import
    from .client import AttachedAPI

    identity = Identity.load(home.identity_dir)
    async with AsyncClient(home=home) as client:
        host = await AttachedAPI(client).get(name)
    # Plain `ssh -F` runs this too: the key it checks is the signed record's, now.
    pin_host_key(home.path, host)
    reader, writer, _ = await open_route(identity, host, port, local=local_attach_endpoint(home))
    await stdio_pipe(reader, writer)


def local_attach_endpoint(home: Home) -> str | None:
    """This home's running node's own attach listener (``host:port``), when it has one."""
    try:
        info = json.loads(home.runtime_file.read_text())
    except (OSError, ValueError):
        return None
    endpoint = info.get("attach") if isinstance(info, dict) else None
    return endpoint if isinstance(endpoint, str) and endpoint else None
