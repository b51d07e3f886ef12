"""Failures are loud: a crashed component stops the node with its traceback, health says
which component is down, cleanup errors never keep the home locked, cancellation is never
swallowed."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from p2prc import FakeRuntime, Home, Node, NodeConfig, init_home
from p2prc._aio import TaskSet
from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.config import GossipConfig
from p2prc.errors import PeerProtocolError, RelayUnavailable
from p2prc.identity import Identity
from p2prc.node import home_locked
from p2prc.peers.gossip import Gossip
from p2prc.peers.swim import Swim
from p2prc.tunnel.streams import close_quietly

_NEVER_RETRIEVED = "exception was never retrieved"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    home = Home(tmp_path / "home")
    config = NodeConfig(name="loud", gossip=GossipConfig(lan_discovery=False))
    settings, identity = init_home(home, config)
    node = Node(settings, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime())
    await node.start()
    try:
        yield node
    finally:
        await node.aclose()


async def _health(node: Node) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        answer = await http.get("/health")
    assert answer.status_code == 200
    return cast(dict[str, Any], answer.json())


def _never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # asyncio reports an unretrieved exception when the task is collected
    return [r.getMessage() for r in caplog.records if _NEVER_RETRIEVED in r.getMessage()]


async def test_health_lists_components_when_all_run(node: Node) -> None:
    health = await _health(node)
    assert health["ok"] is True
    assert health["status"] == "ok"
    assert {"api", "containers", "gossip", "mapper"} <= set(health["components"])
    assert set(health["components"].values()) == {"ok"}
    async with AsyncClient(node.api_url, home=node.home_path) as client:
        assert (await client.health()).components == health["components"]


async def test_crashed_gossip_task_stops_the_node_loudly(
    node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the tick loop died inside its task set, logged only as "Task exception was
    # never retrieved", and the node kept serving without ever probing anyone again.
    def broken_tick(self: Swim, now: float) -> list[object]:
        raise RuntimeError("tick exploded")

    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(Swim, "tick", broken_tick)
    async with asyncio.timeout(10):
        await node.wait_closed()

    crash = [r for r in caplog.records if r.exc_info and "tick exploded" in str(r.exc_info[1])]
    assert crash, "the crash was not logged with its traceback"
    assert "gossip" in crash[0].getMessage()
    assert "stopping the node" in crash[0].getMessage()
    assert node.failure is not None
    assert "gossip-tick crashed" in node.failure

    health = await _health(node)
    assert health["ok"] is False
    assert health["status"] == "degraded"
    down = health["components"]["gossip"]
    assert down.startswith("down: gossip-tick crashed: RuntimeError: tick exploded")
    assert health["components"]["api"] == "ok"
    monkeypatch.undo()
    await node.aclose()
    assert not _never_retrieved(caplog)


async def test_crashed_node_task_stops_the_node(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise ValueError("background work failed")

    node.spawn(broken(), name="some-work")
    async with asyncio.timeout(10):
        await node.wait_closed()
    assert (await _health(node))["components"]["some-work"].startswith("down: some-work crashed")
    await node.aclose()
    assert not _never_retrieved(caplog)


async def test_cleanup_error_is_logged_and_the_home_released(
    node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: Gossip.aclose raising (uvloop's "socket family mismatch" on a dual-stack
    # machine) escaped Node.aclose, which then never closed the state nor released the home.
    original = Gossip.aclose

    async def failing_aclose(self: Gossip) -> None:
        await original(self)
        raise ValueError("socket family mismatch")

    monkeypatch.setattr(Gossip, "aclose", failing_aclose)
    home = Home(node.home_path)
    assert home_locked(home)
    await node.aclose()
    assert not home_locked(home)
    assert not home.runtime_file.exists()
    logged = [r for r in caplog.records if r.exc_info and "family mismatch" in str(r.exc_info[1])]
    assert logged
    assert logged[0].levelno == logging.ERROR


async def test_task_set_reaps_crashes_and_reports_them() -> None:
    crashes: list[tuple[str, BaseException]] = []
    tasks = TaskSet(lambda task, exc: crashes.append((task.get_name(), exc)))

    async def fail() -> None:
        raise OSError("gone")

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.spawn(fail(), "failing")
    tasks.spawn(forever(), "waiting")
    await asyncio.sleep(0.01)
    assert [(name, str(exc)) for name, exc in crashes] == [("failing", "gone")]
    assert len(tasks) == 1
    await tasks.cancel_all()
    assert len(tasks) == 0
    assert len(crashes) == 1


async def test_a_contained_task_s_crash_ends_only_it(caplog: pytest.LogCaptureFixture) -> None:
    """A task that serves one connection (``contained``): its crash is logged with the
    traceback and never reaches the crash handler that stops a node."""
    crashes: list[BaseException] = []
    tasks = TaskSet(lambda task, exc: crashes.append(exc))

    async def fail() -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    with caplog.at_level(logging.ERROR, logger="p2prc._aio"):
        tasks.spawn(fail(), "tunnel-stream", contained=True)
        await asyncio.sleep(0.01)
    assert crashes == []
    assert len(tasks) == 0
    assert "tunnel-stream failed" in caplog.text
    assert "RuntimeError" in caplog.text  # the traceback, with its type


async def test_task_set_default_handler_logs_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet()

    async def fail() -> None:
        raise KeyError("lost")

    tasks.spawn(fail(), "library-task")
    await asyncio.sleep(0.01)
    records = [r for r in caplog.records if "library-task" in r.getMessage()]
    assert records
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info
    assert not _never_retrieved(caplog)


class _HangingWriter:
    """A connection whose close never completes."""

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        await asyncio.Event().wait()


async def test_close_quietly_does_not_swallow_cancellation() -> None:
    # Before: close_quietly suppressed CancelledError, so cancelling a task that was
    # closing a connection let it carry on as if nothing had happened.
    writer = cast(asyncio.StreamWriter, _HangingWriter())
    task = asyncio.create_task(close_quietly(writer))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


_CRASHING_GOSSIP = """
import os, time
import p2prc.peers.swim as swim

_tick, _at = swim.Swim.tick, time.monotonic() + float(os.environ["P2PRC_TEST_GOSSIP_CRASH"])


def tick(self, now):
    if time.monotonic() > _at:
        raise RuntimeError("injected gossip crash")
    return _tick(self, now)


swim.Swim.tick = tick
"""


def test_a_node_process_with_a_crashed_component_exits_1_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the node process kept serving with dead gossip until someone killed it.
    from tests.integration.conftest import close, start_node

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASHING_GOSSIP)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    monkeypatch.setenv("P2PRC_TEST_GOSSIP_CRASH", "1")
    node = start_node(tmp_path / "home", "--host", "127.0.0.1", "--port", "0")
    try:
        assert node.process.wait(timeout=30) == 1
        log = node.log()
    finally:
        close(node)
    assert "injected gossip crash" in log
    assert "Traceback" in log
    assert "gossip: gossip-tick crashed: RuntimeError: injected gossip crash; stopping" in log
    assert log.strip().splitlines()[-1].startswith("NodeError: the node stopped: gossip")
    assert _NEVER_RETRIEVED not in log
    assert not (tmp_path / "home" / "node.json").exists()


async def _undecodable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A hostile peer's API: every answer claims gzip and is not."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            b"content-length: 5\r\nconnection: close\r\n\r\nxxxxx"
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_an_undecodable_answer_is_a_peer_error_not_a_crash(node: Node) -> None:
    # Before: httpx's DecodingError escaped the client, past the push-pull loop's
    # P2PRCError handler: one such member would have stopped every node gossiping with it.
    server = await asyncio.start_server(_undecodable, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(PeerProtocolError, match="decompressing"):
            await node.gossip.push_pull(f"http://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
    assert node.failure is None


@pytest.mark.parametrize("behaviour", ["hang up", "no nonce"])
async def test_a_relay_failing_its_handshake_is_unavailable_not_a_crash(
    tmp_path: Path, behaviour: str
) -> None:
    # Before: the relay's EOF (IncompleteReadError) or a challenge without a nonce
    # (KeyError) escaped TunnelClient.start past the mapper's P2PRCError handler, and the
    # port-restore task died; with failures loud, that would have stopped a NAT'd node.
    from p2prc.tunnel.client import TunnelClient
    from p2prc.tunnel.frames import encode
    from p2prc.tunnel.tls import server_context

    relay = Identity.generate()

    async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "no nonce":
            writer.write(encode({"type": "challenge"}))
            await writer.drain()
        writer.close()

    tls = server_context(relay, tmp_path)
    server = await asyncio.start_server(misbehave, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    client = TunnelClient(Identity.generate(), "127.0.0.1", port, relay.node_id)
    try:
        with pytest.raises(RelayUnavailable):
            await client.start()
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_lan_announcement_that_cannot_be_resolved_is_dropped() -> None:
    # What a LAN host announces is input: a resolution that raises must not end the task
    # (with failures loud, it would have stopped the node).
    from p2prc.peers.lan import LanDiscovery

    joined: list[str] = []

    async def join(url: str) -> None:
        joined.append(url)

    class Unresolvable:
        def __init__(self, *args: object) -> None:
            pass

        async def async_request(self, *args: object) -> bool:
            raise ValueError("malformed mDNS answer")

    lan = LanDiscovery("a" * 32, ["192.0.2.1"], 8088, join)
    cast(Any, lan)._resolver = Unresolvable
    await lan._resolve(object(), f"b{'0' * 31}._p2prc._tcp.local.")
    assert joined == []
    assert not lan.seen


async def test_close_quietly_waits_two_seconds_in_all_not_each() -> None:
    # A relay closing with many dead connections open: shutdown must not take 2 s apiece.
    writers = [cast(asyncio.StreamWriter, _HangingWriter()) for _ in range(8)]
    async with asyncio.timeout(8):  # 16 s before, one writer after another
        await close_quietly(*writers)


async def test_a_component_that_never_closes_does_not_hold_the_home(
    node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM must end the process: a stuck close is logged, and the home released anyway.
    async def stuck(self: Gossip) -> None:
        await asyncio.Event().wait()

    original = Gossip.aclose
    gossip = node.gossip
    monkeypatch.setattr(Gossip, "aclose", stuck)
    home = Home(node.home_path)
    async with asyncio.timeout(30):
        await node.aclose()
    assert not home_locked(home)
    assert any("did not stop within" in r.getMessage() for r in caplog.records)
    await original(gossip)  # the node left it open, as it must; close its socket here
