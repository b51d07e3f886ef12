"""Helpers shared by the benchmarks: start processes, poll, read memory, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import psutil

from p2prc.identity import Identity
from p2prc.peers.records import PeerRecord

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
SSHD = Path(os.environ.get("P2PRC_BENCH_SSHD", "/usr/sbin/sshd"))
PRIVSEP_DIR = Path("/run/sshd")  # sshd started by root insists on this (empty) directory
# Bound on every wait for sshd or ssh, polled every 10 ms.
SSH_READY_S = 20.0


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TCP echo server's connection handler."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, timeout: float = 1.0) -> int:
    """Status code of one GET on loopback, or 0 when nothing answers."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("GET", path)
        status = connection.getresponse().status
        connection.close()
        return status
    except OSError:
        return 0


def start_node(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "P2PRC_HOME": str(home)}
    command = [sys.executable, "-m", "p2prc", "start", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_hello(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(BENCH / "_hello_app.py"), str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, path: str, deadline_s: float = 30.0) -> float:
    """Seconds until ``path`` answers 200, polling every 5 ms."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        if get(port, path, timeout=0.5) == 200:
            return time.perf_counter() - start
        time.sleep(0.005)
    raise TimeoutError(f"nothing answered on port {port}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class SshUnavailable(Exception):
    """Why an OpenSSH baseline (``ssh -R``, ``ssh -J``) could not run."""


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to ``host:port`` is accepted within 1 s."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def log_tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    useful = [line for line in text.splitlines() if not line.startswith("debug")]
    return " | ".join(useful[-lines:]) or "no output"


def wait_for(
    what: str,
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log: Path,
    seconds: float = 15.0,
) -> None:
    """Poll ``ready`` every 10 ms for at most ``seconds``; fail early if ``process`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SshUnavailable(f"{what}: exited with {process.returncode}: {log_tail(log)}")
        if ready():
            return
        time.sleep(0.01)
    raise SshUnavailable(f"{what}: not ready within {seconds:.0f} s: {log_tail(log)}")


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this benchmark started, then any children it forked (sshd sessions)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop(process)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.terminate()
    psutil.wait_procs(alive, timeout=5)


def sshd_prefix(home: Path) -> list[str | Path]:
    """What to run a private sshd under, as root: its own mount namespace where /etc/passwd
    has the privilege separation user ``sshd`` (missing when sshd was unpacked from its .deb,
    not installed) and root's account is not locked (``*`` is, to sshd without PAM; only
    keys log in here anyway). Not root: nothing."""
    if os.geteuid() != 0:
        return []
    passwd = Path("/etc/passwd").read_text()
    shadow = [
        "root:x:" + line.split(":", 2)[2] if line.startswith("root:") else line
        for line in Path("/etc/shadow").read_text().splitlines()
    ]
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        passwd += "sshd:x:65533:65534::/run/sshd:/bin/false\n"
        shadow.append("sshd:!:1::::::")
    (home / "passwd").write_text(passwd)
    (home / "shadow").write_text("\n".join(shadow) + "\n")
    script = 'mount --bind "$0" /etc/passwd && mount --bind "$1" /etc/shadow && shift && exec "$@"'
    return ["unshare", "--mount", "--", "sh", "-c", script, home / "passwd", home / "shadow"]


@contextlib.contextmanager
def ssh_reverse(
    target_port: int, leg: Callable[[int], int] = lambda port: port
) -> Iterator[tuple[int, str]]:
    """``ssh -N -R`` to 127.0.0.1:``target_port`` through a private sshd on loopback (its own
    host key, port and authorized key): (the sshd's remote port, the negotiated cipher).
    ``leg(sshd_port)`` is the port the ssh client dials (a delay line in front of sshd).

    Blocking (keys, processes, polls): run it off an event loop that serves the target.
    """
    ssh, keygen = shutil.which("ssh"), shutil.which("ssh-keygen")
    if not SSHD.exists() or ssh is None or keygen is None:
        raise SshUnavailable(f"no {SSHD} (apt-get install openssh-server, or P2PRC_BENCH_SSHD)")
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
            run_as = sshd_prefix(home)
            if os.geteuid() == 0 and not PRIVSEP_DIR.exists():
                PRIVSEP_DIR.mkdir(mode=0o755)
                made_privsep = True
            sshd_log, ssh_log = home / "sshd.log", home / "ssh.log"
            sshd = _quiet([*run_as, SSHD, "-D", "-e", "-f", home / "sshd_config"], sshd_log)
            started.append(sshd)
            wait_for(
                "sshd", lambda: "Server listening" in sshd_log.read_text(), sshd, sshd_log,
                SSH_READY_S,
            )  # fmt: skip
            command: list[str | Path] = [ssh, "-v", "-N", "-F", "none", "-p", str(leg(sshd_port))]
            command += ["-R", f"{remote_port}:127.0.0.1:{target_port}", "-i", home / "client_key"]
            for option in (
                "StrictHostKeyChecking=no",
                f"UserKnownHostsFile={home / 'known_hosts'}",
                "ExitOnForwardFailure=yes",
                "BatchMode=yes",
            ):
                command += ["-o", option]
            command.append(f"{psutil.Process().username()}@127.0.0.1")
            client = _quiet(command, ssh_log)
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


def _quiet(command: list[str | Path], log: Path) -> subprocess.Popen[bytes]:
    """``command`` started with no stdin or stdout, its stderr into ``log``."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )


def write_result(name: str, result: dict[str, object]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def write_markdown(
    name: str,
    intro: Sequence[str],
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    notes: Sequence[str] = (),
) -> str:
    """``bench/results/NAME.md``: the intro's lines, one table (None shows as an empty
    cell), then the notes; returns the text written."""
    lines = [*intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |")
    if notes:
        lines += ["", *notes]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    return text


def print_table(rows: list[tuple[str, object, object]], header: tuple[str, str, str]) -> None:
    print(f"{header[0]:40} {header[1]:>14} {header[2]:>14}")
    for name, ours, base in rows:
        print(f"{name:40} {ours!s:>14} {base!s:>14}")


# Gossip benchmarks: SWIM period and fanout, and the push-gossip model they are held to.
GOSSIP_PERIOD, GOSSIP_FANOUT = 0.2, 3


def gossip_model_seconds(n: int) -> float:
    """Push gossip: log_(fanout+1)(n) rounds to reach everyone, plus ln(n)/fanout."""
    return GOSSIP_PERIOD * (math.log(n) / math.log(GOSSIP_FANOUT + 1) + math.log(n) / GOSSIP_FANOUT)


def sim_record(
    identity: Identity, name: str, port: int, version: int, metadata: str = ""
) -> PeerRecord:
    """A signed record of a simulated node on loopback."""
    return PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=name,
        version=version,
        addresses=("127.0.0.1",),
        api_port=1,
        gossip_port=port,
        metadata=metadata,
    ).signed(identity)
