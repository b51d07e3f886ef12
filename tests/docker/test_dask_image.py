"""The real Dask image: built from the host's wheels, it runs this environment's versions."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from p2prc.cluster import image

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def built(docker_client: Any) -> tuple[str, list[str]]:
    steps: list[str] = []
    tag = image.ensure_dask_image(force=True, progress=steps.append)
    return tag, steps


def run(docker_client: Any, tag: str, *command: str) -> str:
    out = docker_client.containers.run(
        tag,
        list(command[1:]),
        entrypoint=command[0],
        user="p2prc",
        remove=True,
        network_mode="none",
    )
    return bytes(out).decode().strip()


@pytest.mark.timeout(900)
def test_the_image_runs_the_local_versions(
    docker_client: Any, built: tuple[str, list[str]]
) -> None:
    tag, steps = built
    local = image.local_versions()
    assert tag == image.dask_image_tag(local)
    assert any(step.startswith(f"building {tag}") for step in steps)
    script = (
        "import json, sys, dask, distributed, numpy, pandas, cloudpickle, msgpack, tornado, toolz\n"
        "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'dask': dask.__version__, "
        "'distributed': distributed.__version__, 'numpy': numpy.__version__, "
        "'pandas': pandas.__version__, 'cloudpickle': cloudpickle.__version__, "
        "'msgpack': '.'.join(map(str, msgpack.version)), 'tornado': tornado.version, "
        "'toolz': toolz.__version__}))"
    )
    assert json.loads(run(docker_client, tag, "/opt/dask/bin/python", "-c", script)) == local
    assert run(docker_client, tag, "/opt/dask/bin/dask", "--version").endswith(
        f"version {local['dask']}"
    )


@pytest.mark.timeout(900)
def test_the_label_matches_and_a_second_ensure_is_a_fast_no_op(
    docker_client: Any, built: tuple[str, list[str]]
) -> None:
    tag, _ = built
    local = image.local_versions()
    assert image.image_versions(tag) == local
    assert image.version_mismatch(local, image.image_versions(tag)) is None
    before = docker_client.images.get(tag).id
    steps: list[str] = []
    start = time.monotonic()
    assert image.ensure_dask_image(progress=steps.append) == tag
    assert time.monotonic() - start < 5
    assert steps == []
    assert docker_client.images.get(tag).id == before


@pytest.mark.timeout(900)
def test_the_default_image_is_not_changed(docker_client: Any, built: tuple[str, list[str]]) -> None:
    labels = docker_client.images.get("p2prc/sshd:latest").labels
    assert image.VERSIONS_LABEL not in labels
    assert labels["org.p2prc.image"] == "sshd"
    assert docker_client.images.get(built[0]).labels["org.p2prc.image"] == "dask"
