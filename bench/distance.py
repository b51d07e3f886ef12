"""Relayed throughput over distance: p2prc's relay against ``ssh -R`` on the same delay line.

The kernel here has no ``netem``, so distance is a user-space delay line
(``tests/unit/tunnel/_delay.py``, its own process) on the tunnel's leg: the NAT'd side
(a ``TunnelClient``, or an ``ssh -R`` client) dials the relay (a ``RelayServer``, or a
private sshd on loopback with its own host key and authorized key) through it. At RTT 0
there is no delay line. Every party runs in its own process; this one sends and counts:
``--streams`` connections to the relay's public port each write for ``--seconds`` and
half-close, the NAT'd side's sink counts the bytes and answers the count, and the rate is
all bytes counted over the time until the last count came back. Per RTT and stream count:
p2prc, p2prc with today's fixed 512 KiB window (growth off: the "before"), and ``ssh -R``;
the ratios p2prc/ssh. When sshd cannot run, the ssh fields are null and ``ssh_error`` says
why (``P2PRC_BENCH_SSHD`` names an sshd binary elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from _common import SshUnavailable, ssh_reverse, stop, write_markdown, write_result

REPO = Path(__file__).resolve().parent.parent
# Seconds any child has to say it is ready (its port on the first line of stdout).
READY_S = 20.0
CHUNK = 1 << 20


# Children: each prints its port (or "ready") on one line, then serves until stdin closes.


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


def _say(text: object) -> None:
    print(text, flush=True)


async def _role_relay(home: str) -> None:
    from p2prc.identity import Identity
    from p2prc.tunnel.relay import RelayServer

    identity = Identity.generate()
    async with RelayServer(identity, Path(home), host="127.0.0.1", public_host="127.0.0.1") as r:
        _say(f"{r.port} {identity.node_id}")
        await _until_stdin_closes()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(CHUNK):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _role_client(relay_port: int, relay_id: str) -> None:
    from p2prc.identity import Identity
    from p2prc.tunnel.client import TunnelClient

    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    async with TunnelClient(Identity.generate(), "127.0.0.1", relay_port, relay_id) as client:
        _say(await client.expose(sink.sockets[0].getsockname()[1]))
        await _until_stdin_closes()


async def _role_sink() -> None:
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    _say(sink.sockets[0].getsockname()[1])
    await _until_stdin_closes()


async def _role_delay(target: int, rtt: float) -> None:
    sys.path.insert(0, str(REPO))
    from tests.unit.tunnel._delay import DelayLine

    async with DelayLine(target, rtt) as line:
        _say(line.port)
        await _until_stdin_closes()


# The parent: start children, send, count.


class Child:
    """A child process of this script in one role; ``line``: what it printed first."""

    def __init__(self, *args: str, fixed_window: bool = False) -> None:
        env = dict(os.environ)
        if fixed_window:
            env["P2PRC_BENCH_FIXED_WINDOW"] = "1"
        command = [sys.executable, __file__, "--role", *args]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self.process.stdout is not None
        self.line = _first_line(self.process.stdout, self.process)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop(self.process)


def _first_line(stream: IO[bytes], process: subprocess.Popen[bytes]) -> str:
    import selectors

    what = " ".join(map(str, process.args)) if isinstance(process.args, list) else "child"
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(READY_S):
            stop(process)
            raise RuntimeError(f"{what} printed nothing within {READY_S} s")
    line = stream.readline().decode().strip()
    if not line:
        raise RuntimeError(f"{what} exited with {process.wait()}")
    return line


async def _one(port: int, seconds: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(CHUNK)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    counted = int(await asyncio.wait_for(reader.read(), 120))
    writer.close()
    return counted


def send(port: int, streams: int, seconds: float) -> float:
    """Mbit/s of ``streams`` connections writing for ``seconds`` each, counted at the sink."""

    async def run() -> float:
        start = time.perf_counter()
        counted = await asyncio.gather(*(_one(port, seconds) for _ in range(streams)))
        return sum(counted) * 8 / (time.perf_counter() - start) / 1e6

    return asyncio.run(run())


def p2prc_rate(rtt: float, streams: int, seconds: float, fixed: bool, home: Path) -> float:
    with contextlib.ExitStack() as stack:
        relay = Child("relay", "--home", str(home))
        stack.callback(relay.close)
        port, relay_id = relay.line.split()
        leg = int(port)
        if rtt:
            delay = Child("delay", "--target", str(leg), "--rtt", str(rtt))
            stack.callback(delay.close)
            leg = int(delay.line)
        client = Child(
            "client", "--relay-port", str(leg), "--relay-id", relay_id, fixed_window=fixed
        )
        stack.callback(client.close)
        return send(int(client.line), streams, seconds)


@contextlib.contextmanager
def ssh_reverse_delayed(rtt: float) -> Iterator[tuple[int, str]]:
    """``ssh -N -R`` to a private sshd through the delay line, to a sink: (public port,
    cipher)."""
    with contextlib.ExitStack() as stack:
        sink = Child("sink")
        stack.callback(sink.close)

        def delayed(sshd_port: int) -> int:
            if not rtt:
                return sshd_port
            delay = Child("delay", "--target", str(sshd_port), "--rtt", str(rtt))
            stack.callback(delay.close)
            return int(delay.line)

        yield stack.enter_context(ssh_reverse(int(sink.line), delayed))


def measure(
    rtts: list[float], stream_counts: list[int], seconds: float, with_ssh: bool = True
) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    ssh_error: str | None = None if with_ssh else "not asked (--no-ssh)"
    cipher: str | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in rtts:
            for streams in stream_counts:
                home = Path(tmp) / f"relay-{rtt}-{streams}"
                home.mkdir()
                row: dict[str, object] = {"rtt_ms": round(rtt * 1000), "streams": streams}
                row["p2prc_mbit"] = round(p2prc_rate(rtt, streams, seconds, False, home), 1)
                if streams == 1:
                    fixed = p2prc_rate(rtt, streams, seconds, True, home)
                    row["fixed_window_mbit"] = round(fixed, 1)
                row["ssh_mbit"] = None
                if ssh_error is None:
                    try:
                        with ssh_reverse_delayed(rtt) as (port, cipher):
                            row["ssh_mbit"] = round(send(port, streams, seconds), 1)
                    except (SshUnavailable, OSError, subprocess.SubprocessError) as exc:
                        ssh_error = str(exc) or type(exc).__name__
                ssh, ours = row["ssh_mbit"], row["p2prc_mbit"]
                ratio = ours / ssh if isinstance(ssh, float) and isinstance(ours, float) else None
                row["ratio"] = None if ratio is None else round(ratio, 2)
                print(row, flush=True)
                rows.append(row)
    return {
        "seconds_per_run": seconds,
        "cpus": os.cpu_count(),
        "ssh_cipher": cipher,
        "ssh_error": ssh_error,
        "rows": rows,
    }


def write_table(result: dict[str, Any], name: str) -> str:
    intro = [
        "# Relay over distance (`bench/distance.py`)",
        "",
        "Delay line on the tunnel leg (NAT'd side -> relay), every party its own process,",
        f"{result['seconds_per_run']} s of writes per run, {result['cpus']} CPUs,"
        f" ssh cipher {result['ssh_cipher']}. Mbit/s counted at the sink.",
    ]
    header = ["RTT", "streams", "p2prc", "p2prc, fixed 512 KiB window", "`ssh -R`", "p2prc / ssh"]
    rows = [
        (f"{row['rtt_ms']} ms", row["streams"], row["p2prc_mbit"], row.get("fixed_window_mbit"),
         row["ssh_mbit"], row["ratio"])
        for row in result["rows"]
    ]  # fmt: skip
    notes = [f"ssh baseline: {result['ssh_error']}"] if result["ssh_error"] else []
    return write_markdown(name, intro, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtts", default="0,20,50,100", help="milliseconds, comma separated")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--ssh", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="distance", help="result name in bench/results")
    parser.add_argument("--role", choices=["relay", "client", "sink", "delay"])
    parser.add_argument("--home", default="")
    parser.add_argument("--relay-port", type=int, default=0)
    parser.add_argument("--relay-id", default="")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--rtt", type=float, default=0.0)
    args = parser.parse_args()
    if os.environ.get("P2PRC_BENCH_FIXED_WINDOW"):
        import p2prc.tunnel.mux

        p2prc.tunnel.mux.GROW_RTTS = 0.0  # no window is ever written out that fast
    if args.role == "relay":
        asyncio.run(_role_relay(args.home))
    elif args.role == "client":
        asyncio.run(_role_client(args.relay_port, args.relay_id))
    elif args.role == "sink":
        asyncio.run(_role_sink())
    elif args.role == "delay":
        asyncio.run(_role_delay(args.target, args.rtt))
    else:
        rtts = [int(ms) / 1000 for ms in args.rtts.split(",")]
        counts = [int(n) for n in args.streams.split(",")]
        result = measure(rtts, counts, args.seconds, args.ssh)
        write_result(args.out, result)
        print(write_table(result, args.out))


if __name__ == "__main__":
    main()
