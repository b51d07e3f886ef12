"""Real ``p2prc`` processes on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], seconds: float = 30.0) -> Any:
    """Poll ``condition`` every 0.1 s until it returns something true (returned), for at most
    ``seconds``; HTTP errors, missing keys and failed asserts along the way count as not yet."""
    import httpx

    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (httpx.HTTPError, KeyError, AssertionError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"condition not reached in {seconds:.0f} s (last error: {last})")


async def round_trip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``payload`` to ``host:port``, half-close, and read the whole answer (30 s)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


def p2prc(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a new process."""
    env = {**os.environ, "P2PRC_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "p2prc", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"p2prc {args} failed: {result.stderr}")
    return result


@dataclass
class NodeProcess:
    home: Path
    process: subprocess.Popen[str]
    api: str
    node_id: str
    # The node's stderr, read by a thread from the start: a chatty node never blocks on a
    # full pipe, and a test reads what it logged with log().
    _lines: list[str] = field(default_factory=list, repr=False)
    _drain: threading.Thread | None = field(default=None, repr=False)

    def log(self, timeout: float = 15) -> str:
        """What the node wrote to stderr: all of it once the process has exited, else what
        came so far."""
        if self._drain is not None and self.process.poll() is not None:
            self._drain.join(timeout)
        return "".join(self._lines)

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Send ``sig`` and return the seconds until the process exited."""
        start = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=15)
        return time.monotonic() - start


def start_node(home: Path, *args: str, command: tuple[str, ...] = ("start",)) -> NodeProcess:
    env = {**os.environ, "P2PRC_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "p2prc", "--json", *command, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=15)
        assert process.stderr is not None
        raise AssertionError(f"node did not start: {process.stderr.read()}")
    ready = json.loads(line)
    node = NodeProcess(home, process, ready["api"], ready["node_id"])
    stderr = process.stderr
    assert stderr is not None
    node._drain = threading.Thread(target=_collect, args=(stderr, node._lines), daemon=True)
    node._drain.start()
    return node


def _collect(stream: object, lines: list[str]) -> None:
    try:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)
    except (ValueError, OSError):  # a test closed the pipe: what came so far is kept
        pass


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    started: list[NodeProcess] = []

    def make(name: str = "a", *args: str) -> NodeProcess:
        node = start_node(tmp_path / name, "--host", "127.0.0.1", "--port", "0", *args)
        started.append(node)
        return node

    yield make
    for node in started:
        close(node)


def close(node: NodeProcess) -> None:
    """Kill the node if it still runs and close its pipes."""
    if node.process.poll() is None:
        node.process.kill()
    node.process.wait(timeout=15)
    if node._drain is not None:
        node._drain.join(15)
    for stream in (node.process.stdout, node.process.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def running_node(node_factory: object) -> NodeProcess:
    assert callable(node_factory)
    node = node_factory()
    assert isinstance(node, NodeProcess)
    return node


# The relay and the tunnel run under uvloop in a real node (uvicorn picks it) and under
# asyncio's own loop when embedded: their tests run on both (a UDP transport difference
# between the two once broke UDP mapping under uvloop only).
_BOTH_LOOPS = {"test_relay.py", "test_relay_domains.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name not in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop}  # the default, one variant
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
