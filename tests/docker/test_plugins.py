"""Ansible plugins against real containers in a group, checked over SSH."""

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc import AsyncClient
from p2prc.errors import ContainerNotFound, InvalidRequest, PluginError
from p2prc.models import CreateContainer, PluginEvent
from tests.docker.conftest import ssh

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]

PLAYBOOK = """\
- name: Set up a worker
  hosts: all
  gather_facts: false
  become: true
  tasks:
    - name: Copy a file
      ansible.builtin.copy:
        dest: /etc/p2prc-test.txt
        content: "copied by p2prc\\n"
        mode: "0644"
    - name: Create a user
      ansible.builtin.user:
        name: worker
        state: present
    - name: Fail on one host when asked
      ansible.builtin.fail:
        msg: failing on purpose
      when: inventory_hostname == (fail_on | default(''))
    - name: Write a marker from a variable
      ansible.builtin.copy:
        dest: /home/p2prc/marker
        content: "{{ marker }}"
        owner: p2prc
        mode: "0644"
"""


def _git_repo(path: Path) -> Path:
    path.mkdir()
    (path / "site.yml").write_text(PLAYBOOK)
    (path / "plugin.toml").write_text(
        'name = "worker-setup"\nsummary = "copy, user, marker"\n[variables]\nmarker = "text"\n'
    )
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "plugin"], check=True)
    return path


async def test_plugin_on_a_group(node_factory: Any, tmp_path: Path) -> None:
    async with (
        node_factory("alice") as _alice,
        node_factory("bob") as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        first, second = [
            await client.create_on_peer(bob.api_url, CreateContainer(ports=1)) for _ in range(2)
        ]
        group = await client.create_group()
        await client.add_to_group(group.id, first.id)
        await client.add_to_group(group.id, second.id[:8])
        assert len((await client.group(group.id)).containers) == 2

        plugin = await client.pull_plugin(str(_git_repo(tmp_path / "repo")))
        assert plugin.name == "worker-setup"
        assert [p.name for p in await client.plugins()] == ["worker-setup"]

        events: list[PluginEvent] = []
        run = await client.run_plugin(
            "worker-setup", group.id, {"marker": "m-42"}, progress=events.append
        )
        assert run.ok, run.output
        assert set(run.hosts) == {f"c-{first.id}", f"c-{second.id}"}
        assert all(r.failed == 0 and r.changed >= 3 for r in run.hosts.values())
        assert any(e.status == "ok" for e in events)
        for view in (first, second):
            result = await asyncio.to_thread(
                ssh, tmp_path / "alice", view.ssh.port,
                "cat /etc/p2prc-test.txt /home/p2prc/marker; echo; id -un worker",
            )  # fmt: skip
            assert result.stdout.split() == ["copied", "by", "p2prc", "m-42", "worker"]

        failing = await client.run_plugin(
            "worker-setup", group.id, {"marker": "again", "fail_on": f"c-{first.id}"}
        )
        assert failing.ok is False
        assert failing.hosts[f"c-{first.id}"].failed == 1
        assert failing.hosts[f"c-{second.id}"].failed == 0
        runs = await client.plugin_runs()
        assert [r.ok for r in runs] == [True, False]
        assert "failing on purpose" in runs[1].output

        shipped = await client.pull_plugin(str(REPO / "plugins" / "http-share"))
        run = await client.run_plugin(shipped.name, first.id, {"message": "shared!"})
        assert run.ok, run.output
        async with httpx.AsyncClient() as http:
            page = await http.get(f"http://127.0.0.1:{first.ports[0].host_port}/index.txt")
        assert page.text.strip() == "shared!"

        await client.remove_tracked(first.id)
        assert [c.container.id for c in (await client.group(group.id)).containers] == [second.id]


async def test_plugin_bad_input(node_factory: Any, tmp_path: Path) -> None:
    async with node_factory("alice") as alice, AsyncClient(home=tmp_path / "alice") as client:
        plugins_dir = alice.home_path / "plugins"
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(PluginError, match=r"site\.yml"):
            await client.pull_plugin(str(empty))
        with pytest.raises(InvalidRequest):
            await client.pull_plugin("--upload-pack=touch /tmp/p2prc-pwned")
        with pytest.raises(InvalidRequest):
            await client.pull_plugin("../../nowhere")
        with pytest.raises(PluginError, match="not a git repository"):
            await client.pull_plugin("http://127.0.0.1:1/nothing.git")
        assert sorted(p.name for p in plugins_dir.iterdir()) == []
        with pytest.raises(InvalidRequest):
            await client.remove_plugin("../etc")
        _git_repo(tmp_path / "repo")
        await client.pull_plugin(str(tmp_path / "repo"))
        with pytest.raises(PluginError, match="installed"):
            await client.pull_plugin(str(tmp_path / "repo"))
        with pytest.raises(ContainerNotFound):
            await client.run_plugin("worker-setup", "nosuchcontainer")
        from p2prc.errors import NotFound

        with pytest.raises(NotFound):
            await client.run_plugin("nosuchplugin", "nosuchcontainer")
        with pytest.raises(NotFound):
            await client.add_to_group("grpnope", "x")
