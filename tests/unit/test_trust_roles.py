"""Roles per trusted key (trust.roles): the policy, the config, each route and the relay."""

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2prc import AsyncClient, FakeRuntime, Home, Node, NodeConfig, init_home
from p2prc.api import create_app
from p2prc.config import TrustConfig, load, set_value
from p2prc.errors import ConfigError, ContainerNotFound, InvalidRequest, NotTrusted, TunnelError
from p2prc.identity import Identity
from p2prc.models import CreateContainer
from p2prc.peers.invites import InviteStore, TrustAPI, decode_token
from p2prc.state import State
from p2prc.trust import ROLES, TrustPolicy
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.relay import RelayServer
from tests.conftest import FakeNode


def _identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def _client(node: FakeNode, identity: Identity, tmp_path: Path) -> AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node))
    return AsyncClient(
        "http://node.test", home=tmp_path / "none", identity=identity, transport=transport
    )


def test_policy_roles() -> None:
    me, full, narrow, stranger = (_identity() for _ in range(4))
    config = TrustConfig(
        allow=[full.openssh_public_key(), narrow.openssh_public_key()],
        roles={narrow.node_id: ["relay"], stranger.node_id: ["containers"]},
    )
    policy = TrustPolicy(config, me.public_key)
    for role in ROLES:
        assert policy.allows(me.node_id, role)
        assert policy.allows(full.node_id, role)
        assert policy.allows(narrow.node_id, role) == (role == "relay")
        assert not policy.allows(stranger.node_id, role)  # roles alone trust no one
    assert policy.roles_of(narrow.node_id) == ("relay",)
    assert policy.roles_of(full.node_id) == ROLES
    assert policy.allows_node(narrow.node_id)  # still listed (gossip, NAT answers)
    with pytest.raises(ValueError, match="unknown role"):
        policy.allows(full.node_id, "admin")
    opened = TrustPolicy(TrustConfig(mode="open", roles=config.roles), me.public_key)
    assert all(opened.allows(who.node_id, role) for who in (narrow, stranger) for role in ROLES)


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ({"0" * 32: ["admin"]}, "admin"),
        ({"xyz": ["relay"]}, "xyz"),
        ({"A" * 32: ["relay"]}, "A" * 32),
    ],
)
def test_config_refuses_bad_roles(roles: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrustConfig(roles=roles)


def test_config_file_without_roles_keeps_working(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    assert load(home).trust.roles == {}
    before = home.config_file.read_text()
    with pytest.raises(ConfigError, match=r"trust\.roles.*admin"):
        set_value(home, "trust.roles", "{ " + "0" * 32 + ' = ["admin"] }')
    assert home.config_file.read_text() == before


async def test_container_routes_need_the_role(make_fake_node: object, tmp_path: Path) -> None:
    assert callable(make_fake_node)
    able, unable = _identity(), _identity()
    trust = TrustConfig(
        allow=[able.openssh_public_key(), unable.openssh_public_key()],
        roles={able.node_id: ["containers"], unable.node_id: ["relay", "map-port"]},
    )
    node = make_fake_node(NodeConfig(name="n", trust=trust))
    async with _client(node, unable, tmp_path) as client:
        with pytest.raises(NotTrusted, match="--role containers"):
            await client.containers()
        with pytest.raises(NotTrusted, match="'containers'"):
            await client.remove_container("abc")
        with pytest.raises(NotTrusted, match="containers"):
            await client.create_container(CreateContainer())
        await client.whoami()  # still a trusted peer for the rest
    async with _client(node, able, tmp_path) as client:
        assert await client.containers() == []
        with pytest.raises(ContainerNotFound):
            await client.remove_container("abc")
        view = await client.create_container(CreateContainer())
        assert [c.id for c in await client.containers()] == [view.id]


async def test_map_port_needs_the_role(make_fake_node: object, tmp_path: Path) -> None:
    assert callable(make_fake_node)
    able, unable = _identity(), _identity()
    trust = TrustConfig(
        allow=[able.openssh_public_key(), unable.openssh_public_key()],
        roles={able.node_id: ["map-port"], unable.node_id: ["containers"]},
    )
    node = make_fake_node(NodeConfig(name="n", trust=trust))
    async with _client(node, unable, tmp_path) as client:
        with pytest.raises(NotTrusted, match="--role map-port"):
            await client.map_port(8080)
    async with _client(node, able, tmp_path) as client:
        # Past the trust check: the fake node has no mapper.
        with pytest.raises(Exception, match="maps no ports") as info:
            await client.map_port(8080)
        assert not isinstance(info.value, NotTrusted)


async def test_relay_refuses_a_client_without_the_role(tmp_path: Path) -> None:
    relay, client_id = _identity(), _identity()
    trust = TrustConfig(
        allow=[client_id.openssh_public_key()], roles={client_id.node_id: ["containers"]}
    )
    policy = TrustPolicy(trust, relay.public_key)
    server = RelayServer(
        relay, tmp_path, host="127.0.0.1", allowed=lambda node_id: policy.allows(node_id, "relay")
    )
    async with server:
        client = TunnelClient(client_id, "127.0.0.1", server.port, relay.node_id)
        with pytest.raises(TunnelError, match="--role relay"):
            await client.start()
        await client.aclose()
        policy.reload(TrustConfig(allow=trust.allow, roles={client_id.node_id: ["relay"]}))
        async with TunnelClient(client_id, "127.0.0.1", server.port, relay.node_id):
            pass


async def test_trust_add_with_roles(tmp_path: Path) -> None:
    home = Home(tmp_path / "alice")
    init_home(home, NodeConfig(name="alice"))
    config, identity = init_home(home)
    node = Node(config, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime())
    peer, other = _identity(), _identity()
    async with node, AsyncClient(home=home.path) as client:
        api = TrustAPI(client)
        entry = await api.add(peer.openssh_public_key(), ["relay"])
        assert entry.added
        assert entry.roles == ["relay"]
        assert load(home).trust.roles == {peer.node_id: ["relay"]}
        assert node.trust.allows(peer.node_id, "relay")
        assert not node.trust.allows(peer.node_id, "containers")
        # Roles add up; all of them need no entry.
        entry = await api.add(peer.openssh_public_key(), ["containers"])
        assert not entry.added
        assert entry.roles == ["containers", "relay"]
        assert (await api.add(peer.openssh_public_key())).roles == ["containers", "relay"]
        entry = await api.add(peer.openssh_public_key(), ["map-port"])
        assert entry.roles == list(ROLES)
        assert load(home).trust.roles == {}
        await api.add(other.openssh_public_key(), ["containers"])
        assert [(e.node_id, e.roles) for e in await api.list()] == [
            (peer.node_id, list(ROLES)),
            (other.node_id, ["containers"]),
        ]
        await api.remove(other.node_id)
        assert load(home).trust.roles == {}
        assert not node.trust.allows(other.node_id, "containers")
        with pytest.raises(InvalidRequest, match="--role"):
            await api.add(other.openssh_public_key(), ["admin"])


async def test_invite_roles_apply_on_redeem(tmp_path: Path) -> None:
    home = Home(tmp_path / "alice")
    init_home(home, NodeConfig(name="alice"))
    config, identity = init_home(home)
    node = Node(config, home, identity=identity, host="127.0.0.1", port=0, runtime=FakeRuntime())
    joiner = _identity()
    async with node, AsyncClient(home=home.path) as owner:
        with pytest.raises(InvalidRequest, match="--role"):
            await TrustAPI(owner).invite(roles=["admin"])
        token = decode_token((await TrustAPI(owner).invite(roles=["relay"])).token)
        async with AsyncClient(
            node.api_url, home=tmp_path / "none", identity=joiner, audience=identity.node_id
        ) as peer:
            await TrustAPI(peer).redeem(token.secret)
            with pytest.raises(NotTrusted, match="--role containers"):
                await peer.containers()
        assert load(home).trust.roles == {joiner.node_id: ["relay"]}
        assert node.trust.allows(joiner.node_id, "relay")


def test_invite_store_keeps_roles(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        store = InviteStore(state.connection)
        narrow, _ = store.create(60, 1, roles=["map-port"])
        wide, _ = store.create(60, 1)
        assert store.redeem(narrow, "a" * 32) == ["map-port"]
        assert store.redeem(wide, "b" * 32) is None
