"""Attached hosts (#16) in the namespace test bed (root only): ``p2prc ssh`` against plain
``ssh -J`` over the same hops, scp throughput, and gateway failover.

The bed is the test's (``tests/netns/_attach_bed.py``): a board on home1's LAN that runs
only OpenSSH, two gateway nodes beside it behind the NAT router, a relay on pub1, the
client on pub2. p2prc's path: pub2 -> relay -> the gateway's tunnel -> its attach listener
(TLS, signed handshake) -> the board's sshd; SSH end to end. The baseline's path: pub2 ->
relay -> the first gateway's tunnel (its ``p2prc map-port`` of a jump sshd on home1's
loopback) -> the jump sshd -> the board's sshd: ``ssh -J`` (spelled as its ProxyCommand
``ssh -W``, so scp takes it too), SSH inside SSH. Both pin both host keys and log in with
the client node's key; every command runs in pub2's namespace from a fresh process.

- latency: ``p2prc ssh morello -- true`` against ``ssh -J ... true``, interleaved, medians;
  besides, one ``p2prc status`` (a CLI process and one API call: ``p2prc ssh`` makes two).
- scp of ``--mib`` MiB of random bytes to the board, both ways interleaved (the board
  writes to the same disk the client reads from, the same for both).
- failover: SIGKILL the gateway the last session came through (the board's sshd log
  names its LAN address), then ``p2prc ssh -- true`` until one succeeds: seconds from the
  kill to that success; the gateway is restarted and seen again between rounds.

Usage (from ``bench/``)::

    sudo ../.venv/bin/python attach.py [--runs 15] [--mib 256] [--scp-runs 3] [--failovers 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns._attach_bed import BOARD, BOARD_IP, GATEWAYS, AttachBed  # noqa: E402

Done = subprocess.CompletedProcess[str]


def _timed(command: list[str], timeout: float = 120) -> tuple[float, Done]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    return time.perf_counter() - start, done


def _must(done: Done, what: str) -> None:
    if done.returncode != 0:
        tail = done.stderr[-2000:]
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{tail}")


def _p2prc(bed: AttachBed, *args: str) -> list[str]:
    home = bed.homes["client"]
    return bed.bed.command("pub2", sys.executable, "-m", "p2prc", *args, home=home)


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "runs": len(ordered),
    }


def latency(bed: AttachBed, runs: int) -> dict[str, Any]:
    p2prc_ssh = _p2prc(bed, "ssh", BOARD, "--", "true")
    jump = bed.jump_command("true")
    status = _p2prc(bed, "status")
    for command, what in ((p2prc_ssh, "p2prc ssh"), (jump, "ssh -J"), (status, "p2prc status")):
        _must(_timed(command)[1], what)  # warm-up: caches, first connections
    times: dict[str, list[float]] = {"p2prc_ssh": [], "ssh_j": [], "p2prc_status": []}
    for _ in range(runs):
        for key, command in (("p2prc_ssh", p2prc_ssh), ("ssh_j", jump), ("p2prc_status", status)):
            took, done = _timed(command)
            _must(done, key)
            times[key].append(took)
    result: dict[str, Any] = {key: _summary(values) for key, values in times.items()}
    result["ratio_median"] = round(result["p2prc_ssh"]["median"] / result["ssh_j"]["median"], 2)
    return result


def scp(bed: AttachBed, mib: int, runs: int) -> dict[str, Any]:
    blob = bed.root / "blob.bin"
    with blob.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    [block] = bed.json("client", "ssh", "--config", BOARD, check=True)
    config = bed.root / "bench_ssh_config"
    config.write_text(block["config"])
    target = bed.root / "received.bin"
    p2prc = ["-F", str(config), "-o", "BatchMode=yes", str(blob), f"{BOARD}:{target}"]
    jump = [*bed.jump_options(), str(blob), f"root@{BOARD_IP}:{target}"]
    commands = {
        "p2prc": bed.bed.command("pub2", "scp", "-q", *p2prc),
        "ssh_j": bed.bed.command("pub2", "scp", "-q", *jump),
    }
    rates: dict[str, list[float]] = {key: [] for key in commands}
    for _ in range(runs):
        for key, command in commands.items():
            target.unlink(missing_ok=True)
            took, done = _timed(command, timeout=600)
            _must(done, f"scp via {key}")
            if hashlib.sha256(target.read_bytes()).hexdigest() != digest:
                raise RuntimeError(f"scp via {key}: the board got other bytes")
            rates[key].append(mib * 8 * 1.048576 / took)  # Mbit/s
    target.unlink(missing_ok=True)
    blob.unlink()
    result: dict[str, Any] = {key: _summary(values) for key, values in rates.items()}
    result["mib"] = mib
    result["ratio_median"] = round(result["p2prc"]["median"] / result["ssh_j"]["median"], 2)
    return result


def failover(bed: AttachBed, rounds: int) -> dict[str, Any]:
    ips = {ip: name for name, (_, ip) in GATEWAYS.items()}
    rows: list[dict[str, Any]] = []
    command = _p2prc(bed, "ssh", BOARD, "--", "true")
    for _ in range(rounds):
        _must(_timed(command)[1], "p2prc ssh before the kill")
        used = ips[bed.board.logins()[-1]]
        logins = len(bed.board.logins())
        killed = time.perf_counter()
        bed.kill_node(used)
        attempts, failures = 0, []
        while True:
            attempts += 1
            _, done = _timed(command, timeout=60)
            if done.returncode == 0:
                break
            failures.append(done.stderr.strip()[-300:])
            if attempts >= 30:
                raise RuntimeError(f"no session after killing {used}: {failures[-3:]}")
        seconds = time.perf_counter() - killed
        by = ips[bed.board.logins()[logins:][-1]]
        rows.append({"killed": used, "next_session_via": by, "seconds": round(seconds, 3),
                     "attempts": attempts, "failed_attempts": failures})  # fmt: skip
        # Back up, seen by the client with both gateways again, for the next round.
        bed.start_node(used)
        bed.wait_routes(set(GATEWAYS), seconds=120)
        _wait_alive(bed, used)
    return {"rounds": rows, "seconds": _summary([float(row["seconds"]) for row in rows])}


def _wait_alive(bed: AttachBed, name: str, seconds: float = 120) -> None:
    """Until the client's view of the board has gateway ``name`` alive again, at the
    endpoint that gateway itself now publishes (its relay port is new after a restart)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        own = {g["name"]: g["endpoint"] for h in bed.json(name, "attached") or []
               if h.get("name") == BOARD for g in h.get("gateways", [])}  # fmt: skip
        for host in bed.json("client", "attached") or []:
            seen = {g["name"]: g for g in host.get("gateways", [])}
            if host.get("name") != BOARD or name not in seen or not own.get(name):
                continue
            if seen[name]["state"] == "alive" and seen[name]["endpoint"] == own[name]:
                return
        time.sleep(1)
    raise RuntimeError(f"{name} did not come back in the client's view\n{bed.logs()}")


def render(result: dict[str, Any]) -> str:
    lat, copy, fail = result["latency"], result["scp"], result["failover"]
    lines = [
        "# Attached hosts (`bench/attach.py`)",
        "",
        "Namespace test bed: the board (only OpenSSH) and two gateway nodes behind one NAT "
        f"router, a relay on pub1, the client on pub2; {result['cpus']} CPUs shared by every "
        f"process (1-minute load {result['load_1min'][0]} at the start, "
        f"{result['load_1min'][1]} at the end).",
        "Both paths cross the same hops: pub2 -> relay -> a gateway's tunnel -> home1 -> "
        "the board. `ssh -J`: a jump sshd on home1's loopback published through the same "
        "relay by `p2prc map-port`. Every command is a fresh process in pub2's namespace.",
        "",
        f"## Latency ({lat['p2prc_ssh']['runs']} interleaved runs, seconds)",
        "",
        "| command | median | min | max |",
        "|---|---|---|---|",
    ]
    labels = {
        "p2prc_ssh": "`p2prc ssh morello -- true`",
        "ssh_j": "`ssh -J jump root@board true`",
        "p2prc_status": "`p2prc status` (one CLI process + one API call)",
    }
    for key, label in labels.items():
        row = lat[key]
        lines.append(f"| {label} | {row['median']} | {row['min']} | {row['max']} |")
    lines += [
        "",
        f"p2prc ssh / ssh -J (medians): **{lat['ratio_median']}**",
        "",
        f"## scp of {copy['mib']} MiB to the board "
        f"({copy['p2prc']['runs']} interleaved runs, Mbit/s)",
        "",
        "| path | median | min | max |",
        "|---|---|---|---|",
        f"| scp through p2prc (`ssh --config` block) | {copy['p2prc']['median']:.1f} | "
        f"{copy['p2prc']['min']:.1f} | {copy['p2prc']['max']:.1f} |",
        f"| scp through `ssh -J` | {copy['ssh_j']['median']:.1f} | {copy['ssh_j']['min']:.1f} "
        f"| {copy['ssh_j']['max']:.1f} |",
        "",
        f"p2prc / ssh -J (medians): **{copy['ratio_median']}**",
        "",
        "## Failover: SIGKILL the gateway in use -> next successful `p2prc ssh`",
        "",
        "| round | killed | next session via | seconds | attempts |",
        "|---|---|---|---|---|",
    ]
    for number, row in enumerate(fail["rounds"], 1):
        lines.append(f"| {number} | {row['killed']} | {row['next_session_via']} | "
                     f"{row['seconds']} | {row['attempts']} |")  # fmt: skip
    lines += ["", f"median {fail['seconds']['median']} s, max {fail['seconds']['max']} s", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--scp-runs", type=int, default=3)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--out", default="attach")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("attach.py needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-attach-") as tmp:
        bed = AttachBed(Path(tmp), prefix="tab")
        with bed.running():
            bed.start_jump()
            load_before = os.getloadavg()[0]
            result: dict[str, Any] = {
                "latency": latency(bed, args.runs),
                "scp": scp(bed, args.mib, args.scp_runs),
                "failover": failover(bed, args.failovers),
                "cpus": os.cpu_count(),
                "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "baseline": "ssh -J through a jump sshd on home1, published through the "
                "same relay by p2prc map-port (same hops)",
            }
    write_result(args.out, result)
    text = render(result)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
