"""Five real node processes on loopback gossiping: join, death, return, metadata, forgery."""

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import msgpack
import pytest

from p2prc import AsyncClient, Identity
from p2prc.peers.records import decode_record
from tests.integration.conftest import NodeProcess, close, p2prc, start_node

pytestmark = pytest.mark.slow


def _peers(node: NodeProcess) -> dict[str, dict[str, object]]:
    views = httpx.get(f"{node.api}/peers", timeout=5).json()
    return {view["node_id"]: view for view in views if not view["me"]}


def _wait(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _wait_field(node: NodeProcess, node_id: str, key: str, value: object) -> None:
    _wait(lambda: _peers(node)[node_id][key] == value)


def _wait_all_alive(node: NodeProcess, ids: set[str]) -> None:
    _wait(lambda: {k for k, v in _peers(node).items() if v["state"] == "alive"} == ids)


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    nodes = [start_node(tmp_path / "n0", "--host", "127.0.0.1", "--port", "0")]
    root = nodes[0].api.removeprefix("http://")
    try:
        for index in range(1, 5):
            p2prc(tmp_path / f"n{index}", "config", "set", "bootstrap", root)
            nodes.append(start_node(tmp_path / f"n{index}", "--host", "127.0.0.1", "--port", "0"))
        yield nodes
    finally:
        for node in nodes:
            close(node)


def test_swarm_lifecycle(swarm: list[NodeProcess], tmp_path: Path) -> None:
    ids = {node.node_id for node in swarm}
    for node in swarm:
        _wait_all_alive(node, ids - {node.node_id})

    victim = swarm[4]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    for node in swarm[:4]:
        _wait_field(node, victim.node_id, "state", "dead")

    close(victim)
    back = start_node(victim.home, "--host", "127.0.0.1", "--port", "0")
    swarm[4] = back
    assert back.node_id == victim.node_id
    for node in swarm[:4]:
        _wait_field(node, back.node_id, "state", "alive")
    assert _peers(swarm[0])[back.node_id]["api"] == back.api

    text = "render farm: 4 GPUs free after 18:00"
    p2prc(swarm[1].home, "--amd", text)
    for node in (swarm[0], *swarm[2:]):
        _wait_field(node, swarm[1].node_id, "metadata", text)
    # Every peer's round trip gets measured (the returned node's too: its probes start anew).
    _wait(lambda: all(view["rtt_ms"] is not None for view in _peers(swarm[2]).values()))
    listed = json.loads(p2prc(swarm[2].home, "--json", "peers", "list").stdout)
    assert {"node_id", "name", "state", "rtt_ms", "metadata"} <= set(listed[0])
    assert all(view["rtt_ms"] is not None for view in listed if not view["me"])


async def test_forged_and_replayed_records_are_rejected(swarm: list[NodeProcess]) -> None:
    target, subject = swarm[0], swarm[1]
    _wait(lambda: subject.node_id in _peers(target))
    stored = _peers(target)[subject.node_id]
    async with httpx.AsyncClient(timeout=5) as http:
        answer = (await http.get(f"{subject.api}/peers")).json()
    assert answer[0]["me"]

    # Take the subject's real signed record from a push-pull answer, then tamper with it.
    mallory = Identity.generate()
    async with AsyncClient(subject.api, identity=mallory) as client:
        records, _ = msgpack.unpackb(await client.exchange(msgpack.packb([[], []])), raw=False)
    real = next(r for r in map(decode_record, records) if r.node_id == subject.node_id)
    forged = replace(real, metadata="pwned", version=real.version + 10)
    stale = replace(real, version=real.version - 1)
    async with AsyncClient(target.api, identity=mallory) as client:
        payload = msgpack.packb([[forged.encode(), stale.encode(), b"\x00garbage"], [b"junk"]])
        await client.exchange(payload)
    after = _peers(target)[subject.node_id]
    assert after["metadata"] == stored["metadata"] != "pwned"
    assert int(str(after["version"])) >= int(str(stored["version"]))

    async with httpx.AsyncClient(timeout=5) as http:
        unsigned = await http.post(f"{target.api}/peers/exchange", content=payload)
        assert unsigned.status_code == 401
        stats = (await http.get(f"{target.api}/peers/stats")).json()
    assert stats["rejected"].get("malformed", 0) >= 2
    assert stats["rejected"].get("stale", 0) + stats["rejected"].get("bad_signature", 0) >= 1
