"""The original flags as one translation table, and global options after any subcommand."""

import json
from pathlib import Path
from typing import Any

import pytest
import typer

from p2prc.cli import app
from p2prc.cli._legacy import LEGACY, move_globals, normalise, translate
from p2prc.errors import InvalidRequest

from .test_cli import run


@pytest.mark.parametrize(
    ("original", "modern"),
    [
        (["-s"], ["start"]),
        (["--ls"], ["peers", "list"]),
        (["-ls"], ["peers", "list"]),
        (["--ListServers"], ["peers", "list"]),
        (["--specs", "1.2.3.4:8088"], ["specs", "1.2.3.4:8088"]),
        (["--as", "10.0.0.2", "-p", "8088"], ["peers", "add", "10.0.0.2:8088"]),
        (["--arn", "--ip", "10.0.0.2", "-p", "8088"], ["peers", "add", "10.0.0.2:8088"]),
        (
            ["--touch", "10.0.0.2:8088", "-p", "2", "--gpu", "--cn", "x", "--bi", "img"],
            [
                "container",
                "create",
                "10.0.0.2:8088",
                "--ports",
                "2",
                "--name",
                "x",
                "--image",
                "img",
                "--gpu",
            ],
        ),
        (["--rm", "10.0.0.2:8088", "--id", "abc"], ["container", "rm", "abc"]),
        (["--group", "grp1"], ["group", "show", "grp1"]),
        (["--group", "grp1", "--id", "c1"], ["group", "add", "grp1", "c1"]),
        (["--group", "grp1", "--id", "c1", "--rmcgroup"], ["group", "rm", "grp1", "c1"]),
        (["--plugin", "http-share", "--id", "c1"], ["plugin", "run", "http-share", "c1"]),
        (
            ["--mp", "8000", "--dn", "a.example", "--ra", "bob", "--udp"],
            ["map-port", "8000", "--domain", "a.example", "--remote", "bob", "--udp"],
        ),
        (["--gen", "app", "--mod", "app_mod"], ["generate", "app", "--module", "app_mod"]),
        (["--json", "--tc"], ["--json", "container", "list"]),
        (["--tc", "--json"], ["--json", "container", "list"]),
        (["--amd=hello"], ["meta", "set", "hello"]),
    ],
)
def test_original_flags_become_modern_commands(original: list[str], modern: list[str]) -> None:
    assert translate(original) == modern


@pytest.mark.parametrize(
    ("original", "message"),
    [
        (["--rm", "10.0.0.2:8088"], "provide the container id with --id"),
        (["--plugin", "http-share"], "provide the container or group id with --id"),
        (["--arn", "--ip", "10.0.0.2"], "--arn needs --ip IP and -p PORT"),
        (["--ls", "--tc"], "one original command at a time"),
        (["--cn", "x"], "only changes another original flag"),
        (["--touch"], "--touch needs ADDR"),
        (["--ls", "nonsense"], "unexpected 'nonsense'"),
    ],
)
def test_bad_original_flags_are_one_clear_error(original: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        translate(original)


def test_modern_commands_pass_through() -> None:
    argv = ["container", "create", "bob", "-p", "2", "--gpu"]
    assert translate(argv) == argv
    assert translate(["container", "ssh", "c1", "--", "ls", "--json"]) == [
        "container", "ssh", "c1", "--", "ls", "--json",
    ]  # fmt: skip
    assert move_globals(["status", "--home", "/h", "--json"]) == [
        "--home",
        "/h",
        "--json",
        "status",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--", "ls", "-ls"],
        ["run", "--nodes", "2", "--", "sh", "-s"],
        ["container", "ssh", "c1", "--", "tool", "-gpu", "-ls", "--ls"],
        ["run", "--", "-ls"],
    ],
)
def test_what_follows_a_double_dash_reaches_the_command_untouched(argv: list[str]) -> None:
    assert normalise(argv) == argv
    assert translate(argv) == argv


def test_original_flags_before_a_double_dash_are_still_rewritten() -> None:
    assert normalise(["-ls", "--", "-ls"]) == ["--ls", "--", "-ls"]


def test_help_hides_the_original_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "Legacy" not in out
    assert "--touch" not in out
    assert len(out.splitlines()) < 60


def test_help_legacy_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--json", "help", "legacy")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == len(LEGACY)
    assert any(row["flag"].startswith("--touch") for row in rows)
    code, out, _ = run(capsys, "help", "legacy")
    assert "container create ADDR" in out


def _leaves(command: Any, path: list[str]) -> list[list[str]]:
    commands = getattr(command, "commands", None)
    if commands:
        found = []
        for name, sub in commands.items():
            found += _leaves(sub, [*path, name])
        return found
    return [path]


def test_every_command_takes_the_global_options_after_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    leaves = _leaves(typer.main.get_command(app), [])
    assert len(leaves) > 30
    for path in leaves:
        code, _, err = run(capsys, *path, "--json", "--debug", "--home", str(tmp_path), "--help")
        assert code == 0, (path, err)


def test_global_options_after_the_subcommand_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    code, out, _ = run(capsys, "init", "--home", home, "--json")
    assert code == 0
    assert json.loads(out)["node_id"]
    code, out, _ = run(capsys, "config", "show", "--json", "--home", home)
    assert code == 0
    assert "trust" in json.loads(out)
    code, _, err = run(capsys, "status", "--json", "--home", home)
    assert code == 1
    assert err.startswith("NodeNotRunning:")
