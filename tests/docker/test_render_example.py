"""examples/render on real nodes: POV-Ray renders frames in containers, ImageMagick joins them."""

from __future__ import annotations

import asyncio
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2prc import ContainerConfig
from p2prc.jobs.models import JobState, JobView
from p2prc.jobs.service import JobService
from p2prc.jobs.task import parse_task

pytestmark = pytest.mark.docker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "render"
RENDER_IMAGE = "p2prc/render:latest"
BUILD = "p2prc images bootstrap --offline --packages povray,imagemagick --tag p2prc/render:latest"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def render_image(docker_client: Any) -> str:
    try:
        docker_client.images.get(RENDER_IMAGE)
    except Exception:
        pytest.skip(f"{RENDER_IMAGE} is not built (about 90 s offline): run '{BUILD}'")
    return RENDER_IMAGE


def _task(name: str, work: Path, **changes: Any) -> Any:
    """The example's own task file, with ``changes``, run from ``work``."""
    data = tomllib.loads((EXAMPLE / name).read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return parse_task(data, base=work)


async def _run(jobs: JobService, task: Any) -> tuple[JobView, list[str]]:
    job = await jobs.submit(task)
    done = await asyncio.wait_for(jobs.wait(job.id), 300)
    log = [e.log.line async for e in jobs.events(job.id) if e.log is not None]
    assert done.state is JobState.SUCCEEDED, (done.reason, log)
    return done, log


async def test_the_render_example_renders_and_joins_frames(
    node_factory: Any, render_image: str, tmp_path: Path
) -> None:
    work = tmp_path / "render"
    work.mkdir()
    for name in ("scene.pov", "render.sh", "join.sh"):
        shutil.copy(EXAMPLE / name, work / name)
    offers = ContainerConfig(images=["p2prc/sshd:latest", render_image])
    async with node_factory("alice") as alice, node_factory("bob", containers=offers) as bob:
        small = {"FRAMES": "2", "WIDTH": "160", "HEIGHT": "120"}
        render = _task("task.toml", work, nodes=2, env=small, peers=[bob.api_url])
        assert render.image == render_image
        done, log = await _run(alice.jobs, render)
        assert any("rank 0 of 2: 1 frames of 2" in line for line in log), log
        assert any("rank 1 of 2: 1 frames of 2" in line for line in log), log
        frames = alice.jobs.results_dir(done.id) / "frames"
        images = [(frames / name).read_bytes() for name in ("frame1.png", "frame2.png")]
        for data in images:
            assert data.startswith(PNG)
            assert data[12:16] == b"IHDR"
            assert int.from_bytes(data[16:20], "big") == 160
            assert int.from_bytes(data[20:24], "big") == 120
            assert len(data) > 4096  # a rendered scene, not a blank picture
        assert images[0] != images[1]

        shutil.copytree(frames, work / "frames")
        joined, log = await _run(alice.jobs, _task("join.toml", work, peers=[bob.api_url]))
        assert any("joined 2 frames" in line for line in log), log
        results = alice.jobs.results_dir(joined.id)
        assert (results / "sheet.png").read_bytes().startswith(PNG)
        assert (results / "render.gif").read_bytes()[:6] == b"GIF89a"
