"""``p2prc install-node`` onto a real sshd on loopback, with a real venv and a real node there.

The "remote machine" is this one reached as root through its own sshd (keys only, on a free
port): its login PATH finds Debian's /usr/bin/python3 (3.11 with venv), as a stock machine's
would. No user systemd here, so ``--start`` runs the node under the supervisor.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests._sshd import Sshd
from tests.integration.conftest import NodeProcess, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd"),
    pytest.mark.skipif(os.geteuid() != 0, reason="logs in as root through its own sshd"),
]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Sshd, Path]]:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    with Sshd(extra_config="Subsystem sftp internal-sftp") as server:
        server.authorize(key.with_suffix(".pub").read_text())
        yield server, key


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "xdg-cache"


def cli(
    home: Path, cache: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    # HOME: this user's own ~/.ssh stays out of it (a test writes its known_hosts).
    env = {
        **os.environ, "P2PRC_HOME": str(home), "XDG_CACHE_HOME": str(cache),
        "HOME": str(cache.parent / "user-home"),
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "p2prc", "--json", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def remote_cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(directory / "venv/bin/python"), "-m", "p2prc", "--home", str(directory / "home")]
    return subprocess.run(
        [*command, "--json", *args], capture_output=True, text=True, timeout=60, check=False
    )


def ssh_args(server: Sshd, key: Path) -> list[str]:
    return ["root@127.0.0.1", "--ssh-port", str(server.port), "-i", str(key)]


@pytest.mark.timeout(600)
def test_install_start_join_restart_and_stop(
    sshd: tuple[Sshd, Path], node_factory: object, tmp_path: Path, cache: Path
) -> None:
    server, key = sshd
    assert callable(node_factory)
    local: NodeProcess = node_factory("local")
    target = tmp_path / "remote" / "node"
    api_port = free_port()
    started = time.monotonic()
    result = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--port", str(api_port), "--name", "far", "--listen", "127.0.0.1", "--start",
        timeout=540,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    print(f"install-node took {took:.1f} s")
    node = json.loads(result.stdout.splitlines()[-1])
    assert node["name"] == "far"
    assert node["service"] == "supervised"
    assert node["api"] == f"http://127.0.0.1:{api_port}"
    assert node["joined"] == json.loads(cli(local.home, cache, "id").stdout)["name"]
    assert "first contact with 127.0.0.1: host key SHA256:" in result.stderr
    known = (local.home / "known_hosts").read_text()
    assert f"[127.0.0.1]:{server.port} {server.host_key}" in known
    assert not (target / "wheels").exists(), "the wheels are removed after pip install"

    # Joined: in the local node's table, trusted both ways.
    peers = json.loads(cli(local.home, cache, "peers", "list").stdout)
    assert node["node_id"] in json.dumps(peers)
    mine = json.loads(cli(local.home, cache, "trust", "list").stdout)
    assert [entry["node_id"] for entry in mine] == [node["node_id"]]
    theirs = json.loads(remote_cli(target, "trust", "list").stdout)
    assert [entry["node_id"] for entry in theirs] == [local.node_id]

    # Supervised: the node comes back after it is killed, with the same pid recorded.
    pid = int((target / "home" / "supervisor.pid").read_text())
    assert pid == node["pid"]
    supervisor = psutil.Process(pid)
    assert "p2prc.install.supervise" in " ".join(supervisor.cmdline())
    first = supervisor.children()[0]
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=15)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = remote_cli(target, "status")
        if answer.returncode == 0 and supervisor.children():
            break
        time.sleep(0.5)
    assert answer.returncode == 0, answer.stderr
    assert supervisor.children()[0].pid != first.pid

    # Reinstall keeps the node's identity; --stop stops it by its recorded pid.
    stopped = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target), "--stop"
    )
    assert stopped.returncode == 0, stopped.stderr
    supervisor.wait(timeout=30)
    assert not (target / "home" / "supervisor.pid").exists()
    assert remote_cli(target, "status").returncode != 0
    assert json.loads(remote_cli(target, "id").stdout)["node_id"] == node["node_id"]

    # Again without --start: the venv is replaced, the node's home (its identity) kept; it
    # runs only to join, then stops.
    again = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--port", str(api_port), "--listen", "127.0.0.1", timeout=540,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert (second["node_id"], second["name"]) == (node["node_id"], "far")
    assert (second["service"], second["pid"]) == ("stopped", None)
    assert "first contact" not in again.stderr, "the pinned key was found"
    assert not (target / "home" / "supervisor.pid").exists()
    assert remote_cli(target, "status").returncode != 0


def test_a_failed_install_removes_what_it_made(
    sshd: tuple[Sshd, Path], node_factory: object, tmp_path: Path, cache: Path
) -> None:
    server, key = sshd
    assert callable(node_factory)
    local: NodeProcess = node_factory("local")
    broken = tmp_path / "wheels"
    broken.mkdir()
    version = metadata.version("msgpack")
    tag = "cp311-cp311-manylinux_2_17_x86_64"  # fits Debian 12's Python: chosen, then fails
    (broken / f"msgpack-{version}-{tag}.whl").write_bytes(b"not a zip")
    target = tmp_path / "remote" / "node"
    result = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--wheels", str(broken), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pip install failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists(), "the directory it made is gone"


def test_an_old_python_is_refused_with_attach_offered_and_nothing_left(
    sshd: tuple[Sshd, Path], node_factory: object, tmp_path: Path, cache: Path
) -> None:
    server, key = sshd
    assert callable(node_factory)
    local: NodeProcess = node_factory("local")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Python 3.9.2'\n")
    fake.chmod(0o755)
    target = tmp_path / "remote" / "node"
    result = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--python", str(fake),
    )  # fmt: skip
    assert result.returncode == 1
    assert "127.0.0.1 cannot run a p2prc node: Python 3.9" in result.stderr
    assert f"p2prc attach 127-0-0-1 --host 127.0.0.1 --ssh-port {server.port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "remote").exists()

    missing = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--python", str(tmp_path / "bin" / "none"),
    )  # fmt: skip
    assert missing.returncode == 1
    assert "cannot run a p2prc node: no Python" in missing.stderr
    assert not (tmp_path / "remote").exists()

    # A host the user's own ~/.ssh/known_hosts knows is checked there, and not pinned again.
    pinned = (local.home / "known_hosts").read_text()
    (local.home / "known_hosts").unlink()
    mine = cache.parent / "user-home" / ".ssh" / "known_hosts"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text(pinned)
    known = cli(
        local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target),
        "--python", str(fake),
    )  # fmt: skip
    assert "Python 3.9" in known.stderr
    assert "first contact" not in known.stderr
    assert not (local.home / "known_hosts").exists()
    mine.unlink()


def test_a_changed_host_key_or_a_refused_login_stops_before_anything(
    sshd: tuple[Sshd, Path], node_factory: object, tmp_path: Path, cache: Path
) -> None:
    server, key = sshd
    assert callable(node_factory)
    local: NodeProcess = node_factory("local")
    other = tmp_path / "other"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30
    )
    target = tmp_path / "remote" / "node"

    refused = cli(
        local.home, cache, "install-node", "root@127.0.0.1", "--ssh-port", str(server.port),
        "-i", str(other), "--dir", str(target),
    )  # fmt: skip
    assert refused.returncode == 1
    assert "root@127.0.0.1 refused the login: check -i KEY" in refused.stderr

    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    (local.home / "known_hosts").write_text(f"[127.0.0.1]:{server.port} {wrong}\n")
    changed = cli(local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target))
    assert changed.returncode == 1
    assert "host key of 127.0.0.1 port" in changed.stderr
    assert "changed" in changed.stderr
    assert not (tmp_path / "remote").exists()

    # A key of an algorithm the host does not offer (it has ed25519 only) is no match either.
    ecdsa = tmp_path / "ecdsa"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(ecdsa)], check=True, timeout=30
    )
    line = " ".join(ecdsa.with_suffix(".pub").read_text().split()[:2])
    (local.home / "known_hosts").write_text(f"[127.0.0.1]:{server.port} {line}\n")
    other_alg = cli(local.home, cache, "install-node", *ssh_args(server, key), "--dir", str(target))
    assert other_alg.returncode == 1
    assert f"host key of 127.0.0.1 port {server.port} changed" in other_alg.stderr
    assert not (tmp_path / "remote").exists()

    closed = cli(
        local.home, cache, "install-node", "root@127.0.0.1", "--ssh-port", str(free_port()),
        "--dir", str(target),
    )  # fmt: skip
    assert closed.returncode == 1
    assert "cannot reach SSH at 127.0.0.1" in closed.stderr
