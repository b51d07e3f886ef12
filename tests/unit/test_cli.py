"""The CLI in-process: output, --json, exit codes and one-line errors."""

import json
from pathlib import Path

import pytest

from p2prc.cli import _normalise_legacy, main
from p2prc.config import Home, load


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home_args(tmp_path: Path) -> list[str]:
    return ["--home", str(tmp_path / "home")]


def test_init_json(capsys: pytest.CaptureFixture[str], home_args: list[str]) -> None:
    code, out, _ = run(capsys, *home_args, "--json", "init")
    assert code == 0
    first = json.loads(out)
    code, out, _ = run(capsys, *home_args, "--json", "init")
    assert json.loads(out)["node_id"] == first["node_id"]


def test_config_set_and_show(capsys: pytest.CaptureFixture[str], home_args: list[str]) -> None:
    assert run(capsys, *home_args, "config", "set", "port", "9100")[0] == 0
    code, out, _ = run(capsys, *home_args, "--json", "config", "show")
    assert code == 0
    assert json.loads(out)["port"] == 9100
    code, out, _ = run(capsys, *home_args, "--vc")
    assert "port = 9100" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["config", "set", "port", "0"], "ConfigError: port:"),
        (["config", "set", "port", "70000"], "ConfigError: port:"),
        (["config", "set", "nonsense", "1"], "ConfigError: unknown key 'nonsense'"),
        (["config", "import", "/does/not/exist.json"], "ConfigError: cannot read"),
        (["status"], "NodeNotRunning: no node is running"),
        (["stop"], "NodeNotRunning: no node is running"),
        (["specs", "127.0.0.1:1"], "PeerUnreachable: http://127.0.0.1:1"),
        (["specs", "bad host:port"], "PeerUnreachable:"),
    ],
)
def test_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], home_args: list[str], args: list[str], message: str
) -> None:
    code, _, err = run(capsys, *home_args, *args)
    assert code == 1
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_value_keeps_config(
    capsys: pytest.CaptureFixture[str], home_args: list[str], tmp_path: Path
) -> None:
    run(capsys, *home_args, "init")
    before = load(Home(tmp_path / "home"))
    run(capsys, *home_args, "config", "set", "port", "70000")
    assert load(Home(tmp_path / "home")) == before


def test_debug_shows_traceback(capsys: pytest.CaptureFixture[str], home_args: list[str]) -> None:
    from p2prc.errors import NodeNotRunning

    with pytest.raises(NodeNotRunning):
        main([*home_args, "--debug", "status"])


def test_specs_without_node_reads_this_machine(
    capsys: pytest.CaptureFixture[str], home_args: list[str]
) -> None:
    code, out, _ = run(capsys, *home_args, "--json", "specs")
    assert code == 0
    data = json.loads(out)
    assert {"cpu", "memory", "gpus"} <= set(data)


def test_interfaces_and_legacy_ni(capsys: pytest.CaptureFixture[str], home_args: list[str]) -> None:
    code, out, _ = run(capsys, *home_args, "--json", "interfaces")
    assert code == 0
    assert any(row["address"] == "127.0.0.1" for row in json.loads(out))
    code, out, _ = run(capsys, *home_args, "-ni")
    assert code == 0
    assert "127.0.0.1" in out


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "no-such-command")
    assert code == 2
    assert "No such command" in err


def test_legacy_single_dash_flags() -> None:
    assert _normalise_legacy(["-specs", "1.2.3.4:8088", "-s", "-ls"]) == [
        "--specs",
        "1.2.3.4:8088",
        "-s",
        "--ls",
    ]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--json", "--version")
    assert code == 0
    assert json.loads(out)["version"]


def test_images_bootstrap_dask_refuses_extra_packages(
    capsys: pytest.CaptureFixture[str], home_args: list[str]
) -> None:
    code, _, err = run(
        capsys,
        *home_args,
        "images",
        "bootstrap",
        "--dask",
        "--packages",
        "povray",
        "--tag",
        "x/y:1",
    )
    assert code != 0
    assert "--dask builds on the default image" in err
