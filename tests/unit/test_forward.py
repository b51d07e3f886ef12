"""``p2prc forward`` against asyncssh's own server on loopback (the hub tests' fake container:
port V inside container N is ``127.0.0.N:V``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import typer
from typer.testing import CliRunner

from p2prc.cli import _forward
from p2prc.containers.forward import Forwarded, forward, forward_ports, parse_pair
from p2prc.errors import AddressInUse, InvalidRequest, PeerUnreachable
from p2prc.identity import Identity
from p2prc.models import ContainerView, TrackedContainer
from tests.unit.cluster.test_hub import _INNER, _ask, _Container, _container, identity, key

__all__ = ["identity", "key"]  # the hub tests' fixtures, used here

_BULK = _INNER + 1


async def _bulk_echo(address: str) -> asyncio.Server:
    """Sends back every byte it gets, until the client stops sending."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, address, _BULK)


async def _round_trip(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    back = await asyncio.wait_for(reader.read(-1), 20)
    await sending
    writer.close()
    return back


def test_pairs() -> None:
    assert parse_pair("8000") == (8000, 8000)
    assert parse_pair("9000:80") == (9000, 80)
    assert parse_pair("0:80") == (0, 80)
    assert parse_pair(":80") == (0, 80)
    for bad in ("0", "x", "1:2:3", "70000", "80:0", "-1:80", "65536:80", ""):
        with pytest.raises(InvalidRequest):
            parse_pair(bad)


def test_a_local_address_names_an_ipv6_bind_in_brackets() -> None:
    assert Forwarded("::1", 7000, "c25", 80).local == "[::1]:7000"
    assert Forwarded("0.0.0.0", 7000, "c25", 80).local == "0.0.0.0:7000"


async def test_ports_reach_the_container_and_close_with_the_block(
    identity: Identity, key: Path
) -> None:
    servers: list[_Container] = []
    async with _container(21, identity, servers) as view:
        bulk = await _bulk_echo("127.0.0.21")
        tracked = TrackedContainer(container=view, peer_address="127.0.0.1:1")
        async with forward_ports(tracked, [(0, _INNER), (0, _BULK)], key_file=key) as fwd:
            first, second = fwd.forwards
            assert (first.bind, first.port, second.port) == ("127.0.0.1", _INNER, _BULK)
            assert first.local == f"127.0.0.1:{first.local_port}"
            assert first.remote == f"{view.id}:{_INNER}"
            assert fwd.via == f"ssh p2prc@127.0.0.1:{view.ssh.port}"
            assert await _ask("127.0.0.1", first.local_port) == b"c21:hi\n"
            data = os.urandom(8 << 20)
            back = await asyncio.gather(*(_round_trip(second.local_port, data) for _ in range(4)))
            assert all(one == data for one in back)
        with pytest.raises(ConnectionRefusedError):
            await _ask("127.0.0.1", first.local_port)
        bulk.close()
    assert len(servers) == 1  # one SSH connection for every port


async def test_a_host_key_other_than_the_pinned_one_is_refused(
    identity: Identity, key: Path
) -> None:
    async with _container(22, identity, []) as view:
        other = ContainerView.model_validate(
            {**view.model_dump(), "ssh": {**view.ssh.model_dump(), "host_key": _other_key()}}
        )
        with pytest.raises(
            PeerUnreachable, match=f"cannot log in to container {view.id}: Host key is not trusted"
        ):
            async with forward(other, _INNER, key_file=key):
                pytest.fail("forwarded through an unknown host key")


def _other_key() -> str:
    new = asyncssh.generate_private_key("ssh-ed25519")
    return new.export_public_key().decode().strip()


async def test_a_local_port_in_use_is_one_clear_error(identity: Identity, key: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with _container(23, identity, []) as view:
            with pytest.raises(AddressInUse, match=f"127.0.0.1:{port} is already in use"):
                async with forward(view, _INNER, port, key_file=key):
                    pytest.fail("listened on a taken port")


async def test_a_dropped_connection_ends_wait(identity: Identity, key: Path) -> None:
    servers: list[_Container] = []
    async with (
        _container(24, identity, servers) as view,
        forward(view, _INNER, key_file=key) as fwd,
    ):
        assert await _ask("127.0.0.1", fwd.local_port) == b"c24:hi\n"
        assert servers[0].conn is not None
        servers[0].conn.abort()
        with pytest.raises(PeerUnreachable, match="dropped"):
            async with asyncio.timeout(10):
                await fwd.wait()
        with pytest.raises(ConnectionRefusedError):
            await _ask("127.0.0.1", fwd.local_port)


# The command, through a typer app of its own, with the fake container on a thread's loop.


class _Peer:
    """The fake container, served by an event loop on a thread of its own."""

    def __init__(self, number: int, identity: Identity) -> None:
        self.servers: list[_Container] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self.view: ContainerView | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._main(number, identity),)
        )

    async def _main(self, number: int, identity: Identity) -> None:
        self._done = asyncio.Event()
        async with _container(number, identity, self.servers) as view:
            self.view = view
            self._ready.set()
            await self._done.wait()

    def __enter__(self) -> _Peer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._done is not None
        self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)
        self._loop.close()

    def drop_soon(self, delay: float) -> None:
        """Abort the first SSH connection ``delay`` seconds after it arrives."""

        def later() -> None:
            for _ in range(200):
                if self.servers and self.servers[0].conn is not None:
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(delay)
            conn = self.servers[0].conn
            assert conn is not None
            self._loop.call_soon_threadsafe(conn.abort)

        threading.Thread(target=later, daemon=True).start()


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[typer.Typer, list[Any]]:
    tracked: list[TrackedContainer] = []

    class _Client:
        def __init__(self, **_: Any) -> None:
            pass

        def __enter__(self) -> _Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def tracked(self) -> list[TrackedContainer]:
            return tracked

    monkeypatch.setattr(_forward, "Client", _Client)
    monkeypatch.setenv("P2PRC_HOME", str(tmp_path))
    app = typer.Typer()
    app.command("forward")(_forward.forward_command)
    app.command("other")(lambda: None)  # else typer makes forward the only, unnamed command
    return app, tracked


def _track(tracked: list[Any], view: ContainerView) -> None:
    tracked.append(TrackedContainer(container=view, peer_address="127.0.0.1:1"))


def test_the_command_prints_the_line_and_stops_cleanly_on_sigterm(
    app: tuple[typer.Typer, list[Any]], identity: Identity
) -> None:
    typer_app, tracked = app
    with _Peer(25, identity) as peer:
        assert peer.view is not None
        _track(tracked, peer.view)

        def terminate() -> None:
            for _ in range(200):
                if peer.servers:
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate, daemon=True).start()
        result = CliRunner().invoke(typer_app, ["forward", "c25", "0:7000", "--bind", "0.0.0.0"])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.output.splitlines()
    assert any(line.startswith("warning: listening on 0.0.0.0: anyone") for line in lines)
    line = next(line for line in lines if line.startswith("forwarding "))
    assert line.startswith("forwarding 0.0.0.0:")
    assert line.endswith(f" -> c25:7000 (via ssh p2prc@127.0.0.1:{peer.view.ssh.port})")
    assert "stopped forwarding" in lines


def test_the_command_exits_when_the_connection_drops(
    app: tuple[typer.Typer, list[Any]], identity: Identity
) -> None:
    typer_app, tracked = app
    with _Peer(26, identity) as peer:
        assert peer.view is not None
        _track(tracked, peer.view)
        peer.drop_soon(0.5)
        result = CliRunner().invoke(
            typer_app, ["forward", peer.view.id[:6], "7000", "--local", "0"]
        )
    assert isinstance(result.exception, PeerUnreachable), result.output
    assert "dropped" in str(result.exception)
    assert "forwarding 127.0.0.1:" in result.output


def test_the_command_refuses_what_it_cannot_do(app: tuple[typer.Typer, list[Any]]) -> None:
    typer_app, _ = app
    runner = CliRunner()
    result = runner.invoke(typer_app, ["forward", "nope", "80"])
    # no container by that name: a peer's port, asked of this home's node (none runs)
    assert type(result.exception).__name__ == "NodeNotRunning"
    result = runner.invoke(typer_app, ["forward", "nope", "80", "81", "--local", "0"])
    assert isinstance(result.exception, InvalidRequest)
    assert "--local goes with one plain PORT" in str(result.exception)
    result = runner.invoke(typer_app, ["forward", "nope", "70000"])
    assert isinstance(result.exception, InvalidRequest)
    result = runner.invoke(typer_app, ["forward", "nope", "80", "--local", "70000"])
    assert result.exit_code == 2  # typer's range check


def test_only_loopback_binds_go_without_a_warning() -> None:
    for quiet in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert _forward._loopback(quiet)
    for loud in ("0.0.0.0", "::", "", "192.168.1.5", "example.org"):
        assert not _forward._loopback(loud)
