"""Three honest nodes and one hostile node in the namespace test bed (root only).

The honest nodes run on their default host (0.0.0.0) on public hosts pub1-pub3 of the
shared test bed, trust each other, and gossip; the hostile node on pub4 is a stranger
that joins (membership is public) and then floods every port it can see for a bounded
time (``tests/hostile/attacker.py``: lying claims, thousands of self-signed members,
garbage and forged datagrams, huge bodies, untrusted signed calls, junk on the API and
relay ports). The same measurements are taken in a quiet phase first (the baseline):

- false deaths: an honest node that is up but seen ``dead`` by another honest node;
- death detection: one honest node is SIGKILLed in each phase, seconds until every
  other honest node sees it dead (it is restarted after the quiet phase's kill);
- RSS of every honest node process, sampled every 0.5 s;
- signed calls (the owner's own and a trusted peer's) every 0.25 s: success and latency;
- nothing stored lost: the metadata set before the attack, the peers in ``state.db``,
  and a ``record_version`` that is still a sane millisecond timestamp.

Usage (from ``bench/``)::

    sudo ../.venv/bin/python hostile_soak.py [--quiet 20] [--attack 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed" / "netns-nat.sh"
PREFIX = "p2s"
ENV = {**os.environ, "TB_PREFIX": PREFIX, "TB_PUBLIC": "4", "TB_SITES": "1"}
HONEST = {"a": ("pub1", "198.51.100.11"), "b": ("pub2", "198.51.100.12"),
          "c": ("pub3", "198.51.100.13")}  # fmt: skip
HOSTILE = ("pub4", "198.51.100.14")
PORT = 8088


def bed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(TESTBED), *args], env=ENV, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def in_ns(ns: str, *command: str, env: dict[str, str] | None = None) -> list[str]:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return ["ip", "netns", "exec", f"{PREFIX}-{ns}", "env", *extra, *command]


def cli(ns: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = in_ns(ns, sys.executable, "-m", "p2prc", *args, env={"P2PRC_HOME": str(home)})
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Honest:
    name: str
    ns: str
    ip: str
    home: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    up_intervals: list[list[float]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://{self.ip}:{PORT}"

    def start(self) -> None:
        # The default host (0.0.0.0): what a user's `p2prc start` does.
        command = in_ns(self.ns, sys.executable, "-m", "p2prc", "--debug", "start",
                        env={"P2PRC_HOME": str(self.home)})  # fmt: skip
        with (self.home / "node.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (self.home / "node.json").exists():
            time.sleep(0.1)
        self.up_intervals.append([time.time(), float("inf")])

    def kill(self) -> float:
        """SIGKILL the node (its `ip netns exec` wrapper execs into it); returns when."""
        assert self.process is not None
        pid = self.node_pid()
        now = time.time()
        if pid:
            os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=15)
        self.up_intervals[-1][1] = now
        (self.home / "node.json").unlink(missing_ok=True)
        return now

    def node_pid(self) -> int:
        try:
            return int(json.loads((self.home / "node.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return 0

    def up_at(self, moment: float, grace: float = 0.0) -> bool:
        return any(start + grace <= moment < end for start, end in self.up_intervals)


def _configure(nodes: dict[str, Honest]) -> None:
    keys = {n.name: (n.home / "identity" / "id_ed25519.pub").read_text().split()[:2]
            for n in nodes.values()}  # fmt: skip
    for node in nodes.values():
        others = [" ".join(keys[o]) for o in nodes if o != node.name]
        settings = {
            "gossip.lan_discovery": "false",
            "gossip.advertise": node.ip,
            "behind_nat": "false",
            "trust.allow": json.dumps(others),
            "relay.enabled": "true" if node.name == "a" else "false",
        }
        if node.name != "a":
            settings["bootstrap"] = f"{nodes['a'].ip}:{PORT}"
        for key, value in settings.items():
            result = cli(node.ns, node.home, "config", "set", key, value)
            if result.returncode != 0:
                raise SystemExit(f"config set {key} on {node.name}: {result.stderr}")


def _states(node: Honest) -> dict[str, str]:
    result = cli(node.ns, node.home, "--json", "peers", "list")
    if result.returncode != 0:
        return {}
    return {v["node_id"]: v["state"] for v in json.loads(result.stdout) if not v["me"]}


def _wait_converged(nodes: dict[str, Honest], timeout: float = 90) -> float:
    start = time.monotonic()
    ids = {n.node_id for n in nodes.values()}
    while time.monotonic() - start < timeout:
        if all(
            {i for i, s in _states(n).items() if s == "alive"} >= ids - {n.node_id}
            for n in nodes.values()
        ):
            return time.monotonic() - start
        time.sleep(1)
    raise SystemExit("honest nodes did not converge; see the node logs")


def _monitor(node: Honest, others: list[Honest], seconds: float) -> subprocess.Popen[bytes]:
    out = node.home / "monitor.json"
    command = in_ns(node.ns, sys.executable, str(ROOT / "bench" / "_soak_monitor.py"),
                    str(node.home), f"http://127.0.0.1:{PORT}", *(o.api for o in others),
                    "--duration", str(seconds), "--out", str(out))  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)


def _first_dead(timeline: list[dict[str, Any]], node_id: str, after: float) -> float | None:
    for entry in timeline:
        if entry["t"] >= after and entry["states"].get(node_id) == "dead":
            return float(entry["t"])
    return None


def _false_deaths(watchers: dict[str, Any], nodes: dict[str, Honest]) -> list[str]:
    """Moments an honest node was up (for more than 5 s) but seen dead."""
    found = []
    for who, data in watchers.items():
        previous: dict[str, str] = {}
        for entry in data["timeline"]:
            for node in nodes.values():
                state = entry["states"].get(node.node_id)
                newly = state == "dead" and previous.get(node.node_id) != "dead"
                if newly and node.up_at(entry["t"] - 1.0, grace=5.0):
                    found.append(f"{who} saw {node.name} dead at {entry['t']:.1f}")
            previous = entry["states"]
    return found


def _calls(
    data: dict[str, Any], start: float, end: float, nodes: dict[str, Honest]
) -> dict[str, Any]:
    """Signed calls between ``start`` and ``end`` to nodes that were up for the whole call
    (from 5 s after their start until its 5 s timeout)."""
    apis = {n.api: n for n in nodes.values()}

    def up(call: dict[str, Any]) -> bool:
        target = apis.get(call["to"])
        t = float(call["t"])
        return target is None or (target.up_at(t, grace=5.0) and target.up_at(t + 5.0))

    calls = [c for c in data["calls"] if start <= c["t"] < end and up(c)]
    result: dict[str, Any] = {}
    for who in ("owner", "peer"):
        mine = [c for c in calls if c["who"] == who]
        ok = [c["s"] for c in mine if c["ok"]]
        errors = sorted({c["error"] for c in mine if not c["ok"]})
        result[who] = {
            "calls": len(mine),
            "ok": len(ok),
            "p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
            "p99_ms": round(sorted(ok)[int(len(ok) * 0.99) - 1] * 1000, 1) if ok else None,
            "errors": errors[:5],
        }
    return result


def _stored(node: Honest, nodes: dict[str, Honest]) -> dict[str, Any]:
    with sqlite3.connect(f"file:{node.home / 'state.db'}?mode=ro", uri=True) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        stored_ids: set[str] = set()
        if "peers" in tables:
            stored_ids = {r[0] for r in db.execute("SELECT node_id FROM peers")}
        version = db.execute("SELECT value FROM meta WHERE key = 'record_version'").fetchone()
    others = {n.node_id for n in nodes.values() if n is not node}
    return {
        "peers_stored": len(stored_ids),
        "honest_peers_kept": sorted(n.name for n in nodes.values() if n.node_id in stored_ids),
        "all_honest_kept": others <= stored_ids,
        "record_version_sane": bool(version) and int(version[0]) < (time.time() + 3600) * 1000,
    }


def run_soak(quiet: float, attack: float, workdir: Path) -> dict[str, Any]:
    """The whole soak; the caller brings the test bed up and down."""
    nodes = {name: Honest(name, ns, ip, workdir / name) for name, (ns, ip) in HONEST.items()}
    for node in nodes.values():
        node.home.mkdir(parents=True)
        if cli(node.ns, node.home, "init").returncode != 0:
            raise SystemExit(f"init failed for {node.name}")
    _configure(nodes)
    for node in nodes.values():
        node.start()
        node.node_id = json.loads((node.home / "node.json").read_text())["node_id"]
    converge_s = _wait_converged(nodes)
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    marker = f"soak-{os.getpid()}"
    cli(a.ns, a.home, "meta", "set", marker)
    total = quiet + attack + 8
    monitors = [_monitor(a, [b, c], total), _monitor(b, [a, c], total)]
    rss: dict[str, int] = {n: 0 for n in nodes}
    t0 = time.time()
    events: dict[str, float] = {}
    attacker: subprocess.Popen[str] | None = None
    try:
        while time.time() - t0 < total:
            elapsed = time.time() - t0
            if "quiet_kill" not in events and elapsed >= quiet * 0.3:
                events["quiet_kill"] = c.kill()
            if "restart" not in events and elapsed >= quiet * 0.6:
                c.start()
                events["restart"] = time.time()
            if attacker is None and elapsed >= quiet:
                events["attack"] = time.time()
                targets = [f"{n.ip}:{PORT}" for n in nodes.values()]
                command = in_ns(HOSTILE[0], sys.executable, "-m", "tests.hostile.attacker",
                                "--duration", str(attack), "--own", HOSTILE[1],
                                *targets)  # fmt: skip
                attacker = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if "attack_kill" not in events and elapsed >= quiet + attack * 0.7:
                events["attack_kill"] = c.kill()
            for node in nodes.values():
                pid = node.node_pid()
                if pid:
                    with contextlib.suppress(psutil.Error):
                        rss[node.name] = max(rss[node.name], psutil.Process(pid).memory_info().rss)
            time.sleep(0.5)
        attack_report: dict[str, Any] = {}
        if attacker is not None:
            out, _ = attacker.communicate(timeout=60)
            attack_report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        for monitor in monitors:
            monitor.wait(timeout=60)
        watchers = {n: json.loads((nodes[n].home / "monitor.json").read_text()) for n in "ab"}
        after = _states(b)
        result = {
            "converge_s": round(converge_s, 1),
            "quiet_s": quiet,
            "attack_s": attack,
            "false_deaths": _false_deaths(watchers, nodes),
            "detect_quiet_s": _detections(watchers, c, events["quiet_kill"]),
            "detect_attack_s": _detections(watchers, c, events["attack_kill"]),
            "rss_max_mb": {n: round(v / 2**20, 1) for n, v in rss.items()},
            "calls_quiet": {w: _calls(d, t0, events["attack"], nodes) for w, d in watchers.items()},
            "calls_attack": {
                w: _calls(d, events["attack"], events["attack"] + attack, nodes)
                for w, d in watchers.items()
            },
            "members_seen_by_a": max(e["members"] for e in watchers["a"]["timeline"]),
            "metadata_kept": _metadata(b, a.node_id) == marker,
            "a_alive_on_b_after": after.get(a.node_id) == "alive",
            "stored": {n: _stored(nodes[n], nodes) for n in "ab"},
            "attacker": attack_report,
        }
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        for monitor in monitors:
            if monitor.poll() is None:
                monitor.kill()
        for node in nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    node.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
    return result


def _detections(watchers: dict[str, Any], victim: Honest, killed: float) -> dict[str, Any]:
    found = {}
    for who, data in watchers.items():
        seen = _first_dead(data["timeline"], victim.node_id, killed)
        found[who] = None if seen is None else round(seen - killed, 2)
    return found


def _metadata(node: Honest, about: str) -> str:
    result = cli(node.ns, node.home, "--json", "peers", "list")
    if result.returncode != 0:
        return ""
    views = {v["node_id"]: v for v in json.loads(result.stdout)}
    return str(views.get(about, {}).get("metadata", ""))


def logs(workdir: Path, lines: int = 30) -> str:
    parts = []
    for name in HONEST:
        log = workdir / name / "node.log"
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        parts.append(f"--- {name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def _table(result: dict[str, Any]) -> str:
    def worst(detect: dict[str, Any]) -> str:
        values = list(detect.values())
        return "never" if None in values else f"{max(values):.2f} s"

    quiet_calls, attack_calls = result["calls_quiet"]["a"], result["calls_attack"]["a"]
    rows = [
        ("false deaths", "0 (quiet)", str(len(result["false_deaths"]))),
        ("killed node dead everywhere", worst(result["detect_quiet_s"]),
         worst(result["detect_attack_s"])),
        ("max node RSS", "", f"{max(result['rss_max_mb'].values()):.1f} MB"),
        ("owner calls ok", f"{quiet_calls['owner']['ok']}/{quiet_calls['owner']['calls']}",
         f"{attack_calls['owner']['ok']}/{attack_calls['owner']['calls']}"),
        ("owner call p50", f"{quiet_calls['owner']['p50_ms']} ms",
         f"{attack_calls['owner']['p50_ms']} ms"),
        ("trusted-peer calls ok", f"{quiet_calls['peer']['ok']}/{quiet_calls['peer']['calls']}",
         f"{attack_calls['peer']['ok']}/{attack_calls['peer']['calls']}"),
        ("members seen by a", "", str(result["members_seen_by_a"])),
        ("metadata / peers kept", "", f"{result['metadata_kept']} / "
         f"{all(s['all_honest_kept'] for s in result['stored'].values())}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'quiet':>14}  {'under attack':>14}"]
    lines += [f"{name:{width}}  {q:>14}  {h:>14}" for name, q, h in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", type=float, default=20.0)
    parser.add_argument("--attack", type=float, default=40.0)
    default_out = ROOT / "bench" / "results" / "hostile_soak.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("needs root and iproute2 (network namespaces)")
    up = bed("up")
    if up.returncode != 0:
        raise SystemExit(f"test bed did not come up: {up.stderr[-500:]}")
    workdir = Path(tempfile.mkdtemp(prefix="p2prc-soak-"))
    try:
        result = run_soak(min(args.quiet, 300), min(args.attack, 600), workdir)
    except BaseException:
        print(logs(workdir), file=sys.stderr)
        raise
    finally:
        bed("down")
    print(_table(result))
    if result["false_deaths"]:
        print("\n".join(result["false_deaths"]))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
