"""``p2prc doctor``: each check's finding and its fix."""

import asyncio
import contextlib
import email.utils
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2prc import FakeRuntime, Home, Node, NodeConfig, init_home
from p2prc.cli import main
from p2prc.cli._doctor import _clock, _relay_trusts, _Running
from p2prc.config import RelayConfig
from p2prc.models import PeerView
from tests.integration.conftest import close, start_node


def _doctor(capsys: pytest.CaptureFixture[str], home: Path) -> tuple[int, dict[str, Any]]:
    try:
        main(["--home", str(home), "--json", "doctor"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(capsys.readouterr().out)


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {check["name"]: check for check in report["checks"]}


def _home(tmp_path: Path, **config: Any) -> Path:
    home = Home(tmp_path / "home")
    init_home(home, NodeConfig(name="doc", **config))
    return home.path


def test_a_machine_without_docker_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    home = _home(tmp_path, port=1, host="127.0.0.1")
    from p2prc.config import set_value

    set_value(Home(home), "containers.docker_host", f"unix://{missing}")
    code, report = _doctor(capsys, home)
    assert code == 1
    assert not report["ok"]
    docker = _by_name(report)["docker"]
    assert docker["level"] == "fail"
    assert "no Docker daemon" in docker["detail"]
    assert str(missing) in docker["detail"]
    assert "install Docker" in docker["fix"]
    assert "image" not in _by_name(report)  # no daemon, no image check
    assert _by_name(report)["nat"]["fix"] == "p2prc start"


def test_a_port_in_use_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home = _home(tmp_path, port=port, host="127.0.0.1")
        _, report = _doctor(capsys, home)
    check = _by_name(report)["API port"]
    assert check["level"] == "fail"
    assert "in use by another program" in check["detail"]
    assert f"p2prc config set port {port + 1}" in check["fix"]
    assert _by_name(report)["dual-stack"]["level"] in {"ok", "warn"}


def test_a_running_node_is_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = _home(tmp_path)
    node = start_node(home, "--port", "0", "--host", "127.0.0.1")
    try:
        _, report = _doctor(capsys, home)
    finally:
        close(node)
    checks = _by_name(report)
    assert checks["ports"]["level"] == "ok"
    assert node.api in checks["ports"]["detail"]
    assert checks["nat"]["level"] in {"ok", "warn"}
    assert checks["relays"]["level"] == "skip"


def _peer(api: str, node_id: str = "ab" * 16, **fields: Any) -> PeerView:
    base: dict[str, Any] = {
        "node_id": node_id,
        "name": "far",
        "state": "alive",
        "rtt_ms": None,
        "addresses": [],
        "api": api,
        "api_port": 0,
        "gossip_port": 0,
        "behind_nat": False,
        "relay": "",
        "user": "",
        "cores": 1,
        "memory": 1,
        "gpus": 0,
        "metadata": "",
        "custom": {},
        "version": 1,
    }
    return PeerView(**{**base, **fields})


@contextlib.asynccontextmanager
async def _clock_server(offset: float) -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        date = email.utils.formatdate(time.time() + offset, usegmt=True)
        writer.write(
            f"HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 2\r\n"
            "Connection: close\r\n\r\n{}".encode()
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_clock_skew_against_peers() -> None:
    async with _clock_server(-300) as api:
        me = _peer("http://127.0.0.1:1", "cd" * 16, me=True)
        running = _Running("http://127.0.0.1:1", me, [_peer(api)], {"rejected": {"future": 2}})
        checks = await _clock(running, skew=60)
    warned, measured = checks
    assert warned.level == "warn"
    assert "2 peer records" in warned.detail
    assert measured.level == "fail"
    offset = float(re.search(r"offset ([-+0-9]+) s", measured.detail).group(1))  # type: ignore[union-attr]
    assert -305 < offset < -295
    assert "timedatectl" in measured.fix
    async with _clock_server(0) as api:
        checks = await _clock(_Running("", me, [_peer(api)], {}), skew=60)
    assert [c.level for c in checks] == ["ok"]


async def test_a_relay_that_does_not_trust_us(tmp_path: Path) -> None:
    relay_home = Home(tmp_path / "relay")
    settings, identity = init_home(
        relay_home, NodeConfig(name="relay", relay=RelayConfig(enabled=True, port=0))
    )
    ours = Home(tmp_path / "ours")
    _, our_identity = init_home(ours, NodeConfig(name="ours"))
    async with Node(
        settings, relay_home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime()
    ) as relay:
        peer = _peer(
            relay.api_url, identity.node_id, relay_port=relay.relay.port if relay.relay else 0
        )
        check = await _relay_trusts(peer, ours, our_identity.node_id)
    assert check.level == "fail"
    assert "does not trust" in check.detail
    assert check.fix == f"its owner runs: p2prc trust add {our_identity.node_id}"
