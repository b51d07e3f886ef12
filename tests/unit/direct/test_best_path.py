"""Container SSH by the best path (#18): ``login`` over a route (a direct path's ``port``
stream) when it gives one, by address when it does not or the login over it fails, the
pinned host key either way; the NAT'd peer's relay port mapped back to the container's
host port; ``node_route`` over two real ``Paths``; the CLI's ProxyCommand without a node."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from p2prc.api.direct import fallback_address
from p2prc.cli._containers import ssh_argv
from p2prc.config import Home
from p2prc.containers.sftp import login
from p2prc.direct.paths import Paths, container_port
from p2prc.direct.ssh import node_route, proxy_argv
from p2prc.errors import PeerUnreachable
from p2prc.identity import Identity
from p2prc.models import ContainerView, TrackedContainer
from p2prc.peers.records import PeerRecord
from p2prc.tunnel.streams import pipe
from tests.unit.cluster.test_hub import _Container, _container, identity, key
from tests.unit.direct.test_link import _echo_server
from tests.unit.direct.test_paths import _Side, _started, _wait

__all__ = ["identity", "key"]  # the hub tests' fixtures, used here


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _with(view: ContainerView, **ssh: object) -> ContainerView:
    return view.model_copy(update={"ssh": view.ssh.model_copy(update=ssh)})


def _other_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@contextlib.asynccontextmanager
async def _relay(target: int) -> AsyncIterator[int]:
    """A port that carries each connection to ``target`` (a NAT'd node's relay port)."""

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far = await asyncio.open_connection("127.0.0.1", target)
        await pipe(reader, writer, *far)

    server = await asyncio.start_server(carry, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _connected(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


# -- the port the peer maps a stream to ------------------------------------------------------


def test_a_relay_port_maps_back_to_the_containers_host_port() -> None:
    public = {32768: ("relay.example", 40001), 32769: ("relay.example", 40002)}
    ports = {32768, 32769}
    assert container_port(ports, public.get, 32768) == 32768  # a public peer's own port
    assert container_port(ports, public.get, 40002) == 32769  # a NAT'd peer's relay port
    assert container_port(ports, public.get, 40003) is None  # nobody's: refused
    assert container_port(set(), public.get, 40001) is None  # not this peer's container
    # A port that is both one container's host port and another's relay port: the host port.
    assert container_port({40001, 32768}, public.get, 40001) == 40001
    assert container_port(ports, lambda port: None, 40001) is None  # not published


# -- login's choice ---------------------------------------------------------------------------


async def test_login_goes_over_the_route_when_it_gives_a_socket(
    identity: Identity, key: Path
) -> None:
    servers: list[_Container] = []
    async with _container(31, identity, servers) as view:
        asked: list[str] = []

        async def route(wanted: ContainerView) -> socket.socket | None:
            asked.append(wanted.id)
            return _connected(view.ssh.port)

        nowhere = _with(view, port=_free_port())  # its address answers nobody
        conn = await login(nowhere, key, route=route)
        conn.close()
        assert asked == [view.id]
        assert len(servers) == 1
        with pytest.raises(PeerUnreachable, match="cannot log in"):
            await login(nowhere, key)  # without the route: the address, and nobody there


async def test_login_falls_back_to_the_address(identity: Identity, key: Path) -> None:
    servers: list[_Container] = []
    async with _container(32, identity, servers) as view:

        async def no_path(wanted: ContainerView) -> socket.socket | None:
            return None

        async def refused(wanted: ContainerView) -> socket.socket | None:
            mine, theirs = socket.socketpair()  # a stream the peer refuses: closed at once
            theirs.close()
            return mine

        for route in (no_path, refused):
            conn = await login(view, key, route=route)
            conn.close()
        assert len(servers) == 2


async def test_the_pinned_host_key_holds_over_the_route(identity: Identity, key: Path) -> None:
    async with _container(33, identity, []) as view, _container(34, identity, []) as other:

        async def wrong(wanted: ContainerView) -> socket.socket | None:
            return _connected(other.ssh.port)  # another container's sshd, another key

        conn = await login(view, key, route=wrong)  # refused over it: then the address
        conn.close()
        with pytest.raises(PeerUnreachable, match="Host key is not trusted"):
            await login(_with(view, port=other.ssh.port), key, route=wrong)
        with pytest.raises(PeerUnreachable, match="without an SSH host key"):
            await login(_with(view, host_key=""), key, route=wrong)


# -- node_route over real direct paths --------------------------------------------------------


async def test_node_route_logs_in_over_a_direct_path_and_falls_back_when_it_dies(
    tmp_path: Path, identity: Identity, key: Path
) -> None:
    servers: list[_Container] = []
    async with _container(35, identity, servers) as hosted, _relay(hosted.ssh.port) as relay:
        host_port = hosted.ssh.port
        # b is a NAT'd peer: the view its creator a holds names b's relay port.
        a, b = _Side(tmp_path, "a"), _Side(tmp_path, "b")
        view = _with(hosted, port=relay).model_copy(update={"peer": b.identity.node_id})

        def b_targets(peer: str, target: str, port: int) -> tuple[str, int] | None:
            mine = {host_port} if peer == a.identity.node_id else set()
            local = container_port(mine, {host_port: ("127.0.0.1", relay)}.get, port)
            return None if target != "port" or local is None else ("127.0.0.1", local)

        async with contextlib.AsyncExitStack() as stack:
            await _started(stack, [(a, lambda *_: None), (b, b_targets)])
            a_paths, b_paths = a.paths, b.paths
            assert a_paths is not None
            assert b_paths is not None
            route = node_route(lambda: a_paths)
            b_id, a_id = b.identity.node_id, a.identity.node_id

            # No path yet: the first login goes by the relay's address and starts an attempt.
            first = await login(view, key, route=route)
            first.close()
            await _wait(lambda: a_paths.link(b_id) is not None)
            # Now over the direct path: b serves a stream to the container's host port.
            conn = await login(view, key, route=route)
            b_link = b_paths.link(a_id)
            assert b_link is not None
            assert len(b_link.mux.streams) == 1
            result = await conn.run("true")  # the fake container answers every command 3
            assert result.exit_status == 3
            # The path dies: the session on it breaks, the next login goes by address.
            link = a_paths.link(b_id)
            assert link is not None
            link._wire.writer.transport.abort()
            await asyncio.wait_for(conn.wait_closed(), 10)
            await _wait(lambda: a_paths.link(b_id) is None)
            again = await login(view, key, route=route)
            again.close()
        assert len(servers) == 3


async def test_node_route_gives_nothing_while_the_paths_do_not_run(
    identity: Identity, key: Path
) -> None:
    def stopped() -> Paths:
        raise RuntimeError("Direct paths run only while the node runs.")

    async with _container(36, identity, []) as view:
        assert await node_route(stopped)(view) is None
        conn = await login(view, key, route=node_route(stopped))
        conn.close()


# -- the CLI's ProxyCommand -------------------------------------------------------------------


def test_the_ssh_command_line_carries_the_proxy_command(tmp_path: Path) -> None:
    home = Home(tmp_path / "my home")  # a space: quoted
    view = ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": "c" * 32, "image": "i",
            "ssh": {"host": "10.0.0.7", "port": 40022, "user": "p2prc", "host_key": _other_key()},
            "ports": [], "gpu": False, "cpus": 1, "memory": 1, "owner": "d" * 32,
            "created_at": 0,
        }
    )  # fmt: skip
    argv = ssh_argv(home, view, ["uname"])
    proxy = next(arg for arg in argv if arg.startswith("ProxyCommand="))
    words = shlex.split(proxy.removeprefix("ProxyCommand="))
    assert words == proxy_argv(home.path, view)
    assert words[-3:] == ["c" * 32, "40022", "10.0.0.7"]
    assert "StrictHostKeyChecking=yes" in argv  # still pinned, under its alias
    assert "HostKeyAlias=p2prc-0123456789ab" in argv
    assert argv[argv.index("--") + 1 :] == ["p2prc@10.0.0.7", "uname"]


def _proxy(home: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "p2prc.direct.ssh", "--home", str(home), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, check=False)


async def test_the_proxy_goes_by_address_without_a_node(tmp_path: Path) -> None:
    server, port = await _echo_server()
    try:
        done = await asyncio.to_thread(
            _proxy, tmp_path, "e" * 32, str(port), "127.0.0.1", stdin=b"over stdio\n" * 1000
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"over stdio\n" * 1000


def test_the_proxy_refuses_bad_arguments_and_says_why_it_cannot_connect(tmp_path: Path) -> None:
    bad = _proxy(tmp_path, "e" * 32, "70000", "127.0.0.1")
    assert bad.returncode == 2
    assert b"port must be 1-65535" in bad.stderr
    closed = _proxy(tmp_path, "e" * 32, str(_free_port()), "127.0.0.1")
    assert closed.returncode == 1
    assert b"PeerUnreachable: cannot connect to 127.0.0.1 port" in closed.stderr


# -- the node's forward without a direct path -------------------------------------------------


def test_the_forward_without_a_path_goes_to_the_views_ssh_address() -> None:
    peer = Identity.generate()
    view = ContainerView.model_validate(
        {
            "id": "0123456789ab", "name": "c", "peer": peer.node_id, "image": "i",
            "ssh": {"host": "203.0.113.9", "port": 40022, "user": "p2prc"},
            "ports": [{"container_port": 8000, "host_port": 32800, "public": "203.0.113.9:40080"}],
            "gpu": False, "cpus": 1, "memory": 1, "owner": "d" * 32, "created_at": 0,
        }
    )  # fmt: skip
    tracked = [TrackedContainer(container=view, peer_address="10.0.0.7:8088")]
    natted = PeerRecord(
        node_id=peer.node_id, public_key=peer.public_key, name="p", version=1,
        addresses=("10.0.0.7",), api_port=8088, behind_nat=True,
    )  # fmt: skip
    public = dataclasses.replace(natted, behind_nat=False)
    # A NAT'd peer's container: its SSH on the relay, as the view says; an extra port too.
    assert fallback_address(tracked, natted, peer.node_id, 40022) == ("203.0.113.9", 40022)
    assert fallback_address(tracked, natted, peer.node_id, 32800) == ("203.0.113.9", 40080)
    # Nothing known of another port of a NAT'd peer; another peer's containers do not count.
    assert fallback_address(tracked, natted, peer.node_id, 9999) is None
    assert fallback_address(tracked, None, "f" * 32, 40022) is None
    # A public peer: its own address for a port no tracked container names.
    assert fallback_address(tracked, public, peer.node_id, 9999) == ("10.0.0.7", 9999)
    assert fallback_address([], public, peer.node_id, 40022) == ("10.0.0.7", 40022)


async def test_the_proxy_ends_when_the_far_end_closes_while_ssh_still_writes(
    tmp_path: Path,
) -> None:
    # The far end (a path that died, an sshd that quit) closes; ssh's side of the pipe is
    # still open: the proxy closes stdout and exits, so ssh sees its connection end.
    async def hello_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-gone\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    command = [sys.executable, "-m", "p2prc.direct.ssh", "--home", str(tmp_path)]
    process = await asyncio.create_subprocess_exec(
        *command, "e" * 32, str(port), "127.0.0.1",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        got = await asyncio.wait_for(process.stdout.read(), 20)  # to the end: stdout closed
        assert got == b"SSH-2.0-gone\r\n"
        assert process.stdin is not None
        process.stdin.close()  # as ssh does when its connection ended: then the proxy exits
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        server.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
