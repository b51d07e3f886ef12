"""Relayed TCP throughput (2 TLS hops, framed) against direct and ``ssh -R``, same run.

A sink counts bytes on 127.0.0.1; the sender writes ``--mib`` MiB to it directly, then
through a RelayServer and a TunnelClient (both in this process, with the sink: one event
loop, so this is a floor for separate processes), then through ``ssh -R`` (a private sshd
on loopback with its own host key, port and authorized key; ssh and sshd are separate
processes). ``--runs`` rounds of the three, interleaved; reports the median Gbit/s of each
and the ratios relay/direct and relay/ssh. When sshd cannot run, the ssh fields are null
and ``ssh_error`` says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from _common import SshUnavailable, accepts, free_port, stop_tree, wait_for, write_result

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayServer

SSHD = Path("/usr/sbin/sshd")
# sshd started by root insists on this (empty) directory; the Debian service makes it.
PRIVSEP_DIR = Path("/run/sshd")
# Bound on every wait for sshd or ssh, polled every 10 ms.
SSH_READY_S = 15.0


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(1 << 20):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def _send(port: int, mib: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(1 << 20)
    start = time.perf_counter()
    for _ in range(mib):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    received = int(await reader.read())
    elapsed = time.perf_counter() - start
    writer.close()
    assert received == mib << 20
    return received * 8 / elapsed / 1e9


def _start(command: list[str | Path], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )


@contextlib.contextmanager
def ssh_reverse(target_port: int) -> Iterator[tuple[int, str]]:
    """``ssh -N -R`` through a private sshd on 127.0.0.1: (remote port, negotiated cipher).

    Blocking (keys, processes, polls): run it off the event loop that serves the target.
    """
    ssh, keygen = shutil.which("ssh"), shutil.which("ssh-keygen")
    if not SSHD.exists() or ssh is None or keygen is None:
        raise SshUnavailable(
            "sshd/ssh not installed (apt-get install -y openssh-server openssh-client)"
        )
    started: list[subprocess.Popen[bytes]] = []
    made_privsep = False
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        try:
            for name in ("host_key", "client_key"):
                subprocess.run(
                    [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", home / name],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            (home / "authorized_keys").write_bytes((home / "client_key.pub").read_bytes())
            sshd_port, remote_port = free_port(), free_port()
            (home / "sshd_config").write_text(
                f"ListenAddress 127.0.0.1\nPort {sshd_port}\nHostKey {home / 'host_key'}\n"
                f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile none\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                # the temp files sit under /tmp (mode 1777), which StrictModes refuses
                "StrictModes no\nAllowTcpForwarding yes\n"
            )
            if os.geteuid() == 0 and not PRIVSEP_DIR.exists():
                PRIVSEP_DIR.mkdir(mode=0o755)
                made_privsep = True
            sshd_log, ssh_log = home / "sshd.log", home / "ssh.log"
            sshd = _start([SSHD, "-D", "-e", "-f", home / "sshd_config"], sshd_log)
            started.append(sshd)
            wait_for(
                "sshd",
                lambda: "Server listening" in sshd_log.read_text(),
                sshd,
                sshd_log,
                SSH_READY_S,
            )
            options = [
                "StrictHostKeyChecking=no",
                f"UserKnownHostsFile={home / 'known_hosts'}",
                "ExitOnForwardFailure=yes",
                "BatchMode=yes",
            ]
            command: list[str | Path] = [ssh, "-v", "-N", "-F", "none", "-p", str(sshd_port)]
            command += ["-R", f"{remote_port}:127.0.0.1:{target_port}", "-i", home / "client_key"]
            command += [arg for option in options for arg in ("-o", option)]
            command.append(f"{psutil.Process().username()}@127.0.0.1")
            client = _start(command, ssh_log)
            started.append(client)
            wait_for("ssh -R", lambda: accepts(remote_port), client, ssh_log, SSH_READY_S)
            ciphers = [
                line.split("cipher:")[1].split()[0]
                for line in ssh_log.read_text(errors="replace").splitlines()
                if "server->client cipher:" in line
            ]
            yield remote_port, ciphers[0] if ciphers else "unknown"
        finally:
            for process in reversed(started):
                stop_tree(process)
            if made_privsep:
                with contextlib.suppress(OSError):
                    PRIVSEP_DIR.rmdir()


async def measure(mib: int, runs: int) -> dict[str, object]:
    relay_id, client_id = Identity.generate(), Identity.generate()
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    speeds: dict[str, list[float]] = {"direct": [], "relay": [], "ssh": []}
    cipher: str | None = None
    ssh_error: str | None = None
    ssh_port = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as ssh_stack:
        try:  # ssh_reverse blocks (keys, processes, polls): off the loop that runs the sink
            ssh_port, cipher = await asyncio.to_thread(ssh_stack.enter_context, ssh_reverse(port))
        except (SshUnavailable, OSError, subprocess.SubprocessError) as exc:
            ssh_error = str(exc) or type(exc).__name__
        try:
            server = RelayServer(relay_id, Path(tmp), host="127.0.0.1", public_host="127.0.0.1")
            async with (
                server as relay,
                TunnelClient(client_id, "127.0.0.1", relay.port, relay_id.node_id) as client,
            ):
                public = await client.expose(port)
                for _ in range(runs):  # interleaved, so a busy moment hits all three alike
                    speeds["direct"].append(await _send(port, mib))
                    speeds["relay"].append(await _send(public, mib))
                    if ssh_error is None:
                        try:
                            speeds["ssh"].append(await _send(ssh_port, mib))
                        except (OSError, ValueError) as exc:
                            ssh_error = f"ssh -R transfer failed: {exc!r}"
        finally:
            await asyncio.to_thread(ssh_stack.close)
    sink.close()
    direct, relayed = statistics.median(speeds["direct"]), statistics.median(speeds["relay"])
    ssh = statistics.median(speeds["ssh"]) if ssh_error is None else None
    return {
        "mib": mib,
        "runs": runs,
        "direct_gbit_s": round(direct, 2),
        "relayed_gbit_s": round(relayed, 2),
        "ssh_r_gbit_s": None if ssh is None else round(ssh, 2),
        "relay_vs_direct": round(relayed / direct, 3),
        "relay_vs_ssh": None if ssh is None else round(relayed / ssh, 3),
        "ssh_cipher": cipher,
        "ssh_error": ssh_error,
        "each_run_gbit_s": {name: [round(v, 2) for v in values] for name, values in speeds.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "targets": ">= 1 Gbit/s and >= 5 % of direct",
        "pass": relayed >= 1.0 and relayed / direct >= 0.05,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs; medians reported")
    options = parser.parse_args()
    result = asyncio.run(measure(options.mib, options.runs))
    for key, value in result.items():
        print(f"{key:16} {value}")
    write_result("relay_throughput", result)
