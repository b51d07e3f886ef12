"""The relay between real nodes across the test bed's NAT, with iperf3, as issue #18 measured.

In the namespace test bed (``/work/shared/testbed/netns-nat.sh`` under ``TB_PREFIX``
``--prefix``: three public hosts, one NAT'd site), as a user runs it: a relay node
(``p2prc start``) on pub1, a node behind the NAT on home1 that publishes an ``iperf3 -s`` on
its loopback with ``p2prc map-port``, and ``iperf3 -c`` on pub2 to the relay's mapped port
(each node its own process, as in production). Baselines in the same run: ``ssh -N -R``
from home1 to an sshd on pub1 (its own host key, authorized key and port, ``GatewayPorts``
so pub2 reaches the forward) to the same ``iperf3 -s``, and ``iperf3`` directly between
pub2 and pub3 (the bed's link, no relay). ``--streams`` stream counts (``-P``), both
directions (``-R``: the NAT'd side sends), ``--runs`` interleaved rounds of ``--seconds``
each; medians, and the ratios relay/ssh and relay/direct. Root; needs iperf3
(``apt-get install iperf3``) and, for the ssh baseline, openssh-server. The bed and every
process are removed at the end, always.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import SSHD, SshUnavailable, sshd_prefix, write_markdown, write_result

from p2prc.config import Home, set_value
from p2prc.identity import Identity
from p2prc.node import init_home

_BED = Path(__file__).resolve().parents[2] / "shared" / "testbed" / "netns-nat.sh"
RELAY_IP, PLAIN_IP, HOME_IP = "198.51.100.11", "198.51.100.13", "192.168.1.10"  # pub1, pub3, home1
IPERF_PORT, PLAIN_PORT, SSH_PORT, SSH_FORWARD = 5201, 5202, 2222, 5301
READY_S = 40.0


class Bed:
    """The test bed under ``prefix``, and the processes started in it (stopped at close)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.env = {**os.environ, "TB_PREFIX": prefix, "TB_PUBLIC": "3", "TB_SITES": "1",
                    "TB_HOSTS": "1", "TB_NAT": "easy"}  # fmt: skip
        self.processes: list[subprocess.Popen[bytes]] = []

    def command(self, host: str, *args: str | Path, **env: str) -> list[str]:
        settings = [f"{key}={value}" for key, value in env.items()]
        return ["ip", "netns", "exec", f"{self.prefix}-{host}", "env", *settings, *map(str, args)]

    def start(self, host: str, *args: str | Path, log: Path | None = None, **env: str) -> None:
        out = log.open("ab") if log is not None else None
        try:
            self.processes.append(
                subprocess.Popen(
                    self.command(host, *args, **env),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=out or subprocess.DEVNULL,
                )
            )
        finally:
            if out is not None:
                out.close()

    def run(self, host: str, *args: str | Path, timeout: float = 60, **env: str) -> str:
        done = subprocess.run(
            self.command(host, *args, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[:3]} in {host}: {(done.stderr or done.stdout)[-400:]}")
        return done.stdout

    @contextlib.contextmanager
    def up(self) -> Iterator[Bed]:
        subprocess.run(["bash", str(_BED), "up"], env=self.env, check=True, capture_output=True)
        try:
            yield self
        finally:
            for process in reversed(self.processes):
                process.terminate()
            for process in self.processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            subprocess.run(["bash", str(_BED), "down"], env=self.env, capture_output=True)


def _node_home(home: Path, settings: dict[str, str]) -> str:
    node_home = Home(home)
    init_home(node_home)
    for key, value in settings.items():
        set_value(node_home, key, value)
    return Identity.load(node_home.identity_dir).node_id


def _nodes(bed: Bed, tmp: Path) -> str:
    """The relay on pub1 and the NAT'd node on home1, which maps its iperf3 port: the
    relay's ``host:port`` for it."""
    quiet = {"gossip.lan_discovery": "false"}
    relay_id = _node_home(
        tmp / "relay",
        {**quiet, "relay.enabled": "true", "trust.mode": "open", "behind_nat": "false",
         "gossip.advertise": RELAY_IP},
    )  # fmt: skip
    _node_home(
        tmp / "home",
        {**quiet, "bootstrap": f"{RELAY_IP}:8088", "gossip.advertise": HOME_IP,
         "relay.use": relay_id},
    )  # fmt: skip
    p2prc = (sys.executable, "-m", "p2prc")
    for host, name, address in (("pub1", "relay", RELAY_IP), ("home1", "home", HOME_IP)):
        home = tmp / name
        bed.start(host, *p2prc, "start", "--host", address, "--port", "8088",
                  log=home / "node.log", P2PRC_HOME=str(home))  # fmt: skip
    deadline, error = time.monotonic() + READY_S, ""
    while time.monotonic() < deadline:
        try:
            out = bed.run("home1", *p2prc, "--json", "map-port", str(IPERF_PORT),
                          P2PRC_HOME=str(tmp / "home"))  # fmt: skip
            return str(json.loads(out)["EntireAddress"])
        except RuntimeError as exc:
            error = str(exc)
            time.sleep(1)
    raise RuntimeError(f"map-port did not succeed within {READY_S:.0f} s: {error}")


def _ssh_reverse(bed: Bed, tmp: Path) -> str:
    """sshd on pub1, ``ssh -N -R`` from home1 to the iperf3 port: the cipher in use."""
    ssh, keygen = shutil.which("ssh"), shutil.which("ssh-keygen")
    if not SSHD.exists() or ssh is None or keygen is None:
        raise SshUnavailable(f"no {SSHD} (apt-get install openssh-server)")
    home = tmp / "ssh"
    home.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", home / name],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
    (home / "authorized_keys").write_bytes((home / "client_key.pub").read_bytes())
    (home / "sshd_config").write_text(
        f"ListenAddress {RELAY_IP}\nPort {SSH_PORT}\nHostKey {home / 'host_key'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile none\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nAllowTcpForwarding yes\nGatewayPorts clientspecified\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd_log, ssh_log = home / "sshd.log", home / "ssh.log"
    bed.start("pub1", *sshd_prefix(home), SSHD, "-D", "-e", "-f", home / "sshd_config",
              log=sshd_log)  # fmt: skip
    _wait("sshd", lambda: "Server listening" in sshd_log.read_text(), sshd_log)
    options = ["StrictHostKeyChecking=no", f"UserKnownHostsFile={home / 'known_hosts'}",
               "ExitOnForwardFailure=yes", "BatchMode=yes"]  # fmt: skip
    command: list[str | Path] = [ssh, "-v", "-N", "-F", "none", "-p", str(SSH_PORT)]
    command += ["-R", f"0.0.0.0:{SSH_FORWARD}:127.0.0.1:{IPERF_PORT}", "-i", home / "client_key"]
    for option in options:
        command += ["-o", option]
    bed.start("home1", *command, f"root@{RELAY_IP}", log=ssh_log)
    _wait("ssh -R", lambda: "remote forward success" in ssh_log.read_text(), ssh_log)
    ciphers = [
        line.split("cipher:")[1].split()[0]
        for line in ssh_log.read_text(errors="replace").splitlines()
        if "server->client cipher:" in line
    ]
    return ciphers[0] if ciphers else "unknown"


def _wait(what: str, ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
    raise SshUnavailable(f"{what} not ready within 20 s: {tail}")


def _iperf(bed: Bed, host: str, port: int, streams: int, reverse: bool, seconds: float) -> float:
    """Gbit/s received in one iperf3 run from pub2."""
    args = ["iperf3", "-c", host, "-p", str(port), "-P", str(streams), "-t", str(seconds), "-J"]
    error = ""
    for _ in range(3):  # the server ends a test a moment after its client: "busy" meanwhile
        try:
            out = bed.run("pub2", *args, *(["-R"] if reverse else []), timeout=seconds + 30)
        except RuntimeError as exc:  # iperf3 -J says why on stdout, and exits 1
            error = str(exc)
            time.sleep(1)
            continue
        report = json.loads(out)
        received = report.get("end", {}).get("sum_received")
        if received is None:
            error = str(report.get("error", out[-400:]))
            time.sleep(1)
            continue
        return round(float(received["bits_per_second"]) / 1e9, 2)
    raise RuntimeError(f"iperf3 to {host}:{port} failed 3 times: {error}")


def _rounds(
    bed: Bed,
    args: argparse.Namespace,
    counts: list[int],
    paths: dict[str, tuple[str, int]],
    each: dict[str, list[float]],
) -> None:
    for round_ in range(args.runs):
        for streams in counts:
            for reverse in (False, True):
                for path, (host, port) in paths.items():
                    key = f"{path} {streams} {'reverse' if reverse else 'forward'}"
                    rate = _iperf(bed, host, port, streams, reverse, args.seconds)
                    each.setdefault(key, []).append(rate)
                    print(f"round {round_ + 1} {key}: {rate} Gbit/s", flush=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    bed = Bed(args.prefix)
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp, bed.up():
        bed.start("home1", "iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT))
        bed.start("pub3", "iperf3", "-s", "-B", PLAIN_IP, "-p", str(PLAIN_PORT))
        relay_host, relay_port = _nodes(bed, Path(tmp)).rsplit(":", 1)
        paths = {"relay": (relay_host, int(relay_port)), "direct": (PLAIN_IP, PLAIN_PORT)}
        cipher, ssh_error = None, None
        if args.ssh:
            try:
                cipher = _ssh_reverse(bed, Path(tmp))
                paths["ssh"] = (RELAY_IP, SSH_FORWARD)
            except (SshUnavailable, OSError, subprocess.SubprocessError) as exc:
                ssh_error = str(exc)
        each: dict[str, list[float]] = {}
        try:
            _rounds(bed, args, counts, paths, each)
        except RuntimeError:
            kept = Path(tempfile.mkdtemp(prefix="relay_bed_logs."))
            for name in ("relay", "home"):
                shutil.copy(Path(tmp) / name / "node.log", kept / f"{name}.log")
            print(f"the node logs are kept in {kept}", file=sys.stderr)
            raise

    rows = []
    for streams in counts:
        for direction in ("forward", "reverse"):
            median = {
                path: round(statistics.median(each[f"{path} {streams} {direction}"]), 2)
                for path in paths
            }
            ssh = median.get("ssh")
            rows.append({
                "streams": streams, "direction": direction,
                "relay_gbit_s": median["relay"], "ssh_r_gbit_s": ssh,
                "direct_gbit_s": median["direct"],
                "relay_vs_ssh": round(median["relay"] / ssh, 2) if ssh else None,
                "relay_vs_direct": round(median["relay"] / median["direct"], 2),
            })  # fmt: skip
    return {
        "seconds": args.seconds,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "ssh_cipher": cipher,
        "ssh_error": ssh_error,
        "rows": rows,
        "each_run_gbit_s": each,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "target": "relay, one stream, at 0 ms: at least 3 Gbit/s in separate processes",
    }


def write_table(result: dict[str, Any], name: str) -> str:
    intro = [
        "# The relay between real nodes in the test bed (`bench/relay_bed.py`)",
        "",
        "iperf3 from pub2 to a NAT'd node's `map-port` on the relay node (pub1), each node its"
        f" own process; {result['seconds']} s per run, median of {result['runs']},"
        f" {result['cpus']} CPUs, ssh cipher {result['ssh_cipher']}. Gbit/s received."
        " forward: pub2 sends; reverse (`-R`): the NAT'd side sends.",
    ]
    header = ["streams", "direction", "p2prc relay", "`ssh -R`", "direct, no relay",
              "relay / ssh", "relay / direct"]  # fmt: skip
    rows = [
        (row["streams"], row["direction"], row["relay_gbit_s"], row["ssh_r_gbit_s"],
         row["direct_gbit_s"], row["relay_vs_ssh"], row["relay_vs_direct"])
        for row in result["rows"]
    ]  # fmt: skip
    notes = [f"ssh baseline not measured: {result['ssh_error']}"] if result["ssh_error"] else []
    return write_markdown(name, intro, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ssh", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--prefix", default="tk", help="the test bed's TB_PREFIX")
    parser.add_argument("--out", default="relay_bed", help="result name in bench/results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("relay_bed.py: needs root (network namespaces)")
    if shutil.which("iperf3") is None:
        sys.exit("relay_bed.py: needs iperf3 (apt-get install iperf3)")
    result = measure(args)
    write_result(args.out, result)
    print(write_table(result, args.out))


if __name__ == "__main__":
    main()
