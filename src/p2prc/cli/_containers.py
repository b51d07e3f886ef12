"""``p2prc container ...`` and ``p2prc images``: containers on peers."""

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from ..client import Client
from ..config import Home
from ..containers import hostkeys
from ..containers.store import pick_tracked
from ..direct.ssh import proxy_command
from ..errors import ConfigError, InvalidRequest, validation_message
from ..models import ContainerView, CreateContainer
from ._common import Options, command, emit, err, options_of

__all__ = [
    "bootstrap_images",
    "build_image",
    "container_app",
    "create_container",
    "images",
    "list_containers",
    "remove_container",
]

container_app = typer.Typer(help="Containers on peers: create, list, remove, log in.")


def create_container(options: Options, peer: str, spec: CreateContainer | None = None) -> None:
    """Create a container on ``peer`` through the local node, showing progress."""
    spec = spec if spec is not None else CreateContainer()
    seen: list[str] = []

    def show(text: str) -> None:
        if not seen or seen[-1] != text:
            err.print(f"  {text}", style="dim", markup=False)
        seen.append(text)

    # The node resolves the name from its signed table: one request from here.
    with Client(home=options.home) as client, err.status(f"asking {peer} for a container"):
        view = client.create_on_peer(peer, spec, progress=show)
    emit(options, view, _container_table([view]))
    if not options.json:
        err.print(f"log in with: p2prc container ssh {view.id}")


@container_app.command("create")
def create_command(
    ctx: typer.Context,
    peer: Annotated[str, typer.Argument(help="Peer name, node id prefix, host:port or URL.")],
    ports: Annotated[int, typer.Option("--ports", "-p", min=0, help="Extra TCP ports.")] = 0,
    gpu: Annotated[bool, typer.Option("--gpu", help="Ask for one GPU.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", min=0, help="Ask for N GPUs.")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="Container name.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="An image the peer offers.")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPU cores, e.g. 1.5.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="e.g. 2GiB.")] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Lease, e.g. 2h; none = kept.")] = None,
    key: Annotated[
        list[str] | None, typer.Option("--key", help="Extra OpenSSH public key (repeatable).")
    ] = None,
) -> None:
    """Create a container with SSH on a peer (the original --touch)."""
    try:
        spec = CreateContainer(
            ports=ports,
            gpu=gpu,
            gpus=gpus,
            name=name,
            image=image,
            cpus=cpus,
            memory=memory,
            ttl=ttl,
            authorized_keys=key or [],
        )
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None
    create_container(options_of(ctx), peer, spec)


@command(container_app, "list", help="Containers this node created on peers (the original --tc).")
def list_containers(options: Options) -> None:
    """Print the containers this node created on peers."""
    with Client(home=options.home) as client:
        tracked = client.tracked()
    views = [item.container for item in tracked]
    emit(options, [item.model_dump(mode="json") for item in tracked], _container_table(views))


def remove_container(options: Options, container_id: str) -> None:
    """Remove a tracked container on its peer."""
    with Client(home=options.home) as client:
        client.remove_tracked(container_id)
    emit(options, {"removed": container_id}, f"removed {container_id}")


@container_app.command("rm")
def remove_command(
    ctx: typer.Context, container_id: Annotated[str, typer.Argument(help="Id or prefix.")]
) -> None:
    """Remove a container you created (the original --rm ADDR --id ID)."""
    remove_container(options_of(ctx), container_id)


@container_app.command(
    "ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def ssh_command(
    ctx: typer.Context,
    container_id: Annotated[str, typer.Argument(help="Id or prefix.")],
) -> None:
    """Log in to a container with this node's key; words after -- run as a command."""
    options = options_of(ctx)
    with Client(home=options.home) as client:
        item = pick_tracked(client.tracked(), container_id)
    argv = ssh_argv(options.home, item.container, list(ctx.args))
    if shutil.which("ssh") is None:
        raise InvalidRequest("no 'ssh' command on this machine; install openssh-client")
    pin_host_key(options.home, item.container)
    os.execvp(argv[0], argv)


@container_app.command("cp")
def cp_command(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="A local path, or ID:PATH in a container.")],
    dst: Annotated[str, typer.Argument(help="A local path, or ID:PATH in a container.")],
) -> None:
    """Copy files to or from a container you created (directories recursive), over SSH."""
    from ._copy import copy_files

    copy_files(options_of(ctx), src, dst)


def pin_host_key(home: Home, view: ContainerView) -> None:
    """Write the host key the peer gave at creation to known_hosts (it is there already
    unless someone removed it)."""
    if view.ssh.host_key:
        hostkeys.pin(home.known_hosts, hostkeys.alias(view.id), view.ssh.host_key)


def ssh_argv(home: Home, view: ContainerView, command: list[str]) -> list[str]:
    """The ssh command line for a container; an argument list, never a shell string."""
    # A key pinned at creation must match; without one, the first login decides.
    checking = "yes" if view.ssh.host_key else "accept-new"
    return [
        "ssh",
        "-i",
        str(home.identity_key),
        "-p",
        str(view.ssh.port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"StrictHostKeyChecking={checking}",
        "-o",
        f"UserKnownHostsFile={home.known_hosts}",
        # Each container has its own host key; ports are reused by later containers.
        "-o",
        f"HostKeyAlias={hostkeys.alias(view.id)}",
        # By the best path: the node's direct path to the peer when up, else the address.
        "-o",
        f"ProxyCommand={proxy_command(home.path, view)}",
        # "--" ends the options: nothing a peer said can become one.
        "--",
        f"{view.ssh.user}@{view.ssh.host}",
        *command,
    ]


def images(options: Options, peer: str) -> None:
    """Print the images a peer offers."""
    from ._peers import resolve

    with Client(resolve(options, peer), home=options.home) as client:
        result = client.images()
    table = Table("image", "default", "present", box=None)
    for image in result.images:
        table.add_row(
            image, "yes" if image == result.default else "", str(image in result.available)
        )
    emit(options, result, table)


def bootstrap_images(
    options: Options,
    *,
    offline: bool | None,
    force: bool,
    packages: str | None = None,
    tag: str | None = None,
    dask: bool = False,
) -> None:
    """Build the default container image on this machine, offline if need be; with
    ``packages``, the image ``tag``: the default one plus those Debian packages, offline;
    with ``dask``, also the Dask image of this environment's versions."""
    from ..config import load
    from ..containers.images import DEFAULT_IMAGE, ensure_default_image, ensure_package_image

    if packages is None:
        if tag is not None:
            raise InvalidRequest("images bootstrap --tag needs --packages (the extra packages)")
        with _steps(options, f"building {DEFAULT_IMAGE} (a first offline build takes minutes)"):
            how = ensure_default_image(offline=offline, force=force)
        if not dask:
            emit(options, {"image": DEFAULT_IMAGE, "how": how}, f"{DEFAULT_IMAGE}: {how}")
            return
        from ..cluster.image import ensure_dask_image

        with _steps(options, "building the Dask image (a first build downloads wheels)"):
            dask_image = ensure_dask_image(force=force)
        emit(
            options,
            {"image": DEFAULT_IMAGE, "how": how, "dask_image": dask_image},
            f"{DEFAULT_IMAGE}: {how}; Dask image: {dask_image}",
        )
        return
    if dask:
        raise InvalidRequest("images bootstrap --dask builds on the default image; drop --packages")
    if tag is None or offline is False:
        raise InvalidRequest("images bootstrap --packages needs --tag NAME and builds offline")
    with _steps(options, f"building {tag} offline with {packages} (minutes)"):
        how = ensure_package_image(tag, packages.split(","), force=force)
    try:
        offered = load(options.home).containers.images
    except ConfigError:
        offered = [DEFAULT_IMAGE]
    if tag in offered:
        emit(options, {"image": tag, "how": how, "offered": True}, f"{tag}: {how} (offered)")
        return
    hint = json.dumps([*offered, tag])
    text = f"{tag}: {how}; offer it: p2prc config set containers.images '{hint}'"
    emit(options, {"image": tag, "how": how, "offered": False}, text)


@contextlib.contextmanager
def _steps(options: Options, title: str) -> Iterator[None]:
    """The steps of an image build: a spinner over the main steps on a terminal, else
    plain lines on stderr (stdout keeps the result alone)."""
    from ..containers.images import reporting

    if options.json or not sys.stdout.isatty():
        err.print(title, markup=False)
        with reporting(lambda text: err.print(f"  {text}", markup=False)):
            yield
        return

    with err.status(Text(title)) as spinner:

        def show(text: str) -> None:
            if not text.startswith("debootstrap: "):  # its hundreds of lines only flash by
                err.print(Text(f"  {text}"))
            spinner.update(Text(f"{title}: {text}"[:200]))

        with reporting(show):
            yield


def build_image(options: Options, context: Path, tag: str) -> None:
    """Build an image from a Dockerfile and add it to the images this node offers."""
    from .._home import init_home
    from ..config import load, set_value
    from ..containers.images import build_offered_image

    init_home(options.home)
    with _steps(options, f"building {tag} from {context}"):
        build_offered_image(context, tag)
    offered = load(options.home).containers.images
    if tag not in offered:
        set_value(options.home, "containers.images", json.dumps([*offered, tag]))
    emit(options, {"image": tag, "offered": True}, f"{tag} built and offered (restart the node)")


def _container_table(views: list[ContainerView]) -> Table:
    table = Table("id", "name", "peer", "ssh", "ports", "gpus", "expires", box=None)
    for view in views:
        ports = ", ".join(f"{p.container_port}->{p.host_port}" for p in view.ports)
        ssh = f"{view.ssh.user}@{view.ssh.host}:{view.ssh.port}"
        expires = "never" if view.expires_at is None else f"{view.expires_at:.0f}"
        gpus = str(view.gpus or int(view.gpu))
        table.add_row(view.id, view.name, view.peer[:8], ssh, ports, gpus, expires)
    return table
