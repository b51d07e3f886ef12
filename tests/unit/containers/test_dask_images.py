"""Dask images a node offers its peers: the create check, and POST /images/dask with a
fake builder (validation, the role, at most 4 tags, one build at a time, the timeout)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc.api import create_app
from p2prc.client import AsyncClient
from p2prc.cluster import remote_image
from p2prc.cluster.image import PACKAGES, dask_image_tag, is_dask_tag
from p2prc.cluster.remote_image import DaskImages
from p2prc.config import ContainerConfig, NodeConfig, TrustConfig
from p2prc.containers.runtime import FakeRuntime
from p2prc.errors import (
    ClusterError,
    ImageNotFound,
    InvalidRequest,
    LimitExceeded,
    NotTrusted,
    P2PRCError,
    error_class,
)
from p2prc.identity import Identity
from p2prc.models import CreateContainer
from tests.conftest import FakeNode

TAG = "p2prc/dask:2026.8.0-py3.11"


def versions(distributed: str = "2026.8.0", **changes: str) -> dict[str, str]:
    found = {name: "1.0" for name in PACKAGES}
    found.update({"python": "3.11", "distributed": distributed, **changes})
    return found


class FakeBuilder:
    """Builds by adding the tag to the fake runtime; ``gate`` holds a build while unset."""

    def __init__(self, runtime: FakeRuntime, python: str = "3.11") -> None:
        self.runtime = runtime
        self.python_minor = python
        self.built: dict[str, dict[str, str]] = {}
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: P2PRCError | None = None

    def python(self) -> str:
        return self.python_minor

    def current(self, tag: str, versions: Mapping[str, str]) -> bool:
        return self.built.get(tag) == dict(versions)

    def build(self, versions: Mapping[str, str], progress: Callable[[str], None]) -> str:
        tag = dask_image_tag(versions)
        self.calls.append(tag)
        progress(f"building {tag} (fake)")
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.built[tag] = dict(versions)
        self.runtime._images.append(tag)
        return tag


def _node(make_fake_node: Any, *, images: list[str] | None = None, **config: Any) -> FakeNode:
    runtime = FakeRuntime(["p2prc/sshd:latest", *(images or [])])
    trust = config.pop("trust", TrustConfig(mode="open"))
    node = make_fake_node(
        NodeConfig(name="bob", trust=trust, containers=ContainerConfig(**config)),
        runtime=runtime,
    )
    assert isinstance(node, FakeNode)
    node.containers.dask_images = DaskImages(runtime, FakeBuilder(runtime))
    return node


def _builder(node: FakeNode) -> FakeBuilder:
    builder = node.containers.dask_images.builder
    assert isinstance(builder, FakeBuilder)
    return builder


def _client(node: FakeNode, tmp_path: Path, identity: Identity | None = None) -> AsyncClient:
    transport = httpx.ASGITransport(app=create_app(node))
    return AsyncClient(
        "http://bob.test",
        home=tmp_path / "x",
        identity=identity or Identity.generate(),
        transport=transport,
    )


async def _ask(client: AsyncClient, body: dict[str, Any]) -> tuple[list[str], str]:
    """The progress messages and the tag of one request; the error it ends with raised."""
    said: list[str] = []
    async for line in client.post_ndjson("/images/dask", body, unbounded=True):
        event = remote_image.DaskImageEvent.model_validate_json(line)
        if event.event == "progress" and event.message:
            said.append(event.message)
        elif event.event == "error" and event.error:
            raise error_class(event.error["code"])(event.error["message"])
        elif event.event == "ready" and event.tag:
            return said, event.tag
    raise AssertionError("no tag")


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        (TAG, True),
        ("p2prc/dask:2024.8.0rc1-py3.12", True),
        ("p2prc/dask:latest", False),
        ("p2prc/dask:2026.8.0-py3", False),
        ("p2prc/dask:2026.8.0-py3.11;rm", False),
        ("p2prc/dask:2026.8.0-py3.11 ", False),
        ("p2prc/dask:1.0+local-py3.11", False),
        ("evil/dask:2026.8.0-py3.11", False),
        ("docker.io/p2prc/dask:2026.8.0-py3.11", False),
        ("p2prc/dask:2026.8.0-py3.11@sha256:00", False),
    ],
)
def test_dask_tags_are_strict(tag: str, ok: bool) -> None:
    assert is_dask_tag(tag) is ok


async def test_a_default_node_offers_dask_images(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node, images=[TAG])
    assert NodeConfig().containers.dask is True
    assert node.containers.offers(TAG)
    assert not node.containers.offers("p2prc/dask:latest")
    async with _client(node, tmp_path) as client:
        listed = await client.images()
        assert TAG in listed.images
        assert TAG in listed.available
        view = await client.create_container(CreateContainer(image=TAG))
        assert node.runtime.specs[view.id].image == TAG
        with pytest.raises(ImageNotFound, match="not offered"):
            await client.create_container(CreateContainer(image="p2prc/dask:latest"))


async def test_dask_off_offers_only_the_listed_images(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node, images=[TAG], dask=False)
    assert not node.containers.offers(TAG)
    async with _client(node, tmp_path) as client:
        assert TAG not in (await client.images()).images
        with pytest.raises(ImageNotFound, match=r"containers\.dask is off"):
            await client.create_container(CreateContainer(image=TAG))
        with pytest.raises(ImageNotFound, match=r"containers\.dask is off"):
            await _ask(client, {"versions": versions()})
    assert _builder(node).calls == []


async def test_present_image_answers_at_once(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    _builder(node).built[TAG] = versions()
    async with _client(node, tmp_path) as client:
        said, tag = await _ask(client, {"versions": versions()})
    assert (said, tag) == ([], TAG)
    assert _builder(node).calls == []


async def test_missing_image_is_built_with_progress(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    async with _client(node, tmp_path) as client:
        said, tag = await _ask(client, {"versions": versions()})
        assert tag == TAG
        assert said == [f"building {TAG}", f"building {TAG} (fake)"]
        assert (await _ask(client, {"versions": versions()})) == ([], TAG)
    assert _builder(node).calls == [TAG]


@pytest.mark.parametrize(
    "body",
    [
        {"versions": {k: v for k, v in versions().items() if k != "numpy"}},
        {"versions": {**versions(), "evil": "1.0"}},
        {"versions": versions(numpy="1.0; rm -rf /")},
        {"versions": versions(numpy="1.0+local")},
        {"versions": versions(python="3.11.2")},
        {"versions": {**versions(), "dask": 1}},
        {"versions": versions(), "extra": 1},
        {"versions": "all"},
        {},
    ],
)
async def test_bad_versions_are_refused(
    make_fake_node: Any, tmp_path: Path, body: dict[str, Any]
) -> None:
    node = _node(make_fake_node)
    async with _client(node, tmp_path) as client:
        with pytest.raises(InvalidRequest):
            await _ask(client, body)
    assert _builder(node).calls == []


async def test_another_python_minor_is_refused(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    _builder(node).python_minor = "3.12"
    async with _client(node, tmp_path) as client:
        with pytest.raises(InvalidRequest, match=r"Python 3\.12, not 3\.11"):
            await _ask(client, {"versions": versions()})
        # Known now: refused before any answer starts.
        with pytest.raises(InvalidRequest, match=r"Python 3\.12"):
            await _ask(client, {"versions": versions(distributed="2026.9.0")})
    assert _builder(node).calls == []


async def test_the_containers_role_is_needed(make_fake_node: Any, tmp_path: Path) -> None:
    able, narrow, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    trust = TrustConfig(
        allow=[able.openssh_public_key(), narrow.openssh_public_key()],
        roles={narrow.node_id: ["relay"]},
    )
    node = _node(make_fake_node, trust=trust)
    for who in (narrow, stranger):
        async with _client(node, tmp_path, who) as client:
            with pytest.raises(NotTrusted):
                await _ask(client, {"versions": versions()})
    assert _builder(node).calls == []
    async with _client(node, tmp_path, able) as client:
        assert (await _ask(client, {"versions": versions()}))[1] == TAG


async def test_at_most_four_dask_tags(make_fake_node: Any, tmp_path: Path) -> None:
    kept = [f"p2prc/dask:2026.{n}.0-py3.11" for n in range(1, 5)]
    node = _node(make_fake_node, images=["p2prc/dask:latest", *kept])
    async with _client(node, tmp_path) as client:
        with pytest.raises(LimitExceeded) as refused:
            await _ask(client, {"versions": versions()})
        message = str(refused.value)
        assert all(tag in message for tag in kept)
        assert "docker rmi" in message
        assert "latest" not in message
        # A kept tag with other versions may be rebuilt: no fifth tag.
        assert (await _ask(client, {"versions": versions(distributed="2026.1.0")}))[1] == kept[0]
    assert _builder(node).calls == [kept[0]]


async def test_one_build_at_a_time(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    builder = _builder(node)
    builder.gate.clear()
    async with _client(node, tmp_path) as first, _client(node, tmp_path) as second:
        one = asyncio.create_task(_ask(first, {"versions": versions()}))
        two = asyncio.create_task(_ask(second, {"versions": versions()}))
        await _until(lambda: bool(builder.calls))
        with pytest.raises(LimitExceeded, match=f"builds {TAG} now"):
            await _ask(first, {"versions": versions(distributed="2026.9.0")})
        builder.gate.set()
        assert (await one)[1] == (await two)[1] == TAG
    assert builder.calls == [TAG]  # the second joined the first's build


async def test_a_build_past_the_timeout_is_an_error(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    runtime = node.runtime
    builder = FakeBuilder(runtime)
    builder.gate.clear()
    node.containers.dask_images = DaskImages(runtime, builder, timeout=0.2)
    async with _client(node, tmp_path) as client:
        with pytest.raises(ImageNotFound, match=r"took more than 0\.2 s"):
            await _ask(client, {"versions": versions()})
        # The slot stays taken while the thread runs.
        with pytest.raises(LimitExceeded):
            await _ask(client, {"versions": versions(distributed="2026.9.0")})
        builder.gate.set()
        await _until(lambda: node.containers.dask_images._building is None)
        assert (await _ask(client, {"versions": versions()})) == ([], TAG)


async def test_a_failed_build_is_a_clean_error(make_fake_node: Any, tmp_path: Path) -> None:
    node = _node(make_fake_node)
    _builder(node).fail = ClusterError("pip download for the Dask image failed; no index")
    async with _client(node, tmp_path) as client:
        with pytest.raises(ClusterError, match="pip download"):
            await _ask(client, {"versions": versions()})
    assert node.containers.dask_images._building is None


def test_dask_images_are_built_on_the_default_daemon_only() -> None:
    builder = remote_image.DockerBuilder("unix:///tmp/elsewhere.sock")
    with pytest.raises(ImageNotFound, match=r"built on unix:///var/run/docker\.sock only"):
        builder.build(versions(), print)
    with pytest.raises(ImageNotFound, match="docker save"):
        builder.python()
