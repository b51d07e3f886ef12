"""A peer hosting a container for us lies in its answer; nothing it chose reaches our machine.

The hosting peer is a real node on loopback whose create answer is rewritten on the way
(as a hostile host, or a relay in the middle of its plain-HTTP API, would): the view's SSH
user becomes an Ansible template, its host a name we never asked, its id one we already
track on another peer. Also: the home and the state are private (0700, 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.config import Home, NodeConfig, TrustConfig
from p2prc.containers import hostkeys
from p2prc.containers.store import check_peer_view
from p2prc.errors import PeerProtocolError, PluginError
from p2prc.identity import Identity
from p2prc.models import (
    ContainerView,
    CreateContainer,
    PluginInfo,
    PortMapping,
    SshAccess,
    TrackedContainer,
)
from p2prc.node import init_home
from p2prc.plugins import runner
from tests.conftest import FakeNode

RCE_USER = "{{ lookup('pipe','id > %s') }}p2prc"
Rewrite = Callable[[dict[str, Any]], None]


def _lying(app: Any, rewrite: Rewrite) -> Any:
    """ASGI middleware: ``rewrite`` the container of every 'created' event on the way out."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def lie(message: dict[str, Any]) -> None:
            body = message.get("body", b"")
            if message["type"] == "http.response.body" and b'"created"' in body:
                event = json.loads(body)
                rewrite(event["container"])
                message = {**message, "body": json.dumps(event).encode() + b"\n"}
            await send(message)

        await app(scope, receive, lie)

    return wrapped


@contextlib.asynccontextmanager
async def _serve(app: Any) -> AsyncIterator[str]:
    """``app`` on a real loopback port (the tracked route dials peers itself)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):  # uvicorn has no "started" event to wait on
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _hosting(make_fake_node: Any) -> FakeNode:
    node = make_fake_node(NodeConfig(name="host", trust=TrustConfig(mode="open")))
    assert isinstance(node, FakeNode)
    return node


def _owner(node: FakeNode, tmp_path: Path) -> AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node))
    return AsyncClient(
        "http://owner.test", home=tmp_path / "x", identity=node.identity, transport=transport
    )


def _view(**changes: Any) -> ContainerView:
    fields: dict[str, Any] = {
        "id": "0123456789ab",
        "name": "p2prc-job",
        "peer": "a" * 32,
        "image": "p2prc/sshd:latest",
        "ssh": SshAccess(host="192.0.2.7", port=32770, user="p2prc"),
        "ports": [PortMapping(container_port=8000, host_port=32771)],
        "gpu": False,
        "cpus": 1,
        "memory": 1,
        "owner": "b" * 32,
        "created_at": 0,
    }
    return ContainerView(**{**fields, **changes})


# Hole 9: a template in the SSH user ------------------------------------------------------


async def test_template_in_ssh_user_is_refused_and_nothing_tracked(
    make_fake_node: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    host, local = _hosting(make_fake_node), make_fake_node()

    def rce(container: dict[str, Any]) -> None:
        container["ssh"]["user"] = RCE_USER % marker

    async with _serve(_lying(create_app(host), rce)) as address, _owner(local, tmp_path) as owner:
        with pytest.raises(PeerProtocolError, match=r"ssh\.user"):
            await owner.create_on_peer(address)
        assert await owner.tracked() == []
    assert local.container_store.tracked() == []
    assert not marker.exists()
    assert not (local.home_path / "known_hosts").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "{{7*7}}"),
        ("id", "0123456789AB"),
        ("id", "0" * 64),
        ("name", "x {{ y }}"),
        ("image", "a{{b}}"),
        ("peer", "not-a-node-id"),
        ("owner", "{% raw %}"),
    ],
)
async def test_bad_view_fields_are_refused(
    make_fake_node: Any, tmp_path: Path, field: str, value: str
) -> None:
    host, local = _hosting(make_fake_node), make_fake_node()

    def lie(container: dict[str, Any]) -> None:
        container[field] = value

    async with _serve(_lying(create_app(host), lie)) as address, _owner(local, tmp_path) as owner:
        with pytest.raises(PeerProtocolError, match=field):
            await owner.create_on_peer(address)
    assert local.container_store.tracked() == []


@pytest.mark.parametrize(
    ("ssh", "error"),
    [
        ({"host": "evil.example.org"}, "neither an IP address nor the host we asked"),
        ({"host": "0.0.0.0"}, "not its address"),
        ({"host": "a b"}, "ssh.host"),
        ({"host": "-oProxyCommand=id"}, "ssh.host"),
        ({"port": 0}, "ssh.port"),
        ({"port": 70000}, "ssh.port"),
        ({"user": "root; id"}, "ssh.user"),
        ({"user": "-oProxyCommand=id"}, "ssh.user"),
        ({"host_key": "ssh-ed25519 AAAA\n* ssh-ed25519 AAAAattacker"}, "ssh.host_key"),
        ({"host_key": "ssh-rsa AAAAB3NzaC1yc2E="}, "ssh.host_key"),
    ],
)
async def test_bad_ssh_access_is_refused(
    make_fake_node: Any, tmp_path: Path, ssh: dict[str, Any], error: str
) -> None:
    host, local = _hosting(make_fake_node), make_fake_node()

    def lie(container: dict[str, Any]) -> None:
        container["ssh"].update(ssh)

    async with _serve(_lying(create_app(host), lie)) as address, _owner(local, tmp_path) as owner:
        with pytest.raises(PeerProtocolError, match=error):
            await owner.create_on_peer(address)
    assert local.container_store.tracked() == []
    assert not (local.home_path / "known_hosts").exists()


def test_ssh_host_is_the_peer_asked_or_an_ip() -> None:
    assert check_peer_view(_view(), peer="a" * 32, peer_address="http://198.51.100.4:8088")
    named = _view(ssh=SshAccess(host="node.example.org", port=22, user="p2prc"))
    assert check_peer_view(named, peer="a" * 32, peer_address="http://Node.Example.org:8088")
    with pytest.raises(PeerProtocolError, match="nor the host we asked"):
        check_peer_view(named, peer="a" * 32, peer_address="http://198.51.100.4:8088")
    local = _view(ssh=SshAccess(host="127.0.0.1", port=22, user="p2prc"))
    assert check_peer_view(local, peer="a" * 32, peer_address="http://127.0.0.1:8088")
    with pytest.raises(PeerProtocolError, match="not its address"):
        check_peer_view(local, peer="a" * 32, peer_address="http://198.51.100.4:8088")


def test_a_view_built_unchecked_is_checked_again() -> None:
    good = _view()
    forged = good.model_copy(update={"ssh": good.ssh.model_copy(update={"user": RCE_USER})})
    with pytest.raises(PeerProtocolError, match="invalid container view"):
        check_peer_view(forged, peer="a" * 32, peer_address="http://192.0.2.7:8088")


# Hole 9: even a bad value that got stored never reaches Ansible's templating --------------


def _plugin(tmp_path: Path) -> PluginInfo:
    project = tmp_path / "plugin"
    project.mkdir()
    (project / "site.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - ping:\n"
    )
    return PluginInfo(name="probe", summary="", variables={}, path=str(project))


def _run(tmp_path: Path, view: ContainerView) -> Any:
    return runner.run_playbook(
        _plugin(tmp_path),
        [TrackedContainer(container=view, peer_address="http://127.0.0.1:1")],
        {},
        key=tmp_path / "key",
        known_hosts=tmp_path / "known_hosts",
        run_id="run0",
        target="c",
        on_event=lambda host, task, status: None,
    )


def _stored_bad_view(marker: Path) -> ContainerView:
    """What an older p2prc may have stored: validators skipped."""
    good = _view(ssh=SshAccess(host="127.0.0.1", port=1, user="p2prc"))
    ssh = good.ssh.model_copy(update={"user": RCE_USER % marker})
    return good.model_copy(update={"ssh": ssh})


def test_template_values_are_refused_before_ansible(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(PluginError, match="template syntax"):
        _run(tmp_path, _stored_bad_view(marker))
    assert not marker.exists()


def test_inventory_values_are_never_templated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ansible_runner")
    marker = tmp_path / "pwned"
    monkeypatch.setattr(runner, "_refuse_templates", lambda name, host: None)
    result = _run(tmp_path, _stored_bad_view(marker))
    assert result.ok is False  # port 1 answers nothing: the run happened and failed
    assert not marker.exists()


# Hole 14: a hosting peer cannot overwrite what we track on another peer --------------------


async def test_overwrite_of_another_peers_entry_is_refused(
    make_fake_node: Any, tmp_path: Path
) -> None:
    honest, liar, local = _hosting(make_fake_node), _hosting(make_fake_node), make_fake_node()
    async with (
        _serve(create_app(honest)) as honest_address,
        _owner(local, tmp_path) as owner,
    ):
        theirs = await owner.create_on_peer(honest_address)
        before = local.container_store.tracked()

        def claim_theirs(container: dict[str, Any]) -> None:
            container.update(id=theirs.id, peer=theirs.peer)

        def same_id(container: dict[str, Any]) -> None:
            container.update(id=theirs.id)

        async with _serve(_lying(create_app(liar), claim_theirs)) as liar_address:
            with pytest.raises(PeerProtocolError, match="not for"):
                await owner.create_on_peer(liar_address)
        async with _serve(_lying(create_app(liar), same_id)) as liar_address:
            with pytest.raises(PeerProtocolError, match="tracked already"):
                await owner.create_on_peer(liar_address)
        assert local.container_store.tracked() == before
        assert before[0].peer_address == f"http://{honest_address}"


async def test_liar_claiming_the_other_peers_id_cannot_overwrite(
    make_fake_node: Any, tmp_path: Path
) -> None:
    honest, local = _hosting(make_fake_node), make_fake_node()
    async with _serve(create_app(honest)) as honest_address, _owner(local, tmp_path) as owner:
        theirs = await owner.create_on_peer(honest_address)
        # The liar says it is the honest node everywhere (its /status too): same key.
        liar = make_fake_node(
            NodeConfig(name="liar", trust=TrustConfig(mode="open")), identity=honest.identity
        )

        def claim_theirs(container: dict[str, Any]) -> None:
            container.update(id=theirs.id)

        async with _serve(_lying(create_app(liar), claim_theirs)) as liar_address:
            with pytest.raises(PeerProtocolError, match="tracked already"):
                await owner.create_on_peer(liar_address)
        [kept] = local.container_store.tracked()
        assert kept.container == theirs
        assert kept.peer_address == f"http://{honest_address}"


def test_a_bad_stored_row_is_skipped_not_lost(fake_node: FakeNode) -> None:
    db = fake_node.state.connection
    bad = _stored_bad_view(Path("/nonexistent")).model_dump_json()
    db.execute(
        "INSERT INTO tracked_containers (id, peer, peer_address, view, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        ("0123456789ab", "a" * 32, "http://192.0.2.7:8088", bad, 0),
    )
    assert fake_node.container_store.tracked() == []
    assert db.execute("SELECT count(*) FROM tracked_containers").fetchone()[0] == 1


# SSH host key pin: the key from the create answer is the only one known ------------------


async def test_host_key_from_the_create_answer_is_pinned(
    make_fake_node: Any, tmp_path: Path
) -> None:
    host, local = _hosting(make_fake_node), make_fake_node()
    async with _serve(create_app(host)) as address, _owner(local, tmp_path) as owner:
        view = await owner.create_on_peer(address, CreateContainer(name="pinned"))
        key = host.runtime.host_keys[view.id].rsplit(" ", 1)[0]
        assert view.ssh.host_key == key
        known_hosts = local.home_path / "known_hosts"
        assert known_hosts.read_text() == f"p2prc-{view.id} {key}\n"
        assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
        await owner.remove_tracked(view.id)
        assert not hostkeys.is_pinned(known_hosts, hostkeys.alias(view.id), key)


def test_ssh_login_is_strict_when_a_key_is_pinned(tmp_path: Path) -> None:
    from p2prc.cli._containers import pin_host_key, ssh_argv

    home = Home(tmp_path / "home")
    key = Identity.generate().openssh_public_key("x").rsplit(" ", 1)[0]
    view = _view(ssh=SshAccess(host="192.0.2.7", port=2222, user="p2prc", host_key=key))
    argv = ssh_argv(home, view, ["uptime"])
    assert "StrictHostKeyChecking=yes" in argv
    assert argv[-3:] == ["--", "p2prc@192.0.2.7", "uptime"]
    pin_host_key(home, view)
    assert hostkeys.is_pinned(home.path / "known_hosts", "p2prc-0123456789ab", key)
    assert "StrictHostKeyChecking=accept-new" in ssh_argv(home, _view(), [])


def test_pin_replaces_other_keys_for_the_alias_and_keeps_the_rest(tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("p2prc-0123456789ab ssh-ed25519 AAAAold\nother ssh-ed25519 AAAAx\n")
    key = Identity.generate().openssh_public_key("x").rsplit(" ", 1)[0]
    hostkeys.pin(known_hosts, "p2prc-0123456789ab", key)
    assert known_hosts.read_text() == f"other ssh-ed25519 AAAAx\np2prc-0123456789ab {key}\n"


# Hole 13: the home and the state are private ----------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_home_is_private(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    init_home(home)
    assert _mode(home.path) == 0o700
    assert _mode(home.plugins_dir) == 0o700
    assert _mode(home.state_file) == 0o600
    assert _mode(home.config_file) == 0o600
    for suffix in ("-wal", "-shm"):
        side = home.state_file.with_name(home.state_file.name + suffix)
        if side.exists():
            assert _mode(side) == 0o600


def test_an_open_home_is_made_private_and_nothing_is_lost(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    init_home(home)
    (home.plugins_dir / "mine").mkdir()
    os.chmod(home.path, 0o755)
    os.chmod(home.plugins_dir, 0o755)
    os.chmod(home.state_file, 0o644)
    os.chmod(home.config_file, 0o644)
    identity = (home.identity_dir / "id_ed25519").read_bytes()
    config = home.config_file.read_text()
    init_home(home)
    assert _mode(home.path) == 0o700
    assert _mode(home.plugins_dir) == 0o700
    assert _mode(home.state_file) == 0o600
    assert _mode(home.config_file) == 0o600
    assert (home.plugins_dir / "mine").is_dir()
    assert (home.identity_dir / "id_ed25519").read_bytes() == identity
    assert home.config_file.read_text() == config


def test_the_state_database_and_its_journal_are_private(tmp_path: Path) -> None:
    from p2prc.state import State

    path = tmp_path / "state.db"
    with State(path) as state:
        state.set_meta("x", "y")
        for suffix in ("", "-wal", "-shm"):
            assert _mode(path.with_name(path.name + suffix)) == 0o600
