"""The hostile soak in the namespace test bed: three honest nodes, one attacker.

It runs ``bench/hostile_soak.py`` briefly (the benchmark prints the figures; this checks
them): no honest node is ever falsely declared dead, a killed one is found dead by every
other honest node while the attack goes on, node memory stays bounded, every signed call
of the owner and of trusted peers succeeds, and nothing stored is lost.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT.parent / "shared" / "testbed" / "netns-nat.sh"


def test_honest_nodes_hold_under_a_hostile_flood(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    if not TESTBED.is_file():
        pytest.skip(f"no test bed at {TESTBED}")
    out = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "bench" / "hostile_soak.py"),
               "--quiet", "12", "--attack", "25", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT / "bench", capture_output=True, text=True,
                         timeout=400, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(out.read_text())
    summary = run.stdout[-2000:]
    assert result["false_deaths"] == [], summary
    # The benchmark reports the real figure (6 s is the goal); this bound is generous so a
    # busy CI machine does not fail it, yet "never" (None) or a starved detector does.
    assert all(v is not None and v < 15 for v in result["detect_attack_s"].values()), summary
    assert max(result["rss_max_mb"].values()) < 150, summary
    for watcher in result["calls_attack"].values():
        for who in ("owner", "peer"):
            assert watcher[who]["calls"] > 0
            assert watcher[who]["ok"] == watcher[who]["calls"], (who, watcher[who]["errors"])
    assert result["metadata_kept"], summary
    assert result["a_alive_on_b_after"], summary
    for stored in result["stored"].values():
        assert stored["all_honest_kept"], stored
        assert stored["record_version_sane"], stored
    assert result["attacker"]["sent"], "the attacker sent nothing"
