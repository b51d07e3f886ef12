"""``Paths`` over real loopback sockets: attempts by dial, adoption, the crossed-connection
rule, refusals (trust, membership, garbage), fallback when a path dies, and the listener."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2prc.config import DirectConfig
from p2prc.direct import paths as paths_module
from p2prc.direct.link import Targets
from p2prc.direct.listener import bind_direct
from p2prc.direct.paths import DIRECT_KEY, Paths, Punch, direct_port
from p2prc.errors import AddressInUse
from p2prc.identity import Identity
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member, MemberState
from tests.unit.direct.test_link import _echo_server


class _Table:
    """The part of a PeerTable that Paths reads."""

    def __init__(self, me: PeerRecord) -> None:
        self.me = me
        self.members: dict[str, Member] = {}

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state == MemberState.ALIVE]


def _record(identity: Identity, name: str, port: int = 0, **fields: Any) -> PeerRecord:
    custom = {DIRECT_KEY: str(port)} if port else {}
    return PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=name,
        version=1,
        addresses=("127.0.0.1",),
        api_port=1,
        custom=custom,
        **fields,
    )


class _Side:
    def __init__(self, tmp_path: Path, name: str, **fields: Any) -> None:
        self.identity = Identity.generate()
        self.name, self.fields = name, fields
        self.table = _Table(_record(self.identity, name, **fields))
        self.allowed: set[str] = set()
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.paths: Paths | None = None

    def record(self) -> PeerRecord:
        assert self.paths is not None
        return _record(self.identity, self.name, self.paths.port, **self.fields)


def _echo_targets(port: int) -> Targets:
    def targets(peer_id: str, target: str, wanted: int) -> tuple[str, int] | None:
        return ("127.0.0.1", port) if target == "api" else None

    return targets


async def _started(
    stack: contextlib.AsyncExitStack,
    sides: list[tuple[_Side, Targets]],
    punches: dict[str, Punch] | None = None,
) -> None:
    """Each side's ``Paths`` running (closed with ``stack``; ``punches`` by side name), every
    side a member of the others' tables and allowed by them."""
    config = DirectConfig(retry=1.0, heartbeat=0.2, stale=0.8)
    for side, targets in sides:
        side.paths = await stack.enter_async_context(
            Paths(
                side.identity,
                config,
                side.dir,
                host="127.0.0.1",
                table=lambda side=side: side.table,  # type: ignore[misc]
                allowed=lambda node_id, side=side: node_id in side.allowed,  # type: ignore[misc]
                targets=targets,
                punch=(punches or {}).get(side.name),
            )
        )
    for one, _ in sides:
        for other, _ in sides:
            if other is not one:
                one.table.members[other.identity.node_id] = Member(other.record())
                one.allowed.add(other.identity.node_id)


@contextlib.asynccontextmanager
async def _pair(
    tmp_path: Path,
    *,
    a_fields: dict[str, Any] | None = None,
    b_fields: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[_Side, _Side, int]]:
    server, echo_port = await _echo_server()
    a, b = _Side(tmp_path, "a", **(a_fields or {})), _Side(tmp_path, "b", **(b_fields or {}))
    async with contextlib.AsyncExitStack() as stack:
        await _started(stack, [(a, _echo_targets(echo_port)), (b, _echo_targets(echo_port))])
        yield a, b, echo_port
    server.close()


async def _wait(condition: Any, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_the_direct_port_comes_from_the_reserved_key_only_when_valid() -> None:
    identity = Identity.generate()
    assert direct_port(_record(identity, "x", 4242)) == 4242
    for bad in ("", "0", "65536", "-1", "12a", "1" * 9, " 80"):
        record = PeerRecord(
            node_id=identity.node_id,
            public_key=identity.public_key,
            name="x",
            version=1,
            custom={DIRECT_KEY: bad},
        )
        assert direct_port(record) is None, bad


async def test_one_touch_makes_a_path_both_sides_use(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        a_id, b_id = a.identity.node_id, b.identity.node_id
        assert a.paths.path(b_id).kind == "public"
        a.paths.touch(b_id)
        await _wait(lambda: b.paths.link(a_id) is not None and a.paths.link(b_id) is not None)
        info = a.paths.path(b_id)
        assert info.kind == "direct"
        assert info.attempts == 1
        opened = await b.paths.open_stream(a_id, "api")  # either side opens streams
        assert opened is not None
        reader, writer = opened
        writer.write(b"both ways")
        assert await reader.readexactly(9) == b"both ways"
        writer.close()
        refused = await a.paths.open_stream(b_id, "port", 22)  # b's rule refuses it:
        assert refused is not None
        assert await asyncio.wait_for(refused[0].read(), 5) == b""  # closed, nothing else
        refused[1].close()
        assert a.paths.transport(b_id) is not None
        assert {p.node_id for p in a.paths.paths()} == {b_id}


async def test_crossed_dials_keep_the_lower_ids_connection(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        a_id, b_id = a.identity.node_id, b.identity.node_id
        a.paths.touch(b_id)
        b.paths.touch(a_id)
        await _wait(lambda: a.paths.link(b_id) is not None and b.paths.link(a_id) is not None)
        await asyncio.sleep(0.5)  # both connections were checked; one is closed
        link_a, link_b = a.paths.link(b_id), b.paths.link(a_id)
        assert link_a is not None
        assert link_b is not None
        lower_is_a = a_id < b_id
        assert link_a.client == lower_is_a
        assert link_b.client != lower_is_a
        opened = await a.paths.open_stream(b_id, "api")
        assert opened is not None
        opened[1].write(b"x")
        assert await opened[0].readexactly(1) == b"x"
        opened[1].close()


async def test_a_peer_the_trust_policy_refuses_gets_no_path(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        b.allowed.clear()  # b does not allow a
        a.paths.touch(b.identity.node_id)
        await _wait(lambda: a.paths.path(b.identity.node_id).last_error != "")
        assert a.paths.link(b.identity.node_id) is None
        assert b.paths.link(a.identity.node_id) is None
        assert "refused" in a.paths.path(b.identity.node_id).last_error
        # and within retry, no new attempt
        a.paths.touch(b.identity.node_id)
        assert a.paths.path(b.identity.node_id).attempts == 1


async def test_a_stranger_on_the_direct_port_is_refused(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        del b.table.members[a.identity.node_id]  # a is no member of b's table
        a.paths.touch(b.identity.node_id)
        await _wait(lambda: a.paths.path(b.identity.node_id).last_error != "")
        assert a.paths.link(b.identity.node_id) is None


async def test_garbage_on_the_direct_port_is_refused_and_it_keeps_serving(
    tmp_path: Path,
) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        for garbage in (b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n", b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", b.paths.port)
            writer.write(garbage)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        a.paths.touch(b.identity.node_id)
        await _wait(lambda: a.paths.link(b.identity.node_id) is not None)


async def test_a_dead_path_falls_back_and_is_tried_again_after_retry(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        b_id = b.identity.node_id
        a.paths.touch(b_id)
        await _wait(lambda: a.paths.link(b_id) is not None)
        first = a.paths.path(b_id)
        link = a.paths.link(b_id)
        assert link is not None
        link._wire.writer.transport.abort()  # the connection breaks
        await _wait(lambda: a.paths.link(b_id) is None)
        assert a.paths.path(b_id).kind == "public"
        assert await a.paths.open_stream(b_id, "api") is None  # the caller uses the relay
        a.paths.touch(b_id)  # within retry: nothing
        assert a.paths.path(b_id).attempts == 1
        await asyncio.sleep(1.05)
        a.paths.touch(b_id)
        await _wait(lambda: a.paths.link(b_id) is not None)
        again = a.paths.path(b_id)
        assert again.attempts == 2
        assert again.since is not None
        assert first.since is not None
        assert again.since > first.since


async def test_a_punched_path_that_closed_is_punched_again_only_after_reopen_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both behind NAT: after their punched path closes, no punch goes before REOPEN_AFTER
    (the NATs' state of the old flow), though ``retry`` has passed; then one does."""
    monkeypatch.setattr(paths_module, "REOPEN_AFTER", 2.5)
    server, echo_port = await _echo_server()
    a, b = _Side(tmp_path, "a", behind_nat=True), _Side(tmp_path, "b", behind_nat=True)
    if a.identity.node_id > b.identity.node_id:  # after a punch the lower id is TLS client
        a, b = b, a
    punched: list[float] = []

    async def punch(member: Member) -> socket.socket:
        # Stands in for direct/punch.py: a TCP connection to b's direct port.
        assert b.paths is not None
        punched.append(asyncio.get_running_loop().time())
        sock = socket.create_connection(("127.0.0.1", b.paths.port), timeout=2)
        sock.setblocking(False)
        return sock

    async with contextlib.AsyncExitStack() as stack:
        targets = _echo_targets(echo_port)
        await _started(stack, [(a, targets), (b, targets)], punches={a.name: punch})
        assert a.paths is not None
        paths = a.paths
        b_id = b.identity.node_id
        paths.touch(b_id)
        await _wait(lambda: paths.link(b_id) is not None)
        link = paths.link(b_id)
        assert link is not None
        link._wire.writer.transport.abort()  # the connection breaks
        await _wait(lambda: paths.link(b_id) is None)
        closed = asyncio.get_running_loop().time()
        await asyncio.sleep(1.1)  # past retry
        paths.touch(b_id)
        await asyncio.sleep(0.3)
        assert len(punched) == 1  # still within REOPEN_AFTER: no punch
        await asyncio.sleep(max(0.0, closed + 2.55 - asyncio.get_running_loop().time()))
        paths.touch(b_id)
        await _wait(lambda: paths.link(b_id) is not None)
        assert len(punched) == 2
        assert punched[1] - closed >= 2.5
    server.close()


async def test_a_natted_peer_is_not_dialled_and_says_why(tmp_path: Path) -> None:
    async with _pair(tmp_path, b_fields={"behind_nat": True}) as (a, b, _):
        assert a.paths is not None
        a.paths.touch(b.identity.node_id)
        await _wait(lambda: a.paths.path(b.identity.node_id).last_error != "")
        assert "behind NAT" in a.paths.path(b.identity.node_id).last_error


async def test_an_unreachable_address_fails_within_the_dial_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths_module, "DIAL_TIMEOUT", 0.5)
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        b_id = b.identity.node_id
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]  # bound, never listening: refused
        member = a.table.members[b_id]
        a.table.members[b_id] = Member(_record(b.identity, "b", dead))
        del member
        a.paths.touch(b_id)
        await _wait(lambda: a.paths.path(b_id).last_error != "", within=2)
        assert "cannot dial 127.0.0.1 port" in a.paths.path(b_id).last_error


async def test_the_listener_is_dual_stack_on_a_wildcard_host() -> None:
    sock = bind_direct("0.0.0.0", 0)
    port = sock.getsockname()[1]
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        hosts = ["127.0.0.1"] + (["::1"] if sock.family == socket.AF_INET6 else [])
        for host in hosts:
            with socket.create_connection((host, port), timeout=2):
                pass
    finally:
        sock.close()
    # A port another program holds (without SO_REUSEPORT) is a clear error.
    with socket.create_server(("0.0.0.0", 0)) as taken, pytest.raises(AddressInUse):
        bind_direct("0.0.0.0", taken.getsockname()[1]).close()


async def test_an_idle_path_closes_and_the_next_call_opens_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths_module, "IDLE_CLOSE", 0.4)
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        b_id = b.identity.node_id
        a.paths.touch(b_id)
        await _wait(lambda: a.paths.link(b_id) is not None)
        opened = await a.paths.open_stream(b_id, "api")
        assert opened is not None
        await asyncio.sleep(0.7)  # a stream is open: not idle
        assert a.paths.link(b_id) is not None
        opened[1].close()
        await _wait(lambda: a.paths.link(b_id) is None, within=3)
        assert a.paths.path(b_id).last_error == "closed while idle"
        a.paths.touch(b_id)
        await _wait(lambda: a.paths.link(b_id) is not None)


async def test_no_more_than_max_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths_module, "MAX_PATHS", 0)
    async with _pair(tmp_path) as (a, b, _):
        assert a.paths is not None
        assert b.paths is not None
        a.paths.touch(b.identity.node_id)  # nothing starts
        assert a.paths.path(b.identity.node_id).attempts == 0
        sock = socket.create_connection(("127.0.0.1", b.paths.port))
        kept = await a.paths.adopt(sock, b.identity.node_id, initiator=True)
        assert not kept  # checked, but over the bound on both sides
        assert "at most 0 direct paths" in a.paths.path(b.identity.node_id).last_error
        await asyncio.sleep(0.3)
        assert a.paths.link(b.identity.node_id) is None
        assert b.paths.link(a.identity.node_id) is None
