"""Plugins on attached hosts: the inventory entry, groups holding them, target resolution."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from p2prc.attach.models import AttachedGateway, AttachedHost
from p2prc.attach.proxy import host_alias
from p2prc.config import Home
from p2prc.errors import AttachedNotFound, ContainerNotFound, InvalidRequest, PluginError
from p2prc.models import PluginRunRequest
from p2prc.plugins.runner import attached_host_name, inventory, inventory_yaml
from p2prc.plugins.service import PluginRuns
from tests.unit.test_services import _drain, _plugin_home, _Runner, _with_container

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE6mDmq3M3RR0qSMJXsYyiqm2P3Cm2cxx8Q4BSkvqCYH"


def _host(name: str = "morello", user: str = "cheri") -> AttachedHost:
    gateway = AttachedGateway(
        node_id="ab" * 16, name="laptop1", endpoint="192.0.2.1:7000", state="alive", version=1
    )
    return AttachedHost(name=name, host_key=KEY, ssh_port=2222, user=user, gateways=[gateway])


def _lookup(*hosts: AttachedHost) -> Any:
    known = {host.name: host for host in hosts}

    def get(name: str) -> AttachedHost:
        if name not in known:
            raise AttachedNotFound(f"no attached host named {name!r}")
        return known[name]

    return get


def test_inventory_reaches_an_attached_host_through_the_proxy(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    hosts = inventory([], home.identity_key, home.known_hosts, [_host()], home.path)
    entry = hosts["all"]["hosts"]["a-morello"]
    assert entry["ansible_host"] == "morello"
    assert entry["ansible_port"] == 2222
    assert entry["ansible_user"] == "cheri"
    options = shlex.split(entry["ansible_ssh_common_args"])
    pairs = dict(value.split("=", 1) for value in options[1::2])
    assert options[::2] == ["-o"] * len(pairs)
    assert pairs["HostKeyAlias"] == host_alias("morello")
    assert pairs["StrictHostKeyChecking"] == "yes"
    assert pairs["UserKnownHostsFile"] == str(home.known_hosts)
    assert pairs["IdentityFile"] == str(home.identity_key)
    assert pairs["IdentitiesOnly"] == "yes"
    proxy = shlex.split(pairs["ProxyCommand"])
    assert proxy[1:3] == ["-m", "p2prc.attach"]
    assert proxy[-1] == "morello"
    assert ["--home", str(home.path)] == proxy[proxy.index("--home") : proxy.index("--home") + 2]
    assert attached_host_name(_host()) == "a-morello"
    text = inventory_yaml(hosts)
    assert '"ansible_ssh_common_args": !unsafe ' in text
    assert '"ansible_port": 2222' in text


def test_an_attached_host_without_a_user_leaves_ansible_its_default(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    entry = inventory([], home.identity_key, home.known_hosts, [_host(user="")], home.path)
    assert "ansible_user" not in entry["all"]["hosts"]["a-morello"]


def test_template_syntax_in_the_home_path_is_refused(tmp_path: Path) -> None:
    home = Home(tmp_path / "{{ lookup('pipe', 'id') }}")
    with pytest.raises(PluginError, match="template syntax"):
        inventory([], home.identity_key, home.known_hosts, [_host()], home.path)


def test_attached_hosts_need_the_home(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="home"):
        inventory([], tmp_path / "key", tmp_path / "known", [_host()], None)


async def test_groups_hold_containers_and_attached_hosts(
    make_fake_node: Any, tmp_path: Path
) -> None:
    owner, container = await _with_container(make_fake_node)
    home, runner = _plugin_home(tmp_path), _Runner()
    runs = PluginRuns(
        owner.state.connection, home, spawn=owner.spawn, runner=runner,
        attached=_lookup(_host()),
    )  # fmt: skip
    group = runs.create_group()
    runs.add_member(group.id, container)
    shown = runs.add_member(group.id, "morello")
    assert shown.attached == ["morello"]
    assert [item.container.id for item in shown.containers] == [container]
    assert runs.add_member(group.id, "morello").attached == ["morello"], "added once"
    assert runs.group(group.id).attached == ["morello"], "kept in SQLite"

    with pytest.raises(ContainerNotFound, match="no tracked container or attached host"):
        runs.add_member(group.id, "nowhere")

    events = await _drain(await runs.run("probe", PluginRunRequest(target=group.id)))
    call = runner.calls[-1]
    assert [host.name for host in call["attached"]] == ["morello"]
    assert [item.container.id for item in call["items"]] == [container]
    assert call["home"] == home.path
    assert events[-1].run is not None

    assert runs.remove_member(group.id, "morello").attached == []
    with pytest.raises(InvalidRequest, match="not in group"):
        runs._groups.remove_attached(group.id, "morello")


async def test_a_run_targets_an_attached_host_by_name(make_fake_node: Any, tmp_path: Path) -> None:
    owner, _container = await _with_container(make_fake_node)
    home, runner = _plugin_home(tmp_path), _Runner()
    runs = PluginRuns(
        owner.state.connection, home, spawn=owner.spawn, runner=runner,
        attached=_lookup(_host()),
    )  # fmt: skip
    await _drain(await runs.run("probe", PluginRunRequest(target="morello")))
    assert runner.calls[-1]["items"] == []
    assert [host.name for host in runner.calls[-1]["attached"]] == ["morello"]
    with pytest.raises(ContainerNotFound):
        await runs.run("probe", PluginRunRequest(target="elsewhere"))


async def test_a_name_of_both_a_container_and_an_attached_host_is_refused(
    make_fake_node: Any, tmp_path: Path
) -> None:
    owner, container = await _with_container(make_fake_node)
    home, runner = _plugin_home(tmp_path), _Runner()
    plain = PluginRuns(owner.state.connection, home, spawn=owner.spawn, runner=runner)
    name = plain._containers.one_tracked(container).container.name
    runs = PluginRuns(
        owner.state.connection, home, spawn=owner.spawn, runner=runner,
        attached=_lookup(_host(name)),
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="names a container and an attached host"):
        await runs.run("probe", PluginRunRequest(target=name))
    group = runs.create_group()
    with pytest.raises(InvalidRequest, match="give the container's id"):
        runs.add_member(group.id, name)
    assert runs.add_member(group.id, container).attached == [], "its id is unambiguous"


async def test_a_group_whose_host_was_detached_says_so(make_fake_node: Any, tmp_path: Path) -> None:
    owner, _container = await _with_container(make_fake_node)
    home, runner = _plugin_home(tmp_path), _Runner()
    known = [_host()]

    def get(name: str) -> AttachedHost:
        for host in known:
            if host.name == name:
                return host
        raise AttachedNotFound(name)

    runs = PluginRuns(owner.state.connection, home, spawn=owner.spawn, runner=runner, attached=get)
    group = runs.create_group()
    runs.add_member(group.id, "morello")
    known.clear()
    with pytest.raises(InvalidRequest, match="not known any more"):
        await runs.run("probe", PluginRunRequest(target=group.id))
    assert runs.remove_member(group.id, "morello").attached == [], "taken out all the same"
    with pytest.raises(InvalidRequest, match="no containers or attached hosts"):
        await runs.run("probe", PluginRunRequest(target=group.id))
    assert runner.calls == []
