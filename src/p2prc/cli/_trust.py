"""``p2prc id``, ``p2prc trust ...``, ``p2prc invite`` and ``p2prc join``: trust in one command."""

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer

from ..client import AsyncClient
from ..config import load, parse_duration
from ..errors import InvalidRequest
from ..identity import Identity
from ..peers.invites import TrustAPI, TrustEntry, join
from ..trust import ROLES, fingerprint
from ._common import Options, emit, err, options_of

__all__ = ["id_command", "invite_command", "join_command", "trust_app"]

trust_app = typer.Typer(help="Keys this node trusts: add (by name, id or address), list, rm.")

T = TypeVar("T")


def _call(options: Options, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient(home=options.home) as client:
            return await work(client)

    return asyncio.run(main())


def _describe(entry: TrustEntry) -> str:
    name = entry.name or "(name unknown)"
    roles = f"  [{', '.join(entry.roles)}]" if entry.roles else ""
    return f"{name}  {entry.node_id}  {entry.fingerprint}{roles}"


def id_command(ctx: typer.Context) -> None:
    """This node's id, public key and fingerprint, to give to a peer's owner."""
    options = options_of(ctx)
    home = options.home
    identity = Identity.load(home.identity_dir)
    name = load(home).name
    data = {
        "node_id": identity.node_id,
        "name": name,
        "public_key": identity.openssh_public_key(name),
        "fingerprint": fingerprint(identity.public_key),
    }
    human = "\n".join(
        [
            f"node id      {data['node_id']}",
            f"name         {name}",
            f"fingerprint  {data['fingerprint']}",
            f"public key   {data['public_key']}",
            f"a peer's owner allows this node with: p2prc trust add {identity.node_id}",
        ]
    )
    emit(options, data, human)


@trust_app.command("add")
def trust_add(
    ctx: typer.Context,
    peer: Annotated[
        str, typer.Argument(help="A peer name, node id prefix, host:port, or 'ssh-ed25519 ...'.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help=f"What it may do: {', '.join(ROLES)} (repeatable; default: all). "
            "Adds to a trusted key's roles.",
        ),
    ] = None,
) -> None:
    """Trust a peer: its key goes into trust.allow (roles: trust.roles), now and in config.toml."""
    options = options_of(ctx)
    if not yes and (options.json or not sys.stdin.isatty()):
        raise InvalidRequest("trust add asks to confirm: give --yes with --json or without a tty")

    async def work(client: AsyncClient) -> TrustEntry:
        api = TrustAPI(client)
        found = await api.lookup(peer)
        if not yes:
            err.print(f"trust {_describe(found)}?", markup=False)
            if not await asyncio.to_thread(typer.confirm, "add it to trust.allow", default=False):
                raise typer.Exit(1)
        return await api.add(found.public_key, role or None)

    entry = _call(options, work)
    verb = "now trusts" if entry.added else "trusts" if role else "already trusted"
    emit(options, entry, f"{verb} {_describe(entry)}")


@trust_app.command("list")
def trust_list(ctx: typer.Context) -> None:
    """The keys this node trusts: node id, name, fingerprint, roles."""
    options = options_of(ctx)
    entries = _call(options, lambda client: TrustAPI(client).list())
    rows = [entry.model_dump(mode="json", exclude={"added"}) for entry in entries]
    emit(options, rows, "\n".join(_describe(e) for e in entries) or "no trusted keys")


@trust_app.command("rm")
def trust_rm(
    ctx: typer.Context,
    peer: Annotated[str, typer.Argument(help="A trusted node's id prefix, name or key.")],
) -> None:
    """Stop trusting a peer (config.toml too)."""
    options = options_of(ctx)
    entry = _call(options, lambda client: TrustAPI(client).remove(peer))
    emit(options, entry, f"no longer trusts {_describe(entry)}")


def invite_command(
    ctx: typer.Context,
    ttl: Annotated[str, typer.Option("--ttl", help="How long it works: 1h, 30m, 2d.")] = "1h",
    uses: Annotated[int, typer.Option("--uses", min=1, max=1000, help="How many nodes.")] = 1,
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help=f"What it may do: {', '.join(ROLES)} (default: all)."),
    ] = None,
) -> None:
    """A token a new node joins with ('p2prc join TOKEN'): it is trusted both ways."""
    options = options_of(ctx)
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        raise InvalidRequest(f"--ttl: {exc}") from None
    invitation = _call(options, lambda client: TrustAPI(client).invite(seconds, uses, role or None))
    until = datetime.fromtimestamp(invitation.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    human = (
        f"{invitation.token}\n"
        f"on the new machine (its node running): p2prc join {invitation.token}\n"
        f"works {uses} time(s), until {until}"
        + (f"; the new node may use: {', '.join(role)}" if role else "")
    )
    emit(options, invitation, human)


def join_command(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="The token 'p2prc invite' printed.")],
) -> None:
    """Join the node that made TOKEN: it trusts this node, this node trusts and syncs with it."""
    options = options_of(ctx)
    result = _call(options, lambda client: join(token, client))
    human = (
        f"joined {result.name} ({result.node_id}) at {result.api}\n"
        f"its fingerprint {result.fingerprint}; both nodes trust each other"
    )
    emit(options, result, human)
