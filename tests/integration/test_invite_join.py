"""Invite and join between two real nodes on loopback, then a container at once; trust by name."""

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import p2prc
from p2prc import AsyncClient, Home
from p2prc.cli import main
from p2prc.config import load
from p2prc.errors import NotTrusted, PeerNotFound, RateLimited
from p2prc.identity import Identity, parse_public_key
from p2prc.peers.invites import TrustAPI, join
from tests.integration.conftest import p2prc as run_cli
from tests.integration.test_containers_remote import _node


async def test_join_by_token_then_create_at_once_and_reuse_refused(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "bob") as bob,
        _node(tmp_path, "carol") as _carol,
        AsyncClient(home=tmp_path / "alice") as to_alice,
        AsyncClient(home=tmp_path / "bob") as to_bob,
        AsyncClient(home=tmp_path / "carol") as to_carol,
    ):
        with pytest.raises(NotTrusted) as refused:
            await to_bob.create_on_peer(alice.api_url)
        assert f"p2prc trust add {bob.identity.node_id}" in str(refused.value)
        assert "alice" in str(refused.value)

        invitation = await TrustAPI(to_alice).invite(ttl=60, uses=1)
        joined = await join(invitation.token, to_bob)
        assert (joined.node_id, joined.name) == (alice.identity.node_id, "alice")

        view = await to_bob.create_on_peer(alice.api_url)  # no restart of alice
        assert view.peer == alice.identity.node_id
        assert [e.node_id for e in await TrustAPI(to_alice).list()] == [bob.identity.node_id]
        assert [e.node_id for e in await TrustAPI(to_bob).list()] == [alice.identity.node_id]
        assert bob.identity.node_id in {m.record.node_id for m in alice.gossip.table.alive()}, (
            "bob's exchange with alice put it in alice's table"
        )
        address = alice.api_url.removeprefix("http://")
        assert load(Home(bob.home_path)).bootstrap == [address]
        allow = load(Home(alice.home_path)).trust.allow
        assert [parse_public_key(key) for key in allow] == [bob.identity.public_key]
        assert [e.name for e in await TrustAPI(to_alice).list()] == ["bob"]

        with pytest.raises(NotTrusted, match="already used"):
            await join(invitation.token, to_carol)
        with pytest.raises(NotTrusted):
            await to_carol.create_on_peer(alice.api_url)


async def test_trust_add_by_name_from_the_signed_table(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "carol") as carol,
        AsyncClient(home=tmp_path / "alice") as to_alice,
        AsyncClient(home=tmp_path / "carol") as to_carol,
    ):
        await to_carol.add_peer(alice.api_url)  # alice learns carol's signed record
        found = await TrustAPI(to_alice).lookup("carol")
        assert found.node_id == carol.identity.node_id
        assert found.fingerprint.startswith("SHA256:")
        added = await TrustAPI(to_alice).add(found.public_key)
        assert added.added
        assert added.name == "carol"
        view = await to_carol.create_on_peer(alice.api_url)
        assert view.peer == alice.identity.node_id
        removed = await TrustAPI(to_alice).remove("carol")
        assert removed.node_id == carol.identity.node_id
        with pytest.raises(NotTrusted):
            await to_carol.create_on_peer(alice.api_url)
        assert load(Home(alice.home_path)).trust.allow == []


async def test_trust_add_by_an_address_no_record_publishes(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "dave") as dave,
        AsyncClient(home=tmp_path / "alice") as to_alice,
    ):
        found = await TrustAPI(to_alice).lookup(dave.api_url.removeprefix("http://"))
        assert (found.node_id, found.name) == (dave.identity.node_id, "dave")
        with pytest.raises(PeerNotFound, match="p2prc id"):
            await TrustAPI(to_alice).lookup("nobody")


def test_invite_and_join_with_the_cli_between_processes(node_factory: Any, tmp_path: Path) -> None:
    for name in ("alice", "bob", "carol"):
        run_cli(tmp_path / name, "init")
        run_cli(tmp_path / name, "config", "set", "name", name)
    alice, bob, carol = node_factory("alice"), node_factory("bob"), node_factory("carol")
    token = json.loads(run_cli(alice.home, "--json", "invite", "--ttl", "10m").stdout)["token"]
    joined = json.loads(run_cli(bob.home, "--json", "join", token).stdout)
    assert joined["node_id"] == alice.node_id
    with p2prc.Client(alice.api, home=bob.home) as client:
        assert client.whoami().node_id == bob.node_id  # trusted at once, no restart

    again = run_cli(carol.home, "join", token, check=False)
    assert again.returncode == 1
    assert (
        again.stderr.strip() == "NotTrusted: this invite token was already used; ask for a new one"
    )
    garbage = run_cli(carol.home, "join", "p2prc1garbage", check=False)
    assert garbage.returncode == 1
    assert len(garbage.stderr.strip().splitlines()) == 1

    run_cli(carol.home, "peers", "add", alice.api.removeprefix("http://"))
    refused = run_cli(carol.home, "--json", "trust", "add", "carol", check=False)
    assert "--yes" in refused.stderr
    added = run_cli(alice.home, "--json", "trust", "add", "carol", "--yes", "--role", "relay")
    assert json.loads(added.stdout)["node_id"] == carol.node_id
    assert json.loads(added.stdout)["roles"] == ["relay"]
    listed = json.loads(run_cli(alice.home, "--json", "trust", "list").stdout)
    assert {row["name"] for row in listed} == {"bob", "carol"}
    assert "carol" in run_cli(alice.home, "trust", "list").stdout.split("[relay]")[0]
    with p2prc.Client(alice.api, home=carol.home) as client:
        assert client.whoami().node_id == carol.node_id
        with pytest.raises(p2prc.NotTrusted, match="--role containers"):
            client.containers()
    run_cli(alice.home, "trust", "rm", "carol")
    with p2prc.Client(alice.api, home=carol.home) as client, pytest.raises(p2prc.NotTrusted):
        client.whoami()


async def test_redeem_is_rate_limited_per_key(tmp_path: Path) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "mallory") as _mallory,
        AsyncClient(alice.api_url, home=tmp_path / "mallory") as to_alice,
    ):
        for _ in range(5):
            with pytest.raises(NotTrusted, match="not one this node gave out"):
                await TrustAPI(to_alice).redeem(secrets.token_bytes(16))
        with pytest.raises(RateLimited):
            await TrustAPI(to_alice).redeem(secrets.token_bytes(16))


def test_trust_add_asks_on_a_terminal(
    node_factory: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = node_factory("alice")
    peer = Identity(Ed25519PrivateKey.generate())
    key = peer.openssh_public_key()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter([False, True])
    monkeypatch.setattr("typer.confirm", lambda *args, **kwargs: next(answers))
    home = ["--home", str(alice.home)]
    with pytest.raises(SystemExit) as declined:
        main([*home, "trust", "add", key])
    assert declined.value.code == 1
    assert f"trust (name unknown)  {peer.node_id}  SHA256:" in capsys.readouterr().err
    assert load(Home(alice.home)).trust.allow == []
    with pytest.raises(SystemExit) as accepted:
        main([*home, "trust", "add", key])
    assert accepted.value.code == 0
    assert "now trusts" in capsys.readouterr().out
    assert [parse_public_key(k) for k in load(Home(alice.home)).trust.allow] == [peer.public_key]


async def test_a_token_of_another_network_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    """Alice's token handed to a node of another network (carol's address in it, as when a
    token is pasted into the wrong pool): refused in one line, bob keeps nothing of it."""
    from dataclasses import replace

    from p2prc.peers.invites import decode_token, encode_token

    async with (
        _node(tmp_path, "alice") as _alice,
        _node(tmp_path, "bob") as _bob,
        _node(tmp_path, "carol") as carol,
        AsyncClient(home=tmp_path / "alice") as to_alice,
        AsyncClient(home=tmp_path / "bob") as to_bob,
    ):
        invitation = await TrustAPI(to_alice).invite(ttl=60, uses=1)
        token = decode_token(invitation.token)
        elsewhere = encode_token(replace(token, addresses=(carol.api_url.removeprefix("http://"),)))
        before = (tmp_path / "bob" / "config.toml").read_bytes()
        with pytest.raises(p2prc.P2PRCError) as refused:
            await join(elsewhere, to_bob)
        message = str(refused.value)
        assert "\n" not in message
        assert "no inviter address answered" in message
        assert "signed for another node" in message  # carol is not the pinned inviter
        assert (tmp_path / "bob" / "config.toml").read_bytes() == before
        assert await TrustAPI(to_bob).list() == []
        # Alice's token is still good for its own network.
        joined = await join(invitation.token, to_bob)
        assert joined.node_id == token.node_id
