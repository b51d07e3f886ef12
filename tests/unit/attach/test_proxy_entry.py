"""``python -m p2prc.attach``: the ProxyCommand's light entry point, as ssh runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2prc.attach", "--home", str(home), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "P2PRC_HOME": str(home)}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_without_a_node_it_says_so_in_one_line(tmp_path: Path) -> None:
    from p2prc.config import Home
    from p2prc.node import init_home

    init_home(Home(tmp_path))
    result = _run("board", home=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("NodeNotRunning:")


def test_a_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    result = _run("board", "--port", "70000", home=tmp_path)
    assert result.returncode == 2
    assert "--port must be 1-65535" in result.stderr


def test_it_loads_no_api_server_and_no_cli() -> None:
    code = (
        "import sys, p2prc.attach.__main__; "
        "print(sorted({'fastapi', 'uvicorn', 'docker', 'typer', 'p2prc.node'} & {*sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
