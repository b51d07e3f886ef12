"""Trust in one command: the policy reloads, config.toml is written safely, the CLI's checks."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, init_home
from p2prc.cli import main
from p2prc.config import TrustConfig, load, set_value
from p2prc.errors import ConfigError, InvalidRequest, NotFound
from p2prc.identity import Identity, parse_public_key
from p2prc.peers.invites import TrustAPI
from p2prc.trust import TrustPolicy, fingerprint, openssh_line


def run_set(home: Path, allow: list[str]) -> bool:
    return bool(set_value(Home(home), "trust.allow", json.dumps(allow)))


def _identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_policy_reload_takes_the_new_list() -> None:
    me, peer = _identity(), _identity()
    policy = TrustPolicy(TrustConfig(), me.public_key)
    assert not policy.allows_key(peer.public_key)
    policy.reload(TrustConfig(allow=[peer.openssh_public_key("peer")]))
    assert policy.allows_key(peer.public_key)
    assert policy.allows_node(peer.node_id)
    assert policy.allowed == [peer.openssh_public_key("peer")]
    policy.reload(TrustConfig())
    assert not policy.allows_node(peer.node_id)
    assert policy.allows_key(me.public_key)


def test_openssh_line_and_fingerprint_match_openssh(tmp_path: Path) -> None:
    identity = _identity()
    assert openssh_line(identity.public_key, "x") == identity.openssh_public_key("x")
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint(identity.public_key))
    if shutil.which("ssh-keygen") is None:
        return
    pub = tmp_path / "k.pub"
    pub.write_text(identity.openssh_public_key("x") + "\n")
    listed = subprocess.run(["ssh-keygen", "-lf", pub], capture_output=True, text=True).stdout
    assert listed.split()[1] == fingerprint(identity.public_key)


def test_id_prints_what_to_share(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "home")]
    assert run(capsys, *home, "init")[0] == 0
    assert run(capsys, *home, "config", "set", "name", "alice")[0] == 0
    code, out, _ = run(capsys, *home, "--json", "id")
    assert code == 0
    data = json.loads(out)
    identity = Identity.load(Home(tmp_path / "home").identity_dir)
    assert data["node_id"] == identity.node_id
    assert data["name"] == "alice"
    assert data["public_key"] == identity.openssh_public_key("alice")
    assert data["fingerprint"] == fingerprint(identity.public_key)
    code, out, _ = run(capsys, *home, "id")
    assert f"p2prc trust add {identity.node_id}" in out


def test_trust_add_without_a_terminal_needs_yes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = ["--home", str(tmp_path / "home")]
    code, _, err = run(capsys, *home, "--json", "trust", "add", "bob")
    assert code == 1
    assert "--yes" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, *home, "invite", "--ttl", "soon")
    assert code == 1
    assert "--ttl" in err


async def _started(tmp_path: Path) -> Node:
    home = Home(tmp_path / "alice")
    init_home(home, NodeConfig(name="alice"))
    config, identity = init_home(home)
    return Node(config, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime())


async def test_add_writes_config_and_reloads_every_policy(tmp_path: Path) -> None:
    peer = _identity()
    async with await _started(tmp_path) as node, AsyncClient(home=tmp_path / "alice") as client:
        api = TrustAPI(client)
        entry = await api.add(peer.openssh_public_key("bob"))
        assert entry.added
        assert entry.node_id == peer.node_id
        assert not (await api.add(peer.openssh_public_key())).added
        assert node.trust.allows_key(peer.public_key)
        allow = load(Home(node.home_path)).trust.allow
        assert allow == [openssh_line(peer.public_key)]
        assert [e.node_id for e in await api.list()] == [peer.node_id]
        with pytest.raises(InvalidRequest, match="own key"):
            await api.add(node.identity.openssh_public_key())

        config_file = Home(node.home_path).config_file
        before = config_file.read_text()
        config_file.write_text(before.replace('mode = "allowlist"', 'mode = "nobody"'))
        broken = config_file.read_text()
        with pytest.raises(ConfigError):
            await api.add(_identity().openssh_public_key())
        assert config_file.read_text() == broken  # nothing written over a bad file
        assert not list(config_file.parent.glob(".config.toml.*.tmp"))
        config_file.write_text(before)

        other = _identity()
        await api.add(other.openssh_public_key())
        assert (await api.remove(other.openssh_public_key("any comment"))).node_id == other.node_id
        # An edit made with 'p2prc config set' while the node runs is kept, not overwritten.
        hand = _identity().openssh_public_key("by-hand")
        assert run_set(node.home_path, [openssh_line(peer.public_key), hand])
        added = await api.add(other.openssh_public_key())
        assert len(load(Home(node.home_path)).trust.allow) == 3
        assert node.trust.allows_key(parse_public_key(hand))
        await api.remove("by-hand")
        await api.remove(added.node_id)
        removed = await api.remove(peer.node_id[:8])
        assert removed.node_id == peer.node_id
        assert not node.trust.allows_key(peer.public_key)
        assert load(Home(node.home_path)).trust.allow == []
        with pytest.raises(NotFound):
            await api.remove(peer.node_id[:8])
