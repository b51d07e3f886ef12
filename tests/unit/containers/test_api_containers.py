"""Containers through the API on the fake runtime: validation, limits, ownership, leases."""

import json
from typing import Any

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.config import ContainerConfig, NodeConfig, TrustConfig
from p2prc.containers.runtime import FakeRuntime
from p2prc.errors import (
    ContainerNotFound,
    GpuUnavailable,
    ImageNotFound,
    InvalidRequest,
    LimitExceeded,
    QuotaExceeded,
    RuntimeUnavailable,
)
from p2prc.identity import Identity, b64encode, parse_public_key
from p2prc.models import CallerInfo, CreateContainer
from tests.conftest import FakeNode


def _open_node(make_fake_node: Any, **limits: Any) -> FakeNode:
    config = NodeConfig(
        name="host",
        trust=TrustConfig(mode="open"),
        containers=ContainerConfig(max_cpus=2, **limits),
    )
    node = make_fake_node(config)
    assert isinstance(node, FakeNode)
    return node


def _client(node: FakeNode, identity: Identity, tmp_path: Any) -> AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node))
    return AsyncClient(
        "http://host.test", home=tmp_path / "x", identity=identity, transport=transport
    )


@pytest.fixture
def node(make_fake_node: Any) -> FakeNode:
    return _open_node(make_fake_node)


async def test_create_with_ports_installs_callers_key(node: FakeNode, tmp_path: Any) -> None:
    alice = Identity.generate()
    progress: list[str] = []
    async with _client(node, alice, tmp_path) as client:
        view = await client.create_container(CreateContainer(ports=2), progress=progress.append)
    assert view.owner == alice.node_id
    assert view.peer == node.identity.node_id
    assert view.ssh.host == "host.test"
    assert view.ssh.user == "p2prc"
    assert [p.container_port for p in view.ports] == [8000, 8001]
    assert progress[0] == "accepted"
    spec = node.runtime.specs[view.id]
    assert parse_public_key(spec.authorized_keys[0]) == alice.public_key
    assert spec.cpus == 1.0
    assert spec.memory == 1024**3
    assert spec.pids == 512
    assert spec.gpus == 0
    assert spec.disk == 10 * 1024**3


async def test_extra_keys_are_reserialised(node: FakeNode, tmp_path: Any) -> None:
    extra = Identity.generate().openssh_public_key("laptop")
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container(CreateContainer(authorized_keys=[extra]))
    keys = node.runtime.specs[view.id].authorized_keys
    assert keys[1] == extra.rsplit(" ", 1)[0]  # the comment does not reach the container


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"cpus": 8}, LimitExceeded),
        ({"memory": "64GiB"}, LimitExceeded),
        ({"memory": "lots"}, InvalidRequest),
        ({"memory": "1k"}, InvalidRequest),
        ({"ports": 17}, LimitExceeded),
        ({"ttl": "30d"}, LimitExceeded),
        ({"ttl": "soon"}, InvalidRequest),
        ({"ttl": "0"}, InvalidRequest),
        ({"image": "evil/miner:latest"}, ImageNotFound),
        ({"gpu": True}, GpuUnavailable),
        ({"gpus": 1}, GpuUnavailable),
        ({"gpus": 2}, LimitExceeded),
        ({"authorized_keys": ["ssh-ed25519 AAAA; rm -rf /"]}, InvalidRequest),
        ({"authorized_keys": ['command="sh" ssh-ed25519 AAAA']}, InvalidRequest),
    ],
)
async def test_bad_requests_create_nothing(
    node: FakeNode, tmp_path: Any, body: dict[str, Any], error: type[Exception]
) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        with pytest.raises(error):
            await client.create_container(CreateContainer.model_validate(body))
    assert node.runtime.containers == {}
    assert node.container_store.hosted() == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x; rm -rf /"},
        {"name": "$(reboot)"},
        {"name": "../../etc"},
        {"image": "Ubuntu;reboot"},
        {"image": "a b"},
        {"ports": -1},
        {"ports": "many"},
        {"ports": 1000},
        {"cpus": 0},
        {"gpu": "maybe"},
        {"unknown": 1},
        {"authorized_keys": ["k"] * 9},
    ],
)
async def test_injection_and_junk_are_rejected_before_docker(
    node: FakeNode, body: dict[str, Any]
) -> None:
    alice = Identity.generate()
    content = json.dumps(body).encode()
    headers = alice.signed_headers("POST", "/containers", node.identity.node_id, content)
    headers["content-type"] = "application/json"
    transport = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as http:
        response = await http.post("/containers", content=content, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert node.runtime.containers == {}


async def test_gpu_request_reaches_the_runtime(make_fake_node: Any, tmp_path: Any) -> None:
    config = NodeConfig(name="gpu", trust=TrustConfig(mode="open"))
    node = make_fake_node(config, runtime=FakeRuntime(gpus=1))
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container(CreateContainer(gpu=True))
    assert view.gpu
    assert view.gpus == 1
    assert node.runtime.specs[view.id].gpus == 1


@pytest.mark.parametrize(
    ("max_gpus", "asked", "error"),
    [(4, 3, None), (2, 3, "maximum 2 per container"), (8, 5, "more than the 4 GPUs")],
)
async def test_gpu_count_is_limited(
    make_fake_node: Any, tmp_path: Any, max_gpus: int, asked: int, error: str | None
) -> None:
    config = NodeConfig(
        name="gpu", trust=TrustConfig(mode="open"), containers=ContainerConfig(max_gpus=max_gpus)
    )
    node = make_fake_node(config, runtime=FakeRuntime(gpus=4))
    async with _client(node, Identity.generate(), tmp_path) as client:
        if error is None:
            view = await client.create_container(CreateContainer(gpus=asked))
            assert view.gpus == asked
            assert node.runtime.specs[view.id].gpus == asked
        else:
            with pytest.raises(LimitExceeded, match=error):
                await client.create_container(CreateContainer(gpus=asked))
            assert node.runtime.containers == {}


async def test_only_the_creator_may_remove(node: FakeNode, tmp_path: Any) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    async with _client(node, alice, tmp_path) as client:
        view = await client.create_container()
    async with _client(node, mallory, tmp_path) as client:
        assert await client.containers() == []
        with pytest.raises(ContainerNotFound):
            await client.remove_container(view.id)
    assert view.id in node.runtime.containers
    async with _client(node, alice, tmp_path) as client:
        assert [c.id for c in await client.containers()] == [view.id]
        await client.remove_container(view.id)
        assert await client.containers() == []
    assert node.runtime.containers == {}


async def test_owner_may_remove_any(node: FakeNode, tmp_path: Any) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container()
    async with _client(node, node.identity, tmp_path) as owner:
        assert len(await owner.containers()) == 1
        await owner.remove_container(view.id)
    assert node.runtime.containers == {}


async def test_quota_per_peer(make_fake_node: Any, tmp_path: Any) -> None:
    node = _open_node(make_fake_node, max_per_peer=2)
    async with _client(node, Identity.generate(), tmp_path) as client:
        await client.create_container()
        await client.create_container()
        with pytest.raises(QuotaExceeded):
            await client.create_container()
    async with _client(node, Identity.generate(), tmp_path) as other:
        await other.create_container()
    assert len(node.runtime.containers) == 3


async def test_names_are_unique(node: FakeNode, tmp_path: Any) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container(CreateContainer(name="render"))
        assert view.name == "p2prc-render"
        with pytest.raises(InvalidRequest, match="already exists"):
            await client.create_container(CreateContainer(name="render"))


async def test_allowlist_applies_to_containers(make_fake_node: Any, tmp_path: Any) -> None:
    node = make_fake_node(NodeConfig(name="closed"))
    from p2prc.errors import NotTrusted

    async with _client(node, Identity.generate(), tmp_path) as client:
        with pytest.raises(NotTrusted):
            await client.create_container()
    assert node.runtime.containers == {}


async def test_ttl_expiry(node: FakeNode, tmp_path: Any) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        leased = await client.create_container(CreateContainer(ttl="30m"))
        kept = await client.create_container()
    assert leased.expires_at is not None
    assert kept.expires_at is None
    now = [leased.expires_at + 1]
    node.containers._clock = lambda: now[0]
    assert await node.containers.expire() == [leased.id]
    assert set(node.runtime.containers) == {kept.id}
    assert [v.id for v in node.container_store.hosted()] == [kept.id]


async def test_reconcile_forgets_vanished_containers(node: FakeNode, tmp_path: Any) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        gone = await client.create_container()
        kept = await client.create_container()
    node.runtime.stop_outside(gone.id)
    await node.containers.reconcile()
    assert [v.id for v in node.container_store.hosted()] == [kept.id]


class _DownRuntime(FakeRuntime):
    async def has_gpu_runtime(self) -> bool:
        raise RuntimeUnavailable("container runtime unavailable: no docker socket")

    async def create(self, spec: Any) -> Any:
        raise RuntimeUnavailable("container runtime unavailable: no docker socket")

    async def images(self) -> list[str]:
        raise RuntimeUnavailable("container runtime unavailable: no docker socket")


async def test_runtime_down_is_a_clear_error(make_fake_node: Any, tmp_path: Any) -> None:
    config = NodeConfig(name="nodocker", trust=TrustConfig(mode="open"))
    node = make_fake_node(config, runtime=_DownRuntime())
    async with _client(node, Identity.generate(), tmp_path) as client:
        with pytest.raises(RuntimeUnavailable, match="unavailable"):
            await client.create_container()
        assert (await client.health()).ok
        images = await client.images()
        assert images.available == []
        assert images.default == "p2prc/sshd:latest"


async def test_view_carries_the_containers_host_key(node: FakeNode, tmp_path: Any) -> None:
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container()
        listed = await client.containers()
    key = node.runtime.host_keys[view.id]
    assert view.ssh.host_key == key.rsplit(" ", 1)[0]  # the comment does not travel
    assert listed[0].ssh.host_key == view.ssh.host_key


async def test_unreadable_host_key_leaves_it_empty(make_fake_node: Any, tmp_path: Any) -> None:
    class _NoKey(FakeRuntime):
        async def host_key(self, container_id: str) -> str:
            return "ssh-ed25519 not-base64 {{ x }}"

    config = NodeConfig(name="nokey", trust=TrustConfig(mode="open"))
    node = make_fake_node(config, runtime=_NoKey())
    async with _client(node, Identity.generate(), tmp_path) as client:
        view = await client.create_container()
    assert view.ssh.host_key == ""


async def test_a_host_unfit_for_ssh_creates_nothing(node: FakeNode) -> None:
    alice = Identity.generate()
    caller = CallerInfo(node_id=alice.node_id, role="peer", public_key=b64encode(alice.public_key))

    async def progress(message: str) -> None:
        pass

    with pytest.raises(InvalidRequest, match="SSH host"):
        await node.containers.create(CreateContainer(), caller, "evil{{7*7}}", progress)
    assert node.runtime.containers == {}


def test_a_tracked_container_is_picked_by_name_then_unique_id_prefix() -> None:
    from p2prc.containers.store import pick_tracked
    from p2prc.errors import ContainerNotFound, InvalidRequest
    from p2prc.models import ContainerView, TrackedContainer

    def item(container_id: str, name: str) -> TrackedContainer:
        view = ContainerView.model_construct(id=container_id, name=name)
        return TrackedContainer.model_construct(container=view, peer_address="10.0.0.1:8088")

    tracked = [item("abc123", "web"), item("abd456", "abc")]
    assert pick_tracked(tracked, "abc").container.id == "abd456"  # a name wins over a prefix
    assert pick_tracked(tracked, "ABC1").container.id == "abc123"
    with pytest.raises(InvalidRequest, match="matches 2 containers"):
        pick_tracked(tracked, "ab")
    with pytest.raises(ContainerNotFound, match="see 'p2prc container list'"):
        pick_tracked(tracked, "zz")
