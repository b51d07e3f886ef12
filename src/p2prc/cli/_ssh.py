"""``p2prc ssh``: end-to-end SSH to an attached host through one of its gateways.

``p2prc ssh NAME [-l USER] [-- CMD...]`` runs the system ``ssh`` (an argument list, never a
shell string) with ``ProxyCommand`` = ``python -m p2prc.attach NAME`` (the same as the hidden
``p2prc ssh --proxy NAME``, without the CLI's start-up), which pipes ssh's bytes
over ``attach.proxy.open_route``; the host key from the gateway's signed record is pinned
first, and ``StrictHostKeyChecking=yes`` makes ssh refuse a host whose key changed.
``p2prc ssh --config [NAME...]`` prints ``ssh_config`` blocks, so plain ``ssh NAME``,
``scp``, ``rsync`` and Ansible work unchanged (``ssh -F FILE`` or an ``Include``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from typing import Annotated

import typer

from .._client_async import AsyncClient
from ..attach.client import AttachedAPI
from ..attach.map_client import map_attached, unmap_attached
from ..attach.models import AttachedHost
from ..attach.proxy import (
    host_alias,
    pin_host_key,
    run_proxy,
    ssh_config_block,
    ssh_options,
)
from ..attach.records import NAME
from ..config import Home
from ..errors import AttachedNotFound, InvalidRequest
from ._common import Options, emit, options_of

__all__ = [
    "SSH_SETTINGS",
    "is_attached",
    "map_attached_port",
    "ssh_argv",
    "ssh_command",
    "unmap_attached_port",
]

# The command's click settings: words after "--" (or unknown) are the remote command.
SSH_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")


def ssh_argv(home: Home, host: AttachedHost, user: str, command: list[str]) -> list[str]:
    """The ssh command line for an attached host; an argument list, never a shell string."""
    if user and not _USER.match(user):
        raise InvalidRequest(f"{user!r} is not a user name")
    login = ["-l", user] if user else []
    # "--" ends the options: nothing after it can become one.
    return ["ssh", *ssh_options(home.path, host), *login, "--", host.name, *command]


async def _hosts(home: Home, names: list[str]) -> list[AttachedHost]:
    async with AsyncClient(home=home) as client:
        api = AttachedAPI(client)
        if not names:
            return await api.list()
        return [await api.get(name) for name in names]


def _config(options: Options, names: list[str]) -> None:
    home = options.home
    hosts = asyncio.run(_hosts(home, names))
    blocks: list[dict[str, str]] = []
    for host in hosts:
        pin_host_key(home.path, host)
        block = ssh_config_block(home.path, host)
        blocks.append({"name": host.name, "alias": host_alias(host.name), "config": block})
    text = "\n".join(block["config"] for block in blocks)
    emit(options, blocks, text.rstrip("\n") if text else "# no attached hosts")


def _ssh(options: Options, name: str, user: str, command: list[str]) -> None:
    home = options.home
    (host,) = asyncio.run(_hosts(home, [name]))
    argv = ssh_argv(home, host, user or host.user, command)
    if shutil.which("ssh") is None:
        raise InvalidRequest("no 'ssh' command on this machine; install openssh-client")
    pin_host_key(home.path, host)
    os.execvp(argv[0], argv)


def ssh_command(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="An attached host's name (see 'p2prc attached').")
    ] = None,
    login: Annotated[
        str | None, typer.Option("-l", "--login", help="The user on the host.")
    ] = None,
    config: Annotated[
        bool, typer.Option("--config", help="Print ssh_config blocks (all hosts, or NAME...).")
    ] = False,
    proxy: Annotated[
        str | None, typer.Option("--proxy", hidden=True, help="ProxyCommand: pipe stdio.")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", hidden=True, min=1, max=65535, help="With --proxy.")
    ] = None,
) -> None:
    """SSH to an attached host through its gateway; words after -- run as a command."""
    options = options_of(ctx)
    extra = list(ctx.args)
    if proxy is not None:
        if name is not None or extra or config:
            raise InvalidRequest("--proxy NAME takes no other arguments")
        asyncio.run(run_proxy(options.home, proxy, port))
        return
    if config:
        _config(options, [*([name] if name else []), *extra])
        return
    if name is None:
        raise InvalidRequest("give an attached host's name: p2prc ssh NAME [-- CMD...]")
    _ssh(options, name, login or "", extra)


def is_attached(options: Options, name: str) -> bool:
    """Whether ``name`` is an attached host the local node knows (not a peer, an address)."""
    if not NAME.match(name):
        return False
    try:
        asyncio.run(_hosts(options.home, [name]))
    except AttachedNotFound:
        return False
    return True


def map_attached_port(
    options: Options, name: str, port: int, domain: str | None, *, udp: bool
) -> None:
    """``map-port PORT --remote NAME`` for an attached host: its gateway forwards and
    publishes the port (through the gateway's relay when it is behind NAT)."""
    if domain is not None or udp:
        raise InvalidRequest("a port of an attached host is mapped as plain TCP: no --domain/--udp")
    mapped = asyncio.run(map_attached(options.home, name, port))
    data = mapped.model_dump(by_alias=True, include={"ip_address", "port_no", "entire_address"})
    data["attached"] = name
    data["port"] = port
    emit(options, data, mapped.entire_address)


def unmap_attached_port(options: Options, name: str, port: int) -> None:
    """``unmap PORT --remote NAME``: the gateway stops forwarding that port of the host."""
    asyncio.run(unmap_attached(options.home, name, port))
    emit(options, {"unmapped": port, "attached": name}, f"unmapped {name}:{port}")
