"""The owner's side of a peer's Dask image: ``ensure_on_peer`` against a fake peer, and
placement skipping a peer that refuses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2prc.api import create_app
from p2prc.cluster.certs import ClusterCA
from p2prc.cluster.hub import Hub
from p2prc.cluster.image import PACKAGES
from p2prc.cluster.models import ClusterCreate
from p2prc.cluster.remote_image import DaskImages, ensure_on_peer
from p2prc.cluster.service import ClusterService, _Live
from p2prc.cluster.store import ClusterStore
from p2prc.config import ContainerConfig, NodeConfig, TrustConfig
from p2prc.containers.runtime import FakeRuntime
from p2prc.errors import (
    ClusterError,
    ImageNotFound,
    LimitExceeded,
    PeerProtocolError,
    QuotaExceeded,
)
from p2prc.identity import Identity
from p2prc.jobs.placement import Candidate
from p2prc.models import CreateContainer
from p2prc.peers.link import PeerLink
from p2prc.state import State
from tests.conftest import FakeNode
from tests.unit.containers.test_dask_images import TAG, FakeBuilder

PEER = "http://bob.test"


def versions(**changes: str) -> dict[str, str]:
    found = {name: "1.0" for name in PACKAGES}
    found.update({"python": "3.11", "distributed": "2026.8.0", **changes})
    return found


def _peer(make_fake_node: Any, **config: Any) -> FakeNode:
    runtime = FakeRuntime()
    node = make_fake_node(
        NodeConfig(
            name="bob", trust=TrustConfig(mode="open"), containers=ContainerConfig(**config)
        ),
        runtime=runtime,
    )
    assert isinstance(node, FakeNode)
    node.containers.dask_images = DaskImages(runtime, FakeBuilder(runtime))
    return node


def _link(transport: httpx.AsyncBaseTransport) -> PeerLink:
    return PeerLink(Identity.generate(), None, NodeConfig().timeouts, transport=transport)


def _asgi(node: FakeNode) -> PeerLink:
    return _link(httpx.ASGITransport(app=create_app(node)))


def _answering(lines: list[dict[str, Any]], status: int = 200) -> PeerLink:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/status":
            return httpx.Response(200, json={"node_id": "0" * 32})
        body = "".join(json.dumps(line) + "\n" for line in lines)
        return httpx.Response(status, content=body.encode())

    return _link(httpx.MockTransport(handler))


async def test_the_peer_builds_and_progress_names_it(make_fake_node: Any) -> None:
    said: list[str] = []

    async def progress(line: str) -> None:
        said.append(line)

    peer = _peer(make_fake_node)
    assert await ensure_on_peer(_asgi(peer), PEER, "bob", versions(), progress) == TAG
    assert said[0] == f"bob: making sure it has {TAG}"
    assert f"bob: building {TAG} (fake)" in said
    said.clear()
    assert await ensure_on_peer(_asgi(peer), PEER, "bob", versions(), progress) == TAG
    assert said == [f"bob: making sure it has {TAG}"]


async def _quiet(line: str) -> None:
    pass


async def test_refusals_are_errors_placement_skips(make_fake_node: Any) -> None:
    off = _peer(make_fake_node, dask=False)
    with pytest.raises(ImageNotFound, match=r"containers\.dask is off"):
        await ensure_on_peer(_asgi(off), PEER, "bob", versions(), _quiet)
    full = _peer(make_fake_node)
    full.runtime._images += [f"p2prc/dask:2026.{n}.0-py3.11" for n in range(1, 5)]
    with pytest.raises(LimitExceeded, match="docker rmi"):
        await ensure_on_peer(_asgi(full), PEER, "bob", versions(), _quiet)
    other = _peer(make_fake_node)
    builder = other.containers.dask_images.builder
    assert isinstance(builder, FakeBuilder)
    builder.python_minor = "3.12"
    with pytest.raises(ImageNotFound, match=r"bob could not make .*invalid_request.*3\.12"):
        await ensure_on_peer(_asgi(other), PEER, "bob", versions(), _quiet)
    failing = _peer(make_fake_node)
    builder = failing.containers.dask_images.builder
    assert isinstance(builder, FakeBuilder)
    builder.fail = ClusterError("pip download ... failed")
    with pytest.raises(ImageNotFound, match="cluster_error: pip download"):
        await ensure_on_peer(_asgi(failing), PEER, "bob", versions(), _quiet)


async def test_a_peer_without_the_route_is_left_to_its_config() -> None:
    missing = [{"error": {"code": "not_found", "message": "no such route"}}]
    assert await ensure_on_peer(_answering(missing, 404), PEER, "b", versions(), _quiet) is None


@pytest.mark.parametrize(
    "lines",
    [
        [{"event": "ready", "tag": "p2prc/dask:9.9.9-py3.11"}],
        [{"event": "progress", "message": "x"}],
        [{"event": "surprise"}],
        [{"event": "error", "error": {"code": "not_found", "message": "gone"}}],
    ],
)
async def test_odd_answers_are_peer_errors(lines: list[dict[str, Any]]) -> None:
    with pytest.raises((PeerProtocolError, ImageNotFound)):
        await ensure_on_peer(_answering(lines), PEER, "b", versions(), _quiet)


async def test_a_peer_message_is_cleaned() -> None:
    said: list[str] = []

    async def progress(line: str) -> None:
        said.append(line)

    lines = [
        {"event": "progress", "message": "\x1b[2Jevil" + "x" * 1000},
        {"event": "ready", "tag": TAG},
    ]
    assert await ensure_on_peer(_answering(lines), PEER, "b", versions(), progress) == TAG
    assert said[1].startswith("b:  [2Jevil")
    assert len(said[1]) < 320


async def _no_image(image: str | None, say: Any) -> tuple[str, dict[str, str]]:
    raise AssertionError("not used")


class _Host:
    """Creates nothing: records where a container was asked for, and refuses it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def create_on_peer(
        self, peer: str, spec: CreateContainer | None = None, progress: Any = None
    ) -> Any:
        self.asked.append(peer)
        raise QuotaExceeded("full")

    async def remove(self, container: str) -> str:
        return container


async def test_a_peer_refusing_the_image_is_skipped(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    store = ClusterStore(state.connection, tmp_path / "clusters")
    host = _Host()
    asked: list[str] = []

    async def peer_image(peer: str, name: str, wanted: dict[str, str], say: Any) -> None:
        asked.append(name)
        if name == "carol":
            raise LimitExceeded("carol keeps 4 Dask images")

    me = Candidate("http://127.0.0.1:1", "alice")

    def find(needs: Any) -> tuple[list[Candidate], list[str]]:
        return [
            me,
            Candidate("http://127.0.0.1:2", "carol"),
            Candidate("http://127.0.0.1:3", "dave"),
        ], []

    service = ClusterService(
        store, host, tmp_path / "key", find, _no_image, me=me, me_id="0" * 32, peer_image=peer_image
    )
    spec = ClusterCreate(workers=1)
    view = store.create(spec)
    live = _Live(ClusterCA.create(view.id), Hub(tmp_path / "key"), TAG, versions())
    with pytest.raises(ClusterError) as failed:
        await service._place(view.id, spec, live, "w1", 1, _quiet)
    assert asked == ["carol", "dave"]  # this node builds its own image: not asked
    # Nothing was created where the image was refused.
    assert host.asked == ["http://127.0.0.1:1", "http://127.0.0.1:3"]
    # An image that is no Dask image (or has no versions) is the peer's config's business.
    asked.clear()
    other = _Live(live.ca, live.hub, "lab/dask:1", versions())
    with pytest.raises(ClusterError):
        await service._place(view.id, spec, other, "w2", 2, _quiet)
    assert asked == []
    assert "carol: limit_exceeded: carol keeps 4" in str(failed.value)
    assert "dave: quota_exceeded: full" in str(failed.value)
    state.close()
