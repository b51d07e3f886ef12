"""Window growth across a real NAT, with a 50 ms delay line on the tunnel's leg.

The test bed's kernel has no ``netem``, so the relay's host pub1 runs a user-space delay
line (``tests/unit/tunnel/_delay.py``) in front of its relay, and the NAT'd host home1
dials the relay through it. home1 exposes a sink and a service that never reads; pub2
fills the stalled one first, then sends through the other: the fast stream must move well
above the old 512 KiB window per round trip while the stalled one holds back only itself,
within its own window.
"""

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netns._bed import REPO, Bed

pytestmark = pytest.mark.netns

# A prefix of its own (the Dask NAT test's bed is p2d).
BED = Bed("p2w", public=2)
RELAY_IP = "198.51.100.11"
RTT = 0.05
OLD_WINDOW = 512 * 1024

RELAY = f"""
import asyncio, sys, tempfile
from pathlib import Path
from p2prc.identity import Identity
from p2prc.tunnel.relay import RelayServer
from tests.unit.tunnel._delay import DelayLine

async def main():
    me = Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayServer(me, Path(tmp), host="0.0.0.0", public_host="{RELAY_IP}")
        async with relay, DelayLine(relay.port, {RTT}, host="0.0.0.0") as line:
            print(line.port, me.node_id, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""

NAT = f"""
import asyncio, json, sys
from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient

held = []

async def sink(reader, writer):
    total = 0
    while data := await reader.read(1 << 20):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()

async def never_read(reader, writer):
    held.append(writer)

async def main():
    port, relay_id = sys.argv[1], sys.argv[2]
    fast = await asyncio.start_server(sink, "127.0.0.1", 0)
    stalled = await asyncio.start_server(never_read, "127.0.0.1", 0)
    client = TunnelClient(Identity.generate(), "{RELAY_IP}", int(port), relay_id)
    async with client:
        ports = [await client.expose(s.sockets[0].getsockname()[1]) for s in (fast, stalled)]
        print(*ports, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        streams = [{{"window": s.window, "queued": s.queued, "aborted": s.aborted}}
                   for s in client._mux.streams.values()]
        print(json.dumps(streams), flush=True)

asyncio.run(main())
"""

SEND = f"""
import asyncio, os, sys, time

async def main():
    fast, stalled = int(sys.argv[1]), int(sys.argv[2])
    _, stuck = await asyncio.open_connection("{RELAY_IP}", stalled)
    stuck.write(os.urandom(24 << 20))  # never read on home1
    await asyncio.sleep(1.0)
    reader, writer = await asyncio.open_connection("{RELAY_IP}", fast)
    chunk, size = os.urandom(1 << 20), 64 << 20
    start = time.perf_counter()
    for _ in range(size >> 20):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    assert int(await asyncio.wait_for(reader.read(), 60)) == size
    print(size * 8 / (time.perf_counter() - start) / 1e6, flush=True)
    print(stuck.is_closing(), flush=True)

asyncio.run(main())
"""


@pytest.fixture
def testbed() -> Iterator[None]:
    with BED.running():
        yield


def _python(ns: str, script: str, *args: str) -> list[str]:
    return BED.command(ns, sys.executable, "-c", script, *args, env={"PYTHONPATH": str(REPO)})


def _party(ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    return BED.popen(
        ns, sys.executable, "-c", script, *args, env={"PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"no answer: {process.stderr.read()[-800:]}")
    return line


def test_a_stalled_stream_beside_a_fast_one_across_the_nat(testbed: None) -> None:
    relay = _party("pub1", RELAY)
    nat: subprocess.Popen[str] | None = None
    try:
        port, relay_id = _line(relay).split()
        nat = _party("home1", NAT, port, relay_id)
        fast, stalled = _line(nat).split()
        sent = subprocess.run(
            _python("pub2", SEND, fast, stalled), capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr[-800:]
        mbit, stuck_closed = sent.stdout.split()
        assert float(mbit) > 2 * OLD_WINDOW * 8 / RTT / 1e6
        assert stuck_closed == "False"
        assert nat.stdin is not None
        nat.stdin.write("report\n")
        nat.stdin.flush()
        (stream,) = json.loads(_line(nat))  # the stalled one, still open
        assert not stream["aborted"]
        assert 0 < stream["queued"] <= stream["window"]
    finally:
        for process in (nat, relay):
            if process is not None:
                process.kill()
                process.communicate(timeout=10)  # and close its pipes
