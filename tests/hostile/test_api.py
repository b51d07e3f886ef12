"""Hostile callers of the node API: huge bodies, nonce floods, dial-back scans, audience lies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, TrustConfig, init_home
from p2prc.api import _server as server_module
from p2prc.api import app as api_app
from p2prc.api import auth, create_app
from p2prc.config import GossipConfig
from p2prc.errors import P2PRCError, WrongNode
from p2prc.identity import HEADER_AUDIENCE, Identity
from p2prc.models import NodeStatus
from p2prc.peers.gossip import MAX_EXCHANGE_BYTES
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member
from tests.conftest import FakeNode
from tests.hostile.attacker import exchange_payload, fake_record

_HUGE = 256 * 1024 * 1024
_CHUNK = 64 * 1024


# Helpers ------------------------------------------------------------------------------


class _Body:
    """An endless request body that fails the test if the app reads past ``ceiling``."""

    def __init__(self, ceiling: int, chunks: Iterator[bytes] | None = None) -> None:
        self.ceiling = ceiling
        self.pulled = 0
        self._chunks = chunks if chunks is not None else itertools.repeat(b"x" * _CHUNK)

    async def receive(self) -> Message:
        chunk = next(self._chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.pulled += len(chunk)
        if self.pulled > self.ceiling:
            raise AssertionError(f"the app read {self.pulled} bytes, past {self.ceiling}")
        return {"type": "http.request", "body": chunk, "more_body": True}


async def _asgi(
    app: Any, method: str, path: str, headers: dict[str, str], body: _Body
) -> tuple[int, bytes]:
    """One request straight into an ASGI app; returns its status and body."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("node.test", 80),
    }
    answer: dict[str, Any] = {"status": 0, "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, body.receive, send)
    return int(answer["status"]), bytes(answer["body"])


def _code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def _client(node: FakeNode, identity: Identity, **transport: Any) -> httpx.AsyncClient:
    app = create_app(node)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport), base_url="http://node.test"
    )


async def _post(
    http: httpx.AsyncClient, node: FakeNode, identity: Identity, path: str, body: bytes = b""
) -> httpx.Response:
    headers = identity.signed_headers("POST", path, node.identity.node_id, body)
    headers["content-type"] = "application/json"
    return await http.post(path, headers=headers, content=body)


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: object) -> AsyncIterator[Node]:
    home = Home(path / name)
    init_home(home, NodeConfig(name=name, **config))  # type: ignore[arg-type]
    config_, identity = init_home(home)
    runtime = FakeRuntime(ssh_banner=True)
    async with Node(
        config_, home, identity=identity, host="127.0.0.1", port=0, runtime=runtime
    ) as node:
        yield node


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _serve(app: Any, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on ``host`` and a free port, inside this loop."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(16)
    sock.setblocking(False)
    server = _Server(uvicorn.Config(app, log_config=None, lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done()
            await asyncio.sleep(0.01)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def _listener(host: str = "127.0.0.1") -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP listener that notes every connection; yields its port and the notes."""
    seen: list[str] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("sockname")[0]))
        writer.close()

    server = await asyncio.start_server(accepted, host, 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), seen
    finally:
        server.close()
        await server.wait_closed()


# 3: bodies are bounded before they are read --------------------------------------------


async def test_a_claimed_huge_body_is_refused_before_reading(fake_node: FakeNode) -> None:
    body = _Body(ceiling=0)
    status, answer = await _asgi(
        create_app(fake_node), "POST", "/containers", {"content-length": str(_HUGE)}, body
    )
    assert (status, _code(answer)) == (413, "too_large")
    assert body.pulled == 0


@pytest.mark.parametrize("path", ["/containers", "/map-port", "/meta", "/whoami"])
async def test_a_streamed_huge_body_is_cut_at_the_limit(fake_node: FakeNode, path: str) -> None:
    limit = api_app.body_limit("POST", path)
    body = _Body(ceiling=limit + _CHUNK)
    headers = {"transfer-encoding": "chunked", "content-type": "application/json"}
    status, answer = await _asgi(create_app(fake_node), "POST", path, headers, body)
    assert (status, _code(answer)) == (413, "too_large")
    assert body.pulled <= limit + _CHUNK


async def test_exchange_takes_up_to_its_own_limit_and_no_more() -> None:
    received: list[int] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = bool(message.get("more_body", False))
        received.append(size)
        await Response(b"ok")(scope, receive, send)

    app = api_app.RequestLimits(inner)
    honest = [b"y" * (MAX_EXCHANGE_BYTES // 4)] * 4
    status, _ = await _asgi(app, "POST", "/peers/exchange", {}, _Body(_HUGE, iter(honest)))
    assert status == 200
    assert received == [MAX_EXCHANGE_BYTES]
    status, _ = await _asgi(app, "POST", "/containers", {}, _Body(_HUGE, iter([b"{}" * 1000])))
    assert status == 200
    body = _Body(ceiling=MAX_EXCHANGE_BYTES + _CHUNK)
    status, answer = await _asgi(app, "POST", "/peers/exchange", {}, body)
    assert (status, _code(answer)) == (413, "too_large")
    assert received == [MAX_EXCHANGE_BYTES, 2000]


async def test_huge_bodies_over_a_real_socket(tmp_path: Path) -> None:
    async with _node(tmp_path, "a") as node, AsyncClient(home=tmp_path / "a") as owner:
        head = (
            f"POST /containers HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {_HUGE}\r\n\r\n"
        ).encode()
        answer, _ = await _raw(node.port, head, stream=False)
        assert answer.startswith(b"HTTP/1.1 413")
        assert b"too_large" in answer
        head = b"POST /peers/exchange HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer, sent = await _raw(node.port, head, stream=True)
        # The node answers 413 and hangs up after its 4 MiB; a reset may overtake the answer.
        assert answer.startswith(b"HTTP/1.1 413") or answer == b""
        assert sent < 32 * 1024 * 1024
        assert (await owner.whoami()).role == "owner"


async def _raw(port: int, head: bytes, *, stream: bool) -> tuple[bytes, int]:
    """Send ``head`` (then up to 64 MiB of chunked data when ``stream``).

    Returns the start of the answer (empty when the connection was reset) and how many
    body bytes the node took before it stopped reading.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        writer.write(head)
        chunk = f"{_CHUNK:x}\r\n".encode() + b"z" * _CHUNK + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(1024 if stream else 0):
                writer.write(chunk)
                async with asyncio.timeout(10):
                    await writer.drain()
                sent += _CHUNK
        try:
            async with asyncio.timeout(10):
                return await reader.read(4096), sent
        except ConnectionResetError:
            return b"", sent
    finally:
        writer.close()


async def test_idle_and_trickling_connections_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_API_HEAD_TIMEOUT", 0.5)
    async with _node(tmp_path, "a") as node, AsyncClient(home=tmp_path / "a") as owner:
        for head in (b"", b"GET /status HTTP/1.1\r\nHost: a\r\nX-Slow: "):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(head)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # the node hung up
            writer.close()
        assert (await owner.whoami()).role == "owner"


async def test_only_two_speedtests_run_at_once() -> None:
    release = asyncio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await Response(b"ok")(scope, receive, send)

    app = api_app.RequestLimits(inner)

    def call() -> asyncio.Task[tuple[int, bytes]]:
        return asyncio.ensure_future(_asgi(app, "GET", "/peers/speedtest", {}, _Body(0, iter([]))))

    running = [call(), call()]
    await asyncio.sleep(0.05)
    status, answer = await call()
    assert (status, _code(answer)) == (429, "rate_limited")
    release.set()
    assert [(await task)[0] for task in running] == [200, 200]
    assert (await call())[0] == 200
    for index in range(100):  # other routes, even made-up ones, are not tracked
        await _asgi(app, "GET", f"/made-up/{index}", {}, _Body(0, iter([])))
    assert app._running == {("GET", "/peers/speedtest"): 0}


# 6: untrusted keys cannot fill the nonce table ----------------------------------------


@pytest.fixture
def small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_STRANGER_NONCES", (5, 12), raising=False)
    monkeypatch.setattr(auth, "_LISTED_NONCES", (50, 100), raising=False)


def _guarded(make_fake_node: object, friend: Identity) -> FakeNode:
    assert callable(make_fake_node)
    trust = TrustConfig(mode="allowlist", allow=[friend.openssh_public_key("friend")])
    config = NodeConfig(name="n", trust=trust, gossip=GossipConfig(enabled=False))
    node = make_fake_node(config)
    assert isinstance(node, FakeNode)
    return node


async def test_refused_keys_leave_no_nonce(make_fake_node: object) -> None:
    friend, stranger = Identity.generate(), Identity.generate()
    node = _guarded(make_fake_node, friend)
    async with _client(node, stranger) as http:
        for _ in range(30):
            response = await _post(http, node, stranger, "/whoami")
            assert response.json()["error"]["code"] == "not_trusted"
            response = await _post(http, node, stranger, "/shutdown")
            assert response.json()["error"]["code"] == "owner_only"
    rows = node.state.connection.execute("SELECT count(*) FROM seen_nonces").fetchone()[0]
    assert rows == 0


async def test_a_stranger_flood_cannot_starve_the_owner_or_a_friend(
    make_fake_node: object, small_budgets: None
) -> None:
    friend = Identity.generate()
    node = _guarded(make_fake_node, friend)
    strangers = [Identity.generate() for _ in range(4)]
    body = json.dumps({"port": 1}).encode()
    async with _client(node, friend) as http:
        codes = [
            (await _post(http, node, key, "/reachability", body)).status_code
            for key in strangers
            for _ in range(6)
        ]
        # Each stranger gets its own 5, the strangers' pool 12 in all; the rest are 429.
        assert codes[:5] == [422] * 5
        assert codes[5] == 429
        assert codes.count(422) == 12
        assert (await _post(http, node, friend, "/whoami")).status_code == 200
        owner_headers = node.identity.signed_headers("POST", "/whoami", node.identity.node_id, b"")
        assert (await http.post("/whoami", headers=owner_headers)).status_code == 200
        replay = await http.post("/whoami", headers=owner_headers)
        assert replay.json()["error"]["code"] == "replayed_request"
        fresh = Identity.generate()
        limited = await _post(http, node, fresh, "/reachability", body)
        assert limited.json()["error"]["code"] == "rate_limited"


# 7: /reachability dials only the caller, at its signed record's port ------------------


class _Table:
    def __init__(self, *records: PeerRecord) -> None:
        self._members = {record.node_id: Member(record) for record in records}

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)


@dataclasses.dataclass
class _Gossip:
    me: PeerRecord
    table: _Table


@dataclasses.dataclass
class _GossipNode(FakeNode):
    stub: _Gossip | None = None

    @property
    def gossip(self) -> Any:
        return self.stub


def _with_gossip(node: FakeNode, *records: PeerRecord, behind_nat: bool = False) -> _GossipNode:
    me = dataclasses.replace(fake_record(node.identity), behind_nat=behind_nat)
    fields = {field.name: getattr(node, field.name) for field in dataclasses.fields(FakeNode)}
    return _GossipNode(**fields, stub=_Gossip(me, _Table(*records)))


async def _reach(node: FakeNode, caller: Identity, port: int) -> httpx.Response:
    async with _client(node, caller) as http:
        return await _post(http, node, caller, "/reachability", json.dumps({"port": port}).encode())


async def test_reachability_dials_back_only_the_record_port(fake_node: FakeNode) -> None:
    caller = Identity.generate()
    async with _listener() as (port, seen), _listener() as (record_port, record_seen):
        node = _with_gossip(
            fake_node, fake_record(caller, addresses=("127.0.0.1",), port=record_port)
        )
        response = await _reach(node, caller, port)
        assert response.json()["error"]["code"] == "invalid_request"
        assert seen == []
        response = await _reach(node, caller, record_port)
        assert response.json() == {"address": "127.0.0.1", "port": record_port, "reachable": True}
        assert record_seen == ["127.0.0.1"]


async def test_reachability_refuses_unknown_relayed_and_nat_cases(fake_node: FakeNode) -> None:
    caller, stranger = Identity.generate(), Identity.generate()
    async with _listener() as (port, seen):
        lan_record = fake_record(caller, addresses=("192.0.2.7",), port=port)
        node = _with_gossip(fake_node, lan_record)
        # From loopback (through a relay tunnel) but its record is elsewhere: no dial.
        response = await _reach(node, caller, port)
        assert response.json()["error"]["code"] == "invalid_request"
        assert "relay" in response.json()["error"]["message"]
        response = await _reach(node, stranger, port)
        assert response.json()["error"]["code"] == "not_found"
        local = fake_record(caller, addresses=("127.0.0.1",), port=port)
        response = await _reach(_with_gossip(fake_node, local, behind_nat=True), caller, port)
        assert response.json()["error"]["code"] == "invalid_request"
        assert "behind NAT" in response.json()["error"]["message"]
        assert seen == []


async def test_reachability_is_rate_limited_per_key(fake_node: FakeNode) -> None:
    caller, other = Identity.generate(), Identity.generate()
    async with _listener() as (port, seen):
        node = _with_gossip(
            fake_node,
            fake_record(caller, addresses=("127.0.0.1",), port=port),
            fake_record(other, addresses=("127.0.0.1",), port=port),
        )
        async with _client(node, caller) as http:
            body = json.dumps({"port": port}).encode()
            codes = [
                (await _post(http, node, caller, "/reachability", body)).status_code
                for _ in range(8)
            ]
            assert codes == [200] * 6 + [429] * 2
            assert (await _post(http, node, other, "/reachability", body)).status_code == 200
        assert len(seen) == 7


async def test_x_forwarded_for_is_ignored(tmp_path: Path) -> None:
    caller = Identity.generate()
    async with _node(tmp_path, "a") as node, _listener("127.0.0.9") as (port, seen):
        record = fake_record(caller, addresses=("127.0.0.1",), port=port)
        await _join(node, caller, record)
        assert node.gossip.table.get(caller.node_id) is not None
        body = json.dumps({"port": port}).encode()
        headers = caller.signed_headers("POST", "/reachability", node.identity.node_id, body)
        headers.update({"content-type": "application/json", "x-forwarded-for": "127.0.0.9"})
        async with httpx.AsyncClient(base_url=node.api_url, trust_env=False) as http:
            response = await http.post("/reachability", headers=headers, content=body)
        assert response.json()["address"] == "127.0.0.1"
        assert seen == []


# 12: the audience comes from the signed record, not from the server's word ------------


def _liar(victim: NodeStatus | None, audiences: list[str]) -> Starlette:
    """A peer whose /status claims to be ``victim``; notes whom each request is signed for."""

    async def status(request: Request) -> Response:
        assert victim is not None
        return JSONResponse(victim.model_dump(mode="json"))

    async def anything(request: Request) -> Response:
        audiences.append(request.headers.get(HEADER_AUDIENCE, ""))
        if request.url.path == "/peers/exchange":
            return Response(exchange_payload([], []), media_type="application/msgpack")
        if request.url.path == "/whoami":
            return JSONResponse({"node_id": "0" * 32, "role": "peer", "public_key": "x"})
        return JSONResponse({"error": {"code": "not_found", "message": "no"}}, status_code=404)

    methods = ["GET", "POST", "DELETE"]
    return Starlette(
        routes=[Route("/status", status), Route("/{path:path}", anything, methods=methods)]
    )


async def test_a_lying_status_gets_no_request_signed_for_its_claim(tmp_path: Path) -> None:
    async with _node(tmp_path, "victim") as victim, _node(tmp_path, "a") as node:
        claim = await _status(victim)
        audiences: list[str] = []
        liar = Identity.generate()
        async with _serve(_liar(claim, audiences)) as port:
            address = f"127.0.0.1:{port}"
            async with AsyncClient(
                address, identity=node.identity, audience=liar.node_id, home=tmp_path / "x"
            ) as client:
                with pytest.raises(WrongNode):
                    await client.status()
                await client.whoami()
            record = fake_record(liar, addresses=("127.0.0.1",), port=port)
            await _join(node, liar, record)
            assert node.gossip.member_at(address) == liar.node_id
            await node.gossip.push_pull(address)
            async with AsyncClient(home=tmp_path / "a") as owner:
                with pytest.raises(P2PRCError):
                    await owner.create_on_peer(address)
        assert audiences[:2] == [liar.node_id, liar.node_id]
        assert victim.identity.node_id not in audiences


async def _join(node: Node, identity: Identity, record: PeerRecord) -> None:
    """Become a member of ``node``'s table, as any key may: one signed push-pull."""
    body = exchange_payload([record], [])
    headers = identity.signed_headers("POST", "/peers/exchange", node.identity.node_id, body)
    headers["content-type"] = "application/msgpack"
    async with httpx.AsyncClient(base_url=node.api_url, trust_env=False) as http:
        response = await http.post("/peers/exchange", headers=headers, content=body)
    assert response.status_code == 200, response.text


async def _status(node: Node) -> NodeStatus:
    async with AsyncClient(node.api_url, home=node.home_path) as client:
        return await client.status()
