"""``p2prc attach``, ``p2prc detach``, ``p2prc attached``: hosts reached through gateways."""

from __future__ import annotations

import base64
import hashlib
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from ..attach.models import AttachedHost, AttachRequest
from ..attach.records import NAME
from ..client import Client
from ..errors import InvalidRequest, validation_message
from ._common import emit, options_of

__all__ = ["attach_command", "attached_command", "attached_table", "detach_command"]


def attach_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The host's name in the network.")],
    host: Annotated[
        str | None, typer.Option("--host", help="Its LAN address (IP or DNS name).")
    ] = None,
    ssh_port: Annotated[int, typer.Option("--ssh-port", help="Its SSH port.")] = 22,
    user: Annotated[str, typer.Option("--user", help="The SSH user to log in as.")] = "",
    port: Annotated[
        list[int] | None, typer.Option("--port", help="An extra TCP port to forward (repeat).")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="A peer name, node id or public key that may reach it."),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option("--deny", help="Take a key off its allow list (without --host)."),
    ] = None,
    same_as: Annotated[
        str | None,
        typer.Option("--same-as", help="The host another gateway attached (key must match)."),
    ] = None,
) -> None:
    """Attach a host this node reaches (a gateway), or change who may reach it."""
    options = options_of(ctx)
    _check_name(name)
    if host is None:
        if not (allow or deny) or port or same_as or user or ssh_port != 22:
            raise InvalidRequest(
                "give --host to attach a host, or only --allow/--deny to change its allow list"
            )
        with Client(home=options.home) as client:
            view = client.attached.allow(name, add=allow or [], remove=deny or [])
        allowed = view.local.allow if view.local else []
        emit(options, view, f"{name}: {len(allowed)} keys allowed besides this node's own")
        return
    if deny:
        raise InvalidRequest("--deny changes an attached host's allow list: give it without --host")
    try:
        request = AttachRequest(
            name=name,
            host=host,
            ssh_port=ssh_port,
            user=user,
            ports=port or [],
            allow=allow or [],
            same_as=same_as,
        )
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None
    with Client(home=options.home) as client:
        view = client.attached.attach(request)
    gateways = len(view.gateways)
    route = "1 gateway" if gateways == 1 else f"{gateways} gateways"
    emit(options, view, f"attached {view.name} ({_fingerprint(view.host_key)}), {route}")


def detach_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A host this node attached.")],
) -> None:
    """Stop reaching an attached host through this node."""
    options = options_of(ctx)
    _check_name(name)
    with Client(home=options.home) as client:
        client.attached.detach(name)
    emit(options, {"detached": name}, f"detached {name}")


def attached_command(
    ctx: typer.Context,
    own: Annotated[
        bool, typer.Option("--own", help="Only this gateway's, with LAN address and allow list.")
    ] = False,
) -> None:
    """Every attached host this node knows, with the gateways that reach it."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        hosts = client.attached.own() if own else client.attached.list()
    emit(options, [host.model_dump(mode="json") for host in hosts], attached_table(hosts))


def attached_table(hosts: list[AttachedHost]) -> Table:
    """One row per attached host: its ports, specs, host key and gateways (state)."""
    local = any(host.local is not None for host in hosts)
    columns = ["name", "ssh", "ports", "specs", "host key", "gateways"]
    table = Table(*columns, *(["address", "allowed"] if local else []), box=None)
    for host in hosts:
        gateways = ", ".join(f"{g.name} ({g.state})" for g in host.gateways)
        if host.conflicts:
            gateways += "; conflict: " + ", ".join(g.name for g in host.conflicts)
        specs = " ".join(
            part
            for part in (
                host.arch,
                host.os,
                f"{host.cores} cores" if host.cores else "",
                f"{host.memory / 2**30:.1f} GiB" if host.memory else "",
            )
            if part
        )
        ports = ",".join(str(p) for p in host.ports) or "-"
        ssh = f"{host.user}@{host.ssh_port}" if host.user else str(host.ssh_port)
        row = [host.name, ssh, ports, specs or "?", _fingerprint(host.host_key), gateways or "-"]
        if host.local is not None:
            allowed = ", ".join(entry[:8] for entry in host.local.allow) or "owner only"
            row += [host.local.address, allowed]
        table.add_row(*row)
    return table


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise InvalidRequest(f"{name!r} is not an attached host name (peer-name rules)")


def _fingerprint(host_key: str) -> str:
    """``type SHA256:...`` as ``ssh-keygen -l`` shows it."""
    kind, _, data = host_key.partition(" ")
    try:
        digest = hashlib.sha256(base64.b64decode(data)).digest()
    except ValueError:
        return kind
    return f"{kind} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"
