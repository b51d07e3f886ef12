"""Hole punching: the schedule, the request and answer checks, the route and both halves.

Simultaneous open itself needs two NATs (tests/netns/test_direct_nat.py); on one host the
caller's attempts reach the callee's listener on its direct port, which is enough to run
the whole exchange with real sockets and a real signed request.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from p2prc.api import punch as punch_api
from p2prc.api.app import _install_error_handlers
from p2prc.api.auth import RequestVerifier
from p2prc.config import NodeConfig, TrustConfig
from p2prc.direct.punch import (
    GAP,
    MAX_DELAY_MS,
    MIN_DELAY_MS,
    PunchAnswer,
    PunchRequest,
    PunchSlots,
    Schedule,
    answer_punch,
    ask_delay_ms,
    caller_start,
    checked_target,
    punch,
    simultaneous_open,
)
from p2prc.errors import InvalidRequest, NotFound, PunchFailed, RateLimited
from p2prc.identity import Identity
from p2prc.peers.link import PeerLink
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member, MemberState
from p2prc.specs import own_addresses
from p2prc.state import State

CALLER, CALLEE = Identity.generate(), Identity.generate()


# --- the schedule and the arithmetic -------------------------------------------------


def test_the_schedule_tries_at_start_then_after_each_refusal_within_the_gap() -> None:
    schedule = Schedule(start=10.0, deadline=13.0)
    assert schedule.wait(9.0) == 1.0
    assert schedule.wait(10.0) == 0.0
    schedule.attempt()
    schedule.refused(10.001, 0.0)
    assert schedule.wait(10.001) == pytest.approx(GAP[0])
    schedule.refused(10.001, 0.999)
    assert GAP[0] < schedule.wait(10.001) <= GAP[1]  # type: ignore[operator]
    assert schedule.wait(13.0) is None  # the deadline ends it
    assert schedule.left(12.5) == 0.5
    assert schedule.left(14.0) == 0.0


def test_the_schedule_stops_after_its_most_attempts() -> None:
    schedule = Schedule(start=0.0, deadline=100.0, max_tries=3)
    for _ in range(3):
        assert schedule.wait(1.0) is not None
        schedule.attempt()
    assert schedule.wait(1.0) is None


def test_the_delay_asked_covers_the_answers_way_back_within_bounds() -> None:
    assert ask_delay_ms(None) == 250  # unknown: 100 ms assumed
    assert ask_delay_ms(0.2) == 2 * MIN_DELAY_MS
    assert ask_delay_ms(100.0) == 250
    assert ask_delay_ms(1e9) == MAX_DELAY_MS
    assert ask_delay_ms(-5.0) == 250


def test_the_caller_starts_when_the_callee_does_never_before_the_answer() -> None:
    # Sent at 0, answered at 0.2: the callee got it at about 0.1 and starts 0.3 later.
    assert caller_start(0.0, 0.2, 300) == pytest.approx(0.4)
    assert caller_start(0.0, 2.0, 50) == 2.0  # a slow answer: start at once


def test_slots_hold_one_punch_per_peer_and_a_few_in_all() -> None:
    slots = PunchSlots(most=2)
    token = slots.take("a")
    assert "a" in slots
    assert slots.role("a") == "calling"
    with pytest.raises(RateLimited, match="already running"):
        slots.take("a", "answering")
    b = slots.take("b", "answering")
    assert slots.role("b") == "answering"
    with pytest.raises(RateLimited, match="2 hole punches already"):
        slots.take("c")
    slots.release("b", token)  # another punch's token frees nothing
    assert "b" in slots
    slots.release("b", b)
    slots.release("a", token)
    assert len(slots) == 0
    assert slots.role("a") is None


def test_a_crossed_punch_moves_the_slot_to_the_answering_half() -> None:
    slots = PunchSlots()
    mine = slots.take("peer")
    theirs = slots.take_over("peer")
    assert slots.role("peer") == "answering"
    assert not slots.holds("peer", mine)
    slots.release("peer", mine)  # the calling half, ending, leaves the answering one be
    assert slots.holds("peer", theirs)


# --- what a peer sends is checked ----------------------------------------------------


def test_a_request_normalises_its_observed_address() -> None:
    request = PunchRequest(observed="[::ffff:198.51.100.7]:4000", port=9, delay_ms=100)
    assert request.observed == "198.51.100.7:4000"
    assert checked_target(request.observed, 40001) == ("198.51.100.7", 40001)
    assert checked_target("[2001:db8::5]:1", 7) == ("2001:db8::5", 7)


@pytest.mark.parametrize(
    "fields",
    [
        {"observed": "relay.example:4000"},  # a name: never looked up
        {"observed": "127.0.0.1:4000"},  # loopback: the callee's own services
        {"observed": "[::1]:4000"},
        {"observed": "0.0.0.0:4000"},
        {"observed": "224.0.0.1:4000"},
        {"observed": "169.254.1.1:4000"},
        {"observed": "240.0.0.1:4000"},
        {"observed": "[::ffff:127.0.0.1]:4000"},
        {"observed": "198.51.100.7"},
        {"observed": "198.51.100.7:0"},
        {"observed": "198.51.100.7:70000"},
        {"observed": "x" * 100},
        {"observed": 5},
        {"port": 0},
        {"port": 65536},
        {"delay_ms": MIN_DELAY_MS - 1},
        {"delay_ms": MAX_DELAY_MS + 1},
        {"delay_ms": 1.5},
        {"extra": 1},
    ],
)
def test_a_bad_request_is_refused(fields: dict[str, object]) -> None:
    body: dict[str, object] = {"observed": "198.51.100.7:4000", "port": 40001, "delay_ms": 200}
    PunchRequest.model_validate(body)  # the good one passes
    with pytest.raises(ValidationError):
        PunchRequest.model_validate({**body, **fields})


@pytest.mark.parametrize("observed", ["localhost:1", "127.0.0.1:5", "[::]:5", "1.2.3.4"])
def test_checked_target_refuses_what_no_nat_has(observed: str) -> None:
    with pytest.raises(InvalidRequest, match="observed address"):
        checked_target(observed, 40001)


# --- simultaneous_open with real sockets ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _reuseport_listener(host: str = "0.0.0.0", *, listen: bool = True) -> socket.socket:
    """A direct-port listener as the node's: SO_REUSEADDR and SO_REUSEPORT."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    if listen:
        sock.listen()
    sock.setblocking(False)
    return sock


async def test_attempts_from_a_port_the_listener_holds_reach_a_listening_peer() -> None:
    mine, theirs = _reuseport_listener(), _reuseport_listener("127.0.0.1")
    loop = asyncio.get_running_loop()
    try:
        port = mine.getsockname()[1]
        remote = ("127.0.0.1", theirs.getsockname()[1])
        sock = await simultaneous_open(port, remote, loop.time())
        accepted, _ = await loop.sock_accept(theirs)
        with sock, accepted:
            assert sock.getsockname()[1] == port  # from the direct port, beside its listener
            assert sock.getpeername() == remote
            await loop.sock_sendall(sock, b"punched")
            assert await loop.sock_recv(accepted, 16) == b"punched"
    finally:
        mine.close()
        theirs.close()


async def test_refused_attempts_end_at_the_deadline_with_a_reason() -> None:
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    with pytest.raises(PunchFailed, match=r"within 0.3 s \(\d+ attempts") as caught:
        await simultaneous_open(_free_port(), ("127.0.0.1", _free_port()), loop.time(), within=0.3)
    assert 0.25 < time.monotonic() - began < 1.5
    attempts = int(str(caught.value).split("(")[1].split()[0])
    assert attempts > 20  # a refusal is followed by the next attempt within GAP


async def test_the_start_is_waited_for() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(PunchFailed):
        await simultaneous_open(
            _free_port(), ("127.0.0.1", _free_port()), began + 0.3, within=0.05,
            rng=random.Random(1),
        )  # fmt: skip
    assert loop.time() - began >= 0.3


async def test_a_direct_port_held_without_reuseport_is_a_clear_failure() -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        loop = asyncio.get_running_loop()
        with pytest.raises(PunchFailed, match=f"cannot bind the direct port {port}"):
            await simultaneous_open(port, ("127.0.0.1", _free_port()), loop.time())


# --- both halves through the signed route --------------------------------------------


def _address() -> str:
    """A local address that is no loopback (punch targets never are), if this host has one."""
    for address in own_addresses():
        if ":" not in address:
            return address
    pytest.skip("this host has no IPv4 address besides loopback")


@dataclass
class _Paths:
    listener: socket.socket
    adopted: list[tuple[socket.socket, str, bool]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    async def adopt(self, sock: socket.socket, node_id: str, initiator: bool) -> bool:
        self.adopted.append((sock, node_id, initiator))
        return True


@dataclass
class _Mapper:
    observed: tuple[str, int] | None
    keeps_ports: bool | None = True


@dataclass
class _Members:
    members: dict[str, Member] = field(default_factory=dict)

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)


@dataclass
class _Gossip:
    table: _Members = field(default_factory=_Members)


@dataclass
class _Node:
    identity: Identity
    config: NodeConfig
    link: PeerLink
    mapper: _Mapper
    paths: _Paths
    gossip: _Gossip = field(default_factory=_Gossip)
    punches: PunchSlots = field(default_factory=PunchSlots)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        return task


def _member(identity: Identity, *, behind_nat: bool | None = True, api: str = "") -> Member:
    record = PeerRecord(
        node_id=identity.node_id, public_key=identity.public_key, name="n", version=1,
        addresses=("192.168.1.10",), api_port=8088, behind_nat=behind_nat,
        public_api=api,
    ).signed(identity)  # fmt: skip
    return Member(record)


@dataclass
class _Pair:
    caller: _Node
    callee: _Node
    app: FastAPI
    target: socket.socket  # a listener the callee's half may reach (a caller's NAT that let in)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[_Pair]:
    host = _address()
    trust = TrustConfig(allow=[CALLER.openssh_public_key("caller")])
    state = State(tmp_path / "callee.db")
    app = FastAPI()
    _install_error_handlers(app)
    app.state.verifier = RequestVerifier(CALLEE, trust, state)
    # The caller's direct port is held, not listening: the callee's attempts to it are
    # refused (as by a NAT) until the caller's own attempt has made the connection.
    listeners = [_reuseport_listener(listen=False), _reuseport_listener(), _reuseport_listener()]
    config = NodeConfig(name="n")
    link = PeerLink(CALLER, None, config.timeouts, transport=httpx.ASGITransport(app=app))
    caller = _Node(CALLER, config, link, _Mapper((host, 1)), _Paths(listeners[0]))
    callee = _Node(
        CALLEE, config, PeerLink(CALLEE, None, config.timeouts),
        _Mapper((host, 2)), _Paths(listeners[1]),
    )  # fmt: skip
    callee.gossip.table.members[CALLER.node_id] = _member(CALLER)
    app.include_router(punch_api.router(callee))
    try:
        yield _Pair(caller, callee, app, listeners[2])
    finally:
        for node in (caller, callee):
            for task in node.tasks:
                task.cancel()
            await asyncio.gather(*node.tasks, return_exceptions=True)
            for sock, _, _ in node.paths.adopted:
                sock.close()
        for listener in listeners:
            listener.close()
        state.close()


async def test_a_punch_connects_the_callers_direct_port_to_the_callees(pair: _Pair) -> None:
    caller, callee = pair.caller, pair.callee
    loop = asyncio.get_running_loop()
    began = loop.time()
    sock = await punch(caller, _member(CALLEE))
    with sock:
        assert sock.getsockname()[1] == caller.paths.port
        assert sock.getpeername() == (callee.mapper.observed[0], callee.paths.port)  # type: ignore[index]
        # It started once the callee did: half the request's round trip plus its delay.
        assert loop.time() - began >= ask_delay_ms(None) / 1000 - 0.1
        accepted, _ = await loop.sock_accept(callee.paths.listener)
        with accepted:
            await loop.sock_sendall(sock, b"x" * 1000)
            assert await loop.sock_recv(accepted, 2000) == b"x" * 1000
    assert len(caller.punches) == 0
    # The callee's half runs too: its attempts to the caller's port (held, not listening)
    # are refused until its deadline; a half cancelled (the node stopping) frees its slot.
    (half,) = callee.tasks
    assert not half.done()
    assert CALLER.node_id in callee.punches
    half.cancel()
    await asyncio.gather(half, return_exceptions=True)
    assert len(callee.punches) == 0


async def _answer(pair: _Pair, identity: Identity, body: object) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=pair.app), base_url="http://callee.test"
    ) as http:
        raw = json.dumps(body).encode()
        headers = identity.signed_headers("POST", "/direct/punch", CALLEE.node_id, raw)
        headers["content-type"] = "application/json"
        return await http.post("/direct/punch", content=raw, headers=headers)


def _good(pair: _Pair) -> dict[str, object]:
    """A punch request from the caller: its half listens here, on this host's address."""
    host = pair.caller.mapper.observed[0]  # type: ignore[index]
    return {"observed": f"{host}:1", "port": pair.target.getsockname()[1], "delay_ms": 100}


async def test_the_route_answers_with_the_callees_half(pair: _Pair) -> None:
    response = await _answer(pair, CALLER, _good(pair))
    assert response.status_code == 200, response.text
    answer = PunchAnswer.model_validate(response.json())
    assert answer.port == pair.callee.paths.port
    assert answer.observed.split(":")[0] == pair.callee.mapper.observed[0]  # type: ignore[index]
    assert answer.delay_ms == 100
    assert CALLER.node_id in pair.callee.punches  # its half is running
    again = await _answer(pair, CALLER, _good(pair))
    assert again.status_code == 429
    assert "already running" in again.text
    # Its half connects from its direct port to the caller's (listening here) and hands the
    # socket over, the lower node id as the TLS client; then its slot is free again.
    await asyncio.wait_for(asyncio.gather(*pair.callee.tasks), 5)
    ((sock, node_id, initiator),) = pair.callee.paths.adopted
    assert node_id == CALLER.node_id
    assert initiator is (CALLEE.node_id < CALLER.node_id)
    assert sock.getsockname()[1] == pair.callee.paths.port
    assert sock.getpeername()[1] == pair.target.getsockname()[1]
    assert len(pair.callee.punches) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"observed": "127.0.0.1:40001"},
        {"observed": "callee.example:1"},
        {"port": 0},
        {"delay_ms": 60_000},
        {"more": "x"},
        {"port": None},
        None,
    ],
)
async def test_the_route_refuses_a_bad_body(pair: _Pair, change: dict[str, object] | None) -> None:
    body = [1, 2] if change is None else {**_good(pair), **change}
    response = await _answer(pair, CALLER, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert len(pair.callee.punches) == 0
    assert not pair.callee.tasks


async def test_the_route_refuses_an_untrusted_or_unsigned_caller(pair: _Pair) -> None:
    stranger = await _answer(pair, Identity.generate(), _good(pair))
    assert stranger.status_code == 403
    assert stranger.json()["error"]["code"] == "not_trusted"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=pair.app), base_url="http://callee.test"
    ) as http:
        unsigned = await http.post("/direct/punch", json=_good(pair))
    assert unsigned.status_code == 401
    assert not pair.callee.tasks


async def test_the_route_allows_a_few_punches_a_minute_per_key(pair: _Pair) -> None:
    codes = []
    for _ in range(punch_api.PUNCHES_PER_MINUTE + 1):
        for half in pair.callee.tasks:  # each half ends (and frees its slot) before the next
            half.cancel()
        await asyncio.gather(*pair.callee.tasks, return_exceptions=True)
        codes.append((await _answer(pair, CALLER, _good(pair))).status_code)
    assert codes == [200] * punch_api.PUNCHES_PER_MINUTE + [429]


def test_the_callee_refuses_a_caller_it_cannot_place(pair: _Pair) -> None:
    request = PunchRequest.model_validate(_good(pair))
    callee = pair.callee
    with pytest.raises(NotFound, match="peer table"):
        answer_punch(callee, Identity.generate().node_id, request)
    callee.gossip.table.members[CALLER.node_id].state = MemberState.DEAD
    with pytest.raises(NotFound):
        answer_punch(callee, CALLER.node_id, request)
    callee.gossip.table.members[CALLER.node_id] = _member(CALLER, behind_nat=False)
    with pytest.raises(InvalidRequest, match="public"):
        answer_punch(callee, CALLER.node_id, request)
    with pytest.raises(InvalidRequest, match="itself"):
        answer_punch(callee, CALLEE.node_id, request)
    assert not callee.tasks


async def test_a_node_that_cannot_punch_says_why(pair: _Pair) -> None:
    caller, request = pair.caller, PunchRequest.model_validate(_good(pair))
    member = _member(CALLEE)
    caller.mapper.keeps_ports = False
    with pytest.raises(PunchFailed, match="changes source ports"):
        await punch(caller, member)
    caller.mapper.observed = None
    with pytest.raises(PunchFailed, match="public address"):
        await punch(caller, member)
    pair.callee.config = NodeConfig(name="n", direct={"enabled": False})  # type: ignore[arg-type]
    with pytest.raises(PunchFailed, match=r"direct\.enabled"):
        answer_punch(pair.callee, CALLER.node_id, request)
    assert len(caller.punches) == 0
    assert len(pair.callee.punches) == 0


async def test_a_refusal_or_a_bad_answer_is_a_punch_failure(pair: _Pair) -> None:
    caller = pair.caller
    pair.callee.gossip.table.members.clear()  # the callee does not know the caller
    with pytest.raises(PunchFailed, match=r"did not punch: .*peer table"):
        await punch(caller, _member(CALLEE))
    assert len(caller.punches) == 0

    bad = FastAPI()

    @bad.post("/direct/punch")
    async def answer() -> dict[str, object]:
        return {"observed": "127.0.0.1:80", "port": 80, "delay_ms": 100}

    caller.link = PeerLink(
        CALLER, None, caller.config.timeouts, transport=httpx.ASGITransport(app=bad)
    )
    with pytest.raises(PunchFailed, match="did not punch"):
        await punch(caller, _member(CALLEE))


def _ordered(than: str) -> tuple[Identity, Identity]:
    """A fresh identity with a lower node id than ``than``, and one with a higher."""
    lower = higher = None
    while lower is None or higher is None:
        identity = Identity.generate()
        if identity.node_id < than:
            lower = lower or identity
        else:
            higher = higher or identity
    return lower, higher


async def test_crossed_punches_the_lower_node_ids_goes_on(pair: _Pair) -> None:
    callee, request = pair.callee, PunchRequest.model_validate(_good(pair))
    lower, higher = _ordered(CALLEE.node_id)
    for peer in (lower, higher):
        callee.gossip.table.members[peer.node_id] = _member(peer)
    # The callee is asking both meanwhile; both ask it.
    mine = {peer.node_id: callee.punches.take(peer.node_id) for peer in (lower, higher)}
    # The lower id's punch goes on: the callee answers it, and its own to it stops ...
    answer_punch(callee, lower.node_id, request)
    assert callee.punches.role(lower.node_id) == "answering"
    assert not callee.punches.holds(lower.node_id, mine[lower.node_id])
    # ... while the callee's own punch to the higher id goes on, and that one's is refused.
    with pytest.raises(RateLimited, match="crossed"):
        answer_punch(callee, higher.node_id, request)
    assert callee.punches.holds(higher.node_id, mine[higher.node_id])
    assert len(callee.tasks) == 1


async def test_a_cancelled_punch_ends_its_pending_attempt_at_once() -> None:
    # A listener whose queue is full drops SYNs: the attempt's connect stays pending.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.create_connection(full.getsockname(), timeout=2)]  # the queue: one
    loop = asyncio.get_running_loop()
    try:
        punching = asyncio.ensure_future(
            simultaneous_open(_free_port(), full.getsockname(), loop.time(), within=30)
        )
        await asyncio.sleep(0.3)
        assert not punching.done()  # pending, as behind a NAT that drops
        punching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await punching
        # Its thread is done at once, not 30 s later (the executor waits for its threads).
        await asyncio.wait_for(loop.shutdown_default_executor(), 1.5)
    finally:
        for sock in (full, *fillers):
            sock.close()
