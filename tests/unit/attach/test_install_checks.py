"""install-node's checks before it touches a machine: arguments, the probe's answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2prc.config import Home
from p2prc.errors import InvalidRequest, NodeNotRunning
from p2prc.install.probe import PROBE, parse_probe, parse_version
from p2prc.install.remote import InstallRequest, _checked, install_node, parse_destination


def test_destinations_are_user_at_host_checked() -> None:
    assert parse_destination("root@192.168.0.10") == ("root", "192.168.0.10")
    assert parse_destination("pi@[fe80::1]") == ("pi", "fe80::1")
    assert parse_destination("me@board.lan") == ("me", "board.lan")
    assert parse_destination("board")[1] == "board"
    for bad in ("root@-oProxyCommand=x", "root@host;id", "ro ot@host", "root@", "$(id)@h", "a@b c"):
        with pytest.raises(InvalidRequest):
            parse_destination(bad)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("directory", "~/a b", "--dir"),
        ("directory", "/tmp/../etc", "--dir"),
        ("directory", "~/x;id", "--dir"),
        ("directory", "$HOME/x", "--dir"),
        ("name", "-bad", "--name"),
        ("name", "a" * 64, "--name"),
        ("python", "-c", "--python"),
        ("python", "python3 -c x", "--python"),
        ("listen", "0.0.0.0; id", "--listen"),
        ("port", 70000, "--port"),
        ("ssh_port", 0, "--ssh-port"),
    ],
)
def test_bad_arguments_are_refused_before_any_contact(
    field: str, value: object, message: str
) -> None:
    request = InstallRequest(destination="root@127.0.0.1")
    setattr(request, field, value)
    with pytest.raises(InvalidRequest, match=message):
        _checked(request)


async def test_no_local_node_means_no_contact(tmp_path: Path) -> None:
    said: list[str] = []
    request = InstallRequest(destination="root@192.0.2.1")  # TEST-NET: never dialled
    with pytest.raises(NodeNotRunning):
        await install_node(request, Home(tmp_path / "home"), said.append)
    assert said == []
    assert not (tmp_path / "home" / "known_hosts").exists()


def test_versions_parse_from_python_version_output() -> None:
    assert parse_version("Python 3.11.2\n") == (3, 11)
    assert parse_version("Python 3.9.2") == (3, 9)
    assert parse_version("sh: python3: not found") is None
    assert parse_version("x" * 10_000 + "Python 3.12.0") is None, "only the start is read"


def test_the_probe_runs_here_and_parses(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    result = subprocess.run(
        [sys.executable, "-I", "-", str(target)], input=PROBE, capture_output=True, text=True,
        timeout=30, check=True,
    )  # fmt: skip
    probe = parse_probe(result.stdout)
    assert probe.directory == str(target)
    assert (probe.exists, probe.installed) == (False, False)
    assert probe.free > 0
    assert probe.raw["markers"]["python_version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_a_bad_probe_answer_is_refused() -> None:
    good = {
        "dir": "/srv/p2prc", "dir_exists": False, "installed": False, "free": 10**9,
        "venv": True, "venv_why": "", "systemd": False, "home": "/root",
    }  # fmt: skip
    assert parse_probe("motd line\n" + json.dumps(good)).directory == "/srv/p2prc"
    for bad in (
        "",
        "not json at all",
        json.dumps([1, 2]),
        "{not json",
        json.dumps({**good, "dir": "relative/path"}),
        json.dumps({**good, "dir": "/a\nb"}),
        json.dumps({**good, "free": True}),
        json.dumps({**good, "venv": "yes"}),
        json.dumps({**good, "home": "x" * 5000}),
        "{" + " " * 20_000 + "}",
    ):
        with pytest.raises(ValueError, match="probe"):
            parse_probe(bad)


def test_the_supervisor_signals_only_its_own_pid(tmp_path: Path) -> None:
    """A pid file naming another process (a stale or planted one) is never signalled."""
    from p2prc.install import supervise

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / supervise.PID_FILE).write_text(f"{sleeper.pid}\n")
        assert supervise.main(["stop", str(tmp_path)]) == 0
        assert supervise.main(["status", str(tmp_path)]) == 1
        assert sleeper.poll() is None, "not signalled"
        (tmp_path / supervise.PID_FILE).write_text("not a pid\n")
        assert supervise.main(["stop", str(tmp_path)]) == 0
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert supervise.main(["restart", str(tmp_path)]) == 2


def test_everything_missing_is_said_at_once_with_attach_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2prc.errors import InstallFailed
    from p2prc.install import remote
    from p2prc.install.probe import Probe
    from p2prc.install.wheels import WheelPlan

    raw = {
        "version": "3.12.1", "implementation": "cpython", "abiflags": "", "machine": "aarch64",
        "libc": "glibc", "libc_version": "2.31", "markers": {"python_version": "3.12"},
    }  # fmt: skip
    probe = Probe(raw, "/home/cheri/.p2prc-node", False, False, 50 * 2**20, False,
                  "ModuleNotFoundError('ensurepip')", False, "/home/cheri")  # fmt: skip
    plan = WheelPlan(missing=["pydantic-core 2.50.5 (here: cp311-...): no wheel that fits"])
    monkeypatch.setattr(remote, "plan_wheels", lambda *args, **kwargs: plan)
    request = InstallRequest(destination="cheri@192.168.0.10")
    with pytest.raises(InstallFailed) as refused:
        remote._plan(probe, request, "192.168.0.10", "cheri")
    text = str(refused.value)
    assert text.startswith("192.168.0.10 cannot run a p2prc node: Python's venv/ensurepip")
    assert "apt install python3-venv" in text
    assert "pydantic-core 2.50.5" in text
    assert "disk: 50 MiB free for /home/cheri/.p2prc-node, needs 400 MiB" in text
    assert "--python-version 3.12 --platform manylinux_2_31_aarch64" in text
    assert text.endswith("p2prc attach 192-168-0-10 --host 192.168.0.10 --user cheri")
