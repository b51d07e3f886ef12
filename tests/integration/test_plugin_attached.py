"""A plugin (Ansible) runs against an attached host: a real sshd on 127.0.0.2, attached on a
gateway node; another node runs the playbook through p2prc's ProxyCommand; a node the
gateway does not allow gets the host unreachable, and nothing written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._sshd import SSHD, Sshd
from tests.integration.conftest import NodeProcess, close, p2prc, start_node
from tests.integration.test_attach_ssh import BOARD, _alive, _gateways, _key, _run, _wait

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(SSHD).exists(), reason="needs OpenSSH's sshd"),
]

# The "board" is this machine, whose root login finds pyenv shims before /usr/bin/python3 (a
# shim of a version not installed breaks Ansible's interpreter discovery): a plugin variable
# picks the interpreter, as an owner would for a board whose Python lives elsewhere.
PYTHON = ("--var", "ansible_python_interpreter=/usr/bin/python3")

SITE = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: write a file
      ansible.builtin.copy:
        content: "written by p2prc\\n"
        dest: "{{ target_file }}"
"""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess, NodeProcess, Sshd]]:
    started: list[NodeProcess] = []
    with Sshd(host=BOARD, extra_config="Subsystem sftp internal-sftp") as sshd:
        try:
            for name in ("gw", "runner", "stranger"):
                p2prc(tmp_path / name, "config", "set", "name", name)
                p2prc(tmp_path / name, "config", "set", "behind_nat", "false")
                p2prc(tmp_path / name, "config", "set", "gossip.lan_discovery", "false")
            started.append(start_node(tmp_path / "gw", "--host", "127.0.0.1", "--port", "0"))
            root = started[0].api.removeprefix("http://")
            for name in ("runner", "stranger"):
                p2prc(tmp_path / name, "config", "set", "bootstrap", root)
                started.append(start_node(tmp_path / name, "--host", "127.0.0.1", "--port", "0"))
            ids = {node.node_id for node in started}
            for node in started:
                _wait(lambda node=node: _alive(node) >= ids - {node.node_id})  # type: ignore[misc]
            gw, runner, stranger = started
            for node in started:  # the host takes every key: the gateway decides who gets in
                sshd.authorize(_key(node))
            attach = ("attach", "board", "--host", BOARD, "--ssh-port", str(sshd.port))
            p2prc(gw.home, *attach, "--allow", runner.node_id)
            for node in (runner, stranger):
                _wait(lambda node=node: _gateways(node, "board") == [gw.node_id])  # type: ignore[misc]
            yield gw, runner, stranger, sshd
        finally:
            for node in started:
                close(node)


@pytest.mark.timeout(480)
def test_a_plugin_writes_a_file_on_an_attached_host(
    nodes: tuple[NodeProcess, NodeProcess, NodeProcess, Sshd], tmp_path: Path
) -> None:
    _gw, runner, stranger, _sshd = nodes
    plugin = tmp_path / "writer"
    plugin.mkdir()
    (plugin / "site.yml").write_text(SITE)
    (plugin / "README.md").write_text("Writes a file.\n")
    for node in (runner, stranger):
        pulled = _run(node.home, "plugin", "pull", str(plugin))
        assert pulled.returncode == 0, pulled.stderr

    out = tmp_path / "board" / "written.txt"
    out.parent.mkdir()
    started = time.monotonic()
    ran = _run(
        runner.home, "--json", "plugin", "run", "writer", "board", "--var", f"target_file={out}",
        *PYTHON, timeout=240,
    )  # fmt: skip
    took = time.monotonic() - started
    assert ran.returncode == 0, ran.stdout + ran.stderr
    print(f"plugin run on the attached host: {took:.1f} s")
    run = json.loads(ran.stdout.splitlines()[-1])
    assert run["ok"] is True
    assert run["hosts"]["a-board"]["changed"] == 1
    assert out.read_text() == "written by p2prc\n"

    group = json.loads(_run(runner.home, "--json", "group", "create").stdout)["id"]
    added = _run(runner.home, "--json", "group", "add", group, "board")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["attached"] == ["board"]
    out.unlink()
    again = _run(
        runner.home, "--json", "plugin", "run", "writer", group, "--var", f"target_file={out}",
        *PYTHON, timeout=240,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["hosts"]["a-board"]["changed"] == 1
    assert out.read_text() == "written by p2prc\n"

    other = tmp_path / "board" / "stranger.txt"
    started = time.monotonic()
    refused = _run(
        stranger.home, "--json", "plugin", "run", "writer", "board",
        "--var", f"target_file={other}", *PYTHON, timeout=240,
    )  # fmt: skip
    print(f"a stranger's run, refused: {time.monotonic() - started:.1f} s")
    assert refused.returncode == 1
    result = json.loads(refused.stdout.splitlines()[-1])
    assert result["ok"] is False
    assert result["hosts"]["a-board"]["unreachable"] == 1
    assert not other.exists()
