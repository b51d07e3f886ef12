"""``p2prc run`` refuses bad tasks with one line before it calls any node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2prc.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a command after '--', or a task.toml"),
        (["--nodes", "0", "--", "true"], "nodes"),
        (["--cpus", "-1", "--", "true"], "resources.cpus"),
        (["--memory", "lots", "--", "true"], "resources.memory"),
        (["--download", "/etc/passwd", "--", "true"], "outputs"),
        (["--download", "../up", "--", "true"], "outputs"),
        (["--env", "NOEQUALS", "--", "true"], "--env takes KEY=VALUE"),
        (["--env", "P2PRC_NODE_RANK=3", "--", "true"], "set by the job layer"),
        (["--time-limit", "soon", "--", "true"], "time_limit"),
        (["--upload", "/nonexistent-p2prc", "--", "true"], "no such directory"),
    ],
)
def test_bad_runs_fail_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    code, err = _run(capsys, "--home", str(tmp_path / "home"), "run", *args)
    assert code == 1
    assert err.startswith("InvalidRequest: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()  # no node was asked for anything


def test_an_upload_with_a_link_out_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "w").mkdir()
    os.symlink(Path.home(), tmp_path / "w" / "home")
    code, err = _run(
        capsys, "--home", str(tmp_path / "h"), "run", "--upload", str(tmp_path / "w"), "--", "ls"
    )
    assert code == 1
    assert "home links outside it" in err


def test_a_task_file_and_options_together_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    task = tmp_path / "task.toml"
    task.write_text('run = "true"\nbogus = 1\n')
    code, err = _run(capsys, "--home", str(tmp_path / "h"), "run", str(task))
    assert code == 1
    assert "bogus: unknown key" in err
    code, err = _run(capsys, "--home", str(tmp_path / "h"), "run", "--nodes", "2", str(task))
    assert code == 1
    assert "a task file or options, not both" in err
