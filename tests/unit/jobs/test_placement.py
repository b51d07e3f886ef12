"""Placement from the signed table, and the rank script's quoting."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from p2prc.jobs.placement import candidates, order_for_rank
from p2prc.jobs.remote import job_script
from p2prc.jobs.task import parse_task
from p2prc.peers.records import PeerRecord
from p2prc.peers.table import Member


def _member(
    name: str, rtt: float | None, cores: int = 8, memory: int = 8 << 30, gpus: int = 0
) -> Member:
    record = PeerRecord(
        node_id=name * 32 if len(name) == 1 else name,
        public_key=b"",
        name=name,
        version=1,
        cores=cores,
        memory=memory,
        gpus=gpus,
    )
    return Member(record=record, rtt_ms=rtt)


def test_fit_then_nearest_first() -> None:
    members = [
        _member("a", 30.0),
        _member("b", 5.0),
        _member("c", None),
        _member("d", 1.0, cores=1),
        _member("e", 1.0, gpus=0),
        _member("f", 2.0, memory=1 << 30),
        _member("m", 0.1),
    ]
    task = parse_task({"run": "x", "resources": {"cpus": 2, "memory": "2GiB"}})
    found, unfit = candidates(task, members, me="m" * 32)
    assert [c.name for c in found] == ["e", "b", "a", "c"]
    assert unfit == ["d: 1 cores < 2", f"f: {1 << 30} bytes of memory < {2 << 30}"]
    gpu_task = parse_task({"run": "x", "resources": {"gpus": 1}})
    assert candidates(gpu_task, members, me="")[0] == []


def test_ranks_spread_over_the_peers() -> None:
    found, _ = candidates(parse_task({"run": "x"}), [_member("a", 1.0), _member("b", 2.0)], "")
    assert [c.name for c in order_for_rank(found, 0)] == ["a", "b"]
    assert [c.name for c in order_for_rank(found, 1)] == ["b", "a"]
    assert [c.name for c in order_for_rank(found, 2)] == ["a", "b"]
    assert order_for_rank([], 0) == []


def test_the_script_quotes_every_value_and_keeps_the_commands(tmp_path: Path) -> None:
    task = parse_task(
        {
            "setup": "echo setup > s.txt",
            "run": ["printf", "%s|", "$(id)", "it's"],
            "env": {"EVIL": "'; touch /tmp/p2prc-pwned; echo '"},
        }
    )
    script = job_script(task, {"P2PRC_NODE_ADDRS": "a:1\nb:2"})
    assert "export EVIL=" + shlex.quote("'; touch /tmp/p2prc-pwned; echo '") in script
    assert "sh -c 'echo setup > s.txt' || exit $?" in script
    body = script.split("\n", 1)[1]  # without the cd into ~/work
    result = subprocess.run(
        ["sh", "-c", body], capture_output=True, text=True, check=False, cwd=tmp_path
    )  # fmt: skip
    assert result.stdout == "$(id)|it's|"
    assert (tmp_path / "s.txt").read_text() == "setup\n"
